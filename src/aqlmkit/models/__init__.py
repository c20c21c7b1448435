"""Per-family knowledge: where the decoder blocks are and which linears share inputs.

The pipeline only needs to know, for each decoder block, the ordered *stages* of linears:
linears of one group read the same input (so they share one Hessian), and groups of a later
stage read activations produced by earlier ones (so they are calibrated after those are
quantized, as in the AQLM paper). To add a family, add an entry to ``FAMILIES`` in this file
(dotted paths of the blocks, embeddings, final norm, lm_head and rotary module) and, if its
MLP is not the usual gate/up/down or a sparse MoE with ``experts``, a branch in ``_mlp_groups``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from aqlmkit.errors import AqlmkitError
from aqlmkit.models.moe import UnfusedExperts, unfuse_experts


@dataclass(frozen=True)
class Family:
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    attn: str = "self_attn"
    mlp: str = "mlp"


_DENSE = Family()
FAMILIES: dict[str, Family] = {
    name: _DENSE for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
}


@dataclass(frozen=True)
class Group:
    """Linears (dotted names relative to the block) that read the same input tensor."""

    names: tuple[str, ...]
    stage: int


@dataclass
class ModelLayout:
    family: str
    blocks: nn.ModuleList
    embed: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None
    groups: list[list[Group]] = field(default_factory=list)  # per block

    def stages(self, block_idx: int) -> list[list[Group]]:
        """Groups of one block bucketed by stage, in calibration order."""
        out: dict[int, list[Group]] = {}
        for g in self.groups[block_idx]:
            out.setdefault(g.stage, []).append(g)
        return [out[s] for s in sorted(out)]

    def linear_names(self, block_idx: int) -> list[str]:
        return [n for g in self.groups[block_idx] for n in g.names]


def _get(model: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _attn_groups(fam: Family) -> list[Group]:
    a = fam.attn
    return [Group((f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"), 0), Group((f"{a}.o_proj",), 1)]


def _mlp_groups(block: nn.Module, fam: Family) -> list[Group]:
    m = fam.mlp
    mlp = block.get_submodule(m)
    groups: list[Group] = []
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, UnfusedExperts):
        for e in range(len(experts)):
            p = f"{m}.experts.{e}"
            groups += [Group((f"{p}.gate_proj", f"{p}.up_proj"), 2), Group((f"{p}.down_proj",), 3)]
        if hasattr(mlp, "shared_expert"):
            p = f"{m}.shared_expert"
            groups += [Group((f"{p}.gate_proj", f"{p}.up_proj"), 2), Group((f"{p}.down_proj",), 3)]
        return groups  # routers (mlp.gate, shared_expert_gate) stay unquantized
    if experts is not None:
        raise AqlmkitError(f"experts of {type(mlp).__name__} are still fused: call get_layout(), "
                           "which unfuses them, before quantizing")
    return [Group((f"{m}.gate_proj", f"{m}.up_proj"), 2), Group((f"{m}.down_proj",), 3)]


def get_layout(model: nn.Module, unfuse: bool = True) -> ModelLayout:
    """Layout of a supported HF causal LM; unfuses 3-D MoE experts in place (forward unchanged)."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None)
    if family not in FAMILIES:
        raise AqlmkitError(
            f"model family {family!r} ({type(model).__name__}) is not supported; supported: "
            f"{sorted(FAMILIES)}. To add it, add a Family entry (blocks, embed, norm, lm_head, "
            "rotary, attn, mlp paths) to FAMILIES in src/aqlmkit/models/__init__.py"
        )
    fam = FAMILIES[family]
    if unfuse:
        unfuse_experts(model)
    blocks = _get(model, fam.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise AqlmkitError(f"{type(model).__name__} has no decoder blocks at {fam.blocks!r}; "
                           "fix its Family entry in src/aqlmkit/models/__init__.py")
    layout = ModelLayout(family, blocks, _get(model, fam.embed), _get(model, fam.norm),
                         _get(model, fam.lm_head), _get(model, fam.rotary))
    for block in blocks:
        groups = _attn_groups(fam) + _mlp_groups(block, fam)
        for g in groups:
            for n in g.names:
                if not isinstance(_get(block, n), nn.Linear) and _get(block, n) is None:
                    raise AqlmkitError(f"{type(block).__name__} has no linear {n!r}; fix "
                                       "_attn_groups/_mlp_groups in src/aqlmkit/models/__init__.py")
        layout.groups.append(groups)
    return layout


__all__ = ["get_layout", "ModelLayout", "Group", "Family", "FAMILIES", "unfuse_experts", "UnfusedExperts"]
