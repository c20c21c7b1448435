"""Training precision: the fine-tuning stages train in float32 whatever dtype the model is stored in.

Adam on fp16 parameters keeps its second moment in fp16, where a squared gradient below ~6e-8
flushes to zero and eps=1e-8 rounds to 0, so the first steps divide 0 by 0 and the loss turns NaN
(seen on the H200: every block fine-tuning step of a 7B-shaped fp16 model after the first). In
bf16, an lr-sized update rounds away against the weight. What is trained here is small (the
codebooks, scales and norms of a quantized block or model; codes are integers), so the trained
module itself runs in float32 for the stage and gets its own dtypes back afterwards, tensor by
tensor (a float32 buffer such as a rotary ``inv_freq`` stays float32).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def float32_training(module: nn.Module) -> Iterator[bool]:
    """Run the body with every floating parameter and buffer of ``module`` in float32.

    Yields whether anything was cast (False for a module already all float32). Tensors are
    restored by name, so a body that moves the module (``.to(device)`` replaces buffers) is fine.
    """
    cast = {n: t.dtype for n, t in _floats(module) if t.dtype != torch.float32}
    if not cast:
        yield False
        return
    _retype(module, {n: torch.float32 for n in cast})
    try:
        yield True
    finally:
        _retype(module, cast)
        for p in module.parameters():
            p.grad = None


def _floats(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for n, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            yield n, t


@torch.no_grad()
def _retype(module: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    for n, t in _floats(module):
        if n in dtypes:
            t.data = t.data.to(dtypes[n])
    _invalidate(module)


def _invalidate(module: nn.Module) -> None:
    """Packed kernel operands of quantized layers follow their codebooks' dtype: rebuild them."""
    for m in module.modules():
        if hasattr(m, "invalidate_kernel_cache"):
            m.invalidate_kernel_cache()


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor inside tuples, lists and dicts cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj
