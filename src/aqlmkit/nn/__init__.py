"""Quantized modules: the AQLM linear layer, helpers that swap it in/out, LoRA (``aqlmkit.nn.lora``)."""
from aqlmkit.nn.linear import (QuantizedLinear, code_dtype, dequantize_linears, pack_codes,
                               replace_linears)

__all__ = ["QuantizedLinear", "replace_linears", "dequantize_linears", "code_dtype", "pack_codes"]
