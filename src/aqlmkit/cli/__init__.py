"""`aqlmkit` command line: one small module per subcommand, each with ``register(subparsers)``.

User errors (AqlmkitError, and OS errors such as a full disk or a read-only folder) print one line
and exit 2. Anything else is a bug: one line saying so and exit 1, with the traceback only when
``AQLMKIT_DEBUG=1`` (which also shows the traceback behind a user error).
"""
from __future__ import annotations

import argparse
import importlib
import os
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


def _debug() -> bool:
    return os.environ.get("AQLMKIT_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def _os_error(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}; check the path, its permissions and the free disk space"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # --nproc runs the same command again under torchrun
    try:
        return int(args.func(args) or 0)
    except AqlmkitError as e:
        return _fail(args.command, str(e), 2)
    except KeyboardInterrupt:
        print(f"aqlmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        return _fail(args.command, _os_error(e), 2)
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, traceback on request
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return _fail(args.command, f"internal error {type(e).__name__}: {first} (this is a bug in aqlmkit; "
                                   "rerun with AQLMKIT_DEBUG=1 for the traceback and report it)", 1)


def _fail(command: str, message: str, code: int) -> int:
    if _debug():
        import traceback

        traceback.print_exc()
    line = " ".join(message.split())  # one line, whatever the message holds
    print(f"aqlmkit {command}: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
