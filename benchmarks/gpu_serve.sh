#!/usr/bin/env bash
# Serve throughput on the GPU (Llama-2-7B-shaped, random weights): eager, then compiled.
# Carry the server wheels as .whl (fastapi, starlette, uvicorn, sse-starlette, pydantic(-core),
# annotated-types, typing-inspection, typing-extensions, opentelemetry-api). Writes JSON to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 AQLMKIT_CACHE=/tmp/aqlmkit_cache
R=benchmarks/results/$(date +%F)_NVIDIA_H200_serve_throughput
COMMON="--model llama2-7b-random --device cuda --max-tokens 64 --prompt-tokens 32 --rounds 2"
[ -n "${SKIP_EAGER:-}" ] || timeout ${T_EAGER:-300} python3 benchmarks/serve_throughput.py $COMMON --concurrency ${EAGER_C:-1 4 16 32 64} --out $R.json
cp $R.json "$OUT"/ 2>/dev/null
timeout ${T_COMPILED:-400} python3 benchmarks/serve_throughput.py $COMMON --concurrency ${COMPILED_C:-1 32} --compile --out ${R}_compiled.json
cp ${R}_compiled.json "$OUT"/ 2>/dev/null
