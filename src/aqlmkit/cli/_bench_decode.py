"""Decode benchmark: fp32 model vs aqlmkit AQLM kernels vs the official ``aqlm`` Numba kernel.

All variants share one set of random codes per layer and run in the same process, so the ratios
are meaningful even on a noisy machine (the load average is recorded next to them). Random codes
give the exact same work as trained ones; only speed is measured here, never quality.
"""
from __future__ import annotations

import copy
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.utils import atomic_save_json


def machine_info() -> dict:
    from aqlmkit.kernels._build import cpu_flags

    return {"cpu": cpu_flags().split("|")[0], "threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(),
            "loadavg": os.getloadavg(), "date": dt.datetime.now().isoformat(timespec="seconds")}


def smollm_shaped_model() -> nn.Module:
    """SmolLM2-135M-shaped Llama with random weights (used when the embedded model is absent)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                      tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def base_model(random: bool) -> tuple[nn.Module, str]:
    if not random:
        try:
            import aqlmkit

            model, _ = aqlmkit.load("default", dtype="float32")
            return model.eval(), "embedded SmolLM2-135M-Instruct"
        except Exception as e:  # noqa: BLE001 - any load failure falls back to the shaped model
            print(f"(embedded model unavailable: {e}; using a random SmolLM2-shaped model)")
    return smollm_shaped_model(), "random SmolLM2-135M-shaped Llama"


def random_codes(lin: nn.Linear, s: Scheme, gen: torch.Generator) -> dict:
    """Random HF-layout AQLM tensors for one layer (int8/int16 two's complement codes)."""
    o, i = lin.out_features, lin.in_features
    dt_ = torch.int8 if s.nbits_per_codebook <= 8 else torch.int16
    hi = 1 << (s.nbits_per_codebook - 1)
    codes = torch.randint(-hi, hi, (o, i // s.in_group_size, s.num_codebooks), generator=gen).to(dt_)
    cb = torch.randn(s.num_codebooks, s.codebook_size, 1, s.in_group_size, generator=gen) * 0.02
    return {"codes": codes, "codebooks": cb, "scales": torch.ones(o, 1, 1, 1), "bias": lin.bias}


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and "lm_head" not in n]


class HalfWeightLinear(nn.Module):
    """A dense layer whose weight is stored in fp16 (as AQLM checkpoints store unquantized layers,
    ``torch_dtype: float16``); activations and accumulation stay fp32 (aqlmkit cpu_half_linear)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight16", lin.weight.detach().half().contiguous())
        self.bias = None if lin.bias is None else lin.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aqlmkit.cpu_half_linear(x, self.weight16, self.bias)


def quantize_random(model: nn.Module, s: Scheme, official: bool, half_head: bool = False) -> nn.Module:
    """Copy of ``model`` with every block linear replaced by an AQLM layer (ours or official);
    ``half_head`` also stores the (unquantized) lm_head in fp16, as the AQLM checkpoints do."""
    from aqlmkit.kernels import cpu
    from aqlmkit.nn import QuantizedLinear

    q = copy.deepcopy(model)
    if half_head and cpu.load():
        q.lm_head = HalfWeightLinear(q.lm_head)
    gen = torch.Generator().manual_seed(1)
    for name, lin in block_linears(q):
        t = random_codes(lin, s, gen)
        if official:
            from aqlm import QuantizedLinear as OfficialQL

            mod = OfficialQL(lin.in_features, lin.out_features, s.in_group_size, 1,
                             s.num_codebooks, s.nbits_per_codebook, bias=lin.bias is not None)
        else:
            mod = QuantizedLinear(lin.in_features, lin.out_features, s, bias=lin.bias is not None)
        for k, v in t.items():
            if v is not None:
                getattr(mod, k).data = v.detach().clone()
        q.set_submodule(name, mod)
    return q


# (name, official package?, lm_head stored fp16?). "aqlmkit" is like-for-like with the fp32 model
# apart from the quantized block linears; "aqlmkit+f16head" also keeps the unquantized lm_head
# in fp16 as AQLM checkpoints store it (fp32 activations/accumulation, see HalfWeightLinear).
VARIANTS = (("aqlmkit", False, False), ("aqlmkit+f16head", False, True), ("official", True, False))


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def decode_speed(model: nn.Module, new_tokens: int, prompt_len: int, repeats: int) -> dict:
    """Greedy decode tokens/s (KV cache, batch 1) and prompt tokens/s for one model."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    short = torch.randint(0, vocab, (1, 8), generator=gen)
    long = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def gen_n(n):
        return lambda: model.generate(short, max_new_tokens=n, min_new_tokens=n, **kw)

    t1 = timed(gen_n(1), repeats)
    tn = timed(gen_n(new_tokens + 1), repeats)
    tp = timed(lambda: model(long), repeats)
    return {"decode_tok_s": new_tokens / max(tn - t1, 1e-9), "prompt_tok_s": prompt_len / tp,
            "ms_per_token": 1e3 * (tn - t1) / new_tokens}


@torch.inference_mode()
def layer_micro(model: nn.Module, s: Scheme, repeats: int = 200) -> list[dict]:
    """Per unique layer shape at batch 1: our kernel vs fp32 F.linear vs official numba (us)."""
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
    half = HalfWeightLinear(head)
    n = max(3, repeats // 20)
    us = {"fp32": 1e6 * timed(lambda: [head(x) for _ in range(n)], 3) / n,
          "aqlmkit": 1e6 * timed(lambda: [half(x) for _ in range(n)], 3) / n}
    rows.append({"shape": f"lm_head {head.out_features}x{head.in_features} (f16 weight)",
                 **{f"{k}_us": round(v, 1) for k, v in us.items()}, "official_us": None})
    return rows


def run_decode_bench(schemes: list[str], new_tokens: int = 32, prompt_len: int = 128,
                     repeats: int = 3, random: bool = False, out_dir: str | None = None,
                     micro_iters: int = 200, threads: int | None = None) -> dict:
    """Full benchmark; prints the tables and writes benchmarks/results/<date>_cpu_decode.json.

    ``threads`` pins torch's intra-op threads for every variant (on a machine shared with other
    jobs, 1 thread gives stable numbers; 2+ threads then mostly measure the scheduler)."""
    if threads:
        torch.set_num_threads(threads)
        try:  # the official kernel runs on numba's own thread pool: same thread count for all
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    model, label = base_model(random)
    result = {"machine": machine_info(), "model": label, "new_tokens": new_tokens,
              "prompt_len": prompt_len, "repeats": repeats, "schemes": {}}
    print(f"model: {label}; threads {torch.get_num_threads()}; load {os.getloadavg()}")
    fp32 = decode_speed(model, new_tokens, prompt_len, repeats)
    result["fp32"] = fp32
    print(f"fp32: {fp32['decode_tok_s']:.1f} tok/s decode, {fp32['prompt_tok_s']:.0f} tok/s prompt")
    for name in schemes:
        s = Scheme.parse(name)
        entry = {}
        for variant, official, half in VARIANTS:
            if official and s.nbits_per_codebook != 8:
                continue
            qm = quantize_random(model, s, official, half)
            entry[variant] = decode_speed(qm, new_tokens, prompt_len, repeats)
            del qm
        entry["layers"] = layer_micro(model, s, micro_iters)
        result["schemes"][name] = entry
        print_scheme(name, entry, fp32)
    result["machine"]["loadavg_end"] = os.getloadavg()
    repo = Path(__file__).resolve().parents[3]  # the checkout, when installed editable
    out = Path(out_dir or (repo if (repo / "benchmarks").is_dir() else Path.cwd()) / "benchmarks" / "results")
    path = out / f"{dt.date.today().isoformat()}_cpu_decode.json"
    atomic_save_json(path, result)
    print(f"wrote {path}")
    return result


def print_scheme(name: str, e: dict, fp32: dict) -> None:
    print(f"\n== {name} ==  {'variant':16s} {'decode tok/s':>12s} {'x fp32':>7s} {'x official':>10s} "
          f"{'prompt tok/s':>12s}")
    off = e.get("official", {}).get("decode_tok_s")
    for v, _, _ in VARIANTS:
        if v in e:
            d = e[v]["decode_tok_s"]
            ro = f"{d / off:10.2f}" if off else f"{'-':>10s}"
            print(f"{'':12s}{v:16s} {d:12.1f} {d / fp32['decode_tok_s']:7.2f} {ro} {e[v]['prompt_tok_s']:12.0f}")
    print("  (aqlmkit+f16head: lm_head weight stored fp16 as in AQLM checkpoints; fp32 math)")
    print(f"  per layer, batch 1 (us/call): {'shape':>10s} {'fp32':>8s} {'aqlmkit':>8s} {'official':>9s}")
    for r in e["layers"]:
        off_us = "-" if r["official_us"] is None else f"{r['official_us']:.1f}"
        print(f"  {'':20s}{r['shape']:>20s} {r['fp32_us']:8.1f} {r['aqlmkit_us']:8.1f} {off_us:>9s}")
