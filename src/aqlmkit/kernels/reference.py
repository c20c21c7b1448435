"""Pure-PyTorch AQLM math: the ground truth every fast kernel is tested against.

Layout (AQLM Hugging Face format):
  codes     [num_out_groups, num_in_groups, K]  int8 (B <= 8) / int16 (B <= 16), two's complement
  codebooks [K, 2^B, out_group_size, in_group_size]
  scales    [num_out_groups, 1, 1, 1]
It is differentiable in ``codebooks``, ``scales`` and the input, so LoRA and fine-tuning train
through it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unsigned_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes as int64 indices in [0, 2^B): undo the signed storage of int8/int16."""
    return codes.to(torch.int64) & ((1 << nbits) - 1)


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Materialize the [out, in] weight: scales * sum_k codebooks[k, codes[..., k]]."""
    num_codebooks, codebook_size, out_group, in_group = codebooks.shape
    num_out_groups, num_in_groups, _ = codes.shape
    idx = unsigned_codes(codes, codebook_size.bit_length() - 1)
    flat = codebooks.reshape(num_codebooks, codebook_size, out_group * in_group)
    acc = None
    for k in range(num_codebooks):  # summing per codebook keeps peak memory at one [O, I, og*ig]
        part = F.embedding(idx[..., k], flat[k])
        acc = part if acc is None else acc + part
    blocks = acc.view(num_out_groups, num_in_groups, out_group, in_group)
    if scales is not None:
        blocks = blocks * scales.to(blocks.dtype)
    return blocks.permute(0, 2, 1, 3).reshape(num_out_groups * out_group, num_in_groups * in_group)


def aqlm_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T + b with W dequantized in the input's dtype."""
    w = dequantize(codes, codebooks.to(x.dtype), scales.to(x.dtype))
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
