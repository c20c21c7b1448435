"""`aqlmkit convert`."""
from __future__ import annotations

from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert (not yet implemented)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise AqlmkitError("'convert' is not yet implemented")
