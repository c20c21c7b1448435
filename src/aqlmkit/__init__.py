"""aqlmkit: Additive Quantization of Language Models, end to end.

Public API (imported lazily so that ``import aqlmkit`` stays cheap):
  aqlmkit.load(path_or_id)            -> (model, tokenizer); AQLM checkpoints, HF folders, GGUF, default
  aqlmkit.quantize(model, scheme, ...) -> quantized model (block-by-block AQLM calibration)
  aqlmkit.save(model, tokenizer, dir) -> AQLM Hugging Face format folder
"""
from __future__ import annotations

__version__ = "0.1.0"

from aqlmkit.config import PRESETS, Scheme  # noqa: E402
from aqlmkit.errors import AqlmkitError  # noqa: E402


def load(*args, **kwargs):
    from aqlmkit.formats.loading import load_model

    return load_model(*args, **kwargs)


def quantize(*args, **kwargs):
    from aqlmkit.pipeline.quantize import quantize_model

    return quantize_model(*args, **kwargs)


def save(*args, **kwargs):
    from aqlmkit.formats.aqlm_hf import save_quantized

    return save_quantized(*args, **kwargs)


__all__ = ["Scheme", "PRESETS", "AqlmkitError", "load", "quantize", "save", "__version__"]
