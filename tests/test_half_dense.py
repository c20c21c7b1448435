"""16-bit dense layers of AQLM checkpoints (lm_head, embeddings): stored fp16 by save_quantized,
kept fp16 by load_quantized for fp32 CPU inference and run through cpu_half_linear (fp32 math)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from aqlmkit import kernels
from aqlmkit.formats.aqlm_hf import load_quantized, save_quantized
from aqlmkit.nn import HalfEmbedding, HalfLinear, QuantizedLinear, compute_dtype, use_half_dense
from nn_helpers import logits, random_quantized, round_dense_to_fp16

IDS = torch.tensor([[1, 7, 42, 300, 12, 5, 77]])
needs_kernel = pytest.mark.skipif(not kernels.half_kernel_available(), reason="CPU extension unavailable")


@pytest.fixture(scope="module")
def tied(tmp_path_factory, make_tiny_model, tiny_tokenizer):
    """A tied-embedding model (like SmolLM2) saved with the defaults."""
    model = random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer), tie_word_embeddings=True),
                             "2x8g8", seed=4)
    round_dense_to_fp16(model)
    return model, save_quantized(model, tiny_tokenizer, tmp_path_factory.mktemp("half") / "q", "2x8g8")


def op_names(model, ids) -> set[str]:
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(ids)
    return {e.key for e in prof.key_averages()}


def test_save_stores_dense_layers_fp16(tied):
    _, out = tied
    sd = load_file(out / "model.safetensors")
    assert sd["model.embed_tokens.weight"].dtype == torch.float16
    assert "lm_head.weight" not in sd  # tied: stored once
    assert sd["model.layers.0.mlp.up_proj.codebooks"].dtype == torch.float32  # codebooks keep theirs
    assert sd["model.norm.weight"].dtype == torch.float32


@needs_kernel
def test_tied_head_runs_the_half_kernel_with_fp32_logits(tied):
    model, out = tied
    half, _ = load_quantized(out)
    assert type(half.lm_head) is HalfLinear and type(half.model.embed_tokens) is HalfEmbedding
    assert half.lm_head.weight is half.model.embed_tokens.weight
    assert half.lm_head.weight.dtype == torch.float16 and compute_dtype(half) == torch.float32
    assert "aqlmkit::cpu_half_linear" in op_names(half, IDS)
    got = logits(half, IDS)
    assert got.dtype == torch.float32
    # same stored values, fp32 math either way: equal up to summation order
    torch.testing.assert_close(got, logits(model, IDS), rtol=1e-5, atol=1e-5)
    fp32, _ = load_quantized(out, half_dense=False)
    assert type(fp32.lm_head) is torch.nn.Linear and fp32.lm_head.weight.dtype == torch.float32
    assert "aqlmkit::cpu_half_linear" not in op_names(fp32, IDS)
    torch.testing.assert_close(got, logits(fp32, IDS), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_untied_head_and_generate_match_fp32(tmp_path, make_tiny_model, tiny_tokenizer):
    model = round_dense_to_fp16(random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer)),
                                                 "1x16g8", seed=6))
    out = save_quantized(model, tiny_tokenizer, tmp_path / "q", "1x16g8")
    half, _ = load_quantized(out)
    assert type(half.lm_head) is HalfLinear and half.lm_head.weight is not half.model.embed_tokens.weight
    kw = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(half.generate(IDS, **kw), model.generate(IDS, **kw))


def test_dense_dtype_none_and_out_of_range_values_stay_fp32(tmp_path, make_tiny_model, tiny_tokenizer):
    model = random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer)), "2x8g8", seed=2)
    out = save_quantized(model, None, tmp_path / "keep", "2x8g8", dense_dtype=None)
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.float32
    loaded, _ = load_quantized(out)
    assert type(loaded.lm_head) is torch.nn.Linear  # nothing 16-bit was stored
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=1e-6)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e6  # beyond fp16: this tensor must not be rounded to inf
    sd = load_file(save_quantized(model, None, tmp_path / "big", "2x8g8") / "model.safetensors")
    assert sd["lm_head.weight"].dtype == torch.float32 and sd["model.embed_tokens.weight"].dtype == torch.float16


def test_half_layers_train_and_upcast(tied):
    """Backward flows through the 16-bit head (F.linear fallback) into the codebooks; .float() works."""
    _, out = tied
    half, _ = load_quantized(out, half_dense=True)
    layer = half.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear)
    layer.codebooks.requires_grad_(True)
    half(IDS).logits.float().pow(2).mean().backward()
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0
    half.float()
    assert half.lm_head.weight.dtype == torch.float32  # HalfLinear on an fp32 weight: plain F.linear
    assert "aqlmkit::cpu_half_linear" not in op_names(half, IDS)


def test_use_half_dense_only_touches_exact_16bit_layers():
    lin16, lin32 = torch.nn.Linear(4, 3).half(), torch.nn.Linear(4, 3)
    emb = torch.nn.Embedding(5, 4).bfloat16()
    model = torch.nn.ModuleDict({"a": lin16, "b": lin32, "e": emb})
    assert sorted(use_half_dense(model)) == ["a", "e"]
    assert type(lin32) is torch.nn.Linear and type(lin16) is HalfLinear
    x = torch.randn(2, 4)
    torch.testing.assert_close(lin16(x), torch.nn.functional.linear(x, lin16.weight.float(), lin16.bias.float()),
                               rtol=1e-5, atol=1e-5)
    assert emb(torch.tensor([0, 3])).dtype == torch.float32
