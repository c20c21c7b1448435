"""RTN and GPTQ baselines through the same block-by-block harness as AQLM.

GPTQ needs each layer's Hessian on the (already quantized) upstream activations, exactly like
AQLM, so it reuses the capture/hook machinery; RTN needs no data. Both write dequantized weights
back into nn.Linear (fake quantization): we compare quality, not storage.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from aqlmkit.models import get_layout
from aqlmkit.pipeline.activations import capture_block_inputs, run_block
from aqlmkit.nn.linear import is_skipped
from aqlmkit.pipeline.block import collect_hessians


def baseline_bits(bits: int, group_size: int) -> float:
    """Storage bits per weight of group-wise asymmetric int quantization: fp16 scale + zero per group."""
    return bits + 32 / group_size


def _engine():
    from aqlmkit.engine import baselines

    return baselines


@torch.no_grad()
def rtn_model(model: nn.Module, bits: int, group_size: int, skip=()) -> nn.Module:
    layout = get_layout(model)
    for i, block in enumerate(layout.blocks):
        for n in layout.linear_names(i):
            lin = block.get_submodule(n)
            if not is_skipped(n, skip):
                lin.weight.data = _engine().rtn_quantize(lin.weight.data.float(), bits, group_size).to(lin.weight.dtype)
    return model


@torch.no_grad()
def gptq_model(model: nn.Module, ids: torch.Tensor, bits: int, group_size: int, device="cpu",
               skip=()) -> nn.Module:
    """Sequential GPTQ: each stage's H is taken with the earlier stages already quantized."""
    layout = get_layout(model)
    model.to(device)
    inps, kwargs = capture_block_inputs(model, layout.blocks, ids, device, device)
    for i, block in enumerate(layout.blocks):
        for stage in layout.stages(i):
            hs = collect_hessians(block, stage, inps, kwargs[i], device, 8, "")
            for g in stage:
                h, _ = hs[g.names]
                for n in g.names:
                    lin = block.get_submodule(n)
                    if not is_skipped(n, skip):
                        w = _engine().gptq_quantize(lin.weight.data.float(), h.to(device), bits, group_size)
                        lin.weight.data = w.to(lin.weight.dtype)
        inps = run_block(block, inps, kwargs[i], device, what=f"GPTQ block {i}")
    return model


def baseline_rows(fp_model: nn.Module, tokenizer, recipe, bits_target: float,
                  ppl: Callable[[nn.Module], dict], group_size: int = 128) -> list[dict]:
    """RTN and GPTQ rows at the integer bit width whose true cost is closest to ``bits_target``.

    ``ppl(model)`` returns the row's perplexity fields (``{"ppl": ..., "ood_ppl": ...}``).
    """
    from aqlmkit.pipeline.quantize import calibration_ids

    bits = max(2, round(bits_target - 32 / group_size))
    rows = []
    t = time.time()
    m = rtn_model(copy.deepcopy(fp_model), bits, group_size, recipe.calibration.skip)
    rows.append({"method": "RTN", "scheme": f"int{bits}g{group_size}",
                 "avg_bits": baseline_bits(bits, group_size), **ppl(m), "seconds": round(time.time() - t, 1)})
    del m
    t = time.time()
    ids = calibration_ids(tokenizer, recipe.calibration)
    m = gptq_model(fp_model, ids, bits, group_size, recipe.calibration.device, recipe.calibration.skip)
    rows.append({"method": "GPTQ", "scheme": f"int{bits}g{group_size}",
                 "avg_bits": baseline_bits(bits, group_size), **ppl(m), "seconds": round(time.time() - t, 1)})
    return rows
