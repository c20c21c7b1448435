"""`aqlmkit` command line: one small module per subcommand, each with ``register(subparsers)``.

User errors (AqlmkitError) print one line and exit 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from aqlmkit.errors import AqlmkitError

COMMANDS = ("quantize", "finetune", "eval", "generate", "chat", "convert", "bench", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aqlmkit",
        description="Additive Quantization of Language Models: quantize, fine-tune, evaluate, "
        "export and run AQLM models. With no model given, commands use the embedded "
        "SmolLM2-135M-Instruct.",
    )
    from aqlmkit import __version__

    parser.add_argument("--version", action="version", version=f"aqlmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"aqlmkit.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AqlmkitError as e:
        print(f"aqlmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aqlmkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
