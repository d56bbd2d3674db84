#!/usr/bin/env bash
# benches/ab/ab.sh: two phoenix-mesh binaries in interleaved rounds, each round one harness run of each
# (`--reps 1`), so that both see the same state of a noisy box; nginx and HAProxy cells, if the filter
# keeps them, are measured in every run and serve as each run's yard-stick.
#
# usage: RUN=DIR benches/ab/ab.sh OUTDIR ROUNDS BIN_A BIN_B [harness options without --reps/--bin/--out]
# then:  python3 benches/ab/ab.py OUTDIR
# Results: OUTDIR/{a,b}-ROUND/mesh.jsonl (and tables.md), OUTDIR/{a,b}-ROUND.log.
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,8p "$0" >&2; exit 2; }
out=$1 rounds=$2 a=$3 b=$4
shift 4
: "${RUN:?set RUN to the run directory (PKI, peers, results)}"
cd "$(dirname "$0")/../.."
mkdir -p "$out"
# Build the harness (and the bench's own phoenix-mesh) once, before any timed cell.
if ! cargo bench --bench mesh --no-run >"$out/build.log" 2>&1; then
  echo "ab: building the harness failed; see $out/build.log" >&2
  exit 1
fi
for bin in "$a" "$b"; do
  [ -x "$bin" ] || { echo "ab: $bin is not an executable phoenix-mesh binary" >&2; exit 1; }
done
for r in $(seq 1 "$rounds"); do
  for v in a b; do
    bin=$a; [ "$v" = b ] && bin=$b
    echo "round $r variant $v: $bin"
    if ! cargo bench --bench mesh -- "$@" --reps 1 --bin "$bin" --out "$out/$v-$r" >"$out/$v-$r.log" 2>&1; then
      echo "ab: round $r, variant $v ($bin) failed; see $out/$v-$r.log" >&2
      exit 1
    fi
  done
done
