"""`aqlmkit bench`."""
from __future__ import annotations

from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("bench", help="bench (not yet implemented)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise AqlmkitError("'bench' is not yet implemented")
