"""Scalar-quantization baselines at matched bits: RTN and GPTQ (Frantar et al. 2022).

Both use asymmetric min-max grids per group of ``group_size`` input channels with an fp16
scale and zero each, i.e. bits + 32/group_size bits per weight, and return the dequantized
weight so they can be scored with the same tr(ΔHΔᵀ) as AQLM.
"""
from __future__ import annotations

import torch

from aqlmkit.errors import AqlmkitError


def _check(w: torch.Tensor, bits: int, group_size: int) -> None:
    if w.dim() != 2:
        raise AqlmkitError(f"baseline: weight must be 2-D, got shape {tuple(w.shape)}")
    if not 1 <= bits <= 16:
        raise AqlmkitError(f"baseline: bits={bits} out of range; use 2, 3 or 4 (1..16 accepted)")
    if group_size < 1:
        raise AqlmkitError("baseline: group_size must be >= 1")


def _grid(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max (scale, zero) per row of ``block`` [rows, cols] -> [rows, 1] each."""
    maxq = (1 << bits) - 1
    lo = block.amin(dim=1, keepdim=True).clamp_max(0)
    hi = block.amax(dim=1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / maxq).clamp_min(1e-10)
    zero = torch.round(-lo / scale)
    return scale, zero


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1)
    return (q - zero) * scale


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Round-to-nearest on a per-group asymmetric grid; returns the dequantized weight."""
    _check(w, bits, group_size)
    w = w.float()
    out = torch.empty_like(w)
    for a in range(0, w.shape[1], group_size):
        block = w[:, a:a + group_size]
        scale, zero = _grid(block, bits)
        out[:, a:a + group_size] = _fake_quant(block, scale, zero, bits)
    return out


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after 1% damping (GPTQ's numerically stable form)."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = 128,
                  damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """GPTQ with lazy batch updates; group grids are fit when the group's first column is reached."""
    _check(w, bits, group_size)
    if tuple(h.shape) != (w.shape[1], w.shape[1]):
        raise AqlmkitError(f"gptq: hessian shape {tuple(h.shape)} does not match in_features={w.shape[1]}")
    w = w.detach().float().clone()
    h = h.detach().to(device=w.device, dtype=torch.float32)
    w[:, h.diagonal() == 0] = 0
    u = _inverse_cholesky(h, damp)
    q = torch.zeros_like(w)
    n_in = w.shape[1]
    scale = zero = None
    for a in range(0, n_in, block_size):
        b = min(a + block_size, n_in)
        wb, ub = w[:, a:b].clone(), u[a:b, a:b]
        err = torch.zeros_like(wb)
        for i in range(b - a):
            col = a + i
            if col % group_size == 0:
                scale, zero = _grid(w[:, col:col + group_size] if i == 0 else
                                    torch.cat([wb[:, i:], w[:, b:]], 1)[:, :group_size], bits)
            qc = _fake_quant(wb[:, i:i + 1], scale, zero, bits)
            q[:, col:col + 1] = qc
            e = (wb[:, i:i + 1] - qc) / ub[i, i]
            wb[:, i:] -= e @ ub[i:i + 1, i:]
            err[:, i:i + 1] = e
        w[:, b:] -= err @ u[a:b, b:]
    return q
