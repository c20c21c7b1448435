"""AQLM matmul on a CUDA GPU: aqlmkit vs torch fp16 F.linear vs the official aqlm 1.1.7 kernels.

Every timing replays a CUDA graph that calls the op once per weight copy; enough copies rotate
that weights stream from HBM (> 4x L2), as in a real decode step. All three are measured in the
same run. Prints the ratio table and writes benchmarks/results/<date>_<device>_gpu_kernels.json.
Usage: PYTHONPATH=src python benchmarks/gpu_kernels.py [--quick] [--out DIR]
       [--schemes 2x8g8,1x8g8] [--batches 1,4] [--shapes 4096x4096,28672x8192] [--tag lut]
(us_<path>: every kernel path timed wherever it applies; "us" is the default dispatch.)
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from aqlmkit.kernels import cuda as kc
from aqlmkit.kernels import reference
from aqlmkit.utils import atomic_save_json

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (28672, 8192)]
SCHEMES = {"1x16g8": (1, 16, 8), "1x16g16": (1, 16, 16), "2x8g8": (2, 8, 8), "1x8g8": (1, 8, 8)}
BATCHES = [1, 4, 16]
OFFICIAL = {"1x16g8": "code1x16_matmat", "1x16g16": "code1x16_matmat", "2x8g8": "code2x8_matmat",
            "1x8g8": "code1x8_matmat"}


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(64, math.ceil(4 * l2 / max(nbytes, 1))))


def time_graph(fns, reps: int = 20) -> float:
    """Median microseconds per call of a graph running every fn in ``fns`` once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:2]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(fns))
    del g
    return sorted(times)[len(times) // 2]


def make_layers(scheme: str, out_f: int, in_f: int, n: int):
    k, b, g = SCHEMES[scheme]
    cdt = torch.int8 if b <= 8 else torch.int16
    lo, hi = -(1 << (cdt.itemsize * 8 - 1)), (1 << (cdt.itemsize * 8 - 1))
    hi = min(hi, lo + (1 << b))
    return [(torch.randint(lo, hi, (out_f, in_f // g, k), device="cuda", dtype=cdt),
             torch.randn(k, 1 << b, 1, g, device="cuda", dtype=torch.float16) * 0.05,
             torch.rand(out_f, 1, 1, 1, device="cuda", dtype=torch.float16) + 0.5) for _ in range(n)]


def official_kernels():
    try:
        from aqlm.inference_kernels.cuda_kernel import CUDA_KERNEL  # JIT-builds on first import
        return CUDA_KERNEL
    except Exception as e:  # noqa: BLE001 - report and carry on without the peer
        print(f"official aqlm kernels unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def bench_shape(out_f, in_f, schemes, batches, official, fp16_cache):
    rows = []
    for scheme in schemes:
        k, b, g = SCHEMES[scheme]
        code_bytes = out_f * in_f // g * k * (1 if b <= 8 else 2) + k * (1 << b) * g * 2
        layers = make_layers(scheme, out_f, in_f, copies_for(code_bytes))
        for batch in batches:
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            y0 = kc.run(x, *layers[0])
            want = reference.aqlm_linear(x.float(), layers[0][0], layers[0][1].float(),
                                         layers[0][2].float())
            err = ((y0.float() - want).norm() / want.norm()).item()
            t = {"us": time_graph([lambda L=L: kc.run(x, *L) for L in layers])}
            for path in ("gemv", "lut", "mma"):  # every specialised path that applies
                if kc.applies(path, batch, layers[0][0], layers[0][1], in_f):
                    yp = kc.run(x, *layers[0], force=path)
                    t[f"{path}_rel_err"] = ((yp.float() - want).norm() / want.norm()).item()
                    t[f"us_{path}"] = time_graph([lambda L=L, p=path: kc.run(x, *L, force=p)
                                                  for L in layers])
            t["us_dequant_cublas"] = time_graph([lambda L=L: kc.run(x, *L, force="dequant")
                                                 for L in layers])
            if official is not None:
                fn = getattr(official, OFFICIAL[scheme])
                try:
                    t["us_official"] = time_graph([lambda L=L: fn(x, L[0], L[1], L[2], None)
                                                   for L in layers])
                except Exception as e:  # noqa: BLE001
                    print(f"official {scheme} b{batch} failed: {e}", file=sys.stderr)
            if (out_f, in_f, batch) not in fp16_cache:
                n = copies_for(out_f * in_f * 2)
                ws = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) for _ in range(n)]
                fp16_cache[(out_f, in_f, batch)] = time_graph([lambda w=w: F.linear(x, w) for w in ws])
                del ws
            us16 = fp16_cache[(out_f, in_f, batch)]
            row = {"shape": f"{out_f}x{in_f}", "scheme": scheme, "batch": batch, **t,
                   "us_fp16": us16, "speedup_vs_fp16": us16 / t["us"],
                   "speedup_vs_official": (t["us_official"] / t["us"]) if "us_official" in t else None,
                   "best_path": min((p for p in kc.PATHS if f"us_{p}" in t or p == "dequant"),
                                    key=lambda p: t.get(f"us_{p}", t["us_dequant_cublas"])),
                   "path": kc.default_path(batch, layers[0][0], layers[0][1], in_f),
                   "rel_err": err}
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
            rows.append(row)
        del layers
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma list, e.g. 2x8g8,1x8g8")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma list, e.g. 1,4")
    ap.add_argument("--shapes", default="", help="comma list OUTxIN (default: all / --quick)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name (keeps earlier results)")
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
              or (SHAPES[:2] if args.quick else SHAPES))
    torch.manual_seed(0)
    official = official_kernels()
    kc.extension()
    rows, cache = [], {}
    for out_f, in_f in shapes:
        rows += bench_shape(out_f, in_f, schemes, batches, official, cache)
    name = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    nan = float("nan")
    print(f"\n{'shape':>12} {'scheme':>7} {'b':>3} {'us':>7} {'gemv':>7} {'lut':>7} {'mma':>7} "
          f"{'dq+mm':>7} {'fp16':>7} {'offic.':>7} {'x fp16':>6} {'x off':>6}  best")
    for r in rows:
        us = " ".join(f"{r.get(k) or nan:7.1f}" for k in
                      ("us", "us_gemv", "us_lut", "us_mma", "us_dequant_cublas", "us_fp16",
                       "us_official"))
        print(f"{r['shape']:>12} {r['scheme']:>7} {r['batch']:>3} {us} {r['speedup_vs_fp16']:6.2f} "
              f"{r['speedup_vs_official'] or nan:6.2f}  {r['best_path']}")
    dev = name.replace(" ", "_")
    tag = f"_{args.tag}" if args.tag else ""
    out = Path(args.out) / f"{date}_{dev}_gpu_kernels{tag}.json"
    atomic_save_json(out, {"device": name, "date": date, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
