"""CUDA backend: JIT-built AQLM kernels (csrc/aqlm_cuda*) exposed as ``torch.ops.aqlmkit.cuda_*``.

Why custom ops: torch.compile and CUDA-graph capture treat them as opaque nodes with a fake
(meta) implementation, so a compiled or captured decode step launches our kernels directly on the
capturing stream. Two kernels are needed: a batch 1..16 matmul that decodes codewords on the fly
(schemes with a specialised instantiation) and a dequantize kernel for every KxB/g, used for
prefill (then cuBLAS) and for schemes without a specialised matmul.
"""
from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels import Backend, register_backend

# Rows per mma launch; more rows run as several launches (each decodes the weight again). 16 is
# the 2-n-tile kernel measured on the H200; 32 selects the 4-n-tile kernel (batch 17..32 in one
# launch), which is built and tested but not yet measured on a GPU (docs/NOTES_gpu.md): set
# MMA_KERNEL_BATCH = 32 once benchmarks/gpu_fused.py shows it beating the 16-row launches.
MMA_KERNEL_BATCH = 16
MMA_MAX_BATCH = 64  # rows the mma path takes at all (forced or from DISPATCH)
# Paths for batch <= 16 (mma up to 64 rows when forced; above the table: dequantize + cuBLAS):
#   "gemv": CUDA-core kernel, one warp per row (1x16g8, 1x16g16, 2x8g8, 1x8g8),
#   "lut":  split-K look-up tables of x . codeword (2x8g8, 1x8g8; batch <= 4),
#   "mma":  codewords decoded into tensor-core fragments (2x8g8, 1x8g8, 1x16g8, 1x16g16).
# DISPATCH[(K, B, g)] lists (largest batch, path, smallest out*in) in order: the first entry
# whose batch bound covers the call and whose size floor the layer reaches wins. Chosen from
# benchmarks/gpu_kernels.py on an H200 (results JSON, docs/NOTES_gpu.md): the LUT kernel's table
# build and second launch cost more than they save on 4096x4096 at batch 1.
# 2x8g8 at 17..32 rows on layers of >= 2^25 weights: two 16-row mma launches beat dequantize +
# cuBLAS 1.4-1.7x (11008x4096, 28672x8192; 4096x4096 ties; 33..64 rows lose), gpu_fused.py.
DISPATCH: dict[tuple[int, int, int], tuple[tuple[int, str, int], ...]] = {
    (2, 8, 8): ((2, "lut", 1 << 25), (1, "gemv", 0), (16, "mma", 0), (32, "mma", 1 << 25)),
    (1, 8, 8): ((1, "lut", 1 << 25), (1, "gemv", 0), (2, "lut", 1 << 27), (16, "mma", 0)),
    (1, 16, 8): ((1, "gemv", 0), (16, "mma", 0)),
    (1, 16, 16): ((2, "gemv", 0), (16, "mma", 0)),
}
GEMV_SCHEMES = ((2, 8, 8), (1, 8, 8), (1, 16, 8), (1, 16, 16))
LUT_SCHEMES = ((2, 8, 8), (1, 8, 8))
MMA_SCHEMES = ((2, 8, 8), (1, 8, 8), (1, 16, 8), (1, 16, 16))
PATHS = ("gemv", "lut", "mma", "dequant")
# AQLMKIT_CUDA_PATH=gemv|lut|mma|dequant pins one path wherever it applies (read once, so
# torch.compile tracing stays simple; kernels.reload_settings re-reads it); unset = DISPATCH.
_PATH_ENV = ""


def reload_settings() -> None:
    global _PATH_ENV
    _PATH_ENV = os.environ.get("AQLMKIT_CUDA_PATH", "").strip().lower()
    if _PATH_ENV and _PATH_ENV not in PATHS:
        raise AqlmkitError(f"AQLMKIT_CUDA_PATH={_PATH_ENV!r} is not one of {PATHS}; unset it or pick one")


reload_settings()
# Oldest compute capability (10*major+minor) each path's instructions exist on: mma.sync
# m16n8k16 (f16/bf16) and the LUT kernel's ~66 KB of shared memory per block need sm_80; gemv and
# dequantize run from sm_75, the oldest target nvcc 13 builds.
MIN_CC = {"gemv": 75, "dequant": 75, "lut": 80, "mma": 80}
OLDEST_CC = 75
BASE_FLAGS = ("-O3", "-std=c++17")


def gencode_flags(archs) -> tuple[str, ...]:
    """nvcc flags: a cubin for each arch (e.g. 75, 90) plus PTX of the newest, so a GPU newer than
    any of them JIT-compiles that PTX at load instead of finding no kernel image."""
    archs = sorted({int(a) for a in archs})
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return (*flags, f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")


def build_archs() -> tuple[int, ...]:
    """Archs to build for: AQLMKIT_CUDA_ARCHS ("75;90") or every visible GPU's (build for the GPU
    that is present). GPUs older than sm_75 are left out (nvcc 13 cannot target them)."""
    env = os.environ.get("AQLMKIT_CUDA_ARCHS", "").replace(",", ";").strip()
    if env:
        try:
            archs = {int(float(a) * 10) if "." in a else int(a) for a in env.split(";") if a.strip()}
        except ValueError:
            raise AqlmkitError(f"AQLMKIT_CUDA_ARCHS={env!r}: expected archs like '75;90' or '8.0;9.0'") from None
    else:
        archs = {device_cc(i) for i in range(torch.cuda.device_count())}
    archs = {a for a in archs if a >= OLDEST_CC}
    if not archs:
        raise AqlmkitError(f"no GPU of compute capability 7.5 or newer (found {sorted(archs) or 'none'}); "
                           "the CUDA kernels need sm_75+; set AQLMKIT_KERNEL=reference")
    return tuple(sorted(archs))


def cuda_flags(archs=None) -> tuple[str, ...]:
    return (*BASE_FLAGS, *gencode_flags(archs if archs is not None else build_archs()))


_CC: dict[int, int] = {}


def device_cc(index: int | None = None) -> int:
    """Compute capability of a GPU as 10*major+minor (75, 80, 90, ...), cached."""
    index = torch.cuda.current_device() if index is None else int(index)
    cc = _CC.get(index)
    if cc is None:
        major, minor = torch.cuda.get_device_capability(index)
        cc = _CC[index] = 10 * major + minor
    return cc
SOURCES = ("aqlm_cuda.cpp", "aqlm_cuda_dequant.cu", "aqlm_cuda_gemv_2x8g8.cu",
           "aqlm_cuda_gemv_1x8g8.cu", "aqlm_cuda_gemv_1x16g8.cu", "aqlm_cuda_gemv_1x16g16.cu",
           "aqlm_cuda_lut_2x8g8.cu", "aqlm_cuda_lut_1x8g8.cu", "aqlm_cuda_mma_2x8g8.cu",
           "aqlm_cuda_mma_1x8g8.cu", "aqlm_cuda_mma_1x16g8.cu", "aqlm_cuda_mma_1x16g16.cu")

_EXT: ModuleType | None = None
_EXT_ERROR: str | None = None
_LOCK = threading.Lock()


def extension() -> ModuleType:
    """Build (once, cached on disk by source hash) and import the CUDA extension."""
    global _EXT, _EXT_ERROR
    with _LOCK:
        if _EXT is None:
            if _EXT_ERROR is not None:
                raise AqlmkitError(_EXT_ERROR)
            from aqlmkit.kernels._build import load_extension

            try:  # our -gencode flags make torch add none of TORCH_CUDA_ARCH_LIST's
                _EXT = load_extension("aqlmkit_cuda", SOURCES, extra_cflags=("-O3",),
                                      extra_cuda_cflags=cuda_flags(),
                                      verbose=bool(os.environ.get("AQLMKIT_BUILD_VERBOSE")))
            except AqlmkitError as e:
                _EXT_ERROR = str(e)
                raise
    return _EXT


def available() -> bool:
    """CUDA present and the extension builds; a failed build warns once and disables the backend."""
    if _EXT is not None:  # fast path first: keeps torch.compile tracing free of locks
        return True
    if _EXT_ERROR is not None or not torch.cuda.is_available():
        return False
    try:
        extension()
        return True
    except AqlmkitError as e:
        if not getattr(available, "_warned", False):
            available._warned = True  # type: ignore[attr-defined]
            warnings.warn(f"aqlmkit: CUDA kernels disabled: {e}")
        return False


def _matmul_op(name: str, doc: str):
    """Register ``aqlmkit::cuda_<name>`` (the extension's ``name``): x [batch, in] @ AQLM weight^T
    with scales and bias applied, in x's dtype; the fake impl gives torch.compile the shape."""

    def impl(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
        return getattr(extension(), name)(x, codes, codebooks, scales, bias)

    impl.__doc__ = doc
    op = torch.library.custom_op(f"aqlmkit::cuda_{name}", impl, mutates_args=(),
                                 device_types="cuda")
    op.register_fake(lambda x, codes, codebooks, scales, bias:
                     x.new_empty((x.shape[0], codes.shape[0])))
    return op


cuda_gemv = _matmul_op("gemv", "CUDA-core matmul, batch 1..16 (1x16g8/g16, 2x8g8, 1x8g8).")
cuda_gemv_lut = _matmul_op("gemv_lut", "Split-K LUT matmul for 1x8g8/2x8g8 with int8 codes, batch 1..4.")
cuda_gemm_mma = _matmul_op("gemm_mma", "Tensor-core matmul for 2x8g8/1x8g8/1x16g8/1x16g16, batch 1..32.")
_MATMUL_OPS = {"gemv": torch.ops.aqlmkit.cuda_gemv, "lut": torch.ops.aqlmkit.cuda_gemv_lut,
               "mma": torch.ops.aqlmkit.cuda_gemm_mma}  # path -> op, built once (decode hot path)


@torch.library.custom_op("aqlmkit::cuda_dequant", mutates_args=(), device_types="cuda")
def cuda_dequant(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense [out, in] weight in the codebooks' dtype, for any KxB/g with out_group_size 1."""
    return extension().dequant(codes, codebooks, scales)


@cuda_dequant.register_fake
def _(codes, codebooks, scales):
    return codebooks.new_empty((codes.shape[0], codes.shape[1] * codebooks.shape[3]))


@torch.library.custom_op("aqlmkit::cuda_group_matmul", mutates_args=(), device_types="cuda")
def cuda_group_matmul(path: int, x: torch.Tensor, codes: list[torch.Tensor],
                      codebooks: list[torch.Tensor], scales: list[torch.Tensor],
                      bias: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """1..3 layers that share x [batch, in] (same scheme and in_features) in one launch; path
    0 gemv, 1 lut, 2 mma. Returns each layer's [batch, out_i] in x's dtype."""
    return extension().group_matmul(path, x, codes, codebooks, scales, bias)


@cuda_group_matmul.register_fake
def _(path, x, codes, codebooks, scales, bias):
    return [x.new_empty((x.shape[0], c.shape[0])) for c in codes]


GROUP_PATH_ID = {"gemv": 0, "lut": 1, "mma": 2}


def scheme_key(codebooks: torch.Tensor) -> tuple[int, int, int]:
    k, n, _, g = codebooks.shape
    return int(k), int(n).bit_length() - 1, int(g)


def applies(path: str, batch: int, codes: torch.Tensor, codebooks: torch.Tensor,
            in_features: int) -> bool:
    """Whether ``path`` can run this call (the GPU's arch, scheme, code dtype, batch, shape)."""
    if path not in MIN_CC:
        raise AqlmkitError(f"unknown CUDA path {path!r}; expected one of {PATHS}")
    if device_cc(codes.device.index) < MIN_CC[path]:
        return False
    key = scheme_key(codebooks)
    code_ok = codes.dtype == (torch.int8 if key[1] <= 8 else torch.int16)
    if path == "dequant":
        return True
    if batch < 1 or in_features % 8:
        return False
    if path == "gemv":
        return key in GEMV_SCHEMES and batch <= 16
    if path == "lut":
        return key in LUT_SCHEMES and code_ok and batch <= 4
    return key in MMA_SCHEMES and code_ok and batch <= MMA_MAX_BATCH  # mma


def default_path(batch: int, codes: torch.Tensor, codebooks: torch.Tensor, in_features: int,
                 out_features: int | None = None) -> str:
    """"gemv" | "lut" | "mma" | "dequant": the path ``run`` takes without ``force``: the first
    DISPATCH entry that covers the call and can run on this GPU (an sm_75 GPU skips lut/mma)."""
    if _PATH_ENV and applies(_PATH_ENV, batch, codes, codebooks, in_features):
        return _PATH_ENV
    size = int(codes.shape[0] if out_features is None else out_features) * in_features
    for max_batch, path, min_size in DISPATCH.get(scheme_key(codebooks), ()):
        if batch <= max_batch and size >= min_size and applies(path, batch, codes, codebooks, in_features):
            return path
    return "dequant"


def supports(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return supports_dequant(codes, codebooks)


def supports_dequant(codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """Whether the dequantize kernel (the path every supported call can fall back to) runs these."""
    if not codes.is_cuda or codes.dtype not in (torch.int8, torch.int16):
        return False
    if codebooks.dim() != 4 or codebooks.shape[2] != 1:
        return False
    n = int(codebooks.shape[1])
    if n & (n - 1) or n > 65536 or (n > 256 and codes.dtype != torch.int16):
        return False
    return available()


def run(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
        bias: torch.Tensor | None = None, *, force: str | None = None) -> torch.Tensor:
    """Dispatch one call. ``force`` (one of PATHS) pins a path (tests, benchmarks)."""
    out_f, in_f = codes.shape[0], codes.shape[1] * codebooks.shape[3]
    if x.shape[-1] != in_f:
        raise AqlmkitError(f"input has {x.shape[-1]} features but the layer expects {in_f}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).contiguous()
    cb = codebooks.to(x.dtype).contiguous()
    sc = scales.reshape(-1).to(x.dtype).contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    path = force or default_path(x2.shape[0], codes, codebooks, in_f)
    if path == "mma" and x2.shape[0] > MMA_KERNEL_BATCH:
        y = torch.cat([_MATMUL_OPS[path](x2[i:i + MMA_KERNEL_BATCH], codes.contiguous(), cb, sc, b)
                       for i in range(0, x2.shape[0], MMA_KERNEL_BATCH)])
    elif path in _MATMUL_OPS and x2.shape[0] > 0:
        y = _MATMUL_OPS[path](x2, codes.contiguous(), cb, sc, b)
    else:
        w = torch.ops.aqlmkit.cuda_dequant(codes.contiguous(), cb, sc)
        y = F.linear(x2, w, b)
    return y.reshape(*lead, out_f)


def run_group(x: torch.Tensor, layers, *, force: str | None = None) -> list[torch.Tensor]:
    """Outputs of sibling layers [(codes, codebooks, scales, bias), ...] that read the same x, in
    one launch where a matmul path applies. The path is chosen for the group as a whole (its total
    rows: fused q/k/v of 4096x4096 behave like one 12288x4096 layer); else each is dequantized.
    A layer given as (codes, codebooks, scales) has no bias."""
    layers = [(*layer, None) if len(layer) == 3 else tuple(layer) for layer in layers]
    codes0, cb0 = layers[0][0], layers[0][1]
    in_f = codes0.shape[1] * cb0.shape[3]
    if x.shape[-1] != in_f:
        raise AqlmkitError(f"input has {x.shape[-1]} features but the layers expect {in_f}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).contiguous()
    total = sum(int(c.shape[0]) for c, *_ in layers)
    path = force or default_path(x2.shape[0], codes0, cb0, in_f, out_features=total)
    if path in GROUP_PATH_ID and 0 < x2.shape[0] <= (MMA_KERNEL_BATCH if path == "mma" else 16):
        ys = torch.ops.aqlmkit.cuda_group_matmul(
            GROUP_PATH_ID[path], x2, [c.contiguous() for c, *_ in layers],
            [cb.to(x.dtype).contiguous() for _, cb, *_ in layers],
            [sc.reshape(-1).to(x.dtype).contiguous() for _, _, sc, _ in layers],
            [None if b is None else b.to(x.dtype).contiguous() for *_, b in layers])
    elif path in GROUP_PATH_ID:  # more rows than one launch takes: each layer on its own
        ys = [run(x2, *layer, force=path) for layer in layers]
    else:
        ys = [run(x2, *layer, force="dequant") for layer in layers]
    return [y.reshape(*lead, y.shape[-1]) for y in ys]


register_backend(Backend("cuda", 100, supports, run))
