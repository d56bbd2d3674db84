#!/usr/bin/env bash
# benches/pgo/build.sh: a profile-guided (PGO) release build of phoenix-mesh.
#
# usage: RUN=DIR benches/pgo/build.sh [OUT]        (OUT default: target/pgo/phoenix-mesh)
#
# 1. builds an instrumented release binary (rustc -Cprofile-generate) in target/pgo-gen;
# 2. trains it: the bench harness (benches/mesh) drives that binary through handshakes (full and
#    resumed), keep-alive and Connection: close requests over every phoenix chain (HTTP/2 and HTTP/1.1
#    mesh link, HTTP/1.1 and h2c backend, behind nginx and not) and an idle-connection step, with other
#    client and connection counts than the measured cells use (2 handshake clients, 16 and 48
#    connections), so the profile is of the traffic, not of the benchmark's cells;
# 3. merges the profiles (llvm-profdata from rustup's llvm-tools, which matches rustc's LLVM) and
#    builds the release binary again with them (-Cprofile-use) in target/pgo-use, then copies it to OUT.
#
# It needs what the harness needs: the peers started under $RUN (PKI in $RUN/pki, the backend on
# 127.0.0.1:18080; /work/shared/peers/peers.sh start) and nginx and wrk on the PATH; everything runs on
# loopback. About 10 minutes on 2 cores (two fat-LTO builds and a ~2 minute training run). The crypto
# (aws-lc, C) is built as usual; only the Rust code is optimised with the profile.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

out=${1:-$root/target/pgo/phoenix-mesh}
run=${RUN:?set RUN to the peers run directory (RUN=... /work/shared/peers/peers.sh start)}
[ -f "$run/pki/client.crt" ] || { echo "pgo: $run/pki/client.crt missing: start the peers first (RUN=$run /work/shared/peers/peers.sh start)" >&2; exit 1; }
curl -fsS -o /dev/null "http://127.0.0.1:18080/" || { echo "pgo: no backend answers on 127.0.0.1:18080: start the peers first" >&2; exit 1; }

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || { echo "pgo: $profdata missing: rustup component add llvm-tools" >&2; exit 1; }

work="$root/target/pgo-data"
rm -rf "$work" && mkdir -p "$work/raw"

echo "== pgo: instrumented build (target/pgo-gen)"
RUSTFLAGS="-Cprofile-generate=$work/raw" CARGO_TARGET_DIR="$root/target/pgo-gen" \
    cargo build --release --locked --bin phoenix-mesh
cp "$root/target/pgo-gen/release/phoenix-mesh" "$work/phoenix-mesh-instrumented"

echo "== pgo: training run (the harness, phoenix only, $work/train)"
# The harness itself is built in the normal target directory, without the profiling flags.
cargo bench --bench mesh -- --bin "$work/phoenix-mesh-instrumented" --no-peers --reps 1 --secs 3 \
    --hs-clients 2 --conns 16,48 --idle 300 --attempts 1 --quiet-wait 1 --out "$work/train"
n=$(find "$work/raw" -name '*.profraw' | wc -l)
[ "$n" -gt 0 ] || { echo "pgo: the training run left no profiles in $work/raw" >&2; exit 1; }
"$profdata" merge -o "$work/merged.profdata" "$work"/raw/*.profraw
echo "== pgo: merged $n profiles into $work/merged.profdata"

echo "== pgo: optimised build (target/pgo-use)"
RUSTFLAGS="-Cprofile-use=$work/merged.profdata" CARGO_TARGET_DIR="$root/target/pgo-use" \
    cargo build --release --locked --bin phoenix-mesh
mkdir -p "$(dirname "$out")"
cp "$root/target/pgo-use/release/phoenix-mesh" "$out"
echo "pgo: $out"
