"""``load_corpus(name, split)``: every text source behind one name, split into calib/eval.

Built-in and file corpora are split at the document level by a hash of the document text, so the
split is deterministic across runs and machines and a document never lands in both halves.
Hub datasets keep their own train/test splits.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from aqlmkit.data.builtin import BUILTIN, DEFAULT_MIX, EVAL_FRACTION, Doc
from aqlmkit.data.hub import HUB_DATASETS, hub_docs
from aqlmkit.errors import AqlmkitError

SPLITS = ("calib", "eval", "all")
FILE_EVAL_FRACTION = 0.1


def doc_hash(key: str) -> float:
    """Stable value in [0, 1) per document (sha256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_docs(docs: list[Doc], split: str, eval_fraction: float = FILE_EVAL_FRACTION) -> list[Doc]:
    if split == "all":
        return list(docs)
    want_eval = split == "eval"
    # Keyed by the text, so exact duplicates (common in real corpora) always share a split.
    return [d for d in docs if (doc_hash(d[1]) < eval_fraction) == want_eval]


def _read_txt(path: Path) -> list[Doc]:
    """Paragraphs (blank-line separated) are the documents of a plain text file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [(f"{path.name}:{i}", p) for i, p in enumerate(paras) if p]


def _read_jsonl(path: Path) -> list[Doc]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AqlmkitError(f"{path}:{i} is not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise AqlmkitError(f"{path}:{i} has no string field 'text'; each line must be "
                                   '{"text": "..."}')
            docs.append((f"{path.name}:{i}", row["text"]))
    return docs


def _file_docs(path: Path) -> list[Doc]:
    if not path.is_file():
        raise AqlmkitError(f"corpus file {path} does not exist")
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    if path.suffix.lower() == ".txt":
        return _read_txt(path)
    raise AqlmkitError(f"corpus file {path} must end in .txt or .jsonl")


@functools.lru_cache(maxsize=8)
def _source_docs(name: str) -> tuple[Doc, ...]:
    return tuple(BUILTIN[name]())


def _builtin_split(name: str, split: str) -> list[Doc]:
    """A built-in corpus's split; ``default`` mixes the sources' own splits, interleaved."""
    parts = DEFAULT_MIX if name == "default" else (name,)
    docs = [d for p in parts for d in split_docs(list(_source_docs(p)), split, EVAL_FRACTION[p])]
    if name == "default":
        docs.sort(key=lambda d: doc_hash("mix:" + d[0]))
    return docs


def corpus_names() -> list[str]:
    return ["default", *BUILTIN, *HUB_DATASETS]


def load_corpus(name: str, split: str = "eval") -> list[str]:
    """Documents of corpus ``name`` for ``split`` (calib, eval, or all); never empty."""
    if split not in SPLITS:
        raise AqlmkitError(f"unknown split {split!r}; use calib or eval")
    name = str(name)
    if name in HUB_DATASETS:
        if split == "all":
            texts = hub_docs(name, "calib") + hub_docs(name, "eval")
        else:
            texts = hub_docs(name, split)
    elif name == "default" or name in BUILTIN:
        texts = [t for _, t in _builtin_split(name, split)]
    elif name.lower().endswith((".txt", ".jsonl")) or Path(name).exists():
        texts = [t for _, t in split_docs(_file_docs(Path(name).expanduser()), split)]
    else:
        raise AqlmkitError(f"unknown dataset {name!r}; use one of {', '.join(corpus_names())} "
                           "or a .txt/.jsonl file")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise AqlmkitError(f"corpus {name!r} has no text in its {split!r} split; give it more "
                           "documents (paragraphs separated by blank lines, or jsonl rows)")
    return texts
