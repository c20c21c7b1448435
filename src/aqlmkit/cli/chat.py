"""`aqlmkit chat`: a chat loop over stdin (or one ``--prompt`` turn) using the chat template."""
from __future__ import annotations

import sys

from aqlmkit.cli._common import add_model_args
from aqlmkit.cli._generation import add_generation_args, generation_kwargs, model_device


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (its chat template if it has one)")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="optional system message")
    add_generation_args(p)
    p.set_defaults(func=run)


def _encode(tok, messages: list[dict]):
    """Chat template when the tokenizer has one; otherwise a plain 'role: text' transcript."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tok(text, return_tensors="pt")


def _reply(model, tok, messages: list[dict], kw: dict) -> str:
    import torch
    from transformers import TextStreamer

    enc = _encode(tok, messages).to(model_device(model))
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**enc, streamer=streamer, **kw)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _turns(prompt: str | None):
    if prompt is not None:
        yield prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in {"/exit", "/quit"}:
            return
        if line.strip():
            yield line.strip()


def run(args) -> int:
    from aqlmkit.formats.loading import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    kw = generation_kwargs(args, tok)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    for user in _turns(args.prompt):
        messages.append({"role": "user", "content": user})
        if args.prompt is None:
            print("assistant> ", end="", flush=True)
        messages.append({"role": "assistant", "content": _reply(model, tok, messages, kw)})
    return 0
