#!/usr/bin/env bash
# benches/pgo/build.sh: a profile-guided (PGO) release build of phoenix-mesh.
#
# usage: benches/pgo/build.sh [OUT]        (OUT default: target/pgo/phoenix-mesh)
#
# 1. builds an instrumented release binary (rustc -Cprofile-generate) in target/pgo-gen;
# 2. trains it: `phoenix-mesh demo` (the instrumented binary) provides a throwaway PKI and a backend,
#    and the bench harness (benches/mesh) drives the instrumented sidecars through handshakes (full and
#    resumed), keep-alive and Connection: close requests over every phoenix chain (HTTP/2 and HTTP/1.1
#    mesh link, HTTP/1.1 and h2c backend, behind nginx and not) and an idle-connection step, with another
#    PKI, backend and client and connection counts (2 handshake clients, 16 and 48 connections) than
#    the cells BENCHMARKS.md quotes, so the profile is of the traffic, not of the benchmark's cells;
# 3. merges the profiles (llvm-profdata from rustup's llvm-tools, which matches rustc's LLVM) and
#    builds the release binary again with them (-Cprofile-use) in target/pgo-use, then copies it to OUT.
#
# Needs: `rustup component add llvm-tools`, nginx and wrk on the PATH (apt-get install -y nginx wrk;
# the harness starts its own nginx on loopback ports), 2 CPUs (the harness pins the sidecars to CPU 1
# and its load to CPU 0). No HAProxy: the training runs with --no-peers. Everything runs on loopback. About 10
# minutes on 2 cores (10-12; two fat-LTO builds, the harness's own build and a ~2 minute training run). The
# crypto (aws-lc, C) is built as usual; only the Rust code is optimised with the profile.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

out=${1:-$root/target/pgo/phoenix-mesh}
export PATH="$PATH:/usr/sbin"
for tool in nginx wrk; do
    command -v "$tool" >/dev/null || { echo "pgo: $tool not found: apt-get install -y nginx wrk" >&2; exit 1; }
done

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || { echo "pgo: $profdata missing: rustup component add llvm-tools" >&2; exit 1; }

work="$root/target/pgo-data"
rm -rf "$work" && mkdir -p "$work/raw"

# `--target $host`: with an explicit target, RUSTFLAGS reach only the binary's own crates, not build
# scripts and proc macros (which would otherwise be instrumented and leave profiles of the build).
echo "== pgo: instrumented build (target/pgo-gen)"
RUSTFLAGS="-Cprofile-generate=$work/raw" CARGO_TARGET_DIR="$root/target/pgo-gen" \
    cargo build --release --locked --bin phoenix-mesh --target "$host"
cp "$root/target/pgo-gen/$host/release/phoenix-mesh" "$work/phoenix-mesh-instrumented"

echo "== pgo: training run (the demo's PKI and backend, the harness, $work/train)"
# The harness itself is built in the normal target directory, without the profiling flags.
cargo bench --bench mesh --no-run
run="$work/run"
mkdir -p "$run"
RUST_LOG=warn "$work/phoenix-mesh-instrumented" demo >"$run/demo.out" 2>"$run/demo.log" &
demo=$!
# The demo's processes write their profiles when they exit; stop it however this script ends.
trap 'kill -INT "$demo" 2>/dev/null; wait "$demo" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    grep -q 'client sidecar' "$run/demo.out" 2>/dev/null && break
    kill -0 "$demo" 2>/dev/null || { echo "pgo: the demo exited; see $run/demo.log" >&2; exit 1; }
    sleep 0.1
done
pki=$(sed -n 's/.*throwaway PKI in \([^)]*\)).*/\1/p' "$run/demo.out")
backend=$(sed -n 's|.*backend (stands in for Traefik) *http://\([0-9.:]*\).*|\1|p' "$run/demo.out")
if [ -z "$pki" ] || [ -z "$backend" ]; then
    echo "pgo: no PKI or backend in the demo's output ($run/demo.out)" >&2
    exit 1
fi
echo "$demo" >"$run/backend.pid"
cargo bench --bench mesh -- --bin "$work/phoenix-mesh-instrumented" --no-peers --run "$run" \
    --cert "$pki/nginx-client.crt" --key "$pki/nginx-client.key" --ca "$pki/root_ca.crt" \
    --server-cert "$pki/listener.crt" --server-key "$pki/listener.key" \
    --server-name mesh.internal.thinkheads.ai --backend "$backend" \
    --reps 1 --secs 3 --hs-clients 2 --conns 16,48 --idle 300 --attempts 1 --quiet-wait 1 --out "$work/train"
kill -INT "$demo"
wait "$demo" || true
trap - EXIT
n=$(find "$work/raw" -name '*.profraw' | wc -l)
[ "$n" -gt 0 ] || { echo "pgo: the training run left no profiles in $work/raw" >&2; exit 1; }
"$profdata" merge -o "$work/merged.profdata" "$work"/raw/*.profraw
echo "== pgo: merged $n profiles into $work/merged.profdata"

echo "== pgo: optimised build (target/pgo-use)"
RUSTFLAGS="-Cprofile-use=$work/merged.profdata" CARGO_TARGET_DIR="$root/target/pgo-use" \
    cargo build --release --locked --bin phoenix-mesh --target "$host"
mkdir -p "$(dirname "$out")"
cp "$root/target/pgo-use/$host/release/phoenix-mesh" "$out"
echo "pgo: $out"
