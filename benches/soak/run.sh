#!/usr/bin/env bash
# The listener's memory under a long soak (benches/soak/README.md): three arms side by side, identical
# except the listener's allocator settings (A: glibc defaults, B: MALLOC_ARENA_MAX=2, C: fixed
# 128 KiB trim and mmap thresholds), each with its own nginx backend, listener, client sidecar and wrk.
#
#   benches/soak/run.sh [soak.py options]        # defaults: 65 min, CSVs in $RUN (/tmp/phoenix-mesh-soak)
#
# Builds the profiling profile (release + line tables) unless BIN is set, and runs everything under
# `nice -n 10`: the load is deliberately moderate, the numbers that matter are memory per request.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
for t in nginx wrk openssl python3; do
    command -v "$t" >/dev/null || { echo "$t not found on PATH (apt-get install -y nginx wrk openssl python3)" >&2; exit 1; }
done
if [[ -z "${BIN:-}" ]]; then
    (cd "$root" && cargo build --profile profiling --locked --bin phoenix-mesh)
    BIN="${CARGO_TARGET_DIR:-$root/target}/profiling/phoenix-mesh"
fi
RUN=${RUN:-/tmp/phoenix-mesh-soak}
ulimit -n "$(ulimit -Hn)"
exec nice -n 10 python3 "$here/soak.py" --bin "$BIN" --run "$RUN" "$@"
