"""CPU kernels vs the pure-PyTorch reference on fresh random inputs (every path, odd shapes)."""
from __future__ import annotations

import warnings

import pytest
import torch

from aqlmkit import kernels
from aqlmkit.config import Scheme
from aqlmkit.kernels import cpu, reference

SCHEMES = ["1x8g8", "2x8g8", "4x8g16", "8x8g16", "2x8g4", "1x16g8", "1x16g16"]
OPS = {
    "lut": lambda *a: torch.ops.aqlmkit.cpu_lut_linear(*a),
    "gather": lambda *a: torch.ops.aqlmkit.cpu_gather_linear(*a),
    "dequant": lambda *a: torch.ops.aqlmkit.cpu_dequant_linear(*a, 4096),  # tiny tiles: many tiles
}


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu.load():
        pytest.fail(f"CPU extension did not build: {cpu._state['loaded']}")


def make_layer(scheme: str, out_f: int, in_f: int, cb_dtype=torch.float16, seed=0):
    """Random AQLM layer in the HF storage layout: signed int8/int16 codes over the full range."""
    s = Scheme.parse(scheme)
    gen = torch.Generator().manual_seed(seed)
    nb = s.nbits_per_codebook
    lo, hi = (-(1 << (nb - 1)), 1 << (nb - 1)) if nb in (8, 16) else (0, 1 << nb)
    dt = torch.int8 if nb <= 8 else torch.int16
    codes = torch.randint(lo, hi, (out_f, in_f // s.in_group_size, s.num_codebooks), generator=gen).to(dt)
    cb = (torch.randn(s.num_codebooks, s.codebook_size, 1, s.in_group_size, generator=gen) * 0.2).to(cb_dtype)
    scales = (torch.rand(out_f, 1, 1, 1, generator=gen) + 0.5).to(cb_dtype)
    bias = torch.randn(out_f, generator=gen).to(cb_dtype)
    return codes, cb, scales, bias


def ref32(x, codes, cb, scales, bias):
    """Reference in fp32 (the kernels compute in fp32 whatever the input dtype)."""
    b = None if bias is None else bias.float()
    return reference.aqlm_linear(x.float(), codes, cb.float(), scales.float(), b)


def check(y, x, codes, cb, scales, bias):
    want = ref32(x, codes, cb, scales, bias)
    assert y.dtype == x.dtype and y.shape == want.shape
    tol = 1e-4 if x.dtype == torch.float32 else 1.6e-2
    err = (y.float() - want).abs().max() / want.abs().max()
    assert err < tol, f"relative max error {err:.2e}"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 64])
def test_paths_match_reference(scheme, rows):
    out_f, in_f = (49, 576) if rows != 64 else (192, 1536)
    codes, cb, scales, bias = make_layer(scheme, out_f, in_f, seed=rows)
    if codes.dtype == torch.int8 and codes.shape[-1] and Scheme.parse(scheme).nbits_per_codebook == 8:
        assert (codes < 0).any()  # codes >= 128 stored as negative int8 must decode right
    x = torch.randn(rows, in_f)
    for name, op in OPS.items():
        if name == "lut" and codes.dtype != torch.int8:
            continue
        check(op(x, codes, cb, scales, bias), x, codes, cb, scales, bias)
    check(cpu.run(x, codes, cb, scales, bias), x, codes, cb, scales, bias)


@pytest.mark.parametrize("scheme", ["2x8g8", "1x16g8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dtypes_bias_leading_dims(scheme, dtype, with_bias):
    codes, cb, scales, bias = make_layer(scheme, 192, 576, cb_dtype=dtype if dtype != torch.float16 else torch.float32)
    bias = bias if with_bias else None
    for shape in [(1, 1, 576), (2, 3, 576), (2, 32, 576)]:
        x = torch.randn(shape).to(dtype)
        for name, op in OPS.items():
            if name == "lut" and codes.dtype != torch.int8:
                continue
            check(op(x, codes, cb, scales, bias), x, codes, cb, scales, bias)
        y = kernels.aqlm_linear(x, codes, cb, scales, bias)
        assert kernels.select(x, codes, cb) == "cpu"
        check(y, x, codes, cb, scales, bias)


def test_odd_shapes_and_large_rows():
    for out_f, in_f, scheme in [(1536, 576, "2x8g8"), (576, 1536, "8x8g16"), (7, 24, "3x8g8"), (5, 40, "1x16g8")]:
        codes, cb, scales, bias = make_layer(scheme, out_f, in_f, cb_dtype=torch.float32)
        for rows in (1, 5, 9):
            x = torch.randn(rows, in_f)
            check(cpu.run(x, codes, cb, scales, bias), x, codes, cb, scales, bias)


def test_small_nbits_codes_are_masked():
    """B < 8 stored in int8: the kernels index 2^B-entry codebooks exactly like the reference."""
    codes, cb, scales, bias = make_layer("2x6g8", 33, 64, cb_dtype=torch.float32)
    x = torch.randn(3, 64)
    for op in OPS.values():
        check(op(x, codes, cb, scales, bias), x, codes, cb, scales, bias)


def test_path_choice():
    c8, cb8, _, _ = make_layer("2x8g8", 8, 64)
    c16, cb16, _, _ = make_layer("1x16g8", 8, 64)
    assert cpu.path_for(1, c8, cb8) == "lut"
    assert cpu.path_for(1, c16, cb16) == "gather"
    assert cpu.path_for(64, c8, cb8) == "dequant"


def test_opcheck_fake_and_schema():
    codes, cb, scales, bias = make_layer("2x8g8", 24, 64)
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.aqlmkit.cpu_lut_linear.default, (x, codes, cb, scales, bias),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.aqlmkit.cpu_dequant_linear.default, (x, codes, cb, scales, None, 4096),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_no_graph_break():
    codes, cb, scales, bias = make_layer("2x8g8", 64, 64, cb_dtype=torch.float32)
    c16, cb16, s16, _ = make_layer("1x16g8", 48, 64, cb_dtype=torch.float32)

    def f(x):
        h = torch.ops.aqlmkit.cpu_lut_linear(x, codes, cb, scales, bias)
        return torch.ops.aqlmkit.cpu_gather_linear(torch.relu(h), c16, cb16, s16, None)

    x = torch.randn(1, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


def test_unsupported_falls_back_to_reference():
    """out_group_size 2 and autograd go to the (exact) reference path, with no wrong result."""
    codes = torch.randint(-128, 128, (6, 8, 1), dtype=torch.int8)
    cb = torch.randn(1, 256, 2, 8)
    scales = torch.rand(6, 1, 1, 1)
    x = torch.randn(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not cpu.supports(x, codes, cb)
        assert kernels.select(x, codes, cb) == "reference"
    c, cb2, s, _ = make_layer("2x8g8", 8, 64, cb_dtype=torch.float32)
    xg = torch.randn(1, 64, requires_grad=True)
    assert not cpu.supports(xg, c, cb2)


def test_failed_build_reports_unsupported(monkeypatch):
    monkeypatch.setitem(cpu._state, "loaded", "compiler missing")
    c, cb, s, _ = make_layer("2x8g8", 8, 64)
    assert not cpu.supports(torch.randn(1, 64), c, cb)


def test_cli_bench_microbench(capsys):
    from aqlmkit.cli import main

    assert main(["bench", "--scheme", "2x8g8", "--shape", "48x64", "--batch", "1", "9", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "dense/aqlm" in out and " cpu " in out
    assert main(["bench", "--shape", "48by64"]) == 2  # bad input: one-line AqlmkitError, exit 2


PACKED_CASES = [("1x8g8", 49, 576), ("2x8g8", 192, 576), ("4x8g16", 33, 64), ("8x8g16", 576, 1536),
                ("2x8g4", 17, 40), ("2x6g8", 33, 64), ("3x8g8", 7, 24), ("2x5g8", 130, 64)]


@pytest.mark.parametrize("scheme,out_f,in_f", PACKED_CASES)
@pytest.mark.parametrize("cb_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_packed_lut_matches_reference(scheme, out_f, in_f, cb_dtype):
    """The decode op on pre-packed operands: odd O (masked tails), B < 8, every row count it takes."""
    codes, cb, scales, bias = make_layer(scheme, out_f, in_f, cb_dtype=cb_dtype, seed=out_f)
    for b in (None, bias):
        packed = cpu.pack(codes, cb, scales, b)
        assert packed is not None and packed[0].shape == (codes.shape[1] * codes.shape[2], -(-out_f // 64) * 64)
        for rows in (1, 2, 3, 8):
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, in_f).to(dt)
                check(torch.ops.aqlmkit.cpu_lut_packed_linear(x, *packed), x, codes, cb, scales, b)
        x = torch.randn(2, 5, in_f)  # leading dims, and 10 rows > LUT_MAX_ROWS: regular paths
        check(cpu.run_packed(packed, x, codes, cb, scales, b), x, codes, cb, scales, b)
        check(cpu.run_packed(packed, x[:1, :1], codes, cb, scales, b), x[:1, :1], codes, cb, scales, b)


def test_pack_declines_16bit_codes():
    codes, cb, scales, bias = make_layer("1x16g8", 8, 64)
    assert cpu.pack(codes, cb, scales, bias) is None
    x = torch.randn(1, 64)
    check(cpu.run_packed(None, x, codes, cb, scales, bias), x, codes, cb, scales, bias)


def test_cached_linear_repacks_when_parameters_change(monkeypatch):
    """QuantizedLinear reuses its packed operands, but never stale ones."""
    from aqlmkit.nn import QuantizedLinear

    codes, cb, scales, bias = make_layer("2x8g8", 40, 64, cb_dtype=torch.float32)
    layer = QuantizedLinear(64, 40, "2x8g8", bias=True)
    for name, t in (("codes", codes), ("codebooks", cb), ("scales", scales), ("bias", bias)):
        getattr(layer, name).data = t.clone()
    x = torch.randn(1, 64)
    with torch.no_grad():
        check(layer(x), x, codes, cb, scales, bias)
        packed = layer._kernel_cache["entry"][3]
        check(layer(x), x, codes, cb, scales, bias)
        assert packed is not None and layer._kernel_cache["entry"][3] is packed  # reused
        layer.codebooks.mul_(2.0)  # in-place edit bumps the version counter
        layer.codes[0, 0, 0] = -layer.codes[0, 0, 0] - 1
        check(layer(x), x, layer.codes, layer.codebooks, layer.scales, layer.bias)
        layer.scales.data = scales * 3  # new storage
        check(layer(x), x, layer.codes, layer.codebooks, layer.scales, layer.bias)
        monkeypatch.setenv("AQLMKIT_KERNEL", "reference")  # read once: not seen until reloaded
        assert kernels.select(x, layer.codes, layer.codebooks) == "cpu"
        try:
            kernels.reload_settings()  # the select and layer caches honour the new value
            assert kernels.select(x, layer.codes, layer.codebooks) == "reference"
            check(layer(x), x, layer.codes, layer.codebooks, layer.scales, layer.bias)
            assert layer._kernel_cache["entry"][1] == "reference"
        finally:
            monkeypatch.undo()
            kernels.reload_settings()
        assert kernels.select(x, layer.codes, layer.codebooks) == "cpu"


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16])
def test_half_linear_matches_fp32_math(w_dtype):
    """fp16/bf16-stored weight, fp32 activations: exact up to fp32 summation order."""
    gen = torch.Generator().manual_seed(3)
    for out_f, in_f in [(1030, 576), (37, 40), (5, 7)]:
        w = torch.randn(out_f, in_f, generator=gen).to(w_dtype)
        bias = torch.randn(out_f, generator=gen)
        for rows in (1, 2, 3, 8, 20):
            for b in (None, bias):
                for dt in (torch.float32, torch.bfloat16):
                    x = torch.randn(rows, in_f, generator=gen).to(dt)
                    y = torch.ops.aqlmkit.cpu_half_linear(x, w, b)
                    want = torch.nn.functional.linear(x.float(), w.float(), b)
                    assert y.dtype == dt and y.shape == want.shape
                    tol = 1e-5 if dt == torch.float32 else 1.6e-2
                    assert (y.float() - want).abs().max() / want.abs().max() < tol


def test_opcheck_new_ops():
    codes, cb, scales, bias = make_layer("2x8g8", 24, 64)
    packed = cpu.pack(codes, cb, scales, bias)
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.aqlmkit.cpu_lut_packed_linear.default, (x, *packed),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.aqlmkit.cpu_half_linear.default, (x, torch.randn(24, 64).half(), None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("scheme,out_f,in_f", [("2x8g8", 576, 576), ("8x8g16", 200, 1536)])
def test_packed_lut_split_across_threads(scheme, out_f, in_f):
    """The decode op splits input groups across threads (partial sums per thread): same result."""
    codes, cb, scales, bias = make_layer(scheme, out_f, in_f, seed=5)
    packed = cpu.pack(codes, cb, scales, bias)
    x = torch.randn(3, in_f)
    before = torch.get_num_threads()
    try:
        ys = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ys.append(torch.ops.aqlmkit.cpu_lut_packed_linear(x, *packed))
    finally:
        torch.set_num_threads(before)
    for y in ys:  # fp32 sums in another order: equal to ~1e-6 of the largest output
        check(y, x, codes, cb, scales, bias)
        assert (y - ys[0]).abs().max() / ys[0].abs().max() < 2e-6


def _fresh_layer():
    from aqlmkit.nn import QuantizedLinear

    codes, cb, scales, bias = make_layer("2x8g8", 40, 64, cb_dtype=torch.float32, seed=2)
    layer = QuantizedLinear(64, 40, "2x8g8", bias=True)
    for name, t in (("codes", codes), ("codebooks", cb), ("scales", scales), ("bias", bias)):
        getattr(layer, name).data = t.clone()
    return layer


def _check_layer(layer, x):
    with torch.no_grad():
        check(layer(x), x, layer.codes, layer.codebooks, layer.scales, layer.bias)


def test_cache_not_stale_after_data_assignment_reusing_the_address():
    """PV-tuning assigns ``layer.codes.data = new``: even when the allocator hands the new codes
    the freed address of the old ones (same size, same version counter), the cache repacks."""
    x = torch.randn(1, 64)
    reused = 0
    for trial in range(20):
        layer = _fresh_layer()
        _check_layer(layer, x)  # packs
        old_ptr = layer.codes.data_ptr()
        layer.codes.data = torch.zeros_like(layer.codes)  # the old codes' storage is released...
        new = torch.randint(-128, 128, layer.codes.shape, dtype=torch.int8,
                            generator=torch.Generator().manual_seed(trial))
        layer.codes.data = new  # ...and the new ones may land at its address
        reused += new.data_ptr() == old_ptr
        _check_layer(layer, x)
    assert reused == 0  # the cache pins the storage it packed from: the address cannot recur


def test_cache_follows_every_parameter_write():
    x = torch.randn(2, 64)
    layer = _fresh_layer()
    _check_layer(layer, x)
    sd = {k: v.clone() for k, v in _fresh_layer().state_dict().items()}
    sd["codebooks"] = sd["codebooks"] * -1.5
    layer.load_state_dict(sd)  # copy_ into the same storage
    assert torch.equal(layer.codebooks, sd["codebooks"])
    _check_layer(layer, x)
    with torch.no_grad():
        layer.scales.copy_(layer.scales * 2)
    _check_layer(layer, x)
    layer.codebooks = torch.nn.Parameter(layer.codebooks * 0.5, requires_grad=False)  # new object
    _check_layer(layer, x)
    layer.double().float()  # _apply: new storages
    _check_layer(layer, x)
    layer.codes.data.copy_(torch.randint(-128, 128, layer.codes.shape, dtype=torch.int8))
    layer.invalidate_kernel_cache()  # the one write PyTorch's version counter does not see
    _check_layer(layer, x)
    layer.codes.data.mul_(-1)
    kernels.invalidate_caches(layer)
    _check_layer(layer, x)
