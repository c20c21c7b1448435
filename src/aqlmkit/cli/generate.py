"""`aqlmkit generate`."""
from __future__ import annotations

from aqlmkit.errors import AqlmkitError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate (not yet implemented)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise AqlmkitError("'generate' is not yet implemented")
