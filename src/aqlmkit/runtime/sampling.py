"""Token sampling: per-request parameters and samplers (temperature, top-k, top-p, seed).

Samplers run eagerly on one request's logits row ([1, vocab]: ~50 us, small next to a decode
step), so one compiled step serves greedy and sampled requests in the same batch, and a request's
seeded generator gives the same tokens whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy (the other knobs are ignored).

    ``stop``: strings that end the text (not included in it); ``stop_token_ids``: tokens that end
    it, as the model's eos does unless ``ignore_eos``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise AqlmkitError(f"max_tokens must be at least 1 (got {self.max_tokens})")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise AqlmkitError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if any(not s for s in self.stop):
            raise AqlmkitError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler(self, device: torch.device):
        """This request's sampler (None when greedy), with its own generator when seeded."""
        if self.greedy:
            return None
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
        return make_sampler(self.temperature, self.top_k, self.top_p, generator=gen)
