"""`aqlmkit eval`: perplexity of a model on a corpus (papers' protocol)."""
from __future__ import annotations

import sys

from aqlmkit.cli._common import add_model_args
from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text corpus")
    add_model_args(p)
    p.add_argument("--dataset", "-d", default="default",
                   help="default, pydoc, kjv, wikitext2, c4, ptb, redpajama, or a .txt/.jsonl file "
                        "(its eval split is used)")
    p.add_argument("--seqlen", type=int, default=2048,
                   help="window length in tokens (capped by the model's context; default 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--limit-tokens", type=int, default=None,
                   help="evaluate only the first N tokens of the eval text")
    p.add_argument("--report", default=None, help="write REPORT.json with the numbers")
    p.set_defaults(func=run)


def run(args) -> int:
    from aqlmkit.data.corpora import load_corpus
    from aqlmkit.eval.perplexity import perplexity
    from aqlmkit.formats.loading import resolve_device

    resolve_device(args.device)  # fail on bad input before any slow work
    if args.seqlen < 2 or args.batch_size < 1:
        raise AqlmkitError(f"need --seqlen >= 2 and --batch-size >= 1 (got {args.seqlen}, "
                           f"{args.batch_size})")
    docs = load_corpus(args.dataset, "eval")
    from aqlmkit.formats.loading import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    res = perplexity(model, tok, docs, seqlen=args.seqlen, batch_size=args.batch_size,
                     limit_tokens=args.limit_tokens)
    print(f"model: {args.model}  dataset: {args.dataset}  seqlen: {res.seqlen}  "
          f"dtype: {next(model.parameters()).dtype}")
    print(f"PPL: {res.ppl:.4f}")
    print(f"tokens: {res.tokens}  windows: {res.windows}  seconds: {res.seconds:.2f}  "
          f"tokens/s: {res.tokens / max(res.seconds, 1e-9):.1f}")
    if args.report:
        from aqlmkit.eval.report import save_report

        data = {"model": str(args.model), "dataset": args.dataset, "device": args.device,
                "dtype": str(next(model.parameters()).dtype), "ppl": res.ppl, "nll": res.nll,
                "tokens": res.tokens, "windows": res.windows, "seqlen": res.seqlen,
                "seconds": res.seconds, "tokens_per_s": res.tokens / max(res.seconds, 1e-9)}
        paths = save_report(args.report, data)
        print(f"report: {paths[0]}", file=sys.stderr)
    return 0
