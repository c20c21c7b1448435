"""Decode benchmark: fp32 model vs aqlmkit AQLM kernels vs the official ``aqlm`` Numba kernel.

All variants share one set of random codes per layer, run in the same process and through the
same decode loop (``aqlmkit.runtime.StaticDecoder``: static KV cache, torch.compile'd step), so
the ratios are meaningful even on a noisy machine (the load average is recorded next to them).
The official layer calls Numba, which dynamo cannot trace, so it runs that loop eagerly (the
JSON says so per variant). Random codes give the exact same work as trained ones; only speed is
measured here, never quality.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from aqlmkit.cli._bench_models import base_model, block_linears, build_variant, half_copy, quantize_random
from aqlmkit.config import Scheme
from aqlmkit.utils import atomic_save_json

RUNTIMES = ("compiled", "eager", "generate")
# name -> what it is. "aqlmkit" is what a user gets from aqlmkit.load(<saved checkpoint>).
VARIANTS = {
    "aqlmkit": "aqlmkit.load() of the saved AQLM checkpoint: quantized linears on our CPU kernels, "
               "lm_head/embeddings stored fp16 as AQLM checkpoints do (fp32 activations and sums)",
    "aqlmkit-fp32dense": "same quantized linears, lm_head/embeddings kept fp32 (like-for-like with "
                         "the fp32 model apart from the quantized linears)",
    "official": "aqlm.QuantizedLinear (official Numba kernel, 1 Numba thread: it races with more), "
                "lm_head/embeddings fp32; runs the same loop eagerly (dynamo cannot trace Numba)",
}


def machine_info() -> dict:
    from aqlmkit.kernels._build import cpu_flags

    return {"cpu": cpu_flags().split("|")[0], "threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(),
            "loadavg": os.getloadavg(), "date": dt.datetime.now().isoformat(timespec="seconds")}


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK"), time.process_time()


def others_cores(before: tuple | None, after: tuple | None, wall: float) -> float | None:
    """Average cores other processes kept busy over ``wall`` seconds: the noise the load average
    cannot separate from this benchmark's own thread and compile workers."""
    if before is None or after is None or wall <= 0:
        return None
    return round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall, 2)


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def prompt_ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def warm_decoder(model: nn.Module, runtime: str, new_tokens: int):
    """A StaticDecoder for ``model`` after one generation (which compiles it); its first numbers."""
    from aqlmkit.runtime import StaticDecoder

    dec = StaticDecoder(model, compile=runtime == "compiled")
    ids = prompt_ids(model.config.vocab_size, 8, 0)
    t = time.perf_counter()
    dec.generate(ids, new_tokens + 1)
    info = {"runtime": runtime, "compile_s": dec.stats.compile_s, "first_generate_s": time.perf_counter() - t}
    return (dec, ids), info


def interleaved(decoders: dict, infos: dict, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Decode tok/s of every decoder, round-robin: each of ``repeats`` rounds runs every model once,
    so a slow spell of a shared machine hits all variants alike. Median over rounds."""
    runs = {name: [] for name in decoders}
    busy = {name: [0.0, 0.0] for name in decoders}  # other processes' CPU seconds, wall seconds
    for _ in range(repeats):
        for name, (dec, ids) in decoders.items():
            t, c = time.perf_counter(), cpu_seconds()
            dec.generate(ids, new_tokens + 1)
            wall = time.perf_counter() - t
            runs[name].append(dec.stats.decode_tok_s)
            busy[name][0] += (others_cores(c, cpu_seconds(), wall) or 0.0) * wall
            busy[name][1] += wall
    out = {}
    for name, r in runs.items():
        tok_s = statistics.median(r)
        out[name] = {**infos[name], "decode_tok_s": tok_s, "ms_per_token": 1e3 / tok_s, "runs_tok_s": r,
                     "others_cores": round(busy[name][0] / max(busy[name][1], 1e-9), 2)}
    return out


@torch.inference_mode()
def generate_decode(model: nn.Module, new_tokens: int, repeats: int) -> dict:
    """The previous method: transformers ``generate`` (dynamic cache), (t(n+1) - t(1)) / n."""
    short = prompt_ids(model.config.vocab_size, 8, 0)
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def gen_n(n):
        return lambda: model.generate(short, max_new_tokens=n, min_new_tokens=n, **kw)

    t1 = timed(gen_n(1), repeats)
    tn = timed(gen_n(new_tokens + 1), repeats)
    tok_s = new_tokens / max(tn - t1, 1e-9)
    return {"runtime": "generate", "decode_tok_s": tok_s, "ms_per_token": 1e3 / tok_s}


@torch.inference_mode()
def prompt_speed(model: nn.Module, prompt_len: int, repeats: int) -> float:
    """Prompt (prefill) tokens/s of one eager forward over ``prompt_len`` tokens."""
    long = prompt_ids(model.config.vocab_size, prompt_len, 1)
    return prompt_len / timed(lambda: model(long), repeats)


def variant_runtime(variant: str, runtime: str) -> str:
    return "eager" if variant == "official" and runtime == "compiled" else runtime


@torch.no_grad()
def layer_micro(model: nn.Module, s: Scheme, repeats: int = 200) -> list[dict]:
    """Per unique layer shape at batch 1: our kernel vs fp32 F.linear vs official numba (us).
    The weights stay cache-hot here, which flatters fp32 on the small layers. no_grad, not
    inference_mode: parameters made under inference_mode have no version counter, so
    QuantizedLinear could not cache its packed operands and would time the unpacked path."""
    shapes = sorted({(m.out_features, m.in_features) for _, m in block_linears(model)})
    rows = []
    for o, i in shapes:
        lin = nn.Linear(i, o, bias=False)
        ours, off = (quantize_random(nn.Sequential(lin), s, f)[0] for f in (False, True))
        x = torch.randn(1, i)
        us = {name: 1e6 * timed(lambda m=m: [m(x) for _ in range(repeats)], 3) / repeats
              for name, m in (("fp32", lin), ("aqlmkit", ours), ("official", off))}
        rows.append({"shape": f"{o}x{i}", **{f"{k}_us": round(v, 1) for k, v in us.items()}})
    head = model.lm_head
    x = torch.randn(1, head.in_features)
    half = half_copy(head)
    n = max(3, repeats // 20)
    us = {"fp32": 1e6 * timed(lambda: [head(x) for _ in range(n)], 3) / n,
          "aqlmkit": 1e6 * timed(lambda: [half(x) for _ in range(n)], 3) / n}
    rows.append({"shape": f"lm_head {head.out_features}x{head.in_features} (f16 weight)",
                 **{f"{k}_us": round(v, 1) for k, v in us.items()}, "official_us": None})
    return rows


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    try:  # the official kernel races with more than one Numba thread (see tests/test_interop.py)
        import numba

        numba.set_num_threads(1)
    except ImportError:
        pass


def run_decode_bench(schemes: list[str], new_tokens: int = 32, prompt_len: int = 128,
                     repeats: int = 5, random: bool = False, out_dir: str | None = None,
                     micro_iters: int = 200, threads: int | None = None,
                     runtime: str = "compiled", variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """Full benchmark; prints the tables and writes benchmarks/results/<date>_cpu_decode.json.

    ``threads`` pins torch's intra-op threads for every variant (on a machine shared with other
    jobs, 1 thread gives stable numbers; 2+ threads then mostly measure the scheduler)."""
    set_threads(threads)
    model, label = base_model(random)
    result = {"machine": machine_info(), "model": label, "new_tokens": new_tokens,
              "prompt_len": prompt_len, "repeats": repeats, "runtime": runtime_info(runtime),
              "variants": {v: VARIANTS[v] for v in variants}, "schemes": {}}
    print(f"model: {label}; threads {torch.get_num_threads()}; runtime {runtime}; load {os.getloadavg()}")
    fp32_dec = None if runtime == "generate" else warm_decoder(model, runtime, new_tokens)
    fp32_prompt = prompt_speed(model, prompt_len, repeats)
    for name in schemes:
        entry = measure_scheme(model, Scheme.parse(name), fp32_dec, runtime, variants, new_tokens, repeats,
                               prompt_len)
        entry["fp32"]["prompt_tok_s"] = fp32_prompt
        if micro_iters:
            entry["layers"] = layer_micro(model, Scheme.parse(name), micro_iters)
        result["schemes"][name] = entry
        print_scheme(name, entry)
    fp32_each = [e["fp32"]["decode_tok_s"] for e in result["schemes"].values()]
    result["fp32"] = {"decode_tok_s": statistics.median(fp32_each) if fp32_each else None,
                      "prompt_tok_s": fp32_prompt, "note": "median of the per-scheme fp32 measurements; "
                      "each scheme's ratios use its own (same rounds)"}
    result["machine"]["loadavg_end"] = os.getloadavg()
    path = results_path(out_dir)
    atomic_save_json(path, result)
    print(f"wrote {path}")
    return result


def measure_scheme(model: nn.Module, s: Scheme, fp32_dec, runtime: str, variants, new_tokens: int,
                   repeats: int, prompt_len: int) -> dict:
    """fp32 and every variant of one scheme, interleaved (or one after another for ``generate``)."""
    models = {v: build_variant(model, s, v) for v in variants
              if not (v == "official" and s.nbits_per_codebook != 8)}
    if runtime == "generate":
        entry = {name: generate_decode(m, new_tokens, repeats) for name, m in {"fp32": model, **models}.items()}
    else:
        decoders, infos = {}, {}
        if fp32_dec is not None:
            decoders["fp32"], infos["fp32"] = fp32_dec
        for v, m in models.items():
            decoders[v], infos[v] = warm_decoder(m, variant_runtime(v, runtime), new_tokens)
        entry = interleaved(decoders, infos, new_tokens, repeats)
    for v, m in models.items():
        entry[v]["prompt_tok_s"] = prompt_speed(m, prompt_len, repeats)
    return entry


def runtime_info(runtime: str) -> dict:
    loops = {"compiled": "aqlmkit.runtime.StaticDecoder: static KV cache, eager prefill, "
                         "torch.compile(fullgraph, inductor, freezing) greedy step, dynamo guards "
                         "skipped after the first step",
             "eager": "aqlmkit.runtime.StaticDecoder with compile=False (same loop, eager)",
             "generate": "transformers generate() (dynamic cache), (t(n+1 tokens) - t(1)) / n"}
    return {"name": runtime, "loop": loops[runtime], "prompt_tokens": 8,
            "official": "eager (Numba kernel cannot be traced)" if runtime == "compiled" else runtime}


def results_path(out_dir: str | None) -> Path:
    """benchmarks/results/<date>_cpu_decode.json for one thread, ..._cpu_decode_t<N>.json else."""
    repo = Path(__file__).resolve().parents[3]  # the checkout, when installed editable
    base = Path(out_dir) if out_dir else (repo if (repo / "benchmarks").is_dir() else Path.cwd()) / "benchmarks" / "results"
    n = torch.get_num_threads()
    return base / f"{dt.date.today().isoformat()}_cpu_decode{'' if n == 1 else f'_t{n}'}.json"


def print_scheme(name: str, e: dict) -> None:
    """One table per scheme; ratios against the fp32 model measured in the same rounds."""
    fp32, off = e["fp32"]["decode_tok_s"], e.get("official", {}).get("decode_tok_s")
    print(f"\n== {name} ==  {'variant':18s} {'runtime':9s} {'decode tok/s':>12s} {'x fp32':>7s} "
          f"{'x official':>10s} {'prompt tok/s':>12s} {'compile s':>9s} {'others':>6s}")
    for v in ("fp32", *VARIANTS):
        if v in e:
            d = e[v]["decode_tok_s"]
            ro = f"{d / off:10.2f}" if off else f"{'-':>10s}"
            print(f"{'':12s}{v:18s} {e[v]['runtime']:9s} {d:12.1f} {d / fp32:7.2f} {ro} "
                  f"{e[v].get('prompt_tok_s', 0):12.0f} {e[v].get('compile_s', 0):9.1f} "
                  f"{e[v].get('others_cores')!s:>6s}")
    print("  (others: cores kept busy by other processes while that variant was timed)")
    for r in e.get("layers", []):
        off_us = "-" if r["official_us"] is None else f"{r['official_us']:.1f}"
        print(f"  per layer, batch 1 (us/call, weights cache-hot) {r['shape']:>30s} "
              f"fp32 {r['fp32_us']:8.1f} aqlmkit {r['aqlmkit_us']:8.1f} official {off_us:>8s}")
