"""The one objective everything in the engine optimises and reports.

Layer output error ||(W - Ŵ)X||² equals tr((W-Ŵ) H (W-Ŵ)ᵀ) with H = XᵀX, so the engine never needs
the activations, only H. Relative error divides by tr(W H Wᵀ) so numbers compare across layers.
"""
from __future__ import annotations

import torch


def hessian_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(Δ H Δᵀ) in fp32 (a 0-dim tensor)."""
    delta = delta.float()
    return ((delta @ hessian.float()) * delta).sum()


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔHΔᵀ)/tr(WHWᵀ) with Δ = W - approx: 0 is exact, 1 is as bad as predicting zeros."""
    w = weight.float()
    num = hessian_error(w - approx.float().to(w.device), hessian.to(w.device))
    den = hessian_error(w, hessian.to(w.device)).clamp_min(torch.finfo(torch.float32).tiny)
    return float(num / den)
