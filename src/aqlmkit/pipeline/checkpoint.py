"""Resumable block-by-block state: a run killed at any moment continues where it stopped.

Layout of ``work_dir``: ``block_{i}.safetensors`` (state of quantized block i),
``inputs_{i}.safetensors`` (inputs of block i = outputs of quantized block i-1, plus the RNG
state) and ``manifest.json``. The manifest is written last and atomically, so it is the commit
point: files it does not reference are leftovers of an interrupted block and get recomputed.
It records the size and sha256 of every file it references (a truncated or edited block file is
refused on resume, naming the file) and what the run *is* (model fingerprint, scheme, configs,
seed, calibration data hash) so a work dir is never silently reused for a different job.

A work dir is only ever emptied of the files named above: a folder holding anything else is
not an aqlmkit work dir and is refused, never wiped.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aqlmkit.errors import AqlmkitError
from aqlmkit.utils import LEFTOVER, atomic_path, atomic_save_json, clean_leftovers, fault_point

VERSION = 2
IDENTITY_KEYS = ("fingerprint", "scheme", "calib", "layer", "finetune", "data_hash", "skip")
OURS = re.compile(r"^(block_\d+\.safetensors|inputs_\d+\.safetensors|manifest\.json|"
                  r"quantize_report\.(json|png))$")
FRESH = "rerun with --fresh to start over"


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


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def is_work_dir_entry(name: str) -> bool:
    """Names aqlmkit writes into a work dir (its files and its temp leftovers)."""
    return bool(OURS.match(name) or LEFTOVER.match(name))


class Checkpoint:
    """The resume state of one quantization job."""

    def __init__(self, work_dir: str | Path, identity: dict[str, Any]) -> None:
        self.dir = Path(work_dir)
        self.identity = identity
        self.manifest_path = self.dir / "manifest.json"
        self.files: dict[str, dict] = {}
        if os.path.lexists(self.dir) and not self.dir.is_dir():
            raise AqlmkitError(f"work dir {self.dir} exists and is not a folder; pass another --work-dir")

    # ---------------------------------------------------------------------------- reading
    def load_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        clean_leftovers(self.dir)
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise AqlmkitError(f"{self.manifest_path} is corrupt ({e}); {FRESH}") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("next_block", 0), int):
            raise AqlmkitError(f"{self.manifest_path} is not an aqlmkit manifest; {FRESH}")
        return manifest

    def check(self, manifest: dict) -> None:
        """Refuse another job's state (naming every field that differs) or damaged files."""
        diffs = [k for k in IDENTITY_KEYS if json.dumps(manifest.get(k), sort_keys=True, default=str)
                 != json.dumps(self.identity.get(k), sort_keys=True, default=str)]
        if diffs or manifest.get("version") != VERSION:
            detail = "; ".join(f"{k}: checkpoint has {manifest.get(k)!r}, this run has "
                               f"{self.identity.get(k)!r}" for k in diffs) or "format version"
            raise AqlmkitError(f"the checkpoint in {self.dir} belongs to a different job ({detail}); "
                               "rerun with --fresh to discard it, or use another work dir")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise AqlmkitError(f"{self.manifest_path} lists no files; {FRESH}")
        self.files = files
        nxt = manifest["next_block"]
        for name in [f"block_{i}.safetensors" for i in range(nxt)] + ([f"inputs_{nxt}.safetensors"] if nxt else []):
            self._verify(name)

    def _verify(self, name: str) -> Path:
        path = self.dir / name
        want = self.files.get(name)
        if want is None:
            raise AqlmkitError(f"{self.manifest_path} does not list {name}; {FRESH}")
        if not path.is_file():
            raise AqlmkitError(f"resume state {path} is missing; {FRESH}")
        if file_digest(path) != want:
            raise AqlmkitError(f"resume state {path} is truncated or was modified (size/sha256 differ from "
                               f"the manifest); {FRESH}")
        return path

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        path = self._verify(name)
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors' own error types for damaged files
            raise AqlmkitError(f"resume state {path} cannot be read ({e}); {FRESH}") from None
        for k, t in state.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise AqlmkitError(f"resume state {path}: tensor {k} contains NaN/inf; {FRESH}")
        return state

    def load_block_state(self, idx: int) -> dict[str, torch.Tensor]:
        return self._load(f"block_{idx}.safetensors")

    def load_inputs(self, idx: int) -> torch.Tensor:
        data = self._load(f"inputs_{idx}.safetensors")
        if set(data) != {"inputs", "rng"} or data["rng"].dtype != torch.uint8:
            raise AqlmkitError(f"resume state {self.dir / f'inputs_{idx}.safetensors'} has unexpected "
                               f"contents; {FRESH}")
        torch.set_rng_state(data["rng"])
        return data["inputs"]

    # ---------------------------------------------------------------------------- writing
    def reset(self) -> None:
        """Empty the work dir of aqlmkit's own files; refuse a folder holding anything else."""
        if self.dir.is_dir():
            foreign = sorted(e for e in os.listdir(self.dir) if not is_work_dir_entry(e))
            if foreign:
                raise AqlmkitError(f"work dir {self.dir} exists and is not an aqlmkit work dir (it holds "
                                   f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); "
                                   "aqlmkit will not delete it: pass a new or empty --work-dir")
            clean_leftovers(self.dir)
            for e in sorted(os.listdir(self.dir)):
                if OURS.match(e):
                    (self.dir / e).unlink()
        self._ensure_dir()
        self.files = {}

    def _ensure_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AqlmkitError(f"cannot create work dir {self.dir}: {e.strerror}; pass a writable "
                               "--work-dir") from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise AqlmkitError(f"work dir {self.dir} is not writable (permission denied); pass a writable "
                               "--work-dir")

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.dir / name) as tmp:
            save_file(tensors, str(tmp))
            self.files[name] = file_digest(tmp)

    def save_block(self, idx: int, block: nn.Module, next_inputs: torch.Tensor, stats: list[dict]) -> None:
        """Persist block ``idx`` and the inputs of block ``idx+1``, then commit the manifest."""
        self._ensure_dir()
        state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        self._write(f"block_{idx}.safetensors", state)
        fault_point("ckpt:block_written")
        rng = torch.get_rng_state()
        self._write(f"inputs_{idx + 1}.safetensors",
                    {"inputs": next_inputs.detach().cpu().contiguous(), "rng": rng})
        fault_point("ckpt:inputs_written")
        self.files.pop(f"inputs_{idx}.safetensors", None)
        atomic_save_json(self.manifest_path, {"version": VERSION, **self.identity, "next_block": idx + 1,
                                              "stats": stats, "files": self.files})
        fault_point("ckpt:manifest_written")
        old = self.dir / f"inputs_{idx}.safetensors"
        if old.exists():
            old.unlink()
