"""A progress line for long commands, on stderr, at most every few seconds.

    bench serve c=8: 12/32 requests, 1534.2 tok/s, elapsed 0:08, ETA 0:13

`Progress(total, label)` counts requests done (`advance(n, tokens=...)`); a line is printed
when `every` seconds have passed since the last one (`tick()` checks without advancing, for
callers that wait on something else), and always at `close()`, the end of the phase. The ETA
is from the share of requests done, or of `total_tokens` when it is known and further along
(a batch whose requests all finish together still shows how far it is). No dependencies.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def clock_text(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour up."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, label: str, every: float = 5.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, total_tokens: int | None = None,
                 unit: str = "requests"):
        self.total, self.label, self.every, self.unit = total, label, every, unit
        self.total_tokens = total_tokens
        self.stream = stream if stream is not None else sys.stderr  # read at call time: capsys, redirects
        self.clock = clock
        self.done = self.tokens = 0
        self.start = self._last = clock()
        self.closed = False

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        self.tick()

    def tick(self) -> None:
        """Prints the line if `every` seconds have passed since the last one (and some is
        left to do: the last line is close()'s)."""
        now = self.clock()
        if not self.closed and self.done < self.total and now - self._last >= self.every:
            self._print(now)

    def close(self) -> None:
        """The phase's last line (once)."""
        if not self.closed:
            self._print(self.clock(), final=True)
            self.closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fraction(self) -> float:
        shares = [self.done / self.total if self.total else 0.0]
        if self.total_tokens:
            shares.append(self.tokens / self.total_tokens)
        return min(1.0, max(shares))

    def line(self, now: float | None = None, final: bool = False) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        parts = [f"{self.done}/{self.total} {self.unit}"]
        if self.tokens:
            parts.append(f"{self.tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s")
        parts.append(f"elapsed {clock_text(elapsed)}")
        if final:
            parts.append("done")
        else:
            f = self.fraction()
            parts.append(f"ETA {clock_text(elapsed * (1 - f) / f)}" if f > 0 else "ETA ?")
        return f"{self.label}: " + ", ".join(parts)

    def _print(self, now: float, final: bool = False) -> None:
        print(self.line(now, final), file=self.stream, flush=True)
        self._last = now
