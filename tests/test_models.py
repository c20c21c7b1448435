"""Model layouts: every supported family, MoE unfusing (forward unchanged, per-expert inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from aqlmkit.errors import AqlmkitError
from aqlmkit.models import get_layout
from aqlmkit.models.moe import UnfusedExperts
from aqlmkit.pipeline.hessian import HessianAccumulator

DENSE = ["llama", "mistral", "qwen2", "qwen3"]
MOE = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
       "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2}}


def qwen3_moe(seed=0):
    import transformers

    cfg = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, num_experts=4, num_experts_per_tok=2, vocab_size=512,
                                      decoder_sparse_step=1, norm_topk_prob=True)
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(cfg).float().eval()


def _model(make_tiny_model, family):
    if family == "qwen3_moe":
        return qwen3_moe()
    return make_tiny_model(family, **MOE.get(family, {}))


@pytest.mark.parametrize("family", DENSE + list(MOE) + ["qwen3_moe"])
def test_layout_and_forward_unchanged(make_tiny_model, family):
    model = _model(make_tiny_model, family)
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        layout = get_layout(model)
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert layout.family == family and len(layout.blocks) == model.config.num_hidden_layers
    assert layout.embed is model.get_input_embeddings() and layout.lm_head is model.lm_head
    assert layout.rotary is not None and layout.norm is not None
    for i, block in enumerate(layout.blocks):
        names = layout.linear_names(i)
        assert len(names) == len(set(names))
        assert all(isinstance(block.get_submodule(n), nn.Linear) for n in names)
        stages = layout.stages(i)
        assert [g.names for g in stages[0]] == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
        assert [g.names for g in stages[1]] == [("self_attn.o_proj",)]
        assert all(n.endswith(("gate_proj", "up_proj")) for g in stages[2] for n in g.names)
        assert all(n.endswith("down_proj") for g in stages[3] for n in g.names)
        assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)  # routers stay fp
        if family in MOE or family == "qwen3_moe":
            assert isinstance(block.mlp.experts, UnfusedExperts) and len(block.mlp.experts) == 4
            assert sum(1 for n in names if ".experts." in n) == 4 * 3


def test_each_expert_sees_only_its_routed_tokens(make_tiny_model):
    model = make_tiny_model("mixtral", num_hidden_layers=1, **MOE["mixtral"])
    layout = get_layout(model)
    block = layout.blocks[0]
    groups = [g for g in layout.groups[0] if ".experts." in g.names[0] and g.names[0].endswith("gate_proj")]
    routed = []
    hook = block.mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out[2]))
    acc = HessianAccumulator(block, groups, "")
    with torch.no_grad():
        model(torch.randint(0, 512, (3, 23), generator=torch.Generator().manual_seed(2)))
    hook.remove()
    hs = acc.finish({g.names: 64 for g in groups})
    idx = torch.cat(routed)
    for e, g in enumerate(groups):
        assert hs[g.names][1] == int((idx == e).sum())  # tokens counted = tokens routed to e
    assert sum(n for _, n in hs.values()) == idx.numel()


def test_unknown_family_names_class_and_file():
    class Weird(nn.Module):
        config = type("C", (), {"model_type": "weirdlm"})()

    with pytest.raises(AqlmkitError, match=r"weirdlm.*Weird.*models/__init__\.py"):
        get_layout(Weird())
