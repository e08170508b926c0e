#!/bin/sh
# The template's CMD: runs the code interpreter server (port 49999) with the system python3 and
# keeps it running. If the server exits it is started again after a back-off (1 s, doubling up
# to 30 s while it keeps dying within a minute of starting; back to 1 s after a longer run).
# Everything goes to $VIVARIUM_INTERPRETER_LOG (default /tmp/vivarium-interpreter.log).
# SIGTERM/SIGINT stop the server (which shuts its kernels down) and then this loop.
DIR=$(cd "$(dirname "$0")" && pwd)
LOG=${VIVARIUM_INTERPRETER_LOG:-/tmp/vivarium-interpreter.log}
child=
stop() {
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
    exit 0
}
trap stop TERM INT
delay=1
while :; do
    started=$(date +%s)
    (cd "$DIR" && exec python3 -m vivarium_interpreter "$@") >>"$LOG" 2>&1 &
    child=$!
    wait "$child"
    status=$?
    child=
    if [ $(( $(date +%s) - started )) -ge 60 ]; then delay=1; fi
    echo "$(date -u '+%F %T') start.sh: the server exited with status $status; restarting in ${delay}s" >>"$LOG"
    sleep "$delay"
    delay=$(( delay * 2 > 30 ? 30 : delay * 2 ))
done
