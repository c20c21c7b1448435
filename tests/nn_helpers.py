"""Test helpers for the nn/formats tests: random AQLM models built at test time (no files checked in)."""
from __future__ import annotations

import torch
from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.nn import QuantizedLinear, replace_linears


def fill_random(layer: nn.Module, gen: torch.Generator, nbits: int) -> None:
    """Random codes over the full unsigned range, small codebooks, scales near 1 (official or ours)."""
    codes = torch.randint(0, 1 << nbits, layer.codes.shape, generator=gen)
    width = torch.iinfo(layer.codes.dtype).bits
    codes = torch.where(codes >= 1 << (width - 1), codes - (1 << width), codes)
    layer.codes.data = codes.to(layer.codes.dtype)
    layer.codebooks.data = torch.randn(layer.codebooks.shape, generator=gen) * 0.05
    layer.scales.data = torch.rand(layer.scales.shape, generator=gen) + 0.5
    if layer.bias is not None:
        layer.bias.data = torch.randn(layer.bias.shape, generator=gen) * 0.01


def random_quantized(model: nn.Module, scheme: Scheme | str, skip=("lm_head",), seed: int = 0) -> nn.Module:
    """Swap the model's linears for QuantizedLinear with random contents (in place; returns model)."""
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    replace_linears(model, scheme, skip=skip)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            fill_random(m, gen, scheme.nbits_per_codebook)
    return model.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def round_dense_to_fp16(model: nn.Module) -> nn.Module:
    """Round the unquantized linears/embeddings to fp16 values (kept fp32), in place: what
    ``save_quantized`` stores by default, so a save/load round trip can be checked exactly."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                for p in m.parameters(recurse=False):
                    p.copy_(p.half().float())
    return model
