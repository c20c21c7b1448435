"""Dense layers whose weights stay in 16 bits while the model computes in fp32 (CPU inference).

AQLM checkpoints keep their unquantized layers (lm_head, embeddings) in fp16. Upcasting them to
fp32 on load doubles the bytes a batch-1 decode step streams for the lm_head, which on a small
model is as much as all quantized layers together. These modules keep the 16-bit tensor and
compute with fp32 activations and fp32 accumulation (``torch.ops.aqlmkit.cpu_half_linear``), so
results match the upcast model up to summation order. State-dict names and tying are unchanged:
they are ``nn.Linear``/``nn.Embedding`` subclasses that only change ``forward``.
"""
from __future__ import annotations

import torch
from torch import nn

from aqlmkit import kernels
from aqlmkit.kernels import HALF_DTYPES


class HalfLinear(nn.Linear):
    """``nn.Linear`` with a 16-bit weight and fp32 math (the fast kernel when it applies)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.half_linear(x, self.weight, self.bias)


class HalfEmbedding(nn.Embedding):
    """``nn.Embedding`` with a 16-bit table whose looked-up rows come out in ``compute_dtype``."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def half_dense_fast(device, dtype: torch.dtype) -> bool:
    """Whether 16-bit dense layers beat upcasting here: fp32 math on CPU with the kernel built."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and kernels.half_kernel_available()


def half_dense_names(model: nn.Module, subclasses: bool = False) -> set[str]:
    """Tensor names of the layers that may stay 16-bit: exact ``nn.Linear``/``nn.Embedding`` only
    (subclasses such as scaled embeddings do their own math on ``weight``); with ``subclasses``
    every unquantized linear/embedding, i.e. the tensors a checkpoint may store in 16 bits."""
    names = set()
    for prefix, m in model.named_modules():
        dense = isinstance(m, (nn.Linear, nn.Embedding)) if subclasses else type(m) in (nn.Linear, nn.Embedding)
        if dense:
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False))
    return names


def use_half_dense(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Turn every exact ``nn.Linear``/``nn.Embedding`` whose weight is fp16/bf16 into its Half
    variant, in place (parameters, tying and hooks untouched); returns the module names."""
    done = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and m.weight.dtype in HALF_DTYPES:
            m.__class__ = HalfLinear
        elif type(m) is nn.Embedding and m.weight.dtype in HALF_DTYPES:
            m.__class__ = HalfEmbedding
            m.compute_dtype = compute_dtype
        else:
            continue
        done.append(name)
    return done



def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in. ``model.dtype`` (transformers) reports the first parameter's,
    which for a model with 16-bit dense layers is the fp16 embedding table, not the math."""
    half = {id(p) for m in model.modules() if isinstance(m, (HalfLinear, HalfEmbedding))
            for p in m.parameters(recurse=False)}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in half),
                torch.float32)
