"""GPU: sibling fusion (q/k/v, gate/up in one launch), the op surface on CUDA (opcheck, autograd)
and the arch gate. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from aqlmkit.kernels import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def layer(scheme, out_f, in_f, dtype, seed, bias):
    from test_gpu_kernels import make_layer

    return make_layer(scheme, out_f, in_f, dtype, seed, bias)


def ref32(x, codes, cb, sc, bias):
    return reference.aqlm_linear(x.float(), codes, cb.float(), sc.float(),
                                 None if bias is None else bias.float())


def close(y, want, dtype):
    assert y.dtype == dtype and y.shape == want.shape and torch.isfinite(y).all()
    err = ((y.float() - want).norm() / want.norm()).item()
    assert err < (4e-3 if dtype == torch.float16 else 2e-2), err


PATH_BATCHES = {"gemv": (1, 3, 16), "lut": (1, 2, 4), "mma": (1, 9, 16, 32, 40)}


@pytest.mark.parametrize("path", ["gemv", "lut", "mma"])
@pytest.mark.parametrize("scheme", ["2x8g8", "1x8g8", "1x16g8", "1x16g16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_matches_separate_layers(path, scheme, dtype):
    """2 and 3 siblings of different heights (GQA-like k/v), bias on some, each with its own
    codebooks and scales: every output equals its own layer's reference."""
    from aqlmkit.kernels import cuda as kc

    if path == "lut" and scheme not in ("2x8g8", "1x8g8"):
        pytest.skip("lut is 1x8g8/2x8g8 only")
    in_f = 1040
    for n, outs in ((3, (520, 136, 136)), (2, (700, 333))):
        layers = [layer(scheme, o, in_f, dtype, seed=7 * i + n, bias=i % 2 == 0) for i, o in enumerate(outs)]
        for batch in PATH_BATCHES[path]:
            x = torch.randn(1, batch, in_f, device="cuda", dtype=dtype)
            ys = kc.run_group(x, layers, force=path)
            assert len(ys) == n
            for y, lay in zip(ys, layers):
                close(y, ref32(x, *lay), dtype)


def test_group_default_path_and_dequant_fallback():
    from aqlmkit.kernels import cuda as kc

    layers = [layer("2x8g8", 576, 1536, torch.float16, seed=i, bias=False) for i in range(3)]
    for batch in (1, 4, 16, 40):
        x = torch.randn(batch, 1536, device="cuda", dtype=torch.float16)
        for y, lay in zip(kc.run_group(x, layers), layers):
            close(y, ref32(x, *lay), torch.float16)


class Attn(nn.Module):
    def __init__(self, scheme, dtype, bias):
        super().__init__()
        from aqlmkit.nn import QuantizedLinear

        def q(o, seed):
            m = QuantizedLinear(512, o, scheme, bias=bias, device="cuda", dtype=dtype)
            codes, cb, sc, b = layer(scheme, o, 512, dtype, seed=seed, bias=bias)
            m.codes.data, m.codebooks.data, m.scales.data = codes, cb, sc
            if bias:
                m.bias.data = b
            return m

        self.q_proj, self.k_proj, self.v_proj = q(512, 1), q(128, 2), q(128, 3)
        self.gate_proj, self.up_proj = q(1024, 4), q(1024, 5)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return torch.cat([q, k, v, self.gate_proj(x) * self.up_proj(x)], -1)


@pytest.mark.parametrize("scheme", ["2x8g8", "1x16g8"])
def test_fused_model_equals_unfused_eager_and_compiled(scheme):
    from aqlmkit.nn.fused import fuse_siblings, unfuse_siblings

    m = Attn(scheme, torch.float16, bias=True)
    xs = [torch.randn(1, b, 512, device="cuda", dtype=torch.float16) for b in (1, 2, 5, 16, 33)]
    with torch.no_grad():
        want = [m(x) for x in xs]
        assert fuse_siblings(m) == 2
        assert m.k_proj._siblings is m.q_proj._siblings and m.up_proj._sibling_index == 1
        for x, w in zip(xs, want):
            close(m(x), w.float(), torch.float16)
            assert m.q_proj._siblings.pending is None  # the last sibling released them
        x = xs[0]
        y_k_first = m.k_proj(x)  # out of order: computed alone, still right
        close(y_k_first, m.k_proj(x.clone()).float(), torch.float16)
        cf = torch.compile(m, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            x = torch.randn(1, 1, 512, device="cuda", dtype=torch.float16)
            got = cf(x).clone()
            unfuse_siblings(m)
            close(got, m(x).float(), torch.float16)
            fuse_siblings(m)


def test_fused_path_is_one_launch():
    """q/k/v at batch 1 launch one grid (plus its epilogue) instead of three."""
    from torch.profiler import ProfilerActivity, profile

    from aqlmkit.nn.fused import fuse_siblings

    m = Attn("2x8g8", torch.float16, bias=False)
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.float16)

    def launches():
        with torch.no_grad():
            m(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                m.q_proj(x), m.k_proj(x), m.v_proj(x)
                torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type.name == "CUDA"]

    before = launches()
    fuse_siblings(m)
    after = launches()
    assert len(after) < len(before) and len(before) >= 3, (before, after)


def test_opcheck_cuda_ops():
    from aqlmkit.kernels import cuda as kc

    codes, cb, sc, bias = layer("2x8g8", 96, 256, torch.float16, seed=1, bias=True)
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    for name in ("cuda_gemv", "cuda_gemv_lut", "cuda_gemm_mma"):
        torch.library.opcheck(getattr(torch.ops.aqlmkit, name).default, (x, codes, cb, sc.reshape(-1), bias),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.aqlmkit.cuda_group_matmul.default,
                          (2, x, [codes, codes], [cb, cb], [sc.reshape(-1)] * 2, [bias, None]),
                          test_utils=("test_schema", "test_faketensor"))
    xg = x.clone().requires_grad_(True)
    cbg = cb.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.aqlmkit.aqlm_linear.default, (xg, codes, cbg, sc, bias))
    assert kc.applies("mma", 3, codes, cb, 256) == (kc.device_cc() >= 80)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autograd_through_cuda_forward(dtype):
    """LoRA/tuning on GPU: the op's fast forward and its backward match the reference's autograd."""
    codes, cb, sc, bias = layer("2x8g8", 192, 512, dtype, seed=4, bias=True)
    x = torch.randn(2, 5, 512, device="cuda", dtype=dtype, requires_grad=True)
    cb = cb.clone().requires_grad_(True)
    sc = sc.clone().requires_grad_(True)
    gy = torch.randn(2, 5, 192, device="cuda", dtype=dtype)
    y = torch.ops.aqlmkit.aqlm_linear(x, codes, cb, sc, bias)
    got = torch.autograd.grad(y, (x, cb, sc), gy)
    x32, cb32, sc32 = (t.detach().float().requires_grad_(True) for t in (x, cb, sc))
    want_y = reference.aqlm_linear(x32, codes, cb32, sc32, bias.float())
    want = torch.autograd.grad(want_y, (x32, cb32, sc32), gy.float())
    close(y, want_y.detach(), dtype)
    for g, w in zip(got, want):
        close(g, w, dtype)


def test_device_arch_is_built_with_ptx():
    from aqlmkit.kernels import cuda as kc

    cc = kc.device_cc()
    flags = kc.cuda_flags()
    assert f"-gencode=arch=compute_{cc},code=sm_{cc}" in flags
    assert f"-gencode=arch=compute_{cc},code=compute_{cc}" in flags
