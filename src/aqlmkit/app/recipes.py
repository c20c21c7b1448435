"""Named recipes: every knob of a whole quantization job, from calibration to evaluation.

A recipe is the one place where defaults live. ``aqlmkit quantize --recipe NAME`` starts from it,
a ``--config`` JSON file overrides any of its sections, and explicit flags override both:

  recipe  <  config file  <  flags

Sections (also the JSON file's keys): ``scheme``, ``calibration``, ``layer`` (per-layer AQ),
``finetune`` (block fine-tuning), ``global`` (end-to-end KL distillation, P-steps; ``null``
disables), ``pv`` (PV-tuning stage after it; ``null`` disables), ``eval``.

``quick`` is the CPU default, sized for the embedded 135M model on 2 quiet cores (about 15
minutes end to end); ``standard`` is the GPU recipe (1M calibration tokens, the paper's layer
optimisation budget, global fine-tuning and PV-tuning).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from aqlmkit.config import (CalibrationConfig, FinetuneConfig, GlobalFinetuneConfig, LayerQuantConfig,
                            PVConfig, Scheme, _check_knobs, dataclass_from_dict)
from aqlmkit.errors import AqlmkitError


@dataclass
class EvalConfig:
    """Perplexity after every stage, in domain and out of domain (a genre calibration never sees)."""

    dataset: str = "default"
    ood_dataset: str | None = "ood"
    tokens: int | None = 16384
    seqlen: int = 2048

    def __post_init__(self) -> None:
        _check_knobs(self, {"tokens": (int, 2, None), "seqlen": (int, 2, None)})
        if not isinstance(self.dataset, str) or not (self.ood_dataset is None or isinstance(self.ood_dataset, str)):
            raise AqlmkitError(f"EvalConfig datasets must be corpus names (got {self.dataset!r}, "
                               f"{self.ood_dataset!r})")


@dataclass
class PVStage:
    """The PV-tuning stage: ``steps`` more global steps (global's other knobs) with V-steps on."""

    steps: int = 32
    lr: float | None = None      # P-step lr during PV (default: the global stage's)
    v: PVConfig = field(default_factory=PVConfig)

    def __post_init__(self) -> None:
        _check_knobs(self, {"steps": (int, 1, None), "lr": (float, 1e-12, None)})


@dataclass
class Recipe:
    name: str
    scheme: Scheme
    calibration: CalibrationConfig
    layer: LayerQuantConfig
    finetune: FinetuneConfig
    global_ft: GlobalFinetuneConfig | None
    pv: PVStage | None
    eval: EvalConfig
    baselines: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form, the same shape a ``--config`` file takes."""
        d = {"recipe": self.name, "scheme": self.scheme.name, "calibration": asdict(self.calibration),
             "layer": asdict(self.layer), "finetune": asdict(self.finetune),
             "global": asdict(self.global_ft) if self.global_ft else None,
             "pv": asdict(self.pv) if self.pv else None, "eval": asdict(self.eval)}
        d["calibration"]["skip"] = list(self.calibration.skip)
        return d


def _quick() -> dict:
    return {
        "scheme": "2x8g8",
        "calibration": dict(nsamples=16, seqlen=512),
        "layer": dict(max_epochs=4, steps_per_epoch=20, init_max_iter=10, beam_size=1),
        "finetune": dict(epochs=1, lr=1e-4),
        "global": dict(steps=8, lr=1e-4, batch_size=2, eval_every=4, checkpoint_every=4, nsamples=32,
                       val_samples=2, seqlen=512),
        "pv": dict(steps=8, v=dict(code_lr=1e-2, max_change=0.01, trust_ratio=1e-2)),
        "eval": dict(tokens=8192),
    }


def _standard() -> dict:
    return {
        "scheme": "2x8g8",
        "calibration": dict(nsamples=512, seqlen=2048),
        "layer": dict(max_epochs=4, steps_per_epoch=50, init_max_iter=25, beam_size=1, lr=1e-4),
        "finetune": dict(epochs=2, lr=1e-4),
        "global": dict(steps=64, lr=1e-4, batch_size=8, eval_every=8, checkpoint_every=16, nsamples=1024,
                       val_samples=16, seqlen=2048),
        "pv": dict(steps=64, v=dict(code_lr=1e-2, max_change=0.01, trust_ratio=1e-2)),
        "eval": dict(tokens=None),
    }


RECIPES = {"quick": _quick, "standard": _standard}
SECTIONS = ("scheme", "calibration", "layer", "finetune", "global", "pv", "eval", "baselines")


def load_config_file(path: str | None) -> dict:
    """A JSON object with any of :data:`SECTIONS` (unknown keys are refused)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AqlmkitError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AqlmkitError(f"config file {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise AqlmkitError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AqlmkitError(f"config file {path} must hold a JSON object with sections {list(SECTIONS)}")
    bad = sorted(set(data) - set(SECTIONS))
    if bad:
        raise AqlmkitError(f"config file {path}: unknown section(s) {bad}; allowed: {list(SECTIONS)}")
    for key, val in data.items():
        nullable = key in ("global", "pv")
        if key not in ("scheme", "baselines") and not (isinstance(val, dict) or (nullable and val is None)):
            raise AqlmkitError(f"config file {path}: section {key!r} must be a JSON object of objects, e.g. "
                               f"{{\"{key}\": {{...}}}}{' (or null to disable it)' if nullable else ''}")
    return data


def _merge(base, over):
    """Section-wise merge: dicts merge key by key; ``None`` (JSON null) disables a section."""
    if over is None or not isinstance(base, dict) or not isinstance(over, dict):
        return over
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k), v) if isinstance(base.get(k), dict) else v
    return out


def _section(data: dict, key: str):
    val = data.get(key, {})
    if val is None:
        raise AqlmkitError(f"recipe section {key!r} cannot be null (only global and pv can be disabled)")
    return val


def _build(cls, data, section: str):
    if not isinstance(data, dict):
        raise AqlmkitError(f"recipe section {section!r} must be an object, not {type(data).__name__}")
    return dataclass_from_dict(cls, data)  # the dataclasses check their own types and ranges


def _validate(r: Recipe) -> None:
    if r.pv is not None and r.global_ft is None:
        raise AqlmkitError("recipe: the pv stage needs the global section (its batch, data and eval "
                           "settings); give one or set \"pv\": null")


def build_recipe(name: str = "quick", file_cfg: dict | None = None, overrides: dict | None = None) -> Recipe:
    """Recipe ``name`` < ``file_cfg`` (a loaded --config) < ``overrides`` (only the flags given)."""
    if name not in RECIPES:
        raise AqlmkitError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    data = RECIPES[name]()
    for layer in (file_cfg or {}, overrides or {}):
        for key, val in layer.items():
            data[key] = _merge(data.get(key), val) if key in data else val
    scheme = data.get("scheme", "2x8g8")
    if not isinstance(scheme, str):
        raise AqlmkitError(f"recipe scheme={scheme!r} should be a string such as \"2x8g8\"")
    calib = _section(data, "calibration")
    pv = None
    if data.get("pv") is not None:
        if not isinstance(data["pv"], dict):
            raise AqlmkitError(f"recipe section 'pv' must be an object or null, not {type(data['pv']).__name__}")
        pv_d = dict(data["pv"])
        v = _build(PVConfig, _section(pv_d, "v"), "pv.v")
        pv_d.pop("v", None)
        pv = replace(_build(PVStage, pv_d, "pv"), v=v)
    r = Recipe(name=name, scheme=Scheme.parse(scheme),
               calibration=_build(CalibrationConfig, calib, "calibration"),
               layer=_build(LayerQuantConfig, _section(data, "layer"), "layer"),
               finetune=_build(FinetuneConfig, _section(data, "finetune"), "finetune"),
               global_ft=None if data.get("global") is None else _build(GlobalFinetuneConfig, data["global"], "global"),
               pv=pv, eval=_build(EvalConfig, _section(data, "eval"), "eval"),
               baselines=bool(data.get("baselines", False)))
    _validate(r)
    return r
