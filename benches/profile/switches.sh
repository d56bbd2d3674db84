#!/bin/bash
# Context switches of the server per handshake: voluntary (it slept) and involuntary (it was preempted),
# from /proc/PID/status of the server's process and its children, over the middle of one resumed cell.
#
#   RUN=/tmp/pmb benches/profile/switches.sh 'phoenix listener' 1 OUTDIR --no-peers
#   RUN=/tmp/pmb PIDFILE=/tmp/pmb/nginx-mtls.pid benches/profile/switches.sh 'nginx->backend' 1 OUTDIR
#
# Without PIDFILE the server is the phoenix listener the harness starts (its copy in OUTDIR). The cell
# runs SECS (default 12) seconds; counting starts 6 s after launch (build checked first, processes up)
# and lasts WINDOW (default 4) seconds. BIN (default: the harness's own build) is passed as --bin.
set -euo pipefail
filter=$1 clients=$2 out=$3
shift 3
secs=${SECS:-12} window=${WINDOW:-4}
here=$(cd "$(dirname "$0")/../.." && pwd)
(cd "$here" && cargo bench --bench mesh --no-run >"$out.build.log" 2>&1)
(cd "$here" && cargo bench --bench mesh -- --only hs --hs-modes resumed --hs-clients "$clients" \
    --reps 1 --secs "$secs" --quiet-wait 0 --filter "$filter" ${BIN:+--bin "$BIN"} --out "$out" "$@" \
    >"$out.log" 2>&1) &
harness=$!
sleep 6
if [ -n "${PIDFILE:-}" ]; then
    root=$(cat "$PIDFILE")
else
    root=$(pgrep -f "^$out/phoenix-mesh server" | head -1 || true)
fi
if [ -z "$root" ] || [ ! -r "/proc/$root/status" ]; then
    echo "switches.sh: no server process to count (PIDFILE=${PIDFILE:-unset}; without it, a listener" \
        "started from $out/phoenix-mesh: BIN must be a binary, not a wrapper script); see $out.log" >&2
    wait "$harness" || true   # let the cell end, so that nothing it started is left behind
    exit 1
fi
pids="$root $(pgrep -P "$root" | tr "\n" " " || true)"
count() {
    local v=0 n=0 p
    for p in $pids; do
        v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "/proc/$p/status")))
        n=$((n + $(awk '/^nonvoluntary_ctxt/ {print $2}' "/proc/$p/status")))
    done
    echo "$v $n"
}
read -r v0 n0 < <(count)
sleep "$window"
read -r v1 n1 < <(count)
wait "$harness"
python3 - "$out/mesh.jsonl" "$((v1 - v0))" "$((n1 - n0))" "$window" "$filter" "$clients" <<'PY'
import json, sys
path, vol, nonvol, window, name, clients = sys.argv[1:]
rate = [json.loads(l)["hs_per_s"] for l in open(path) if l.strip()][0]
hs = rate * float(window)
print(f"{name}, {clients} client(s): {rate:.0f} handshakes/s; per handshake "
      f"{int(vol) / hs:.2f} voluntary + {int(nonvol) / hs:.2f} involuntary = {(int(vol) + int(nonvol)) / hs:.2f} switches")
PY
