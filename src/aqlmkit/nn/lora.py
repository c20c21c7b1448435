"""PEFT LoRA on QuantizedLinear: y = Q(x) + scale * B(A(dropout(x))), quantized tensors frozen.

peft only knows the official ``aqlm.QuantizedLinear``; ours joins through LoraConfig's custom
module mapping, so ``get_peft_model`` wraps it with :class:`QuantizedLoraLinear`. The base output
comes from QuantizedLinear itself, whose kernel op (``torch.ops.aqlmkit.aqlm_linear``) has a
backward, so the fast forward runs and adapters in earlier layers still receive gradients. Merging is refused: adding a
dense delta to an additively-quantized weight would require re-quantizing.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from aqlmkit.errors import AqlmkitError
from aqlmkit.nn.linear import QuantizedLinear


def _peft():
    try:
        import peft  # noqa: F401
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise AqlmkitError("LoRA needs peft: pip install peft") from None
    return LoraLayer


def _make_layer_class():
    LoraLayer = _peft()

    class QuantizedLoraLinear(nn.Module, LoraLayer):
        """peft LoRA adapter around an aqlmkit QuantizedLinear (unmergeable)."""

        def __init__(self, base_layer: QuantizedLinear, adapter_name: str, config=None, r: int = 0,
                     lora_alpha: int = 1, **kwargs) -> None:
            if config is not None and getattr(config, "use_dora", False):
                raise AqlmkitError("DoRA is not supported on QuantizedLinear; set use_dora=False")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **{
                k: v for k, v in kwargs.items() if k in ("lora_dropout", "init_lora_weights",
                                                          "use_rslora", "use_dora", "lora_bias")})

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A.keys():
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                delta = b(a(self.lora_dropout[name](x.to(a.weight.dtype))))
                result = result + (delta * self.scaling[name]).to(result.dtype)
            return result

        def merge(self, *args, **kwargs) -> None:
            raise AqlmkitError("LoRA adapters cannot be merged into an AQLM layer (it would need "
                               "re-quantization); keep them separate or dequantize the model first")

        def unmerge(self, *args, **kwargs) -> None:
            return None

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuantizedLoraLinear


_CLASS = None


def lora_layer_class():
    """The peft layer class (built lazily so importing aqlmkit.nn does not import peft)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_layer_class()
    return _CLASS


def register(lora_config) -> object:
    """Teach a ``peft.LoraConfig`` to wrap aqlmkit QuantizedLinear; returns the config."""
    lora_config._register_custom_module({QuantizedLinear: lora_layer_class()})
    return lora_config


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: Iterable[str] | str = "all-linear", **kwargs):
    """``get_peft_model`` with LoRA on the quantized (and any dense) linears of ``model``."""
    _peft()
    from peft import LoraConfig, get_peft_model

    if target_modules == "all-linear":
        target_modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                 if isinstance(m, QuantizedLinear)})
        if not target_modules:
            raise AqlmkitError("the model has no QuantizedLinear layers to put LoRA adapters on")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     bias="none", **kwargs)
    return get_peft_model(model, register(cfg))
