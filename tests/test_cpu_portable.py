"""The CPU kernels' non-AVX-512 code paths, built and checked for real.

The default build uses -march=native, which on the AVX-512 machines here never compiles the
portable (scalar / AVX2) branches. A user on another CPU gets those branches, so this test builds
a second binary with AVX-512 disabled and reruns the correctness tests against the reference.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 flags")
def test_portable_build_matches_reference():
    env = {**os.environ, "AQLMKIT_CPU_CFLAGS": "-mno-avx512f", "OMP_NUM_THREADS": "2"}
    select = "paths_match or dtypes_bias or odd_shapes or small_nbits or packed_lut or half_linear or repacks"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_cpu_kernels.py"),
         "-k", select],
        env=env, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], tail
