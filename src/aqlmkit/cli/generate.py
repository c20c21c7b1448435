"""`aqlmkit generate`: stream a continuation of a prompt (plain, GGUF or AQLM models alike)."""
from __future__ import annotations

import sys
import time

from aqlmkit.cli._common import add_model_args
from aqlmkit.cli._generation import add_generation_args, engine_for, load_for_generation, sampling_params
from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens to stdout")
    add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="text to continue")
    add_generation_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.prompt.strip():
        raise AqlmkitError("--prompt is empty: give some text to continue")
    params = sampling_params(args)
    model, tok = load_for_generation(args)
    ids = list(tok(args.prompt)["input_ids"])
    if not ids:
        raise AqlmkitError("--prompt encodes to no tokens: give some text to continue")
    engine = engine_for(model, tok, args, len(ids) + params.max_tokens)
    print(tok.decode(ids, skip_special_tokens=True), end="", flush=True)
    times: list[float] = []

    def show(ev) -> None:
        times.append(time.perf_counter())
        print(ev.text, end="", flush=True)

    out = engine.generate(ids, params, on_event=show)
    print()
    steps = [b - a for a, b in zip(times[1:], times[2:])]  # first gap of --compile includes compiling
    rate = len(steps) / sum(steps) if steps and sum(steps) > 0 else 0.0
    print(f"[{len(out)} tokens: {rate:.1f} tok/s decode]", file=sys.stderr)
    return 0
