"""`aqlmkit generate`: stream a continuation of a prompt (plain, GGUF or AQLM models alike)."""
from __future__ import annotations

from aqlmkit.cli._common import add_model_args
from aqlmkit.cli._generation import add_generation_args, generation_kwargs, model_device


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens to stdout")
    add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="text to continue")
    add_generation_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from aqlmkit.formats.loading import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    kw = generation_kwargs(args, tok)
    enc = tok(args.prompt, return_tensors="pt").to(model_device(model))
    streamer = TextStreamer(tok, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(**enc, streamer=streamer, **kw)
    return 0
