"""Inference runtime: a static-cache, torch.compile'd decode loop (``StaticDecoder``) and samplers."""
from aqlmkit.runtime.decode import DecodeStats, StaticDecoder
from aqlmkit.runtime.sampling import make_sampler

__all__ = ["StaticDecoder", "DecodeStats", "make_sampler"]
