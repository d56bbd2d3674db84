#!/bin/bash
# Cross-CPU wake-ups per handshake: /proc/interrupts' function-call IPIs (CAL, which the scheduler's remote
# wake-ups use) and rescheduling IPIs (RES) on each CPU, before and after one resumed-handshake cell.
#
#   RUN=/tmp/pmb benches/profile/ipis.sh 'phoenix listener' 1 OUTDIR [--no-peers]
#   RUN=/tmp/pmb benches/profile/ipis.sh 'nginx->backend' 1 OUTDIR
#
# CPU 0 is the load generator's (the server's writes wake it), CPU 1 the server's and the backend's.
# BIN (default: the harness's own build) is passed as --bin. The whole box counts, so run it quiet.
set -euo pipefail
filter=$1 clients=$2 out=$3
shift 3
secs=${SECS:-8}
here=$(cd "$(dirname "$0")/../.." && pwd)
snap() { grep -E '^ *(RES|CAL):' /proc/interrupts | awk '{print $1, $2, $3}'; }
# build first: a compile inside the window would count its own wake-ups
(cd "$here" && cargo bench --bench mesh --no-run >"$out.build.log" 2>&1)
before=$(snap)
(cd "$here" && cargo bench --bench mesh -- --only hs --hs-modes resumed --hs-clients "$clients" \
    --reps 1 --secs "$secs" --filter "$filter" ${BIN:+--bin "$BIN"} --out "$out" "$@" >"$out.log" 2>&1)
after=$(snap)
hs=$(python3 -c "
import json, sys
print(sum(json.loads(l)['hs_per_s'] * $secs for l in open(sys.argv[1]) if l.strip()))
" "$out/mesh.jsonl")
echo "$filter, $clients client(s): $hs handshakes"
paste <(echo "$before") <(echo "$after") |
    awk -v hs="$hs" '{printf "  %s cpu0 %.2f per handshake, cpu1 %.2f\n", $1, ($5-$2)/hs, ($6-$3)/hs}'
