"""AQLM HF checkpoint: save/load round trip, sharding, the model card, and clear errors on bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aqlmkit.errors import AqlmkitError
from aqlmkit.formats import safetensors_io as st
from aqlmkit.formats.aqlm_hf import load_quantized, save_quantized
from aqlmkit.nn import QuantizedLinear
from nn_helpers import logits, random_quantized, round_dense_to_fp16

IDS = torch.tensor([[1, 7, 42, 300, 12, 5]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_tiny_model, tiny_tokenizer):
    model = random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer)), "2x8g8")
    round_dense_to_fp16(model)  # stored fp16 by default: the round trip is then exact up to sum order
    out = tmp_path_factory.mktemp("ckpt") / "tiny-2x8g8"
    save_quantized(model, tiny_tokenizer, out, "2x8g8", card={"perplexity": 12.5, "dataset": "pydoc"})
    return model, out


def test_round_trip_logits_and_layout(saved):
    model, out = saved
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "aqlm" and (qc["num_codebooks"], qc["nbits_per_codebook"]) == (2, 8)
    assert (qc["in_group_size"], qc["out_group_size"]) == (8, 1)
    assert "lm_head.weight" in qc["linear_weights_not_to_quantize"]
    assert "model.embed_tokens.weight" in qc["linear_weights_not_to_quantize"]
    sd = load_file(out / "model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.codes"].dtype == torch.int8
    assert not any(k.endswith("proj.weight") for k in sd)
    card = (out / "README.md").read_text()
    assert "2x8g8" in card and "12.5" in card and "average bits" in card
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    loaded, tok = load_quantized(out)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantizedLinear)
    assert tok is not None and len(tok) > 0
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    bf16, _ = load_quantized(out, dtype="bfloat16")
    assert bf16.model.layers[0].self_attn.q_proj.codebooks.dtype == torch.bfloat16


def test_sharded_save_and_tied_embeddings(tmp_path, make_tiny_model, tiny_tokenizer):
    model = random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer), tie_word_embeddings=True),
                             "1x16g8", seed=3)
    round_dense_to_fp16(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_quantized(model, tiny_tokenizer, tmp_path / "sharded", "1x16g8", max_shard_size="100KB")
    index = json.loads((out / st.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in index["weight_map"]
    loaded, _ = load_quantized(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_save_replaces_only_aqlmkit_checkpoints(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "x"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    with pytest.raises(AqlmkitError, match="not written by aqlmkit"):
        save_quantized(model, None, out, "2x8g8", overwrite=True)
    assert (out / "mine.txt").read_text() == "old"  # a user's folder is never replaced
    (out / "mine.txt").unlink()
    save_quantized(model, None, out, "2x8g8")  # an empty folder is fine
    with pytest.raises(AqlmkitError, match="--overwrite"):
        save_quantized(model, None, out, "2x8g8")
    save_quantized(model, None, out, "2x8g8", overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temp folders left behind
    with pytest.raises(AqlmkitError, match="declared"):
        save_quantized(model, None, tmp_path / "y", "1x16g8")
    assert not (tmp_path / "y").exists()


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_tensors(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors")


def test_errors(saved, tmp_path):
    _, out = saved
    bad = _copy(out, tmp_path / "noq")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AqlmkitError, match="no quantization_config"):
        load_quantized(bad)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AqlmkitError, match="not 'aqlm'"):
        load_quantized(bad)

    wrong = _copy(out, tmp_path / "wrongcfg")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["quantization_config"]["in_group_size"] = 16
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AqlmkitError, match=r"tensor model\.layers\.\S+ has shape .* \(2x8g16\) implies"):
        load_quantized(wrong)

    trunc = _copy(out, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AqlmkitError, match="model.safetensors is truncated or corrupt"):
        load_quantized(trunc)

    nan = _copy(out, tmp_path / "nan")
    _edit_tensors(nan, lambda sd: sd["model.layers.1.mlp.up_proj.codebooks"].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(AqlmkitError, match="up_proj.codebooks contains NaN"):
        load_quantized(nan)

    missing = _copy(out, tmp_path / "missing")
    _edit_tensors(missing, lambda sd: sd.pop("model.layers.0.self_attn.o_proj.scales"))
    with pytest.raises(AqlmkitError, match="o_proj.scales"):
        load_quantized(missing)


def test_codes_out_of_range(tmp_path, make_tiny_model):
    model = random_quantized(make_tiny_model("llama", vocab_size=64, num_hidden_layers=1), "2x6g8")
    out = save_quantized(model, None, tmp_path / "c6", "2x6g8")
    load_quantized(out)  # valid as written
    _edit_tensors(out, lambda sd: sd["model.layers.0.mlp.gate_proj.codes"].view(-1).__setitem__(0, 64))
    with pytest.raises(AqlmkitError, match=r"gate_proj.codes holds codes in \[0, 64\].*allows \[0, 63\]"):
        load_quantized(out)


def test_parse_size():
    assert st.parse_size("2GB") == 2 * 10**9 and st.parse_size("1GiB") == 2**30 and st.parse_size(5) == 5
    with pytest.raises(AqlmkitError):
        st.parse_size("lots")
