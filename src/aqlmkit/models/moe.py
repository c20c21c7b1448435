"""Unfuse transformers' 3-D MoE expert tensors into one nn.Linear per expert.

transformers 5 stores all experts of a sparse MoE block as two 3-D parameters
(``gate_up_proj[E, 2I, H]`` and ``down_proj[E, H, I]``). AQLM quantizes per linear with a
Hessian of that linear's own inputs, so each expert must see only the tokens routed to it:
we split the tensors into ``experts.{e}.gate_proj/up_proj/down_proj`` linears (the layout of
the original Mixtral/Qwen-MoE checkpoints) with a forward that is numerically the same.
"""
from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act, dtype=None, device=None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden, inter, bias=False, **kw)
        self.up_proj = nn.Linear(hidden, inter, bias=False, **kw)
        self.down_proj = nn.Linear(inter, hidden, bias=False, **kw)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for transformers' fused ``*Experts``: same call signature, per-expert linears."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        n = len(self)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=n).nonzero().flatten().tolist()
        for e in hit:
            token_idx, pos = torch.where(top_k_index == e)
            y = self[e](hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "UnfusedExperts":
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        num, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        experts = cls()
        for e in range(num):
            m = ExpertMLP(hidden, inter, fused.act_fn, dtype=gate_up.dtype, device=gate_up.device)
            m.gate_proj.weight.data.copy_(gate_up[e, :inter])
            m.up_proj.weight.data.copy_(gate_up[e, inter:])
            m.down_proj.weight.data.copy_(down[e])
            experts.append(m)
        return experts


def is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.Tensor) and p.dim() == 3 and not isinstance(module, UnfusedExperts)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module in ``model`` in place; returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, UnfusedExperts.from_fused(m))
    return len(targets)
