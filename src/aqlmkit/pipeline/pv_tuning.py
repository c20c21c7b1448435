"""PV-tuning's V-step (Malinovskii et al. 2024, arXiv 2405.14852) for AQLM layers.

The P-step (Adam on codebooks/scales/norms) cannot move codes. The V-step linearizes the loss
around the current dequantized weight W: minimizing <g, W'-W> + ||W'-W||²/(2η) over representable
W' is the projection of the target T = W - ηg onto the code set. We solve it by greedy coordinate
search over the K codebooks (one codebook at a time, the others fixed) and keep only the
``max_change`` fraction of groups whose objective improves most: the paper's small-subspace
update, which keeps each step inside the region where the linearization holds.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aqlmkit.kernels.reference import unsigned_codes
from aqlmkit.nn import QuantizedLinear
from aqlmkit.nn.linear import pack_codes


@dataclass
class VStepConfig:
    lr: float = 0.3          # step in units of rms(W) along g/rms(g)
    max_change: float = 0.05  # fraction of code groups that may change per V-step
    every: int = 10          # P-steps between V-steps


@contextlib.contextmanager
def dense_weights(model: nn.Module):
    """Make each QuantizedLinear run on a dense leaf W (requires_grad) so backward yields dL/dW."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for m in layers:
        m._dense = m.dequantize().detach().float().requires_grad_(True)
        m.forward = (lambda mod: lambda x: F.linear(x, mod._dense.to(x.dtype),
                                                    None if mod.bias is None else mod.bias.to(x.dtype)))(m)
    try:
        yield layers
    finally:
        for m in layers:
            del m.forward
            m._dense = None


def _units(t: torch.Tensor, og: int, g: int) -> torch.Tensor:
    """[out, in] -> [out/og, in/g, og*g] matching codes' layout."""
    o, i = t.shape
    return t.reshape(o // og, og, i // g, g).permute(0, 2, 1, 3).reshape(o // og, i // g, og * g)


@torch.no_grad()
def v_step_layer(layer: QuantizedLinear, grad: torch.Tensor, cfg: VStepConfig) -> int:
    """Update ``layer.codes`` in place; returns the number of code groups changed."""
    k_books, size, og, g = layer.codebooks.shape
    nbits = size.bit_length() - 1
    w = layer.dequantize().float()
    step = cfg.lr * w.pow(2).mean().sqrt() / grad.pow(2).mean().sqrt().clamp_min(1e-30)
    scales = layer.scales.float().reshape(-1, 1, 1)
    target = _units(w - step * grad.float(), og, g) / scales           # [U, J, D] in codebook units
    books = layer.codebooks.float().reshape(k_books, size, og * g)
    codes = unsigned_codes(layer.codes, nbits)                        # [U, J, K]
    new = codes.clone()
    recon = sum(books[k][new[..., k]] for k in range(k_books))
    for k in range(k_books):
        resid = target - (recon - books[k][new[..., k]])
        dist = -2 * resid @ books[k].T + books[k].pow(2).sum(-1)       # ||r - c||² - ||r||²
        new[..., k] = dist.argmin(-1)
        recon = (target - resid) + books[k][new[..., k]]              # others + new codeword
    old_recon = sum(books[k][codes[..., k]] for k in range(k_books))
    sc2 = scales.pow(2)
    gain = ((target - old_recon).pow(2).sum(-1) - (target - recon).pow(2).sum(-1)) * sc2[..., 0]
    n_allowed = int(cfg.max_change * gain.numel())
    if n_allowed < 1:
        return 0
    flat = gain.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    top = flat.topk(n_allowed).indices
    keep[top[flat[top] > 0]] = True
    keep = keep.view_as(gain)
    final = torch.where(keep[..., None], new, codes)
    layer.codes.data = pack_codes(final, nbits).to(layer.codes.device)
    return int(keep.sum())
