#!/usr/bin/env bash
# Nsight Compute counters for the specialised kernels on one big layer (device only; see
# /work/.library/device/METHOD.md: clocks left alone). Usage: bash benchmarks/gpu_ncu.sh [OUT_DIR]
# Each line of CONFIGS: scheme shape batch path.
OUT=${1:-${OUT:-/tmp/ncu_out}}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 AQLMKIT_CACHE=/tmp/aqlmkit_cache
CONFIGS=${CONFIGS:-"2x8g8 28672x8192 1 mma
1x8g8 28672x8192 1 mma
2x8g8 28672x8192 1 lut
1x8g8 28672x8192 1 lut"}
METRICS=l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,gpu__time_duration.sum,sm__cycles_elapsed.avg
python3 -c "from aqlmkit.kernels import cuda; cuda.extension()" || exit 1
echo "$CONFIGS" | while read -r scheme shape batch path; do
  [ -n "$scheme" ] || continue
  echo "=== $scheme $shape b$batch $path" | tee -a "$OUT/ncu.log"
  timeout 120 ncu --clock-control none -k regex:"mma_kernel|lut_kernel|gemv_kernel" -s 1 -c 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --metrics "$METRICS" python3 benchmarks/gpu_profile.py --scheme "$scheme" --shape "$shape" \
    --batch "$batch" --path "$path" 2>&1 | grep -v "^==PROF==" >> "$OUT/ncu.log"
done
grep -E "===|Duration|gpu__time|wavefronts|bank_conflicts|op_shared_ld|inst_executed.sum|Achieved Occupancy|warps_active|Registers Per|Stall|stall|Theoretical Occ|Block Limit|cycles_elapsed" "$OUT/ncu.log"
