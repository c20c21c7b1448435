"""The serving engine: one loop owns the model and runs iteration-level (continuous) batching.

Each iteration of :meth:`Engine.step`:

1. admits waiting requests into free cache slots (lowest slot first, so decode buckets stay small)
   and frees the slots of finished or cancelled ones;
2. reads at most ``prefill_chunk`` prompt tokens in all, oldest request first, one forward per
   request: several short prompts are read in the same iteration, a long one in chunks of
   ``prefill_chunk`` over several. A request's chunks never depend on what else is queued, so its
   numerics (kernels may round differently for a different number of rows) are the same served
   alone or among others;
3. runs **one** decode step for every request that is generating, all in one batch.

So a request that arrives mid-stream joins the decode batch at the iteration after its prompt is
read, finished ones leave at once, and the stall a long prompt causes the running streams is
bounded: between two of their tokens at most ``prefill_chunk`` prompt tokens are read (plus the
decode step itself). Sampling happens inside the step, per request (its own temperature, top-p,
top-k and seeded generator), and stops (eos, stop token ids, stop strings, max_tokens) are checked
per token, so a finished request's slot is reused at the next iteration.

The decode step runs over a *bucket* of batch rows (1, 2, 4, ... up to ``max_batch``) and reads a
bucket of cache columns (multiples of ``len_bucket``); with ``compile=True`` each (rows, columns)
bucket is one ``torch.compile``'d graph (also a CUDA graph on CUDA), compiled on first use.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from aqlmkit.errors import AqlmkitError
from aqlmkit.nn.fused import fuse_siblings
from aqlmkit.runtime.compiled import compile_step, cuda_graph_thread_state, steady_stance
from aqlmkit.runtime.sampling import SamplingParams
from aqlmkit.runtime.slots import SlotCache, StepBatch, install
from aqlmkit.runtime.text import TextTracker


class QueueFull(AqlmkitError):
    """The waiting queue holds ``max_queue`` requests already (HTTP 429)."""


@dataclass
class Event:
    """What one step produced for one request: a token, the text it released, maybe the end."""

    token_id: int
    text: str
    finish_reason: str | None  # None while generating; "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int


class Request:
    """One generation in the engine: its prompt, slot, position and output so far."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None],
                 tokenizer, stop_ids: set[int]) -> None:
        self.id, self.prompt, self.params, self.sink = rid, prompt, params, sink
        self.text = TextTracker(tokenizer, params.stop) if tokenizer is not None else None
        self.stop_ids = stop_ids
        self.slot: int | None = None
        self.pos = 0  # tokens already in the cache (prompt tokens read, then generated ones)
        self.last_token: int | None = None
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self.sampler = None

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)


def _bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, at most cap."""
    return min(cap, 1 << max(0, n - 1).bit_length())


def _decode_forward(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                    step: StepBatch) -> torch.Tensor:
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, aqlmkit_step=step,
                use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


class _Compiled:
    """One bucket's compiled decode forward; calls after the first skip dynamo's guard checks."""

    def __init__(self, fn: Callable, device: torch.device) -> None:
        self.fn, self.warm = compile_step(fn, device, cuda_graphs=True), False

    def __call__(self, *args):
        with steady_stance(not self.warm):
            out = self.fn(*args)
        self.warm = True
        return out


class Engine:
    """Continuous batching over a fixed-slot KV cache (see the module docstring).

    ``step()`` is one iteration; ``start()`` runs it in a thread that owns the model (the server),
    ``generate()`` drives it in the caller's thread (``aqlmkit generate`` / ``chat``: batch 1).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, max_batch: int = 8, context: int | None = None,
                 prefill_chunk: int = 256, max_queue: int = 64, compile: bool = False,
                 len_bucket: int = 256) -> None:
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        context = min(context or 2048, limit)
        if max_batch < 1 or prefill_chunk < 1 or max_queue < 0 or len_bucket < 1:
            raise AqlmkitError("need max_batch >= 1, prefill_chunk >= 1, max_queue >= 0, len_bucket >= 1")
        install(model)
        self.model, self.tok = model.eval(), tokenizer
        p = next(model.parameters())
        self.device = p.device
        if self.device.type == "cuda":  # q/k/v and gate/up as one launch each in decode steps
            fuse_siblings(model)
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        self.cache = SlotCache(model.config, max_batch, context, self.device, dtype)
        self.max_batch, self.context, self.prefill_chunk = max_batch, context, prefill_chunk
        self.max_queue, self.len_bucket, self.compiled = max_queue, len_bucket, compile
        self.eos_ids = _eos_ids(model, tokenizer)
        self._free = list(range(max_batch))
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # admitted, in arrival order
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._graphs: dict[tuple[int, int], Callable] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and metrics)

    # ------------------------------------------------------------------ submission (any thread)
    def validate(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise AqlmkitError("the prompt is empty: send at least one token of text")
        if len(prompt) + params.max_tokens > self.context:
            raise AqlmkitError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) "
                               f"exceeds the context of {self.context} tokens; shorten the prompt or "
                               "lower max_tokens")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise AqlmkitError(f"prompt token ids must be in [0, {vocab})")
        return prompt

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Event], None]) -> Request:
        """Queue a request; ``sink`` gets its events from the engine's thread.

        QueueFull when ``max_queue`` requests already wait with no free slot ahead of them."""
        prompt = self.validate(prompt, params)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        with self._cond:  # requests a free slot takes at the next iteration do not count as queued
            if len(self._waiting) - len(self._free) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            req = Request(next(self._ids), prompt, params, sink, self.tok, stop_ids)
            self._waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone); its slot is freed at the next iteration."""
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ the loop (engine thread)
    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration (admit, <= prefill_chunk prompt tokens, one decode step); False if idle."""
        self._admit()
        if not self._active:
            return False
        budget = self.prefill_chunk
        for r in [r for r in self._active if r.prefilling]:
            n = min(self.prefill_chunk, len(r.prompt) - r.pos)
            if n > budget:
                break
            budget -= self._prefill_chunk(r, n)
        if any(not r.prefilling and r.finish_reason is None for r in self._active):
            self._decode()
        self._retire()
        return True

    def _admit(self) -> None:
        self._retire()
        with self._cond:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                self._finish(r, "cancelled")
            while self._waiting and self._free:
                req = self._waiting.popleft()
                req.slot = heapq.heappop(self._free)
                req.sampler = req.params.sampler(self.device)
                self._active.append(req)

    def _retire(self) -> None:
        """Free the slots of finished and cancelled requests."""
        keep = []
        for r in self._active:
            if r.cancelled and r.finish_reason is None:
                self._finish(r, "cancelled")
            if r.finish_reason is None:
                keep.append(r)
            else:
                heapq.heappush(self._free, r.slot)
                r.slot = None
        self._active = keep

    def _prefill_chunk(self, req: Request, n: int) -> int:
        """Read the next ``n`` prompt tokens of ``req`` (one forward); returns ``n``."""
        p0 = req.pos
        ids = torch.tensor([req.prompt[p0:p0 + n]], device=self.device)
        pos = torch.arange(p0, p0 + n, device=self.device)[None]
        cols = torch.arange(p0 + n, device=self.device)
        mask = (cols[None, :] <= pos[0, :, None])[None, None]
        step = StepBatch(self.cache, torch.tensor([req.slot], device=self.device), pos, req.slot, p0 + n, mask)
        logits = _decode_forward(self.model, ids, pos, mask, step)
        req.pos = p0 + n
        if not req.prefilling:
            self._accept(req, logits[0:1])
        return n

    def _decode(self) -> None:
        live = [r for r in self._active if not r.prefilling and r.finish_reason is None]
        rows = _bucket(max(r.slot for r in live) + 1, self.max_batch)
        top = max(r.pos for r in live) + 1
        cols = min(self.context, -(-top // self.len_bucket) * self.len_bucket)
        ids, pos = [0] * rows, [self.cache.trash] * rows  # padding rows write the trash column
        for r in live:
            ids[r.slot], pos[r.slot] = r.last_token, r.pos
        dev = self.device
        ids_t = torch.tensor(ids, device=dev)[:, None]
        pos_t = torch.tensor(pos, device=dev)[:, None]
        mask = (torch.arange(cols, device=dev)[None, :] <= pos_t)[:, None, None, :]
        step = StepBatch(self.cache, torch.arange(rows, device=dev), pos_t, 0, cols, mask)
        logits = self._graph(rows, cols)(self.model, ids_t, pos_t, mask, step)
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        for r in live:
            r.pos += 1
            if r.sampler is None:
                self._emit(r, greedy[r.slot])
            else:
                self._accept(r, logits[r.slot:r.slot + 1])

    def _graph(self, rows: int, cols: int) -> Callable:
        """The decode forward for this bucket: eager, or compiled once per (rows, cols)."""
        if not self.compiled:
            return _decode_forward
        fn = self._graphs.get((rows, cols))
        if fn is None:
            fn = self._graphs[(rows, cols)] = _Compiled(_decode_forward, self.device)
        return fn

    def _accept(self, req: Request, logits: torch.Tensor) -> None:
        """Pick the next token from one request's logits [1, vocab] (greedy or its sampler)."""
        if req.sampler is None:
            token = int(logits.argmax(-1))
        else:
            token = int(req.sampler(logits))
        self._emit(req, token)

    def _emit(self, req: Request, token: int) -> None:
        req.generated.append(token)
        req.last_token = token
        finish, text = None, ""
        if token in req.stop_ids:
            finish = "stop"
            text = req.text.finish() if req.text else ""
        else:
            text = req.text.add(token) if req.text else ""
            if req.text is not None and req.text.stopped:
                finish = "stop"
            elif len(req.generated) >= req.params.max_tokens:
                finish = "length"
                text += req.text.finish() if req.text else ""
        req.finish_reason = finish
        req.sink(Event(token, text, finish, len(req.prompt), len(req.generated)))

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.sink(Event(-1, "", reason, len(req.prompt), len(req.generated)))

    # ------------------------------------------------------------------ drivers
    def generate(self, prompt: Sequence[int], params: SamplingParams,
                 on_event: Callable[[Event], None] | None = None) -> list[int]:
        """Run one request to completion in this thread (the engine must not be started)."""
        if self._thread is not None:
            raise AqlmkitError("Engine.generate cannot run while the engine thread is started")
        events: list[Event] = []

        def sink(ev: Event) -> None:
            events.append(ev)
            if on_event is not None:
                on_event(ev)

        req = self.submit(prompt, params, sink)
        while req.finish_reason is None:
            self.step()
        self._retire()
        return [e.token_id for e in events if e.token_id >= 0]

    def start(self) -> None:
        """Run the loop in a daemon thread that owns the model until :meth:`stop`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="aqlmkit-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for r in list(self._waiting) + self._active:
            if r.finish_reason is None:
                self._finish(r, "cancelled")
        self._waiting.clear()
        self._active = []

    def _loop(self) -> None:
        if self.compiled and self.device.type == "cuda":
            cuda_graph_thread_state()
        while not self._stopping:
            try:
                if self.step():
                    continue
            except Exception:  # noqa: BLE001 - a failed step must not hang every client
                self._fail_all()
                continue
            with self._cond:
                if not self._waiting and not self._stopping:
                    self._cond.wait(timeout=0.5)


    def _fail_all(self) -> None:
        """A step raised (e.g. out of memory): its requests end with "error", the loop goes on."""
        traceback.print_exc()
        for r in self._active:
            if r.finish_reason is None:
                self._finish(r, "error")
        self._retire()


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The model's end-of-sequence ids: generation_config's (one or several) and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


__all__ = ["Engine", "Event", "Request", "QueueFull"]
