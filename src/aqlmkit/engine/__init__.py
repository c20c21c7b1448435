"""The AQ engine: per-layer additive quantization and its baselines (imports torch only)."""
from aqlmkit.engine.metrics import relative_error

from aqlmkit.engine.quantizer import QuantizedWeight, quantize_linear

__all__ = ["quantize_linear", "QuantizedWeight", "relative_error"]
