"""The AQLM Hugging Face checkpoint format, compatible with transformers + ``aqlm``.

One import point for the three parts: ``formats.save`` (writing), ``formats.load`` (reading and
validating) and ``formats.card`` (the model card). See those modules for the layout.
"""
from __future__ import annotations

from aqlmkit.dtypes import resolve_dtype
from aqlmkit.formats.card import average_bits, model_card, quantized_names
from aqlmkit.formats.load import (build_empty, check_tensor, load_quantized, load_state, load_tokenizer,
                                  read_config)
from aqlmkit.formats.output import check_output_dir, output_folder
from aqlmkit.formats.save import (UNFUSED_KEY, not_quantized_weights, quantization_config, save_quantized,
                                  state_dict_for_save)
from aqlmkit.utils import atomic_dir

__all__ = ["save_quantized", "load_quantized", "atomic_dir", "output_folder", "check_output_dir",
           "quantization_config", "average_bits", "read_config", "model_card", "quantized_names",
           "build_empty", "load_state", "load_tokenizer", "check_tensor", "not_quantized_weights",
           "state_dict_for_save", "resolve_dtype", "UNFUSED_KEY"]
