#!/usr/bin/env bash
# A scratch Proxmox host for testing deploy/phoenix/ against the real Phoenix scripts.
#
#   world.sh SCENARIO WORKDIR PHOENIX_MESH_BINARY FIXTURE_DIR
#
# SCENARIO is `sources` (integrate.sh edits, the real firewall generator, idempotence, dry run,
# revert, refusals) or `e2e` (the real renewal manager issues, pushes and runs the post-renewal
# commands; the real Traefik generator; a real Traefik, nginx and both sidecars; verify.sh).
# Prints `PASS name` / `FAIL name: why` lines; exits non-zero when anything failed.
#
# Must run as root: everything happens in a private mount namespace and a private network namespace
# (`unshare -m -n`) whose only interface is loopback, so nothing can reach the 172.16.100.x/10.x
# addresses the Phoenix configs name, and the host's own files are never written:
#  - tmpfs over /mnt/pve, /etc/pve, /root/.step and /var/log; the copy of the fixture bind-mounted
#    at /usr/local/phoenix_hypervisor, where the Phoenix scripts look for their JSON files. Mount
#    points that do not exist on the machine are created empty beforehand and removed afterwards.
#  - stubs for pct, qm, step, pve-firewall and systemctl first on PATH (tests/phoenix/stubs).
#  - a guest (LXC) is a mount namespace of its own, held open by a sleeping process: overlays over
#    /etc, /usr/local and /var with per-guest upper directories (so useradd, installed files and
#    configs stay in that guest), its own /tmp and /run, and the bind mounts of its `mount_points`
#    from phoenix_lxc_configs.json. `pct exec`/`pct push` enter it with nsenter. Guests share the
#    network namespace (all addresses are 127.x). Not modelled: unprivileged uid mapping.
set -euo pipefail

scenario=${1:?scenario} work=${2:?workdir} binary=${3:?binary} fixture=${4:?fixture dir}
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd -- "$here/../.." && pwd -P)

if [[ ${PHOENIX_WORLD_INSIDE:-} != 1 ]]; then
    [[ $(id -u) -eq 0 ]] || { echo "FAIL world: must run as root (unshare, mounts)"; exit 1; }
    # One world at a time on this host: the mount points below are created on the host and removed
    # afterwards, and removing one that another run's namespace has mounted over detaches that mount
    # (the other run then writes to the host's directory instead of its tmpfs).
    mkdir -p /run/lock
    exec 9>/run/lock/phoenix-mesh-world.lock
    flock 9
    created=()
    for d in /mnt/pve /etc/pve /root/.step /usr/local/phoenix_hypervisor; do
        if [[ ! -e $d ]]; then
            mkdir -p "$d"
            created+=("$d")
        fi
    done
    # shellcheck disable=SC2317 # called by the EXIT trap
    remove_created() {
        for d in "${created[@]}"; do rmdir "$d" 2>/dev/null || true; done
    }
    trap remove_created EXIT
    # The lock stays with this shell: nothing the world starts inherits it.
    PHOENIX_WORLD_INSIDE=1 unshare -m -n --propagation private -- "$0" "$@" 9>&-
    exit
fi

# ------------------------------------------------------------------- inside the namespaces
W=$work
export WORLD=$W
P=/usr/local/phoenix_hypervisor
failures=0
pass() { echo "PASS $*"; }
fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for f in "$W"/guests/*.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

ip link set lo up
for d in /mnt/pve /etc/pve /root/.step /var/log; do mount -t tmpfs tmpfs "$d"; done
mkdir -p /etc/pve/firewall "$W/guests" "$W/active"
: >"$W/running"
rm -rf "$W/phoenix"
cp -a "$fixture" "$W/phoenix"
# The fixture lacks the VM list; the generators read it. An empty one: no VMs in the scratch world.
[[ -f $W/phoenix/etc/phoenix_vm_configs.json ]] || echo '{"vms": []}' >"$W/phoenix/etc/phoenix_vm_configs.json"
mount --bind "$W/phoenix" "$P"
export PATH="$here/stubs:$PATH"
integrate=$repo/deploy/phoenix/integrate.sh
verify=$repo/deploy/phoenix/verify.sh
tree_sum() { (cd "$1" && find . \( -type f -o -type d \) -printf '%m %p\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum); }

run_firewall() { # run_firewall OUTDIR: the real generator, its .fw files copied to OUTDIR
    rm -rf "$1"
    if ! bash "$P/bin/hypervisor_setup/hypervisor_feature_setup_firewall.sh" >"$1.log" 2>&1; then
        fail "firewall generator exited non-zero (log: $1.log)"
    fi
    cp -a /etc/pve/firewall "$1"
}

# ============================================================================ sources
if [[ $scenario == sources ]]; then
    # Guest firewalls are off for 101 and 102 in the repository; turn them on in the copy (as an
    # operator would) so the generator writes their rules and the test sees them.
    jq --indent 4 '.lxc_configs["101"].firewall.enabled = true | .lxc_configs["102"].firewall.enabled = true' \
        "$P/etc/phoenix_lxc_configs.json" >"$W/lxc.json" && cat "$W/lxc.json" >"$P/etc/phoenix_lxc_configs.json"
    cp -a "$W/phoenix" "$W/baseline"
    run_firewall "$W/fw-before"

    # --dry-run: a diff on stdout, nothing written.
    before=$(tree_sum "$P")
    if bash "$integrate" "$P" --binary "$binary" --dry-run >"$W/dry-run.out" 2>&1; then
        if grep -q '^+++ .*certificate-manifest.json' "$W/dry-run.out" && grep -q '^-.*proxy_pass https://' "$W/dry-run.out" &&
            [[ $(tree_sum "$P") == "$before" ]]; then
            pass "dry-run prints the diff and writes nothing"
        else
            fail "dry-run: no diff printed, or files changed (output: $W/dry-run.out)"
        fi
    else
        fail "dry-run exited non-zero: $(cat "$W/dry-run.out")"
    fi

    if bash "$integrate" "$P" --binary "$binary" >"$W/integrate.out" 2>&1; then
        pass "integrate.sh ran"
    else
        fail "integrate.sh exited non-zero: $(cat "$W/integrate.out")"
    fi
    run_firewall "$W/fw-after"
    # Exactly these lines appear, none disappear. -dport present: the generator read `port`.
    diff -r "$W/fw-before" "$W/fw-after" | grep '^[<>]' | sort >"$W/fw.diff" || true
    cat >"$W/fw.expected" <<'EOF'
> IN ACCEPT -proto tcp -source 172.16.100.10 -dest 172.16.100.12 -dport 8443 # phoenix-mesh: nginx gateway (LXC 101) to the mesh listener, mutual TLS
> IN ACCEPT -proto tcp -source 172.16.100.10 -dest 172.16.100.12 -dport 8443 # phoenix-mesh: nginx gateway (LXC 101) to the mesh listener, mutual TLS
> IN DROP -proto tcp -dport 8443 # phoenix-mesh: the mesh listener from anywhere else
> OUT ACCEPT -proto tcp -source 172.16.100.10 -dest 172.16.100.12 -dport 8443 # phoenix-mesh: client sidecar to the mesh listener (LXC 102), mutual TLS
EOF
    if diff -u "$W/fw.expected" "$W/fw.diff" >"$W/fw.mismatch"; then
        pass "firewall generator emits the mesh rules and only those"
    else
        fail "firewall rules differ from the intended ones: $(cat "$W/fw.mismatch")"
    fi
    # Where they land: first in 102.fw (first match wins), the out rule in 101.fw, one in cluster.fw.
    first102=$(sed -n '/^\[RULES\]/{n;p;}' "$W/fw-after/102.fw")
    if [[ $first102 == "IN ACCEPT -proto tcp -source 172.16.100.10 -dest 172.16.100.12 -dport 8443 "* ]] &&
        grep -q '^OUT ACCEPT .*-dport 8443 # phoenix-mesh' "$W/fw-after/101.fw" &&
        grep -q '^IN ACCEPT .*-dport 8443 # phoenix-mesh' "$W/fw-after/cluster.fw"; then
        pass "mesh rules first in 102.fw, out rule in 101.fw, cluster rule in cluster.fw"
    else
        fail "mesh rules not where expected (see $W/fw-after)"
    fi

    # Traefik: mesh is plain HTTP on loopback; nothing else in the template binds 8443.
    t=$P/etc/traefik/traefik.yml.template
    if grep -q 'address: "127.0.0.1:8081"' "$t" && ! grep -q ':8443"' "$t" && ! grep -q 'mesh-mtls' "$t"; then
        pass "traefik.yml.template: mesh entrypoint on 127.0.0.1:8081 without TLS"
    else
        fail "traefik.yml.template not as intended: $(cat "$t")"
    fi
    # nginx: no proxy to Traefik left, both configs go to the client sidecar.
    if ! grep -v '^[[:space:]]*#' "$P/etc/nginx/sites-available/gateway" | grep -q 'proxy_pass https://' &&
        ! grep -v '^[[:space:]]*#' "$P/etc/nginx/stream.d/stream-gateway.conf" | grep -q 'proxy_ssl' &&
        grep -q 'server 127.0.0.1:8080;' "$P/etc/nginx/stream.d/stream-gateway.conf" && grep -q 'proxy_pass http://phoenix_mesh;' "$P/etc/nginx/sites-available/gateway"; then
        pass "nginx gateway and stream point at the client sidecar"
    else
        fail "nginx configs not as intended"
    fi
    # Certificate manifest: the client entry adapted, not duplicated; one listener entry.
    m=$P/etc/certificate-manifest.json
    if jq -e --arg hook "$P/bin/lxc_setup/phoenix_hypervisor_feature_install_phoenix_mesh.sh" '
        (map(select(.common_name == "nginx-gateway-client")) | length == 1 and .[0].post_renewal_command == "\($hook) 101 --certificates"
            and .[0].cert_path == "/mnt/pve/quickOS/lxc-persistent-data/101/ssl/nginx-client.crt")
        and (map(select(.common_name == "mesh.internal.thinkheads.ai")) | length == 1 and .[0].guest_id == 102 and .[0].guest_type == "lxc"
            and .[0].sans == ["mesh.internal.thinkheads.ai"]
            and .[0].cert_path == "/mnt/pve/quickOS/lxc-persistent-data/102/certs/mesh-listener.crt"
            and .[0].post_renewal_command == "\($hook) 102 --certificates")
        and length == 9' "$m" >/dev/null; then
        pass "certificate manifest: nginx-gateway-client adapted, listener entry added"
    else
        fail "certificate manifest not as intended"
    fi

    # Second run: nothing changes.
    before=$(tree_sum "$P")
    out=$(bash "$integrate" "$P" --binary "$binary" 2>&1) || fail "second run exited non-zero: $out"
    if [[ $out == *"nothing to change"* && $(tree_sum "$P") == "$before" ]]; then
        pass "second run is a no-op"
    else
        fail "second run changed something: $out"
    fi

    # --revert: byte for byte (and mode for mode) the tree before integrate.sh.
    out=$(bash "$integrate" "$P" --revert 2>&1) || fail "revert exited non-zero: $out"
    if diff -r "$W/baseline" "$P" >"$W/revert.diff" && [[ $(tree_sum "$P") == "$(tree_sum "$W/baseline")" ]]; then
        pass "--revert restores every file byte for byte"
    else
        fail "--revert left differences: $(head -c 2000 "$W/revert.diff")"
    fi

    # Broken inputs are refused, naming the file and the cause, with nothing written.
    refuse() { # refuse NAME EXPECTED-TEXT MUTATION...: mutate a fresh copy, expect a refusal
        local name=$1 expect=$2 dir=$W/refuse-$1
        shift 2
        rm -rf "$dir" && cp -a "$W/baseline" "$dir"
        (cd "$dir" && eval "$*")
        local sum out rc=0
        sum=$(tree_sum "$dir")
        out=$(bash "$integrate" "$dir" --binary "$binary" 2>&1) || rc=$?
        if [[ $rc -ne 0 && $out == *"$expect"* && $(tree_sum "$dir") == "$sum" ]]; then
            pass "refuses $name: $out"
        else
            fail "did not refuse $name cleanly (exit $rc): $out"
        fi
    }
    refuse truncated-manifest "etc/certificate-manifest.json is not valid JSON" 'head -c 200 etc/certificate-manifest.json > x && mv x etc/certificate-manifest.json'
    refuse manifest-not-array "etc/certificate-manifest.json: expected a top-level array" "jq '{certificates: .}' etc/certificate-manifest.json > x && mv x etc/certificate-manifest.json"
    refuse missing-stream "etc/nginx/stream.d/stream-gateway.conf is missing" 'rm etc/nginx/stream.d/stream-gateway.conf'
    refuse no-mesh-entrypoint "etc/traefik/traefik.yml.template: no 'mesh:' entrypoint" "sed -i 's/^  mesh:/  other:/' etc/traefik/traefik.yml.template"
    refuse rules-not-array "guest 102 has no .firewall.rules array" "jq --indent 4 '.lxc_configs[\"102\"].firewall.rules = {}' etc/phoenix_lxc_configs.json > x && mv x etc/phoenix_lxc_configs.json"
    refuse gateway-without-proxy "etc/nginx/sites-available/gateway: no 'proxy_pass https://...' line" "sed -i '/proxy_pass/d' etc/nginx/sites-available/gateway"
fi

# ============================================================================ e2e
if [[ $scenario == e2e ]]; then
    # Loopback addresses for the three guests the path touches: the gateway (101, its internal
    # interface), Traefik (102), and a service Traefik routes to (802, granite-3b, port 8000).
    jq --indent 4 '.lxc_configs["101"].secondary_network_config.ip = "127.0.0.10/24"
        | .lxc_configs["102"].network_config.ip = "127.0.0.12/24"
        | .lxc_configs["802"].network_config.ip = "127.0.0.42/24"' \
        "$P/etc/phoenix_lxc_configs.json" >"$W/lxc.json" && cat "$W/lxc.json" >"$P/etc/phoenix_lxc_configs.json"
    # nginx's stream block keeps :8443 in 101; guests share one network namespace here, so the
    # listener takes another port (a flag, as an operator could).
    lport=9443
    if out=$(bash "$integrate" "$P" --binary "$binary" --listen-port "$lport" 2>&1); then
        pass "integrate.sh ran (loopback addresses)"
    else
        fail "integrate.sh: $out"
        exit 1
    fi

    # The test CA: a root and an intermediate, as step-ca has; the root where Phoenix keeps it.
    ca=$W/ca
    mkdir -p "$ca"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca/root.key" 2>/dev/null
    openssl req -x509 -new -key "$ca/root.key" -subj "/CN=Phoenix Test Root CA" -days 2 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$ca/root.crt" 2>/dev/null
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca/int.key" 2>/dev/null
    openssl req -new -key "$ca/int.key" -subj "/CN=Phoenix Test Intermediate CA" -out "$ca/int.csr" 2>/dev/null
    printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' >"$ca/int.ext"
    openssl x509 -req -in "$ca/int.csr" -CA "$ca/root.crt" -CAkey "$ca/root.key" -CAcreateserial -days 2 -sha256 \
        -extfile "$ca/int.ext" -out "$ca/int.crt" 2>/dev/null
    ssl103=/mnt/pve/quickOS/lxc-persistent-data/103/ssl
    mkdir -p "$ssl103"
    cp "$ca/root.crt" "$ssl103/phoenix_root_ca.crt"
    echo test-provisioner-password >"$ssl103/provisioner_password.txt"

    guest_up() { # guest_up ID: a mount namespace standing in for the container (see the header)
        local id=$1 g=$W/guests/$1 mounts
        mkdir -p "$g"/{etc,usr-local,var}-{upper,work} "$g/tmp" "$g/run"
        chmod 1777 "$g/tmp"
        mounts=$(jq -r --arg id "$id" '.lxc_configs[$id].mount_points // [] | .[] | "\(.host_path)\t\(.container_path)"' "$P/etc/phoenix_lxc_configs.json")
        while IFS=$'\t' read -r hp _; do [[ -n $hp ]] && mkdir -p "$hp"; done <<<"$mounts"
        mkfifo "$g/ready"
        # shellcheck disable=SC2016 # the script runs in the new namespace, with its own arguments
        unshare -m --propagation private -- /bin/bash -c '
            set -e
            g=$1 mounts=$2
            for d in etc usr-local var; do
                target=/${d/-//}
                mount -t overlay overlay -o "lowerdir=$target,upperdir=$g/$d-upper,workdir=$g/$d-work" "$target"
            done
            while IFS=$'"'"'\t'"'"' read -r hp cp; do
                [[ -n $hp ]] || continue
                mkdir -p "$cp"
                mount --bind "$hp" "$cp"
            done <<<"$mounts"
            mount --bind "$g/run" /run
            exec 3>"$g/ready"
            # last: the work directory itself may be under /tmp
            mount --bind "$g/tmp" /tmp
            echo up >&3
            exec 3>&-
            exec sleep infinity' guest "$g" "$mounts" &
        echo $! >"$g.pid"
        exec 4<>"$g/ready"
        if ! read -r -t 20 _ <&4; then
            echo "FAIL guest $id: its namespace did not come up"
            exit 1
        fi
        exec 4<&-
        echo "$id" >>"$W/running"
    }
    guest_up 101
    guest_up 102
    echo 103 >>"$W/running" # step-ca: only `pct status 103` is asked

    # What Phoenix's creation of 101 and 102 leaves behind and the sync does not redo: nginx.conf
    # (lxc-manager pushes it at creation), Traefik's directories and its old static config.
    pct push 101 "$P/etc/nginx/nginx.conf" /etc/nginx/nginx.conf
    pct exec 101 -- mkdir -p /etc/nginx/stream.d /etc/nginx/sites-available /etc/nginx/sites-enabled
    pct exec 102 -- mkdir -p /etc/traefik/dynamic
    pct push 102 "$fixture/etc/traefik/traefik.yml.template" /etc/traefik/traefik.yml

    # --- Stage 3 of `phoenix sync all`: the real renewal manager, forced, as the sync runs it.
    if bash "$P/bin/managers/certificate-renewal-manager.sh" --force >"$W/renewal.log" 2>&1; then
        pass "certificate-renewal-manager.sh --force exited 0"
    else
        fail "certificate-renewal-manager.sh --force exited non-zero (log: $W/renewal.log)"
    fi
    for cn in nginx-gateway-client mesh.internal.thinkheads.ai; do
        if grep -q "Post-renewal command executed successfully for '$cn'" "$W/renewal.log" &&
            ! grep -q "Post-renewal command failed for '$cn'" "$W/renewal.log"; then
            pass "post_renewal_command of $cn succeeded"
        else
            fail "post_renewal_command of $cn did not succeed (log: $W/renewal.log)"
        fi
    done
    # The files where the sidecars read them, root:phoenix-mesh 0640, readable by the service user,
    # chained to the root, matching their keys; the pushed copies gone from /tmp.
    for pair in "101 nginx-client nginx.internal.thinkheads.ai" "102 mesh-listener mesh.internal.thinkheads.ai"; do
        read -r g name san <<<"$pair"
        d=/etc/phoenix-mesh/ssl
        st=$(pct exec "$g" -- stat -c '%U:%G %a' "$d/$name.crt" "$d/$name.key" 2>&1 | tr '\n' ' ')
        if [[ $st == "root:phoenix-mesh 640 root:phoenix-mesh 640 " ]] &&
            pct exec "$g" -- runuser -u phoenix-mesh -- /bin/sh -c "cat $d/$name.crt $d/$name.key >/dev/null" &&
            pct exec "$g" -- /bin/sh -c "openssl verify -CAfile /etc/step-ca/ssl/phoenix_root_ca.crt -untrusted $d/$name.crt $d/$name.crt" >/dev/null &&
            pct exec "$g" -- /bin/sh -c "openssl x509 -in $d/$name.crt -noout -ext subjectAltName | grep -q 'DNS:$san'" &&
            [[ $(pct exec "$g" -- /bin/sh -c "openssl x509 -in $d/$name.crt -noout -pubkey") == "$(pct exec "$g" -- /bin/sh -c "openssl pkey -in $d/$name.key -pubout")" ]] &&
            ! pct exec "$g" -- test -e /tmp/cert.pem && ! pct exec "$g" -- test -e /tmp/key.pem; then
            pass "LXC $g: $name certificate installed, root:phoenix-mesh 0640, readable by phoenix-mesh, chained, SAN $san"
        else
            fail "LXC $g: $name certificate not installed as intended ($st)"
        fi
    done
    if grep -q '^102 restart traefik' "$W/systemctl.log" && grep -q '^102 start phoenix-mesh-server.service' "$W/systemctl.log" &&
        grep -q '^101 start phoenix-mesh-client.service' "$W/systemctl.log" &&
        pct exec 102 -- cat /etc/traefik/traefik.yml | cmp -s - "$P/etc/traefik/traefik.yml.template"; then
        pass "the hook updated Traefik's static config, restarted Traefik, started both sidecars"
    else
        fail "systemctl calls not as expected: $(cat "$W/systemctl.log")"
    fi

    # --- Stage 4 (Traefik), as sync_all does it: push the template, generate, push the dynamic file.
    pct push 102 "$P/etc/traefik/traefik.yml.template" /etc/traefik/traefik.yml
    if bash "$P/bin/generate_traefik_config.sh" >"$W/traefik-gen.log" 2>&1 && grep -q 'granite-3b-router' "$P/etc/traefik/dynamic_conf.yml"; then
        pass "generate_traefik_config.sh wrote routers on the mesh entrypoint"
    else
        fail "generate_traefik_config.sh failed (log: $W/traefik-gen.log)"
    fi
    pct push 102 "$P/etc/traefik/dynamic_conf.yml" /etc/traefik/dynamic/dynamic_conf.yml
    # Test-only changes to a copy of the static config, none on the mesh path: no Swarm provider (no
    # Docker here), and the other entrypoints on 127.0.0.12 (nginx holds :80/:443 in this shared
    # network namespace).
    pct exec 102 -- /bin/bash -c 'awk '"'"'
        /^providers:/ { inp = 1 } inp && /^[^ ]/ && !/^providers:/ { inp = 0 }
        inp && /^  swarm:/ { skip = 1; next } skip && /^    / { next } { skip = 0; print }
        '"'"' /etc/traefik/traefik.yml | sed -e "s/address: \":80\"/address: \"127.0.0.12:18080\"/" \
            -e "s/address: \":443\"/address: \"127.0.0.12:18443\"/" -e "s/address: \":8080\"/address: \"127.0.0.12:18081\"/" \
            >/etc/traefik/traefik-test.yml'
    traefik_bin=${TRAEFIK_BIN:-$(command -v traefik || true)}
    pct exec 102 -- "$traefik_bin" --configFile=/etc/traefik/traefik-test.yml >"$W/traefik.log" 2>&1 &
    pids+=($!)

    # --- Stage 5 (nginx), as sync_all does it.
    pct exec 101 -- tee /etc/nginx/sites-available/gateway >/dev/null <"$P/etc/nginx/sites-available/gateway"
    pct exec 101 -- ln -sf /etc/nginx/sites-available/gateway /etc/nginx/sites-enabled/
    pct exec 101 -- tee /etc/nginx/stream.d/stream-gateway.conf >/dev/null <"$P/etc/nginx/stream.d/stream-gateway.conf"
    pct exec 101 -- rm -f /etc/nginx/sites-enabled/default /etc/nginx/conf.d/default.conf
    if pct exec 101 -- nginx -t >"$W/nginx-t.log" 2>&1; then
        pass "nginx -t accepts the integrated gateway and stream configs"
    else
        fail "nginx -t: $(cat "$W/nginx-t.log")"
    fi
    pct exec 101 -- nginx -g 'daemon off;' >"$W/nginx.log" 2>&1 &
    pids+=($!)

    # The service behind Traefik (LXC 802): echoes what it received.
    python3 "$here/backend.py" 127.0.0.42 8000 >"$W/backend.log" 2>&1 &
    pids+=($!)
    # The sidecars as their unit runs them: the service user, the installed binary and config.
    start_sidecar() { # start_sidecar GUEST SIDE
        # setpriv execs (no fork), so $! is the sidecar itself.
        pct exec "$1" -- setpriv --reuid=phoenix-mesh --regid=phoenix-mesh --init-groups -- /usr/local/bin/phoenix-mesh "$2" --config "/etc/phoenix-mesh/$2.toml" >"$W/$2.log" 2>&1 &
        pids+=($!)
        mkdir -p "$W/active/$1" && touch "$W/active/$1/phoenix-mesh-$2"
    }
    start_sidecar 102 server
    server_pid=${pids[-1]}
    start_sidecar 101 client

    wait_port() { # wait_port HOST PORT NAME
        for _ in $(seq 1 100); do
            if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
            sleep 0.1
        done
        fail "$3 did not listen on $1:$2"
        return 1
    }
    wait_port 127.0.0.42 8000 backend
    wait_port 127.0.0.1 8081 "Traefik mesh entrypoint" || cat "$W/traefik.log"
    wait_port 127.0.0.12 "$lport" "mesh listener" || cat "$W/server.log"
    wait_port 127.0.0.1 8080 "client sidecar" || cat "$W/client.log"
    wait_port 127.0.0.10 443 "nginx gateway" || cat "$W/nginx.log"
    # Traefik loads the file provider asynchronously: wait for the router.
    for _ in $(seq 1 50); do
        curl -s -o /dev/null -w '%{http_code}' -H 'Host: granite-3b.internal.thinkheads.ai' http://127.0.0.1:8081/ | grep -q 200 && break
        sleep 0.2
    done

    root=$ssl103/phoenix_root_ca.crt
    name=granite-3b.internal.thinkheads.ai
    for port in 443 8443; do
        code=$(curl -sS --max-time 20 -o "$W/body-$port" -D "$W/headers-$port" -w '%{http_code}' --cacert "$root" \
            --resolve "$name:$port:127.0.0.10" "https://$name:$port/through/the/mesh?x=1" 2>"$W/curl-$port.err") || true
        body=$(cat "$W/body-$port" 2>/dev/null || true)
        if [[ $code == 200 && $body == *"path=/through/the/mesh?x=1"* && $body == *"host=$name"* &&
            $body == *"x-forwarded-client-cert="*"DNS=nginx.internal.thinkheads.ai"* ]]; then
            pass "https://$name:$port/ through nginx, the client sidecar, the listener, Traefik to the service: 200, gateway identity in X-Forwarded-Client-Cert"
        else
            fail "request via :$port: status $code, body: $body, curl: $(cat "$W/curl-$port.err"); logs in $W"
        fi
    done

    # verify.sh, the host-side check, on the working mesh ...
    if out=$(bash "$verify" "$P" --gateway 127.0.0.10 --cacert "$root" 2>&1) && [[ $(grep -c '^\[OK  \]' <<<"$out") -eq 3 ]]; then
        pass "verify.sh: every hop OK"
    else
        fail "verify.sh on a working mesh: $out"
    fi
    # ... and with the listener stopped: the listener and client hops fail, and so does the gateway.
    kill "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        (exec 3<>"/dev/tcp/127.0.0.12/$lport") 2>/dev/null || break
        sleep 0.1
    done
    rc=0
    out=$(bash "$verify" "$P" --gateway 127.0.0.10 --cacert "$root" --host "$name" --path / 2>&1) || rc=$?
    if [[ $rc -ne 0 && $out == *"[FAIL] client"* && $out == *"[FAIL] gateway"*"phoenix-mesh-error"* ]]; then
        pass "verify.sh names the failing hops when the listener is down"
    else
        fail "verify.sh with the listener down (exit $rc): $out"
    fi
fi

echo "world $scenario: $failures failure(s)"
[[ $failures -eq 0 ]]
