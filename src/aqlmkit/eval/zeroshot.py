"""Zero-/few-shot accuracy through EleutherAI's lm-evaluation-harness, on an already-loaded model.

The AQLM papers report zero-shot accuracy (arc_easy, arc_challenge, piqa, winogrande, hellaswag)
next to perplexity; using lm-eval itself keeps the prompts, normalisation and stderr identical to
theirs. The model is passed in loaded (``HFLM(pretrained=model)``) rather than by name, so models
whose linears are aqlmkit ``QuantizedLinear`` are evaluated exactly as they run.

Two lm-eval behaviours are worked around here:

* indexing all ~15k built-in task YAMLs takes ~20 s, so tasks found under ``include_path`` are
  served from that folder alone, and the built-in task *names* (for the "unknown task" check) are
  cached in ``cache_dir()`` per lm-eval version;
* built-in tasks download their hub dataset when constructed; offline that is a bare
  ``ConnectionError`` after retries, which becomes an AqlmkitError naming the task and pointing
  to ``--include-path`` with a local task YAML.
"""
from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from aqlmkit.errors import AqlmkitError

METRICS = ("acc", "acc_norm")  # the papers' zero-shot columns
_DOC = ("write a task YAML (e.g. `dataset_path: json` with `dataset_kwargs: {data_files: ...}` "
        "pointing at a local .jsonl) into a folder and pass it with --include-path")


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise AqlmkitError("zero-shot evaluation needs lm-eval: pip install 'aqlmkit[eval]' "
                           f"(or pip install lm-eval) ({e})") from e
    return TaskManager


def _check_args(tasks: Sequence[str], num_fewshot: int, batch_size: int, limit) -> list[str]:
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise AqlmkitError("no tasks given; pass e.g. --tasks arc_easy,piqa")
    if num_fewshot < 0 or batch_size < 1:
        raise AqlmkitError(f"need num_fewshot >= 0 and batch_size >= 1 (got {num_fewshot}, "
                           f"{batch_size})")
    if limit is not None and not (limit >= 1 or 0 < limit < 1):
        raise AqlmkitError(f"limit must be a count >= 1 or a fraction in (0, 1) (got {limit})")
    return names


def _default_task_names(TaskManager) -> set[str]:
    """Names of lm-eval's built-in tasks/groups/tags, cached per lm-eval version (the scan is slow)."""
    import lm_eval

    from aqlmkit.utils import atomic_save_json, cache_dir

    version = getattr(lm_eval, "__version__", "unknown")
    path = Path(cache_dir()) / "lm_eval" / f"task_names-{version}.json"
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    names = TaskManager(include_defaults=True).all_tasks
    try:
        atomic_save_json(path, sorted(names))
    except OSError:  # a read-only cache only costs speed
        pass
    return set(names)


def _unknown_error(name: str, known: set[str], include_path) -> AqlmkitError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    where = f" nor under --include-path {include_path}" if include_path else ""
    return AqlmkitError(f"unknown lm-eval task {name!r}: not a built-in task{where}.{hint} "
                        f"For your own task, {_DOC}")


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None):
    """Fail fast on unknown task names (before any model is loaded); returns the include_path-only
    TaskManager when that folder defines every task, else None (the full index is needed)."""
    TaskManager = _import_lm_eval()
    local = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise AqlmkitError(f"--include-path {include_path} is not a folder of task YAMLs")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    known = _default_task_names(TaskManager) | set(local.all_tasks if local else ())
    for name in tasks:
        if name not in known:
            raise _unknown_error(name, known, include_path)
    return None


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """A TaskManager that knows every name in ``tasks``, or AqlmkitError for the unknown ones."""
    local = check_tasks(tasks, include_path)
    if local is not None:
        return local
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None)


def _load_tasks(manager, names: list[str]) -> list:
    """Build each task (this loads its dataset), naming the task whose data cannot be had."""
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (ConnectionError, OSError, FileNotFoundError, TimeoutError) as e:
            raise AqlmkitError(
                f"lm-eval task {name!r}: its dataset could not be loaded ({type(e).__name__}: "
                f"{str(e)[:200]}). Offline, hub datasets are unreachable unless cached; {_DOC}"
            ) from e
        except (KeyError, ValueError) as e:
            raise AqlmkitError(f"lm-eval task {name!r} could not be built: {e}") from e
        built.extend(loaded["tasks"].values())
    return built


def _metrics(results: dict) -> dict[str, dict[str, Any]]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` -> ``{"acc": .., "acc_stderr": ..}``."""
    out: dict[str, dict[str, Any]] = {}
    n_samples = results.get("n-samples", {})
    for task, row in results["results"].items():
        metrics: dict[str, Any] = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and filt == "none":
                metrics[metric] = float(value)
        n = n_samples.get(task, {})
        if n:
            metrics["samples"] = int(n.get("effective", n.get("original", 0)))
        out[task] = metrics
    return out


def _bar_plot(metrics: dict[str, dict[str, Any]]) -> dict:
    series = {f"{task}\n{m}": vals[m] for task, vals in metrics.items() for m in METRICS
              if isinstance(vals.get(m), float)}
    return {"kind": "bar", "series": series, "ylabel": "accuracy", "title": "zero-shot accuracy"}


def evaluate(model, tokenizer, tasks: Sequence[str], num_fewshot: int = 0, batch_size: int = 1,
             limit: int | float | None = None, include_path: str | Path | None = None,
             report: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on a loaded causal LM; returns ``{task: {acc, acc_stderr, acc_norm,
    acc_norm_stderr, ..., samples}}``. ``report`` writes REPORT.json + a bar plot REPORT.png."""
    names = _check_args(tasks, num_fewshot, batch_size, limit)
    manager = task_manager(names, include_path)
    built = _load_tasks(manager, names)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(model=lm, tasks=built, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False)
    finally:
        model.train(was_training)
    metrics = _metrics(results)
    if report is not None:
        from aqlmkit.eval.report import save_report

        data = {"tasks": names, "num_fewshot": num_fewshot, "limit": limit,
                "lm_eval_version": _lm_eval_version(), "results": metrics}
        save_report(report, data, plot=_bar_plot(metrics))
    return metrics


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Plain-text table, one row per task: acc ± stderr, acc_norm ± stderr, samples."""
    lines = [f"{'task':<24} {'acc':>16} {'acc_norm':>16} {'n':>6}"]

    def cell(vals, m):
        if m not in vals:
            return "-"
        err = vals.get(f"{m}_stderr")
        return f"{vals[m]:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "")

    for task, vals in metrics.items():
        lines.append(f"{task:<24} {cell(vals, 'acc'):>16} {cell(vals, 'acc_norm'):>16} "
                     f"{vals.get('samples', ''):>6}")
    return "\n".join(lines)
