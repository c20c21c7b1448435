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
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from aqlmkit.config import (CalibrationConfig, FinetuneConfig, GlobalFinetuneConfig, LayerQuantConfig,
                            PVConfig, Scheme, dataclass_from_dict)
from aqlmkit.errors import AqlmkitError


@dataclass
class EvalConfig:
    """Perplexity after every stage, in domain and out of domain (a genre calibration never sees)."""

    dataset: str = "default"
    ood_dataset: str | None = "ood"
    tokens: int | None = 16384
    seqlen: int = 2048


@dataclass
class PVStage:
    """The PV-tuning stage: ``steps`` more global steps (global's other knobs) with V-steps on."""

    steps: int = 32
    lr: float | None = None      # P-step lr during PV (default: the global stage's)
    v: PVConfig = field(default_factory=PVConfig)


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
    names = {f.name: f for f in fields(cls)}
    for k, v in data.items():
        f = names.get(k)
        if f is None:
            continue  # dataclass_from_dict names the unknown key
        _check_type(section, k, v, f.type)
    return dataclass_from_dict(cls, data)


def _check_type(section: str, key: str, value, annotation) -> None:
    """Refuse a wrong JSON type (``"nsamples": "16"``) or a non-finite number with one line."""
    ann = str(annotation)
    if value is None and "None" in ann:
        return
    if "bool" in ann and isinstance(value, bool):
        return
    ok = True
    if ann.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif ann.startswith("str"):
        ok = isinstance(value, str)
    elif ann.startswith("tuple"):
        ok = isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
    if not ok:
        raise AqlmkitError(f"recipe {section}.{key}={value!r} should be of type {ann}")


def _positive(section: str, obj, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None:
            continue
        low_ok = v >= 0 if n in allow_zero else v > 0
        if not low_ok:
            raise AqlmkitError(f"recipe {section}.{n}={v} must be {'>= 0' if n in allow_zero else '> 0'}")


def _validate(r: Recipe) -> None:
    _positive("calibration", r.calibration, ("nsamples", "seqlen"))
    _positive("layer", r.layer, ("beam_size", "max_epochs", "lr", "init_max_iter"),
              allow_zero=("steps_per_epoch",))
    _positive("finetune", r.finetune, ("lr", "batch_size"), allow_zero=("epochs",))
    if r.global_ft is not None:
        _positive("global", r.global_ft, ("steps", "lr", "batch_size", "eval_every", "checkpoint_every",
                                          "nsamples", "val_samples", "seqlen"), allow_zero=("tolerance",))
    if r.pv is not None:
        if r.global_ft is None:
            raise AqlmkitError("recipe: the pv stage needs the global section (its batch, data and eval "
                               "settings); give one or set \"pv\": null")
        _positive("pv", r.pv, ("steps", "lr"))
        _positive("pv.v", r.pv.v, ("code_lr", "beam_size", "trust_ratio"), allow_zero=())
        if not 0 < r.pv.v.max_change <= 1:
            raise AqlmkitError(f"recipe pv.v.max_change={r.pv.v.max_change} must be in (0, 1]: a V-step that may "
                               "change no code does nothing (use --no-pv for P-only tuning)")
        if not 0 <= r.pv.v.beta2 < 1:
            raise AqlmkitError(f"recipe pv.v.beta2={r.pv.v.beta2} must be in [0, 1)")
    _positive("eval", r.eval, ("tokens", "seqlen"))


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
    calib = dict(calib) if isinstance(calib, dict) else calib
    if isinstance(calib, dict) and "skip" in calib:
        _check_type("calibration", "skip", calib["skip"], "tuple")
        calib["skip"] = tuple(calib["skip"])
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
