"""Sibling fusion and batch 17-64 on a CUDA GPU (Llama-2-7B shapes), same run, vs torch fp16.

1. q/k/v (3 x 4096x4096) and gate/up (2 x 11008x4096): the unfused layers (one dispatch each)
   against one fused launch (aqlmkit.kernels.cuda.run_group, default path and every forced path),
   and fp16 as three F.linears and as one F.linear on the concatenated weight.
2. Batch 17..64 (serving batches): dequantize + cuBLAS against the tensor-core kernel (4 n-tiles,
   32 rows a launch), the same kernel per 16-row chunk (first idea), and fp16.
Timings replay CUDA graphs over enough weight copies that weights stream from HBM (gpu_kernels.py).
Writes benchmarks/results/<date>_<device>_gpu_fused.json.
Usage: PYTHONPATH=src python benchmarks/gpu_fused.py [--schemes 2x8g8,1x16g8] [--batches 1,4,16]
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch
import torch.nn.functional as F

from aqlmkit.kernels import cuda as kc
from aqlmkit.kernels import reference
from aqlmkit.utils import atomic_save_json
from gpu_kernels import SCHEMES, copies_for, make_layers, time_graph

GROUPS = {"qkv": [(4096, 4096)] * 3, "gate_up": [(11008, 4096)] * 2}
BIG_BATCH_SHAPES = [(4096, 4096), (11008, 4096), (28672, 8192)]


def rel_err(y, x, layer):
    want = reference.aqlm_linear(x.float(), layer[0], layer[1].float(), layer[2].float())
    return ((y.float() - want).norm() / want.norm()).item()


def bench_group(name, scheme, batches):
    shapes = GROUPS[name]
    k, b, g = SCHEMES[scheme]
    in_f = shapes[0][1]
    nbytes = sum(o * in_f // g * k * (1 if b <= 8 else 2) for o, _ in shapes)
    copies = copies_for(nbytes)
    groups = [[make_layers(scheme, o, in_f, 1)[0] for o, _ in shapes] for _ in range(copies)]
    fp16 = [[torch.randn(o, in_f, device="cuda", dtype=torch.float16) for o, _ in shapes]
            for _ in range(copies_for(sum(o for o, _ in shapes) * in_f * 2))]
    fp16_cat = [torch.cat(ws) for ws in fp16]
    rows = []
    for batch in batches:
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
        errs = [rel_err(y, x, lay) for y, lay in zip(kc.run_group(x, groups[0]), groups[0])]
        t = {"us_unfused": time_graph([lambda G=G: [kc.run(x, *lay) for lay in G] for G in groups]),
             "us_fused": time_graph([lambda G=G: kc.run_group(x, G) for G in groups]),
             "us_fp16": time_graph([lambda W=W: [F.linear(x, w) for w in W] for W in fp16]),
             "us_fp16_concat": time_graph([lambda w=w: F.linear(x, w) for w in fp16_cat])}
        for path in ("gemv", "lut", "mma"):
            if kc.applies(path, batch, groups[0][0][0], groups[0][0][1], in_f):
                t[f"us_fused_{path}"] = time_graph([lambda G=G, p=path: kc.run_group(x, G, force=p)
                                                    for G in groups])
        total = sum(o for o, _ in shapes)
        row = {"group": name, "scheme": scheme, "batch": batch, **t, "max_rel_err": max(errs),
               "path": kc.default_path(batch, groups[0][0][0], groups[0][0][1], in_f, total),
               "fused_vs_unfused": t["us_unfused"] / t["us_fused"],
               "fused_vs_fp16": t["us_fp16"] / t["us_fused"],
               "fused_vs_fp16_concat": t["us_fp16_concat"] / t["us_fused"]}
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        rows.append(row)
    del groups, fp16, fp16_cat
    torch.cuda.empty_cache()
    return rows


def mma_chunked(x, layer):
    """The 2-n-tile tensor-core kernel per 16-row chunk: each chunk decodes the whole weight again
    (the first idea, a loser at 64 rows; kept to compare)."""
    return torch.cat([kc.run(x[i:i + 16], *layer, force="mma") for i in range(0, x.shape[0], 16)])


def bench_big_batch(scheme, batches):
    rows = []
    k, b, g = SCHEMES[scheme]
    for out_f, in_f in BIG_BATCH_SHAPES:
        layers = make_layers(scheme, out_f, in_f, copies_for(out_f * in_f // g * k * (1 if b <= 8 else 2)))
        ws = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
              for _ in range(copies_for(out_f * in_f * 2))]
        for batch in batches:
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            t = {"us_dequant_cublas": time_graph([lambda L=L: kc.run(x, *L, force="dequant") for L in layers]),
                 "us_fp16": time_graph([lambda w=w: F.linear(x, w) for w in ws])}
            if kc.applies("mma", batch, layers[0][0], layers[0][1], in_f):
                t["us_mma_chunk16"] = time_graph([lambda L=L: mma_chunked(x, L) for L in layers])
                t["us_mma"] = time_graph([lambda L=L: kc.run(x, *L, force="mma") for L in layers])
                t["mma_rel_err"] = rel_err(kc.run(x, *layers[0], force="mma"), x, layers[0])
            t["us_default"] = time_graph([lambda L=L: kc.run(x, *L) for L in layers])
            row = {"shape": f"{out_f}x{in_f}", "scheme": scheme, "batch": batch, **t,
                   "path": kc.default_path(batch, layers[0][0], layers[0][1], in_f),
                   "default_vs_fp16": t["us_fp16"] / t["us_default"],
                   "dequant_vs_fp16": t["us_fp16"] / t["us_dequant_cublas"]}
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            rows.append(row)
        del layers, ws
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="2x8g8,1x8g8,1x16g8,1x16g16")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--big-batches", default="17,32,48,64")
    ap.add_argument("--big-schemes", default="2x8g8,1x16g8")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    kc.extension()
    batches = [int(v) for v in args.batches.split(",") if v]
    fused = [r for s in args.schemes.split(",") if s for name in GROUPS
             for r in bench_group(name, s, batches)]
    big = [r for s in args.big_schemes.split(",") if s
           for r in bench_big_batch(s, [int(v) for v in args.big_batches.split(",") if v])]
    name = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    out = Path(args.out) / f"{date}_{name.replace(' ', '_')}_gpu_fused.json"
    atomic_save_json(out, {"device": name, "date": date, "fused": fused, "big_batch": big,
                           "note": "us per call of the whole group; fp16 = torch F.linear"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
