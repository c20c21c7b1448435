"""quantize_linear: AQLM's per-layer additive quantization (arXiv 2401.06118 §3).

Minimises tr((W-Ŵ) H (W-Ŵ)ᵀ) over Ŵ = s · Σ_k C_k[codes_k]: scales from row norms, residual
k-means init weighted by diag(H), then epochs of (exact beam-search code update, Adam on
codebooks + scales) until the relative improvement of an epoch drops below the tolerance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from aqlmkit.config import LayerQuantConfig, Scheme
from aqlmkit.engine.code_search import beam_search_codes
from aqlmkit.engine.codebook_update import CodebookAdam
from aqlmkit.engine.kmeans import residual_kmeans_init
from aqlmkit.engine.layout import (decode, from_units, hessian_blocks, pack_codes,
                                   storage_codebooks, storage_scales, to_units)
from aqlmkit.engine.threads import cpu_threads, exact_matmul
from aqlmkit.engine.validate import check_inputs


@dataclass
class QuantizedWeight:
    """One quantized layer in AQLM HF storage layout (see aqlmkit.kernels.reference)."""

    codes: torch.Tensor       # [out/og, in/g, K] int8 (B <= 8) / int16, two's complement
    codebooks: torch.Tensor   # [K, 2^B, og, g] fp32
    scales: torch.Tensor      # [out/og, 1, 1, 1] fp32
    stats: dict = field(default_factory=dict)


class _Objective:
    """tr(ΔHΔᵀ) and its normaliser for one layer."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor, scheme: Scheme):
        self.w, self.h, self.scheme = w, h, scheme
        self.ref = float(((w @ h) * w).sum().clamp_min(torch.finfo(torch.float32).tiny))

    def relative(self, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor) -> float:
        delta = from_units(scales.view(-1, 1, 1) * decode(codes, books), self.scheme) - self.w
        return float(((delta @ self.h) * delta).sum()) / self.ref


def _init(w_units: torch.Tensor, h: torch.Tensor, scheme: Scheme, cfg: LayerQuantConfig,
          progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales from unit norms, then residual k-means on the normalised weight."""
    n_u, n_j, dim = w_units.shape
    if scheme.scale_nbits:
        scales = w_units.square().sum(dim=(1, 2)).sqrt().clamp_min(1e-12)
    else:
        scales = torch.ones(n_u, device=w_units.device)
    diag = h.diagonal().clamp_min(0).view(n_j, 1, scheme.in_group_size)
    coord_w = diag.expand(n_j, scheme.out_group_size, scheme.in_group_size).reshape(n_j, dim)
    coord_w = coord_w / coord_w.mean().clamp_min(1e-30) + 1e-6
    codes, books = residual_kmeans_init(
        w_units / scales.view(-1, 1, 1), coord_w, scheme.num_codebooks, scheme.codebook_size,
        cfg.init_max_iter, cfg.init_max_points, cfg.seed, progress)
    return codes, books, scales


def quantize_linear(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme,
                    cfg: LayerQuantConfig, *, name: str = "", progress: bool = True) -> QuantizedWeight:
    """Quantize one linear's weight [out, in] given H = XᵀX [in, in] (fp32) on weight's device."""
    check_inputs(weight, hessian, scheme, name)
    with cpu_threads(weight.device), exact_matmul(weight.device), torch.no_grad():
        return _quantize(weight, hessian, scheme, cfg, name, progress)


def _quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, cfg: LayerQuantConfig,
              name: str, progress: bool) -> QuantizedWeight:
    t0 = time.perf_counter()
    w = weight.detach().float()
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    h = (h + h.T) * 0.5
    w_units = to_units(w, scheme)
    obj = _Objective(w, h, scheme)
    codes, books, scales = _init(w_units, h, scheme, cfg, progress)
    timing = {"init": time.perf_counter() - t0, "search": 0.0, "adam": 0.0}
    err = obj.relative(codes, books, scales)
    history = [err]
    hblocks = hessian_blocks(h, scheme)
    adam = CodebookAdam(books, scales, cfg.lr, learn_scales=bool(scheme.scale_nbits))
    bar = tqdm(range(cfg.max_epochs), desc=f"AQ {name or 'layer'}", leave=False, disable=not progress)
    bar.set_postfix(rel_err=f"{err:.4g}")
    epochs = 0
    for _ in bar:
        epochs += 1
        t1 = time.perf_counter()
        codes = beam_search_codes(w_units, h, hblocks, codes, books, scales, scheme,
                                  cfg.beam_size, progress)
        t2 = time.perf_counter()
        books, scales, loss = adam.run(w, h, codes, scheme, cfg.steps_per_epoch)
        timing["search"] += t2 - t1
        timing["adam"] += time.perf_counter() - t2
        new_err = loss / obj.ref
        history.append(new_err)
        bar.set_postfix(rel_err=f"{new_err:.4g}")
        improvement = (err - new_err) / max(err, 1e-30)
        err = new_err
        if improvement < cfg.relative_mse_tolerance:
            break
    bar.close()
    stats = {"name": name, "scheme": scheme.name, "relative_error": err,
             "init_relative_error": history[0], "epochs": epochs, "history": history,
             "seconds": time.perf_counter() - t0, "timing": timing}
    return QuantizedWeight(pack_codes(codes, scheme.nbits_per_codebook),
                           storage_codebooks(books, scheme), storage_scales(scales), stats)
