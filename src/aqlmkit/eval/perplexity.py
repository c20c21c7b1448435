"""Perplexity with the GPTQ/AQLM protocol.

Join the eval documents with blank lines, tokenize once, cut into non-overlapping ``seqlen``
windows (tail dropped), and take exp of the mean next-token NLL over all windows. Every window
has the same number of predictions, so this equals the papers' mean of per-window losses.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aqlmkit.data.calibration import tokenize_docs
from aqlmkit.errors import AqlmkitError


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int  # tokens fed to the model (windows * seqlen)
    seconds: float
    windows: int
    seqlen: int = 0
    nll: float = 0.0  # mean next-token NLL (nats)


def _eval_ids(tokenizer, dataset_or_text, limit_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the eval text; a corpus name/path is loaded via ``load_corpus(..., 'eval')``."""
    if isinstance(dataset_or_text, torch.Tensor):
        return dataset_or_text.reshape(-1).long()
    if isinstance(dataset_or_text, (list, tuple)):
        return tokenize_docs(tokenizer, list(dataset_or_text), limit_tokens=limit_tokens)
    text = str(dataset_or_text)
    from aqlmkit.data.corpora import corpus_names, load_corpus

    if text in corpus_names() or (text.lower().endswith((".txt", ".jsonl")) and "\n" not in text):
        return tokenize_docs(tokenizer, load_corpus(text, "eval"), limit_tokens=limit_tokens)
    return tokenize_docs(tokenizer, text)


def effective_seqlen(model, seqlen: int) -> int:
    """``seqlen`` capped by the model's context (position embeddings beyond it are untrained)."""
    if seqlen < 2:
        raise AqlmkitError(f"seqlen must be at least 2 to predict a token (got {seqlen})")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(seqlen, int(limit)) if limit else seqlen


def _windows(ids: torch.Tensor, seqlen: int, limit_tokens: int | None) -> torch.Tensor:
    if limit_tokens is not None:
        if limit_tokens < 2:
            raise AqlmkitError(f"limit_tokens must be at least 2 (got {limit_tokens})")
        ids = ids[:limit_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise AqlmkitError(f"the eval text has {ids.numel()} tokens, fewer than one window of "
                           f"seqlen={seqlen}; use a smaller --seqlen or more text")
    return ids[: n * seqlen].view(n, seqlen)


def _batch_nll(model, batch: torch.Tensor) -> float:
    """Summed next-token NLL of a batch, upcast per row so fp16/bf16 logits never overflow."""
    logits = model(input_ids=batch, use_cache=False).logits
    total = 0.0
    for row, ids in zip(logits, batch):
        total += F.cross_entropy(row[:-1].float(), ids[1:], reduction="sum").item()
    return total


@torch.no_grad()
def perplexity(model, tokenizer, dataset_or_text, seqlen: int = 2048, batch_size: int = 1,
               limit_tokens: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on a corpus name/path, a list of documents, raw text or token ids."""
    if batch_size < 1:
        raise AqlmkitError(f"batch_size must be at least 1 (got {batch_size})")
    seqlen = effective_seqlen(model, seqlen)
    windows = _windows(_eval_ids(tokenizer, dataset_or_text, limit_tokens), seqlen, limit_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress)
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size].to(device)
            total += _batch_nll(model, batch)
            count += batch.shape[0] * (seqlen - 1)
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), tokens=windows.numel(),
                            seconds=time.perf_counter() - start, windows=len(windows),
                            seqlen=seqlen, nll=nll)
