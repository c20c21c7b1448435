"""Calibration and fine-tuning over torch.distributed: one process per device, launched by torchrun.

Each rank holds a contiguous, micro-batch-aligned shard of the calibration samples (and so of the
activations). What the ranks must agree on goes through the few helpers below:

* sums (XᵀX, gradients, losses) are reduced in rank order on rank 0 and broadcast back, so the
  result depends only on the world size, never on timing, and every rank holds the same bits;
* module states (a linear quantized on its owner rank, a block restored from the checkpoint) are
  broadcast tensor by tensor;
* rank 0 owns every file; whatever it does alone runs through :meth:`Dist.on_main`, which hands
  the result, or the user error, to every rank;
* a gloo side group runs monitored barriers, so a rank that died or hangs is named (rank and host)
  within the timeout instead of stalling the job.

NCCL serves CUDA ranks and gloo CPU ranks. A world of one behaves exactly like a single process.
"""
from __future__ import annotations

import os
import re
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from aqlmkit.errors import AqlmkitError

RESUME = "rerun the same command to resume from the last finished block"
_NO_NCCL = (torch.int16, torch.bool, torch.uint16, torch.uint32)


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def shard_bounds(n: int, world: int, rank: int, align: int = 1) -> tuple[int, int]:
    """Contiguous row range of ``rank``: whole ``align``-row micro-batches, earlier ranks first.

    Aligning to micro-batches keeps each rank's forward passes on the same row groups a single
    process would use; a rank may get no rows when there are fewer micro-batches than ranks.
    """
    units = (n + align - 1) // align
    per, extra = divmod(units, world)
    lo = rank * per + min(rank, extra)
    hi = lo + per + (1 if rank < extra else 0)
    return min(lo * align, n), min(hi * align, n)


class Dist:
    """The process group of this job plus the collectives the pipeline needs."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: float,
                 side_group=None, hosts: list[str] | None = None) -> None:
        self.rank, self.world, self.device, self.timeout_s = rank, world, device, timeout_s
        self.side = side_group
        self.hosts = hosts or [socket.gethostname()] * world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = 1800.0) -> "Dist":
        """Join the group torchrun describes in the environment (NCCL for cuda, gloo for cpu)."""
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        timeout = timedelta(seconds=timeout_s)
        if str(device).startswith("cuda"):
            if not torch.cuda.is_available():
                raise AqlmkitError("--device cuda was given but no CUDA device is available; use --device cpu")
            if local >= torch.cuda.device_count():
                raise AqlmkitError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): "
                                   "lower --nproc_per_node to the number of GPUs")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
            backend = "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            kw = {"device_id": dev} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=timeout, **kw)
        side = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        hosts: list[Any] = [None] * world
        dist.all_gather_object(hosts, socket.gethostname(), group=side)
        return cls(rank, world, dev, timeout_s, side, hosts)

    # --------------------------------------------------------------------------- layout
    def bounds(self, n: int, align: int = 1) -> tuple[int, int]:
        return shard_bounds(n, self.world, self.rank, align)

    def counts(self, n: int, align: int = 1) -> list[int]:
        return [hi - lo for lo, hi in (shard_bounds(n, self.world, r, align) for r in range(self.world))]

    # --------------------------------------------------------------------------- agreement
    def barrier(self, what: str) -> None:
        """All ranks reach ``what``, or one line naming the ranks (and hosts) that did not."""
        if self.world == 1:
            return
        try:
            dist.monitored_barrier(group=self.side, timeout=timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            raise AqlmkitError(self._missing(str(e), what)) from None

    def _missing(self, err: str, what: str) -> str:
        ranks = sorted({int(r) for m in re.finditer(r"[Rr]anks? ([\d, ]+)", err)
                        for r in re.findall(r"\d+", m.group(1)) if int(r) < self.world} - {self.rank})
        if ranks:
            who = ", ".join(f"rank {r} on {self.hosts[r]}" for r in ranks)
            return (f"{who} did not reach '{what}' within {self.timeout_s:g} s (it died or hangs); "
                    f"{RESUME}, with --dist-timeout raised if that rank is just slow")
        return f"rank {self.rank}: the job group broke at '{what}' ({err.splitlines()[0][:200]}); {RESUME}"

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on rank 0 only; every rank returns its result or raises its user error."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except AqlmkitError as e:
                box[0] = ("error", str(e))
            except OSError as e:
                box[0] = ("error", f"{what}: {e.strerror or e}: {e.filename or ''}; check the path, its "
                                   "permissions and the free disk space")
        self.barrier(what)
        dist.broadcast_object_list(box, src=0, group=self.side)
        kind, value = box[0]
        if kind == "error":
            raise AqlmkitError(value)
        return value

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.side)
        return box[0]

    # --------------------------------------------------------------------------- tensors
    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor as the backend can carry it: on the rank's GPU for NCCL, no int16/bool there."""
        w = t.detach()
        if self.device.type == "cuda":
            w = w.to(self.device)
            if w.dtype in _NO_NCCL:
                w = w.to(torch.int32)
        return w.contiguous()

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank's ``t`` takes rank ``src``'s values."""
        if self.world == 1:
            return t
        w = self._wire(t)
        dist.broadcast(w, src=src)
        if w.data_ptr() != t.data_ptr():
            t.copy_(w.to(device=t.device, dtype=t.dtype))
        return t

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Every parameter and buffer of ``module`` takes rank ``src``'s values (same structure)."""
        with torch.no_grad():
            for t in module.state_dict(keep_vars=True).values():
                self.broadcast_(t.data if isinstance(t, nn.Parameter) else t, src)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum over ranks, added in rank order on rank 0, then broadcast."""
        if self.world == 1:
            return t
        w = self._wire(t)
        if self.is_main:
            buf = torch.empty_like(w)
            for r in range(1, self.world):
                dist.recv(buf, src=r)
                w.add_(buf)
        else:
            dist.send(w, dst=0)
        dist.broadcast(w, src=0)
        if w.data_ptr() != t.data_ptr():
            t.copy_(w.to(device=t.device, dtype=t.dtype))
        return t

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Rank 0 gets the shards concatenated in rank order (on CPU); the others get None."""
        if self.world == 1:
            return local
        tail = tuple(local.shape[1:])
        if not self.is_main:
            if local.shape[0]:
                dist.send(self._wire(local), dst=0)
            return None
        parts = [local.detach().cpu()]
        for r in range(1, self.world):
            if counts[r]:
                buf = self._wire(torch.empty((counts[r], *tail), dtype=local.dtype))
                dist.recv(buf, src=r)
                parts.append(buf.to(device="cpu", dtype=local.dtype))
        return torch.cat(parts, 0)

    def scatter_rows(self, full: torch.Tensor | None, counts: list[int], like: torch.Tensor) -> torch.Tensor:
        """Rank r gets rows of its shard of rank 0's ``full``; ``like`` gives shape tail and dtype."""
        if self.world == 1:
            return full if full is not None else like
        tail, dtype = tuple(like.shape[1:]), like.dtype
        if self.is_main:
            assert full is not None
            offsets = [sum(counts[:r]) for r in range(self.world)]
            for r in range(1, self.world):
                if counts[r]:
                    dist.send(self._wire(full[offsets[r]:offsets[r] + counts[r]]), dst=r)
            return full[: counts[0]].to(like.device)
        buf = self._wire(torch.empty((counts[self.rank], *tail), dtype=dtype))
        if counts[self.rank]:
            dist.recv(buf, src=0)
        return buf.to(device=like.device, dtype=dtype)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
