"""The model card (README.md) of an AQLM checkpoint, and the numbers it reports."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.models.moe import has_unfused_experts
from aqlmkit.nn import QuantizedLinear


def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def average_bits(model: nn.Module) -> float:
    """Storage bits per weight over the quantized linears (codebooks and scales included)."""
    bits = weights = 0.0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            n = m.in_features * m.out_features
            bits += m.bits_per_weight * n
            weights += n
    return bits / max(weights, 1)


def model_card(scheme: Scheme, model: nn.Module, card: dict | None) -> str:
    card = dict(card or {})
    base = card.pop("base_model", getattr(model.config, "_name_or_path", "") or "unknown")
    code_bits = scheme.num_codebooks * scheme.nbits_per_codebook / (scheme.in_group_size * scheme.out_group_size)
    lines = [
        "---", "library_name: transformers", "tags: [aqlm, quantized, aqlmkit]", "---", "",
        f"# {Path(str(base)).name or base} — AQLM {scheme.name}", "",
        f"Quantized with [aqlmkit](https://arxiv.org/abs/2401.06118) (Additive Quantization of Language "
        f"Models): {scheme.num_codebooks} codebook(s) of 2^{scheme.nbits_per_codebook} codewords over "
        f"groups of {scheme.in_group_size} weights.", "",
        "| field | value |", "|---|---|",
        f"| base model | {base} |",
        f"| scheme | {scheme.name} |",
        f"| code bits per weight | {code_bits:.3f} |",
        f"| average bits per weight (codes + codebooks + scales) | {average_bits(model):.3f} |",
        f"| quantized linears | {len(quantized_names(model))} |",
    ]
    if "perplexity" in card:
        lines.append(f"| perplexity | {card.pop('perplexity')} |")
    lines += [f"| {k} | {v} |" for k, v in card.items()]
    lines += ["", _loading_note(model), ""]
    return "\n".join(lines)


def _loading_note(model: nn.Module) -> str:
    if not has_unfused_experts(model):
        return ("Load with `transformers.AutoModelForCausalLM.from_pretrained(path)` (needs `pip install aqlm`)"
                " or `aqlmkit.load(path)`.")
    return ("**Load with `aqlmkit.load(path)`** (or `aqlmkit.formats.aqlm_hf.load_quantized(path)`). "
            "This mixture-of-experts model was quantized one expert at a time, so its checkpoint stores "
            "`experts.{e}.gate_proj/up_proj/down_proj` codes. transformers 5 builds MoE experts as fused "
            "3-D tensors that the `aqlm` package cannot quantize: `AutoModelForCausalLM.from_pretrained` "
            "would report the per-expert tensors as UNEXPECTED and `experts.gate_up_proj`/`down_proj` as "
            "MISSING, and run with randomly initialised experts. Do not load it with plain transformers.")
