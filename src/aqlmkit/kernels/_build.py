"""JIT-build C++/CUDA extensions once per (torch version, CPU features, source hash).

Why keyed like this: a cached .so built with ``-march=native`` on one CPU may crash with SIGILL on
another machine sharing the cache (a copied home folder, an NFS cache). The build folder therefore
carries a hash of the CPU feature flags and of the sources, so a different CPU or an edited source
always rebuilds instead of reusing a stale binary.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.utils import cache_dir

CSRC = Path(__file__).resolve().parent / "csrc"


def cpu_flags() -> str:
    """CPU model + feature flags (Linux /proc/cpuinfo), or the platform string elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = flags = ""
    for line in text.splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].strip()
    return f"{model}|{flags}"


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.M)


def local_headers(sources: Sequence[Path]) -> list[Path]:
    """The csrc headers the sources include, transitively (``#include "..."``): an edit to one
    rebuilds exactly the extensions that use it (the CPU build ignores the CUDA headers)."""
    seen: dict[Path, None] = {}
    todo = list(sources)
    while todo:
        for name in _INCLUDE.findall(Path(todo.pop()).read_bytes()):
            hdr = CSRC / name.decode()
            if hdr.exists() and hdr not in seen:
                seen[hdr] = None
                todo.append(hdr)
    return sorted(seen)


def _digest(sources: Sequence[Path], flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(Path(s).read_bytes())
    for extra in local_headers(sources):
        h.update(extra.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(cpu_flags().encode())
    return h.hexdigest()[:12]


def build_dir(name: str, sources: Sequence[Path], flags: Sequence[str]) -> Path:
    """``cache_dir()/torch_extensions/<torch version>/<name>-<hash>``, created."""
    tv = torch.__version__.replace("+", "_")
    path = cache_dir() / "torch_extensions" / tv / f"{name}-{_digest(sources, flags)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_compiler(cuda: bool) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        raise AqlmkitError(
            f"no C++ compiler found ({cxx!r} / g++ not on PATH): install one (e.g. apt-get install "
            "g++) or set AQLMKIT_KERNEL=reference to use the pure-PyTorch kernels"
        )
    if cuda and shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise AqlmkitError(
            "nvcc not found: install the CUDA toolkit or set CUDA_HOME, or set "
            "AQLMKIT_KERNEL=reference"
        )


def load_extension(
    name: str,
    sources: Sequence[str | Path],
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    verbose: bool | None = None,
    is_python_module: bool = True,
) -> ModuleType | str:
    """Compile (or reuse) and import an extension; raise AqlmkitError if it cannot be built.

    ``sources`` may be bare file names (looked up in ``kernels/csrc``) or paths. Sources that only
    register ``TORCH_LIBRARY`` ops (no pybind module) pass ``is_python_module=False``: the library
    is then loaded into the process, its ops appear under ``torch.ops``, and the .so path is returned.
    ``AQLMKIT_BUILD_VERBOSE=1`` shows the compiler output.
    """
    if verbose is None:
        verbose = os.environ.get("AQLMKIT_BUILD_VERBOSE", "") not in ("", "0")
    srcs = [Path(s) if Path(s).is_absolute() else CSRC / s for s in sources]
    missing = [str(s) for s in srcs if not s.exists()]
    if missing:
        raise AqlmkitError(f"kernel sources missing: {missing}; reinstall aqlmkit")
    cuda = any(s.suffix == ".cu" for s in srcs)
    _check_compiler(cuda)
    from torch.utils import cpp_extension

    flags = list(extra_cflags) + list(extra_cuda_cflags) + list(extra_ldflags)
    bdir = build_dir(name, srcs, flags)
    try:
        return cpp_extension.load(
            name=f"{name}_{bdir.name.rsplit('-', 1)[1]}",
            sources=[str(s) for s in srcs],
            extra_cflags=list(extra_cflags),
            extra_cuda_cflags=list(extra_cuda_cflags) or None,
            extra_ldflags=list(extra_ldflags) or None,
            build_directory=str(bdir),
            verbose=verbose,
            is_python_module=is_python_module,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError/OSError
        raise AqlmkitError(
            f"building the {name} kernel failed ({type(e).__name__}: {str(e)[-400:]}); set "
            "AQLMKIT_KERNEL=reference to skip it, or rerun with AQLMKIT_BUILD_VERBOSE=1 to see the "
            f"compiler output (build folder {bdir})"
        ) from e


__all__ = ["load_extension", "build_dir", "cpu_flags", "CSRC"]
