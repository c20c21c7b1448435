"""`aqlmkit bench`: kernel microbenchmark (us/call vs dense F.linear) or, with --decode, the
decode benchmark (fp32 vs aqlmkit vs official aqlm) of benchmarks/cpu_decode.py."""
from __future__ import annotations

import statistics
import time

import torch

from aqlmkit.cli._common import check_positive
from aqlmkit.config import Scheme
from aqlmkit.dtypes import NAMES, parse_dtype
from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("bench", help="time the AQLM kernel against a dense layer (or --decode)")
    p.add_argument("--scheme", default="2x8g8", help="KxBgG scheme (default 2x8g8)")
    p.add_argument("--shape", default="1536x576", help="OUTxIN of the layer (default 1536x576)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 64], help="input rows (default 1 4 64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=sorted(NAMES))
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--decode", action="store_true", help="run the decode benchmark instead")
    p.add_argument("--decode-schemes", nargs="+", default=["2x8g8", "8x8g16"])
    p.add_argument("--tokens", type=int, default=32, help="decode: new tokens (default 32)")
    p.set_defaults(func=run)


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        o, i = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise AqlmkitError(f"bad --shape {text!r}: write OUTxIN, e.g. 1536x576") from None
    if o < 1 or i < 1:
        raise AqlmkitError(f"bad --shape {text!r}: both sizes must be >= 1")
    return o, i


def _time_us(fn, iters: int, device: torch.device) -> float:
    """Median of 5 runs of ``iters`` calls, in microseconds per call (synchronized on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        runs.append((time.perf_counter() - t) / iters * 1e6)
    return statistics.median(runs)


@torch.inference_mode()
def microbench(scheme: str, shape: str, batches: list[int], device: str, dtype: str, iters: int) -> list[dict]:
    """us/call of the path QuantizedLinear takes (kernels.aqlm_linear_cached: operands packed once
    per layer) vs F.linear on the dense weight, same dtype."""
    from aqlmkit import kernels
    from aqlmkit.formats.loading import resolve_device
    from aqlmkit.kernels.reference import dequantize

    s, (o, i), dev = Scheme.parse(scheme), _parse_shape(shape), resolve_device(device)
    s.check_shape(o, i, "bench layer")
    dt = parse_dtype(dtype)
    hi = 1 << (s.nbits_per_codebook - 1)
    codes = torch.randint(-hi, hi, (o, i // s.in_group_size, s.num_codebooks), device=dev,
                          dtype=torch.int8 if s.nbits_per_codebook <= 8 else torch.int16)
    cb = (torch.randn(s.num_codebooks, s.codebook_size, 1, s.in_group_size, device=dev) * 0.02).to(dt)
    scales = torch.ones(o, 1, 1, 1, device=dev, dtype=dt)
    w = dequantize(codes, cb, scales)
    rows = []
    for b in batches:
        x = torch.randn(b, i, device=dev, dtype=dt)
        backend = kernels.select(x, codes, cb)
        cache: dict = {}
        q = _time_us(lambda: kernels.aqlm_linear_cached(x, codes, cb, scales, None, cache), iters, dev)
        d = _time_us(lambda: torch.nn.functional.linear(x, w), iters, dev)
        rows.append({"batch": b, "backend": backend, "aqlm_us": q, "dense_us": d, "speedup": d / q})
    return rows


def run(args) -> int:
    check_positive(iters=args.iters, tokens=args.tokens)
    for b in args.batch:
        check_positive(batch=b)
    if args.decode:
        from aqlmkit.cli._bench_decode import run_decode_bench

        run_decode_bench(args.decode_schemes, new_tokens=args.tokens)
        return 0
    rows = microbench(args.scheme, args.shape, args.batch, args.device, args.dtype, args.iters)
    print(f"{args.scheme} {args.shape} {args.dtype} on {args.device} ({torch.get_num_threads()} threads)")
    print(f"{'batch':>6s} {'backend':>10s} {'aqlm us':>10s} {'dense us':>10s} {'dense/aqlm':>10s}")
    for r in rows:
        print(f"{r['batch']:6d} {r['backend']:>10s} {r['aqlm_us']:10.1f} {r['dense_us']:10.1f} {r['speedup']:10.2f}")
    return 0
