"""Generation options and helpers shared by `generate` and `chat` (batch-1 users of runtime.Engine)."""
from __future__ import annotations

import argparse

from aqlmkit.errors import AqlmkitError


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="used with --do-sample")
    p.add_argument("--top-p", type=float, default=0.9, help="used with --do-sample")
    p.add_argument("--top-k", type=int, default=50, help="used with --do-sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (several times fewer ms per token on CPU; "
                        "the first run compiles for ~20-60 s on 2 cores)")


def sampling_params(args):
    """The request's :class:`SamplingParams`: greedy unless --do-sample (then seeded by --seed)."""
    from aqlmkit.runtime import SamplingParams

    if args.max_new_tokens < 1:
        raise AqlmkitError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if not args.do_sample:
        return SamplingParams(max_tokens=args.max_new_tokens, temperature=0)
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise AqlmkitError("need --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0")
    return SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def load_for_generation(args):
    """(model, tokenizer), refusing a checkpoint that ships no tokenizer in one line."""
    from aqlmkit.formats.loading import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if tok is None:
        raise AqlmkitError(f"{args.model} has no tokenizer (no tokenizer.json / tokenizer_config.json); "
                           "save the base model's tokenizer into that folder "
                           "(AutoTokenizer.from_pretrained(base).save_pretrained(folder))")
    return model, tok


def engine_for(model, tok, args, context: int):
    """A one-slot engine: the same scheduler, cache and sampling as `aqlmkit serve`, at batch 1."""
    from aqlmkit.runtime import Engine

    return Engine(model, tok, max_batch=1, context=context, compile=args.compile, len_bucket=64)
