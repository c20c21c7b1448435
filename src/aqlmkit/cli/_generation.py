"""Generation options shared by `generate` and `chat`."""
from __future__ import annotations

import argparse

import torch

from aqlmkit.errors import AqlmkitError


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="used with --do-sample")
    p.add_argument("--top-p", type=float, default=0.9, help="used with --do-sample")
    p.add_argument("--top-k", type=int, default=50, help="used with --do-sample")
    p.add_argument("--seed", type=int, default=0)


def generation_kwargs(args, tokenizer) -> dict:
    """Keyword arguments for ``model.generate``; sampling knobs only when sampling."""
    if args.max_new_tokens < 1:
        raise AqlmkitError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    kw = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample),
          "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
          else tokenizer.eos_token_id}
    if args.do_sample:
        if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
            raise AqlmkitError("need --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0")
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:  # silence generation_config sampling defaults that greedy decoding ignores
        kw.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(args.seed)
    return kw


def model_device(model) -> torch.device:
    return next(model.parameters()).device
