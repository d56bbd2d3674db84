#!/usr/bin/env bash
# Verify the mesh from the Proxmox host, hop by hop, with a verdict per hop:
#
#   verify.sh PHOENIX_DIR [--host NAME] [--path P] [--gateway IP] [--cacert FILE]
#
#   1. listener   pct exec SERVER -- phoenix-mesh server --check  (config, certificate, Traefik's
#                 mesh entrypoint on loopback)
#   2. client     pct exec CLIENT -- phoenix-mesh client --check --host NAME --path P  (config,
#                 certificate, mutual TLS to the listener, a request through to Traefik)
#   3. gateway    curl from the host to https://NAME/P at the gateway's address, verified against
#                 the Phoenix root CA: nginx -> client sidecar -> listener -> Traefik -> service
#
# Guests, addresses and the listener's port come from PHOENIX_DIR/etc/phoenix-mesh/mesh.env, which
# deploy/phoenix/integrate.sh writes. NAME defaults to Traefik's own dashboard router
# (traefik.internal.thinkheads.ai, path /api/version), which every generated configuration has.
# Exit 0 only when every hop passes.

set -uo pipefail

say() { printf '%s\n' "$*"; }
die() {
    printf 'verify.sh: ERROR: %s\n' "$*" >&2
    exit 2
}

[[ $# -ge 1 ]] || die "usage: verify.sh PHOENIX_DIR [--host NAME] [--path P] [--gateway IP] [--cacert FILE]"
P=$1
shift
env_file=$P/etc/phoenix-mesh/mesh.env
[[ -f $env_file ]] || die "$env_file is missing: run deploy/phoenix/integrate.sh $P first"
# shellcheck source=/dev/null
source "$env_file"
host=traefik.internal.thinkheads.ai path=/api/version gateway=${CLIENT_IP:?} cacert=""
while [[ $# -gt 0 ]]; do
    case $1 in
    --host) host=${2:?} && shift ;;
    --path) path=${2:?} && shift ;;
    --gateway) gateway=${2:?} && shift ;;
    --cacert) cacert=${2:?} && shift ;;
    *) die "unknown option '$1'" ;;
    esac
    shift
done
if [[ -z $cacert ]]; then
    # The step-ca root as the guests see it, on the host side of their bind mount.
    ca_dir=$(jq -r --arg g "$CLIENT_GUEST" '.lxc_configs[$g].mount_points // [] | map(select(.container_path == "/etc/step-ca/ssl")) | .[0].host_path // empty' "$P/etc/phoenix_lxc_configs.json")
    cacert=${ca_dir:+$ca_dir/phoenix_root_ca.crt}
fi
[[ -n $cacert && -f $cacert ]] || die "no Phoenix root CA at '${cacert}': pass --cacert FILE"

failed=0
verdict() { # verdict OK|FAIL|WARN HOP TEXT
    printf '[%-4s] %-9s %s\n' "$1" "$2" "$3"
    [[ $1 != FAIL ]] || failed=1
}
indent() { sed 's/^/             | /'; }

# 0. Both guests running at all.
for g in "$CLIENT_GUEST" "$SERVER_GUEST"; do
    if ! pct status "$g" 2>/dev/null | grep -q 'status: running'; then
        verdict FAIL "lxc $g" "not running (pct status $g)"
    fi
done

# 1. the listener, inside the server guest.
if out=$(pct exec "$SERVER_GUEST" -- /usr/local/bin/phoenix-mesh server --config /etc/phoenix-mesh/server.toml --check 2>&1 </dev/null); then
    verdict OK listener "LXC $SERVER_GUEST, $SERVER_IP:$LISTEN_PORT -> Traefik mesh entrypoint 127.0.0.1:$TRAEFIK_PORT"
else
    verdict FAIL listener "LXC $SERVER_GUEST: phoenix-mesh server --check failed:"
    printf '%s\n' "$out" | indent
fi

# 2. the client sidecar, inside the client guest: mutual TLS to the listener and a request through.
if out=$(pct exec "$CLIENT_GUEST" -- /usr/local/bin/phoenix-mesh client --config /etc/phoenix-mesh/client.toml --check --host "$host" --path "$path" 2>&1 </dev/null); then
    verdict OK client "LXC $CLIENT_GUEST, 127.0.0.1:$CLIENT_PORT -> mutual TLS -> $SERVER_IP:$LISTEN_PORT ($SERVER_NAME) -> Traefik, Host $host"
else
    verdict FAIL client "LXC $CLIENT_GUEST: phoenix-mesh client --check failed:"
    printf '%s\n' "$out" | indent
fi

# 3. the whole path as a user takes it: through nginx's TLS on the gateway.
hdrs=$(mktemp)
trap 'rm -f -- "$hdrs"' EXIT
code=$(curl -sS -o /dev/null -D "$hdrs" -w '%{http_code}' --max-time 15 --cacert "$cacert" \
    --resolve "$host:443:$gateway" "https://$host$path" 2>&1) || code="curl: ${code:-failed}"
mesh_error=$(sed -n 's/^phoenix-mesh-error:[[:space:]]*//Ip' "$hdrs" | tr -d '\r')
if [[ ! $code =~ ^[0-9]{3}$ ]]; then
    verdict FAIL gateway "https://$host$path via $gateway:443: $code"
elif [[ -n $mesh_error ]]; then
    verdict FAIL gateway "https://$host$path via $gateway:443: $code, phoenix-mesh-error: $mesh_error (the body names the hop)"
elif [[ $code == 404 ]]; then
    verdict WARN gateway "https://$host$path via $gateway:443: 404 from Traefik: the mesh works, but no router for Host $host"
elif [[ $code =~ ^5 ]]; then
    verdict FAIL gateway "https://$host$path via $gateway:443: $code (not from the mesh: Traefik or the service)"
else
    verdict OK gateway "https://$host$path via $gateway:443: $code"
fi

if [[ $failed -eq 0 ]]; then
    say "verdict: the mesh works, hop by hop"
else
    say "verdict: FAILED (see the hops marked FAIL)"
fi
exit "$failed"
