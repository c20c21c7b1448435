#!/usr/bin/env bash
# One device call: build, GPU tests, kernel + fusion + decode benchmarks, each step under its own
# timeout so one failure does not eat the call. Logs and JSON go to $OUT.
# Usage on the device: bash benchmarks/gpu_run_all.sh [quick]
# Narrow runs (env): TEST_K='lut' (pytest -k), TESTS (test files), KERN_ARGS='--schemes 2x8g8
# --batches 1,4 --tag lut', FUSED_ARGS (gpu_fused.py), SKIP_KERN=1, SKIP_FUSED=1, SKIP_DECODE=1,
# SKIP_QB=1 (skip those steps), DEC_ARGS (default --compile --census), DEC_STEPS, SERVE_ARGS.
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT" benchmarks/results; touch /tmp/gpu_run_all.start
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1 MAX_JOBS=16 AQLMKIT_CACHE=/tmp/aqlmkit_cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:benchmarks:/tmp/site
fi
# one log file (the device returns at most 8 files): full output in $OUT/all.log, tail on stdout
step() { local t=$1 name=$2; shift 2; echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"
  timeout "$t" "$@" 2>&1 | tee -a "$OUT/all.log" | tail -n ${TAIL:-25}; echo "=== $name rc=$?" | tee -a "$OUT/all.log"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then  # the official peer JIT-compiles on import: build it alongside
  ( timeout 200 python3 -c "import aqlm.inference_kernels.cuda_kernel" > /tmp/official_build.log 2>&1 & )
fi
step ${T_BUILD:-240} build python3 -c "from aqlmkit.kernels import cuda; cuda.extension(); print('built for', cuda.cuda_flags())"
step ${T_TESTS:-200} tests python3 -m pytest ${TESTS:-tests/test_gpu_kernels.py tests/test_gpu_fused.py} -q -p no:cacheprovider --timeout 150 ${TEST_K:+-k "$TEST_K"}
[ -n "${SKIP_FUSED:-}" ] || step ${T_FUSED:-150} fused python3 benchmarks/gpu_fused.py ${FUSED_ARGS:-}
[ -n "${SKIP_KERN:-}" ] || step ${T_KERN:-240} kernels python3 benchmarks/gpu_kernels.py ${1:+--quick} ${KERN_ARGS:-}
[ -n "${SKIP_DECODE:-}" ] || step ${T_DEC:-300} decode python3 benchmarks/gpu_decode.py --steps ${DEC_STEPS:-200} ${DEC_ARGS:---compile --census}
# SERVE_ARGS: one serve_throughput.py run per ';'-separated argument list (needs the server wheels in .whl)
IFS=';' read -ra SERVES <<< "${SERVE_ARGS:-}"
for a in "${SERVES[@]}"; do step ${T_SERVE:-300} serve python3 benchmarks/serve_throughput.py $a; done
if [ -z "${SKIP_QB:-}" ] && [ -f benchmarks/quantize_block.py ]; then step 200 quantize_block python3 benchmarks/quantize_block.py --time-budget 150; fi
[ -f /tmp/official_build.log ] && tail -n 20 /tmp/official_build.log >> "$OUT/all.log"
find benchmarks/results -name '*.json' -newer /tmp/gpu_run_all.start -exec cp {} "$OUT"/ \;  # this run's results only
ls -la "$OUT"
