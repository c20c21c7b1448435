"""Incremental detokenization with stop strings, shared by streaming and non-streaming replies.

Decoding token by token breaks multi-byte characters and merges (a byte-level BPE token can be half
of an emoji), so the whole generated sequence is decoded each time and only the new suffix is
emitted; text that could still turn into a stop string is held back until it cannot.
"""
from __future__ import annotations

from typing import Sequence


class TextTracker:
    """Feeds generated token ids, yields text deltas; ``stopped`` once a stop string appeared."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tok, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decoded(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """The text this token makes safe to emit (maybe empty)."""
        self.ids.append(int(token_id))
        full = self._decoded()
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full[: len(full) - self._held(full)])

    def finish(self) -> str:
        """Text held back for a possible stop string, released at the end of generation."""
        if self.stopped:
            return ""
        return self._emit(self._decoded())

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text):  # a merge changed earlier text: emit nothing twice
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta

    def _first_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self, full: str) -> int:
        """Length of the longest tail of ``full`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:k]):
                    best = k
                    break
        return best
