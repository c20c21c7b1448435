"""`aqlmkit eval`."""
from __future__ import annotations

from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("eval", help="eval (not yet implemented)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise AqlmkitError("'eval' is not yet implemented")
