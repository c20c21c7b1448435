"""``torch.ops.aqlmkit.aqlm_linear``: the one AQLM matmul op, on every device, with autograd.

Why one op: PEFT LoRA and global fine-tuning need gradients through the quantized layers, and
until now a layer that needed autograd fell back to the pure-PyTorch reference for its forward
(dequantize the whole weight, then matmul) on every step. This op runs the fastest kernel that
:func:`aqlmkit.kernels.select` finds for the device (CPU C++ kernels, CUDA kernels, reference
elsewhere) in its forward, and its backward needs no kernel of its own:

* input gradient: ``grad_y @ W`` with W dequantized once (the CUDA dequantize kernel on GPU);
* codebook gradient: a scatter-add of ``scales * (grad_y^T x)`` into the codeword rows the codes
  select (the adjoint of the look-up), scale gradient: the row sums of ``(grad_y^T x) * W/scales``;
* bias gradient: the sum of ``grad_y`` over its rows.
Codes are integers and get no gradient. A fake (meta) impl gives torch.compile the shape, so a
compiled training or decode step keeps the op as one node.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aqlmkit.kernels import reference


@torch.library.custom_op("aqlmkit::aqlm_linear", mutates_args=())
def aqlm_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequantize(codes, codebooks, scales)^T + bias in x's dtype (any leading dims)."""
    from aqlmkit import kernels

    with torch.no_grad():  # autograd is this op's own; the backends must not see requires_grad
        y = kernels.dispatch(x, codes, codebooks, scales, bias)
    return y.clone() if _aliases(y, x, codebooks, scales, bias) else y


def _aliases(y: torch.Tensor, *inputs: torch.Tensor | None) -> bool:
    """Custom ops may not return a view of an input (a 0-row y can share storage)."""
    ptr = y.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr and ptr != 0 for t in inputs)


@aqlm_linear.register_fake
def _(x, codes, codebooks, scales, bias):
    return x.new_empty((*x.shape[:-1], codes.shape[0] * codebooks.shape[2]))


def dequantize_fast(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense [out, in] weight in the codebooks' dtype: the CUDA kernel where it applies."""
    if codes.is_cuda and codebooks.dtype in (torch.float16, torch.bfloat16) and codebooks.shape[2] == 1:
        from aqlmkit.kernels import cuda

        if cuda.supports_dequant(codes, codebooks):
            return torch.ops.aqlmkit.cuda_dequant(codes.contiguous(), codebooks.contiguous(),
                                                  scales.reshape(-1).to(codebooks.dtype).contiguous())
    return reference.dequantize(codes, codebooks, scales)


def _setup_context(ctx, inputs, output) -> None:
    x, codes, codebooks, scales, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, codes, codebooks, scales)


def _backward(ctx, gy: torch.Tensor):
    x, codes, codebooks, scales = ctx.saved_tensors
    need_x, _, need_cb, need_sc, need_b = ctx.needs_input_grad[:5]
    gx = gcb = gsc = gb = None
    out_f = gy.shape[-1]
    gy2 = gy.reshape(-1, out_f)
    if need_x:
        w = dequantize_fast(codes, codebooks.to(gy.dtype), scales.to(gy.dtype))
        gx = (gy2 @ w).reshape(x.shape).to(x.dtype)
    if need_cb or need_sc:
        gw = gy2.float().t() @ x.reshape(-1, x.shape[-1]).float()  # dL/dW [out, in], fp32
        gcb, gsc = codebook_scale_grads(gw, codes, codebooks, scales, need_cb, need_sc)
    if need_b and ctx.has_bias:
        gb = gy2.sum(0)
    return gx, None, gcb, gsc, gb


def codebook_scale_grads(gw: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                         scales: torch.Tensor, need_cb: bool, need_sc: bool):
    """Gradients of codebooks and scales given dL/dW: the adjoint of :func:`reference.dequantize`.

    W's block (o, i) = scales[o] * sum_k codebooks[k, codes[o, i, k]], so each codeword's gradient
    is the sum of scales[o] * dL/dW_block over the blocks that select it (index_add), and the
    scale's is the dot of dL/dW with the unscaled blocks of its row.
    """
    num_cb, size, og, ig = codebooks.shape
    n_og, n_ig, _ = codes.shape
    blocks = gw.view(n_og, og, n_ig, ig).permute(0, 2, 1, 3).reshape(n_og, n_ig, og * ig)
    idx = reference.unsigned_codes(codes, size.bit_length() - 1)
    gcb = gsc = None
    if need_cb:
        scaled = (blocks * scales.reshape(n_og, 1, 1).float()).reshape(-1, og * ig)
        acc = torch.zeros(num_cb, size, og * ig, dtype=torch.float32, device=gw.device)
        for k in range(num_cb):
            acc[k].index_add_(0, idx[..., k].reshape(-1), scaled)
        gcb = acc.view(codebooks.shape).to(codebooks.dtype)
    if need_sc:
        flat = codebooks.detach().float().reshape(num_cb, size, og * ig)
        unscaled = sum(F.embedding(idx[..., k], flat[k]) for k in range(num_cb))
        gsc = (blocks * unscaled).sum((1, 2)).reshape(scales.shape).to(scales.dtype)
    return gcb, gsc


aqlm_linear.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["aqlm_linear", "dequantize_fast", "codebook_scale_grads"]
