"""Running a job over several processes: torchrun for one machine, and joining the group it made.

``aqlmkit quantize --nproc N`` is shorthand for ``torchrun --standalone --nproc_per_node N -m
aqlmkit quantize ...``; several machines use torchrun directly (``--nnodes``, ``--rdzv-endpoint``).
"""
from __future__ import annotations

import os
import subprocess
import sys

from aqlmkit.errors import AqlmkitError


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run this command again as ``nproc`` torchrun workers on this machine; their exit status."""
    if nproc < 1:
        raise AqlmkitError(f"--nproc must be >= 1 (got {nproc})")
    if "RANK" in os.environ:
        raise AqlmkitError("--nproc was given inside a torchrun worker: use either torchrun or --nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "aqlmkit", *strip_flag(argv, "--nproc")]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                           str(max(1, (os.cpu_count() or 1) // nproc)))}
    return subprocess.call(cmd, env=env)


def join(device: str, timeout_s: float):
    """The job's process group when launched by torchrun, else None (a single process)."""
    from aqlmkit.pipeline.distributed import Dist, launched

    if not launched():
        return None
    if not timeout_s > 0:
        raise AqlmkitError(f"--dist-timeout must be a positive number of seconds (got {timeout_s})")
    return Dist.from_env(device, timeout_s)
