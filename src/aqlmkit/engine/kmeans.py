"""Codebook initialisation: residual k-means weighted by diag(H).

Codebook k is fit on what codebooks < k left unexplained (as in AQLM's init). Unlike plain
k-means, each coordinate of a point is weighted by the matching diagonal entry of H, so input
channels with large activations (which dominate the output error) are fit more closely. Large
codebooks (1x16 = 65536 centroids) are handled by fitting on a seeded sample of points and
computing distances in chunks, never materialising [points, centroids] for all points at once.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from aqlmkit.engine.layout import decode, lookup, row_argmin


def chunk_rows(n_cols: int, budget: int) -> int:
    """How many rows of a [rows, n_cols] temporary fit in ``budget`` elements (at least 1)."""
    return max(1, budget // max(1, n_cols))


def element_budget(device: torch.device) -> int:
    """Temporaries per chunk: ~1 GiB fp32 on GPUs, 16 MiB on CPU (cache friendly)."""
    return 1 << 28 if device.type == "cuda" else 1 << 22


def assign(points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid under the weighted distance Σ_a w_a (x_a - c_a)², in chunks."""
    rhs = torch.cat([-2.0 * centroids, centroids.square()], dim=1).T.contiguous()  # [2D, n]
    step = chunk_rows(centroids.shape[0], element_budget(points.device))
    out = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    for i in range(0, points.shape[0], step):
        x, w = points[i:i + step], weights[i:i + step]
        out[i:i + step] = row_argmin(torch.cat([w * x, w], dim=1) @ rhs)
    return out


def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, iters: int,
                    gen: torch.Generator) -> torch.Tensor:
    """Lloyd's algorithm with per-coordinate weights; empty clusters keep their last centroid."""
    n = points.shape[0]
    if n >= k:
        init = torch.randperm(n, generator=gen)[:k]
        centroids = points[init.to(points.device)].clone()
    else:  # fewer points than codewords (tiny layers, 1x16): every point is a centroid, exactly;
        # the spare codewords are jittered copies that the code search may still use
        init = torch.randint(n, (k,), generator=gen)
        noise = torch.randn(k, points.shape[1], generator=gen).to(points.device)
        centroids = points[init.to(points.device)] + 1e-3 * points.std() * noise
        centroids[:n] = points
        return centroids
    for _ in range(iters):
        idx = assign(points, weights, centroids)
        num = torch.zeros_like(centroids).index_add_(0, idx, weights * points)
        den = torch.zeros_like(centroids).index_add_(0, idx, weights)
        filled = den > 0
        centroids = torch.where(filled, num / den.clamp_min(1e-30), centroids)
    return centroids


def residual_kmeans_init(units: torch.Tensor, coord_weights: torch.Tensor, num_codebooks: int,
                         codebook_size: int, iters: int, max_points: int | None, seed: int,
                         progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit K codebooks on residuals of normalised weights.

    units: [U, J, D] normalised weights; coord_weights: [J, D] importance of each coordinate.
    Returns codes [U, J, K] (int64) and codebooks [K, n, D].
    """
    n_u, n_j, dim = units.shape
    gen = torch.Generator().manual_seed(seed)
    points = units.reshape(-1, dim)
    weights = coord_weights.unsqueeze(0).expand(n_u, n_j, dim).reshape(-1, dim)
    residual = points.clone()
    books, codes = [], []
    for _ in tqdm(range(num_codebooks), desc="k-means init", leave=False, disable=not progress):
        sample = None
        if max_points is not None and residual.shape[0] > max_points:
            sample = torch.randperm(residual.shape[0], generator=gen)[:max_points].to(units.device)
        fit_x = residual if sample is None else residual[sample]
        fit_w = weights if sample is None else weights[sample]
        book = weighted_kmeans(fit_x, fit_w, codebook_size, iters, gen)
        idx = assign(residual, weights, book)
        residual -= lookup(book, idx)
        books.append(book)
        codes.append(idx)
    codes_t = torch.stack(codes, dim=1).reshape(n_u, n_j, num_codebooks)
    return codes_t, torch.stack(books)


def refit_check(units: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> float:
    """Relative Euclidean error of the init (debug/telemetry helper)."""
    rec = decode(codes, codebooks)
    return float((rec - units).square().sum() / units.square().sum().clamp_min(1e-30))
