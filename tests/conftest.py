"""Shared test fixtures, all built offline at test time (nothing is downloaded or checked in).

* ``tiny_tokenizer``: a real byte-level BPE ``PreTrainedTokenizerFast`` (vocab 512) trained on a
  slice of CPython's pydoc topics, with bos/eos/unk/pad and a ChatML-style chat template.
* ``tiny_llama_dir``: a saved (safetensors) random LlamaForCausalLM + that tokenizer.
* ``make_tiny_model(family, **overrides)``: unsaved tiny models of several families.
* ``tiny_llama_gguf``: the same tiny Llama written as an F32 GGUF (llama.cpp layout).
* ``default_model_dir``: the embedded SmolLM2 folder, or a skip when it cannot be obtained
  (set ``AQLMKIT_SKIP_DEFAULT_MODEL=1`` to force the skip).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

TINY_VOCAB = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _training_text(max_chars: int = 200_000) -> list[str]:
    """Real prose for the BPE merges: pydoc topics ship with every CPython."""
    from pydoc_data.topics import topics

    out, total = [], 0
    for key in sorted(topics):
        out.append(topics[key])
        total += len(topics[key])
        if total >= max_chars:
            break
    return out


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """Train a byte-level BPE so every string encodes (no unk) and decodes back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
_FAMILY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 2, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                   "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1}),
}


def tiny_model(family: str = "llama", vocab_size: int = TINY_VOCAB, seed: int = 0, **overrides):
    """A tiny random causal LM of ``family`` in float32 eval mode (deterministic for a seed)."""
    import transformers

    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(_FAMILY)}")
    cfg_name, model_name, extra = _FAMILY[family]
    kwargs = {**_BASE, **extra, "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 3, **overrides}
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    return model.float().eval()


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable:
    """Factory fixture: ``make_tiny_model("mixtral", num_hidden_layers=1)`` -> unsaved model."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer) loaded from ``tiny_llama_dir`` (fp32, eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def _permute_for_gguf(w, n_head: int):
    """llama.cpp's q/k row order (interleaved rotary halves); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                     ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                     ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                     ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                     ("mlp.down_proj", "ffn_down")]


def write_tiny_gguf(path, model, tok) -> None:
    """Write a Llama + byte-level BPE tokenizer as an F32 GGUF, laid out like llama.cpp does."""
    import json

    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    vocab = tok.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        for hf, gg in _GGUF_LAYER_NAMES:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for key, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            arr = _permute_for_gguf(arr, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            arr = _permute_for_gguf(arr, c.num_key_value_heads)
        w.add_tensor(names[key], np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, tiny_llama, tiny_tokenizer) -> Path:
    """The tiny Llama of ``tiny_llama_dir`` as an F32 .gguf file (about 300 KB)."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, tiny_llama[0], tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct folder, or skip when it cannot be obtained (offline)."""
    if os.environ.get("AQLMKIT_SKIP_DEFAULT_MODEL"):
        pytest.skip("AQLMKIT_SKIP_DEFAULT_MODEL is set")
    from aqlmkit.errors import AqlmkitError

    try:
        from aqlmkit.formats.loading import resolve_default_model

        return resolve_default_model()
    except (AqlmkitError, ImportError) as e:
        pytest.skip(f"embedded model unavailable: {e}")


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    """(model, tokenizer) of the embedded model in float32 on CPU."""
    from aqlmkit.formats.loading import load_model

    return load_model(str(default_model_dir), device="cpu", dtype="float32")
