"""Models for the decode benchmark: the fp32 base, and its AQLM variants with random codes.

Random codes give the exact same work as trained ones (speed only, never quality). The "aqlmkit"
variant goes through save_quantized + aqlmkit.load, so it is exactly what a user loads.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from aqlmkit.config import Scheme


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


def quantize_random(model: nn.Module, s: Scheme, official: bool) -> nn.Module:
    """Copy of ``model`` with every block linear replaced by an AQLM layer (ours or official)."""
    from aqlmkit.nn import QuantizedLinear

    q = copy.deepcopy(model)
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


def saved_and_loaded(model: nn.Module, s: Scheme) -> nn.Module:
    """The quantized model as a user gets it: save_quantized (defaults), then aqlmkit.load."""
    import aqlmkit

    with tempfile.TemporaryDirectory(prefix="aqlmkit-bench-") as tmp:
        aqlmkit.save(quantize_random(model, s, official=False), None, Path(tmp) / "q", s)
        loaded, _ = aqlmkit.load(Path(tmp) / "q")
    return loaded


def build_variant(model: nn.Module, s: Scheme, variant: str) -> nn.Module:
    if variant == "aqlmkit":
        return saved_and_loaded(model, s)
    return quantize_random(model, s, official=variant == "official")


def half_copy(lin: nn.Linear) -> nn.Module:
    """An fp16-weight copy of ``lin`` as aqlmkit.load builds it (HalfLinear, fp32 math)."""
    from aqlmkit.nn import use_half_dense

    m = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    m.load_state_dict(lin.state_dict())
    m.half()
    use_half_dense(m)
    return m
