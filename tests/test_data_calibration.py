"""Calibration windows: per-genre shares of the default mix, lazy per-piece tokenization, the
on-disk token cache (atomic, validated, never changes a result), and bad inputs."""
from __future__ import annotations

import pytest
import torch

from aqlmkit.data import tokens
from aqlmkit.data.calibration import allocate, calibration_batches, window_counts
from aqlmkit.data.corpora import load_corpus, source_split
from aqlmkit.errors import AqlmkitError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AQLMKIT_CACHE", str(tmp_path))
    return tmp_path / "tokens"


def _stream(tok, docs: list[str]) -> list[int]:
    """The token stream windows are cut from: each document plus its blank line, tokenized alone."""
    ids = []
    for d in docs:
        ids += tok(d + "\n\n", add_special_tokens=False)["input_ids"]
    return ids


def _is_window(row: list[int], stream: list[int]) -> bool:
    cyc, n = stream + stream[: len(row)], len(row)
    return any(cyc[s:s + n] == row for s in range(len(stream)))


def test_allocate_shares_and_caps():
    assert allocate(16, [1, 1, 1], [99, 99, 99]) == [6, 5, 5]
    assert allocate(10, [0.5, 0.25, 0.25], [2, 99, 99]) == [2, 4, 4]  # capped share goes to others
    assert allocate(9, [1, 1, 1], [1, 1, 1]) == [3, 3, 3]  # all capped: repeat by share
    for n in (1, 7, 128, 1000):
        out = allocate(n, [1 / 3] * 3, [37, 458, 1348])
        assert sum(out) == n and out == allocate(n, [1 / 3] * 3, [37, 458, 1348])


def test_default_mix_proportions(tiny_tokenizer, cache):
    counts = window_counts("default", 30, 256)
    assert counts == {"pydoc": 10, "kjv": 10, "sotu": 10}
    rows = calibration_batches(tiny_tokenizer, "default", 30, 256, seed=3)
    texts = {n: "\n\n".join(source_split(n, "calib")) for n in counts}
    found = {n: 0 for n in counts}
    for row in rows:
        middle = tiny_tokenizer.decode(row[8:-8])  # edges may cut a multi-byte character
        owners = [n for n, t in texts.items() if middle in t]
        assert len(owners) == 1
        found[owners[0]] += 1
    assert found == counts
    sources = [[n for n, t in texts.items() if tiny_tokenizer.decode(r[8:-8]) in t][0]
               for r in rows[:9]]
    assert len(set(sources)) == 3  # rows are shuffled across genres, not grouped


def test_small_source_is_capped_near_its_size():
    counts = window_counts("default", 1024, 2048)
    pydoc_tokens = sum(map(len, source_split("pydoc", "calib"))) / tokens.CHARS_PER_TOKEN
    assert counts["pydoc"] * 2048 < 1.1 * pydoc_tokens + 2048
    assert sum(counts.values()) == 1024 and max(counts.values()) < 0.6 * 1024


def test_windows_are_slices_of_the_stream(tiny_tokenizer, cache):
    docs = load_corpus("pydoc", "calib")[:10]
    a = calibration_batches(tiny_tokenizer, docs, nsamples=5, seqlen=33, seed=1)
    b = calibration_batches(tiny_tokenizer, docs, nsamples=5, seqlen=33, seed=1)
    c = calibration_batches(tiny_tokenizer, docs, nsamples=5, seqlen=33, seed=2)
    assert a.shape == (5, 33) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = _stream(tiny_tokenizer, docs)
    assert all(_is_window(row, stream) for row in a.tolist())
    assert not cache.exists()  # a plain list of documents is not cached


def test_cache_is_lazy_and_never_changes_results(tiny_tokenizer, cache):
    cold = calibration_batches(tiny_tokenizer, "sotu", nsamples=3, seqlen=128, seed=0)
    files = list(cache.glob("sotu-*.npz"))
    assert len(files) == 1 and not list(cache.glob(".*tmp"))
    with tokens.np.load(files[0], allow_pickle=False) as z:
        assert 0 < len(z["index"]) < 0.05 * len(source_split("sotu", "calib"))  # only what it used
    warm = calibration_batches(tiny_tokenizer, "sotu", nsamples=3, seqlen=128, seed=0)
    assert torch.equal(cold, warm)
    more = calibration_batches(tiny_tokenizer, "sotu", nsamples=6, seqlen=128, seed=5)
    files[0].write_bytes(b"not a numpy archive")  # damaged: ignored and rewritten
    again = calibration_batches(tiny_tokenizer, "sotu", nsamples=6, seqlen=128, seed=5)
    assert torch.equal(more, again)
    with tokens.np.load(files[0], allow_pickle=False) as z:
        assert len(z["index"]) > 0


def test_cache_key_follows_tokenizer_and_text(tiny_tokenizer):
    path = tokens.cache_path("sotu", tiny_tokenizer, ["a", "b"])
    assert path == tokens.cache_path("sotu", tiny_tokenizer, ["a", "b"])
    assert path != tokens.cache_path("sotu", tiny_tokenizer, ["a", "c"])
    assert tokens.cache_path("x", object(), ["a"]) is None  # no serialized form, no disk cache


def test_bad_calibration_inputs(tiny_tokenizer, cache):
    out = calibration_batches(tiny_tokenizer, "pydoc", nsamples=3, seqlen=64, seed=0)
    assert out.shape == (3, 64)
    with pytest.raises(AqlmkitError, match=r"has only \d+ tokens"):
        calibration_batches(tiny_tokenizer, ["tiny text"], nsamples=2, seqlen=512, seed=0)
    with pytest.raises(AqlmkitError, match=r"has only \d+ tokens"):
        calibration_batches(tiny_tokenizer, torch.arange(10), nsamples=2, seqlen=512, seed=0)
    with pytest.raises(AqlmkitError, match="seqlen"):
        calibration_batches(tiny_tokenizer, "pydoc", nsamples=2, seqlen=1, seed=0)
    with pytest.raises(AqlmkitError, match="'ood' corpus is evaluation text only"):
        calibration_batches(tiny_tokenizer, "ood", nsamples=2, seqlen=64, seed=0)
    with pytest.raises(AqlmkitError, match="unknown dataset"):
        calibration_batches(tiny_tokenizer, "novels", nsamples=2, seqlen=64, seed=0)
    with pytest.raises(AqlmkitError, match="no text"):
        calibration_batches(tiny_tokenizer, ["  "], nsamples=2, seqlen=64, seed=0)


def test_tokenize_prefix_matches_whole_text(tiny_tokenizer):
    from aqlmkit.data.calibration import tokenize_docs

    docs = load_corpus("default", "eval")[:60]
    whole = tokenize_docs(tiny_tokenizer, docs)
    for limit in (1, 700, 5000):
        assert torch.equal(tokenize_docs(tiny_tokenizer, docs, limit_tokens=limit), whole[:limit])
    assert torch.equal(tokenize_docs(tiny_tokenizer, docs, limit_tokens=10**9), whole)
