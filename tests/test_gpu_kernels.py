"""CUDA kernels against the fp32 reference on fresh random inputs (GPU only; skipped elsewhere).

Covers every path (specialised batch-1..16 kernels, dequantize + cuBLAS, the dispatcher), odd
shapes, fp16/bf16, bias on/off, codes >= 2^(B-1) stored negative, and capture by CUDA graphs and
torch.compile(mode="reduce-overhead").
"""
from __future__ import annotations

import pytest
import torch

from aqlmkit.kernels import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCHEMES = {"1x16g8": (1, 16, 8), "1x16g16": (1, 16, 16), "2x8g8": (2, 8, 8), "1x8g8": (1, 8, 8),
           "2x16g8": (2, 16, 8), "3x8g4": (3, 8, 4), "2x6g8": (2, 6, 8)}
SHAPES = [(576, 1536), (1536, 576), (192, 576), (40, 96)]


def make_layer(scheme: str, out_f: int, in_f: int, dtype: torch.dtype, seed: int, bias: bool):
    k, b, g = SCHEMES[scheme]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes_u = torch.randint(0, 1 << b, (out_f, in_f // g, k), generator=gen, device="cuda")
    cdtype = torch.int8 if b <= 8 else torch.int16
    half = 1 << (cdtype.itemsize * 8 - 1)
    codes = torch.where(codes_u >= half, codes_u - 2 * half, codes_u).to(cdtype)  # two's complement
    codebooks = (torch.randn(k, 1 << b, 1, g, generator=gen, device="cuda") * 0.3).to(dtype)
    scales = (torch.rand(out_f, 1, 1, 1, generator=gen, device="cuda") + 0.5).to(dtype)
    bvec = (torch.randn(out_f, generator=gen, device="cuda")).to(dtype) if bias else None
    return codes, codebooks, scales, bvec


def ref32(x, codes, codebooks, scales, bias):
    return reference.aqlm_linear(x.float(), codes, codebooks.float(), scales.float(),
                                 None if bias is None else bias.float())


def check(y, want, dtype):
    assert y.dtype == dtype and y.shape == want.shape
    assert torch.isfinite(y).all()
    err = ((y.float() - want).norm() / want.norm()).item()
    assert err < (4e-3 if dtype == torch.float16 else 2e-2), err


def check_unaligned_and_deterministic(scheme: str, path: str, batch: int) -> None:
    """Codes at an odd address (guarded loads) give the reference result; calls agree bitwise."""
    from aqlmkit.kernels import cuda as kc

    codes, cb, sc, bias = make_layer(scheme, 520, 1024, torch.float16, seed=9, bias=True)
    store = torch.empty(codes.numel() + 1, device="cuda", dtype=codes.dtype)
    odd = store[1:].view(codes.shape)
    odd.copy_(codes)
    assert odd.data_ptr() % 16 != 0 and odd.is_contiguous()
    x = torch.randn(batch, 1024, device="cuda", dtype=torch.float16)
    y1 = kc.run(x, odd, cb, sc, bias, force=path)
    y2 = kc.run(x, codes, cb, sc, bias, force=path)
    check(y1, ref32(x, codes, cb, sc, bias), torch.float16)
    assert torch.equal(y1, y2) and torch.equal(y2, kc.run(x, codes, cb, sc, bias, force=path))


@pytest.mark.parametrize("scheme", ["1x16g8", "1x16g16", "2x8g8", "1x8g8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_kernel_all_batches_and_shapes(scheme, dtype):
    from aqlmkit.kernels import cuda as kc

    for si, (out_f, in_f) in enumerate(SHAPES):
        g = SCHEMES[scheme][2]
        if in_f % g:
            continue
        for bi, batch in enumerate([1, 2, 3, 4, 7, 8, 11, 16]):
            bias = (bi + si) % 2 == 0
            layer = make_layer(scheme, out_f, in_f, dtype, seed=100 * si + bi, bias=bias)
            x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
            y = kc.run(x, *layer, force="gemv")
            check(y, ref32(x, *layer), dtype)


@pytest.mark.parametrize("scheme", ["1x16g16", "2x8g8"])
def test_gemv_large_input_is_chunked(scheme):
    """in=11008 at batch 16 does not fit shared memory at once: the kernel walks x in chunks."""
    from aqlmkit.kernels import cuda as kc

    layer = make_layer(scheme, 72, 11008, torch.bfloat16, seed=5, bias=True)
    x = torch.randn(16, 11008, device="cuda", dtype=torch.bfloat16)
    check(kc.run(x, *layer, force="gemv"), ref32(x, *layer), torch.bfloat16)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_matches_reference(scheme, dtype):
    from aqlmkit.kernels import cuda as kc

    codes, cb, sc, _ = make_layer(scheme, 192, 576, dtype, seed=7, bias=False)
    w = torch.ops.aqlmkit.cuda_dequant(codes, cb, sc.reshape(-1))
    want = reference.dequantize(codes, cb.float(), sc.float())
    check(w, want, dtype)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("batch", [1, 4, 7, 16, 33, 300])
def test_dispatcher_prefill_and_decode(scheme, batch):
    from aqlmkit import kernels

    dtype = torch.float16 if batch % 2 else torch.bfloat16
    layer = make_layer(scheme, 1536, 576, dtype, seed=batch, bias=batch % 3 == 0)
    x = torch.randn(1, batch, 576, device="cuda", dtype=dtype)  # 3-D input like a decoder layer
    assert kernels.select(x, layer[0], layer[1]) == "cuda"
    y = kernels.aqlm_linear(x, *layer)
    check(y, ref32(x, *layer), dtype)


def test_poisoned_output_fully_written():
    """Every output element is written (the allocator may hand back memory full of NaNs)."""
    from aqlmkit.kernels import cuda as kc

    layer = make_layer("2x8g8", 200, 96, torch.float16, seed=3, bias=False)
    junk = torch.full((1 << 20,), float("nan"), device="cuda", dtype=torch.float16)
    del junk
    x = torch.randn(5, 96, device="cuda", dtype=torch.float16)
    y = kc.run(x, *layer, force="gemv")
    check(y, ref32(x, *layer), torch.float16)


def test_cuda_graph_capture():
    from aqlmkit.kernels import cuda as kc

    layers = [make_layer(s, 576, 1536, torch.float16, seed=i, bias=True)
              for i, s in enumerate(["2x8g8", "1x16g8"])]
    x = torch.randn(1, 1536, device="cuda", dtype=torch.float16)
    for layer in layers:
        kc.run(x, *layer)  # warm-up builds/JITs outside capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        outs = [kc.run(x, *layer) for layer in layers]
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for y, layer in zip(outs, layers):
            check(y, ref32(x, *layer), torch.float16)


@pytest.mark.parametrize("path,batch", [("gemv", 1), ("lut", 3), ("mma", 12)])
def test_torch_compile_reduce_overhead(path, batch, monkeypatch):
    """Each path (pinned through AQLMKIT_CUDA_PATH's variable) traces and replays in CUDA graphs."""
    from aqlmkit import kernels
    from aqlmkit.kernels import cuda as kc

    monkeypatch.setattr(kc, "_PATH_ENV", path)
    layer = make_layer("2x8g8", 576, 1536, torch.float16, seed=11, bias=False)
    assert kc.default_path(batch, layer[0], layer[1], 1536) == path

    def f(x):
        return torch.nn.functional.silu(kernels.aqlm_linear(x, *layer))

    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        x = torch.randn(batch, 1536, device="cuda", dtype=torch.float16)
        y = cf(x).clone()
        want = torch.nn.functional.silu(ref32(x, *layer))
        check(y, want, torch.float16)


# --- split-K LUT kernel (engineer G): 1x8g8/2x8g8, batch 1..4 -----------------------------------
LUT_SHAPES = SHAPES + [(700, 2048), (333, 1544)]  # 1544/8 = 193 groups: ragged last split


@pytest.mark.parametrize("scheme", ["2x8g8", "1x8g8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lut_kernel_matches_reference(scheme, dtype):
    from aqlmkit.kernels import cuda as kc

    for si, (out_f, in_f) in enumerate(LUT_SHAPES):
        for batch in (1, 2, 3, 4):
            layer = make_layer(scheme, out_f, in_f, dtype, seed=31 * si + batch,
                               bias=(si + batch) % 2 == 0)
            x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
            y = kc.run(x, *layer, force="lut")
            check(y, ref32(x, *layer), dtype)


def test_lut_unaligned_codes_and_determinism():
    """Codes at an odd address take the guarded byte loads; repeated calls agree bit for bit."""
    check_unaligned_and_deterministic("2x8g8", "lut", batch=3)


def test_lut_dispatch_and_graph_capture(monkeypatch):
    """With the LUT enabled in the table, run() picks it for b <= 4 only; it captures in a graph."""
    from aqlmkit.kernels import cuda as kc

    layer = make_layer("2x8g8", 576, 1536, torch.float16, seed=21, bias=True)
    monkeypatch.setattr(kc, "DISPATCH", {(2, 8, 8): ((4, "lut", 0), (8, "gemv", 0))})
    monkeypatch.setattr(kc, "_PATH_ENV", "")
    assert kc.default_path(4, layer[0], layer[1], 1536) == "lut"
    assert kc.default_path(5, layer[0], layer[1], 1536) == "gemv"
    assert kc.default_path(9, layer[0], layer[1], 1536) == "dequant"
    assert not kc.applies("lut", 1, layer[0].to(torch.int16), layer[1], 1536)
    x = torch.randn(2, 1536, device="cuda", dtype=torch.float16)
    kc.run(x, *layer)  # warm-up outside capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        out = kc.run(x, *layer)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check(out, ref32(x, *layer), torch.float16)


# --- tensor-core kernel: 2x8g8, 1x8g8, 1x16g8, batch 1..16 ----------------------------------------
MMA_SHAPES = SHAPES + [(700, 2048), (333, 1552), (24, 4112)]  # ragged spans, rows not /16


@pytest.mark.parametrize("scheme", ["2x8g8", "1x8g8", "1x16g8", "1x16g16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_kernel_matches_reference(scheme, dtype):
    from aqlmkit.kernels import cuda as kc

    for si, (out_f, in_f) in enumerate(MMA_SHAPES):
        if in_f % SCHEMES[scheme][2]:
            continue
        for batch in (1, 2, 5, 8, 9, 16, 17, 32, 47):  # 17..32: 4 n-tiles; 47: two launches
            layer = make_layer(scheme, out_f, in_f, dtype, seed=17 * si + batch,
                               bias=(si + batch) % 2 == 1)
            x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
            y = kc.run(x, *layer, force="mma")
            check(y, ref32(x, *layer), dtype)


@pytest.mark.parametrize("scheme", ["2x8g8", "1x16g8", "1x16g16"])
def test_mma_unaligned_codes_and_determinism(scheme):
    """Codes at an odd address take the guarded element loads; repeated calls agree bit for bit."""
    check_unaligned_and_deterministic(scheme, "mma", batch=12)


def test_default_paths_all_batches():
    """Whatever DISPATCH picks for each scheme and batch 1..64 matches the reference."""
    from aqlmkit.kernels import cuda as kc

    for scheme in ("2x8g8", "1x8g8", "1x16g8", "1x16g16"):
        layer = make_layer(scheme, 264, 1040, torch.float16, seed=23, bias=False)
        for batch in [*range(1, 18), 24, 31, 32, 33, 64, 65]:
            x = torch.randn(batch, 1040, device="cuda", dtype=torch.float16)
            path = kc.default_path(batch, layer[0], layer[1], 1040)
            assert kc.applies(path, batch, layer[0], layer[1], 1040)
            check(kc.run(x, *layer), ref32(x, *layer), torch.float16)


@pytest.mark.parametrize("scheme", ["2x8g8", "1x8g8", "1x16g8", "1x16g16"])
def test_mma_four_ntile_kernel(scheme, monkeypatch):
    """MMA_KERNEL_BATCH = 32: batch 17..32 in one launch of the 4-n-tile kernel, 33..64 in two."""
    from aqlmkit.kernels import cuda as kc

    monkeypatch.setattr(kc, "MMA_KERNEL_BATCH", 32)
    for si, (out_f, in_f) in enumerate([(700, 2048), (333, 1552), (24, 4112)]):
        if in_f % SCHEMES[scheme][2]:
            continue
        for batch in (17, 24, 32, 47, 64):
            for dtype in (torch.float16, torch.bfloat16):
                layer = make_layer(scheme, out_f, in_f, dtype, seed=5 * si + batch, bias=batch % 2 == 0)
                x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
                check(kc.run(x, *layer, force="mma"), ref32(x, *layer), dtype)
