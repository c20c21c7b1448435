"""QuantizedLinear against the reference math, the official layout, and replace_linears on meta."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels import reference
from aqlmkit.nn import QuantizedLinear, pack_codes, replace_linears


def random_qw(out_f: int, in_f: int, scheme: Scheme, gen: torch.Generator):
    s = scheme
    codes = torch.randint(0, s.codebook_size, (out_f // s.out_group_size, in_f // s.in_group_size,
                                               s.num_codebooks), generator=gen)
    codebooks = torch.randn(s.num_codebooks, s.codebook_size, s.out_group_size, s.in_group_size,
                            generator=gen)
    scales = torch.rand(out_f // s.out_group_size, 1, 1, 1, generator=gen) + 0.5
    return SimpleNamespace(codes=codes, codebooks=codebooks, scales=scales)


@pytest.mark.parametrize("scheme,out_f,in_f", [
    ("2x8g8", 24, 40), ("1x16g8", 8, 16), ("1x8g4", 12, 20), ("3x6g2o2", 6, 10), ("1x16g16", 5, 32),
])
def test_forward_matches_reference(scheme, out_f, in_f):
    gen = torch.Generator().manual_seed(hash(scheme) % 1000)
    s = Scheme.parse(scheme)
    qw = random_qw(out_f, in_f, s, gen)
    bias = torch.randn(out_f, generator=gen)
    layer = QuantizedLinear.from_quantized(qw, bias=bias)
    assert layer.codes.dtype == (torch.int8 if s.nbits_per_codebook <= 8 else torch.int16)
    assert layer.codes.shape == (out_f // s.out_group_size, in_f // s.in_group_size, s.num_codebooks)
    assert layer.scheme == s and layer.codes.requires_grad is False
    # unsigned indices survive the signed storage
    assert torch.equal(reference.unsigned_codes(layer.codes, s.nbits_per_codebook), qw.codes)
    x = torch.randn(3, 7, in_f, generator=gen)
    w = reference.dequantize(qw.codes, qw.codebooks, qw.scales)
    torch.testing.assert_close(layer.dequantize(), w)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.T + bias, rtol=1e-4, atol=1e-4)


def test_input_gradient_flows_and_codebook_grad_when_unfrozen():
    gen = torch.Generator().manual_seed(1)
    s = Scheme.parse("2x8g8")
    qw = random_qw(16, 32, s, gen)
    layer = QuantizedLinear.from_quantized(qw)
    x = torch.randn(4, 32, generator=gen, requires_grad=True)
    layer(x).square().sum().backward()
    w = reference.dequantize(qw.codes, qw.codebooks, qw.scales)
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.T).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    layer.codebooks.requires_grad_(True)
    layer(x.detach()).sum().backward()
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0


def test_pack_codes_twos_complement():
    c = torch.tensor([0, 1, 127, 128, 255])
    assert pack_codes(c, 8).tolist() == [0, 1, 127, -128, -1]
    c16 = torch.tensor([0, 32767, 32768, 65535])
    assert pack_codes(c16, 16).tolist() == [0, 32767, -32768, -1]
    assert pack_codes(torch.tensor([3, 63]), 6).tolist() == [3, 63]


def test_state_dict_matches_official_layout():
    aqlm = pytest.importorskip("aqlm")
    ours = QuantizedLinear(32, 16, "2x8g8", bias=True)
    theirs = aqlm.QuantizedLinear(32, 16, in_group_size=8, out_group_size=1, num_codebooks=2,
                                  nbits_per_codebook=8, bias=True)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    theirs.load_state_dict(a)
    ours.load_state_dict(b)


def test_replace_linears_on_meta_and_skip():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    names = replace_linears(model, "1x16g8", skip=("2.weight",))
    assert names == ["0"]
    assert isinstance(model[0], QuantizedLinear) and model[0].codes.is_meta
    assert model[0].codes.dtype == torch.int16 and model[0].bias is not None
    assert type(model[2]) is nn.Linear
    assert "1x16g8" in repr(model[0])
    assert model[0].bits_per_weight == pytest.approx(Scheme.parse("1x16g8").bits_per_weight(32, 16))


def test_bad_shapes_raise():
    with pytest.raises(AqlmkitError, match="in_group_size"):
        QuantizedLinear(10, 8, "2x8g8")
    with pytest.raises(AqlmkitError, match="codebooks"):
        QuantizedLinear.from_quantized(SimpleNamespace(codes=torch.zeros(2, 2, 3, dtype=torch.long),
                                                       codebooks=torch.zeros(2, 256, 1, 8),
                                                       scales=torch.ones(2, 1, 1, 1)))


def _op_inputs(scheme: str, out_f: int, in_f: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = Scheme.parse(scheme)
    qw = random_qw(out_f, in_f, s, gen)
    codes = pack_codes(qw.codes, s.nbits_per_codebook)
    cb = (qw.codebooks * 0.3).to(dtype).requires_grad_(True)
    sc = qw.scales.to(dtype).requires_grad_(True)
    bias = torch.randn(out_f, generator=gen).to(dtype).requires_grad_(True)
    x = torch.randn(2, 3, in_f, generator=gen).to(dtype).requires_grad_(True)
    return x, codes, cb, sc, bias


@pytest.mark.parametrize("scheme,out_f,in_f", [("2x8g8", 24, 64), ("1x16g8", 8, 32), ("3x6g2o2", 6, 10)])
def test_op_gradients_match_reference_autograd(scheme, out_f, in_f):
    """aqlmkit::aqlm_linear's backward (dequantized input grad, scatter codebook grad) equals
    autograd through the reference math, for every input that takes a gradient."""
    x, codes, cb, sc, bias = _op_inputs(scheme, out_f, in_f, seed=out_f)
    gy = torch.randn(2, 3, out_f)
    y = torch.ops.aqlmkit.aqlm_linear(x, codes, cb, sc, bias)
    got = torch.autograd.grad(y, (x, cb, sc, bias), gy)
    want_y = reference.aqlm_linear(x, codes, cb, sc, bias)
    want = torch.autograd.grad(want_y, (x, cb, sc, bias), gy)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    for g, w, name in zip(got, want, ("x", "codebooks", "scales", "bias")):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("scheme,out_f,in_f", [("2x8g8", 24, 64), ("3x6g2o2", 6, 10)])
def test_opcheck_aqlm_linear_cpu(scheme, out_f, in_f):
    """Schema, fake impl, autograd registration and AOT dispatch (dynamic shapes) of the op."""
    x, codes, cb, sc, bias = _op_inputs(scheme, out_f, in_f, seed=3)
    torch.library.opcheck(torch.ops.aqlmkit.aqlm_linear.default, (x, codes, cb, sc, bias))
    torch.library.opcheck(torch.ops.aqlmkit.aqlm_linear.default,
                          (x.detach()[0], codes, cb.detach(), sc.detach(), None))


def test_training_forward_runs_the_kernel_not_the_reference(monkeypatch):
    """LoRA-style calls (input requires grad) and codebook tuning use the fast forward."""
    from aqlmkit.kernels import cpu

    if not cpu.load():
        pytest.skip("CPU extension unavailable")
    gen = torch.Generator().manual_seed(4)
    s = Scheme.parse("2x8g8")
    qw = random_qw(16, 32, s, gen)
    layer = QuantizedLinear.from_quantized(qw)
    want = reference.dequantize(qw.codes, qw.codebooks, qw.scales)
    monkeypatch.setattr(reference, "aqlm_linear", lambda *a, **k: pytest.fail("reference forward used"))
    x = torch.randn(4, 32, generator=gen, requires_grad=True)
    layer.codebooks.requires_grad_(True)
    y = layer(x)
    torch.testing.assert_close(y, x @ want.T, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert x.grad is not None and layer.codebooks.grad.abs().sum() > 0


def test_fuse_siblings_groups_only_compatible_layers_and_keeps_cpu_outputs():
    from aqlmkit.nn.fused import fuse_siblings, unfuse_siblings

    gen = torch.Generator().manual_seed(5)

    def q(out_f, scheme="2x8g8", in_f=32):
        return QuantizedLinear.from_quantized(random_qw(out_f, in_f, Scheme.parse(scheme), gen))

    attn = nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = q(32), q(16), q(16)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = q(24, "1x16g8"), q(24, "2x8g8")  # schemes differ: not fused
    model = nn.ModuleDict({"attn": attn, "mlp": mlp})
    x = torch.randn(1, 32, generator=gen)
    with torch.no_grad():
        want = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        assert fuse_siblings(model) == 1
        assert attn.v_proj._siblings is attn.q_proj._siblings and mlp.up_proj._siblings is None
        assert fuse_siblings(model) == 0  # already grouped
        got = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]  # CPU: each runs alone
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert unfuse_siblings(model) == 3 and attn.q_proj._siblings is None
    with pytest.raises(ValueError):
        fuse_siblings(model, groups=[("q_proj",)])
