"""Output folders aqlmkit may write: checked before any work, replaced only if aqlmkit made them.

Every folder aqlmkit saves carries ``.aqlmkit.json`` (its kind and the files it wrote). A path
that exists is accepted only when it is empty, or (with ``overwrite``) an aqlmkit folder of the
same kind holding nothing but what aqlmkit wrote; anything else is refused, so a user's folder
is never replaced. An output inside a source (or a source inside the output) is refused too,
because replacing the output would delete the source.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from aqlmkit.errors import AqlmkitError
from aqlmkit.utils import atomic_dir, atomic_save_json, check_parent_writable, clean_leftovers, fault_point

MARKER = ".aqlmkit.json"
CHECKPOINT, DENSE = "aqlm-checkpoint", "dense-model"
# files the quantize job adds to a checkpoint after it is saved
ADDED_BY_JOB = frozenset({"quantize_report.json", "quantize_report.png", "quantize_results.json"})


def read_marker(folder: Path) -> dict | None:
    """The folder's ``.aqlmkit.json``, or None when it has none or it is unreadable."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: Path, kind: str) -> None:
    """Record what aqlmkit wrote into ``folder`` (called last, inside the temp folder)."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    atomic_save_json(folder / MARKER, {"kind": kind, "version": 1, "files": files})


def _foreign_files(folder: Path, marker: dict) -> list[str]:
    known = set(marker.get("files") or []) | ADDED_BY_JOB | {MARKER}
    found = [str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()]
    return sorted(f for f in found if f not in known)


def _source_paths(sources: Iterable) -> list[Path]:
    out = []
    for s in sources:
        if s is None:
            continue
        p = Path(str(s)).expanduser()
        if p.exists() or isinstance(s, Path):  # a str may be a hub id or "default"
            out.append(p.resolve())
    return out


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, sources: Iterable = (),
                     kind: str = CHECKPOINT) -> Path:
    """Refuse, before any work, an output path whose replacement could destroy something not ours."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    for src in _source_paths(sources):
        if _inside(resolved, src) or _inside(src, resolved):
            raise AqlmkitError(f"output {out} and {src} overlap (one is inside the other); replacing the "
                               f"output could delete {src}: choose separate folders")
    if os.path.lexists(out):
        _check_existing(out, overwrite, kind)
    check_parent_writable(out, "output")
    return out


def _check_existing(out: Path, overwrite: bool, kind: str) -> None:
    if out.is_symlink() or not out.is_dir():
        raise AqlmkitError(f"output {out} exists and is not a folder; choose another path")
    clean_leftovers(out)  # temp files of a killed run of ours are not the user's
    if not any(out.iterdir()):
        return
    marker = read_marker(out)
    if marker is None:
        raise AqlmkitError(f"output {out} already exists and was not written by aqlmkit; it will not be "
                           "replaced: choose a new folder (or empty it yourself)")
    if marker.get("kind") != kind:
        raise AqlmkitError(f"output {out} holds an aqlmkit {marker.get('kind')}, not a {kind}; choose "
                           "another folder")
    if not overwrite:
        raise AqlmkitError(f"output {out} already holds an aqlmkit {kind}; pass --overwrite to replace it "
                           "(or choose another folder)")
    foreign = _foreign_files(out, marker)
    if foreign:
        raise AqlmkitError(f"output {out} holds files aqlmkit did not write ({', '.join(foreign[:3])}"
                           f"{' ...' if len(foreign) > 3 else ''}); move them out before --overwrite")


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, *, overwrite: bool = False, kind: str = CHECKPOINT,
                  sources: Iterable = ()) -> Iterator[Path]:
    """``atomic_dir`` for an aqlmkit output: checks the path first, writes the marker last."""
    check_output_dir(path, overwrite=overwrite, sources=sources, kind=kind)
    with atomic_dir(path) as tmp:
        yield tmp
        fault_point("save:before_marker")
        write_marker(tmp, kind)
