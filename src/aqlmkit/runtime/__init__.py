"""Inference runtime.

* :class:`Engine`: continuous batching over a fixed-slot KV cache (the server's and the CLI's
  decoder); ``runtime.api`` / ``runtime.server``: the OpenAI-compatible HTTP API in front of it.
* :class:`StaticDecoder`: the batch-1 static-cache, torch.compile'd loop the decode benchmarks use.
"""
from aqlmkit.runtime.decode import DecodeStats, StaticDecoder
from aqlmkit.runtime.engine import Engine, Event, QueueFull
from aqlmkit.runtime.sampling import SamplingParams, make_sampler

__all__ = ["Engine", "Event", "QueueFull", "SamplingParams", "StaticDecoder", "DecodeStats", "make_sampler"]
