"""CPU decode benchmark: fp32 model vs aqlmkit kernels vs official aqlm (Numba), one run.

    python benchmarks/cpu_decode.py [--schemes 2x8g8 8x8g16] [--tokens 32] [--prompt 128]
                                    [--repeats 5] [--random] [--threads N]
                                    [--runtime compiled|eager|generate] [--variants ...]

Every variant decodes through the same loop (default: aqlmkit.runtime.StaticDecoder with a
torch.compile'd step; the official Numba layers run it eagerly). Prints decode/prompt tokens/s
with ratios and a per-layer table; writes benchmarks/results/<date>_cpu_decode.json (one thread;
_cpu_decode_t<N>.json for N threads) with the machine, threads, load average, date and runtime.
Same as ``aqlmkit bench --decode``.
"""
from __future__ import annotations

import argparse

from aqlmkit.cli._bench_decode import RUNTIMES, VARIANTS, run_decode_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["2x8g8", "8x8g16"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed generations per variant (median)")
    p.add_argument("--micro-iters", type=int, default=200, help="calls per per-layer timing")
    p.add_argument("--random", action="store_true", help="random SmolLM2-shaped model, skip loading")
    p.add_argument("--threads", type=int, default=None, help="torch threads for all variants")
    p.add_argument("--runtime", choices=RUNTIMES, default="compiled", help="decode loop for all variants")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    a = p.parse_args()
    run_decode_bench(a.schemes, a.tokens, a.prompt, a.repeats, a.random, micro_iters=a.micro_iters,
                     threads=a.threads, runtime=a.runtime, variants=tuple(a.variants))


if __name__ == "__main__":
    main()
