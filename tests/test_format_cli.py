"""`aqlmkit convert` (re-shard, --dequantize, errors) and `aqlmkit generate` on a saved AQLM model."""
from __future__ import annotations

import json

import pytest
import torch

from aqlmkit.cli import main
from aqlmkit.formats import safetensors_io as st
from aqlmkit.formats.aqlm_hf import load_quantized, save_quantized
from nn_helpers import logits, random_quantized

IDS = torch.tensor([[1, 7, 42, 300, 12, 5]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, make_tiny_model, tiny_tokenizer):
    model = random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer)), "1x16g8", seed=7)
    model.half()
    out = save_quantized(model, tiny_tokenizer, tmp_path_factory.mktemp("cli") / "q", "1x16g8")
    return model.float(), out


def test_convert_reshards_and_keeps_logits(ckpt, tmp_path, capsys):
    model, src = ckpt
    dst = tmp_path / "resharded"
    assert main(["convert", str(src), "-o", str(dst), "--shard-size", "200KB"]) == 0
    index = json.loads((dst / st.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["nbits_per_codebook"] == 16
    a, _ = load_quantized(src)
    b, _ = load_quantized(dst)
    assert b.model.layers[0].mlp.up_proj.codebooks.dtype == torch.float32  # loaded in fp32 on CPU
    assert torch.equal(logits(a, IDS), logits(b, IDS))
    from safetensors import safe_open
    with safe_open(str(dst / index["weight_map"]["model.norm.weight"]), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16  # source dtype kept on disk


def test_convert_dequantize_gives_plain_model(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = ckpt
    dst = tmp_path / "dense"
    assert main(["convert", str(src), "-o", str(dst), "--dequantize", "--dtype", "float32"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg
    dense = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    q, _ = load_quantized(src)
    torch.testing.assert_close(logits(dense, IDS), logits(q, IDS), rtol=1e-4, atol=1e-4)
    assert (dst / "tokenizer.json").is_file()


def test_convert_errors(ckpt, tmp_path, capsys, tiny_llama_dir):
    _, src = ckpt
    assert main(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["convert", str(tiny_llama_dir), "-o", str(tmp_path / "x")]) == 2
    assert "no quantization_config" in capsys.readouterr().err
    assert main(["convert", str(src), "-o", str(tmp_path / "x"), "--shard-size", "huge"]) == 2
    assert "bad size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_generate_from_saved_quantized_model(ckpt, capsys):
    _, src = ckpt
    rc = main(["generate", "--model", str(src), "--prompt", "The function", "--max-new-tokens", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.strip().startswith("The function") and len(out.strip()) > len("The function")


@pytest.mark.slow
def test_generate_compiled_loop_prints_the_same_text(ckpt, capsys):
    """--compile (StaticDecoder, inductor) continues a prompt exactly like model.generate (greedy)."""
    _, src = ckpt
    args = ["generate", "--model", str(src), "--prompt", "The function", "--max-new-tokens", "8"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--compile"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "tok/s decode" in captured.err
