#!/usr/bin/env bash
# Run a long device job across several device calls (a call lasts at most 10 minutes and the
# machine stays warm only ~30 s between calls).
#   first call:  bash benchmarks/device_detached.sh start CMD [ARGS...]   (CMD runs in a copy of the repo)
#   next calls:  bash benchmarks/device_detached.sh wait
# CMD runs detached (setsid) with OUT=/tmp/dres; each call waits up to WAIT_S seconds (default 540),
# prints the log's tail and copies /tmp/dres/* (at most the 8 newest files) to the call's $OUT.
set -uo pipefail
RES=/tmp/dres
case "${1:-}" in
start)
  shift
  rm -rf /tmp/drepo && cp -r "$PWD" /tmp/drepo && mkdir -p $RES && rm -f $RES/.done
  ( cd /tmp/drepo && OUT=$RES setsid nohup bash -c '"$@"; echo "exit $?" > '$RES'/.done' _ "$@" \
      > $RES/job.log 2>&1 < /dev/null & )
  sleep 2 ;;
wait) ;;
*) echo "usage: $0 start CMD... | wait"; exit 2 ;;
esac
end=$(( $(date +%s) + ${WAIT_S:-540} ))
while [ ! -f $RES/.done ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
tr '\r' '\n' < $RES/job.log | grep -v "it/s\]\|s/it\]" | tail -n ${TAIL:-60}
cp $RES/job.log "$OUT/job.log" 2>/dev/null
ls -t $RES | grep -v '^job.log$' | head -n 7 | while read -r f; do cp "$RES/$f" "$OUT/" 2>/dev/null; done
[ -f $RES/.done ] && echo "FINISHED $(cat $RES/.done)" || echo "STILL RUNNING"
