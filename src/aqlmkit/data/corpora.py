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

from aqlmkit.data.builtin import DEFAULT_MIX, OOD_SOURCE, SOURCES, Doc, chunks
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
    return tuple(SOURCES[name].load())


@functools.lru_cache(maxsize=16)
def source_split(name: str, split: str) -> tuple[str, ...]:
    """Texts of one built-in source's split: units split by hash, then cut into pieces."""
    src = SOURCES[name]
    units = split_docs(list(_source_docs(name)), split, src.eval_fraction)
    if src.piece_chars is None:
        return tuple(t for _, t in units)
    return tuple(p for _, t in units for p in chunks(t, src.piece_chars))


def _round_robin(parts: list[tuple[str, ...]]) -> list[str]:
    """One piece of each source in turn, so every prefix of a mix is balanced by genre."""
    out = []
    for i in range(max(map(len, parts))):
        out += [p[i] for p in parts if i < len(p)]
    return out


def mix_parts(name: str) -> dict[str, float]:
    """The built-in sources behind ``name`` with their share of calibration windows."""
    if name == "default":
        return dict(DEFAULT_MIX)
    if name == "ood":
        return {OOD_SOURCE: 1.0}
    return {name: 1.0}


def _builtin_split(name: str, split: str) -> list[str]:
    """A built-in corpus's split; ``default`` interleaves its sources' own splits."""
    if name == "ood" and split != "eval":
        raise AqlmkitError(f"the 'ood' corpus is evaluation text only (split 'eval'; asked for "
                           f"{split!r}): it is the eval half of {OOD_SOURCE!r}, kept out of every "
                           "calibration default. Calibrate on 'default' or another corpus")
    return _round_robin([source_split(p, split) for p in mix_parts(name)])


def corpus_names() -> list[str]:
    return ["default", "ood", *SOURCES, *HUB_DATASETS]


def is_builtin(name: str) -> bool:
    return name in ("default", "ood") or name in SOURCES


def load_corpus(name: str, split: str = "eval") -> list[str]:
    """Documents of corpus ``name`` for ``split`` (calib, eval, or all); never empty.

    ``ood`` has only an eval split: the out-of-domain text no calibration default uses.
    """
    if split not in SPLITS:
        raise AqlmkitError(f"unknown split {split!r}; use calib or eval")
    name = str(name)
    if name in HUB_DATASETS:
        if split == "all":
            texts = hub_docs(name, "calib") + hub_docs(name, "eval")
        else:
            texts = hub_docs(name, split)
    elif is_builtin(name):
        texts = _builtin_split(name, split)
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


def calibration_sources(name: str) -> list[tuple[str, float, list[str]]]:
    """``(label, share of windows, calib texts)`` for each source behind corpus ``name``."""
    name = str(name)
    if is_builtin(name):
        _builtin_split(name, "calib")  # 'ood' refuses here, with its one-line reason
        return [(p, w, list(source_split(p, "calib"))) for p, w in mix_parts(name).items()]
    return [(name, 1.0, load_corpus(name, "calib"))]
