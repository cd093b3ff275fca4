"""When to run a batch: the start that minimises its mean grid carbon intensity and still
finishes inside its completion window. Pure: no clock, no I/O beyond reading a forecast.

A forecast is an hourly series of `timestamp,gco2e_per_kwh` rows (ISO 8601 or unix
seconds; no zone means UTC; a header row is optional). Each value holds from its timestamp
until the next row's; before the first row the first value holds, after the last row the
last one (as `energy.carbon.CarbonConfig.intensity_at` reads a series).

The candidates are "now" and every forecast row that starts after now and leaves room for
the whole run before the deadline. The cleanest mean over the run wins; a tie goes to the
earliest start, so a batch is never deferred for nothing. If no candidate but "now" fits
(no forecast, a tight window, a long run), the batch starts at once.
"""
from __future__ import annotations

import bisect
import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime, timezone

JOULES_PER_KWH = 3.6e6
WINDOW = re.compile(r"^([1-9][0-9]*)h$")
MAX_WINDOW_HOURS = 168  # a week: beyond it a forecast says little


@dataclass(frozen=True)
class Forecast:
    times: tuple[float, ...]  # unix seconds, ascending
    values: tuple[float, ...]  # gCO2e/kWh from each time on

    def at(self, ts: float) -> float:
        return self.values[max(bisect.bisect_right(self.times, ts) - 1, 0)]

    def mean(self, start: float, seconds: float) -> float:
        """Time-weighted mean intensity over [start, start + seconds]."""
        if seconds <= 0:
            return self.at(start)
        end, total, t = start + seconds, 0.0, start
        i = bisect.bisect_right(self.times, start)  # the next change after `start`
        while t < end:
            nxt = min(self.times[i], end) if i < len(self.times) else end
            total += self.at(t) * (nxt - t)
            t, i = nxt, i + 1
        # divide by the span the segments cover (end - start), not by `seconds`: at unix-time
        # magnitudes start + seconds - start is off by up to ~2e-7 s, which for a run of a few
        # milliseconds made a constant 500 g/kWh average 500.002
        return total / (end - start)


def parse_forecast(text: str, source: str = "forecast") -> Forecast:
    """Rows of `timestamp,gco2e_per_kwh`. A first row whose value is not a number is a
    header; blank lines and `#` comments are skipped; rows may come in any order; a
    repeated timestamp keeps its last value. Raises ValueError naming the bad line."""
    rows: dict[float, float] = {}
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        try:
            if len(cells) < 2:
                raise ValueError
            ts, value = _timestamp(cells[0]), float(cells[1])
        except ValueError:
            if not rows and n == 1:
                continue  # the header
            raise ValueError(f"{source}:{n}: expected `timestamp,gco2e_per_kwh`, got {','.join(row)!r}") from None
        if not value >= 0:  # also refuses nan
            raise ValueError(f"{source}:{n}: intensity must be >= 0, got {cells[1]!r}")
        rows[ts] = value
    if not rows:
        raise ValueError(f"{source}: no forecast rows")
    times = tuple(sorted(rows))
    return Forecast(times, tuple(rows[t] for t in times))


def load_forecast(path: str) -> Forecast:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
        return parse_forecast(f.read(), path)


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))  # raises ValueError if not ISO
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def window_seconds(window: str) -> int:
    """A completion window such as "24h" (OpenAI's only one) or "1h", in seconds."""
    m = WINDOW.match(window)
    if not m or int(m.group(1)) > MAX_WINDOW_HOURS:
        raise ValueError(f"completion_window must be a whole number of hours from 1h to {MAX_WINDOW_HOURS}h, "
                         f"such as '24h'; got {window!r}")
    return int(m.group(1)) * 3600


def deadline_of(batch: dict) -> int:
    """When a batch (a row with `created_at` and `completion_window`) must be done: its
    `expires_at`."""
    return batch["created_at"] + window_seconds(batch["completion_window"])


def choose_start(forecast: Forecast | None, now: float, run_seconds: float, deadline: float) -> float:
    """The start in [now, deadline - run_seconds] with the lowest mean intensity over the run."""
    if forecast is None:
        return now
    best, best_mean = now, forecast.mean(now, run_seconds)
    for t in forecast.times:
        if t <= now:
            continue
        if t + run_seconds > deadline:
            break
        mean = forecast.mean(t, run_seconds)
        if mean < best_mean * (1 - 1e-9):
            best, best_mean = t, mean
    return best


@dataclass
class Plan:
    """A batch's schedule and what it is expected to save; the `leanserve` field of the batch."""

    scheduled_start_at: int  # unix seconds; the batch's lines are not run before it
    estimated_tokens: int
    estimated_run_seconds: float
    joules_per_token: float
    joules_per_token_source: str  # "measured" (this server's energy bill) or "default"
    intensity_at_once: float | None = None  # mean gCO2e/kWh over the run started now; None: no forecast
    intensity_scheduled: float | None = None  # ... started at scheduled_start_at
    estimated_carbon_grams_saved: float | None = None  # at once minus scheduled, PUE included

    def as_dict(self) -> dict:
        return {"scheduled_start_at": self.scheduled_start_at, "estimated_tokens": self.estimated_tokens,
                "estimated_run_seconds": round(self.estimated_run_seconds, 3),
                "joules_per_token": round(self.joules_per_token, 6),
                "joules_per_token_source": self.joules_per_token_source,
                "carbon_intensity_at_once_g_per_kwh": _round(self.intensity_at_once, 3),
                "carbon_intensity_scheduled_g_per_kwh": _round(self.intensity_scheduled, 3),
                "estimated_carbon_grams_saved": _round(self.estimated_carbon_grams_saved, 6)}


def plan_batch(forecast: Forecast | None, now: float, deadline: float, tokens: int, tokens_per_second: float,
               joules_per_token: float, joules_source: str, pue: float = 1.0) -> Plan:
    """Chooses a start for `tokens` of work run at `tokens_per_second`, and prices the choice
    at `joules_per_token` of IT energy (times `pue` at the grid)."""
    run = tokens / tokens_per_second
    start = choose_start(forecast, now, run, deadline) if tokens else now  # nothing to run: no wait
    plan = Plan(int(start), tokens, run, joules_per_token, joules_source)
    if forecast is not None:
        plan.intensity_at_once = forecast.mean(now, run)
        plan.intensity_scheduled = forecast.mean(start, run)
        kwh = tokens * joules_per_token * pue / JOULES_PER_KWH
        plan.estimated_carbon_grams_saved = kwh * (plan.intensity_at_once - plan.intensity_scheduled)
    return plan


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)
