#!/usr/bin/env bash
# quietly.sh LOG LABEL CMD [ARGS...]: run CMD with all its output in LOG; print one
# heartbeat line a minute (HEARTBEAT_S seconds) naming LOG, and at the end how long it
# took. On failure, the last 20 lines of LOG and CMD's exit status.
set -uo pipefail
log=$1 label=$2
shift 2
every=${HEARTBEAT_S:-60}
mkdir -p "$(dirname "$log")"
start=$SECONDS last=$SECONDS
"$@" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null' EXIT
while kill -0 "$pid" 2>/dev/null; do
  sleep 1
  if (( SECONDS - last >= every )) && kill -0 "$pid" 2>/dev/null; then
    last=$SECONDS
    echo "$label: still running, $(( SECONDS - start )) s so far (log: $log)" >&2
  fi
done
wait "$pid"
rc=$?
trap - EXIT
took=$(( SECONDS - start ))
if (( rc != 0 )); then
  echo "$label: failed (exit $rc) after $took s; the end of $log:" >&2
  tail -n 20 "$log" >&2
  exit "$rc"
fi
echo "$label: done in $(( took / 60 )) min $(( took % 60 )) s (log: $log)" >&2
