"""RTN / GPTQ baselines and the quality order AQLM < GPTQ < RTN at ~2 bits."""
from __future__ import annotations

import pytest
import torch

from _engine_helpers import random_weight, realistic_hessian
from aqlmkit.config import LayerQuantConfig, Scheme
from aqlmkit.engine import quantize_linear, relative_error
from aqlmkit.engine.baselines import gptq_quantize, rtn_quantize
from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels.reference import dequantize


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_grid(bits):
    w = random_weight(7, 300)  # 300 = 2 full groups + a partial one
    q = rtn_quantize(w, bits, 128)
    for a in range(0, 300, 128):
        levels = torch.unique(q[:, a:a + 128].round(decimals=6), dim=None)
        assert q[:, a:a + 128].unique().numel() <= 7 * 2 ** bits
        assert levels.numel() >= 2
        for row in q[:, a:a + 128]:
            assert row.unique().numel() <= 2 ** bits
    err = (q - w).abs().amax(1, keepdim=True)
    rng = w.amax(1, keepdim=True) - w.amin(1, keepdim=True)
    assert (err <= rng / (2 ** bits - 1) * 0.51 + 1e-6).all()


def test_gptq_beats_rtn_on_correlated_inputs():
    w, h = random_weight(64, 256), realistic_hessian(256, 1024)
    for bits in (2, 3, 4):
        g = relative_error(w, gptq_quantize(w, h, bits, 64), h)
        r = relative_error(w, rtn_quantize(w, bits, 64), h)
        assert g < r, (bits, g, r)
    # each row of the GPTQ result still lies on a 2-bit grid per group
    q = gptq_quantize(w, h, 2, 64)
    assert max(q[i, a:a + 64].unique().numel() for i in range(64) for a in (0, 64)) <= 4


def test_gptq_lazy_batches_equal_column_by_column():
    w, h = random_weight(16, 96), realistic_hessian(96, 512)
    torch.testing.assert_close(gptq_quantize(w, h, 3, 32, block_size=32),
                               gptq_quantize(w, h, 3, 32, block_size=1), rtol=0, atol=1e-5)


def test_aqlm_beats_gptq_beats_rtn_at_two_bits():
    n_out, n_in = 192, 256
    w, h = random_weight(n_out, n_in), realistic_hessian(n_in, 2048)
    s = Scheme.parse("2x8g8")
    cfg = LayerQuantConfig(max_epochs=3, steps_per_epoch=20, init_max_iter=10, lr=1e-3)
    q = quantize_linear(w, h, s, cfg, progress=False)
    aq = relative_error(w, dequantize(q.codes, q.codebooks, q.scales), h)
    gp = relative_error(w, gptq_quantize(w, h, 2, 128), h)
    rt = relative_error(w, rtn_quantize(w, 2, 128), h)
    assert aq < gp < rt, (aq, gp, rt)


def test_baseline_bad_input():
    with pytest.raises(AqlmkitError, match="bits"):
        rtn_quantize(random_weight(4, 8), 0)
    with pytest.raises(AqlmkitError, match="hessian"):
        gptq_quantize(random_weight(4, 8), torch.eye(4), 2)
