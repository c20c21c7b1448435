"""MoE AQLM checkpoints: per-expert codes saved from an unfused model reload with identical logits.

transformers 5 builds MoE experts as fused 3-D tensors; the pipeline quantizes one nn.Linear per
expert, so load_quantized must unfuse the meta model before the codes can go anywhere.
Checkpoints here keep their dense layers fp32 (``dense_dtype=None``) so logits can match bit for bit.
"""
from __future__ import annotations

import json

import pytest
import torch

from _pipeline_helpers import fast_configs
from aqlmkit.formats.aqlm_hf import UNFUSED_KEY, load_quantized, save_quantized
from aqlmkit.models.moe import UnfusedExperts, unfuse_experts
from aqlmkit.nn import QuantizedLinear
from aqlmkit.pipeline.quantize import quantize_model
from nn_helpers import logits, random_quantized

IDS = torch.tensor([[1, 7, 42, 300, 12, 5, 99, 4]])


@pytest.fixture(autouse=True)
def _reference_kernel(monkeypatch):
    monkeypatch.setenv("AQLMKIT_KERNEL", "reference")  # no kernel compile inside these tests


def _tiny_qwen3_moe():
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=3, num_experts_per_tok=2,
        decoder_sparse_step=1, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).float().eval()


def _experts_modules(model):
    return [m for m in model.modules() if isinstance(m, UnfusedExperts)]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_quantized_moe_round_trips(make_tiny_model, tmp_path, family):
    model = make_tiny_model(family, num_hidden_layers=1)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    calib, layer, ft = fast_configs(nsamples=2, seqlen=16, epochs=0)
    calib.skip = ("experts.1.down_proj",)  # one expert linear stays dense: skip list names it per expert
    quantize_model(model, None, "1x4g8", calib, layer, ft, tmp_path / "work", calibration_data=ids, progress=False)
    assert isinstance(model.model.layers[0].mlp.experts[0].down_proj, QuantizedLinear)
    out = save_quantized(model, None, tmp_path / "ckpt", "1x4g8", dense_dtype=None)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc[UNFUSED_KEY] is True
    assert "model.layers.0.mlp.experts.1.down_proj.weight" in qc["linear_weights_not_to_quantize"]
    card = (out / "README.md").read_text()
    assert "aqlmkit.load(path)" in card and "Do not load it with plain transformers" in card

    loaded, _ = load_quantized(out)
    experts = loaded.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and len(experts) == 2
    assert isinstance(experts[1].up_proj, QuantizedLinear)
    assert type(experts[1].down_proj) is torch.nn.Linear
    want = logits(model, IDS)
    torch.testing.assert_close(logits(loaded, IDS), want, rtol=0, atol=0)


def test_qwen3_moe_sharded_and_without_flag(tmp_path):
    """Older checkpoints lack the flag: the per-expert tensor names alone must trigger unfusing."""
    model = _tiny_qwen3_moe()
    assert unfuse_experts(model) == 2
    random_quantized(model, "2x4g8", skip=("lm_head", "mlp.gate"))
    out = save_quantized(model, None, tmp_path / "ckpt", "2x4g8", max_shard_size="20KB", dense_dtype=None)
    assert (out / "model.safetensors.index.json").is_file()
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["quantization_config"][UNFUSED_KEY]
    cfg_file.write_text(json.dumps(cfg))

    loaded, _ = load_quantized(out)
    assert len(_experts_modules(loaded)) == 2
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=0)


def test_dense_model_is_not_flagged(tmp_path, make_tiny_model):
    model = random_quantized(make_tiny_model("llama", num_hidden_layers=1), "1x4g8")
    out = save_quantized(model, None, tmp_path / "ckpt", "1x4g8", dense_dtype=None)
    assert UNFUSED_KEY not in json.loads((out / "config.json").read_text())["quantization_config"]
    assert "from_pretrained(path)" in (out / "README.md").read_text()
    loaded, _ = load_quantized(out)
    assert not _experts_modules(loaded)


def _legacy_mixtral_name(name: str) -> str:
    """Our name -> the transformers 4 name used by the official AQLM Mixtral checkpoints."""
    name = name.replace(".mlp.", ".block_sparse_moe.")
    for new, old in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        name = name.replace(f".{new}.", f".{old}.")
    return name


def test_legacy_mixtral_expert_names_load(tmp_path, make_tiny_model):
    from safetensors.torch import load_file, save_file

    model = make_tiny_model("mixtral", num_hidden_layers=1, num_local_experts=3)
    unfuse_experts(model)
    random_quantized(model, "1x4g8", skip=("lm_head", "experts.2.down_proj"), seed=1)
    out = save_quantized(model, None, tmp_path / "ckpt", "1x4g8", dense_dtype=None)
    sd = load_file(out / "model.safetensors")
    legacy = {_legacy_mixtral_name(k): v for k, v in sd.items()}
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in legacy
    assert "model.layers.0.block_sparse_moe.gate.weight" in legacy
    (out / "model.safetensors").unlink()
    save_file(legacy, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    del qc[UNFUSED_KEY]
    qc["linear_weights_not_to_quantize"] = [_legacy_mixtral_name(n) for n in qc["linear_weights_not_to_quantize"]]
    (out / "config.json").write_text(json.dumps(cfg))

    loaded, _ = load_quantized(out)
    assert type(loaded.model.layers[0].mlp.experts[2].down_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=0)
