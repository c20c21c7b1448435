"""`aqlmkit chat`: a chat loop over stdin (or one ``--prompt`` turn) using the chat template."""
from __future__ import annotations

import sys

from aqlmkit.cli._common import add_model_args
from aqlmkit.cli._generation import add_generation_args, engine_for, load_for_generation, sampling_params
from aqlmkit.errors import AqlmkitError

CHAT_CONTEXT = 4096  # KV cache columns of the one slot: the whole conversation must fit


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (its chat template if it has one)")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="optional system message")
    add_generation_args(p)
    p.set_defaults(func=run)


def _reply(engine, tok, messages: list[dict], params) -> str:
    from aqlmkit.runtime.chat_template import encode_chat

    ids = encode_chat(tok, messages)
    if len(ids) + params.max_tokens > engine.context:
        raise AqlmkitError(f"the conversation ({len(ids)} tokens) no longer fits the {engine.context}-token "
                           "context with --max-new-tokens; start a new chat")
    parts: list[str] = []

    def show(ev) -> None:
        parts.append(ev.text)
        print(ev.text, end="", flush=True)

    engine.generate(ids, params, on_event=show)
    print()
    return "".join(parts).strip()


def _turns(prompt: str | None):
    if prompt is not None:
        if not prompt.strip():
            raise AqlmkitError("--prompt is empty: give a message")
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
    params = sampling_params(args)
    model, tok = load_for_generation(args)
    limit = getattr(model.config, "max_position_embeddings", None) or CHAT_CONTEXT
    engine = engine_for(model, tok, args, min(limit, CHAT_CONTEXT))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    for user in _turns(args.prompt):
        messages.append({"role": "user", "content": user})
        if args.prompt is None:
            print("assistant> ", end="", flush=True)
        messages.append({"role": "assistant", "content": _reply(engine, tok, messages, params)})
    return 0

