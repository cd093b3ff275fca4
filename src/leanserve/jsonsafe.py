"""JSON from clients, parsed only once its nesting depth is known to be bounded.

Python's `json` recurses once per level of nesting, so 10,000 `[` in a row raise
RecursionError (not the ValueError callers expect) from deep inside the parser. The depth is
counted first, over the text with its strings blanked out, in one vectorised pass.
"""
from __future__ import annotations

import json
import re

import numpy as np

MAX_DEPTH = 128  # JSON Schemas and tool definitions nest a few dozen levels at most
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_STEP = np.zeros(256, dtype=np.int32)  # +1 for each byte that opens a level, -1 for each that closes one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in `raw` (0 for a scalar)."""
    steps = _STEP[np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)]
    return int(steps.cumsum().max(initial=0))


def check_depth(raw: bytes | str, limit: int = MAX_DEPTH) -> None:
    """ValueError when `raw` nests deeper than `limit`."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw.count(b"[") + raw.count(b"{") > limit and depth(raw) > limit:
        raise ValueError(f"JSON nested deeper than {limit} levels")


def loads(raw: bytes | str, limit: int = MAX_DEPTH):
    """`json.loads` that raises ValueError, never RecursionError, on hostile nesting."""
    check_depth(raw, limit)
    return json.loads(raw)
