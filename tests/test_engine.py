"""quantize_linear: storage layout, round trip, determinism, input checks, quality."""
from __future__ import annotations

import math

import pytest
import torch

from _engine_helpers import random_weight, realistic_hessian
from aqlmkit.config import LayerQuantConfig, Scheme
from aqlmkit.engine import QuantizedWeight, quantize_linear, relative_error
from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels.reference import dequantize, unsigned_codes

FAST = LayerQuantConfig(max_epochs=2, steps_per_epoch=5, init_max_iter=5, init_max_points=4096)


def _run(scheme: str, n_out: int, n_in: int, cfg: LayerQuantConfig = FAST, seed: int = 0):
    w, h = random_weight(n_out, n_in, seed + 1), realistic_hessian(n_in, 512, seed)
    return w, h, quantize_linear(w, h, Scheme.parse(scheme), cfg, name="t", progress=False)


@pytest.mark.parametrize("scheme,n_out,n_in,dtype", [
    ("2x8g8", 24, 40, torch.int8),
    ("1x16g8", 10, 24, torch.int16),
    ("3x4g4", 14, 12, torch.int8),
    ("1x8g4o2", 12, 20, torch.int8),
    ("1x10g2", 6, 10, torch.int16),
])
def test_layout_and_round_trip(scheme, n_out, n_in, dtype):
    s = Scheme.parse(scheme)
    w, h, q = _run(scheme, n_out, n_in)
    assert isinstance(q, QuantizedWeight)
    og, g = s.out_group_size, s.in_group_size
    assert q.codes.shape == (n_out // og, n_in // g, s.num_codebooks) and q.codes.dtype == dtype
    assert q.codebooks.shape == (s.num_codebooks, 2 ** s.nbits_per_codebook, og, g)
    assert q.codebooks.dtype == torch.float32
    assert q.scales.shape == (n_out // og, 1, 1, 1) and q.scales.dtype == torch.float32
    approx = dequantize(q.codes, q.codebooks, q.scales)
    assert approx.shape == w.shape
    err = relative_error(w, approx, h)
    assert err == pytest.approx(q.stats["relative_error"], rel=1e-3, abs=1e-6)
    assert err < q.stats["init_relative_error"] + 1e-7
    assert err < 0.5


def test_codes_use_twos_complement():
    """B=8 codes >= 128 are stored as negative int8; unsigned view recovers them."""
    _, _, q = _run("1x8g2", 64, 32)
    raw = q.codes.to(torch.int64)
    assert (raw < 0).any() and raw.min() >= -128 and raw.max() <= 127
    idx = unsigned_codes(q.codes, 8)
    assert idx.min() >= 0 and idx.max() < 256 and (idx >= 128).any()


def test_relative_error_matches_activations():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=gen)
    w, a = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    expect = ((w - a) @ x.T).square().sum() / (w @ x.T).square().sum()
    assert relative_error(w, a, x.T @ x) == pytest.approx(float(expect), rel=1e-4)


def test_deterministic_under_seed():
    w, h = random_weight(32, 48), realistic_hessian(48, 256)
    runs = [quantize_linear(w, h, Scheme.parse("2x6g8"), FAST, progress=False) for _ in range(2)]
    assert torch.equal(runs[0].codes, runs[1].codes)
    assert torch.equal(runs[0].codebooks, runs[1].codebooks)
    assert torch.equal(runs[0].scales, runs[1].scales)
    other = quantize_linear(w, h, Scheme.parse("2x6g8"),
                            LayerQuantConfig(**{**FAST.__dict__, "seed": 7}), progress=False)
    assert not torch.equal(other.codebooks, runs[0].codebooks)


def test_more_epochs_help_and_tolerance_stops():
    w, h = random_weight(48, 64), realistic_hessian(64, 512)
    few = quantize_linear(w, h, Scheme.parse("2x6g8"), FAST, progress=False)
    more = quantize_linear(w, h, Scheme.parse("2x6g8"),
                           LayerQuantConfig(max_epochs=8, steps_per_epoch=20, init_max_iter=5,
                                            relative_mse_tolerance=0.0), progress=False)
    assert more.stats["relative_error"] < few.stats["relative_error"]
    hist = more.stats["history"]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(hist, hist[1:]))
    stop = quantize_linear(w, h, Scheme.parse("2x6g8"),
                           LayerQuantConfig(max_epochs=50, steps_per_epoch=5, init_max_iter=5,
                                            relative_mse_tolerance=0.5), progress=False)
    assert stop.stats["epochs"] < 50


def test_no_scales_scheme_keeps_unit_scales():
    w, h = random_weight(8, 16), realistic_hessian(16, 128)
    s = Scheme(1, 6, 4, scale_nbits=0)
    q = quantize_linear(w, h, s, FAST, progress=False)
    assert torch.equal(q.scales, torch.ones_like(q.scales))


def test_zero_rows_and_dead_channels():
    w, h = random_weight(16, 32), realistic_hessian(32, 256)
    w[3] = 0
    h[5, :] = 0
    h[:, 5] = 0
    q = quantize_linear(w, h, Scheme.parse("1x8g8"), FAST, progress=False)
    approx = dequantize(q.codes, q.codebooks, q.scales)
    assert torch.isfinite(approx).all()
    assert approx[3].abs().max() < 1e-6


@pytest.mark.parametrize("bad,match", [
    (lambda w, h: (w[:, :30], h[:30, :30]), "not divisible"),
    (lambda w, h: (w, h[:16, :16]), "hessian has shape"),
    (lambda w, h: (w.index_fill(1, torch.tensor([2]), math.nan), h), "weight contains NaN"),
    (lambda w, h: (w, h.index_fill(0, torch.tensor([1]), math.inf)), "hessian contains NaN"),
    (lambda w, h: (w[0], h), "2-D"),
])
def test_bad_input_names_layer(bad, match):
    w, h = bad(random_weight(8, 32), realistic_hessian(32, 64))
    with pytest.raises(AqlmkitError, match=match) as exc:
        quantize_linear(w, h, Scheme.parse("2x8g8"), FAST, name="blk.0.q_proj", progress=False)
    assert "blk.0.q_proj" in str(exc.value)


def test_more_than_16_bits_refused():
    with pytest.raises(AqlmkitError, match="out of range"):
        Scheme(1, 17, 8)
