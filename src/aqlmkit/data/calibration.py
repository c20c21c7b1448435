"""Calibration windows, GPTQ/AQLM style: random ``seqlen``-token slices of the calib text.

A mixed corpus (``default``) gives each source its fixed share of the windows, so no genre
dominates however unequal the sources' sizes; a source's share is capped near its own size
(about ``chars / 4`` tokens) and the rest goes to the others, so a small source is not repeated
many times over. Windows are drawn from each source's token stream (``tokens.TokenStream``),
which tokenizes only the pieces they touch and caches them on disk.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from aqlmkit.data.tokens import CHARS_PER_TOKEN, TokenStream, cache_path
from aqlmkit.errors import AqlmkitError

_MARGIN = 256  # tokens past the limit, so the cut of the prefix cannot reach the kept ids


def tokenize_docs(tokenizer, docs: list[str] | str,
                  limit_tokens: int | None = None) -> torch.Tensor:
    """Join documents with blank lines and tokenize once (1-D LongTensor), as the papers do.

    With ``limit_tokens``, only a prefix of the documents long enough for that many tokens (and
    a margin) is tokenized, and its first ``limit_tokens`` ids are returned: the same ids as the
    whole text's, since a tokenizer's pieces depend only on nearby text. ``perplexity`` with
    ``--limit-tokens 16384`` then tokenizes ~70 KB instead of the whole 1.6 MB eval split.
    """
    if isinstance(docs, str) or limit_tokens is None:
        return _tokenize(tokenizer, docs if isinstance(docs, str) else "\n\n".join(docs))
    need, chars = limit_tokens + _MARGIN, (limit_tokens + _MARGIN) * CHARS_PER_TOKEN
    ends = np.cumsum([len(d) + 2 for d in docs])
    while True:
        k = min(len(docs), int(np.searchsorted(ends, chars)) + 1)
        ids = _tokenize(tokenizer, "\n\n".join(docs[:k]))
        if ids.numel() >= need or k == len(docs):
            return ids[:limit_tokens]
        chars *= 2


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    # The joined corpus is far longer than model_max_length on purpose; windows come later.
    return tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]


def _rng(seed: int, label: str) -> np.random.Generator:
    """A generator per (seed, source): adding a source never changes another's windows."""
    digest = hashlib.sha256(f"{int(seed)}\0{label}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def allocate(nsamples: int, shares: list[float], caps: list[int]) -> list[int]:
    """Windows per source: proportional to ``shares``, none above its cap while others have room.

    Largest remainders round to integers (ties to the earlier source), so the counts always sum
    to ``nsamples`` and depend on nothing but these arguments.
    """
    if not any(s > 0 for s in shares):
        raise ValueError("allocate needs at least one positive share")
    counts = [0] * len(shares)
    open_ = [i for i, s in enumerate(shares) if s > 0]
    left = nsamples
    while left and open_:
        total = sum(shares[i] for i in open_)
        ideal = {i: left * shares[i] / total for i in open_}
        capped = [i for i in open_ if counts[i] + ideal[i] > caps[i]]
        if not capped:
            base = {i: math.floor(ideal[i]) for i in open_}
            order = sorted(open_, key=lambda i: (-(ideal[i] - base[i]), i))
            for k, i in enumerate(order):
                counts[i] += base[i] + (k < left - sum(base.values()))
            return counts
        for i in capped:
            left -= caps[i] - counts[i]
            counts[i] = caps[i]
        open_ = [i for i in open_ if i not in capped]
    if left:  # every source is at its cap: more windows than text, so repeat by share
        extra = allocate(left, shares, [nsamples] * len(shares))
        counts = [c + e for c, e in zip(counts, extra)]
    return counts


def _sources(dataset) -> tuple[list[tuple[str, float, list[str]]], bool]:
    """The (label, share, texts) behind ``dataset`` and whether to cache their tokens."""
    if isinstance(dataset, (list, tuple)):
        return [("docs", 1.0, [str(d) for d in dataset if str(d).strip()])], False
    from aqlmkit.data.corpora import calibration_sources

    return calibration_sources(str(dataset)), True


def _counts(sources, nsamples: int, seqlen: int) -> list[int]:
    """Each source's windows: its share, capped at about its own size in tokens."""
    caps = [max(1, math.ceil(sum(map(len, t)) / CHARS_PER_TOKEN / seqlen)) for _, _, t in sources]
    return allocate(nsamples, [s for _, s, _ in sources], caps)


def _tensor_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    n = ids.numel()
    if n < seqlen:
        raise AqlmkitError(f"the calibration corpus has only {n} tokens, fewer than seqlen="
                           f"{seqlen}; use a shorter --seqlen or a bigger corpus")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_batches(tokenizer, dataset, nsamples: int, seqlen: int,
                        seed: int = 0) -> torch.Tensor:
    """``LongTensor[nsamples, seqlen]`` of random windows.

    ``dataset``: a corpus name (its calib split), a list of documents, or a tensor of token ids.
    """
    if nsamples < 1 or seqlen < 2:
        raise AqlmkitError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if isinstance(dataset, torch.Tensor):
        return _tensor_windows(dataset.reshape(-1).long(), nsamples, seqlen, seed)
    sources, cached = _sources(dataset)
    counts = _counts(sources, nsamples, seqlen)
    rows = []
    for (label, _, texts), count in zip(sources, counts):
        if count:
            path = cache_path(label, tokenizer, texts) if cached else None
            stream = TokenStream(tokenizer, texts, path)
            rows += stream.windows(count, seqlen, _rng(seed, label))
    order = _rng(seed, "\0mix").permutation(len(rows)) if len(sources) > 1 else range(len(rows))
    return torch.from_numpy(np.stack([rows[i] for i in order])).long()


def window_counts(dataset, nsamples: int, seqlen: int) -> dict[str, int]:
    """How many of ``calibration_batches``' windows each source of ``dataset`` gives."""
    sources, _ = _sources(dataset)
    return {label: c for (label, _, _), c in zip(sources, _counts(sources, nsamples, seqlen))}
