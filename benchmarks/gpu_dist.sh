#!/usr/bin/env bash
# One device call: distributed calibration vs one process on the GPUs present (world sizes from
# WORLDS, default 1), then the pipeline and distributed tests. Results JSON and logs go to $OUT.
# Usage on the device: WORLDS=1 bash benchmarks/gpu_dist.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT" benchmarks/results; touch /tmp/gpu_dist.start
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1 AQLMKIT_CACHE=/tmp/aqlmkit_cache
# calibration does not time the inference kernels: the reference backend spares each process a JIT build
export AQLMKIT_KERNEL=${AQLMKIT_KERNEL:-reference}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
step() { local t=$1 name=$2; shift 2; echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"
  timeout "$t" "$@" 2>&1 | tee -a "$OUT/all.log" | tail -n ${TAIL:-25}; echo "=== $name rc=$?" | tee -a "$OUT/all.log"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
step ${T_A:-240} dist_2x8g8 python3 benchmarks/dist_calibration.py --worlds "${WORLDS:-1}" --schemes 2x8g8 --blocks ${BLOCKS:-4} ${DIST_ARGS:-}
step ${T_B:-240} dist_1x16g8 python3 benchmarks/dist_calibration.py --worlds "${WORLDS:-1}" --schemes 1x16g8 --blocks ${BLOCKS_16:-2} ${DIST_ARGS:-}
[ -n "${SKIP_TESTS:-}" ] || step ${T_TESTS:-100} tests python3 -m pytest tests/test_pipeline.py tests/test_distributed.py -q -p no:cacheprovider -x
find benchmarks/results -name '*.json' -newer /tmp/gpu_dist.start -exec cp {} "$OUT"/ \;
ls -la "$OUT"
