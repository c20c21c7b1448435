"""Kernel dispatch: pick the fastest correct backend for (device, scheme, batch).

Backends live one per file (``cpu.py``, ``cuda.py``) and register a :class:`Backend` here when
imported. They are imported lazily on the first call so that importing aqlmkit never compiles
anything. The pure-PyTorch reference is the last resort, and ``AQLMKIT_KERNEL=reference|cpu|cuda``
forces one (a forced backend that cannot run the case raises instead of silently falling back).

Environment variables are read once, at import (not an os.environ lookup per layer per token on
the decode hot path); tests and tools that change them call :func:`reload_settings`.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels import reference

Run = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """A kernel family: ``supports`` says whether it handles this call, ``run`` computes it."""

    name: str
    priority: int  # higher wins
    supports: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]
    run: Run
    # Optional per-layer precompute: ``pack(codes, codebooks, scales, bias)`` returns operands
    # that ``run_packed(packed, x, codes, codebooks, scales, bias)`` uses instead of redoing
    # layout/dtype work on every call (see :func:`aqlm_linear_cached`).
    pack: Callable[..., object] | None = None
    run_packed: Run | None = None


_BACKENDS: dict[str, Backend] = {}
_LOADED = False
_BACKEND_MODULES = ("aqlmkit.kernels.cpu", "aqlmkit.kernels.cuda")


_SELECTED: dict[tuple, str] = {}  # select() answers; depend only on the key's properties


@dataclass(frozen=True)
class Settings:
    """The kernel environment, read once: ``AQLMKIT_KERNEL`` forces a backend ("" = fastest)."""

    kernel: str


def _read_settings() -> Settings:
    return Settings(kernel=os.environ.get("AQLMKIT_KERNEL", "").strip().lower())


_SETTINGS = _read_settings()


def settings() -> Settings:
    return _SETTINGS


def reload_settings() -> Settings:
    """Re-read AQLMKIT_KERNEL (and each loaded backend's own variables, e.g. AQLMKIT_CUDA_PATH,
    AQLMKIT_CPU_LUT_MAX_ROWS) and forget cached choices. For tests and tools that change the
    environment after import; nothing calls it on a hot path."""
    global _SETTINGS
    _SETTINGS = _read_settings()
    _SELECTED.clear()
    _HALF_KERNEL.clear()
    for mod in _BACKEND_MODULES:
        reload = getattr(sys.modules.get(mod), "reload_settings", None)
        if reload is not None:
            reload()
    return _SETTINGS


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _SELECTED.clear()


def _load_backends() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in _BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                warnings.warn(f"aqlmkit: kernel backend {mod} unavailable ({e}); using the reference path")


def backends() -> list[Backend]:
    _load_backends()
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def select(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> str:
    """Name of the backend that will run this call.

    Cached on everything a backend's ``supports`` looks at (devices, dtypes, codebook shape,
    whether autograd is needed, AQLMKIT_KERNEL): at batch-1 decode this runs ~200 times per token
    and sorting/probing the backends each time cost more than a small layer's kernel.
    """
    forced = _SETTINGS.kernel
    if torch.compiler.is_compiling():
        return _select(x, codes, codebooks, forced)
    grad = torch.is_grad_enabled() and (x.requires_grad or codebooks.requires_grad)
    key = (forced, x.device, x.dtype, codes.dtype, codebooks.dtype, codebooks.device,
           tuple(codebooks.shape), grad)
    name = _SELECTED.get(key)
    if name is None:
        name = _select(x, codes, codebooks, forced)
        _SELECTED[key] = name
    return name


def _select(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, forced: str) -> str:
    if forced == "reference":
        return "reference"
    for b in backends():
        if forced and b.name != forced:
            continue
        if b.supports(x, codes, codebooks):
            return b.name
    if forced:
        raise AqlmkitError(
            f"AQLMKIT_KERNEL={forced} cannot run this call (device {x.device}, dtype {x.dtype}, "
            f"codebooks {tuple(codebooks.shape)}); unset it to use the fastest available kernel"
        )
    return "reference"


def _needs_grad(x: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or codebooks.requires_grad or scales.requires_grad
            or (bias is not None and bias.requires_grad))


def aqlm_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequantize(codes, codebooks, scales)^T + bias with the best available kernel.

    When autograd needs this call (LoRA inputs, tuned codebooks/scales) it goes through the
    ``aqlmkit::aqlm_linear`` op (:mod:`aqlmkit.kernels.op`): the same fast forward, plus a
    backward; otherwise straight to the backend, skipping the custom op's Python dispatch layer."""
    if _needs_grad(x, codebooks, scales, bias):
        return torch.ops.aqlmkit.aqlm_linear(x, codes, codebooks, scales, bias)
    return dispatch(x, codes, codebooks, scales, bias)


def dispatch(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Forward only: the backend :func:`select` names (each backend then picks its path from the
    row count, e.g. CPU LUT for <= 8 rows, CUDA mma for <= 16, dequantize + GEMM above)."""
    name = select(x, codes, codebooks)
    if name == "reference":
        return reference.aqlm_linear(x, codes, codebooks, scales, bias)
    return _BACKENDS[name].run(x, codes, codebooks, scales, bias)


def _operand_key(t: torch.Tensor | None) -> tuple | None:
    """What identifies a parameter's current contents without reading them: the tensor object,
    its storage address, version counter, shape, strides, dtype and device."""
    if t is None:
        return None
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)


def aqlm_linear_cached(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    cache: dict,
) -> torch.Tensor:
    """:func:`aqlm_linear` that keeps the backend's packed operands for this layer in ``cache``.

    At batch-1 decode a layer's kernel takes ~10-40 us, so a few us of Python per call matter:
    the backend choice and the packed operands are looked up with one tuple compare. Why it
    cannot serve stale operands: the key holds each parameter's object identity, storage address,
    version counter, shape, strides, dtype and device, and the entry keeps a detached alias of
    every parameter it was packed from, so the old storage stays allocated and its address cannot
    be handed to a new tensor (``layer.codes.data = new`` therefore always changes the address;
    ``copy_``, in-place edits and ``load_state_dict`` bump the version; ``.to()`` and parameter
    reassignment change identity or address). The one write PyTorch does not record is an
    in-place edit through a ``.data`` alias (``p.data.copy_(...)``: no version bump on the same
    storage); :class:`QuantizedLinear` clears its cache in ``_apply``/``load_state_dict``, and code
    that writes through ``.data`` must call :func:`invalidate_caches`. The key also holds the
    input's dtype/device and whether autograd is needed, the inputs of :func:`select`.
    Under ``torch.compile`` the key cannot be traced, so the entry an eager call left in ``cache``
    is used as is; without one this is :func:`aqlm_linear`.
    """
    if _needs_grad(x, codebooks, scales, bias):
        return torch.ops.aqlmkit.aqlm_linear(x, codes, codebooks, scales, bias)
    if torch.compiler.is_compiling():
        return _run_cached_entry(cache.get("entry"), x, codes, codebooks, scales, bias)
    grad = False
    try:
        key = (_SETTINGS.kernel, x.dtype, x.device, grad, _operand_key(codes),
               _operand_key(codebooks), _operand_key(scales), _operand_key(bias))
    except RuntimeError:  # parameters created under inference_mode have no version counter
        return aqlm_linear(x, codes, codebooks, scales, bias)
    entry = cache.get("entry")
    if entry is None or entry[0] != key:
        name = select(x, codes, codebooks)
        backend = _BACKENDS.get(name)
        packed = None
        if backend is not None and backend.pack is not None and backend.run_packed is not None:
            packed = backend.pack(codes, codebooks, scales, bias)
        pins = tuple(None if t is None else t.detach() for t in (codes, codebooks, scales, bias))
        entry = (key, name, backend, packed, pins)
        cache["entry"] = entry
    _, name, backend, packed, _ = entry
    if backend is None:
        return reference.aqlm_linear(x, codes, codebooks, scales, bias)
    if backend.run_packed is None:
        return backend.run(x, codes, codebooks, scales, bias)
    return backend.run_packed(packed, x, codes, codebooks, scales, bias)


def invalidate_caches(module: torch.nn.Module | None = None) -> None:
    """Drop packed kernel operands (of every layer under ``module``) and the backend choices.

    Needed only after writing a parameter in place through a ``.data`` alias, the one edit
    PyTorch's version counter does not see; every other edit repacks on its own."""
    _SELECTED.clear()
    if module is not None:
        for m in module.modules():
            cache = getattr(m, "_kernel_cache", None)
            if isinstance(cache, dict):
                cache.clear()


HALF_DTYPES = (torch.float16, torch.bfloat16)
_HALF_KERNEL: dict[str, bool] = {}  # "cpu": whether torch.ops.aqlmkit.cpu_half_linear exists


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b for a 16-bit ``weight`` and fp32 ``x``, accumulated in fp32.

    On CPU this is the ``cpu_half_linear`` GEMV (it reads the 16-bit weight directly: half the
    bytes of an fp32 copy, which is what bounds a batch-1 lm_head); elsewhere, while autograd
    needs it, or with AQLMKIT_KERNEL=reference the weight is upcast and F.linear runs.
    """
    if _half_kernel_applies(x, weight):
        return torch.ops.aqlmkit.cpu_half_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _half_kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if weight.dtype not in HALF_DTYPES or weight.dim() != 2:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # the op has no backward
    if torch.compiler.is_compiling():  # decided by the eager calls before (the decode prefill)
        return _HALF_KERNEL.get("cpu", False)
    return half_kernel_available()


def half_kernel_available() -> bool:
    """Whether CPU calls of :func:`half_linear` use the fast op (builds the CPU extension once)."""
    if _SETTINGS.kernel not in ("", "cpu"):
        return False
    if "cpu" not in _HALF_KERNEL:
        _load_backends()
        cpu = importlib.import_module("aqlmkit.kernels.cpu") if "cpu" in _BACKENDS else None
        _HALF_KERNEL["cpu"] = bool(cpu is not None and cpu.load())
    return _HALF_KERNEL["cpu"]


def _run_cached_entry(entry, x, codes, codebooks, scales, bias) -> torch.Tensor:
    """Traced calls: the packed operands of an earlier eager call (the decode loop warms them up).

    The backend is looked up by name in the registry, not taken from the entry: dynamo then
    guards one registry slot for the whole model instead of one object identity (plus aliasing
    checks) per layer, which cost ~1 ms per decode step on a 210-layer model."""
    backend = None if entry is None else _BACKENDS.get(entry[1])
    if backend is None or backend.run_packed is None:
        return aqlm_linear(x, codes, codebooks, scales, bias)
    return backend.run_packed(entry[3], x, codes, codebooks, scales, bias)


from aqlmkit.kernels import op  # noqa: E402  (registers torch.ops.aqlmkit.aqlm_linear)

__all__ = ["Backend", "dispatch", "op", "register_backend", "backends", "select", "aqlm_linear", "aqlm_linear_cached",
           "invalidate_caches", "settings", "reload_settings", "half_linear", "half_kernel_available",
           "reference"]
