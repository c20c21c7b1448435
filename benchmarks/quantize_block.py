"""AQ engine on one Llama-2-7B-shaped block: per-linear time and error, vs GPTQ-2bit.

The 7 linears (q,k,v,o 4096x4096; gate,up 11008x4096; down 4096x11008) get random weights and
Hessians from correlated Gaussian "activations" (power-law spectrum + a few outlier channels,
like real LLM inputs), accumulated over --tokens rows in batches. q/k/v share one H, gate/up
another, as in a real block. Each scheme quantizes all 7; GPTQ 2-bit g128 is scored on the same H.
Stops after --time-budget seconds (checked between linears) and saves what it has to
benchmarks/results/<date>_<device>_quantize_block.json.
Usage: PYTHONPATH=src python benchmarks/quantize_block.py [--quick] [--time-budget 300]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import resource
import sys
import time
from pathlib import Path

import torch

from aqlmkit.config import LayerQuantConfig, Scheme
from aqlmkit.engine import quantize_linear, relative_error
from aqlmkit.engine.baselines import gptq_quantize
from aqlmkit.app.recipes import build_recipe
from aqlmkit.kernels.reference import dequantize
from aqlmkit.utils import atomic_save_json

SHAPES = {
    "llama2-7b": {"hidden": 4096, "kv": 4096, "inter": 11008, "tokens": 256 * 4096},
    "smollm2-135m": {"hidden": 576, "kv": 192, "inter": 1536, "tokens": 64 * 2048},
    "quick": {"hidden": 128, "kv": 64, "inter": 344, "tokens": 4096},
}


def linears(hidden: int, kv: int, inter: int) -> list[tuple[str, int, int, str]]:
    """(name, out, in, which H) for one Llama block."""
    return [("q_proj", hidden, hidden, "attn"), ("k_proj", kv, hidden, "attn"),
            ("v_proj", kv, hidden, "attn"), ("o_proj", hidden, hidden, "o"),
            ("gate_proj", inter, hidden, "mlp"), ("up_proj", inter, hidden, "mlp"),
            ("down_proj", hidden, inter, "down")]


def make_hessian(n_in: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """XᵀX/n for X = (Z · s) Qᵀ · outliers, accumulated in token batches (bounded memory)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=gen, device=device))
    spectrum = torch.arange(1, n_in + 1, device=device, dtype=torch.float32) ** -0.8
    outliers = torch.where(torch.rand(n_in, generator=gen, device=device) < 0.01, 10.0, 1.0)
    mix = (spectrum.unsqueeze(1) * q.T) * outliers            # X = Z @ mix
    h = torch.zeros(n_in, n_in, device=device)
    batch = max(1, min(tokens, (1 << 26) // n_in))
    for a in range(0, tokens, batch):
        x = torch.randn(min(batch, tokens - a), n_in, generator=gen, device=device) @ mix
        h.addmm_(x.T, x)
    return h / tokens


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_linear(name, w, h, scheme, cfg, device, gptq: bool) -> dict:
    sync(device)
    t0 = time.perf_counter()
    q = quantize_linear(w, h, scheme, cfg, name=name, progress=True)
    sync(device)
    row = {"linear": name, "shape": list(w.shape), "seconds": time.perf_counter() - t0,
           "relative_error": relative_error(w, dequantize(q.codes, q.codebooks, q.scales), h),
           "epochs": q.stats["epochs"], "timing": q.stats["timing"],
           "bits_per_weight": scheme.bits_per_weight(*w.shape)}
    if gptq:
        t0 = time.perf_counter()
        row["gptq2_relative_error"] = relative_error(w, gptq_quantize(w, h, 2, 128), h)
        sync(device)
        row["gptq2_seconds"] = time.perf_counter() - t0
    return row


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b",
                   help="block shape (default llama2-7b; --quick means 'quick')")
    p.add_argument("--schemes", default="1x16g8,2x8g8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds, then save and stop")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens per Hessian")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a LayerQuantConfig field, e.g. --set max_epochs=4")
    p.add_argument("--no-gptq", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def layer_config(device: torch.device, overrides: list[str]) -> LayerQuantConfig:
    base = dataclasses.asdict(build_recipe("standard" if device.type == "cuda" else "quick").layer)
    names = {f.name for f in dataclasses.fields(LayerQuantConfig)}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"--set {item}: unknown LayerQuantConfig field; known: {sorted(names)}")
        base[key] = float(value) if key in ("lr", "relative_mse_tolerance") else int(value)
    return LayerQuantConfig(**base)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    shape_name = "quick" if args.quick else args.shape
    shapes = SHAPES[shape_name]
    tokens = args.tokens or shapes["tokens"]
    cfg = layer_config(device, args.set)
    torch.manual_seed(0)
    hs = {key: make_hessian(n, tokens, seed, device) for seed, (key, n) in enumerate(
        [("attn", shapes["hidden"]), ("o", shapes["hidden"]), ("mlp", shapes["hidden"]), ("down", shapes["inter"])])}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": shape_name, "tokens": tokens,
              "config": dataclasses.asdict(cfg), "hessian_seconds": time.perf_counter() - t_start,
              "runs": {}, "stopped_early": False}
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).split()[-1].lower()
    suffix = "" if shape_name == "llama2-7b" else "_" + shape_name
    out = Path(args.out) / f"{dt.date.today().isoformat()}_{tag}{suffix}_quantize_block.json"
    gptq_done: dict[str, float] = {}
    last = 0.0
    for scheme_name in args.schemes.split(","):
        scheme, rows = Scheme.parse(scheme_name), []
        result["runs"][scheme_name] = rows
        for i, (name, n_out, n_in, hkey) in enumerate(linears(shapes["hidden"], shapes["kv"], shapes["inter"])):
            if time.perf_counter() - t_start + last > args.time_budget:  # the next one would overrun
                result["stopped_early"] = True
                break
            w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(100 + i)).to(device) * 0.02
            row = bench_linear(name, w, hs[hkey], scheme, cfg, device, not args.no_gptq and name not in gptq_done)
            gptq_done.setdefault(name, row.get("gptq2_relative_error"))
            row.setdefault("gptq2_relative_error", gptq_done[name])
            rows.append(row)
            last = row["seconds"] + row.get("gptq2_seconds", 0.0)
            result["peak_memory_mb"] = peak_memory_mb(device)
            atomic_save_json(out, result)  # partial results survive an external timeout
            print(f"{scheme_name} {name:10s} {n_out}x{n_in}: {row['seconds']:7.1f}s  rel.err {row['relative_error']:.4f}"
                  f"  (GPTQ-2bit {row['gptq2_relative_error'] or float('nan'):.4f})  epochs {row['epochs']}", flush=True)
        total = sum(r["seconds"] for r in rows)
        mean = sum(r["relative_error"] for r in rows) / max(1, len(rows))
        print(f"{scheme_name}: {len(rows)}/7 linears, {total:.1f}s total per block, "
              f"mean rel.err {mean:.4f}", flush=True)
        result[f"{scheme_name}_block_seconds"] = total
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["wall_seconds"] = time.perf_counter() - t_start
    print(f"peak memory {result['peak_memory_mb']:.0f} MiB, wall {result['wall_seconds']:.1f}s")
    atomic_save_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
