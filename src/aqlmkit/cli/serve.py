"""`aqlmkit serve`: an OpenAI-compatible HTTP server with continuous batching (aqlmkit.runtime)."""
from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from aqlmkit.cli._common import add_model_args
from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 answers")
    p.add_argument("--context", type=int, default=2048,
                   help="tokens per request, prompt + output (KV cache columns; capped by the model)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens read per engine step (several short prompts, or one "
                        "chunk of a long one): between two tokens of a running stream at most "
                        "this many prompt tokens are read")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--api-key", default=os.environ.get("AQLMKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $AQLMKIT_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the folder name, or 'default')")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step per batch bucket (CUDA graphs on CUDA); each "
                        "new bucket compiles on first use (~20-60 s per bucket on a CPU)")
    p.set_defaults(func=run)


def _check(args) -> None:
    for name in ("max_batch", "context", "prefill_chunk", "max_tokens_limit", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise AqlmkitError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0 or not 0 < args.port < 65536:
        raise AqlmkitError("--max-queue must be >= 0 and --port in 1..65535")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args) -> int:
    from aqlmkit.formats.loading import load_model
    from aqlmkit.runtime import Engine
    from aqlmkit.runtime.api import ServerConfig
    from aqlmkit.runtime.server import serve

    _check(args)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if tok is None:
        raise AqlmkitError(f"{args.model} has no tokenizer, so it cannot be served; save one into "
                           "the folder (tokenizer.save_pretrained(folder))")
    name = args.served_model_name or ("default" if args.model == "default" else Path(args.model).name)
    engine = Engine(model, tok, max_batch=args.max_batch, context=args.context,
                    prefill_chunk=args.prefill_chunk, max_queue=args.max_queue, compile=args.compile)
    cfg = ServerConfig(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                       max_tokens_limit=args.max_tokens_limit)
    if not _loopback(args.host) and not args.api_key:
        print(f"aqlmkit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"aqlmkit serve: {name!r} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots x "
          f"{engine.context} tokens, KV cache {engine.cache.nbytes / 2**20:.0f} MiB)", file=sys.stderr)
    serve(engine, tok, cfg, args.host, args.port)
    return 0
