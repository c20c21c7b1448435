"""A small gpt-fast-style decode loop: static KV cache, eager prefill, ``torch.compile``'d step.

Why not ``model.generate``: at batch 1 on a CPU, transformers' generation loop (logits processors,
stopping criteria, cache bookkeeping, per-module Python) costs ~10-15 ms per token, as much as the
2-bit layers' own work. Here a step is one compiled call ``model(token, cache) -> next token`` with
the cache's tensors at fixed addresses, so Python runs once per token instead of once per op.

The prefill stays eager (its length varies, and it fills the per-layer packed operands
``QuantizedLinear`` caches for the compiled step, see ``kernels.aqlm_linear_cached``). The cache
length is rounded up to ``bucket`` tokens and reused, so a new prompt length does not recompile.
Models whose layers torch.compile cannot trace (e.g. the official ``aqlm`` Numba kernel) run the
same loop with ``compile=False``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from aqlmkit.errors import AqlmkitError
from aqlmkit.nn.fused import fuse_siblings
from aqlmkit.runtime.compiled import compile_step, steady_stance

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [1, vocab] -> token [1, 1]


@dataclass
class DecodeStats:
    """Timings of the last :meth:`StaticDecoder.generate` call (wall seconds)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward, which also yields the first new token
    compile_s: float = 0.0  # first compiled step of a new cache shape (compile included)
    step_s: list[float] = field(default_factory=list)  # every other decode step

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    @property
    def decode_tok_s(self) -> float:
        """Steady-state decode speed: timed steps per second (prefill and compile excluded)."""
        return len(self.step_s) / self.decode_s if self.step_s else 0.0


def _greedy_step(model: nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def _logits_step(model: nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    return model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


class StaticDecoder:
    """Batch-1 decoding of a Hugging Face causal LM with a static cache and a compiled step.

    ``compile=False`` runs the identical loop eagerly (for layers dynamo cannot trace, and as the
    reference the compiled loop is tested against). ``fullgraph=True`` makes any graph break an
    error instead of a silent slowdown.
    """

    def __init__(self, model: nn.Module, *, compile: bool = True, fullgraph: bool = True,
                 bucket: int = 64, freeze: bool = True, skip_guards: bool = True) -> None:
        if bucket < 1:
            raise AqlmkitError(f"bucket must be >= 1 (got {bucket})")
        self.model, self.bucket, self.compiled = model.eval(), bucket, compile
        self.skip_guards = compile and skip_guards
        self._cache = None
        self._cache_len = 0
        self._warm: set[tuple] = set()
        self.stats = DecodeStats()
        dev = next(model.parameters()).device
        if dev.type == "cuda":  # q/k/v and gate/up as one launch each (aqlmkit.nn.fused)
            fuse_siblings(model)
        opts = {"fullgraph": fullgraph, "freeze": freeze}  # see compiled.compile_step
        self._greedy = compile_step(_greedy_step, dev, **opts) if compile else _greedy_step
        self._logits = compile_step(_logits_step, dev, **opts) if compile else _logits_step

    def _cache_for(self, length: int):
        """The static cache (reset), reallocated only when ``length`` outgrows it."""
        from transformers import StaticCache

        size = -(-length // self.bucket) * self.bucket
        if self._cache is None or self._cache_len < length:
            self._cache = StaticCache(config=self.model.config, max_cache_len=size)
            self._cache_len = size
        else:
            self._cache.reset()
        return self._cache

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 eos_token_id: int | Sequence[int] | None = None, sampler: Sampler | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Prompt + up to ``max_new_tokens`` tokens, [1, P + n]; greedy unless ``sampler`` is given.

        ``on_token`` sees each new token ([1, 1]) as soon as it exists (streaming); generation stops
        after an ``eos_token_id`` (one id or several).
        """
        ids = self._check(input_ids, max_new_tokens)
        stops = set() if eos_token_id is None else (
            {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        cache = self._cache_for(ids.shape[1] + max_new_tokens)
        st = self.stats = DecodeStats(prompt_tokens=ids.shape[1])
        t0 = time.perf_counter()
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1, keepdim=True) if sampler is None else sampler(logits)
        st.prefill_s = time.perf_counter() - t0
        out = [token]
        if on_token is not None:
            on_token(token)
        while len(out) < max_new_tokens and not (stops and int(token) in stops):
            token = self._timed_step(token, cache, sampler)
            out.append(token)
            if on_token is not None:
                on_token(token)
        st.new_tokens = len(out)
        return torch.cat([ids, *out], dim=1)

    def _timed_step(self, token: torch.Tensor, cache, sampler: Sampler | None) -> torch.Tensor:
        """One step; the first compiled call per cache shape counts as compile time, not decode."""
        key = (self._cache_len, sampler is None)
        first = self.compiled and key not in self._warm
        t = time.perf_counter()
        with steady_stance(first, self.skip_guards):
            if sampler is None:
                token = self._greedy(self.model, token, cache)
            else:
                token = sampler(self._logits(self.model, token, cache))
        dt = time.perf_counter() - t
        if first:
            self._warm.add(key)
            self.stats.compile_s += dt
        else:
            self.stats.step_s.append(dt)
        return token

    def _check(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise AqlmkitError(f"StaticDecoder decodes one sequence: input_ids must be [1, P>=1], "
                               f"got {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise AqlmkitError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and input_ids.shape[1] + max_new_tokens > limit:
            raise AqlmkitError(f"prompt ({input_ids.shape[1]}) + new tokens ({max_new_tokens}) exceed the "
                               f"model's {limit} positions")
        return input_ids.to(next(self.model.parameters()).device)
