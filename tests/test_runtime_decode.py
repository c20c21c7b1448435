"""aqlmkit.runtime.StaticDecoder: the static-cache loop gives transformers' greedy tokens, eager and
torch.compile'd (inductor, fullgraph) alike, on plain and AQLM models; sampling, eos, errors."""
from __future__ import annotations

import pytest
import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.formats.aqlm_hf import load_quantized, save_quantized
from aqlmkit.runtime import StaticDecoder, make_sampler
from nn_helpers import random_quantized

IDS = torch.tensor([[1, 7, 42, 300, 12]])


def hf_greedy(model, ids, n: int) -> torch.Tensor:
    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        return model.generate(ids, **kw)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, make_tiny_model):
    """A tied 2x8g8 model as aqlmkit.load gives it (QuantizedLinear + 16-bit head/embeddings)."""
    model = random_quantized(make_tiny_model("llama", vocab_size=512, tie_word_embeddings=True), "2x8g8", seed=9)
    out = save_quantized(model, None, tmp_path_factory.mktemp("rt") / "q", "2x8g8")
    return load_quantized(out)[0]


@pytest.mark.parametrize("kind", ["fp32", "aqlm"])
def test_eager_loop_matches_generate(kind, quantized, make_tiny_model):
    model = quantized if kind == "aqlm" else make_tiny_model("llama", vocab_size=512)
    dec = StaticDecoder(model, compile=False, bucket=16)
    want = hf_greedy(model, IDS, 20)
    assert torch.equal(dec.generate(IDS, 20), want)
    assert dec.stats.new_tokens == 20 and len(dec.stats.step_s) == 19 and dec.stats.decode_tok_s > 0
    assert torch.equal(dec.generate(IDS[:, :3], 20), hf_greedy(model, IDS[:, :3], 20))  # cache reused
    assert torch.equal(dec.generate(IDS, 40), hf_greedy(model, IDS, 40))  # outgrows it: reallocated


@pytest.mark.slow
def test_compiled_loop_matches_eager(quantized):
    """Inductor (the real CPU codegen, ~20 s on 2 cores): same greedy tokens as the eager loop."""
    torch._dynamo.reset()
    eager = StaticDecoder(quantized, compile=False).generate(IDS, 24)
    dec = StaticDecoder(quantized)
    assert torch.equal(dec.generate(IDS, 24), eager)
    assert dec.stats.compile_s > 0 and len(dec.stats.step_s) == 22  # first step compiled, not timed
    other = IDS.flip(1)
    assert torch.equal(dec.generate(other, 24), StaticDecoder(quantized, compile=False).generate(other, 24))
    assert dec.stats.compile_s == 0  # same cache shape: no recompilation


def test_eos_stops_and_streaming_sees_every_token(quantized):
    dec = StaticDecoder(quantized, compile=False)
    full = dec.generate(IDS, 10)
    eos = int(full[0, IDS.shape[1] + 3])
    seen = []
    out = dec.generate(IDS, 10, eos_token_id=[eos, 10_000], on_token=lambda t: seen.append(int(t)))
    stop = IDS.shape[1] + full[0, IDS.shape[1]:].tolist().index(eos) + 1
    assert torch.equal(out, full[:, :stop]) and seen == out[0, IDS.shape[1]:].tolist()


def test_sampler_is_seeded_and_respects_top_k(quantized):
    dec = StaticDecoder(quantized, compile=False)
    runs = [dec.generate(IDS, 8, sampler=make_sampler(0.8, 5, 0.9, torch.Generator().manual_seed(3)))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    pick = make_sampler(1.0, top_k=1)
    assert all(int(pick(logits)) == 1 for _ in range(5))
    assert all(int(make_sampler(1.0, top_p=0.5)(logits)) == 1 for _ in range(5))


def test_bad_inputs_are_clear_errors(quantized):
    dec = StaticDecoder(quantized, compile=False)
    with pytest.raises(AqlmkitError, match="one sequence"):
        dec.generate(torch.ones(2, 3, dtype=torch.long), 4)
    with pytest.raises(AqlmkitError, match="at least 1"):
        dec.generate(IDS, 0)
    with pytest.raises(AqlmkitError, match="positions"):
        dec.generate(IDS, 10_000)
    with pytest.raises(AqlmkitError, match="temperature"):
        make_sampler(0.0)
    with pytest.raises(AqlmkitError, match="bucket"):
        StaticDecoder(quantized, bucket=0)
