"""torch.compile settings shared by the decode loops (StaticDecoder and the serving Engine)."""
from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Callable

import torch


def compile_step(fn: Callable, device: torch.device, *, fullgraph: bool = True, freeze: bool = True,
                 cuda_graphs: bool = False) -> Callable:
    """A compiled copy of a decode-step function with its own dynamo cache.

    ``isolate_recompiles``: each copy (a decoder, or one batch bucket of the engine) keeps its own
    compiled entries, so several never evict each other nor share dynamo's recompile limit.
    ``freezing``: weights become constants of the graph (inductor may pre-pack them), so weights
    edited after the first call are not seen: build a new decoder/engine then. ``cuda_graphs`` on
    a CUDA device also captures the graph as a CUDA graph ("reduce-overhead"; launch cost
    dominates small batches); the tensors it mutates must be static addresses (SlotCache's are).
    """
    opts: dict = {"fullgraph": fullgraph, "dynamic": False, "options": {"freezing": freeze}}
    if cuda_graphs and device.type == "cuda":
        opts = {"fullgraph": fullgraph, "dynamic": False, "mode": "reduce-overhead"}
    try:
        return torch.compile(fn, isolate_recompiles=True, **opts)
    except TypeError:  # a torch without isolate_recompiles
        return torch.compile(fn, **opts)


def steady_stance(first: bool, enabled: bool = True):
    """Steady-state calls skip dynamo's guard checks (~1-2 ms per call on a 30-block model).

    Only for calls that pass the same model, cache and shapes as the first (guarded) call of the
    same compiled copy, which is how both decode loops use it.
    """
    if first or not enabled:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def cuda_graph_thread_state() -> None:
    """Give the calling thread the thread-local state CUDA-graph trees need.

    torch <= 2.11 sets it up only in the thread that imported ``cudagraph_trees`` (and in autograd's
    threads): a compiled "reduce-overhead" step run from any other thread, such as the serving
    engine's loop after a first engine's thread had imported it, dies on an assertion. Newer torch
    initialises it lazily; there this is a no-op.
    """
    from torch._inductor import cudagraph_trees as cgt

    if hasattr(cgt, "_initialize_tls") or hasattr(cgt.local, "tree_manager_containers"):
        return
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    cgt.local.tree_manager_containers = {}
    cgt.local.tree_manager_locks = defaultdict(threading.Lock)
