"""Input checks for quantize_linear: every problem becomes an AqlmkitError that names the layer."""
from __future__ import annotations

import torch

from aqlmkit.config import Scheme
from aqlmkit.errors import AqlmkitError


def check_inputs(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, name: str) -> None:
    what = f"layer {name!r}" if name else "layer"
    if weight.dim() != 2:
        raise AqlmkitError(f"{what}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if scheme.nbits_per_codebook > 16:
        raise AqlmkitError(f"{what}: B={scheme.nbits_per_codebook} > 16 cannot be stored; use B <= 16")
    scheme.check_shape(out_f, in_f, what)
    if tuple(hessian.shape) != (in_f, in_f):
        raise AqlmkitError(
            f"{what}: hessian has shape {tuple(hessian.shape)} but the weight needs [{in_f}, {in_f}] "
            "(H = XᵀX over the layer's input features)")
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise AqlmkitError(f"{what}: weight contains NaN/Inf (or is not floating point); "
                           "check the checkpoint or the previous block's output")
    if not hessian.is_floating_point() or not torch.isfinite(hessian).all():
        raise AqlmkitError(f"{what}: hessian contains NaN/Inf; calibrate in float32 and check "
                           "the calibration activations")
