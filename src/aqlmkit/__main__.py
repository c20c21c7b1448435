"""``python -m aqlmkit`` (what ``torchrun -m aqlmkit`` runs on every rank)."""
import sys

from aqlmkit.cli import main

sys.exit(main())
