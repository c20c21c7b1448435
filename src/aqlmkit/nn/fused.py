"""Sibling fusion: q/k/v (and gate/up) QuantizedLinears that read the same input run as one launch.

Why: at batch-1 decode a 4096x4096 AQLM layer is bound by fixed costs (one wave, table build,
epilogue launch: ~10 us where streaming its 4 MiB of codes takes < 1 us), so three such layers in
one launch cost little more than one. The model code is left as it is (``self.q_proj(x)``,
``self.k_proj(x)``, ...): the first sibling's call computes every sibling's output with one
kernel launch (one grid, each block serving one layer with that layer's codes, codebooks,
scales and bias) and hands the others theirs when they are called with the same input tensor.
A sibling called with any other input, or out of order, computes its own output as before, so a
model that does not call its siblings back to back stays correct, just unfused.

Only where it pays: CUDA inputs, 1..16 rows (decode), no autograd, a scheme with a specialised
kernel; prefill and training run each layer on its own. :func:`fuse_siblings` is chosen at load
time for checkpoints whose siblings share a scheme (and in_features, dtype, device).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from aqlmkit.nn.linear import QuantizedLinear

# Sibling names of the decoder families we load (HF Llama/Mistral/Qwen/Gemma/Phi-3 style, and
# Mixtral-style experts, whose w1 (gate) is called before w3 (up)).
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                               ("w1", "w3"))
MAX_SIBLINGS = 3  # kMaxSiblings in csrc/aqlm_cuda.h


class SiblingGroup:
    """Layers that share an input; the leader (first) computes all of them in one call."""

    def __init__(self, layers: Sequence[QuantizedLinear]) -> None:
        self.layers = list(layers)
        self.pending: tuple | None = None  # (x, x's version, outputs) of the last fused call

    def forward(self, layer: QuantizedLinear, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """This sibling's output, or None when the caller should compute it alone."""
        if index == 0:
            if not self._applies(x):
                return None
            from aqlmkit.kernels import cuda

            ys = cuda.run_group(x, [(m.codes, m.codebooks, m.scales, m.bias) for m in self.layers])
            self.pending = (x, _version(x), ys)
            return ys[0]
        p = self.pending
        if p is None or p[0] is not x or p[1] != _version(x):
            return None
        if index == len(self.layers) - 1:
            self.pending = None  # the last sibling: drop the references to x and the outputs
        return p[2][index]

    def _applies(self, x: torch.Tensor) -> bool:
        if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] == 0:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(
                m.codebooks.requires_grad or m.scales.requires_grad
                or (m.bias is not None and m.bias.requires_grad) for m in self.layers)):
            return False
        rows = x.numel() // x.shape[-1]
        if not 1 <= rows <= 16:  # decode sizes (prefill: each layer dequantizes on its own)
            return False
        from aqlmkit import kernels

        lead = self.layers[0]
        return kernels.select(x, lead.codes, lead.codebooks) == "cuda"


def _version(x: torch.Tensor) -> int:
    """x's version counter, so an in-place edit of x between the siblings' calls is noticed.
    Traced steps (torch.compile) and inference tensors (torch.inference_mode) have none: there
    the same tensor object between the back-to-back sibling calls is taken as the same input."""
    if torch.compiler.is_compiling() or x.is_inference():
        return -1
    return x._version


def _compatible(layers: Sequence[QuantizedLinear]) -> bool:
    from aqlmkit.kernels import cuda

    lead = layers[0]
    if lead.scheme.out_group_size != 1 or cuda.scheme_key(lead.codebooks) not in cuda.GEMV_SCHEMES:
        return False
    return all(m.scheme == lead.scheme and m.in_features == lead.in_features
               and m.codebooks.dtype == lead.codebooks.dtype and m.codes.dtype == lead.codes.dtype
               and m.codes.device == lead.codes.device for m in layers)


def fuse_siblings(model: nn.Module, groups: Iterable[Sequence[str]] = DEFAULT_GROUPS) -> int:
    """Group every module's sibling QuantizedLinears (e.g. its q_proj/k_proj/v_proj) that share a
    scheme; returns how many groups were made. Call after loading (and after ``.to(device)``);
    :func:`unfuse_siblings` undoes it. Harmless on CPU (the fused path only takes CUDA inputs)."""
    groups = [tuple(g) for g in groups]
    for g in groups:
        if not 2 <= len(g) <= MAX_SIBLINGS:
            raise ValueError(f"a sibling group has 2..{MAX_SIBLINGS} names, got {g}")
    made = 0
    for parent in model.modules():
        for names in groups:
            layers = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, QuantizedLinear) for m in layers):
                continue
            if any(m._siblings is not None for m in layers) or not _compatible(layers):
                continue
            group = SiblingGroup(layers)
            for i, m in enumerate(layers):
                m._siblings, m._sibling_index = group, i
            made += 1
    return made


def unfuse_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings`; returns how many layers were ungrouped."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m._siblings is not None:
            m._siblings, m._sibling_index = None, 0
            n += 1
    return n


__all__ = ["SiblingGroup", "fuse_siblings", "unfuse_siblings", "DEFAULT_GROUPS"]
