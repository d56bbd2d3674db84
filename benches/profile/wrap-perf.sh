#!/bin/bash
# A --bin wrapper for the harness: runs each listener (`server`) under `perf record -g`, the rest as is.
#   BIN=/tmp/pm-base OUT=/tmp/l.data cargo bench --bench mesh -- ... --bin benches/profile/wrap-perf.sh
# The harness starts two listeners (the second with backend_http2); each gets its own file, named after
# its config: OUT=/tmp/l.data gives /tmp/l.listener-18543.data (the default one) and /tmp/l.listener-18545.data.
if [ "$1" = server ]; then
    config=
    for arg in "$@"; do
        [ "$prev" = --config ] && config=$(basename "$arg" .toml)
        prev=$arg
    done
    exec perf record -F "${FREQ:-4999}" -g -o "${OUT%.data}.${config:-server}.data" -- "${BIN:?}" "$@"
fi
exec "${BIN:?}" "$@"
