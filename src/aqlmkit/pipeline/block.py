"""Quantize one decoder block: stage by stage, then fine-tune it as a whole.

Within a block the stages run in order (q/k/v, then o, then gate/up, then down): the Hessian of
a later stage is collected with the earlier stages already quantized, so each layer learns to
compensate its predecessors' error (AQLM paper, sec. 3.3).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from aqlmkit.config import FinetuneConfig, LayerQuantConfig, Scheme
from aqlmkit.engine.metrics import relative_error
from aqlmkit.nn import QuantizedLinear
from aqlmkit.nn.linear import is_skipped
from aqlmkit.pipeline.activations import block_forward, run_block
from aqlmkit.pipeline.block_finetune import finetune_block
from aqlmkit.pipeline.hessian import HessianAccumulator


def quantize_linear(weight, hessian, scheme, cfg, *, name="", progress=True):
    """Indirection to the engine, imported lazily (tests may substitute a stand-in)."""
    from aqlmkit.engine import quantize_linear as engine_quantize

    return engine_quantize(weight, hessian, scheme, cfg, name=name, progress=progress)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


@torch.no_grad()
def collect_hessians(block, groups, inps, kw, device, mb, prefix, reduce=None) -> dict:
    acc = HessianAccumulator(block, groups, prefix)
    try:
        for s in range(0, inps.shape[0], mb):
            block_forward(block, inps[s:s + mb].to(device), kw)
    finally:
        hs = acc.finish({g.names: block.get_submodule(g.names[0]).in_features for g in groups}, reduce)
    return hs


def assign_units(costs: list[int], world: int) -> list[int]:
    """Owner rank of each unit: longest first to the least-loaded rank (ties: lowest rank).

    AQ time grows with a layer's weight count at a fixed scheme, so out*in is the cost estimate.
    """
    load, owner = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + costs[i]
    return owner


def _quantize_stage_spread(block, units, hs, scheme, layer_cfg, prefix, tick, dist) -> list[dict]:
    """Each rank quantizes the linears it owns; then every result is broadcast from its owner."""
    shapes = [(block.get_submodule(n).out_features, block.get_submodule(n).in_features) for _, n in units]
    owner = assign_units([o * i for o, i in shapes], dist.world)
    mine = {}
    for (key, n), r in zip(units, owner):
        if r == dist.rank:
            h, tokens = hs[key]
            [st] = _quantize_group(block, [n], h, scheme, layer_cfg, prefix, lambda *_: None)
            mine[n] = {**st, "tokens": tokens}
    stats = []
    for (_, n), r in zip(units, owner):
        if r != dist.rank:
            lin = block.get_submodule(n)
            set_submodule(block, n, QuantizedLinear(lin.in_features, lin.out_features, scheme,
                                                    bias=lin.bias is not None, device=lin.weight.device,
                                                    dtype=lin.weight.dtype))
        q = block.get_submodule(n)
        dist.broadcast_module(q, src=r)
        q.invalidate_kernel_cache()
        st = {**dist.broadcast_object(mine.get(n), src=r), "rank": r}
        tick(st["name"], st["rel_error"])
        stats.append(st)
    return stats


def _quantize_group(block, names, hessian, scheme, layer_cfg, prefix, tick) -> list[dict]:
    stats = []
    for n in names:
        lin = block.get_submodule(n)
        t0 = time.time()
        w = lin.weight.detach().float()
        qw = quantize_linear(w, hessian.to(w.device), scheme, layer_cfg, name=prefix + n, progress=False)
        q = QuantizedLinear.from_quantized(qw, lin.bias, dtype=lin.weight.dtype).to(lin.weight.device)
        err = relative_error(w, q.dequantize().float(), hessian.to(w.device))
        set_submodule(block, n, q)
        stats.append({"name": prefix + n, "rel_error": err, "seconds": round(time.time() - t0, 3),
                      "shape": [lin.out_features, lin.in_features]})
        tick(prefix + n, err)
    return stats


def quantize_block(block: nn.Module, idx: int, stages, inps: torch.Tensor, kw: dict, scheme: Scheme,
                   layer_cfg: LayerQuantConfig, ft_cfg: FinetuneConfig, device, skip=(), micro_batch: int = 8,
                   tick: Callable[[str, float], None] = lambda n, e: None, progress: bool = True,
                   prefix: str = "", dist=None) -> tuple[torch.Tensor, dict]:
    """Quantize ``block`` in place; returns (inputs of the next block, stats).

    With ``dist`` (a world of several ranks) ``inps`` is this rank's shard of the samples: XᵀX is
    summed over the ranks, the linears of a stage are spread over them by cost, and the block
    fine-tuning is data-parallel; every rank ends with the same block.
    """
    t0 = time.time()
    spread = dist is not None and dist.world > 1
    targets = run_block(block, inps, kw, device, micro_batch, what=f"fp block {idx}")
    linears = []
    for si, stage in enumerate(stages):
        groups = [g for g in stage if not all(is_skipped(prefix + n, skip) for n in g.names)]
        if not groups:
            continue
        if spread:
            dist.barrier(f"block {idx} stage {si}")
        hs = collect_hessians(block, groups, inps, kw, device, micro_batch, prefix,
                              reduce=dist.sum_ if spread else None)
        units = [(g.names, n) for g in groups for n in g.names if not is_skipped(prefix + n, skip)]
        if spread:
            linears += _quantize_stage_spread(block, units, hs, scheme, layer_cfg, prefix, tick, dist)
            continue
        for key, n in units:
            h, tokens = hs[key]
            for s in _quantize_group(block, [n], h, scheme, layer_cfg, prefix, tick):
                s["tokens"] = tokens
                linears.append(s)
    if spread:
        dist.barrier(f"block {idx} fine-tuning")
    ft = finetune_block(block, inps, targets, kw, ft_cfg, device, seed=ft_cfg.seed * 100003 + idx,
                        desc=f"block {idx}", progress=progress, dist=dist if spread else None)
    del targets
    outs = run_block(block, inps, kw, device, micro_batch, what=f"quantized block {idx}")
    stats = {"block": idx, "linears": linears, "finetune_loss_before": ft.loss_before,
             "finetune_loss_after": ft.loss_after, "finetune_epochs": ft.epochs,
             "seconds": round(time.time() - t0, 3)}
    return outs, stats
