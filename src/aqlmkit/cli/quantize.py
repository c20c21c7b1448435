"""`aqlmkit quantize`."""
from __future__ import annotations

from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize (not yet implemented)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise AqlmkitError("'quantize' is not yet implemented")
