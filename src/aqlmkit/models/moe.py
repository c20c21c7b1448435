"""Unfuse transformers' 3-D MoE expert tensors into one nn.Linear per expert.

transformers 5 stores all experts of a sparse MoE block as two 3-D parameters
(``gate_up_proj[E, 2I, H]`` and ``down_proj[E, H, I]``). AQLM quantizes per linear with a
Hessian of that linear's own inputs, so each expert must see only the tokens routed to it:
we split the tensors into ``experts.{e}.gate_proj/up_proj/down_proj`` linears (the layout of
the original Mixtral/Qwen-MoE checkpoints) with a forward that is numerically the same.
"""
from __future__ import annotations

import re
from typing import Iterable

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


_PER_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


def has_unfused_experts(model: nn.Module) -> bool:
    """True once ``unfuse_experts`` has run: the model's state dict names experts one by one."""
    return any(isinstance(m, UnfusedExperts) for m in model.modules())


def names_per_expert(names: Iterable[str]) -> bool:
    """True when checkpoint tensor names address experts one by one (``...experts.3.up_proj.codes``).

    A checkpoint saved from an unfused model must be loaded into an unfused one: transformers 5
    builds fused 3-D experts from config, which have no per-expert linears to put the codes in.
    """
    return any(_PER_EXPERT.search(n) for n in names)


# transformers 4 Mixtral names (also those of the official AQLM Mixtral checkpoints) -> ours.
_MIXTRAL_LEGACY = [(re.compile(r"\.block_sparse_moe\."), ".mlp."),
                   (re.compile(r"(experts\.\d+)\.w1\."), r"\1.gate_proj."),
                   (re.compile(r"(experts\.\d+)\.w3\."), r"\1.up_proj."),
                   (re.compile(r"(experts\.\d+)\.w2\."), r"\1.down_proj.")]


def modern_expert_name(name: str, model_type: str | None) -> str:
    """Map a legacy per-expert Mixtral tensor/module name onto the unfused layout; others unchanged.

    Official AQLM Mixtral checkpoints predate transformers 5 and store
    ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate/up/down). transformers renames those only for
    dense ``.weight`` tensors, so the ``codes``/``codebooks``/``scales`` need our own mapping.
    """
    if model_type != "mixtral":
        return name
    for pattern, repl in _MIXTRAL_LEGACY:
        name = pattern.sub(repl, name)
    return name
