"""Fine-tune one quantized block's continuous parameters to match the fp block's outputs.

After its linears are quantized, a block's codebooks, scales, norms and biases are still
continuous; Adam on the output MSE (relative to the target's power) recovers much of the error
the layer-wise objective could not see (AQLM paper, sec. 3.3). Codes stay fixed here. A held-out
split drives early stopping and we keep the best state, so fine-tuning never makes things worse
on held-out data than not fine-tuning.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from aqlmkit.config import FinetuneConfig
from aqlmkit.pipeline.activations import block_forward


@dataclass
class BlockFinetuneStats:
    loss_before: float
    loss_after: float
    epochs: int
    train_loss: float | None = None


def trainable_params(block: nn.Module) -> list[nn.Parameter]:
    """Every floating-point parameter of the block (codebooks, scales, norms, biases, routers)."""
    params = []
    for p in block.parameters():
        if p.is_floating_point():
            params.append(p)
    return params


def _rel_mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (y.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-20)


@torch.no_grad()
def _eval(block, inps, targets, idx, kw, device, mb) -> float:
    total = 0.0
    for s in range(0, len(idx), mb):
        b = idx[s:s + mb]
        total += _rel_mse(block_forward(block, inps[b].to(device), kw), targets[b].to(device)).item() * len(b)
    return total / max(len(idx), 1)


def _split(n: int, cfg: FinetuneConfig) -> tuple[list[int], list[int]]:
    n_val = max(1, round(n * cfg.val_fraction)) if n >= 2 and cfg.val_fraction > 0 else 0
    return list(range(n - n_val)), list(range(n - n_val, n)) or list(range(n))


def finetune_block(block: nn.Module, inps: torch.Tensor, targets: torch.Tensor, kw: dict,
                   cfg: FinetuneConfig, device, seed: int, desc: str = "block",
                   progress: bool = True) -> BlockFinetuneStats:
    """Adam on relative MSE; early stopping on the validation split; restores the best state."""
    train, val = _split(inps.shape[0], cfg)
    bs = max(1, cfg.batch_size)
    before = _eval(block, inps, targets, val, kw, device, bs)
    if cfg.epochs <= 0 or not train:
        return BlockFinetuneStats(before, before, 0)
    params = trainable_params(block)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad, epochs, last = before, copy.deepcopy(block.state_dict()), 0, 0, None
    steps = cfg.epochs * ((len(train) + bs - 1) // bs)
    bar = tqdm(total=steps, desc=f"finetune {desc}", leave=False, disable=not progress)
    try:
        for epoch in range(cfg.epochs):
            order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
            for s in range(0, len(order), bs):
                b = order[s:s + bs]
                with torch.enable_grad():
                    loss = _rel_mse(block_forward(block, inps[b].to(device), kw), targets[b].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                last = loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{last:.3e}", val=f"{best:.3e}")
            epochs = epoch + 1
            v = _eval(block, inps, targets, val, kw, device, bs)
            if v < best:
                best, best_state, bad = v, copy.deepcopy(block.state_dict()), 0
            else:
                bad += 1
                if bad >= max(1, cfg.early_stop):
                    break
    finally:
        bar.close()
        block.load_state_dict(best_state)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return BlockFinetuneStats(before, best, epochs, last)
