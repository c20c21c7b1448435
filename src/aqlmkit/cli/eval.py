"""`aqlmkit eval`: perplexity of a model on a corpus (papers' protocol)."""
from __future__ import annotations

import argparse
import sys

from aqlmkit.cli._common import add_model_args, check_positive
from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text corpus")
    add_model_args(p)
    p.add_argument("--dataset", "-d", default="default",
                   help="default, ood, pydoc, kjv, sotu, factbook, wikitext2, c4, ptb, redpajama, or a .txt/.jsonl file "
                        "(its eval split is used)")
    p.add_argument("--seqlen", type=int, default=2048,
                   help="window length in tokens (capped by the model's context; default 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--limit-tokens", type=int, default=None,
                   help="evaluate only the first N tokens of the eval text")
    p.add_argument("--report", default=None, help="write REPORT.json with the numbers")
    _add_zeroshot_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if getattr(args, "tasks", None):
        return _run_zeroshot(args)
    from aqlmkit.data.corpora import load_corpus
    from aqlmkit.eval.perplexity import perplexity
    from aqlmkit.formats.loading import resolve_device

    resolve_device(args.device)  # fail on bad input before any slow work
    _check_common(args)
    if args.seqlen < 2:
        raise AqlmkitError(f"need --seqlen >= 2 (got {args.seqlen})")
    check_positive(limit_tokens=args.limit_tokens)
    docs = load_corpus(args.dataset, "eval")
    from aqlmkit.formats.loading import load_model
    from aqlmkit.nn import compute_dtype

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    res = perplexity(model, tok, docs, seqlen=args.seqlen, batch_size=args.batch_size,
                     limit_tokens=args.limit_tokens)
    print(f"model: {args.model}  dataset: {args.dataset}  seqlen: {res.seqlen}  "
          f"dtype: {compute_dtype(model)}")
    print(f"PPL: {res.ppl:.4f}")
    print(f"tokens: {res.tokens}  windows: {res.windows}  seconds: {res.seconds:.2f}  "
          f"tokens/s: {res.tokens / max(res.seconds, 1e-9):.1f}")
    if args.report:
        from aqlmkit.eval.report import save_report

        data = {"model": str(args.model), "dataset": args.dataset, "device": args.device,
                "dtype": str(compute_dtype(model)), "ppl": res.ppl, "nll": res.nll,
                "tokens": res.tokens, "windows": res.windows, "seqlen": res.seqlen,
                "seconds": res.seconds, "tokens_per_s": res.tokens / max(res.seconds, 1e-9)}
        paths = save_report(args.report, data)
        print(f"report: {paths[0]}", file=sys.stderr)
    return 0


def _check_common(args) -> None:
    """Flags both modes share, checked before the model loads."""
    from aqlmkit.utils import check_writable_file

    check_positive(batch_size=args.batch_size)
    if args.report:
        check_writable_file(args.report, "--report")


# --- zero-shot accuracy through lm-eval (engineer H): `--tasks` switches eval from perplexity ---

def _limit(text: str) -> int | float:
    """lm-eval's --limit: a count of examples per task, or a fraction below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None
    return int(value) if value >= 1 and value.is_integer() else value


def _add_zeroshot_args(p) -> None:
    g = p.add_argument_group("zero-shot accuracy (lm-eval); --tasks replaces perplexity")
    g.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks, e.g. arc_easy,arc_challenge,piqa,"
                        "winogrande,hellaswag (hub datasets: need them cached or online)")
    g.add_argument("--num-fewshot", type=int, default=0, help="in-context examples (default 0)")
    g.add_argument("--limit", type=_limit, default=None,
                   help="only the first N examples per task (or a fraction < 1)")
    g.add_argument("--include-path", default=None,
                   help="folder of extra lm-eval task YAMLs (e.g. local jsonl data for offline use)")


def _run_zeroshot(args) -> int:
    from aqlmkit.eval.zeroshot import check_tasks, evaluate, format_table
    from aqlmkit.formats.loading import load_model, resolve_device
    from aqlmkit.nn import compute_dtype

    resolve_device(args.device)
    _check_common(args)
    if args.num_fewshot < 0:
        raise AqlmkitError(f"--num-fewshot must be >= 0 (got {args.num_fewshot})")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise AqlmkitError("--tasks is empty; pass e.g. --tasks arc_easy,piqa")
    check_tasks(tasks, args.include_path)  # unknown names fail before the model loads
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    metrics = evaluate(model, tok, tasks, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, limit=args.limit,
                       include_path=args.include_path, report=args.report)
    print(f"model: {args.model}  num_fewshot: {args.num_fewshot}  "
          f"dtype: {compute_dtype(model)}")
    print(format_table(metrics))
    if args.report:
        stem = args.report[:-5] if args.report.endswith(".json") else args.report
        print(f"report: {stem}.json", file=sys.stderr)
    return 0
