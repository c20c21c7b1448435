"""Run one aqlmkit CUDA path a few times on one layer, for a profiler to wrap (ncu, nsys).

    ncu --clock-control none -k regex:"mma_kernel|lut_kernel|gemv_kernel" \
        python benchmarks/gpu_profile.py --scheme 2x8g8 --shape 28672x8192 --batch 1 --path lut

Random codes (same work as trained ones); prints the median time of the plain calls so a
profiled run can be compared with benchmarks/gpu_kernels.py.
"""
from __future__ import annotations

import argparse

import torch

from aqlmkit.kernels import cuda as kc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="2x8g8")
    ap.add_argument("--shape", default="28672x8192", help="OUTxIN")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--path", default="lut", choices=kc.PATHS)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    from aqlmkit.config import Scheme

    s = Scheme.parse(a.scheme)
    out_f, in_f = (int(v) for v in a.shape.split("x"))
    k, nbits, g = s.num_codebooks, s.nbits_per_codebook, s.in_group_size
    cdt = torch.int8 if nbits <= 8 else torch.int16
    lo = -(1 << (cdt.itemsize * 8 - 1))
    codes = torch.randint(lo, lo + (1 << nbits), (out_f, in_f // g, k), device="cuda", dtype=cdt)
    cb = torch.randn(k, 1 << nbits, 1, g, device="cuda", dtype=torch.float16) * 0.05
    sc = torch.rand(out_f, 1, 1, 1, device="cuda", dtype=torch.float16) + 0.5
    x = torch.randn(a.batch, in_f, device="cuda", dtype=torch.float16)
    kc.run(x, codes, cb, sc, force=a.path)
    times = []
    for _ in range(a.iters):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        kc.run(x, codes, cb, sc, force=a.path)
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3)
    print(f"{a.scheme} {a.shape} b{a.batch} {a.path}: {sorted(times)[len(times) // 2]:.1f} us (eager)")


if __name__ == "__main__":
    main()
