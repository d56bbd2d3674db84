#!/usr/bin/env bash
# Wire phoenix-mesh into the Phoenix hypervisor's own sources of truth, so that every later
# `phoenix sync all` deploys the two sidecars instead of undoing them.
#
#   integrate.sh PHOENIX_DIR [options]          edit the files (first run needs --binary)
#   integrate.sh PHOENIX_DIR --dry-run [opts]   print the diff it would make, write nothing
#   integrate.sh PHOENIX_DIR --revert           put every file back as it was, byte for byte
#
# PHOENIX_DIR holds bin/ and etc/ (normally /usr/local/phoenix_hypervisor). Run on the Proxmox
# host; needs bash, jq, coreutils and diff (diffutils). Nothing inside a container is touched:
# the containers get the mesh from `phoenix sync all` (deploy/README.md).
#
# What it edits (originals kept in PHOENIX_DIR/.phoenix-mesh-backup/ for --revert):
#   etc/certificate-manifest.json       the nginx-gateway-client entry (LXC 101) installs into the
#                                       client sidecar; a new entry issues the listener's certificate
#   etc/phoenix_lxc_configs.json        firewall rules 101 -> 102 on the listener port; feature
#                                       `phoenix_mesh` on both guests
#   etc/phoenix_hypervisor_config.json  the same 101 -> 102 rule at cluster level
#   etc/traefik/traefik.yml.template    entrypoint `mesh` becomes plain HTTP on loopback
#   etc/nginx/sites-available/gateway   proxies to the client sidecar instead of Traefik
#   etc/nginx/stream.d/stream-gateway.conf  the :8443 stream goes to the client sidecar too
# and what it adds:
#   bin/lxc_setup/phoenix_hypervisor_feature_install_phoenix_mesh.sh  installs a sidecar in a guest
#   etc/phoenix-mesh/{client.toml,server.toml,mesh.env}  rendered sidecar configs and settings
#   share/phoenix-mesh/  the phoenix-mesh binary, units and install.sh from deploy/
#
# Addresses, guest ids and ports come from etc/phoenix_lxc_configs.json or from the options below.

set -euo pipefail

prog=integrate.sh
say() { printf '%s: %s\n' "$prog" "$*"; }
die() {
    printf '%s: ERROR: %s\n' "$prog" "$*" >&2
    exit 1
}
usage() {
    cat >&2 <<'EOF'
usage: integrate.sh PHOENIX_DIR [--dry-run | --revert [--force]] [options]

options (defaults in brackets):
  --binary PATH            phoenix-mesh binary to ship to the guests (required on the first run)
  --client-guest ID        the nginx gateway's LXC [101]
  --server-guest ID        the Traefik LXC, where the mesh listener runs [102]
  --client-ip IP           the gateway's address on the listener's network
                           [from phoenix_lxc_configs.json: the one in the listener's subnet]
  --server-ip IP           the listener's address [network_config.ip of the server guest]
  --listen-port PORT       the mesh listener's port [8443]
  --client-port PORT       the client sidecar's loopback port nginx proxies to [8080]
  --traefik-port PORT      Traefik's `mesh` entrypoint on 127.0.0.1 [8081]
  --server-name NAME       the listener certificate's name, the client's server_name
                           [mesh.internal.thinkheads.ai]
  --dry-run                print the diff, change nothing
  --revert                 restore every file from PHOENIX_DIR/.phoenix-mesh-backup/
  --force                  with --revert: also restore files edited after integration
EOF
    exit 2
}

# --- arguments -----------------------------------------------------------------------------------
[[ $# -ge 1 ]] || usage
case $1 in -h | --help) usage ;; esac
phoenix_arg=$1
shift
binary_src="" client_guest=101 server_guest=102 client_ip="" server_ip=""
listen_port=8443 client_port=8080 traefik_port=8081 server_name=mesh.internal.thinkheads.ai
mode=apply force=false
while [[ $# -gt 0 ]]; do
    case $1 in
    --binary) binary_src=${2:?--binary needs a path} && shift ;;
    --client-guest) client_guest=${2:?} && shift ;;
    --server-guest) server_guest=${2:?} && shift ;;
    --client-ip) client_ip=${2:?} && shift ;;
    --server-ip) server_ip=${2:?} && shift ;;
    --listen-port) listen_port=${2:?} && shift ;;
    --client-port) client_port=${2:?} && shift ;;
    --traefik-port) traefik_port=${2:?} && shift ;;
    --server-name) server_name=${2:?} && shift ;;
    --dry-run) mode=dry-run ;;
    --revert) mode=revert ;;
    --force) force=true ;;
    -h | --help) usage ;;
    *) die "unknown option '$1' (--help lists them)" ;;
    esac
    shift
done

[[ -d $phoenix_arg ]] || die "PHOENIX_DIR $phoenix_arg is not a directory"
P=$(cd -- "$phoenix_arg" && pwd -P)
[[ -d $P/bin && -d $P/etc ]] || die "$P does not hold bin/ and etc/: is it the phoenix_hypervisor directory?"
for tool in jq cmp diff sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed (integrate.sh needs bash, jq, coreutils and diffutils)"
done
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
deploy_dir=$(dirname -- "$script_dir")
backup=$P/.phoenix-mesh-backup

# --- revert ----------------------------------------------------------------------------------------
# The backup holds: orig/<rel> (each edited file as it was before the first run), created (files and
# directories the integration added, one relative path a line) and written.sha256 (what the last run
# wrote, to notice later hand edits that a revert would throw away).
if [[ $mode == revert ]]; then
    [[ -d $backup ]] || {
        say "nothing to revert: $backup does not exist"
        exit 0
    }
    if ! $force && [[ -f $backup/written.sha256 ]]; then
        edited=$(cd "$P" && { sha256sum --quiet -c "$backup/written.sha256" 2>/dev/null || true; } | sed -n 's/: FAILED.*//p')
        if [[ -n $edited ]]; then
            die "these files changed since integrate.sh wrote them, and a revert would lose that: $(echo "$edited" | tr '\n' ' ')(keep a copy, then --revert --force)"
        fi
    fi
    if [[ -d $backup/orig ]]; then
        while IFS= read -r -d '' f; do
            rel=${f#"$backup/orig/"}
            cp -p -- "$f" "$P/$rel.phoenix-mesh-revert.$$"
            mv -f -- "$P/$rel.phoenix-mesh-revert.$$" "$P/$rel"
            say "restored $rel"
        done < <(find "$backup/orig" -type f -print0)
    fi
    if [[ -f $backup/created ]]; then
        # Files first, then directories deepest first (the list holds both, in creation order).
        tac "$backup/created" | while IFS= read -r rel; do
            if [[ -f $P/$rel || -L $P/$rel ]]; then
                rm -f -- "${P:?}/$rel" && say "removed $rel"
            elif [[ -d $P/$rel ]]; then
                if rmdir -- "$P/$rel" 2>/dev/null; then say "removed $rel/"; else say "kept $rel/ (not empty)"; fi
            fi
        done
    fi
    rm -rf -- "$backup"
    say "reverted; run 'phoenix sync all' to push the restored files to the guests"
    exit 0
fi

# --- inputs and their shapes -------------------------------------------------------------------------
MANIFEST=etc/certificate-manifest.json
LXC=etc/phoenix_lxc_configs.json
HYP=etc/phoenix_hypervisor_config.json
TRAEFIK=etc/traefik/traefik.yml.template
GATEWAY=etc/nginx/sites-available/gateway
STREAM=etc/nginx/stream.d/stream-gateway.conf
FEATURE=bin/lxc_setup/phoenix_hypervisor_feature_install_phoenix_mesh.sh
client_identity_cn=nginx-gateway-client

for rel in "$MANIFEST" "$LXC" "$HYP" "$TRAEFIK" "$GATEWAY" "$STREAM"; do
    [[ -f $P/$rel ]] || die "$P/$rel is missing (integrate.sh edits it; is PHOENIX_DIR the right directory?)"
    [[ -r $P/$rel ]] || die "$P/$rel is not readable"
done
for rel in "$MANIFEST" "$LXC" "$HYP"; do
    err=$(jq -e . "$P/$rel" 2>&1 >/dev/null) || die "$P/$rel is not valid JSON: ${err:-empty file}"
done
for f in "$deploy_dir/install.sh" "$script_dir/phoenix-mesh-feature.sh" \
    "$deploy_dir/lxc-101-nginx/phoenix-mesh-client.toml" "$deploy_dir/lxc-101-nginx/phoenix-mesh-client.service" \
    "$deploy_dir/lxc-102-traefik/phoenix-mesh-server.toml" "$deploy_dir/lxc-102-traefik/phoenix-mesh-server.service"; do
    [[ -f $f ]] || die "$f is missing: run integrate.sh from a checkout of the phoenix-mesh repository"
done

# shape FILE JQ-TEST MESSAGE: refuse unless the test holds.
shape() {
    jq -e --arg c "$client_guest" --arg s "$server_guest" "$2" "$P/$1" >/dev/null 2>&1 || die "$P/$1: $3"
}
shape "$MANIFEST" 'type == "array" and all(.[]; type == "object" and (.common_name | type) == "string")' \
    "expected a top-level array of certificate entries, each with a common_name"
shape "$MANIFEST" 'all(.[] | select(.common_name == "nginx-gateway-client"); (.guest_id | type) == "number" and (.cert_path | type) == "string" and (.key_path | type) == "string")' \
    "the nginx-gateway-client entry needs a numeric guest_id, cert_path and key_path"
shape "$LXC" '(.lxc_configs | type) == "object"' "expected an object .lxc_configs keyed by guest id"
for g in "$client_guest" "$server_guest"; do
    jq -e --arg g "$g" '.lxc_configs[$g] | type == "object"' "$P/$LXC" >/dev/null 2>&1 ||
        die "$P/$LXC: no guest $g in .lxc_configs (use --client-guest/--server-guest)"
    jq -e --arg g "$g" '.lxc_configs[$g] | (.firewall | type) == "object" and (.firewall.rules | type) == "array"' "$P/$LXC" >/dev/null 2>&1 ||
        die "$P/$LXC: guest $g has no .firewall.rules array"
    jq -e --arg g "$g" '.lxc_configs[$g] | (.features // [] | type) == "array" and (.mount_points // [] | type) == "array"' "$P/$LXC" >/dev/null 2>&1 ||
        die "$P/$LXC: guest $g: .features and .mount_points must be arrays"
    jq -e --arg g "$g" '.lxc_configs[$g].mount_points // [] | any(.container_path == "/etc/step-ca/ssl")' "$P/$LXC" >/dev/null 2>&1 ||
        die "$P/$LXC: guest $g does not bind-mount the step-ca root at /etc/step-ca/ssl (mount_points), which the sidecar's ca reads"
done
shape "$HYP" '(.firewall.global_firewall_rules | type) == "array"' "expected an array .firewall.global_firewall_rules"

# --- addresses -------------------------------------------------------------------------------------
valid_port() {
    if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then die "$1 '$2' is not a port number"; fi
}
valid_port --listen-port "$listen_port"
valid_port --client-port "$client_port"
valid_port --traefik-port "$traefik_port"
[[ $client_guest =~ ^[0-9]+$ && $server_guest =~ ^[0-9]+$ ]] || die "guest ids are numbers"
[[ $server_name =~ ^[A-Za-z0-9.-]+$ ]] || die "--server-name '$server_name' is not a DNS name"

ipv4_int() { # ipv4_int A.B.C.D -> integer, or fails
    local IFS=. a b c d
    [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    read -r a b c d <<<"$1"
    ((a < 256 && b < 256 && c < 256 && d < 256)) || return 1
    echo $(((a << 24) | (b << 16) | (c << 8) | d))
}
# guest_cidrs ID: the guest's static addresses (network_config, then secondary_network_config).
guest_cidrs() {
    jq -r --arg g "$1" '.lxc_configs[$g] | [.network_config.ip?, .secondary_network_config.ip?]
        | map(select(type == "string" and . != "" and . != "dhcp" and . != "manual")) | .[]' "$P/$LXC"
}
server_cidr=""
if [[ -z $server_ip ]]; then
    server_cidr=$(guest_cidrs "$server_guest" | head -n 1)
    [[ -n $server_cidr ]] || die "$P/$LXC: guest $server_guest has no static address in network_config.ip; pass --server-ip"
    server_ip=${server_cidr%%/*}
fi
ipv4_int "$server_ip" >/dev/null || die "listener address '$server_ip' is not an IPv4 address (from $LXC or --server-ip)"
if [[ -z $client_ip ]]; then
    mapfile -t cands < <(guest_cidrs "$client_guest")
    [[ ${#cands[@]} -gt 0 ]] || die "$P/$LXC: guest $client_guest has no static address; pass --client-ip"
    if [[ ${#cands[@]} -eq 1 ]]; then
        client_ip=${cands[0]%%/*}
    else
        # The gateway's address on the listener's network: the one in the listener's subnet.
        prefix=${server_cidr#*/}
        [[ $server_cidr == */* && $prefix =~ ^[0-9]+$ ]] || die "guest $client_guest has several addresses and the listener's prefix length is unknown; pass --client-ip"
        mask=$(((0xffffffff << (32 - prefix)) & 0xffffffff))
        s=$(ipv4_int "$server_ip")
        for c in "${cands[@]}"; do
            ci=$(ipv4_int "${c%%/*}") || continue
            if (((ci & mask) == (s & mask))); then
                client_ip=${c%%/*}
                break
            fi
        done
        [[ -n $client_ip ]] || die "$P/$LXC: none of guest $client_guest's addresses (${cands[*]}) is in $server_cidr; pass --client-ip"
    fi
fi
ipv4_int "$client_ip" >/dev/null || die "gateway address '$client_ip' is not an IPv4 address (from $LXC or --client-ip)"

# The listener's certificate files on the host: in the server guest's own bind-mounted certs/ssl
# directory, like every other entry of the manifest.
server_cert_dir=$(jq -r --arg g "$server_guest" '.lxc_configs[$g].mount_points // [] | map(select(.host_path | test("/" + $g + "/(certs|ssl)/?$"))) | .[0].host_path // empty' "$P/$LXC")
[[ -n $server_cert_dir ]] || die "$P/$LXC: guest $server_guest has no bind-mounted .../$server_guest/certs or .../$server_guest/ssl directory in mount_points for the listener's certificate"
server_cert_dir=${server_cert_dir%/}
# The client's identity as the listener checks it: the nginx-gateway-client entry's first SAN (its CN
# when it has none); the entry is created with the plan's SAN when the manifest lacks it.
client_identity=$(jq -r --arg cn "$client_identity_cn" --argjson g "$client_guest" \
    'map(select(.common_name == $cn and .guest_id == $g)) | .[0] | if . == null then empty else (.sans[0]? // .common_name) end' "$P/$MANIFEST")
client_identity=${client_identity:-nginx.internal.thinkheads.ai}

share_rel=share/phoenix-mesh
if [[ -n $binary_src ]]; then
    [[ -f $binary_src && -x $binary_src ]] || die "--binary $binary_src is not an executable file"
elif [[ -f $P/$share_rel/phoenix-mesh ]]; then
    binary_src=$P/$share_rel/phoenix-mesh
else
    die "no phoenix-mesh binary yet: pass --binary PATH (e.g. target/release/phoenix-mesh)"
fi

# --- build every target file in a staging directory ------------------------------------------------
stage=$(mktemp -d)
trap 'rm -rf -- "$stage"' EXIT
mkdir -p "$stage/new"
out() { # out REL: the staged path of REL (directories created)
    mkdir -p -- "$(dirname -- "$stage/new/$1")"
    printf '%s' "$stage/new/$1"
}
# json_out REL: pretty-print stdin as the original is (4 spaces; no final newline if it had none).
json_out() {
    local dest tmp
    dest=$(out "$1")
    tmp=$stage/json.tmp
    jq --indent 4 . >"$tmp"
    if [[ -s $P/$1 && $(tail -c 1 -- "$P/$1" | od -An -c | tr -d ' ') != '\n' ]]; then
        printf '%s' "$(cat "$tmp")" >"$dest"
    else
        cp -- "$tmp" "$dest"
    fi
}

hook="$P/$FEATURE"
mark="phoenix-mesh:"

# 1. certificate manifest: adapt nginx-gateway-client, add (or refresh) the listener's entry.
jq --arg ccn "$client_identity_cn" --argjson cg "$client_guest" --argjson sg "$server_guest" \
    --arg scn "$server_name" --arg chook "$hook $client_guest --certificates" \
    --arg shook "$hook $server_guest --certificates" --arg cid "$client_identity" \
    --arg scert "$server_cert_dir/mesh-listener.crt" --arg skey "$server_cert_dir/mesh-listener.key" '
    def is_client: .common_name == $ccn and .guest_id == $cg;
    def is_server: .common_name == $scn and .guest_id == $sg;
    def server_entry: {common_name: $scn, sans: [$scn], guest_id: $sg, guest_type: "lxc",
        cert_path: $scert, key_path: $skey, owner: "root:root", post_renewal_command: $shook};
    (if any(.[]; is_client) then map(if is_client then .post_renewal_command = $chook else . end)
     else . + [{common_name: $ccn, sans: [$cid], guest_id: $cg, guest_type: "lxc",
        cert_path: ("/mnt/pve/quickOS/lxc-persistent-data/\($cg)/ssl/nginx-client.crt"),
        key_path: ("/mnt/pve/quickOS/lxc-persistent-data/\($cg)/ssl/nginx-client.key"),
        owner: "root:root", cert_type: "client", post_renewal_command: $chook}] end)
    | if any(.[]; is_server) then map(if is_server then server_entry else . end) else . + [server_entry] end
    ' "$P/$MANIFEST" | json_out "$MANIFEST"

# 2. guest firewall rules (first match wins, so ours go first) and the phoenix_mesh feature.
rule_accept_in=$(jq -nc --arg s "$client_ip" --arg d "$server_ip" --arg p "$listen_port" --arg m "$mark" --arg cg "$client_guest" \
    '{type: "in", action: "ACCEPT", proto: "tcp", source: $s, dest: $d, port: $p, comment: "\($m) nginx gateway (LXC \($cg)) to the mesh listener, mutual TLS"}')
rule_drop_in=$(jq -nc --arg p "$listen_port" --arg m "$mark" \
    '{type: "in", action: "DROP", proto: "tcp", port: $p, comment: "\($m) the mesh listener from anywhere else"}')
rule_out=$(jq -nc --arg s "$client_ip" --arg d "$server_ip" --arg p "$listen_port" --arg m "$mark" --arg sg "$server_guest" \
    '{type: "out", action: "ACCEPT", proto: "tcp", source: $s, dest: $d, port: $p, comment: "\($m) client sidecar to the mesh listener (LXC \($sg)), mutual TLS"}')
jq --arg cg "$client_guest" --arg sg "$server_guest" --arg m "$mark" \
    --argjson ain "$rule_accept_in" --argjson din "$rule_drop_in" --argjson out "$rule_out" '
    def ours: (.comment // "") | startswith($m);
    def with_feature: .features = ((.features // []) | if index("phoenix_mesh") then . else . + ["phoenix_mesh"] end);
    .lxc_configs[$sg].firewall.rules = [$ain, $din] + (.lxc_configs[$sg].firewall.rules | map(select(ours | not)))
    | .lxc_configs[$cg].firewall.rules = [$out] + (.lxc_configs[$cg].firewall.rules | map(select(ours | not)))
    | .lxc_configs[$sg] |= with_feature
    | .lxc_configs[$cg] |= with_feature
    ' "$P/$LXC" | json_out "$LXC"

# 3. the same 101 -> 102 rule at cluster level (matters where traffic crosses the node's firewall).
jq --arg m "$mark" --argjson ain "$rule_accept_in" '
    .firewall.global_firewall_rules = (.firewall.global_firewall_rules | map(select((.comment // "") | startswith($m) | not))) + [$ain]
    ' "$P/$HYP" | json_out "$HYP"

# 4. Traefik: the `mesh` entrypoint becomes plain HTTP on loopback, fed only by the listener.
mesh_block="  mesh:
    # $mark plain HTTP on loopback. phoenix-mesh-server owns :$listen_port (mutual TLS from the
    # gateway) and forwards here; the generated routers (entryPoints: [mesh]) are unchanged.
    address: \"127.0.0.1:$traefik_port\"
    forwardedHeaders:
      trustedIPs:
        - \"127.0.0.1/32\""
if ! awk -v block="$mesh_block" '
    /^entryPoints:[[:space:]]*$/ { inep = 1; print; next }
    inep && /^[^[:space:]#]/ { inep = 0 }
    skip && (/^   / || /^[[:space:]]*#/) { next }
    skip { skip = 0 }
    inep && /^  mesh:[[:space:]]*$/ { print block; skip = 1; found = 1; next }
    { print }
    END { exit found ? 0 : 3 }
    ' "$P/$TRAEFIK" >"$(out "$TRAEFIK")"; then
    die "$P/$TRAEFIK: no 'mesh:' entrypoint (two-space indent) under a top-level 'entryPoints:'"
fi

# 5. nginx gateway (http): every `proxy_pass https://...` goes to the client sidecar instead; the
#    proxy_ssl_* lines go (the sidecar does the TLS); an upstream block on top names the sidecar.
gw_head="# $mark begin (deploy/phoenix/integrate.sh; \`integrate.sh --revert\` restores the original)
# The client sidecar (phoenix-mesh-client.service in this container): plain HTTP on loopback,
# mutual TLS to the mesh listener at $server_ip:$listen_port.
map \$http_upgrade \$phoenix_mesh_connection {
    default upgrade;
    ''      \"\";
}
upstream phoenix_mesh {
    server 127.0.0.1:$client_port;
    keepalive 64;
    # below the sidecar's header_read_timeout (30 s): nginx closes idle connections first
    keepalive_timeout 25s;
}
# $mark end
"
# shellcheck disable=SC2016 # nginx variables, not shell ones
gw_proxy='proxy_pass http://phoenix_mesh;
proxy_http_version 1.1;
proxy_set_header Upgrade $http_upgrade;
proxy_set_header Connection $phoenix_mesh_connection;
proxy_set_header X-Forwarded-Client-Cert "";
proxy_read_timeout 70s;
proxy_send_timeout 70s;'
{
    printf '%s' "$gw_head"
    awk -v mark="$mark" -v proxy="$gw_proxy" '
        $0 ~ "^# " mark " begin" { drop = 1; next }
        drop && $0 ~ "^# " mark " end" { drop = 0; next }
        drop { next }
        /^[[:space:]]*proxy_ssl_[a-z_]+[[:space:]]/ { next }
        /^[[:space:]]*proxy_pass[[:space:]]+https:\/\// {
            match($0, /^[[:space:]]*/); ind = substr($0, 1, RLENGTH)
            was = $0; sub(/^[[:space:]]*/, "", was)
            print ind "# " mark " was `" was "`; the client sidecar carries it to the mesh listener"
            n = split(proxy, l, "\n"); for (i = 1; i <= n; i++) print ind l[i]
            next
        }
        { print }
        ' "$P/$GATEWAY"
} >"$(out "$GATEWAY")"
grep -q 'proxy_pass http://phoenix_mesh;' "$stage/new/$GATEWAY" ||
    die "$P/$GATEWAY: no 'proxy_pass https://...' line to point at the client sidecar"

# 6. nginx stream on 8443: TLS from clients still ends here; the plain stream goes to the sidecar.
st_head="# $mark begin (deploy/phoenix/integrate.sh): TLS from clients ends here as before; the plain
# stream goes to the client sidecar, which carries it to the mesh listener over mutual TLS.
# $mark end
"
upstreams_seen=$(grep -cE '^[[:space:]]*upstream[[:space:]]+[A-Za-z0-9_]+[[:space:]]*\{' "$P/$STREAM" || true)
[[ $upstreams_seen -eq 1 ]] || die "$P/$STREAM: expected exactly one upstream block, found $upstreams_seen"
{
    printf '%s' "$st_head"
    awk -v mark="$mark" -v sidecar="127.0.0.1:$client_port" '
        $0 ~ "^# " mark " begin" { drop = 1; next }
        drop && $0 ~ "^# " mark " end" { drop = 0; next }
        drop { next }
        /^[[:space:]]*upstream[[:space:]]+[A-Za-z0-9_]+[[:space:]]*\{/ { inup = 1; print; next }
        inup && /^[[:space:]]*server[[:space:]]/ {
            if (!done) { match($0, /^[[:space:]]*/); print substr($0, 1, RLENGTH) "server " sidecar ";  # " mark " the client sidecar" }
            done = 1; next
        }
        inup && /\}/ { inup = 0 }
        # a comment block that only introduced proxy_ssl lines goes with them
        /^[[:space:]]*#/ { held = held $0 "\n"; next }
        /^[[:space:]]*proxy_ssl([_a-z]*)?[[:space:]]/ { held = ""; dropped = 1; next }
        /^[[:space:]]*$/ { if (dropped) next; printf "%s", held; held = ""; print; next }
        { printf "%s", held; held = ""; if (dropped) print ""; dropped = 0; print }
        END { printf "%s", held; exit done ? 0 : 3 }
        ' "$P/$STREAM" | cat -s
} >"$(out "$STREAM")" || die "$P/$STREAM: its upstream block has no 'server' line"

# 7. new files: the feature script, rendered configs, and what the guests get from deploy/.
# set_key FILE KEY VALUE: replace the line `KEY = ...` (the deploy/ templates have each once).
set_key() {
    grep -qE "^$2 = " "$1" || die "$1: no '$2 = ' line to set (deploy/ template changed?)"
    local v=$3
    v=${v//\\/\\\\}
    v=${v//&/\\&}
    v=${v//|/\\|}
    sed -i -E "s|^$2 = .*|$2 = $v|" "$1"
}
client_toml=$(out etc/phoenix-mesh/client.toml)
{
    echo "# Rendered by deploy/phoenix/integrate.sh from deploy/lxc-101-nginx/phoenix-mesh-client.toml;"
    echo "# re-run integrate.sh to change it. Installed in LXC $client_guest as /etc/phoenix-mesh/client.toml."
    cat "$deploy_dir/lxc-101-nginx/phoenix-mesh-client.toml"
} >"$client_toml"
set_key "$client_toml" listen "\"127.0.0.1:$client_port\""
set_key "$client_toml" upstreams "[\"$server_ip:$listen_port\"]"
set_key "$client_toml" server_name "\"$server_name\""
set_key "$client_toml" cert '"/etc/phoenix-mesh/ssl/nginx-client.crt"'
set_key "$client_toml" key '"/etc/phoenix-mesh/ssl/nginx-client.key"'
set_key "$client_toml" ca '"/etc/step-ca/ssl/phoenix_root_ca.crt"'
server_toml=$(out etc/phoenix-mesh/server.toml)
{
    echo "# Rendered by deploy/phoenix/integrate.sh from deploy/lxc-102-traefik/phoenix-mesh-server.toml;"
    echo "# re-run integrate.sh to change it. Installed in LXC $server_guest as /etc/phoenix-mesh/server.toml."
    cat "$deploy_dir/lxc-102-traefik/phoenix-mesh-server.toml"
} >"$server_toml"
set_key "$server_toml" listen "\"$server_ip:$listen_port\""
set_key "$server_toml" backend "\"127.0.0.1:$traefik_port\""
set_key "$server_toml" cert '"/etc/phoenix-mesh/ssl/mesh-listener.crt"'
set_key "$server_toml" key '"/etc/phoenix-mesh/ssl/mesh-listener.key"'
set_key "$server_toml" ca '"/etc/step-ca/ssl/phoenix_root_ca.crt"'
set_key "$server_toml" allowed_peers "[\"$client_identity\"]"
cat >"$(out etc/phoenix-mesh/mesh.env)" <<EOF
# phoenix-mesh settings, written by deploy/phoenix/integrate.sh (re-run it to change them).
# Read by $FEATURE and deploy/phoenix/verify.sh.
CLIENT_GUEST=$client_guest
SERVER_GUEST=$server_guest
CLIENT_IP=$client_ip
SERVER_IP=$server_ip
LISTEN_PORT=$listen_port
CLIENT_PORT=$client_port
TRAEFIK_PORT=$traefik_port
SERVER_NAME=$server_name
CLIENT_IDENTITY=$client_identity
EOF
cp -- "$script_dir/phoenix-mesh-feature.sh" "$(out "$FEATURE")"
cp -- "$binary_src" "$(out $share_rel/phoenix-mesh)"
cp -- "$deploy_dir/install.sh" "$(out $share_rel/install.sh)"
cp -- "$deploy_dir/lxc-101-nginx/phoenix-mesh-client.service" "$(out $share_rel/phoenix-mesh-client.service)"
cp -- "$deploy_dir/lxc-102-traefik/phoenix-mesh-server.service" "$(out $share_rel/phoenix-mesh-server.service)"

# The rendered configs must parse with the binary being shipped (when it runs here).
if "$stage/new/$share_rel/phoenix-mesh" --version >/dev/null 2>&1; then
    for side in client server; do
        if ! msg=$("$stage/new/$share_rel/phoenix-mesh" "$side" --config "$stage/new/etc/phoenix-mesh/$side.toml" --check --config-only 2>&1); then
            die "the rendered $side config does not validate with $binary_src: $msg"
        fi
    done
fi

# --- compare, then print (dry run) or write --------------------------------------------------------
mode_of() { # the mode a new file gets
    case $1 in "$FEATURE" | */phoenix-mesh | */install.sh) echo 0755 ;; *) echo 0644 ;; esac
}
changed=()
while IFS= read -r -d '' f; do
    rel=${f#"$stage/new/"}
    if [[ -f $P/$rel ]] && cmp -s -- "$f" "$P/$rel"; then
        continue
    fi
    changed+=("$rel")
done < <(find "$stage/new" -type f -print0 | sort -z)

if [[ ${#changed[@]} -eq 0 ]]; then
    say "nothing to change: $P is already integrated with these settings"
    exit 0
fi

if [[ $mode == dry-run ]]; then
    for rel in "${changed[@]}"; do
        if [[ $rel == */phoenix-mesh ]]; then
            echo "--- $P/$rel"
            echo "+++ $P/$rel (binary: $(stat -c %s "$stage/new/$rel") bytes from $binary_src)"
            continue
        fi
        if [[ -f $P/$rel ]]; then
            diff -u --label "$P/$rel" --label "$P/$rel (integrated)" -- "$P/$rel" "$stage/new/$rel" || true
        else
            diff -u --label /dev/null --label "$P/$rel (new)" -- /dev/null "$stage/new/$rel" || true
        fi
    done
    say "dry run: ${#changed[@]} file(s) would change; nothing was written"
    exit 0
fi

mkdir -p -- "$backup/orig"
touch -- "$backup/created"
# record_created REL: note REL and each directory above it that does not exist yet.
record_created() {
    local rel=$1 parts=() d=""
    IFS=/ read -r -a parts <<<"$(dirname -- "$rel")"
    for p in "${parts[@]}"; do
        [[ -n $p && $p != . ]] || continue
        d=${d:+$d/}$p
        if [[ ! -e $P/$d ]]; then
            grep -qxF -- "$d" "$backup/created" || echo "$d" >>"$backup/created"
        fi
    done
    grep -qxF -- "$rel" "$backup/created" || echo "$rel" >>"$backup/created"
}
for rel in "${changed[@]}"; do
    if [[ -f $P/$rel ]]; then
        if [[ ! -e $backup/orig/$rel ]] && ! grep -qxF -- "$rel" "$backup/created"; then
            mkdir -p -- "$(dirname -- "$backup/orig/$rel")"
            cp -p -- "$P/$rel" "$backup/orig/$rel"
        fi
        perm=$(stat -c %a -- "$P/$rel")
    else
        record_created "$rel"
        perm=$(mode_of "$rel")
    fi
    mkdir -p -- "$(dirname -- "$P/$rel")"
    tmp=$P/$rel.phoenix-mesh-new.$$
    cp -- "$stage/new/$rel" "$tmp"
    chmod "$perm" -- "$tmp"
    mv -f -- "$tmp" "$P/$rel"
    say "wrote $rel"
done
# What this run wrote, so --revert can tell a later hand edit from our own output.
(cd "$stage/new" && find . -type f -printf '%P\0' | sort -z | xargs -0 sha256sum) >"$backup/written.sha256"
say "done (${#changed[@]} file(s)); originals in $backup. Next: phoenix sync all, then deploy/phoenix/verify.sh $P"
