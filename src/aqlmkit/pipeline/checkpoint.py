"""Resumable block-by-block state: a run killed at any moment continues where it stopped.

Layout of ``work_dir``: ``block_{i}.safetensors`` (state of quantized block i),
``inputs_{i}.safetensors`` (inputs of block i = outputs of quantized block i-1, plus the RNG
state) and ``manifest.json``. The manifest is written last and atomically, so it is the commit
point: files it does not reference are leftovers of an interrupted block and get recomputed.
The manifest also records what the run *is* (model fingerprint, scheme, configs, seed,
calibration data hash) so a work dir is never silently reused for a different job.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aqlmkit.errors import AqlmkitError
from aqlmkit.utils import atomic_path, atomic_save_json

VERSION = 1
IDENTITY_KEYS = ("fingerprint", "scheme", "calib", "layer", "finetune", "data_hash", "skip")


def model_fingerprint(model: nn.Module) -> str:
    """Cheap but discriminating: config + every parameter's name, shape and first/last values."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        sample = torch.cat([flat[:64], flat[-64:]]).float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class Checkpoint:
    """The resume state of one quantization job."""

    def __init__(self, work_dir: str | Path, identity: dict[str, Any]) -> None:
        self.dir = Path(work_dir)
        self.identity = identity
        self.manifest_path = self.dir / "manifest.json"

    def load_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise AqlmkitError(f"{self.manifest_path} is corrupt ({e}); rerun with --fresh") from None

    def check(self, manifest: dict) -> None:
        """Refuse to resume another job's state, naming every field that differs."""
        diffs = [k for k in IDENTITY_KEYS if json.dumps(manifest.get(k), sort_keys=True, default=str)
                 != json.dumps(self.identity.get(k), sort_keys=True, default=str)]
        if diffs or manifest.get("version") != VERSION:
            detail = "; ".join(f"{k}: checkpoint has {manifest.get(k)!r}, this run has "
                               f"{self.identity.get(k)!r}" for k in diffs) or "format version"
            raise AqlmkitError(f"the checkpoint in {self.dir} belongs to a different job ({detail}); "
                               "rerun with --fresh to discard it, or use another work dir")

    def reset(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def save_block(self, idx: int, block: nn.Module, next_inputs: torch.Tensor, stats: list[dict]) -> None:
        """Persist block ``idx`` and the inputs of block ``idx+1``, then commit the manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        with atomic_path(self.dir / f"block_{idx}.safetensors") as tmp:
            save_file(state, str(tmp))
        rng = torch.get_rng_state()
        with atomic_path(self.dir / f"inputs_{idx + 1}.safetensors") as tmp:
            save_file({"inputs": next_inputs.detach().cpu().contiguous(), "rng": rng}, str(tmp))
        atomic_save_json(self.manifest_path, {"version": VERSION, **self.identity,
                                              "next_block": idx + 1, "stats": stats})
        old = self.dir / f"inputs_{idx}.safetensors"
        if old.exists():
            old.unlink()

    def load_block_state(self, idx: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / f"block_{idx}.safetensors"))

    def load_inputs(self, idx: int) -> torch.Tensor:
        path = self.dir / f"inputs_{idx}.safetensors"
        if not path.exists():
            raise AqlmkitError(f"{path} is missing, so the run cannot resume; rerun with --fresh")
        data = load_file(str(path))
        torch.set_rng_state(data["rng"])
        return data["inputs"]
