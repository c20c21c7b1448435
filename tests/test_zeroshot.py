"""Zero-shot eval through lm-eval on a local multiple-choice task written at test time (offline).

The accuracy lm-eval reports is checked against an independent computation from the model's own
logits: for each question, the choice with the highest summed log-likelihood (acc) and the highest
log-likelihood per byte of the choice (acc_norm), as lm-eval defines them.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from aqlmkit.errors import AqlmkitError  # noqa: E402
from aqlmkit.eval import zeroshot  # noqa: E402

TASK = "aqlmkit_tiny_mc"
WORDS = ["red", "blue", "green", "cat", "dog", "river", "stone", "apple", "tree", "cloud", "house",
         "light", "paper", "sound", "table", "water", "fire", "glass", "music", "night"]


def _questions(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 2 + i % 3  # 2..4 choices, so acc differs from a fixed-position guess
        choices = [" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(k)]
        rows.append({"question": f"Which {rng.choice(WORDS)} is like the {rng.choice(WORDS)}?",
                     "choices": choices, "label": rng.randrange(k)})
    return rows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with a jsonl of questions and an lm-eval task YAML that reads it via `json`."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = _questions()
    (d / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'tiny_mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return d, rows


@torch.no_grad()
def _choice_loglik(model, tok, context: str, choice: str) -> float:
    """Sum of log p(choice tokens | context) straight from the logits (lm-eval's " " delimiter)."""
    ctx = tok.encode(context)
    cont = tok.encode(" " + choice, add_special_tokens=False)
    assert tok.encode(context + " " + choice) == ctx + cont  # same split lm-eval sees
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    picked = logp.gather(1, targets[:, None])[:, 0]
    return picked[len(ctx) - 1:].sum().item()


def _expected(model, tok, rows) -> tuple[float, float]:
    acc = acc_norm = 0
    for r in rows:
        context = f"Question: {r['question']}\nAnswer:"
        ll = [_choice_loglik(model, tok, context, c) for c in r["choices"]]
        norm = [x / len(c) for x, c in zip(ll, r["choices"])]  # lm-eval: chars of the choice
        acc += max(range(len(ll)), key=ll.__getitem__) == r["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == r["label"]
    return acc / len(rows), acc_norm / len(rows)


def _check(res: dict, model, tok, rows) -> None:
    assert set(res) == {TASK}
    m = res[TASK]
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        assert key in m and 0.0 <= m[key] <= 1.0, (key, m)
    assert m["samples"] == len(rows)
    acc, acc_norm = _expected(model, tok, rows)
    assert m["acc"] == pytest.approx(acc, abs=1e-9)
    assert m["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)


def _model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_zeroshot_plain_and_quantized_match_direct_loglik(tiny_llama_dir, tiny_tokenizer, task_dir,
                                                          tmp_path):
    from nn_helpers import random_quantized

    from aqlmkit.nn import QuantizedLinear

    d, rows = task_dir
    model = _model(tiny_llama_dir)
    res = zeroshot.evaluate(model, tiny_tokenizer, [TASK], include_path=d, report=tmp_path / "r")
    _check(res, model, tiny_tokenizer, rows)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"][TASK]["acc"] == res[TASK]["acc"]
    assert (tmp_path / "r.png").stat().st_size > 0
    assert TASK in zeroshot.format_table(res)

    random_quantized(model, "1x8g8", seed=1)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    qres = zeroshot.evaluate(model, tiny_tokenizer, [TASK], include_path=d, batch_size=4)
    _check(qres, model, tiny_tokenizer, rows)


def test_zeroshot_limit(tiny_llama_dir, tiny_tokenizer, task_dir):
    d, rows = task_dir
    model = _model(tiny_llama_dir)
    res = zeroshot.evaluate(model, tiny_tokenizer, [TASK], include_path=d, limit=5)
    _check(res, model, tiny_tokenizer, rows[:5])


def test_zeroshot_unknown_task_and_bad_args(tiny_tokenizer, task_dir):
    d, _ = task_dir
    with pytest.raises(AqlmkitError, match="unknown lm-eval task 'no_such_task_xyz'"):
        zeroshot.evaluate(torch.nn.Linear(1, 1), tiny_tokenizer, [TASK, "no_such_task_xyz"],
                          include_path=d)
    with pytest.raises(AqlmkitError, match="no tasks"):
        zeroshot.evaluate(torch.nn.Linear(1, 1), tiny_tokenizer, [" "])
    with pytest.raises(AqlmkitError, match="not a folder"):
        zeroshot.evaluate(torch.nn.Linear(1, 1), tiny_tokenizer, [TASK], include_path=d / "nope")


def test_cli_eval_tasks_prints_table(tiny_llama_dir, task_dir, tmp_path, capsys):
    from aqlmkit.cli import main

    d, rows = task_dir
    rc = main(["eval", "--model", str(tiny_llama_dir), "--tasks", TASK, "--include-path", str(d),
               "--limit", "4", "--report", str(tmp_path / "z")])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith(TASK))
    assert line.split()[-1] == "4"  # samples column honours --limit
    assert json.loads((tmp_path / "z.json").read_text())["results"][TASK]["samples"] == 4
    rc = main(["eval", "--model", str(tiny_llama_dir), "--tasks", "no_such_task_xyz",
               "--include-path", str(d)])
    assert rc == 2 and "unknown lm-eval task" in capsys.readouterr().err
