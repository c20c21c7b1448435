"""H = XᵀX of each input group, accumulated by forward hooks over all calibration tokens.

Linears of one group read the same tensor, so one hook on the group's first linear serves all
of them. For MoE experts the hook only sees the tokens routed to that expert, which is exactly
the Hessian of that expert's loss. H is kept in fp32 and divided by the token count (the scale
does not change the AQ objective's minimiser, but keeps numbers tame in long runs).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from aqlmkit.errors import AqlmkitError


class HessianAccumulator:
    """Forward hooks that sum xᵀx per group; ``finish()`` removes them and returns H per group."""

    def __init__(self, block: nn.Module, groups, prefix: str) -> None:
        self.sums: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.prefix = prefix
        self.handles = []
        for g in groups:
            lin = block.get_submodule(g.names[0])
            self.handles.append(lin.register_forward_hook(self._hook(g.names, lin.in_features)))

    def _hook(self, key: tuple, in_features: int):
        def hook(_mod, args, _out):
            x = args[0].detach().reshape(-1, in_features).float()
            if key not in self.sums:
                self.sums[key] = torch.zeros(in_features, in_features, dtype=torch.float32, device=x.device)
                self.counts[key] = 0
            self.sums[key].addmm_(x.T, x)
            self.counts[key] += x.shape[0]
        return hook

    def finish(self, in_features: dict[tuple, int], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> dict[tuple, tuple[torch.Tensor, int]]:
        """Per group (names tuple): (H, tokens). A group that saw no token (an expert no calibration
        token was routed to) gets the identity, i.e. plain weight MSE.

        ``reduce`` (data-parallel calibration) sums each group's XᵀX and token count over the ranks
        before normalising, in the groups' order, so every rank ends with the same H.
        """
        for h in self.handles:
            h.remove()
        if reduce is not None:
            self._reduce(in_features, reduce)
        out = {}
        for key, dim in in_features.items():
            n = self.counts.get(key, 0)
            if n == 0:
                out[key] = (torch.eye(dim, dtype=torch.float32), 0)
                continue
            h = self.sums[key] / n
            if not torch.isfinite(h).all():
                raise AqlmkitError(f"NaN/Inf in the inputs of {self.prefix}{key[0]}: the model "
                                   "overflows in this dtype; retry with --dtype float32")
            out[key] = (h, n)
        return out

    def _reduce(self, in_features: dict[tuple, int], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for key, dim in in_features.items():
            s = self.sums.get(key)
            if s is None:  # this rank's shard routed no token here; the others may have
                s = torch.zeros(dim, dim, dtype=torch.float32)
            n = reduce(torch.tensor([self.counts.get(key, 0)], dtype=torch.int64))
            self.sums[key], self.counts[key] = reduce(s), int(n.item())
