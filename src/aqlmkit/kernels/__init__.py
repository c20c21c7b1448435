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


_BACKENDS: dict[str, Backend] = {}
_LOADED = False
_BACKEND_MODULES = ("aqlmkit.kernels.cpu", "aqlmkit.kernels.cuda")


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


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
    """Name of the backend that will run this call."""
    forced = os.environ.get("AQLMKIT_KERNEL", "")
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


__all__ = ["Backend", "register_backend", "backends", "select", "aqlm_linear", "reference"]
