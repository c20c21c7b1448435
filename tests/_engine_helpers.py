"""Shared fixtures for the engine tests: small layers with realistic (LLM-like) Hessians."""
from __future__ import annotations

import torch


def realistic_hessian(n_in: int, n_tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """H = XᵀX/n for activations with a power-law spectrum and a few 10x outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, n_in, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=gen))
    spectrum = torch.arange(1, n_in + 1, dtype=torch.float32) ** -0.8
    outliers = torch.where(torch.rand(n_in, generator=gen) < 0.02, 10.0, 1.0)
    x = ((z * spectrum) @ q.T) * outliers
    return x.T @ x / n_tokens


def random_weight(n_out: int, n_in: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.02
