"""load_model: HF folders, errors, dtype/device handling, GGUF caching (fast paths on tiny
models); the real embedded model is exercised in the slow tests at the bottom."""
from __future__ import annotations

import json
import time

import pytest
import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.formats import gguf_convert
from aqlmkit.formats.loading import load_model, resolve_device, resolve_dtype


def test_fixture_tokenizer_roundtrip(tiny_tokenizer):
    text = "Hello world, the quick brown fox.\n\ndef f(x): return x  # ünïcode"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert len(tiny_tokenizer) == 512
    chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe"])
def test_make_tiny_model_families(make_tiny_model, family):
    model = make_tiny_model(family)
    assert model.config.model_type == family
    logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()


def test_load_hf_folder_matches_saved(tiny_llama_dir, tiny_llama):
    model, tok = load_model(str(tiny_llama_dir))
    ref, _ = tiny_llama
    assert model.dtype == torch.float32 and not model.training
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert tok.pad_token is not None


def test_load_dtype_bf16(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_resolve_dtype_and_device():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    with pytest.raises(AqlmkitError, match="unknown dtype"):
        resolve_dtype("int3", cpu)
    with pytest.raises(AqlmkitError, match="device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_llama_dir):
    with pytest.raises(AqlmkitError, match="CUDA was requested but"):
        load_model(tiny_llama_dir, device="cuda")


def test_missing_path(tmp_path):
    with pytest.raises(AqlmkitError, match="not found"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(AqlmkitError, match="no config.json"):
        load_model(tmp_path)


def test_foreign_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    with pytest.raises(AqlmkitError, match="not a GGUF file"):
        load_model(fake)


def test_foreign_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(AqlmkitError, match="not a .gguf model"):
        load_model(f)


def test_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(AqlmkitError, match="cannot read"):
        load_model(tmp_path)


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(AqlmkitError, match="HF_HUB_OFFLINE"):
        load_model("some-org/some-model-that-is-not-cached")


def test_aqlm_folder_is_delegated(tmp_path, monkeypatch):
    """A folder whose config says quant_method=aqlm goes to formats.aqlm_hf.load_quantized."""
    import sys
    import types

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "aqlm"}}))
    calls = []
    fake = types.ModuleType("aqlmkit.formats.aqlm_hf")
    fake.load_quantized = lambda path, device, dtype: calls.append((path, device, dtype)) or ("m", "t")
    monkeypatch.setitem(sys.modules, "aqlmkit.formats.aqlm_hf", fake)
    assert load_model(tmp_path) == ("m", "t")
    assert calls == [(tmp_path, torch.device("cpu"), torch.float32)]


def test_gguf_to_folder_converts_once(tmp_path, monkeypatch, tiny_llama_dir):
    """The cache is keyed by the GGUF's size/mtime, built atomically, and reused."""
    import shutil

    monkeypatch.setenv("AQLMKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 28)
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        for f in tiny_llama_dir.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    first = gguf_convert.gguf_to_folder(gguf)
    assert gguf_convert.is_complete(first) and first.parent == tmp_path / "cache" / "models"
    assert gguf_convert.gguf_to_folder(gguf) == first and len(calls) == 1
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".m-") and p.is_dir()]  # no temp left
    model, _ = load_model(gguf)
    assert model.config.model_type == "llama" and len(calls) == 1
    later = time.time() + 100
    import os

    os.utime(gguf, (later, later))  # a changed file gets a fresh conversion
    assert gguf_convert.gguf_to_folder(gguf) != first and len(calls) == 2


def test_real_gguf_conversion(tiny_llama_gguf, tiny_llama, tmp_path, monkeypatch):
    """Through transformers' GGUF loader: same logits (q/k un-permuted) and same tokenization."""
    monkeypatch.setenv("AQLMKIT_CACHE", str(tmp_path))
    model, tok = load_model(tiny_llama_gguf)
    ref, ref_tok = tiny_llama
    folder = next((tmp_path / "models").glob("tiny-llama-*"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    text = "Hello world, the function returns x."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AQLMKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 28)

    def boom(src, out):
        (out / "config.json").write_text("{}")
        raise AqlmkitError("bad gguf")

    monkeypatch.setattr(gguf_convert, "convert_gguf", boom)
    with pytest.raises(AqlmkitError, match="bad gguf"):
        gguf_convert.gguf_to_folder(gguf)
    assert [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_default_model_roundtrip(default_model_dir, default_model):
    """The GGUF -> safetensors round trip keeps a sane model (tokenizer + q/k permutation)."""
    from aqlmkit.eval.perplexity import perplexity

    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    model, tok = default_model
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    res = perplexity(model, tok, "pydoc", seqlen=512, limit_tokens=1024, progress=False)
    assert 2.0 < res.ppl < 30.0, res  # a broken permutation/tokenizer gives hundreds+


@pytest.mark.slow
def test_default_model_cached_load_is_fast(default_model_dir):
    t = time.perf_counter()
    model, _ = load_model("default")
    assert time.perf_counter() - t < 30
    assert model.config.num_hidden_layers == 30
