"""CPU thread control for the engine.

The engine runs thousands of small matmuls/argmins (code search, k-means); with several OpenMP
threads the fork/join cost dominates and explodes when other processes compete for the cores
(measured on the shared 2-core box: a [576,8]x[8,256] matmul took 15 ms with 2 threads vs 0.04 ms
with 1). So on CPU the engine runs with ``AQLMKIT_ENGINE_THREADS`` threads (default 1); callers
that want both cores can quantize two layers at once in Python threads (torch releases the GIL).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

_LOCK = threading.Lock()
_DEPTH = 0
_SAVED = 0


def engine_threads() -> int:
    return max(1, int(os.environ.get("AQLMKIT_ENGINE_THREADS", "1")))


@contextlib.contextmanager
def cpu_threads(device: torch.device) -> Iterator[None]:
    """Limit intra-op threads while any engine call runs on CPU (re-entrant, thread-safe)."""
    global _DEPTH, _SAVED
    if device.type != "cpu":
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            _SAVED = torch.get_num_threads()
            torch.set_num_threads(engine_threads())
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                torch.set_num_threads(_SAVED)


@contextlib.contextmanager
def exact_matmul(device: torch.device) -> Iterator[None]:
    """Full fp32 matmuls on GPU: TF32 would perturb the argmin over nearly tied codewords."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
