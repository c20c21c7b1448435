"""The one atomic-write / atomic-folder helper (aqlmkit.utils): swap, cleanup, permissions."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from aqlmkit.utils import OLD_TAG, TMP_TAG, atomic_dir, atomic_save_json, clean_leftovers


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_replaces_and_leaves_nothing(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setenv("AQLMKIT_NO_EXCHANGE", "1")
    out = tmp_path / "out"
    for text in ("one", "two"):
        with atomic_dir(out) as tmp:
            (tmp / "f.txt").write_text(text)
    assert (out / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_block_keeps_the_previous_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_permissions_follow_the_umask(tmp_path):
    from safetensors.torch import save_file
    import torch

    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors writes 0600
        atomic_save_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o750
    assert mode(tmp_path / "out" / "w.safetensors") == 0o640
    assert mode(tmp_path / "r.json") == 0o640


def test_cleanup_removes_only_dead_runs_own_temps_and_restores_an_old_folder(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f"{TMP_TAG}{dead}-out.0123abcd").mkdir()  # killed run's temp folder
    (tmp_path / f"{TMP_TAG}{dead}-r.json.89abcdef").write_text("x")  # killed run's temp file
    (tmp_path / f"{TMP_TAG}{live}-out.0123abce").mkdir()  # a running writer's: kept
    (tmp_path / f"{OLD_TAG}{dead}-gone.0123abcd").mkdir()  # killed mid-swap: put back
    (tmp_path / ".aqlmkit-tmp-notes").write_text("user")  # not our name pattern: kept
    (tmp_path / "user.txt").write_text("user")
    removed = clean_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f"{TMP_TAG}{dead}-out.0123abcd",
                                                      f"{TMP_TAG}{dead}-r.json.89abcdef"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{TMP_TAG}{live}-out.0123abce", "gone", ".aqlmkit-tmp-notes", "user.txt"])
