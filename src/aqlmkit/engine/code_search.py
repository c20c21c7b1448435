"""Code update: H-aware beam search over codewords (AQLM §3.2), swept group by group.

Output units (out-groups) are independent under tr(ΔHΔᵀ), but in-groups of one unit interact
through the off-diagonal blocks of H. So we sweep the in-groups in order (Gauss-Seidel) and keep
RH = (W - Ŵ)·H up to date with a rank-g update after each change. Replacing codebook k's codeword
u by v in group j changes the error by exactly

    Δ(v) = 2 s (u - v)·RH_j + s² (u - v) H_jj (u - v)ᵀ,

which for all v at once is one [units, D] x [D, 2^B] matmul. With beam > 1 each unit keeps the
``beam`` best full code assignments; duplicates are removed with Zobrist hashes. Units are
processed in chunks so temporaries stay within a fixed element budget (1x16 never builds
[units, groups, 2^16]).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from aqlmkit.config import Scheme
from aqlmkit.engine.kmeans import chunk_rows, element_budget
from aqlmkit.engine.layout import decode, from_units, lookup, row_argmin


def _mix(x: torch.Tensor) -> torch.Tensor:
    """64-bit integer hash (splitmix-like; wrapping multiplication is intended)."""
    x = (x ^ (x >> 31)) * 0x7FB5D329728EA185
    x = (x ^ (x >> 27)) * 0x1B03738712FAD5C9
    return x ^ (x >> 33)


def _zobrist(j: int, k: int, idx: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    return _mix(((j * num_codebooks + k) << 20) + idx + 1)


def _full_hash(codes: torch.Tensor) -> torch.Tensor:
    """Σ_j,k z(j, k, code) for codes [..., J, K] (int64, wrapping)."""
    n_j, n_k = codes.shape[-2:]
    pos = torch.arange(n_j * n_k, device=codes.device).view(n_j, n_k)
    return _mix((pos << 20) + codes + 1).sum(dim=(-1, -2))


class _Sweep:
    """Shared, chunk-independent data of one code-search sweep."""

    def __init__(self, hessian, hblocks, codebooks, scheme: Scheme):
        self.h = hessian
        self.hb = hblocks
        self.books = codebooks                       # [K, n, D]
        self.books_t = codebooks.transpose(1, 2).contiguous()  # [K, D, n]
        self.g, self.og = scheme.in_group_size, scheme.out_group_size

    def quad(self, j: int, k: int) -> torch.Tensor:
        """v H_jj vᵀ for every codeword v of codebook k: [n]."""
        c = self.books[k]
        return ((c @ self.hb[j]) * c).sum(-1)


def _greedy_chunk(sw: _Sweep, rh: torch.Tensor, codes: torch.Tensor, s: torch.Tensor,
                  block: int = 16) -> None:
    """beam = 1: per (group, codebook) the exact argmin; updates ``codes`` in place.

    RH is updated lazily as in GPTQ: inside a block of ``block`` in-groups only the block's own
    columns are kept current; the rest receive the block's accumulated change in one matmul.
    Columns of groups already visited are not needed again in this sweep.
    """
    n_u, n_j, n_k = codes.shape
    g, og, dim, n_in = sw.g, sw.og, sw.g * sw.og, rh.shape[-1]
    inv_s = (1.0 / s).unsqueeze(1)
    for b0 in range(0, n_j, block):
        b1 = min(n_j, b0 + block)
        cols = slice(b0 * g, b1 * g)
        width = (b1 - b0) * g
        rh_blk = rh[:, :, cols].contiguous()                       # [U, og, width]
        acc = torch.zeros_like(rh_blk)                              # Σ d over the block
        for j in range(b0, b1):
            lo = (j - b0) * g
            for k in range(n_k):
                u = lookup(sw.books[k], codes[:, j, k])             # [U, D]
                r = rh_blk[:, :, lo:lo + g].reshape(n_u, dim)
                t = torch.addmm(r * inv_s, u, sw.hb[j])             # r/s + H u
                scores = torch.addmm(sw.quad(j, k).unsqueeze(0), t, sw.books_t[k], alpha=-2.0)
                idx = row_argmin(scores)
                d = ((u - lookup(sw.books[k], idx)) * s.unsqueeze(1)).view(n_u * og, g)
                rh_blk.view(-1, width).addmm_(d, sw.h[j * g:(j + 1) * g, cols])
                acc[:, :, lo:lo + g] += d.view(n_u, og, g)
                codes[:, j, k] = idx
        if b1 < n_j:
            rest = rh.view(-1, n_in)[:, b1 * g:]
            rest.addmm_(acc.view(-1, width), sw.h[cols, b1 * g:])


def _beam_chunk(sw: _Sweep, rh: torch.Tensor, codes: torch.Tensor, s: torch.Tensor,
                beam: int) -> torch.Tensor:
    """beam > 1: keep ``beam`` full hypotheses per unit; returns the best codes [U, J, K]."""
    n_u, n_j, n_k = codes.shape
    g, og, dim, n_in = sw.g, sw.og, sw.g * sw.og, rh.shape[-1]
    n = sw.books.shape[1]
    dev = codes.device
    hyp = codes.unsqueeze(1).repeat(1, beam, 1, 1)                   # [U, Bm, J, K]
    rhb = rh.unsqueeze(1).repeat(1, beam, 1, 1)                      # [U, Bm, og, in]
    err = torch.full((n_u, beam), float("inf"), device=dev, dtype=rh.dtype)
    err[:, 0] = 0.0
    hsh = _full_hash(hyp)
    later = torch.ones(beam, beam, dtype=torch.bool, device=dev).triu(1)  # h < h'
    s1, s2 = s.view(-1, 1), s.square().view(-1, 1)
    for j in range(n_j):
        sl = slice(j * g, (j + 1) * g)
        for k in range(n_k):
            cur = hyp[:, :, j, k]
            u = lookup(sw.books[k], cur)                             # [U, Bm, D]
            r = rhb[..., sl].reshape(n_u, beam, dim)
            hu = u @ sw.hb[j]
            const = s2 * (2.0 * (u * r).sum(-1) / s1 + (u * hu).sum(-1))
            t = (r / s1.unsqueeze(-1) + hu).view(-1, dim)
            part = torch.addmm(sw.quad(j, k).unsqueeze(0), t, sw.books_t[k], alpha=-2.0)
            scores = (err + const).unsqueeze(-1) + s2.unsqueeze(-1) * part.view(n_u, beam, n)
            partial = hsh - _zobrist(j, k, cur, n_k)
            dup = ((partial.unsqueeze(2) == partial.unsqueeze(1)) & later).any(dim=1)
            scores.masked_fill_(dup.unsqueeze(-1), float("inf"))
            err, pos = scores.view(n_u, beam * n).topk(beam, dim=1, largest=False)
            parent, idx = pos // n, pos % n
            hyp = hyp.gather(1, parent.view(n_u, beam, 1, 1).expand(-1, -1, n_j, n_k)).clone()
            hyp[:, :, j, k] = idx
            u_p = u.gather(1, parent.unsqueeze(-1).expand(-1, -1, dim))
            d = (u_p - lookup(sw.books[k], idx)) * s1.unsqueeze(-1)
            rhb = rhb.gather(1, parent.view(n_u, beam, 1, 1).expand(-1, -1, og, n_in))
            rhb.view(-1, n_in).addmm_(d.reshape(-1, g), sw.h[sl])
            hsh = partial.gather(1, parent) + _zobrist(j, k, idx, n_k)
    best = err.argmin(dim=1)
    return hyp[torch.arange(n_u, device=dev), best]


@torch.no_grad()
def beam_search_codes(w_units: torch.Tensor, hessian: torch.Tensor, hblocks: torch.Tensor,
                      codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                      scheme: Scheme, beam: int = 1, progress: bool = False) -> torch.Tensor:
    """One Gauss-Seidel sweep of exact code updates; returns new codes [U, J, K] (int64).

    w_units [U, J, D] original weight, codes/codebooks/scales the current reconstruction
    Ŵ = s · Σ_k C_k[codes]. The error never increases (the current code is always a candidate).
    """
    n_u = w_units.shape[0]
    n_in = hessian.shape[0]
    sw = _Sweep(hessian, hblocks, codebooks, scheme)
    width = beam * max(codebooks.shape[1], scheme.out_group_size * n_in)
    step = chunk_rows(width, element_budget(w_units.device))
    out = codes.clone()
    for a in tqdm(range(0, n_u, step), desc="code search", leave=False, disable=not progress):
        c, s = out[a:a + step], scales[a:a + step]
        res = from_units(w_units[a:a + step] - s.view(-1, 1, 1) * decode(c, codebooks), scheme)
        rh = (res @ hessian).view(c.shape[0], scheme.out_group_size, n_in)
        if beam == 1:
            _greedy_chunk(sw, rh, c, s)
        else:
            out[a:a + step] = _beam_chunk(sw, rh, c, s, beam)
    return out
