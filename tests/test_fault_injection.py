"""SIGKILL at named points of quantize, convert and save; then check what is on disk and rerun.

Each case runs the real CLI in a forked child (tests/_fault_worker.py) with
``AQLMKIT_FAULT_AT=point[@n]``, which makes the process kill itself there. Afterwards: the
previous output is intact or the new one complete (after the cleanup every next run does
first), nothing else on disk changed, and rerunning the same command gives the reference result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aqlmkit.formats.output import ADDED_BY_JOB
from aqlmkit.utils import clean_leftovers

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
WORKER = Path(__file__).with_name("_fault_worker.py")
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the "
                   f"compiler reads line {i * 7} of the source file." for i in range(60))
QARGS = ["--scheme", "1x4g8", "--nsamples", "2", "--seqlen", "32", "--epochs", "1",
         "--steps-per-epoch", "1", "--init-iters", "1", "--finetune-epochs", "0", "--no-eval"]
SHARD = ["--shard-size", "40KB"]


def snapshot(folder: Path, skip=frozenset()) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (hidden ones included)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def run_worker(cases: list[dict]) -> list[dict]:
    env = {**os.environ, "AQLMKIT_KERNEL": "reference"}
    proc = subprocess.run([sys.executable, str(WORKER)], input=json.dumps(cases), text=True,
                          capture_output=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def refs(tmp_path_factory, tiny_llama_dir):
    """Reference outputs of uninterrupted runs: quantize, convert (sharded), dequantize."""
    root = tmp_path_factory.mktemp("faults")
    (root / "calib.txt").write_text(TEXT)
    q = ["quantize", "-m", str(tiny_llama_dir), "--dataset", str(root / "calib.txt"), *QARGS]
    res = run_worker([{"argv": [*q, "-o", str(root / "ref_q"), "--work-dir", str(root / "ref_work")],
                       "log": str(root / "ref_q.log")}])
    assert res == [{"signal": None, "rc": 0}], (root / "ref_q.log").read_text()[-2000:]
    src = str(root / "ref_q")
    res = run_worker([{"argv": ["convert", src, "-o", str(root / "ref_c"), *SHARD], "log": str(root / "c.log")},
                      {"argv": ["convert", src, "-o", str(root / "ref_d"), "--dequantize"],
                       "log": str(root / "d.log")}])
    assert res == [{"signal": None, "rc": 0}] * 2, (root / "c.log").read_text()[-2000:]
    return root, q


# (scenario, fault point): Q quantize into a new output (Qr: from a finished resume state), QO over
# an aqlmkit checkpoint, C convert into a new output, CO over a checkpoint, D convert --dequantize.
# Every command passes --overwrite, so that the rerun may replace what a killed run completed.
# "noexch" forces the two-rename folder swap used where renameat2(RENAME_EXCHANGE) is missing.
CASES = [
    ("Q", "ckpt:block_written@1"), ("Q", "ckpt:inputs_written@1"), ("Q", "ckpt:manifest_written@1"),
    ("Q", "ckpt:block_written@2"), ("Q", "ckpt:manifest_written@2"), ("Q", "file:before_rename@2"),
    ("Q", "file:after_rename@3"), ("Q", "file:after_rename@1"), ("Qr", "file:before_rename@5"),
    ("C", "save:shard@2"), ("Qr", "save:config"), ("Qr", "save:tokenizer"),
    ("Qr", "save:before_marker"), ("Qr", "dir:before_sync"), ("Qr", "file:after_rename@3"),
    ("Qr", "file:after_rename@4"), ("Qr", "file:after_rename@5"),
    ("QO", "dir:before_swap"), ("QO", "dir:after_swap"), ("QO-noexch", "dir:after_aside"),
    ("C", "convert:loaded"), ("C", "save:shard@1"), ("C", "save:shard@3"), ("C", "dir:before_swap"),
    ("C", "dir:after_swap"), ("CO", "save:before_marker"), ("CO-noexch", "dir:after_aside"),
    ("CO-noexch", "dir:after_swap"), ("D", "convert:loaded"), ("D", "save:before_marker"),
    ("D", "dir:before_swap"),
]


def _setup(case_dir: Path, scenario: str, root: Path, q: list[str]) -> tuple[dict, Path | None]:
    """Make the case folder; returns the case (without fault) and the previous output, if any."""
    case_dir.mkdir()
    (case_dir / "user.txt").write_text("the user's own file")
    out, kind = case_dir / "out", scenario.split("-")[0]
    prev = None
    if kind in ("QO", "CO"):
        shutil.copytree(root / ("ref_c" if kind == "QO" else "ref_q"), out)
        prev = out
    if kind in ("Qr", "QO"):  # a finished resume state: the run goes straight to saving
        shutil.copytree(root / "ref_work", case_dir / "work")
    if kind.startswith("Q"):
        argv = [*q, "-o", str(out), "--work-dir", str(case_dir / "work"), "--overwrite"]
    else:
        argv = ["convert", str(root / "ref_q"), "-o", str(out)]
        argv += {"C": SHARD, "CO": SHARD, "D": ["--dequantize"]}[kind] + ["--overwrite"]
    env = {"AQLMKIT_NO_EXCHANGE": "1"} if scenario.endswith("noexch") else {}
    return {"argv": argv, "env": env, "log": str(case_dir / "run.log")}, prev


def _reference(root: Path, scenario: str) -> Path:
    kind = scenario.split("-")[0]
    return root / {"Q": "ref_q", "Qr": "ref_q", "QO": "ref_q", "C": "ref_c", "CO": "ref_c", "D": "ref_d"}[kind]


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".aqlmkit-*") if p.name != ".aqlmkit.json"]


def test_sigkill_at_every_point_leaves_old_or_new_and_rerun_matches(refs, tiny_llama_dir):
    root, q = refs
    assert len(set(p for _, p in CASES)) >= 20
    before = {"model": snapshot(tiny_llama_dir), "ref_q": snapshot(root / "ref_q")}
    cases, prevs = [], []
    for i, (scenario, point) in enumerate(CASES):
        case, prev = _setup(root / f"case{i}", scenario, root, q)
        prevs.append(snapshot(prev) if prev else None)
        cases.append(case)
    killed = run_worker([{**c, "fault": p} for c, (_, p) in zip(cases, CASES)])
    for i, ((scenario, point), res) in enumerate(zip(CASES, killed)):
        what = f"case{i} {scenario} {point}"
        assert res["signal"] == signal.SIGKILL, f"{what}: fault point never reached ({res})"
        for folder in (root / f"case{i}", root / f"case{i}" / "out"):
            clean_leftovers(folder)  # what the next run does first
        out = root / f"case{i}" / "out"
        complete = snapshot(out, skip=ADDED_BY_JOB) == snapshot(_reference(root, scenario), skip=ADDED_BY_JOB)
        intact = snapshot(out) == (prevs[i] or {})  # the previous output, or still nothing
        assert intact or complete, what
        assert (root / f"case{i}" / "user.txt").read_text() == "the user's own file", what
    reruns = run_worker([{**c, "log": c["log"] + ".rerun"} for c in cases])
    for i, ((scenario, point), res) in enumerate(zip(CASES, reruns)):
        what = f"case{i} {scenario} {point}"
        assert res == {"signal": None, "rc": 0}, f"{what}: {Path(cases[i]['log'] + '.rerun').read_text()[-1500:]}"
        assert snapshot(root / f"case{i}" / "out", skip=ADDED_BY_JOB) == snapshot(
            _reference(root, scenario), skip=ADDED_BY_JOB), what
        assert not _leftovers(root / f"case{i}"), what
    assert snapshot(tiny_llama_dir) == before["model"] and snapshot(root / "ref_q") == before["ref_q"]
