"""Calibration windows, GPTQ/AQLM style: random ``seqlen``-token slices of the joined calib text."""
from __future__ import annotations

import torch

from aqlmkit.errors import AqlmkitError


def tokenize_docs(tokenizer, docs: list[str] | str) -> torch.Tensor:
    """Join documents with blank lines and tokenize once (1-D LongTensor), as the papers do."""
    text = docs if isinstance(docs, str) else "\n\n".join(docs)
    # The joined corpus is far longer than model_max_length on purpose; windows come later.
    enc = tokenizer(text, return_tensors="pt", verbose=False)
    return enc["input_ids"][0]


def _resolve_docs(dataset) -> list[str]:
    if isinstance(dataset, (list, tuple)):
        return list(dataset)
    from aqlmkit.data.corpora import load_corpus

    return load_corpus(str(dataset), "calib")


def calibration_batches(tokenizer, dataset, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``LongTensor[nsamples, seqlen]`` of random windows; ``dataset`` is a corpus name or docs."""
    if nsamples < 1 or seqlen < 2:
        raise AqlmkitError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if isinstance(dataset, torch.Tensor):
        ids = dataset.reshape(-1).long()
    else:
        ids = tokenize_docs(tokenizer, _resolve_docs(dataset))
    n = ids.numel()
    if n < seqlen:
        raise AqlmkitError(f"the calibration corpus has only {n} tokens, fewer than seqlen="
                           f"{seqlen}; use a shorter --seqlen or a bigger corpus")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
