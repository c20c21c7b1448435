"""Perplexity against a hand computation on the tiny random Llama, plus protocol details."""
from __future__ import annotations

import json
import math

import pytest
import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.eval.perplexity import perplexity
from aqlmkit.eval.report import save_report

TEXT_DOCS = ["The quick brown fox jumps over the lazy dog. " * 6,
             "Lists are mutable sequences, typically used to store collections. " * 5,
             "In the beginning God created the heaven and the earth. " * 4]


def manual_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """Independent reference: log-softmax by hand, one window at a time, float64 sums."""
    n = ids.numel() // seqlen
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seqlen:(w + 1) * seqlen]
            logits = model(x[None]).logits[0].double()
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            nll -= logp[torch.arange(seqlen - 1), x[1:]].sum().item()
            count += seqlen - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("seqlen,batch_size", [(16, 1), (37, 3), (64, 2)])
def test_matches_manual(tiny_llama, seqlen, batch_size):
    model, tok = tiny_llama
    ids = tok("\n\n".join(TEXT_DOCS), return_tensors="pt").input_ids[0]
    res = perplexity(model, tok, TEXT_DOCS, seqlen=seqlen, batch_size=batch_size, progress=False)
    assert res.windows == ids.numel() // seqlen and res.tokens == res.windows * seqlen
    assert res.ppl == pytest.approx(manual_ppl(model, ids, seqlen), rel=1e-5)
    assert res.ppl > 100  # random weights over a 512 vocab: close to uniform


def test_limit_tokens_and_raw_text(tiny_llama):
    model, tok = tiny_llama
    text = "\n\n".join(TEXT_DOCS)
    ids = tok(text, return_tensors="pt").input_ids[0]
    res = perplexity(model, tok, text, seqlen=20, limit_tokens=65, progress=False)
    assert res.windows == 3 and res.tokens == 60
    assert res.ppl == pytest.approx(manual_ppl(model, ids[:60], 20), rel=1e-5)
    res_ids = perplexity(model, tok, ids, seqlen=20, limit_tokens=65, progress=False)
    assert res_ids.ppl == pytest.approx(res.ppl, rel=1e-6)


def test_seqlen_capped_by_context(make_tiny_model, tiny_tokenizer):
    model = make_tiny_model("llama", max_position_embeddings=32)
    res = perplexity(model, tiny_tokenizer, TEXT_DOCS, seqlen=2048, progress=False)
    assert res.seqlen == 32


def test_bf16_close_to_fp32(tiny_llama):
    model, tok = tiny_llama
    ref = perplexity(model, tok, TEXT_DOCS, seqlen=32, progress=False).ppl
    low = perplexity(model.to(torch.bfloat16), tok, TEXT_DOCS, seqlen=32, progress=False).ppl
    model.float()
    assert low == pytest.approx(ref, rel=0.03)


def test_corpus_name_uses_eval_split(tiny_llama):
    model, tok = tiny_llama
    res = perplexity(model, tok, "pydoc", seqlen=64, limit_tokens=256, progress=False)
    assert res.windows == 4 and math.isfinite(res.ppl)


def test_bad_inputs(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(AqlmkitError, match="seqlen must be at least 2"):
        perplexity(model, tok, TEXT_DOCS, seqlen=1)
    with pytest.raises(AqlmkitError, match="fewer than one window"):
        perplexity(model, tok, "a short text", seqlen=256)
    with pytest.raises(AqlmkitError, match="batch_size"):
        perplexity(model, tok, TEXT_DOCS, batch_size=0)


def test_save_report(tmp_path):
    paths = save_report(tmp_path / "sub" / "r", {"ppl": 1.5, "rows": [1, 2]},
                        plot={"x": [1, 2, 3], "series": {"a": [1, 4, 9]}, "logy": True})
    assert [p.name for p in paths] == ["r.json", "r.png"]
    assert json.loads(paths[0].read_text()) == {"ppl": 1.5, "rows": [1, 2]}
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only = save_report(tmp_path / "q.json", {"a": 1}, plot=lambda fig: fig.add_subplot().bar(["x"], [1]))
    assert [p.name for p in only] == ["q.json", "q.png"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json", "r.png"]
