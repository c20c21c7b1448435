"""Corpora: built-in text, deterministic disjoint splits, files, hub datasets (pointed at local
files), and calibration windows."""
from __future__ import annotations

import json

import pytest
import torch

from aqlmkit.data import corpora, hub
from aqlmkit.data.calibration import calibration_batches, tokenize_docs
from aqlmkit.data.corpora import load_corpus
from aqlmkit.errors import AqlmkitError


@pytest.mark.parametrize("name", ["pydoc", "kjv", "default"])
def test_builtin_splits_disjoint_and_real(name):
    calib, ev = load_corpus(name, "calib"), load_corpus(name, "eval")
    assert calib and ev and not set(calib) & set(ev)
    assert sum(map(len, ev)) > 40_000  # enough for 2048-token windows
    assert load_corpus(name, "eval") == ev  # deterministic
    everything = load_corpus(name, "all")
    assert sorted(everything) == sorted(calib + ev)


def test_builtin_content():
    assert any("In the beginning God created the heaven and the earth." in d
               for d in load_corpus("kjv", "all"))
    assert any("lambda" in d for d in load_corpus("pydoc", "all"))
    mix = load_corpus("default", "eval")
    assert set(mix) == set(load_corpus("pydoc", "eval")) | set(load_corpus("kjv", "eval"))
    assert mix[:20] != load_corpus("pydoc", "eval")[:20]  # interleaved, not concatenated


def test_split_is_by_document_hash():
    docs = [(f"d{i}", f"text {i}") for i in range(400)] + [("dup", "text 7")]
    ev = corpora.split_docs(docs, "eval", 0.25)
    calib = corpora.split_docs(docs, "calib", 0.25)
    assert len(ev) + len(calib) == 401 and 60 < len(ev) < 140
    assert ("dup", "text 7") in (ev if ("d7", "text 7") in ev else calib)  # duplicates stay together
    # the split of a document never depends on the others around it
    assert corpora.split_docs(docs[::-1], "eval", 0.25) == ev[::-1]


def test_txt_and_jsonl_files(tmp_path):
    paras = [f"Paragraph number {i} says something distinct." for i in range(60)]
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(paras))
    calib, ev = load_corpus(str(txt), "calib"), load_corpus(str(txt), "eval")
    assert sorted(calib + ev) == sorted(paras) and ev and not set(calib) & set(ev)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": p}) for p in paras) + "\n")
    assert sorted(load_corpus(str(jl), "all")) == sorted(paras)


def test_bad_corpora(tmp_path):
    with pytest.raises(AqlmkitError, match="unknown dataset"):
        load_corpus("wikitext3", "eval")
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(AqlmkitError, match="no text"):
        load_corpus(str(empty), "calib")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(AqlmkitError, match="field 'text'"):
        load_corpus(str(bad), "eval")
    with pytest.raises(AqlmkitError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"), "eval")
    with pytest.raises(AqlmkitError, match="unknown split"):
        load_corpus("pydoc", "train")


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """Point 'wikitext2' and 'c4' at local json files through the real datasets loader."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"text": f"train line {i}"}) + "\n" for i in range(30)))
    test.write_text("".join(json.dumps({"text": f"test line {i}"}) + "\n" for i in range(10)))
    files = {"train": str(train), "test": str(test)}
    monkeypatch.setitem(hub.HUB_DATASETS, "wikitext2",
                        hub.HubSpec("json", None, {"calib": "train", "eval": "test"}, data_files=files))
    monkeypatch.setitem(hub.HUB_DATASETS, "c4",
                        hub.HubSpec("json", None, {"calib": "train", "eval": "test[:4]"},
                                    data_files=files))
    return files


def test_hub_datasets_via_local_files(local_hub):
    assert load_corpus("wikitext2", "eval") == [f"test line {i}" for i in range(10)]
    assert len(load_corpus("wikitext2", "calib")) == 30
    assert load_corpus("c4", "eval") == [f"test line {i}" for i in range(4)]


def test_hub_dataset_unavailable(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    gone = {"test": str(tmp_path / "not-downloaded.jsonl")}
    monkeypatch.setitem(hub.HUB_DATASETS, "ptb",
                        hub.HubSpec("json", None, {"eval": "test"}, data_files=gone))
    with pytest.raises(AqlmkitError, match="'ptb' .* is unavailable"):
        load_corpus("ptb", "eval")


def test_calibration_batches(tiny_tokenizer):
    docs = load_corpus("pydoc", "calib")[:10]
    ids = tokenize_docs(tiny_tokenizer, docs)
    a = calibration_batches(tiny_tokenizer, docs, nsamples=5, seqlen=33, seed=1)
    b = calibration_batches(tiny_tokenizer, docs, nsamples=5, seqlen=33, seed=1)
    c = calibration_batches(tiny_tokenizer, docs, nsamples=5, seqlen=33, seed=2)
    assert a.shape == (5, 33) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text = ids.tolist()
    for row in a.tolist():  # each row is a contiguous window of the tokenized corpus
        assert any(text[s:s + 33] == row for s in range(len(text) - 32))


def test_calibration_by_name_and_too_small(tiny_tokenizer):
    out = calibration_batches(tiny_tokenizer, "pydoc", nsamples=3, seqlen=64, seed=0)
    assert out.shape == (3, 64)
    with pytest.raises(AqlmkitError, match=r"has only \d+ tokens"):
        calibration_batches(tiny_tokenizer, ["tiny text"], nsamples=2, seqlen=512, seed=0)
    with pytest.raises(AqlmkitError, match="seqlen"):
        calibration_batches(tiny_tokenizer, "pydoc", nsamples=2, seqlen=1, seed=0)
