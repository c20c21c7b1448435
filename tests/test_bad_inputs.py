"""Bad-input matrix: every case is one CLI call that must end with exit 2 and one line naming it.

Cases span CLI flags, config files, output folders, damaged checkpoints, corpora and resume
state. Each asserts the exit code, that stderr is exactly one ``aqlmkit CMD: error: ...`` line
holding the expected words (no traceback), and, where it matters, that nothing was deleted.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aqlmkit.cli import main
from aqlmkit.formats.aqlm_hf import save_quantized
from nn_helpers import random_quantized

TEXT = "\n\n".join(f"Paragraph {i}: plain words for a small calibration and evaluation corpus, "
                   f"number {i * 3}." for i in range(60))
QFAST = ["--scheme", "1x4g8", "--nsamples", "2", "--seqlen", "32", "--epochs", "1", "--steps-per-epoch",
         "1", "--init-iters", "1", "--finetune-epochs", "0", "--no-eval"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_tiny_model, tiny_tokenizer, tiny_llama_dir):
    """A saved AQLM checkpoint, the plain tiny model, a corpus file and a finished resume state."""
    root = tmp_path_factory.mktemp("bad")
    model = random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer)), "2x4g8", seed=3)
    ck = save_quantized(model, tiny_tokenizer, root / "ck", "2x4g8")
    (root / "text.txt").write_text(TEXT)
    mp = pytest.MonkeyPatch()
    mp.setenv("AQLMKIT_KERNEL", "reference")
    quant = ["quantize", "-m", str(tiny_llama_dir), "--dataset", str(root / "text.txt"), *QFAST]
    assert main([*quant, "-o", str(root / "q_out"), "--work-dir", str(root / "work")]) == 0
    yield {"root": root, "ck": ck, "plain": tiny_llama_dir, "text": root / "text.txt", "quant": quant}
    mp.undo()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, fn) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg = fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _edit_tensors(folder: Path, fn, file: str = "model.safetensors") -> Path:
    sd = load_file(folder / file)
    fn(sd)
    save_file(sd, folder / file)
    return folder


def _set(cfg, key, value):
    cfg["quantization_config"][key] = value
    return cfg


def _nan(sd, suffix):
    key = next(k for k in sd if k.endswith(suffix))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = math.nan


def _evalm(model) -> list[str]:
    return ["eval", "--model", str(model), "--dataset", "pydoc", "--seqlen", "16", "--limit-tokens", "64"]


def _shard_index(folder: Path, shard_name: str) -> Path:
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(sd, folder / "real.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard_name for k in sd}}))
    return folder


def _work(e, t: Path, damage) -> list[str]:
    """A copy of the finished resume state, damaged by ``damage(work_dir)``; quantize resumes it."""
    work = _copy(e["root"] / "work", t / "work")
    damage(work)
    return [*e["quant"], "-o", str(t / "out"), "--work-dir", str(work)]


def _nan_block(work: Path) -> None:
    """NaN in a block file, with the manifest's digest updated (so only the value check can catch it)."""
    from aqlmkit.pipeline.checkpoint import file_digest

    _edit_tensors(work, lambda sd: _nan(sd, ".codebooks"), "block_0.safetensors")
    man = json.loads((work / "manifest.json").read_text())
    man["files"]["block_0.safetensors"] = file_digest(work / "block_0.safetensors")
    (work / "manifest.json").write_text(json.dumps(man))


def _user_dir(t: Path) -> Path:
    d = t / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    return d


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# name -> (argv builder (env, tmp) -> argv, words the error line must hold)
CASES = {
    # --- CLI flags
    "beam-size-0": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--beam-size", "0"], "beam_size must be >= 1"),
    "lr-nan": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--lr", "nan"], "lr must be a finite number"),
    "lr-negative": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--lr", "-1"], "lr must be >= 0"),
    "nsamples-0": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--nsamples", "0"], "nsamples must be >= 1"),
    "seqlen-1": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--seqlen", "1"], "seqlen must be >= 2"),
    "finetune-lr-inf": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--finetune-lr", "inf"], "finite"),
    "scheme-range": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--scheme", "2x40"], "nbits_per_codebook"),
    "scheme-syntax": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--scheme", "two"], "bad scheme"),
    "bench-batch-negative": (lambda e, t: ["bench", "--batch", "-1"], "--batch must be >= 1"),
    "bench-iters-0": (lambda e, t: ["bench", "--iters", "0"], "--iters must be >= 1"),
    "bench-shape-0": (lambda e, t: ["bench", "--shape", "0x8"], "bad --shape"),
    "eval-batch-0": (lambda e, t: [*_evalm(e["plain"]), "--batch-size", "0"], "--batch-size must be >= 1"),
    "eval-seqlen-1": (lambda e, t: [*_evalm(e["plain"]), "--seqlen", "1"], "--seqlen >= 2"),
    "eval-limit-0": (lambda e, t: [*_evalm(e["plain"]), "--limit-tokens", "0"], "--limit-tokens must be >= 1"),
    "eval-device": (lambda e, t: [*_evalm(e["plain"]), "--device", "tpu"], "device 'tpu'"),
    "report-is-folder": (lambda e, t: [*_evalm(e["plain"]), "--report", str(t)], "is a folder"),
    "report-under-file": (lambda e, t: [*_evalm(e["plain"]), "--report", str(_write(t / "f", "x") / "r.json")],
                          "is not a folder"),
    # --- output folders (refused before any work; nothing deleted)
    "quantize-into-user-dir": (lambda e, t: [*e["quant"], "-o", str(_user_dir(t))], "not written by aqlmkit"),
    "quantize-into-source": (lambda e, t: [*e["quant"], "-o", str(e["plain"])], "overlap"),
    "quantize-inside-source": (lambda e, t: [*e["quant"], "-o", str(e["plain"] / "q")], "overlap"),
    "quantize-work-inside-output": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--work-dir",
                                                  str(t / "o" / "w")], "overlap"),
    "convert-into-parent": (lambda e, t: ["convert", str(_copy(e["ck"], t / "ck")), "-o", str(t)], "overlap"),
    "convert-onto-file": (lambda e, t: ["convert", str(e["ck"]), "-o", str(_write(t / "f", "x"))],
                          "not a folder"),
    "convert-no-overwrite": (lambda e, t: ["convert", str(e["ck"]), "-o", str(_copy(e["ck"], t / "c"))],
                             "pass --overwrite"),
    "convert-overwrite-user-file": (lambda e, t: ["convert", str(e["ck"]), "-o", str(_write(
        _copy(e["ck"], t / "c") / "mine.txt", "x").parent), "--overwrite"], "did not write"),
    "convert-dequantize-over-checkpoint": (lambda e, t: ["convert", str(e["ck"]), "-o", str(_copy(
        e["ck"], t / "c")), "--dequantize", "--overwrite"], "not a dense-model"),
    # --- config files
    "config-list": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--config", str(_write(t / "c.json", "[1]"))],
                    "JSON object"),
    "config-section-type": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--config",
                                          str(_write(t / "c.json", '{"layer": 5}'))], "JSON object of objects"),
    "config-str-int": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--config",
                                     str(_write(t / "c.json", '{"layer": {"beam_size": "two"}}'))],
                       "beam_size must be int"),
    "config-float-int": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--config",
                                       str(_write(t / "c.json", '{"calibration": {"seed": 1.5}}'))],
                         "seed must be int"),
    "config-skip-str": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--config",
                                      str(_write(t / "c.json", '{"calibration": {"skip": "down_proj"}}'))],
                        "skip must be a list"),
    "config-unknown-field": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--config",
                                           str(_write(t / "c.json", '{"layer": {"nope": 1}}'))], "unknown"),
    "config-bad-json": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--config",
                                      str(_write(t / "c.json", '{"layer": '))], "not valid JSON"),
    # --- checkpoints and model folders
    "config-not-object": (lambda e, t: _evalm(_write(_copy(e["ck"], t / "c") / "config.json", "[]").parent),
                          "not an object"),
    "quant-method-gptq": (lambda e, t: _evalm(_edit_config(_copy(e["ck"], t / "c"),
                                                           lambda c: _set(c, "quant_method", "gptq"))), "not 'aqlm'"),
    "quant-config-string": (lambda e, t: _evalm(_edit_config(_copy(e["ck"], t / "c"),
                                                             lambda c: {**c, "quantization_config": "aqlm"})),
                            "not an object"),
    "quant-config-str-field": (lambda e, t: _evalm(_edit_config(_copy(e["ck"], t / "c"),
                                                                lambda c: _set(c, "num_codebooks", "2"))),
                               "must be an integer"),
    "quant-config-float-field": (lambda e, t: _evalm(_edit_config(_copy(e["ck"], t / "c"),
                                                                  lambda c: _set(c, "in_group_size", 8.5))),
                                 "must be an integer"),
    "quant-config-lost": (lambda e, t: _evalm(_edit_config(_copy(e["ck"], t / "c"), lambda c: {
        k: v for k, v in c.items() if k != "quantization_config"})), "holds AQLM tensors"),
    "nan-in-norm": (lambda e, t: _evalm(_edit_tensors(_copy(e["ck"], t / "c"), lambda sd: _nan(sd, "norm.weight"))),
                    "NaN"),
    "nan-in-lm-head": (lambda e, t: _evalm(_edit_tensors(_copy(e["ck"], t / "c"),
                                                         lambda sd: _nan(sd, "lm_head.weight"))), "NaN"),
    "codes-wrong-dtype": (lambda e, t: _evalm(_edit_tensors(_copy(e["ck"], t / "c"), lambda sd: sd.update(
        {k: v.to(torch.int32) for k, v in sd.items() if k.endswith(".codes")}))), "expected torch.int8"),
    "tensor-missing": (lambda e, t: _evalm(_edit_tensors(_copy(e["ck"], t / "c"), lambda sd: sd.pop(
        next(k for k in sd if k.endswith("norm.weight"))))), "missing tensor"),
    "truncated-weights": (lambda e, t: _evalm(_truncate(_copy(e["ck"], t / "c") / "model.safetensors")
                                              or t / "c"), "truncated or corrupt"),
    "index-traversal": (lambda e, t: _evalm(_shard_index(_copy(e["ck"], t / "c"), "../ck/model.safetensors")),
                        "not a file name inside"),
    "index-absolute": (lambda e, t: _evalm(_shard_index(_copy(e["ck"], t / "c"),
                                                        str(e["ck"] / "model.safetensors"))),
                       "not a file name inside"),
    "symlink-escape": (lambda e, t: _evalm(_symlinked(e, t)), "points outside"),
    "plain-nan": (lambda e, t: _evalm(_edit_tensors(_copy(e["plain"], t / "p"),
                                                    lambda sd: _nan(sd, "input_layernorm.weight"))), "NaN"),
    "plain-pickle-only": (lambda e, t: _evalm(_pickle_only(e, t)), "never unpickles"),
    "gguf-broken-body": (lambda e, t: _evalm(_write(t / "m.gguf", "GGUF" + "\x03\x00\x00\x00" + "junk" * 9)),
                         "could not read GGUF"),
    # --- corpora
    "corpus-empty-file": (lambda e, t: ["eval", "--model", str(e["plain"]), "--dataset",
                                        str(_write(t / "empty.txt", ""))], "no text"),
    "corpus-unknown": (lambda e, t: ["eval", "--model", str(e["plain"]), "--dataset", "nope"], "unknown dataset"),
    "corpus-missing-file": (lambda e, t: ["eval", "--model", str(e["plain"]), "--dataset", str(t / "x.txt")],
                            "does not exist"),
    # --- resume state
    "work-dir-user-folder": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--work-dir", str(_user_dir(t))],
                             "not an aqlmkit work dir"),
    "work-dir-is-file": (lambda e, t: [*e["quant"], "-o", str(t / "o"), "--work-dir", str(_write(t / "w", "x"))],
                         "not a folder"),
    "resume-corrupt-manifest": (lambda e, t: _work(e, t, lambda w: _write(w / "manifest.json", "{oops")),
                                "rerun with --fresh"),
    "resume-truncated-block": (lambda e, t: _work(e, t, lambda w: _truncate(w / "block_1.safetensors")),
                               "block_1.safetensors is truncated"),
    "resume-missing-block": (lambda e, t: _work(e, t, lambda w: (w / "block_0.safetensors").unlink()),
                             "block_0.safetensors is missing"),
    "resume-missing-inputs": (lambda e, t: _work(e, t, lambda w: (w / "inputs_2.safetensors").unlink()),
                              "inputs_2.safetensors is missing"),
    "resume-nan-block": (lambda e, t: _work(e, t, _nan_block), "contains NaN/inf; rerun with --fresh"),
}


def _symlinked(e, t: Path) -> Path:
    folder = _copy(e["ck"], t / "c")
    outside = t / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    return folder


def _pickle_only(e, t: Path) -> Path:
    folder = t / "p"
    folder.mkdir()
    shutil.copy(e["plain"] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return folder


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2(name, env, tmp_path, capsys):
    build, needle = CASES[name]
    argv = build(env, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "it/s]" not in line and "%|" not in line]  # progress bars
    assert len(err) == 1 and err[0].startswith(f"aqlmkit {argv[0]}: error: "), err
    assert needle in err[0], err[0]
    assert "Traceback" not in err[0]
    for p, data in before.items():  # nothing the user had was deleted or changed
        assert p.is_file() and p.read_bytes() == data, p


def test_matrix_size():
    assert len(CASES) >= 40


def test_bug_is_one_line_exit_1_and_traceback_on_request(monkeypatch, capsys):
    """A real bug (not bad input) is one line + hint, exit 1; AQLMKIT_DEBUG=1 shows the traceback."""
    import aqlmkit.cli.bench as bench

    def boom(*a, **k):
        raise ZeroDivisionError("synthetic bug")

    monkeypatch.setattr(bench, "microbench", boom)
    assert main(["bench", "--iters", "1"]) == 1
    err = capsys.readouterr().err
    assert "internal error ZeroDivisionError" in err and "AQLMKIT_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("AQLMKIT_DEBUG", "1")
    assert main(["bench", "--iters", "1"]) == 1
    assert "Traceback" in capsys.readouterr().err
