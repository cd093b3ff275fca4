"""The energy options of `leanserve serve` and friends, and the ledger they make."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from .carbon import CarbonConfig
from .ledger import EnergyLedger
from .meters import DEFAULT_WATTS_PER_GB, METER_KINDS, choose_meter


@dataclass
class EnergyConfig:
    meter: str = "auto"  # auto | rapl | nvml | estimate
    watts_per_core: float | None = None  # estimate meter; default: from the CPU model's TDP
    watts_per_gb: float = DEFAULT_WATTS_PER_GB  # estimate meter
    carbon: CarbonConfig = field(default_factory=CarbonConfig)


def make_ledger(config: EnergyConfig, model_args) -> EnergyLedger:
    meter = choose_meter(config.meter, config.watts_per_core, config.watts_per_gb)
    return EnergyLedger(meter, model_args, config.carbon)


def parse_intensity(text: str) -> dict:
    """--carbon-intensity: a number (gCO2e/kWh), a region code, or a series CSV file."""
    try:
        return {"intensity_g_per_kwh": float(text)}
    except ValueError:
        pass
    if os.path.isfile(text) or text.endswith(".csv"):
        return {"series_file": text}
    return {"region": text}


def add_energy_args(parser: argparse.ArgumentParser) -> None:
    d, c = EnergyConfig(), CarbonConfig()
    g = parser.add_argument_group("energy, carbon and cost")
    g.add_argument("--energy-meter", default=d.meter, choices=METER_KINDS,
                   help="auto: RAPL (else an estimate) for the CPU, plus NVML when there are GPUs")
    g.add_argument("--watts-per-core", type=float, default=d.watts_per_core,
                   help="estimate meter: W per busy core (default: the CPU model's TDP per core, else 10)")
    g.add_argument("--watts-per-gb", type=float, default=d.watts_per_gb, help="estimate meter: W per GB of memory")
    g.add_argument("--carbon-intensity", default=None, metavar="G_PER_KWH|REGION|FILE.csv",
                   help="grid gCO2e/kWh: a number, a region code (annual average), or an hourly "
                        "`time,gco2e_per_kwh` CSV (default: the world average)")
    g.add_argument("--pue", type=float, default=c.pue, help="datacentre power usage effectiveness")
    g.add_argument("--embodied-g-per-hour", type=float, default=c.embodied_g_per_hour,
                   help="the machine's embodied gCO2e per hour of use")
    g.add_argument("--price-per-kwh", type=float, default=c.price_per_kwh, help="USD per kWh")
    g.add_argument("--machine-price-per-hour", type=float, default=c.machine_price_per_hour,
                   help="USD per hour of the machine, charged on active time")


def energy_config(args: argparse.Namespace) -> EnergyConfig:
    """Raises ValueError on a bad region or series file."""
    intensity = parse_intensity(args.carbon_intensity) if args.carbon_intensity else {}
    carbon = CarbonConfig(**intensity, pue=args.pue, embodied_g_per_hour=args.embodied_g_per_hour,
                          price_per_kwh=args.price_per_kwh, machine_price_per_hour=args.machine_price_per_hour)
    return EnergyConfig(args.energy_meter, args.watts_per_core, args.watts_per_gb, carbon)
