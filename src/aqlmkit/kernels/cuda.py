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

import torch
import torch.nn.functional as F

from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels import Backend, register_backend

# (K, B, g) with a specialised batch-1..16 kernel, and the largest batch where it beats
# dequantize + cuBLAS. Thresholds come from benchmarks/gpu_kernels.py on an H200 (docs/NOTES_gpu.md).
GEMV_MAX_BATCH: dict[tuple[int, int, int], int] = {
    (2, 8, 8): 8,
    (1, 8, 8): 8,
    (1, 16, 8): 8,
    (1, 16, 16): 8,
}
# Split-K look-up-table kernel (csrc/aqlm_cuda_lut.cuh) for these (K, B, g), batch 1..4. Used by
# default only up to LUT_MAX_BATCH[scheme], filled in from a device run that showed it correct and
# faster (docs/NOTES_gpu.md); empty = off. AQLMKIT_CUDA_LUT=1 turns it on for batch <= 4 (=0 off).
LUT_SCHEMES = ((2, 8, 8), (1, 8, 8))
LUT_MAX_BATCH: dict[tuple[int, int, int], int] = {}
_LUT_ENV = os.environ.get("AQLMKIT_CUDA_LUT", "")  # read once: keeps torch.compile tracing simple
ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90")
CUDA_FLAGS = ("-O3", "-std=c++17", *ARCH_FLAGS)
SOURCES = ("aqlm_cuda.cpp", "aqlm_cuda_dequant.cu", "aqlm_cuda_gemv_2x8g8.cu",
           "aqlm_cuda_gemv_1x8g8.cu", "aqlm_cuda_gemv_1x16g8.cu", "aqlm_cuda_gemv_1x16g16.cu",
           "aqlm_cuda_lut_2x8g8.cu", "aqlm_cuda_lut_1x8g8.cu")

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

            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            try:
                _EXT = load_extension("aqlmkit_cuda", SOURCES, extra_cflags=("-O3",),
                                      extra_cuda_cflags=CUDA_FLAGS,
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


@torch.library.custom_op("aqlmkit::cuda_gemv", mutates_args=(), device_types="cuda")
def cuda_gemv(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """[batch<=16, in] @ AQLM weight^T (scales, bias applied); dtypes of x everywhere."""
    return extension().gemv(x, codes, codebooks, scales, bias)


@cuda_gemv.register_fake
def _(x, codes, codebooks, scales, bias):
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.custom_op("aqlmkit::cuda_gemv_lut", mutates_args=(), device_types="cuda")
def cuda_gemv_lut(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                  scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Split-K LUT matmul for 1x8g8/2x8g8 with int8 codes, batch 1..4; same contract as gemv."""
    return extension().gemv_lut(x, codes, codebooks, scales, bias)


@cuda_gemv_lut.register_fake
def _(x, codes, codebooks, scales, bias):
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.custom_op("aqlmkit::cuda_dequant", mutates_args=(), device_types="cuda")
def cuda_dequant(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense [out, in] weight in the codebooks' dtype, for any KxB/g with out_group_size 1."""
    return extension().dequant(codes, codebooks, scales)


@cuda_dequant.register_fake
def _(codes, codebooks, scales):
    return codebooks.new_empty((codes.shape[0], codes.shape[1] * codebooks.shape[3]))


def scheme_key(codebooks: torch.Tensor) -> tuple[int, int, int]:
    k, n, _, g = codebooks.shape
    return int(k), int(n).bit_length() - 1, int(g)


def use_gemv(batch: int, codebooks: torch.Tensor, in_features: int) -> bool:
    """The specialised on-the-fly kernel wins up to GEMV_MAX_BATCH rows; beyond it, dequant+cuBLAS."""
    limit = GEMV_MAX_BATCH.get(scheme_key(codebooks), 0)
    return 1 <= batch <= min(limit, 16) and in_features % 8 == 0


def lut_applies(batch: int, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """The LUT kernel can run this call (scheme, int8 codes, batch 1..4)."""
    return (scheme_key(codebooks) in LUT_SCHEMES and codes.dtype == torch.int8
            and 1 <= batch <= 4)


def use_lut(batch: int, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    """Default choice of the LUT kernel: env override, else the measured LUT_MAX_BATCH table."""
    if _LUT_ENV == "0" or not lut_applies(batch, codes, codebooks):
        return False
    return _LUT_ENV == "1" or batch <= LUT_MAX_BATCH.get(scheme_key(codebooks), 0)


def default_path(batch: int, codes: torch.Tensor, codebooks: torch.Tensor, in_features: int) -> str:
    """"lut" | "gemv" | "dequant": the path ``run`` takes without ``force``."""
    if use_lut(batch, codes, codebooks):
        return "lut"
    return "gemv" if use_gemv(batch, codebooks, in_features) else "dequant"


def supports(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if codes.dtype not in (torch.int8, torch.int16) or codebooks.dim() != 4 or codebooks.shape[2] != 1:
        return False
    n = int(codebooks.shape[1])
    if n & (n - 1) or n > 65536 or (n > 256 and codes.dtype != torch.int16):
        return False
    return available()


def run(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
        bias: torch.Tensor | None = None, *, force: str | None = None) -> torch.Tensor:
    """Dispatch one call. ``force`` ("gemv" | "lut" | "dequant") pins a path (tests, benchmarks)."""
    out_f, in_f = codes.shape[0], codes.shape[1] * codebooks.shape[3]
    if x.shape[-1] != in_f:
        raise AqlmkitError(f"input has {x.shape[-1]} features but the layer expects {in_f}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).contiguous()
    cb = codebooks.to(x.dtype).contiguous()
    sc = scales.reshape(-1).to(x.dtype).contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    path = force or default_path(x2.shape[0], codes, codebooks, in_f)
    if path == "lut" and x2.shape[0] > 0:
        y = torch.ops.aqlmkit.cuda_gemv_lut(x2, codes.contiguous(), cb, sc, b)
    elif path == "gemv" and x2.shape[0] > 0:
        y = torch.ops.aqlmkit.cuda_gemv(x2, codes.contiguous(), cb, sc, b)
    else:
        w = torch.ops.aqlmkit.cuda_dequant(codes.contiguous(), cb, sc)
        y = F.linear(x2, w, b)
    return y.reshape(*lead, out_f)


register_backend(Backend("cuda", 100, supports, run))
