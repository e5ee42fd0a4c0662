"""Command-line entry point (placeholder until the runner lands)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("crossgrad: no commands yet")
    return 0
