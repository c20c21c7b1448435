"""`aqlmkit eval/generate/chat` end to end on the tiny Llama, and the one-line errors (exit 2)."""
from __future__ import annotations

import io
import json

import pytest
import torch

from aqlmkit.cli import main


def test_eval_prints_numbers_and_report(tiny_llama_dir, tmp_path, capsys):
    stem = tmp_path / "rep"
    rc = main(["eval", "--model", str(tiny_llama_dir), "--dataset", "pydoc", "--seqlen", "64",
               "--limit-tokens", "256", "--batch-size", "2", "--report", str(stem)])
    out = capsys.readouterr().out
    assert rc == 0 and "PPL:" in out and "tokens: 256" in out and "tokens/s" in out
    data = json.loads((tmp_path / "rep.json").read_text())
    assert data["windows"] == 4 and data["ppl"] > 1
    assert f"PPL: {data['ppl']:.4f}" in out


def test_generate_streams(tiny_llama_dir, capsys):
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "The function",
               "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("The function") and len(out) > len("The function")


def test_generate_sampling_is_seeded(tiny_llama_dir, capsys):
    args = ["generate", "-m", str(tiny_llama_dir), "-p", "x", "--max-new-tokens", "6",
            "--do-sample", "--temperature", "1.5", "--seed"]
    outs = []
    for seed in ("3", "3"):
        assert main(args + [seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_chat_one_turn_and_stdin(tiny_llama_dir, capsys, monkeypatch):
    assert main(["chat", "--model", str(tiny_llama_dir), "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand again\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_chat_uses_template(tiny_llama, monkeypatch):
    from aqlmkit.runtime.chat_template import encode_chat

    _, tok = tiny_llama
    text = tok.decode(encode_chat(tok, [{"role": "user", "content": "hi"}]))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--model", "/no/such/model"], "not found"),
    (["eval", "--dataset", "nosuchcorpus"], "unknown dataset"),
    (["eval", "--seqlen", "1"], "--seqlen >= 2"),
    (["generate", "--model", "/no/such/dir/", "--prompt", "x"], "not found"),
    (["chat", "--model", "/no/such/dir/", "--prompt", "x"], "not found"),
])
def test_cli_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("aqlmkit ")


def test_cli_foreign_and_empty(tmp_path, tiny_llama_dir, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("hello")
    assert main(["generate", "--model", str(fake), "--prompt", "x"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2  # folder without config.json
    assert "no config.json" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["eval", "--model", str(tiny_llama_dir), "--dataset", str(empty)]) == 2
    assert "no text" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cmd", ["eval", "generate", "chat"])
def test_cli_no_cuda(cmd, tiny_llama_dir, capsys):
    argv = [cmd, "--model", str(tiny_llama_dir), "--device", "cuda"]
    if cmd != "eval":
        argv += ["--prompt", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA was requested but" in err[0]


@pytest.mark.slow
def test_chat_default_model(default_model_dir, capsys):
    assert main(["chat", "--prompt", "What is the capital of France? Answer in one word.",
                 "--max-new-tokens", "8"]) == 0
    assert "Paris" in capsys.readouterr().out
