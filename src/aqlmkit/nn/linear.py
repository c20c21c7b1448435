"""QuantizedLinear: an AQLM layer with the official package's parameter names, shapes and dtypes.

Matching the official ``aqlm.QuantizedLinear`` (which transformers' AQLM integration builds) means
a state dict moves between the two unchanged, so aqlmkit checkpoints load in plain transformers and
theirs load here. The matmul goes through :func:`aqlmkit.kernels.aqlm_linear_cached`; while training
needs gradients it runs the ``aqlmkit::aqlm_linear`` op (fast forward, dequantized backward).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from aqlmkit import kernels
from aqlmkit.config import Scheme
from aqlmkit.errors import AqlmkitError
from aqlmkit.kernels import reference


def code_dtype(nbits: int) -> torch.dtype:
    """Storage dtype of codes: int8 for B <= 8, int16 for B <= 16 (as the official package)."""
    if nbits <= 8:
        return torch.int8
    if nbits <= 16:
        return torch.int16
    raise AqlmkitError(f"nbits_per_codebook={nbits} > 16 has no AQLM storage dtype")


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unsigned code indices -> the signed two's-complement storage of the HF format."""
    dtype = code_dtype(nbits)
    if codes.dtype == dtype:
        return codes
    width = torch.iinfo(dtype).bits
    c = codes.to(torch.int64) & ((1 << nbits) - 1)
    c = torch.where(c >= (1 << (width - 1)), c - (1 << width), c)
    return c.to(dtype)


def _as_scheme(scheme: Scheme | str) -> Scheme:
    return Scheme.parse(scheme) if isinstance(scheme, str) else scheme


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W = scales * sum_k codebooks[k][codes[..., k]] (AQLM HF layout).

    Parameters (same names/shapes/dtypes as ``aqlm.QuantizedLinear``):
      codes     [out/og, in/g, K]   int8 (B <= 8) / int16, frozen
      codebooks [K, 2^B, og, g]     float, frozen by default (PV-tuning/fine-tuning may unfreeze)
      scales    [out/og, 1, 1, 1]   float
      bias      [out] or None
    """

    def __init__(self, in_features: int, out_features: int, scheme: Scheme | str, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        s = _as_scheme(scheme)
        s.check_shape(out_features, in_features, "QuantizedLinear")
        self.in_features, self.out_features, self.scheme = in_features, out_features, s
        og, g, k = s.out_group_size, s.in_group_size, s.num_codebooks
        init = torch.empty if torch.device(device or "cpu").type == "meta" else torch.zeros
        fk = {"device": device, "dtype": dtype}
        self.codes = nn.Parameter(
            init(out_features // og, in_features // g, k, device=device, dtype=code_dtype(s.nbits_per_codebook)),
            requires_grad=False)
        self.codebooks = nn.Parameter(init(k, s.codebook_size, og, g, **fk), requires_grad=False)
        self.scales = nn.Parameter(init(out_features // og, 1, 1, 1, **fk), requires_grad=False)
        if init is torch.zeros:
            self.scales.data.fill_(1.0)
        if bias:
            self.bias = nn.Parameter(init(out_features, **fk), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Per-layer kernel state (backend choice, packed operands), see kernels.aqlm_linear_cached.
        # Created here, not lazily in forward: dynamo cannot trace dict.setdefault on __dict__.
        self._kernel_cache: dict = {}
        # Sibling fusion (aqlmkit.nn.fused): the group that computes this layer with its siblings.
        self._siblings = None
        self._sibling_index = 0

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
                       ) -> "QuantizedLinear":
        """Wrap an engine ``QuantizedWeight`` (anything with .codes/.codebooks/.scales)."""
        codebooks = qw.codebooks.detach()
        k, size, og, g = codebooks.shape
        nbits = size.bit_length() - 1
        if size != 1 << nbits:
            raise AqlmkitError(f"codebook size {size} is not a power of two")
        codes = qw.codes.detach()
        if codes.dim() != 3 or codes.shape[2] != k:
            raise AqlmkitError(f"codes of shape {tuple(codes.shape)} do not match {k} codebooks: "
                               "expected [out/og, in/g, K]")
        dtype = dtype or codebooks.dtype
        scheme = Scheme(k, nbits, g, og)
        out_f, in_f = codes.shape[0] * og, codes.shape[1] * g
        mod = cls(in_f, out_f, scheme, bias=bias is not None, device="meta", dtype=dtype)
        scales = qw.scales
        if scales is None:
            scales = torch.ones(codes.shape[0], 1, 1, 1)
        scales = scales.detach().reshape(codes.shape[0], 1, 1, 1)
        mod.codes = nn.Parameter(pack_codes(codes, nbits).contiguous(), requires_grad=False)
        mod.codebooks = nn.Parameter(codebooks.to(dtype).contiguous(), requires_grad=False)
        mod.scales = nn.Parameter(scales.to(device=codebooks.device, dtype=dtype).contiguous(),
                                  requires_grad=False)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().to(device=codebooks.device, dtype=dtype).contiguous(),
                                    requires_grad=False)
        return mod

    def _apply(self, fn, *args, **kwargs):
        """``.to()``/``.cuda()``/``.half()``: drop packed operands (they also pin the old storage)."""
        self._kernel_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._kernel_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def invalidate_kernel_cache(self) -> None:
        """Forget packed operands: needed only after an in-place write through a ``.data`` alias
        (``layer.codes.data[...] = ...``), which PyTorch's version counter does not record."""
        self._kernel_cache.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference: the kernel's per-layer packed operands are built once (eagerly) and reused;
        # when autograd needs the call (LoRA, tuning) it runs the aqlmkit::aqlm_linear op, the
        # same fast forward with a backward (kernels.op).
        if self._siblings is not None:
            y = self._siblings.forward(self, self._sibling_index, x)
            if y is not None:
                return y
        return kernels.aqlm_linear_cached(x, self.codes, self.codebooks, self.scales, self.bias,
                                          self._kernel_cache)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The dense [out, in] weight this layer represents (in the codebooks' dtype)."""
        return reference.dequantize(self.codes, self.codebooks, self.scales)

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight, codebooks and scales included."""
        return self.scheme.bits_per_weight(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight, for code (e.g. tied-weight or dtype probes) that insists on ``.weight``."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, bias={self.bias is not None}, "
                f"bits_per_weight={self.bits_per_weight:.3f}")


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """Skip entries name a module ("lm_head") or its weight ("lm_head.weight"), fully or as a suffix."""
    for s in skip:
        s = s[: -len(".weight")] if s.endswith(".weight") else s
        if name == s or name.endswith("." + s):
            return True
    return False


def replace_linears(model: nn.Module, scheme: Scheme | str, skip: Iterable[str] = ()) -> list[str]:
    """Swap every ``nn.Linear`` (except ``skip``) for an empty QuantizedLinear; returns their names.

    New layers are created on each old layer's device, so on a meta-device model nothing is
    allocated and a checkpoint can then be loaded with ``load_state_dict(assign=True)``.
    """
    s, skip = _as_scheme(scheme), tuple(skip)
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and not is_skipped(n, skip)]
    for name, lin in targets:
        s.check_shape(lin.out_features, lin.in_features, name)
        new = QuantizedLinear(lin.in_features, lin.out_features, s, bias=lin.bias is not None,
                              device=lin.weight.device, dtype=lin.weight.dtype)
        model.set_submodule(name, new)
    return [n for n, _ in targets]


def dequantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Swap every QuantizedLinear back for a dense ``nn.Linear`` (for export/eval); returns names."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, q in targets:
        w = q.dequantize()
        dt = dtype or w.dtype
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta", dtype=dt)
        lin.weight = nn.Parameter(w.to(dt), requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.detach().to(dt), requires_grad=False)
        model.set_submodule(name, lin)
    return [n for n, _ in targets]
