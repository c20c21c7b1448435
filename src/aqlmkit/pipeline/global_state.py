"""Resume state of global fine-tuning / PV-tuning: one safetensors file + one JSON commit record.

``global_state.safetensors`` holds the student's trainable parameters and codes (current and
best), the straight-through copies and every optimizer moment; ``global_state.json`` is written
after it, atomically, and records the step, the scalars, what the run is (a hash of configs and
data) and the tensor file's sha256, so a torn or foreign state is refused instead of resumed.
Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aqlmkit.errors import AqlmkitError
from aqlmkit.utils import atomic_path, atomic_save_json

VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _identity(cfg, pv, ids: torch.Tensor, val_ids: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps({"cfg": asdict(cfg), "pv": asdict(pv) if pv else None},
                                  sort_keys=True).encode())
    for t in (ids, val_ids):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class GlobalCheckpoint:
    """Atomic save / validated load of a :class:`finetune_global._Run`."""

    def __init__(self, work_dir: str | Path, cfg, pv, ids: torch.Tensor, val_ids: torch.Tensor) -> None:
        self.dir = Path(work_dir)
        self.tensors = self.dir / "global_state.safetensors"
        self.record = self.dir / "global_state.json"
        self.identity = _identity(cfg, pv, ids, val_ids)

    def exists(self) -> bool:
        return self.record.is_file()

    def save(self, run) -> None:
        from aqlmkit.pipeline.finetune_global import _snapshot

        tensors = {k: v.contiguous() for k, v in _snapshot(run.params, run.layers).items()}
        tensors.update({f"best.{k}": v.contiguous() for k, v in run.best.items()})
        if run.st is not None:
            tensors.update({k: v.contiguous() for k, v in run.st.state().items()})
        for i, p in enumerate(run.params.values()):
            for key, val in run.opt.state.get(p, {}).items():
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(val).detach().clone().contiguous()
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.tensors) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
        atomic_save_json(self.record, {
            "version": VERSION, "identity": self.identity, "step": run.step, "lr_scale": run.lr_scale,
            "best_kl": run.best_kl, "last_loss": run.last_loss, "st_steps": run.st.steps if run.st else 0,
            "stats": asdict(run.stats), "sha256": _sha256(self.tensors)})

    def _fail(self, why: str) -> AqlmkitError:
        return AqlmkitError(f"the fine-tuning resume state in {self.dir} {why}; rerun with --fresh to "
                            "start over")

    def load(self, run) -> None:
        from aqlmkit.pipeline.finetune_global import GlobalStats, _restore, _snapshot

        try:
            rec = json.loads(self.record.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise self._fail(f"cannot be read ({self.record.name}: {e})") from None
        if not isinstance(rec, dict) or rec.get("version") != VERSION:
            raise self._fail("was written by another aqlmkit version")
        if rec.get("identity") != self.identity:
            raise self._fail("belongs to a run with other settings or data")
        if not self.tensors.is_file() or _sha256(self.tensors) != rec.get("sha256"):
            raise self._fail(f"is damaged ({self.tensors.name} is missing or does not match its record)")
        tensors = load_file(str(self.tensors), device="cpu")
        expect = _snapshot(run.params, run.layers)
        for k, v in expect.items():
            for key in (k, f"best.{k}"):
                t = tensors.get(key)
                if t is None or t.shape != v.shape or t.dtype != v.dtype:
                    raise self._fail(f"does not fit this model (tensor {key})")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise self._fail(f"holds non-finite values (tensor {key})")
        dev = next(iter(run.params.values())).device
        _restore({k: tensors[k].to(dev) for k in expect}, run.params, run.layers)
        run.best = {k: tensors[f"best.{k}"].to(dev) for k in expect}
        if run.st is not None:
            run.st.load_state({k: v.to(dev) for k, v in tensors.items() if k.startswith("st.")}, rec["st_steps"])
        state = {}
        for i, p in enumerate(run.params.values()):
            keys = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if keys:
                state[i] = {k: (v if k == "step" else v.to(dev)) for k, v in keys.items()}
        run.opt.load_state_dict({"state": state, "param_groups": run.opt.state_dict()["param_groups"]})
        run.step, run.lr_scale = int(rec["step"]), float(rec["lr_scale"])
        run.best_kl, run.last_loss = float(rec["best_kl"]), float(rec["last_loss"])
        run.stats = GlobalStats(**rec["stats"])
        run._set_lr()
