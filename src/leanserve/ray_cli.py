"""`leanserve ray-serve`: placeholder until the Ray Serve application lands (issue 34)."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    print("leanserve ray-serve: not built yet (issue 34)", file=sys.stderr)
    return 2
