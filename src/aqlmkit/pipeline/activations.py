"""Capturing and replaying decoder-block inputs on the calibration set.

AQLM calibrates one block at a time, so we need each block's input hidden states and the extra
arguments the block is called with (attention mask, rotary cos/sin, position ids). Those extras
depend only on the token positions, so we record them per block from one full forward of a single
sample, and replay every sample with them (batch-1 tensors broadcast over a micro-batch).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aqlmkit.errors import AqlmkitError

_CACHE_KEYS = ("past_key_values", "past_key_value", "cache", "cache_position")


class _Stop(Exception):
    """Raised inside block 0 to end a forward once its input is recorded."""


def _to(obj: Any, device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                         device: str | torch.device, store_device: str | torch.device
                         ) -> tuple[torch.Tensor, list[dict]]:
    """Block-0 inputs for every sample ``[n, seqlen, hidden]`` and per-block call kwargs."""
    kwargs: list[dict | None] = [None] * len(blocks)
    first: list[torch.Tensor] = []

    def make_hook(i: int):
        def hook(_mod, args, kw):
            hidden = args[0] if args else kw["hidden_states"]
            if kwargs[i] is None:
                kept = {k: v for k, v in kw.items() if k not in _CACHE_KEYS and k != "hidden_states"}
                kept["use_cache"] = False
                kwargs[i] = _to(kept, device)
            if i == 0:
                first.append(hidden.detach().to(store_device))
                if all(k is not None for k in kwargs):
                    raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for row in ids:
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in kwargs):
        raise AqlmkitError("could not record the inputs of every decoder block: the model's forward "
                           "does not call its blocks in order")
    return torch.cat(first, 0), kwargs  # type: ignore[return-value]


def check_finite(t: torch.Tensor, what: str) -> None:
    """Stop early and name the culprit rather than quantizing garbage downstream."""
    if not torch.isfinite(t).all():
        raise AqlmkitError(f"NaN/Inf in {what}: the model overflows in this dtype; retry with "
                           "--dtype float32 or skip that layer")


def block_forward(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(x, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inps: torch.Tensor, kw: dict, device, micro_batch: int = 8,
              out_device=None, what: str = "block") -> torch.Tensor:
    """Outputs of ``block`` on all samples, computed in micro-batches on ``device``."""
    if inps.shape[0] == 0:  # a rank whose shard is empty: decoder blocks keep the hidden shape
        return inps.to(out_device or inps.device).clone()
    outs = []
    for s in range(0, inps.shape[0], micro_batch):
        y = block_forward(block, inps[s:s + micro_batch].to(device), kw)
        outs.append(y.to(out_device or inps.device))
    out = torch.cat(outs, 0)
    check_finite(out, f"the output of {what}")
    return out
