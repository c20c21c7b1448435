"""Sharded safetensors read/write in the Hugging Face layout, with errors that name the file.

Written here rather than through ``save_pretrained`` so that quantized state dicts (int codes,
codebooks) go to disk exactly as they are, and so that reading validates every header before any
tensor is used.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aqlmkit.errors import AqlmkitError
from aqlmkit.utils import fault_point

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """"2GB", "500MB", "1GiB" or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise AqlmkitError(f"bad size {text!r}: write e.g. 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(t)
    return shards


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """Write ``model.safetensors`` or numbered shards + index json into ``folder``; returns file names."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards = plan_shards(tensors, parse_size(max_shard_size))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, str(folder / SINGLE), metadata=meta)
        return [SINGLE]
    n, weight_map, files = len(shards), {}, []
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in names}, str(folder / fname), metadata=meta)
        fault_point("save:shard")
        weight_map.update({k: fname for k in names})
        files.append(fname)
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
             "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files + [INDEX]


def _inside(folder: Path, name) -> Path:
    """``folder/name`` for a plain file name that stays inside ``folder`` (symlinks resolved).

    A Hugging Face cache snapshot (``.../snapshots/<rev>/``) may link into its repo's ``blobs/``.
    """
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise AqlmkitError(f"{folder / INDEX} names the shard {name!r}, which is not a file name inside "
                           "the checkpoint folder; the index is damaged or hostile")
    return check_contained(folder, folder / name)


def check_contained(folder: Path, path: Path) -> Path:
    """Refuse a file whose real location (after symlinks) is outside ``folder``."""
    root, real = folder.resolve(), path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(real == a or a in real.parents for a in allowed):
        raise AqlmkitError(f"{path} points outside the checkpoint folder ({real}); refusing to load it")
    return path


def _index_files(folder: Path) -> list[Path]:
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        names = sorted(set(index["weight_map"].values()), key=str)
    except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:
        raise AqlmkitError(f"{folder / INDEX} is not a valid safetensors index ({e}); "
                           "re-export the checkpoint") from None
    paths = [_inside(folder, n) for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise AqlmkitError(f"{folder}: shard(s) {missing} listed in {INDEX} are missing")
    return paths


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (single or via the index), all inside it."""
    if (folder / INDEX).is_file():
        return _index_files(folder)
    if (folder / SINGLE).is_file():
        return [check_contained(folder, folder / SINGLE)]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return [check_contained(folder, f) for f in found]
    bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    hint = (" (only pickle .bin/.pt files found: aqlmkit never unpickles model files; convert them to "
            "safetensors with a tool you trust)") if bins else ""
    raise AqlmkitError(f"no safetensors weights in {folder}{hint}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) from every file; a truncated or corrupt file raises naming it."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), path
        except AqlmkitError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers/lengths
            if type(e).__name__ in ("SafetensorError", "OSError", "RuntimeError", "ValueError"):
                raise AqlmkitError(f"{path} is truncated or corrupt ({e}); re-download or re-export it") from None
            raise
