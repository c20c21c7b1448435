"""Fine-tune one quantized block's continuous parameters to match the fp block's outputs.

After its linears are quantized, a block's codebooks, scales, norms and biases are still
continuous; Adam on the output MSE (relative to the target's power) recovers much of the error
the layer-wise objective could not see (AQLM paper, sec. 3.3). Codes stay fixed here. A held-out
split drives early stopping and we keep the best state, so fine-tuning never makes things worse
on held-out data than not fine-tuning.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from aqlmkit.config import FinetuneConfig
from aqlmkit.pipeline.activations import block_forward
from aqlmkit.pipeline.precision import cast_floats, float32_training


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


def _fwd(block: nn.Module, x: torch.Tensor, kw: dict, device) -> torch.Tensor:
    """The block's output on ``x`` computed in the block's own dtype (float32 while it trains)."""
    dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), x.dtype)
    return block_forward(block, x.to(device=device, dtype=dtype), kw)


def _rel_mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (y.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-20)


@torch.no_grad()
def _eval(block, inps, targets, idx, kw, device, mb) -> float:
    total = 0.0
    for s in range(0, len(idx), mb):
        b = idx[s:s + mb]
        total += _rel_mse(_fwd(block, inps[b], kw, device), targets[b].to(device)).item() * len(b)
    return total / max(len(idx), 1)


def _split(n: int, cfg: FinetuneConfig) -> tuple[list[int], list[int]]:
    n_val = max(1, round(n * cfg.val_fraction)) if n >= 2 and cfg.val_fraction > 0 else 0
    return list(range(n - n_val)), list(range(n - n_val, n)) or list(range(n))


def finetune_block(block: nn.Module, inps: torch.Tensor, targets: torch.Tensor, kw: dict,
                   cfg: FinetuneConfig, device, seed: int, desc: str = "block",
                   progress: bool = True, dist=None) -> BlockFinetuneStats:
    """Adam on relative MSE; early stopping on the validation split; restores the best state.

    With ``dist`` the rows are this rank's shard and the fine-tuning is data-parallel
    (``_Shards``): the same batches, losses and decisions as one process, up to summation order.
    The block trains in float32 and keeps its own dtypes afterwards (``pipeline.precision``).
    """
    original = None
    with float32_training(block) as cast:
        if cast:
            original = {k: v.clone() for k, v in block.state_dict().items()}
        stats = _finetune(block, inps, targets, cast_floats(kw, torch.float32), cfg, device, seed, desc,
                          progress, dist)
    if cast and stats.epochs:
        # the kept state was judged in float32; report it as stored (rounded to the block's dtype)
        shards = _Shards(dist, inps, targets) if dist is not None else None
        val = _split(shards.n if shards is not None else inps.shape[0], cfg)[1]
        evaluate = shards.eval if shards is not None else _eval
        stats.loss_after = evaluate(block, inps, targets, val, kw, device, max(1, cfg.batch_size))
        if stats.loss_after > stats.loss_before:  # the rounding undid the gain: keep the block as given
            block.load_state_dict(original)
            stats.loss_after = stats.loss_before
    return stats


def _finetune(block, inps, targets, kw, cfg, device, seed, desc, progress, dist) -> BlockFinetuneStats:
    if dist is not None:
        shards = _Shards(dist, inps, targets)
        train, val = _split(shards.n, cfg)
    else:
        shards = None
        train, val = _split(inps.shape[0], cfg)
    bs = max(1, cfg.batch_size)
    evaluate = shards.eval if shards is not None else _eval
    before = evaluate(block, inps, targets, val, kw, device, bs)
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
                if shards is not None:
                    last = shards.step(block, params, opt, b, kw, device)
                else:
                    with torch.enable_grad():
                        loss = _rel_mse(_fwd(block, inps[b], kw, device), targets[b].to(device))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    opt.step()
                    last = loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{last:.3e}", val=f"{best:.3e}")
            epochs = epoch + 1
            v = evaluate(block, inps, targets, val, kw, device, bs)
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


class _Shards:
    """Data-parallel block fine-tuning over row shards (rank r holds global rows [lo, hi)).

    The single-process loss of a batch is mean((y-t)^2) / mean(t^2) over its rows; here each rank
    adds its rows' share of the numerator, divided by the batch's global denominator (from the
    per-sample target powers, summed once), so the rank sum is the same loss and the summed
    gradients are its gradient. Sums go through ``dist.sum_``: every rank gets identical bits, takes
    the identical Adam step and the identical early-stopping decision.
    """

    def __init__(self, dist, inps: torch.Tensor, targets: torch.Tensor) -> None:
        self.dist, self.inps, self.targets = dist, inps, targets
        counts = torch.zeros(dist.world, dtype=torch.int64)
        counts[dist.rank] = inps.shape[0]
        counts = dist.sum_(counts).tolist()
        self.n, self.lo = sum(counts), sum(counts[: dist.rank])
        self.hi = self.lo + inps.shape[0]
        self.numel = math.prod(targets.shape[1:])
        power = torch.zeros(self.n, dtype=torch.float64)
        for i in range(self.hi - self.lo):
            power[self.lo + i] = float(targets[i].double().pow(2).sum())
        self.power = dist.sum_(power)

    def _local(self, b: list[int]) -> list[int]:
        return [i - self.lo for i in b if self.lo <= i < self.hi]

    def _scale(self, b: list[int]) -> float:
        """1 / (elements * clamped mean target power) of batch ``b``, as ``_rel_mse`` normalises."""
        elems = len(b) * self.numel
        return 1.0 / (elems * max(float(self.power[b].sum()) / elems, 1e-20))

    def _num(self, block, rows: list[int], kw, device) -> torch.Tensor:
        y = _fwd(block, self.inps[rows], kw, device)
        return (y.float() - self.targets[rows].to(device).float()).pow(2).sum()

    def step(self, block, params, opt, b: list[int], kw, device) -> float:
        rows = self._local(b)
        opt.zero_grad(set_to_none=True)
        dev = params[0].device
        loss = torch.zeros((), device=dev)
        if rows:
            with torch.enable_grad():
                loss = self._num(block, rows, kw, device) * self._scale(b)
                loss.backward()
        flags = torch.tensor([float(p.grad is not None) for p in params], device=dev)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params] + [flags, loss.detach().reshape(1).float().to(dev)])
        self.dist.sum_(flat)
        off = 0
        for p in params:
            p.grad = flat[off:off + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
            off += p.numel()
        for p in params:  # a parameter no rank's rows reached keeps no gradient, as in one process
            if flat[off] == 0:
                p.grad = None
            off += 1
        opt.step()
        return float(flat[off])

    @torch.no_grad()
    def eval(self, block, inps, targets, idx: list[int], kw, device, mb: int) -> float:
        batches = [idx[s:s + mb] for s in range(0, len(idx), mb)]
        nums = torch.zeros(len(batches), dtype=torch.float64)
        for j, b in enumerate(batches):
            rows = self._local(b)
            if rows:
                nums[j] = float(self._num(block, rows, kw, device))
        self.dist.sum_(nums)
        total = sum(float(nums[j]) * self._scale(b) * len(b) for j, b in enumerate(batches))
        return total / max(len(idx), 1)
