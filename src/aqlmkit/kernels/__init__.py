"""Kernel dispatch: pick the fastest correct backend for (device, scheme, batch).

Backends live one per file (``cpu.py``, ``cuda.py``) and register a :class:`Backend` here when
imported. They are imported lazily on the first call so that importing aqlmkit never compiles
anything. The pure-PyTorch reference is the last resort, and ``AQLMKIT_KERNEL=reference|cpu|cuda``
forces one (a forced backend that cannot run the case raises instead of silently falling back).
"""
from __future__ import annotations

import importlib
import os
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
    forced = os.environ.get("AQLMKIT_KERNEL", "")
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


def aqlm_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequantize(codes, codebooks, scales)^T + bias with the best available kernel."""
    name = select(x, codes, codebooks)
    if name == "reference":
        return reference.aqlm_linear(x, codes, codebooks, scales, bias)
    return _BACKENDS[name].run(x, codes, codebooks, scales, bias)


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
    the backend choice and the packed operands are looked up with one tuple compare. The key holds
    the parameters' storage pointers and version counters, so moving a layer, loading a state dict
    or editing a tensor in place repacks instead of using stale data; it also holds the input's
    dtype/device, AQLMKIT_KERNEL and whether autograd is needed, the inputs of :func:`select`.
    Not for tracing: compiled code should call :func:`aqlm_linear`.
    """
    grad = torch.is_grad_enabled() and (x.requires_grad or codebooks.requires_grad)
    try:
        key = (os.environ.get("AQLMKIT_KERNEL", ""), x.dtype, x.device, grad,
               codes.data_ptr(), codes._version, codebooks.data_ptr(), codebooks._version,
               scales.data_ptr(), scales._version,
               None if bias is None else (bias.data_ptr(), bias._version))
    except RuntimeError:  # parameters created under inference_mode have no version counter
        return aqlm_linear(x, codes, codebooks, scales, bias)
    entry = cache.get("entry")
    if entry is None or entry[0] != key:
        name = select(x, codes, codebooks)
        backend = _BACKENDS.get(name)
        packed = None
        if backend is not None and backend.pack is not None and backend.run_packed is not None:
            packed = backend.pack(codes, codebooks, scales, bias)
        entry = (key, name, backend, packed)
        cache["entry"] = entry
    _, name, backend, packed = entry
    if backend is None:
        return reference.aqlm_linear(x, codes, codebooks, scales, bias)
    if backend.run_packed is None:
        return backend.run(x, codes, codebooks, scales, bias)
    return backend.run_packed(packed, x, codes, codebooks, scales, bias)


__all__ = ["Backend", "register_backend", "backends", "select", "aqlm_linear", "aqlm_linear_cached",
           "reference"]
