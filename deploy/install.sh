#!/usr/bin/env bash
# Install phoenix-mesh inside a Proxmox LXC: binary, config, systemd unit, and optionally a freshly
# issued certificate.
#
#   install.sh client [path-to-binary] [options]    # LXC 101, beside nginx
#   install.sh server [path-to-binary] [options]    # LXC 102, beside Traefik
#
# options:
#   --replace-config     install the config shipped beside this script even over an existing
#                        /etc/phoenix-mesh/<side>.toml (keeping the previous one as <side>.toml.prev);
#                        what the Phoenix integration does, where the config's source of truth is
#                        PHOENIX_DIR/etc/phoenix-mesh/ (deploy/phoenix/). Without it an existing config
#                        is never overwritten.
#   --cert FILE --key FILE
#                        install this certificate chain and key where the config's `cert` and `key`
#                        point (root:phoenix-mesh 0640, each replaced by a rename), and reload the
#                        running service; what the certificate manifest's post_renewal_command does
#                        through deploy/phoenix/phoenix-mesh-feature.sh.
#
# Run as root inside the container, from a directory laid out like the repository's deploy/ (the
# script finds its files next to itself). Safe to run again: it only changes what differs, keeps the
# previous binary as /usr/local/bin/phoenix-mesh.prev for roll-back, restarts the service only when
# the binary, the unit or the config changed, reloads it when only the certificate did, and leaves
# it stopped (enabled) while its certificate does not exist yet.
#
# The binary to give is what `cargo build --release` builds, target/release/phoenix-mesh: the release
# profile leaves out debug info, so it is installed as built, with nothing to strip (a binary with
# line tables for perf is `cargo build --profile profiling`'s, and is not one to install).
#
# Without a binary argument the installed /usr/local/bin/phoenix-mesh is kept (re-run after
# editing only the unit or to repair permissions).
#
# DESTDIR=/some/dir install.sh ...   lays the files out under that staging root and nothing else:
# no useradd, no chown, no --check, no systemctl (for CI and for packaging).
#
# Environment: DESTDIR (staging root, default none), FORCE=1 (enable and start even if --check
# reports a config or certificate error).

set -euo pipefail

readonly SERVICE_USER=phoenix-mesh
readonly SERVICE_GROUP=phoenix-mesh

usage() {
    echo "usage: $0 client|server [path-to-phoenix-mesh-binary] [--replace-config] [--cert FILE --key FILE]" >&2
    echo "       DESTDIR=/staging/root $0 client|server [binary]   (lay out files only)" >&2
    exit 2
}

say() { printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $# -ge 1 ]] || usage
side=$1
shift
binary_src=""
replace_config=false
new_cert=""
new_key=""
while [[ $# -gt 0 ]]; do
    case $1 in
    --replace-config) replace_config=true ;;
    --cert) new_cert=${2:-} && shift ;;
    --key) new_key=${2:-} && shift ;;
    -*) usage ;;
    *)
        [[ -z $binary_src ]] || usage
        binary_src=$1
        ;;
    esac
    shift
done
if [[ -n $new_cert || -n $new_key ]]; then
    [[ -n $new_cert && -n $new_key ]] || die "--cert and --key go together"
fi
case $side in
client) lxc_dir=lxc-101-nginx ;;
server) lxc_dir=lxc-102-traefik ;;
*) usage ;;
esac

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
destdir=${DESTDIR:-}
destdir=${destdir%/}
staging=false
[[ -n $destdir ]] && staging=true

unit_name=phoenix-mesh-$side.service
config_src=$script_dir/$lxc_dir/phoenix-mesh-$side.toml
unit_src=$script_dir/$lxc_dir/$unit_name

bin_path=/usr/local/bin/phoenix-mesh
config_dir=/etc/phoenix-mesh
config_path=$config_dir/$side.toml
unit_path=/etc/systemd/system/$unit_name
dropin_dir=/etc/systemd/system/$unit_name.d
dropin_path=$dropin_dir/10-phoenix-mesh-no-notify.conf
doc_dir=/usr/local/share/doc/phoenix-mesh

[[ -f $config_src ]] || die "missing $config_src: run this script from a copy of the repository's deploy/ directory"
[[ -f $unit_src ]] || die "missing $unit_src"
if [[ -n $binary_src ]]; then
    [[ -f $binary_src ]] || die "binary $binary_src does not exist"
fi
if [[ -n $new_cert ]]; then
    [[ -f $new_cert ]] || die "certificate $new_cert does not exist"
    [[ -f $new_key ]] || die "key $new_key does not exist"
fi
if ! $staging && [[ $(id -u) -ne 0 ]]; then
    die "run as root inside the container (or set DESTDIR=... to stage files only)"
fi

changed_runtime=false # binary, unit or config changed: a running service needs a restart
changed_certs=false   # only the certificate changed: a reload is enough

# install_file MODE SRC DEST: copy SRC to DEST atomically (temp name in the same directory, then
# rename), only if the content or mode differs. Returns 1 when DEST was already right. Always
# called in a condition, where set -e is off, hence the explicit `|| die`s.
install_file() {
    local mode=$1 src=$2 dest=$3 tmp
    if [[ -f $dest ]] && cmp -s -- "$src" "$dest" && [[ $(stat -c %a -- "$dest") == "${mode#0}" ]]; then
        return 1
    fi
    mkdir -p -- "$(dirname -- "$dest")" || die "creating the directory for $dest"
    tmp=$(dirname -- "$dest")/.$(basename -- "$dest").new.$$
    install -m "$mode" -- "$src" "$tmp" || die "copying $src to $tmp"
    mv -f -- "$tmp" "$dest" || die "renaming $tmp to $dest"
    return 0
}

# make_dir MODE GROUP DIR: create DIR with MODE, owned root:GROUP (ownership skipped when staging).
make_dir() {
    local mode=$1 group=$2 dir=$3
    mkdir -p -- "$dir"
    chmod "$mode" -- "$dir"
    $staging || chown "root:$group" -- "$dir"
}

# --- 1. service user ---------------------------------------------------------------------------
# A static system user, not DynamicUser: the certificate manifest's post_renewal_command does
# `install -g phoenix-mesh` on the key files, and that group has to exist while the service is
# stopped too (a DynamicUser's group only exists while the unit runs).
if $staging; then
    say "DESTDIR=$destdir: staging files only (no useradd, chown, --check or systemctl)"
else
    if ! getent group "$SERVICE_GROUP" >/dev/null; then
        groupadd --system "$SERVICE_GROUP"
        say "created system group $SERVICE_GROUP"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --gid "$SERVICE_GROUP" --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "phoenix-mesh sidecar" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
fi

# --- 2. directories ----------------------------------------------------------------------------
make_dir 0750 "$SERVICE_GROUP" "$destdir$config_dir"
# The sidecar's own certificate and key (installed by --cert/--key, i.e. by the certificate
# manifest's post_renewal_command). Inside the container, not on a bind mount: files the host
# writes into a bind-mounted directory belong to an unmapped uid in an unprivileged container.
make_dir 0750 "$SERVICE_GROUP" "$destdir$config_dir/ssl"

# --- 3. binary ---------------------------------------------------------------------------------
if [[ -n $binary_src ]]; then
    dest=$destdir$bin_path
    if [[ -f $dest ]] && cmp -s -- "$binary_src" "$dest"; then
        say "$bin_path unchanged"
    else
        mkdir -p -- "$(dirname -- "$dest")"
        # Copy the new build in first: for a roll-back the source *is* phoenix-mesh.prev, which
        # the next step overwrites with the version being replaced (so a roll-back can be undone).
        tmp=$dest.new.$$
        install -m 0755 -- "$binary_src" "$tmp"
        if [[ -f $dest ]]; then
            cp -p -- "$dest" "$dest.prev"
            say "kept the previous binary as $bin_path.prev"
        fi
        mv -f -- "$tmp" "$dest"
        changed_runtime=true
        say "installed $bin_path"
    fi
elif [[ ! -x $destdir$bin_path ]]; then
    die "no binary given and $bin_path is not installed: $0 $side path/to/phoenix-mesh"
fi
binary=$destdir$bin_path

# --- 4. config: never overwrite an operator's file ---------------------------------------------
dest=$destdir$config_path
if [[ -e $dest ]] && $replace_config && ! cmp -s -- "$config_src" "$dest"; then
    cp -p -- "$dest" "$dest.prev"
    install -m 0640 -- "$config_src" "$dest.new.$$"
    mv -f -- "$dest.new.$$" "$dest"
    changed_runtime=true
    say "replaced $config_path (the previous one is $config_path.prev)"
elif [[ -e $dest ]]; then
    if cmp -s -- "$config_src" "$dest"; then
        say "$config_path already matches the shipped config"
    else
        say "$config_path exists and is kept; compare with the shipped example:"
        say "  diff -u $config_path $config_path.example"
    fi
else
    install -m 0640 -- "$config_src" "$dest"
    say "installed $config_path (from $lxc_dir/phoenix-mesh-$side.toml)"
fi
$staging || chown "root:$SERVICE_GROUP" -- "$dest"
chmod 0640 -- "$dest"
# Always refresh the example beside it, so the diff hint above has something to compare with.
install_file 0644 "$config_src" "$dest.example" || true

# --- 5. certificate files: readable by the service group, by no one else ----------------------
# nginx no longer reads the client key itself (the sidecar does the mTLS), and nginx's master
# process loads files as root anyway, so root:phoenix-mesh 0640 costs nginx nothing.
toml_string() { # toml_string KEY FILE -> the value of `KEY = "..."`, empty if absent
    { grep -m 1 -E "^[[:space:]]*$1[[:space:]]*=" -- "$2" || true; } |
        sed -n -E 's/^[^=]*=[[:space:]]*"([^"]*)".*/\1/p'
}
cert_file=$(toml_string cert "$dest")
key_file=$(toml_string key "$dest")
ca_file=$(toml_string ca "$dest")
# A new certificate: key first, then certificate, each to a temporary name beside the live file and
# renamed over it, so the sidecar never reads a half-written file (its poller may see the new key
# with the old certificate for a moment: one failed reload, then the pair loads).
if [[ -n $new_cert ]]; then
    [[ $cert_file == /* && $key_file == /* ]] || die "$config_path has no absolute cert/key paths to install the certificate to"
    for pair in "$new_key:$key_file" "$new_cert:$cert_file"; do
        src=${pair%%:*}
        live=$destdir${pair#*:}
        if [[ -f $live ]] && cmp -s -- "$src" "$live"; then
            continue
        fi
        mkdir -p -- "$(dirname -- "$live")"
        tmp=$(dirname -- "$live")/.$(basename -- "$live").new.$$
        install -m 0640 -- "$src" "$tmp"
        $staging || chown "root:$SERVICE_GROUP" -- "$tmp"
        mv -f -- "$tmp" "$live"
        changed_certs=true
    done
    if $changed_certs; then say "installed the certificate as $cert_file and $key_file"; else say "certificate unchanged"; fi
fi
for f in "$cert_file" "$key_file"; do
    [[ -n $f && $f == /* ]] || continue
    if [[ -f $destdir$f ]]; then
        if ! $staging; then
            chown "root:$SERVICE_GROUP" -- "$f"
            chmod 0640 -- "$f"
        fi
    else
        warn "$f does not exist yet: the service will refuse to start (exit 78) until the certificate manifest has issued it"
    fi
done
if [[ -n $ca_file && ! -f $destdir$ca_file ]]; then
    warn "CA file $ca_file does not exist yet"
fi
if ! $staging; then
    for f in "$cert_file" "$key_file" "$ca_file"; do
        [[ -n $f && -e $f ]] || continue
        if ! runuser -u "$SERVICE_USER" -- test -r "$f"; then
            warn "$SERVICE_USER cannot read $f: check the directories above it are searchable (o+x, or group $SERVICE_GROUP)"
        fi
    done
fi

# --- 6. systemd unit ---------------------------------------------------------------------------
if install_file 0644 "$unit_src" "$destdir$unit_path"; then
    changed_runtime=true
    say "installed $unit_path"
else
    say "$unit_path unchanged"
fi
# The unit is Type=notify. A build without sd_notify support would never report READY and be
# killed after TimeoutStartSec, so for such a build add a drop-in that makes it Type=exec, and
# remove the drop-in again once the binary sends READY=1.
if grep -q NOTIFY_SOCKET -- "$binary"; then
    if [[ -e $destdir$dropin_path ]]; then
        rm -f -- "$destdir$dropin_path"
        rmdir --ignore-fail-on-non-empty -- "$destdir$dropin_dir"
        changed_runtime=true
        say "binary supports sd_notify: removed the Type=exec drop-in"
    fi
else
    tmp_dropin=$(mktemp)
    printf '%s\n' \
        "# Written by deploy/install.sh: this phoenix-mesh build does not send sd_notify READY=1." \
        "# Removed automatically when a build that does is installed." \
        "[Service]" "Type=exec" >"$tmp_dropin"
    if install_file 0644 "$tmp_dropin" "$destdir$dropin_path"; then
        changed_runtime=true
        warn "this binary does not support sd_notify yet: installed $dropin_path (Type=exec)"
    fi
    rm -f -- "$tmp_dropin"
fi

# Reference copies for the operator: the runbook and this side's snippets.
if [[ -f $script_dir/README.md ]]; then
    install_file 0644 "$script_dir/README.md" "$destdir$doc_dir/README.md" || true
fi
for f in "$script_dir/$lxc_dir"/*; do
    case $f in
    *.toml | *.service) continue ;;
    *) ;;
    esac
    install_file 0644 "$f" "$destdir$doc_dir/$lxc_dir/$(basename -- "$f")" || true
done

if $staging; then
    say "staged under $destdir; skipped --check and systemctl"
    exit 0
fi

# --- 7. validate with the binary ---------------------------------------------------------------
# Until the certificate manifest has installed the certificate there is nothing to start: the unit is
# enabled and stays stopped; the manifest's post_renewal_command runs this script again with --cert.
certs_present=true
for f in "$cert_file" "$key_file"; do
    [[ -n $f && -f $f ]] || certs_present=false
done
if ! $certs_present; then
    systemctl daemon-reload
    systemctl enable "$unit_name" >/dev/null
    say "$unit_name enabled, not started: its certificate is not installed yet (the certificate manifest installs it and starts the service)"
    exit 0
fi
# --check validates config and certificates and then probes the hops live. A failing live probe
# is expected when the other LXC is not deployed yet, so only exit 78 (config or certificate
# error: the service could not start anyway) stops the installation.
# (Captured rather than piped into grep -q: under pipefail an early-exiting grep fails the pipe.)
side_help=$("$binary" "$side" --help 2>/dev/null || true)
if [[ $side_help == *--check* ]]; then
    say "running: $bin_path $side --config $config_path --check"
    set +e
    runuser -u "$SERVICE_USER" -- "$binary" "$side" --config "$config_path" --check
    rc=$?
    set -e
    if [[ $rc -eq 0 ]]; then
        say "--check passed"
    elif [[ $rc -eq 78 && ${FORCE:-0} != 1 ]]; then
        die "--check found a config or certificate error (exit 78); fix it and re-run (FORCE=1 to enable anyway)"
    else
        warn "--check exited $rc (a live hop failed?); enabling anyway: re-run --check once both LXCs are up"
    fi
else
    warn "this phoenix-mesh build has no --check yet: the config is validated only when the service starts (see: journalctl -u $unit_name)"
fi

# --- 8. enable and (re)start -------------------------------------------------------------------
systemctl daemon-reload
systemctl enable "$unit_name" >/dev/null
if systemctl is-active --quiet "$unit_name"; then
    if $changed_runtime; then
        say "restarting $unit_name (drains requests in flight for up to drain_timeout)"
        systemctl restart "$unit_name"
    elif $changed_certs; then
        say "reloading $unit_name (new certificate)"
        systemctl reload "$unit_name"
    else
        say "$unit_name running and unchanged; for config changes: systemctl reload $unit_name"
    fi
else
    systemctl start "$unit_name" || die "$unit_name failed to start: journalctl -u $unit_name -n 50"
fi
systemctl --no-pager --lines=5 status "$unit_name" || true
say "done. Verify: $bin_path $side --config $config_path --check"
