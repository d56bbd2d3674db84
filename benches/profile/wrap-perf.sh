#!/bin/bash
# A --bin wrapper for the harness: runs the listener (`server`) under `perf record -g`, the rest as is.
#   BIN=/tmp/pm-base OUT=/tmp/l.data cargo bench --bench mesh -- ... --bin benches/profile/wrap-perf.sh
if [ "$1" = server ]; then exec perf record -F "${FREQ:-4999}" -g -o "${OUT:?}" -- "${BIN:?}" "$@"; fi
exec "${BIN:?}" "$@"
