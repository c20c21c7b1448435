"""Code search and codebook update against brute force and invariants."""
from __future__ import annotations

import itertools

import pytest
import torch

from _engine_helpers import random_weight, realistic_hessian
from aqlmkit.config import Scheme
from aqlmkit.engine import code_search, kmeans
from aqlmkit.engine.code_search import beam_search_codes
from aqlmkit.engine.codebook_update import CodebookAdam
from aqlmkit.engine.layout import decode, from_units, hessian_blocks, to_units


def _setup(scheme: Scheme, n_out: int, n_in: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w, h = random_weight(n_out, n_in, seed), realistic_hessian(n_in, 256, seed)
    n_u, n_j = n_out // scheme.out_group_size, n_in // scheme.in_group_size
    dim = scheme.in_group_size * scheme.out_group_size
    books = torch.randn(scheme.num_codebooks, scheme.codebook_size, dim, generator=gen) * 0.02
    codes = torch.randint(scheme.codebook_size, (n_u, n_j, scheme.num_codebooks), generator=gen)
    scales = torch.rand(n_u, generator=gen) + 0.5
    return w, h, books, codes, scales


def _errors(w, h, codes, books, scales, scheme):
    """Per-unit tr(ΔHΔᵀ)."""
    delta = from_units(scales.view(-1, 1, 1) * decode(codes, books), scheme) - w
    per_row = ((delta @ h) * delta).sum(1)
    return per_row.view(-1, scheme.out_group_size).sum(1)


def _search(w, h, codes, books, scales, scheme, beam):
    return beam_search_codes(to_units(w, scheme), h, hessian_blocks(h, scheme), codes, books,
                             scales, scheme, beam)


@pytest.mark.parametrize("scheme", ["1x4g4", "2x3g4", "1x3g2o2"])
def test_single_group_matches_brute_force(scheme):
    """With one in-group and beam >= 2^B, beam search is exhaustive: it must find the optimum."""
    s = Scheme.parse(scheme)
    w, h, books, codes, scales = _setup(s, 6, s.in_group_size)
    new = _search(w, h, codes, books, scales, s, beam=s.codebook_size)
    best = torch.full((codes.shape[0],), float("inf"))
    for combo in itertools.product(range(s.codebook_size), repeat=s.num_codebooks):
        trial = torch.tensor(combo).view(1, 1, -1).expand_as(codes)
        best = torch.minimum(best, _errors(w, h, trial, books, scales, s))
    got = _errors(w, h, new, books, scales, s)
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("scheme", ["2x4g4", "1x6g8", "2x3g2o2"])
def test_search_never_increases_error(scheme, beam):
    s = Scheme.parse(scheme)
    w, h, books, codes, scales = _setup(s, 12, 24, seed=beam)
    before = _errors(w, h, codes, books, scales, s)
    new = _search(w, h, codes, books, scales, s, beam)
    after = _errors(w, h, new, books, scales, s)
    assert (after <= before * (1 + 1e-5) + 1e-9).all()
    assert after.sum() < before.sum() * 0.9


def test_greedy_step_is_exact_coordinate_minimum():
    """After a sweep no single code change (last group, any codebook) improves the error."""
    s = Scheme.parse("2x3g4")
    w, h, books, codes, scales = _setup(s, 5, 12)
    new = _search(w, h, codes, books, scales, s, beam=1)
    base = _errors(w, h, new, books, scales, s)
    j, k = new.shape[1] - 1, s.num_codebooks - 1
    for i in range(s.codebook_size):
        trial = new.clone()
        trial[:, j, k] = i
        assert (_errors(w, h, trial, books, scales, s) >= base * (1 - 1e-5) - 1e-9).all()


def test_beam_not_worse_than_greedy_on_average():
    s = Scheme.parse("2x4g4")
    w, h, books, codes, scales = _setup(s, 32, 32, seed=5)
    greedy = _errors(w, h, _search(w, h, codes, books, scales, s, 1), books, scales, s).sum()
    beam = _errors(w, h, _search(w, h, codes, books, scales, s, 4), books, scales, s).sum()
    assert beam <= greedy * 1.02


@pytest.mark.parametrize("beam", [1, 2])
def test_chunking_does_not_change_result(monkeypatch, beam):
    s = Scheme.parse("1x6g4")
    w, h, books, codes, scales = _setup(s, 20, 16)
    full = _search(w, h, codes, books, scales, s, beam)
    monkeypatch.setattr(code_search, "element_budget", lambda device: 64)  # 1 unit per chunk
    chunked = _search(w, h, codes, books, scales, s, beam)
    assert torch.equal(full, chunked)


def test_kmeans_chunked_assignment(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, wt, c = torch.randn(50, 4, generator=gen), torch.rand(50, 4, generator=gen), torch.randn(7, 4, generator=gen)
    brute = (wt.unsqueeze(1) * (x.unsqueeze(1) - c).square()).sum(-1).argmin(1)
    monkeypatch.setattr(kmeans, "element_budget", lambda device: 20)
    assert torch.equal(kmeans.assign(x, wt, c), brute)


def test_weighted_kmeans_decreases_distortion():
    gen = torch.Generator().manual_seed(1)
    x, wt = torch.randn(400, 4, generator=gen), torch.rand(400, 4, generator=gen) + 0.1

    def distortion(c):
        return float((wt * (x - c[kmeans.assign(x, wt, c)]).square()).sum())

    c1 = kmeans.weighted_kmeans(x, wt, 16, 1, torch.Generator().manual_seed(2))
    c20 = kmeans.weighted_kmeans(x, wt, 16, 20, torch.Generator().manual_seed(2))
    assert distortion(c20) < distortion(c1)


def test_adam_gradient_matches_autograd_and_descends():
    s = Scheme.parse("2x3g4o2")
    w, h, books, codes, scales = _setup(s, 8, 12)
    adam = CodebookAdam(books, scales, lr=1e-3)
    flat = adam._flat_index(codes, books.shape[-1])
    loss = adam._loss_and_grads(w, h, codes, flat, s)
    b, sc = books.clone().requires_grad_(), scales.clone().requires_grad_()
    ref = _errors(w, h, codes, b, sc, s).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(adam.books.grad, b.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(adam.scales.grad, sc.grad, rtol=1e-4, atol=1e-7)
    _, _, best = CodebookAdam(books, scales, lr=1e-3).run(w, h, codes, s, steps=30)
    assert best < float(ref.detach()) * 0.9


def test_lazy_block_updates_match_eager():
    """GPTQ-style lazy RH updates in the greedy sweep give the same codes as eager updates."""
    s = Scheme.parse("2x4g4")
    w, h, books, codes, scales = _setup(s, 10, 40, seed=9)
    w_units, hb = to_units(w, s), hessian_blocks(h, s)
    results = []
    for block in (1, 3, 16):
        c = codes.clone()
        res = from_units(w_units - scales.view(-1, 1, 1) * decode(c, books), s)
        code_search._greedy_chunk(code_search._Sweep(h, hb, books, s), (res @ h).view(10, 1, 40),
                                  c, scales, block=block)
        results.append(c)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
