"""Token samplers for :class:`aqlmkit.runtime.StaticDecoder` (temperature, top-k, top-p).

They run eagerly on the step's logits (one [1, vocab] row per token: ~50 us, small next to a
decode step), so one compiled step serves greedy and sampled decoding alike.
"""
from __future__ import annotations

import torch

from aqlmkit.errors import AqlmkitError


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None):
    """logits [1, vocab] -> token [1, 1], with the same knobs (and order) as transformers:
    temperature, then top-k (0: off), then top-p (1: off)."""
    if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise AqlmkitError("need temperature > 0, top_k >= 0 and 0 < top_p <= 1")

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float() / temperature
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) >= top_p  # keep the smallest set reaching top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)

    return sample
