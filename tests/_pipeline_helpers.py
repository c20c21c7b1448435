"""Helpers shared by the pipeline tests: a stand-in AQ engine (used only while the real
``aqlmkit.engine.quantize_linear`` is unavailable) and fast configs."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from aqlmkit.config import CalibrationConfig, FinetuneConfig, LayerQuantConfig


def standin_quantize_linear(weight, hessian, scheme, cfg, *, name="", progress=True):
    """Residual k-means AQ (greedy, H-agnostic): real codes/codebooks/scales, just not optimal."""
    g = scheme.in_group_size
    out_f, in_f = weight.shape
    scales = weight.norm(dim=1, keepdim=True).clamp_min(1e-8) / in_f ** 0.5
    units = (weight / scales).reshape(out_f, in_f // g, g)
    gen = torch.Generator().manual_seed(cfg.seed)
    residual = units.reshape(-1, g).clone()
    codes, books = [], []
    for _ in range(scheme.num_codebooks):
        n = min(scheme.codebook_size, residual.shape[0])
        cb = residual[torch.randperm(residual.shape[0], generator=gen)[:n]].clone()
        if n < scheme.codebook_size:
            cb = torch.cat([cb, torch.zeros(scheme.codebook_size - n, g)])
        for _ in range(5):
            idx = torch.cdist(residual, cb).argmin(1)
            for c in idx.unique():
                cb[c] = residual[idx == c].mean(0)
        idx = torch.cdist(residual, cb).argmin(1)
        residual = residual - cb[idx]
        codes.append(idx.reshape(out_f, in_f // g))
        books.append(cb.reshape(scheme.codebook_size, 1, g))
    return SimpleNamespace(codes=torch.stack(codes, -1), codebooks=torch.stack(books),
                           scales=scales.reshape(out_f, 1, 1, 1), stats={})


def engine_available() -> bool:
    try:
        from aqlmkit.engine import quantize_linear  # noqa: F401
        return True
    except ImportError:
        return False


def fast_configs(nsamples=6, seqlen=32, epochs=2, device="cpu"):
    calib = CalibrationConfig(nsamples=nsamples, seqlen=seqlen, device=device)
    layer = LayerQuantConfig(max_epochs=2, steps_per_epoch=5, init_max_iter=5, beam_size=1)
    ft = FinetuneConfig(epochs=epochs, lr=1e-3, val_fraction=0.2)
    return calib, layer, ft
