"""From joules and seconds to grams of CO2e and dollars.

Grid carbon intensity comes from one of: a number (gCO2e/kWh), a region code looked up in
REGION_INTENSITY, or an hourly series file. Energy is metered at the machine, so both its
carbon and its cost are scaled by the datacentre's PUE. Embodied carbon of the machine and
its hourly price are charged per second of use.
"""
from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass, field
from datetime import datetime, timezone

JOULES_PER_KWH = 3.6e6

# Annual averages of the carbon intensity of electricity generation in 2023, gCO2e/kWh,
# lifecycle emissions, as published by Ember (Yearly Electricity Data; shown in Our World
# in Data's "Carbon intensity of electricity generation"; WORLD from Ember's Global
# Electricity Review 2024). Keys are ISO 3166-1 alpha-2 codes, plus WORLD. Annual
# averages hide hourly swings of 2x or more; use a series file for those.
REGION_INTENSITY = {
    "WORLD": 481,
    "AR": 354, "AT": 111, "AU": 549, "BE": 138, "BG": 335, "BR": 98, "CA": 170, "CL": 291,
    "CN": 582, "CZ": 450, "DE": 381, "DK": 152, "FI": 79, "FR": 56, "GR": 337, "HU": 204,
    "IE": 291, "IN": 713, "NO": 30, "PL": 662, "SE": 41,
}
DEFAULT_REGION = "WORLD"


def load_series(path: str) -> tuple[list[float], list[float]]:
    """An hourly (or any-step) intensity series: a CSV with a header row, then rows of
    `time,gco2e_per_kwh`. Time is unix seconds or ISO 8601 (no zone means UTC).
    Returns (sorted times, values)."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for n, row in enumerate(reader, start=2):
            if not row or not row[0].strip():
                continue
            try:
                rows.append((_timestamp(row[0].strip()), float(row[1])))
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{n}: expected `time,gco2e_per_kwh`, got {','.join(row)!r}") from None
    if not rows:
        raise ValueError(f"{path}: no intensity rows")
    rows.sort()
    return [t for t, _ in rows], [v for _, v in rows]


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


@dataclass
class CarbonConfig:
    """Carbon and cost factors. Give at most one of intensity_g_per_kwh, region and
    series_file; with none, the WORLD average applies."""

    intensity_g_per_kwh: float | None = None
    region: str | None = None
    series_file: str | None = None
    pue: float = 1.0  # facility energy / IT energy
    embodied_g_per_hour: float = 0.0  # the machine's manufacturing carbon over its life, per hour
    price_per_kwh: float = 0.0  # USD
    machine_price_per_hour: float = 0.0  # USD, e.g. a cloud instance's hourly price
    _series: tuple[list[float], list[float]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        given = [x for x in (self.intensity_g_per_kwh, self.region, self.series_file) if x is not None]
        if len(given) > 1:
            raise ValueError("give one of a carbon intensity, a region and a series file")
        if self.region is not None:
            self.region = self.region.upper()
            if self.region not in REGION_INTENSITY:
                raise ValueError(f"unknown carbon region {self.region!r}; known: {', '.join(REGION_INTENSITY)}")
        if self.series_file is not None:
            self._series = load_series(self.series_file)
        for name in ("intensity_g_per_kwh", "embodied_g_per_hour", "price_per_kwh", "machine_price_per_hour"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.pue < 1:
            raise ValueError(f"pue must be >= 1, got {self.pue}")

    def intensity_at(self, ts: float) -> float:
        """gCO2e/kWh at unix time `ts`: a series holds each value until the next row
        (before the first row, the first value)."""
        if self._series is not None:
            times, values = self._series
            return values[max(bisect.bisect_right(times, ts) - 1, 0)]
        if self.intensity_g_per_kwh is not None:
            return self.intensity_g_per_kwh
        return REGION_INTENSITY[self.region or DEFAULT_REGION]

    def grams(self, joules: float, seconds: float, ts: float) -> float:
        """CO2e of `joules` of IT energy used at time `ts` over `seconds` of machine time."""
        return (joules * self.pue / JOULES_PER_KWH * self.intensity_at(ts)
                + self.embodied_g_per_hour * seconds / 3600)

    def cost(self, joules: float, seconds: float) -> float:
        """USD of `joules` of IT energy and `seconds` of machine time."""
        return joules * self.pue / JOULES_PER_KWH * self.price_per_kwh + self.machine_price_per_hour * seconds / 3600
