#!/usr/bin/env bash
# Quality benchmark on the GPU with the embedded model, staged by ../shared/device/stage_embedded_model.sh.
#   call 1 (carry .gguf1):            bash benchmarks/gpu_quality.sh part1
#   call 2 (carry .gguf2 .wheels):    bash benchmarks/gpu_quality.sh start [benchmark args...]
#   later calls (no carry):           bash benchmarks/gpu_quality.sh wait
# The job runs detached (setsid) between calls; each call waits up to ~9 minutes and copies the
# results written so far to $OUT.
set -uo pipefail
case "${1:-}" in
part1)
  mkdir -p /tmp/m && cp .gguf1/part /tmp/m/p1 && nvidia-smi --query-gpu=name,memory.used --format=csv ;;
start)
  shift
  cat /tmp/m/p1 .gguf2/part > /tmp/m/smollm2.gguf && sha256sum -c .wheels/gguf.sha256 || exit 1
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl && cp -r .wheels/bible /tmp/site/
  cp -r "$PWD" /tmp/repo
  cd /tmp/repo && mkdir -p /tmp/qres
  PYTHONPATH=/tmp/repo/src:/tmp/site AQLMKIT_CACHE=/tmp/aqlmkit_cache PYTHONUNBUFFERED=1 \
    setsid nohup python3 benchmarks/quality_smollm2.py --model /tmp/m/smollm2.gguf --device cuda \
    --out /tmp/qres "$@" > /tmp/qres/log.txt 2>&1 < /dev/null &
  sleep 5 ;;
wait) ;;
*) echo "usage: $0 part1|start|wait"; exit 2 ;;
esac
if [ "${1:-}" != part1 ]; then
  for _ in $(seq 1 54); do
    grep -q "^wrote " /tmp/qres/log.txt 2>/dev/null && break
    pgrep -f quality_smollm2.py > /dev/null || break
    sleep 10
  done
  grep -v "it/s\]\|win/s\]\|s/it\]" /tmp/qres/log.txt | tail -n 40
  cp /tmp/qres/*.json /tmp/qres/*.png "$OUT"/ 2>/dev/null
  tr '\r' '\n' < /tmp/qres/log.txt | tail -c 2000000 > "$OUT/log.txt"
  pgrep -f quality_smollm2.py > /dev/null && echo "STILL RUNNING" || echo "FINISHED"
fi
