"""`aqlmkit generate`: stream a continuation of a prompt (plain, GGUF or AQLM models alike)."""
from __future__ import annotations

import sys

from aqlmkit.cli._common import add_model_args
from aqlmkit.cli._generation import add_generation_args, generation_kwargs, model_device


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens to stdout")
    add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="text to continue")
    add_generation_args(p)
    p.add_argument("--compile", action="store_true",
                   help="decode with aqlmkit.runtime.StaticDecoder: static KV cache and a "
                        "torch.compile'd step (several times fewer ms per token on CPU; the first "
                        "run compiles for ~20-60 s on 2 cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from aqlmkit.formats.loading import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    kw = generation_kwargs(args, tok)
    enc = tok(args.prompt, return_tensors="pt").to(model_device(model))
    streamer = TextStreamer(tok, skip_special_tokens=True)
    if args.compile:
        return _run_static(model, tok, enc["input_ids"], args, streamer)
    with torch.no_grad():
        model.generate(**enc, streamer=streamer, **kw)
    return 0


def _run_static(model, tok, ids, args, streamer) -> int:
    """The same continuation through the compiled static-cache loop (greedy or sampled)."""
    from aqlmkit.runtime import StaticDecoder, make_sampler

    sampler = make_sampler(args.temperature, args.top_k, args.top_p) if args.do_sample else None
    eos = getattr(model.generation_config, "eos_token_id", None)
    streamer.put(ids)
    dec = StaticDecoder(model)
    dec.generate(ids, args.max_new_tokens, eos_token_id=tok.eos_token_id if eos is None else eos,
                 sampler=sampler, on_token=streamer.put)
    streamer.end()
    st = dec.stats
    print(f"[{st.new_tokens} tokens: {st.decode_tok_s:.1f} tok/s decode, compile {st.compile_s:.1f} s]",
          file=sys.stderr)
    return 0
