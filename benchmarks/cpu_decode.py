"""CPU decode benchmark: fp32 model vs aqlmkit kernels vs official aqlm (Numba), one run.

    python benchmarks/cpu_decode.py [--schemes 2x8g8 8x8g16] [--tokens 32] [--prompt 128]
                                    [--repeats 3] [--random] [--threads N]

Prints decode/prompt tokens/s with ratios and a per-layer table; writes
benchmarks/results/<date>_cpu_decode.json (machine, threads, load average, date).
Same as ``aqlmkit bench --decode``.
"""
from __future__ import annotations

import argparse

from aqlmkit.cli._bench_decode import run_decode_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["2x8g8", "8x8g16"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-iters", type=int, default=200, help="calls per per-layer timing")
    p.add_argument("--random", action="store_true", help="random SmolLM2-shaped model, skip loading")
    p.add_argument("--threads", type=int, default=None, help="torch threads for all variants")
    a = p.parse_args()
    run_decode_bench(a.schemes, a.tokens, a.prompt, a.repeats, a.random, micro_iters=a.micro_iters,
                     threads=a.threads)


if __name__ == "__main__":
    main()
