#!/usr/bin/env bash
# One device call: build, GPU tests, kernel + decode benchmarks (+ engineer B's block benchmark),
# each step under its own timeout so one failure does not eat the call. Logs and JSON go to $OUT.
# Usage on the device: bash benchmarks/gpu_run_all.sh [quick]
# Narrow runs (env): TEST_K='lut' (pytest -k), KERN_ARGS='--schemes 2x8g8 --batches 1,4 --tag lut',
# SKIP_DECODE=1, SKIP_QB=1 (skip the decode / quantize_block steps), DEC_ARGS (default --compile --census).
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT" benchmarks/results
export PYTHONPATH=src PYTHONUNBUFFERED=1 MAX_JOBS=16 AQLMKIT_CACHE=/tmp/aqlmkit_cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
# one log file (the device returns at most 8 files): full output in $OUT/all.log, tail on stdout
step() { local t=$1 name=$2; shift 2; echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"
  timeout "$t" "$@" 2>&1 | tee -a "$OUT/all.log" | tail -n ${TAIL:-25}; echo "=== $name rc=$?" | tee -a "$OUT/all.log"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
# build ours and the official peer at once (the official one JIT-compiles on import)
( timeout 200 python3 -c "import aqlm.inference_kernels.cuda_kernel" > /tmp/official_build.log 2>&1 & )
step 200 build python3 -c "from aqlmkit.kernels import cuda; cuda.extension(); print('built')"
step ${T_TESTS:-150} tests python3 -m pytest tests/test_gpu_kernels.py -q -x -p no:cacheprovider --timeout 120 ${TEST_K:+-k "$TEST_K"}
step ${T_KERN:-240} kernels python3 benchmarks/gpu_kernels.py ${1:+--quick} ${KERN_ARGS:-}
[ -n "${SKIP_DECODE:-}" ] || step ${T_DEC:-300} decode python3 benchmarks/gpu_decode.py --steps ${DEC_STEPS:-200} ${DEC_ARGS:---compile --census}
if [ -z "${SKIP_QB:-}" ] && [ -f benchmarks/quantize_block.py ]; then step 200 quantize_block python3 benchmarks/quantize_block.py --time-budget 150; fi
tail -n 20 /tmp/official_build.log >> "$OUT/all.log"
cp benchmarks/results/*gpu_*.json benchmarks/results/*quantize_block*.json "$OUT"/ 2>/dev/null
ls -la "$OUT"
