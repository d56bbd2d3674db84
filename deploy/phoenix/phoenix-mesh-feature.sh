#!/bin/bash
# Phoenix feature `phoenix_mesh`: install or update a phoenix-mesh sidecar in an LXC, from the Proxmox
# host, with pct. Installed by deploy/phoenix/integrate.sh as
# PHOENIX_DIR/bin/lxc_setup/phoenix_hypervisor_feature_install_phoenix_mesh.sh and run
#   - by lxc-manager.sh as a feature of the client and server guests (`features` in
#     phoenix_lxc_configs.json): installs binary, unit and config; the unit stays stopped until the
#     certificate exists;
#   - as the post_renewal_command of the two certificate-manifest entries, with --certificates, by
#     certificate-renewal-manager.sh (hourly, and with --force in every `phoenix sync all`): the same,
#     plus the certificate the manager has just pushed to /tmp/cert.pem and /tmp/key.pem, then the
#     service is started, restarted (binary, unit or config changed) or reloaded (certificate only).
#
#   phoenix_hypervisor_feature_install_phoenix_mesh.sh CTID [--certificates | CA_URL]
#
# In the server guest it first brings Traefik's static configuration up to date from
# etc/traefik/traefik.yml.template (restarting Traefik only when it changed), so that Traefik's `mesh`
# entrypoint has left :8443 before the listener binds it; `phoenix sync all` pushes the same file
# again later and only `start`s Traefik, which would not apply it.
#
# Everything it installs comes from PHOENIX_DIR: share/phoenix-mesh/ (binary, units, install.sh) and
# etc/phoenix-mesh/ (rendered configs, mesh.env). Idempotent: install.sh inside the guest changes
# only what differs.

set -euo pipefail

# The renewal manager evals this command inside a `while read` loop fed by the manifest: never read
# its stdin, or the remaining entries are lost.
exec </dev/null

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
PHOENIX_BASE_DIR=$(cd -- "$SCRIPT_DIR/../.." && pwd -P)
share=$PHOENIX_BASE_DIR/share/phoenix-mesh
conf=$PHOENIX_BASE_DIR/etc/phoenix-mesh

say() { printf 'phoenix_mesh feature: %s\n' "$*"; }
die() {
    printf 'phoenix_mesh feature: ERROR: %s\n' "$*" >&2
    exit 1
}

ctid=${1:-}
with_certs=false
[[ ${2:-} == --certificates ]] && with_certs=true
[[ $ctid =~ ^[0-9]+$ ]] || die "usage: $0 CTID [--certificates]"
[[ -f $conf/mesh.env ]] || die "$conf/mesh.env is missing: run deploy/phoenix/integrate.sh $PHOENIX_BASE_DIR"
# shellcheck source=/dev/null
source "$conf/mesh.env"
if [[ $ctid == "${CLIENT_GUEST:?}" ]]; then
    side=client lxc_dir=lxc-101-nginx
elif [[ $ctid == "${SERVER_GUEST:?}" ]]; then
    side=server lxc_dir=lxc-102-traefik
else
    die "guest $ctid is neither the client ($CLIENT_GUEST) nor the server ($SERVER_GUEST) of $conf/mesh.env"
fi
for f in "$share/phoenix-mesh" "$share/install.sh" "$share/phoenix-mesh-$side.service" "$conf/$side.toml"; do
    [[ -f $f ]] || die "$f is missing: re-run deploy/phoenix/integrate.sh"
done

stage=/tmp/phoenix-mesh-deploy
say "installing the $side sidecar in LXC $ctid"
pct exec "$ctid" -- rm -rf "$stage"
pct exec "$ctid" -- mkdir -p -m 0700 "$stage/$lxc_dir"
pct push "$ctid" "$share/install.sh" "$stage/install.sh"
pct push "$ctid" "$share/phoenix-mesh" "$stage/phoenix-mesh"
pct push "$ctid" "$share/phoenix-mesh-$side.service" "$stage/$lxc_dir/phoenix-mesh-$side.service"
pct push "$ctid" "$conf/$side.toml" "$stage/$lxc_dir/phoenix-mesh-$side.toml"

if [[ $side == server ]]; then
    template=$PHOENIX_BASE_DIR/etc/traefik/traefik.yml.template
    pct push "$ctid" "$template" "$stage/traefik.yml"
    if ! pct exec "$ctid" -- cmp -s "$stage/traefik.yml" /etc/traefik/traefik.yml; then
        pct exec "$ctid" -- install -D -m 0644 "$stage/traefik.yml" /etc/traefik/traefik.yml
        say "updated /etc/traefik/traefik.yml in LXC $ctid; restarting Traefik so its mesh entrypoint leaves :$LISTEN_PORT"
        pct exec "$ctid" -- systemctl restart traefik || say "WARNING: Traefik did not restart: pct exec $ctid -- journalctl -u traefik -n 50"
    fi
fi

args=("$side" "$stage/phoenix-mesh" --replace-config)
if $with_certs; then
    args+=(--cert /tmp/cert.pem --key /tmp/key.pem)
fi
rc=0
pct exec "$ctid" -- /bin/bash "$stage/install.sh" "${args[@]}" || rc=$?
# The pushed key must not stay in the guest's /tmp, whatever happened.
if $with_certs; then
    pct exec "$ctid" -- rm -f /tmp/cert.pem /tmp/key.pem || true
fi
pct exec "$ctid" -- rm -rf "$stage" || true
[[ $rc -eq 0 ]] || die "install.sh failed in LXC $ctid (exit $rc); see its messages above"
say "LXC $ctid: $side sidecar up to date"
