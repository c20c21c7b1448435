"""Quantized modules: the AQLM linear layer, helpers that swap it in/out, 16-bit dense layers with
fp32 math (``nn.half``), LoRA (``aqlmkit.nn.lora``)."""
from aqlmkit.nn.half import (HALF_DTYPES, HalfEmbedding, HalfLinear, compute_dtype, half_dense_fast,
                             half_dense_names, use_half_dense)
from aqlmkit.nn.linear import (QuantizedLinear, code_dtype, dequantize_linears, pack_codes,
                               replace_linears)

__all__ = ["QuantizedLinear", "replace_linears", "dequantize_linears", "code_dtype", "pack_codes",
           "HalfLinear", "HalfEmbedding", "HALF_DTYPES", "half_dense_fast", "half_dense_names", "use_half_dense",
           "compute_dtype"]
