"""CPU backend: C++/OpenMP AQLM kernels exposed as ``torch.ops.aqlmkit.cpu_*_linear``.

Importing this module registers the backend but compiles nothing; the extension is JIT-built on
the first call (``-O3 -march=native``; the build cache is keyed on the CPU's feature flags, so a
binary never runs on a CPU it was not built for). If the build fails we warn once and report
"unsupported", so the dispatcher uses the reference path: a slow answer, never a wrong one.

Path choice per call (rows = product of the leading dims of x):
  * B <= 8, rows <= LUT_MAX_ROWS:  ``cpu_lut_linear`` (lookup tables of x . codeword)
  * other B, rows <= GATHER_MAX_ROWS: ``cpu_gather_linear`` (per-row codeword decode + FMA)
  * otherwise: ``cpu_dequant_linear`` (dequantize row tiles + GEMM), for prefill.
``QuantizedLinear`` in eager inference goes through ``kernels.aqlm_linear_cached``: operands are
packed once per layer (:func:`pack`) and decode-size calls run ``cpu_lut_packed_linear``
(byte-plane table lookups with AVX-512 VBMI, 64 outputs per instruction). ``cpu_half_linear``
is a GEMV over fp16/bf16-stored dense weights with fp32 activations (for unquantized layers kept
in half precision, e.g. an AQLM checkpoint's lm_head).
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels import Backend, register_backend

# Row bounds of the decode paths and the prefill tile (read once; kernels.reload_settings re-reads).
# Prefill dequantizes up to TILE_ELEMS weights per GEMM (16 MiB fp32: whole layers of small
# models, so one large at::mm writes straight into the output; the buffer is reused across calls).
LUT_MAX_ROWS = GATHER_MAX_ROWS = TILE_ELEMS = 0


def reload_settings() -> None:
    """Read AQLMKIT_CPU_LUT_MAX_ROWS / _GATHER_MAX_ROWS / _TILE_ELEMS (called by kernels.reload_settings)."""
    global LUT_MAX_ROWS, GATHER_MAX_ROWS, TILE_ELEMS
    LUT_MAX_ROWS = int(os.environ.get("AQLMKIT_CPU_LUT_MAX_ROWS", "8"))
    GATHER_MAX_ROWS = int(os.environ.get("AQLMKIT_CPU_GATHER_MAX_ROWS", "8"))
    TILE_ELEMS = int(os.environ.get("AQLMKIT_CPU_TILE_ELEMS", str(1 << 22)))


reload_settings()
# AQLMKIT_CPU_CFLAGS adds flags (e.g. "-mno-avx512f" for a portable build without AVX-512); the
# build cache is keyed on the flags, so each variant gets its own binary.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", *os.environ.get("AQLMKIT_CPU_CFLAGS", "").split()]

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None}  # None: not tried; True: ok; str: failure reason
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load() -> bool:
    """Build/load the extension once; True when the ``torch.ops.aqlmkit.cpu_*`` ops exist."""
    if _state["loaded"] is None:
        with _lock:
            if _state["loaded"] is None:
                _state["loaded"] = _try_build()
    return _state["loaded"] is True


def _try_build() -> bool | str:
    from aqlmkit.kernels._build import load_extension

    try:
        load_extension("aqlmkit_cpu", ["aqlm_cpu.cpp", "aqlm_cpu_packed.cpp"], extra_cflags=CFLAGS,
                       extra_ldflags=["-fopenmp"], is_python_module=False)
    except AqlmkitError as e:
        _warn_once("build", f"aqlmkit: CPU kernels unavailable, using the slow reference path: {e}")
        return str(e)
    _register_fakes()
    return True


def _fake(x, codes, codebooks, scales, bias, *rest):
    return x.new_empty((*x.shape[:-1], codes.shape[0] * codebooks.shape[2]))


def _fake_packed(x, codes_t, cb_t, scales, bias):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))  # codes_t's columns are padded to 64


def _fake_half(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _register_fakes() -> None:
    """Shape/dtype functions so torch.compile traces through the ops without graph breaks."""
    fakes = {"cpu_lut_linear": _fake, "cpu_gather_linear": _fake, "cpu_dequant_linear": _fake,
             "cpu_lut_packed_linear": _fake_packed, "cpu_half_linear": _fake_half}
    for name, fn in fakes.items():
        try:
            torch.library.register_fake(f"aqlmkit::{name}")(fn)
        except RuntimeError:  # already registered (module reloaded)
            pass


def supports(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """CPU tensors, out_group_size 1, float inputs, no autograd (training uses the reference)."""
    if x.device.type != "cpu" or codebooks.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or codebooks.requires_grad):
        return False  # the C++ ops have no backward; the reference path is differentiable
    if codebooks.dim() != 4 or codebooks.shape[2] != 1:
        _warn_once("og", "aqlmkit: CPU kernels need out_group_size 1; using the reference path")
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        _warn_once(f"dt{x.dtype}", f"aqlmkit: CPU kernels do not handle {x.dtype} inputs; "
                   "using the reference path")
        return False
    if codes.dtype not in (torch.int8, torch.int16) or codebooks.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        _warn_once("cdt", f"aqlmkit: CPU kernels need int8/int16 codes and float codebooks, got "
                   f"{codes.dtype}/{codebooks.dtype}; using the reference path")
        return False
    return load()


def path_for(rows: int, codes: torch.Tensor, codebooks: torch.Tensor) -> str:
    """Which op handles a call with ``rows`` input rows: 'lut', 'gather' or 'dequant'."""
    if codebooks.shape[1] <= 256 and codes.dtype == torch.int8 and rows <= LUT_MAX_ROWS:
        return "lut"
    if rows <= GATHER_MAX_ROWS:
        return "gather"
    return "dequant"


def run(x, codes, codebooks, scales, bias=None) -> torch.Tensor:
    """y = x @ W^T + b; fp16/bf16 inputs are computed in fp32 and returned in their dtype."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    path = path_for(rows, codes, codebooks)
    ops = torch.ops.aqlmkit
    if path == "lut":
        return ops.cpu_lut_linear(x, codes, codebooks, scales, bias)
    if path == "gather":
        return ops.cpu_gather_linear(x, codes, codebooks, scales, bias)
    return ops.cpu_dequant_linear(x, codes, codebooks, scales, bias, TILE_ELEMS)


def pack(codes, codebooks, scales, bias=None) -> tuple | None:
    """Per-layer operands of the decode LUT kernel, computed once (``None``: no packed path).

    Codes are transposed to [G*K, O] (O padded to 64 and permuted inside each 64-block) so one
    byte-permute looks up a table entry for 64 outputs at once, codebooks to fp32
    [K, g, 2^B] so the table build is a broadcast FMA, scales/bias to flat fp32. Doing this once per
    layer instead of per call removes the reshapes, casts and copies from the batch-1 hot path.
    """
    if codes.dtype != torch.int8 or codebooks.shape[1] > 256:
        return None
    o, g_, k = codes.shape
    with torch.no_grad():
        o64 = -(-o // 64) * 64
        padded = torch.zeros(o64, g_ * k, dtype=torch.int8, device=codes.device)
        padded[:o] = codes.detach().reshape(o, g_ * k)
        # code position p of each 64-output block holds output PLANE_POS[p] (see aqlm_cpu_packed.cpp)
        codes_t = padded.view(-1, 64, g_ * k)[:, _plane_order(codes.device)].reshape(o64, g_ * k).t().contiguous()
        cb_t = codebooks.detach().float()[:, :, 0, :].transpose(1, 2).contiguous()
        sc = scales.detach().float().reshape(-1).contiguous()
        b = None if bias is None else bias.detach().float().reshape(-1).contiguous()
    return codes_t, cb_t, sc, b


def _plane_order(device) -> torch.Tensor:
    """Output stored at each code position of a 64-block: r = 16j+4l+m sits at 16l+4j+m."""
    r = torch.arange(64, device=device)
    return (r & 3) | ((r >> 4) << 2) | (((r >> 2) & 3) << 4)


def run_packed(packed: tuple | None, x, codes, codebooks, scales, bias=None) -> torch.Tensor:
    """Decode-size calls use the packed LUT op; bigger ones (prefill) the regular paths."""
    if packed is not None and x.dim() and x.numel() <= LUT_MAX_ROWS * x.shape[-1]:
        return _packed_op(x, *packed)
    return run(x, codes, codebooks, scales, bias)


def _packed_op(*args):
    # bound on first use: torch.ops.aqlmkit.* exists only after load() built the library
    global _packed_op
    _packed_op = torch.ops.aqlmkit.cpu_lut_packed_linear.default
    return _packed_op(*args)


register_backend(Backend("cpu", 10, supports, run, pack, run_packed))

__all__ = ["load", "supports", "run", "pack", "run_packed", "path_for", "LUT_MAX_ROWS", "GATHER_MAX_ROWS"]
