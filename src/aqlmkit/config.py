"""Configuration dataclasses shared by every layer of aqlmkit.

The scheme is the contract between the engine (which produces codes/codebooks/scales),
the nn/formats layers (which store them in the AQLM Hugging Face layout) and the kernels
(which consume them). Everything else (calibration, fine-tuning) is a plain knob bag.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from aqlmkit.errors import AqlmkitError


@dataclass(frozen=True)
class Scheme:
    """An AQLM scheme "KxB" with in-group size g (e.g. 2x8g8 = 2 codebooks of 2^8, groups of 8).

    Bit accounting follows the papers: codes cost K*B bits per g*out_group weights; codebooks
    (fp16) and scales (``scale_nbits``, 16 = fp16 per output group) are added on top so that the
    "average bits" we print is the true storage cost, not the headline K*B/g.
    """

    num_codebooks: int = 2
    nbits_per_codebook: int = 8
    in_group_size: int = 8
    out_group_size: int = 1
    scale_nbits: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.num_codebooks <= 64:
            raise AqlmkitError(f"num_codebooks={self.num_codebooks} is out of range: use 1..64")
        if not 1 <= self.nbits_per_codebook <= 16:
            raise AqlmkitError(
                f"nbits_per_codebook={self.nbits_per_codebook} is out of range: AQLM codes are "
                "stored as int8/int16, so use 1..16 (e.g. 1x16, 2x8)"
            )
        if self.in_group_size < 1 or self.out_group_size < 1:
            raise AqlmkitError("in_group_size and out_group_size must be >= 1")
        if self.scale_nbits not in (0, 16):
            raise AqlmkitError("scale_nbits must be 16 (fp16 scales) or 0 (no scales)")

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits_per_codebook

    @property
    def name(self) -> str:
        s = f"{self.num_codebooks}x{self.nbits_per_codebook}g{self.in_group_size}"
        return s if self.out_group_size == 1 else f"{s}o{self.out_group_size}"

    @property
    def code_dtype_bits(self) -> int:
        """Storage width of one code: int8 for B <= 8, int16 for B <= 16 (AQLM HF layout)."""
        return 8 if self.nbits_per_codebook <= 8 else 16

    def check_shape(self, out_features: int, in_features: int, what: str = "layer") -> None:
        if in_features % self.in_group_size:
            raise AqlmkitError(
                f"{what}: in_features={in_features} is not divisible by in_group_size="
                f"{self.in_group_size}; pick a group size that divides it or skip this layer"
            )
        if out_features % self.out_group_size:
            raise AqlmkitError(
                f"{what}: out_features={out_features} is not divisible by out_group_size="
                f"{self.out_group_size}"
            )

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Average storage bits per weight of one layer, codebooks and scales included."""
        n = out_features * in_features
        code_bits = n / (self.in_group_size * self.out_group_size) * self.num_codebooks * self.nbits_per_codebook
        cb_bits = self.num_codebooks * self.codebook_size * self.in_group_size * self.out_group_size * 16
        scale_bits = (out_features // self.out_group_size) * self.scale_nbits
        return (code_bits + cb_bits + scale_bits) / n

    def to_hf(self) -> dict:
        """The fields of transformers' AqlmConfig (quantization_config in config.json)."""
        return {
            "quant_method": "aqlm",
            "nbits_per_codebook": self.nbits_per_codebook,
            "num_codebooks": self.num_codebooks,
            "in_group_size": self.in_group_size,
            "out_group_size": self.out_group_size,
        }

    @classmethod
    def from_hf(cls, qc: dict) -> "Scheme":
        if qc.get("quant_method") != "aqlm":
            raise AqlmkitError(
                f"quantization_config.quant_method is {qc.get('quant_method')!r}, not 'aqlm': "
                "this is not an AQLM checkpoint"
            )
        try:
            return cls(
                num_codebooks=int(qc["num_codebooks"]),
                nbits_per_codebook=int(qc["nbits_per_codebook"]),
                in_group_size=int(qc["in_group_size"]),
                out_group_size=int(qc.get("out_group_size", 1)),
            )
        except KeyError as e:
            raise AqlmkitError(f"quantization_config lacks the field {e.args[0]!r}") from None

    @classmethod
    def parse(cls, text: str) -> "Scheme":
        """Parse "2x8g8", "1x16g16", "8x8" (g defaults to 8) or a preset name."""
        if text in PRESETS:
            return PRESETS[text]
        m = re.fullmatch(r"(\d+)x(\d+)(?:g(\d+))?(?:o(\d+))?", text.strip())
        if not m:
            raise AqlmkitError(
                f"bad scheme {text!r}: write KxB[gG] such as 2x8g8, 1x16g16 or 8x8g16 "
                f"(presets: {', '.join(sorted(PRESETS))})"
            )
        k, b, g, o = m.groups()
        return cls(int(k), int(b), int(g or 8), int(o or 1))


PRESETS: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(1, 16, 8),
        Scheme(2, 8, 8),
        Scheme(1, 16, 16),
        Scheme(1, 8, 8),
        Scheme(4, 8, 16),
        Scheme(3, 8, 8),
        Scheme(8, 8, 16),
        Scheme(2, 16, 8),
    )
}


def _check_knobs(obj, rules: dict[str, tuple]) -> None:
    """Type and range of each knob: rules name -> (type, low, high); None bounds are open.

    Called from ``__post_init__`` so a config file or flag with a wrong type, NaN or a value out
    of range is one clear error before any work (not a crash deep in the optimiser).
    """
    where = type(obj).__name__
    for name, (kind, lo, hi) in rules.items():
        v = getattr(obj, name)
        if v is None and kind is not bool and name in _OPTIONAL:
            continue
        ok = (type(v) is bool) if kind is bool else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int)))
        if ok and kind is float:
            ok = math.isfinite(v)
        if not ok:
            raise AqlmkitError(f"{where}.{name} must be {'a finite number' if kind is float else kind.__name__} "
                               f"(got {v!r})")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise AqlmkitError(f"{where}.{name} must be {rng} (got {v!r})")


_OPTIONAL = {"init_max_points", "trust_ratio", "lr", "tokens"}


@dataclass
class LayerQuantConfig:
    """Knobs of the per-layer AQ optimisation (engine)."""

    beam_size: int = 1
    max_epochs: int = 100
    relative_mse_tolerance: float = 0.01
    steps_per_epoch: int = 100
    lr: float = 1e-4
    init_max_iter: int = 100
    init_max_points: int | None = 2 ** 18
    seed: int = 0

    def __post_init__(self) -> None:
        _check_knobs(self, {"beam_size": (int, 1, None), "max_epochs": (int, 0, None),
                            "relative_mse_tolerance": (float, 0, None), "steps_per_epoch": (int, 0, None),
                            "lr": (float, 0, None), "init_max_iter": (int, 0, None),
                            "init_max_points": (int, 1, None), "seed": (int, 0, None)})


@dataclass
class CalibrationConfig:
    """Which text, how much, and in what precision the pipeline calibrates on."""

    dataset: str = "default"
    nsamples: int = 128
    seqlen: int = 4096
    device: str = "cpu"
    dtype: str = "float32"
    offload_activations: bool = False
    skip: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        _check_knobs(self, {"nsamples": (int, 1, None), "seqlen": (int, 2, None),
                            "offload_activations": (bool, None, None), "seed": (int, 0, None)})
        for name in ("dataset", "device", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise AqlmkitError(f"CalibrationConfig.{name} must be a non-empty string "
                                   f"(got {getattr(self, name)!r})")
        if isinstance(self.skip, str) or not all(isinstance(x, str) for x in self.skip):
            raise AqlmkitError(f"CalibrationConfig.skip must be a list of layer names (got {self.skip!r})")


@dataclass
class FinetuneConfig:
    """Block / global fine-tuning knobs."""

    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 1
    val_fraction: float = 0.1
    early_stop: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _check_knobs(self, {"epochs": (int, 0, None), "lr": (float, 0, None), "batch_size": (int, 1, None),
                            "val_fraction": (float, 0, 0.9), "early_stop": (int, 0, None),
                            "seed": (int, 0, None)})


@dataclass
class GlobalFinetuneConfig:
    """End-to-end KL distillation of the whole quantized model from its fp teacher (P-steps).

    Every ``eval_every`` steps the held-out KL is measured: a round that raised it by more than
    ``tolerance`` (relative) is rolled back to the best state and the learning rates halve; the
    best state is what the run returns (keep-best). ``checkpoint_every`` steps the whole state is
    written atomically to the work dir, so a killed run resumes where it stopped.
    """

    steps: int = 32
    lr: float = 1e-4
    batch_size: int = 4
    eval_every: int = 4
    tolerance: float = 0.01
    checkpoint_every: int = 8
    nsamples: int = 128      # training windows (drawn from the calibration split)
    val_samples: int = 8     # held-out windows for the KL that drives rollback / keep-best
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check_knobs(self, {"steps": (int, 1, None), "lr": (float, 1e-12, None), "batch_size": (int, 1, None),
                            "eval_every": (int, 1, None), "tolerance": (float, 0, None),
                            "checkpoint_every": (int, 1, None), "nsamples": (int, 1, None),
                            "val_samples": (int, 1, None), "seqlen": (int, 2, None), "seed": (int, 0, None)})


@dataclass
class PVConfig:
    """PV-tuning's V-step (see ``pipeline.pv_tuning``); ``None`` in a recipe means P-only."""

    code_lr: float = 1e-2       # ||ΔW̃|| / ||W̃|| per step of the straight-through copies
    beta2: float = 0.95         # Adam second-moment decay of those steps (beta1 = 0)
    max_change: float = 0.01    # fraction of code groups one V-step may re-encode
    trust_ratio: float | None = 1e-2  # bound on ||ΔŴ|| / ||Ŵ|| of one V-step
    beam_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.max_change, (int, float)) and not isinstance(self.max_change, bool) \
                and not 0 < self.max_change <= 1:
            raise AqlmkitError(f"PVConfig.max_change={self.max_change} must be in (0, 1]: a V-step that may "
                               "change no code group does nothing (use --no-pv for P-only tuning)")
        _check_knobs(self, {"code_lr": (float, 1e-12, None), "beta2": (float, 0, 0.999999),
                            "max_change": (float, 1e-12, 1), "trust_ratio": (float, 1e-12, None),
                            "beam_size": (int, 1, None)})


def dataclass_from_dict(cls, data: dict):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys with a clear error."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise AqlmkitError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
    if "skip" in data and isinstance(data["skip"], list):
        data = {**data, "skip": tuple(data["skip"])}
    return cls(**data)


__all__ = [
    "Scheme", "PRESETS", "LayerQuantConfig", "CalibrationConfig", "FinetuneConfig",
    "GlobalFinetuneConfig", "PVConfig",
    "dataclass_from_dict", "asdict", "field",
]
