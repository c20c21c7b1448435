"""Compile the CUDA sources with nvcc for every GPU arch users have, on a machine without a GPU (CI).

Why: the kernels can only run on a GPU, but compile errors, register spills and binding mistakes
show up here; this keeps a broken .cu from reaching the (scarce) GPU runs. The .cu files are
compiled to object files in a temp dir; the torch binding (.cpp) gets a g++ syntax check.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels import cuda as kcuda
from aqlmkit.kernels._build import CSRC

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def cuda_home() -> Path:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    for cand in (Path(os.path.realpath(NVCC)).parent.parent, Path("/usr/local/cuda")):
        if (cand / "include" / "cuda_runtime.h").exists():
            return cand
    pytest.skip("CUDA headers not found (set CUDA_HOME)")


def torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    try:
        return include_paths(device_type="cpu")
    except TypeError:  # older torch: include_paths(cuda=False)
        return include_paths(False)


def newest_arch() -> int:
    """The newest compute capability this nvcc targets (`nvcc --list-gpu-arch`, e.g. 121)."""
    r = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    archs = [int(a.split("_")[1]) for a in r.stdout.split() if a.startswith("compute_")
             and a.split("_")[1].isdigit()]
    assert archs, r.stdout + r.stderr
    return max(archs)


def compile_cu(src: Path, out: Path, arch: int, sweep: bool) -> subprocess.CompletedProcess:
    inc = [f"-I{p}" for p in [str(CSRC), *torch_includes()]]
    cmd = [NVCC, "-c", str(src), "-o", str(out), "-Xptxas=-v", *kcuda.cuda_flags([arch]), *inc,
           *(["-DAQLMKIT_ARCH_SWEEP"] if sweep else [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def compile_all(jobs, tmp_path, sweep: bool = False) -> None:
    """Compile (source, arch) pairs in parallel; no errors, and no spill over 64 bytes."""
    def one(job):
        src, arch = job
        out = tmp_path / f"{src.stem}_sm{arch}.o"
        return compile_cu(src, out, arch, sweep), out

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(one, jobs))
    for (src, arch), (r, out) in zip(jobs, results):
        assert r.returncode == 0, f"{src.name} failed to compile for sm_{arch}:\n{r.stderr[-4000:]}"
        assert out.stat().st_size > 0
        spills = [ln for ln in r.stderr.splitlines() if "spill stores" in ln
                  and not ln.strip().startswith("0 bytes stack frame, 0 bytes spill")]
        big = [ln for ln in spills if int(ln.split("bytes spill stores")[0].split(",")[-1]) > 64]
        assert not big, f"{src.name} sm_{arch}: register spills over 64 bytes:\n" + "\n".join(big)


CU_SOURCES = [CSRC / s for s in kcuda.SOURCES if s.endswith(".cu")]
# One file of each kernel family (their other files instantiate the same templates for another
# scheme) for every other arch users have: T4 (75), A100 (80), RTX 30 (86), RTX 40/L4 (89) and
# the newest nvcc offers (its PTX is what forward compatibility rests on); sm_90 (H100/H200)
# compiles everything below. The sweep instantiates each dtype's smallest and largest batch
# bound only (AQLMKIT_ARCH_SWEEP), to keep the CI cost near 1.5 min on 2 cores.
FAMILY_SOURCES = ["aqlm_cuda_gemv_2x8g8.cu", "aqlm_cuda_lut_2x8g8.cu", "aqlm_cuda_mma_2x8g8.cu",
                  "aqlm_cuda_dequant.cu"]
USER_ARCHS = [75, 80, 86, 89]


@needs_nvcc
def test_every_kernel_family_compiles_for_every_user_arch(tmp_path):
    archs = USER_ARCHS + [newest_arch()]
    assert {CSRC / s for s in FAMILY_SOURCES} <= set(CU_SOURCES)
    compile_all([(CSRC / s, a) for a in archs for s in FAMILY_SOURCES], tmp_path, sweep=True)


@needs_nvcc
def test_all_sources_compile_for_hopper(tmp_path):
    """Every source with every instantiation for sm_90 (the arch the benchmarks run on)."""
    assert len(CU_SOURCES) >= 11
    compile_all([(s, 90) for s in CU_SOURCES], tmp_path)


def test_gencode_flags_cover_present_gpus_plus_ptx(monkeypatch):
    assert kcuda.gencode_flags([90, 75, 90]) == (
        "-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90")
    monkeypatch.setenv("AQLMKIT_CUDA_ARCHS", "8.6;7.5;61")
    assert kcuda.build_archs() == (75, 86)  # sm_61 is older than nvcc 13 builds for
    monkeypatch.setenv("AQLMKIT_CUDA_ARCHS", "6.1")
    with pytest.raises(AqlmkitError, match="7.5 or newer"):
        kcuda.build_archs()
    monkeypatch.setenv("AQLMKIT_CUDA_ARCHS", "sm90")
    with pytest.raises(AqlmkitError, match="AQLMKIT_CUDA_ARCHS"):
        kcuda.build_archs()


@pytest.mark.parametrize("cc", [75, 80, 86, 90, 120])
def test_dispatch_offers_only_paths_the_arch_has(cc, monkeypatch):
    """On sm_75 no lut/mma (m16n8k16 and > 64 KB of shared memory need sm_80): gemv or dequant."""
    monkeypatch.setattr(kcuda, "device_cc", lambda index=None: cc)
    monkeypatch.setattr(kcuda, "_PATH_ENV", "")
    for key in kcuda.DISPATCH:
        k, b, g = key
        codebooks = torch.zeros(k, 1 << b, 1, g, device="meta")
        for out_f, in_f in ((4096, 4096), (28672, 8192)):
            codes = torch.zeros(out_f, in_f // g, k, dtype=torch.int8 if b <= 8 else torch.int16,
                                device="meta")
            for batch in (1, 2, 4, 8, 16, 17, 64):
                path = kcuda.default_path(batch, codes, codebooks, in_f)
                assert cc >= kcuda.MIN_CC[path], (key, batch, path)
                assert kcuda.applies(path, batch, codes, codebooks, in_f)
                if cc >= 80 and batch <= 16:
                    assert path != "dequant"  # the tuned table still applies where it can
                if cc < 80 and batch <= 16:
                    assert path in ("gemv", "dequant")


# Minimal stand-ins for the two c10/cuda headers the binding uses, for CPU-only torch wheels
# (which ship no CUDA headers): enough for a syntax and type check of everything else.
STUB_HEADERS = {
    "c10/cuda/CUDAGuard.h": "#pragma once\n#include <c10/core/Device.h>\nnamespace c10 { namespace cuda {"
                            " struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; } }\n",
    "c10/cuda/CUDAStream.h": "#pragma once\n#include <cuda_runtime_api.h>\nnamespace c10 { namespace cuda {"
                             " struct CUDAStream { operator cudaStream_t() const { return nullptr; } };"
                             " inline CUDAStream getCurrentCUDAStream() { return {}; } } }\n",
}


@needs_nvcc
def test_binding_compiles(tmp_path):
    """g++ syntax check of the torch binding against torch's and CUDA's headers."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    import sysconfig

    inc = [str(CSRC), *torch_includes(), str(cuda_home() / "include"), sysconfig.get_paths()["include"]]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in torch_includes()):
        for rel, text in STUB_HEADERS.items():  # CPU-only torch wheel: stub the CUDA-side headers
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
        inc.insert(0, str(tmp_path))
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=aqlmkit_cuda_check",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{p}" for p in inc], str(CSRC / "aqlm_cuda.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
