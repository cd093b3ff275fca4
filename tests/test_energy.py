"""The energy package: meters over fixture counters, the FLOP formula, attribution and its
conservation, carbon and cost factors, the Prometheus collector and the usage report.

RAPL reads a fixture directory shaped like /sys/class/powercap whose counters the tests
advance. NVML runs over a stand-in module (no GPU can exist here). The estimate meter
reads this very process through psutil.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from leanserve.energy import report
from leanserve.energy.carbon import REGION_INTENSITY, CarbonConfig
from leanserve.energy.config import add_energy_args, energy_config, parse_intensity
from leanserve.energy.ledger import Bill, EnergyLedger, Work, chunk_flops
from leanserve.energy.meters import (DEFAULT_WATTS_PER_CORE, CompositeMeter, EstimateMeter, MeterUnavailable,
                                     NvmlMeter, RaplMeter, choose_meter, cpu_watts_per_core)
from leanserve.energy.metrics import EnergyMetrics, Utilisation
from leanserve.models.llama import ModelArgs

ARGS = ModelArgs(arch="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=100)


# -- RAPL over a fixture powercap tree --------------------------------------------------------

class Powercap:
    """A /sys/class/powercap lookalike: zone folders with name, energy_uj, max_energy_range_uj."""

    def __init__(self, root: Path):
        self.root = root

    def zone(self, zone: str, name: str, energy_uj: int, max_uj: int = 262143328850) -> None:
        d = self.root / zone
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
        self.set(zone, energy_uj)

    def set(self, zone: str, energy_uj: int) -> None:
        (self.root / zone / "energy_uj").write_text(f"{energy_uj}\n")

    def add(self, zone: str, uj: int) -> None:
        path = self.root / zone / "energy_uj"
        max_uj = int((self.root / zone / "max_energy_range_uj").read_text())
        self.set(zone, (int(path.read_text()) + uj) % max_uj)


@pytest.fixture
def powercap(tmp_path) -> Powercap:
    pc = Powercap(tmp_path / "powercap")
    pc.zone("intel-rapl:0", "package-0", 1_000_000)
    pc.zone("intel-rapl:0:0", "core", 5_000)  # inside package-0: not counted again
    pc.zone("intel-rapl:0:1", "dram", 100)
    pc.zone("intel-rapl:1", "package-1", 9_000_000, max_uj=10_000_000)  # wraps soon
    pc.zone("intel-rapl:2", "psys", 7)  # the whole SoC, overlapping the packages
    pc.zone("intel-rapl-mmio:0", "package-0", 42)  # the same package through MMIO
    (pc.root / "intel-rapl").mkdir()  # the control type folder: no counter
    return pc


def test_rapl_counts_packages_and_dram_once_across_a_wrap(powercap):
    meter = RaplMeter(powercap.root)
    assert meter.source == "rapl"
    assert sorted(p.parent.name for p, _ in meter.zones) == ["intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1"]
    assert meter.read_joules() == 0.0
    powercap.add("intel-rapl:0", 2_500_000)
    powercap.add("intel-rapl:0:0", 9_999_999)  # must not count
    powercap.add("intel-rapl:0:1", 600_000)
    powercap.add("intel-rapl:1", 1_500_000)  # 9.0 J -> 10.0 J wraps to 0.5 J
    powercap.add("intel-rapl:2", 9_999_999)
    powercap.add("intel-rapl-mmio:0", 9_999_999)
    assert (Path(powercap.root) / "intel-rapl:1" / "energy_uj").read_text().strip() == "500000"
    assert meter.read_joules() == pytest.approx(2.5 + 0.6 + 1.5, abs=1e-12)
    assert meter.read_joules() == pytest.approx(4.6, abs=1e-12)  # nothing new
    powercap.add("intel-rapl:1", 9_700_000)  # 0.5 J -> 10.2 J wraps to 0.2 J: a second wrap
    assert meter.read_joules() == pytest.approx(4.6 + 9.7, abs=1e-12)


def test_rapl_leaves_out_unreadable_zones_and_is_unavailable_without_any(tmp_path, powercap):
    (powercap.root / "intel-rapl:0:1" / "energy_uj").unlink()  # as if reading were refused
    assert len(RaplMeter(powercap.root).zones) == 2
    empty = Powercap(tmp_path / "empty")
    empty.zone("intel-rapl:0", "core", 1)
    with pytest.raises(MeterUnavailable):
        RaplMeter(empty.root)
    with pytest.raises(MeterUnavailable):
        RaplMeter(tmp_path / "missing")


# -- NVML through a stand-in module -----------------------------------------------------------

class FakeNvml:
    """Stands in for the `pynvml` module: what nvidia-ml-py exposes, over fixed counters."""

    class NVMLError(Exception):
        pass

    def __init__(self, energy_mj: list[int], unsupported: bool = False):
        self.energy_mj = list(energy_mj)
        self.unsupported = unsupported
        self.calls: list[tuple] = []

    def nvmlInit(self):
        self.calls.append(("nvmlInit",))

    def nvmlDeviceGetCount(self):
        self.calls.append(("nvmlDeviceGetCount",))
        return len(self.energy_mj)

    def nvmlDeviceGetHandleByIndex(self, i):
        self.calls.append(("nvmlDeviceGetHandleByIndex", i))
        return f"handle-{i}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.calls.append(("nvmlDeviceGetTotalEnergyConsumption", handle))
        if self.unsupported:
            raise self.NVMLError("Not Supported")
        return self.energy_mj[int(handle.split("-")[1])]

    def nvmlDeviceGetUtilizationRates(self, handle):
        return argparse.Namespace(gpu=37, memory=12)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return argparse.Namespace(used=3 * 2**30, total=16 * 2**30, free=13 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 123_456  # mW


def test_nvml_meter_reads_each_device_counter_in_millijoules():
    nv = FakeNvml([5_000_000, 70_000])
    meter = NvmlMeter(nv)
    assert meter.source == "nvml"
    assert nv.calls == [("nvmlInit",), ("nvmlDeviceGetCount",), ("nvmlDeviceGetHandleByIndex", 0),
                        ("nvmlDeviceGetHandleByIndex", 1), ("nvmlDeviceGetTotalEnergyConsumption", "handle-0"),
                        ("nvmlDeviceGetTotalEnergyConsumption", "handle-1")]
    nv.calls.clear()
    nv.energy_mj[0] += 1_250  # 1.25 J
    nv.energy_mj[1] += 300_000  # 300 J
    assert meter.device_joules() == [1.25, 300.0]
    assert meter.read_joules() == 301.25
    assert nv.calls.count(("nvmlDeviceGetTotalEnergyConsumption", "handle-0")) == 2
    assert ("nvmlInit",) not in nv.calls  # initialised once


def test_nvml_meter_unavailable_without_gpus_or_energy_counters():
    with pytest.raises(MeterUnavailable, match="no GPU"):
        NvmlMeter(FakeNvml([]))
    with pytest.raises(MeterUnavailable, match="Not Supported"):
        NvmlMeter(FakeNvml([1], unsupported=True))


def test_choose_meter(tmp_path, powercap):
    no_gpu = FakeNvml([])
    rapl = choose_meter(powercap_root=str(powercap.root), pynvml_module=no_gpu)
    assert isinstance(rapl, RaplMeter)
    both = choose_meter(powercap_root=str(powercap.root), pynvml_module=FakeNvml([1000]))
    assert isinstance(both, CompositeMeter) and both.source == "rapl+nvml"
    powercap.add("intel-rapl:0", 2_000_000)
    both.meters[1].nv.energy_mj[0] += 500
    assert both.read_joules() == pytest.approx(2.5)
    fallback = choose_meter(powercap_root=str(tmp_path / "none"), pynvml_module=no_gpu, watts_per_core=3.0)
    assert isinstance(fallback, EstimateMeter) and fallback.watts_per_core == 3.0
    gpu_only = choose_meter(powercap_root=str(tmp_path / "none"), pynvml_module=FakeNvml([1]))
    assert gpu_only.source == "estimate+nvml"
    with pytest.raises(MeterUnavailable):
        choose_meter("rapl", powercap_root=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="energy meter"):
        choose_meter("wattmeter")


# -- the estimate -----------------------------------------------------------------------------

def _cpu_seconds() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def test_estimate_meter_charges_cpu_time_times_watts_per_core():
    before = _cpu_seconds()
    meter = EstimateMeter(watts_per_core=7.0, watts_per_gb=0.0)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    joules = meter.read_joules()
    after = _cpu_seconds()
    assert meter.source == "estimate"
    assert 7.0 * 0.2 < joules <= 7.0 * (after - before)


def test_estimate_meter_integrates_resident_memory_over_wall_time():
    """The meter's interval runs from inside its constructor to inside the read, so it is
    bracketed by clock reads around both: the bounds hold however late a loaded machine
    runs each line."""
    rss = [psutil.Process().memory_info().rss]
    t0 = time.monotonic()
    meter = EstimateMeter(watts_per_core=0.0, watts_per_gb=2.0)
    t1 = time.monotonic()
    time.sleep(0.2)
    t2 = time.monotonic()
    joules = meter.read_joules()
    t3 = time.monotonic()
    rss.append(psutil.Process().memory_info().rss)
    watts = [2.0 * r / 2**30 for r in rss]
    assert 0.95 * min(watts) * (t2 - t1) <= joules <= 1.05 * max(watts) * (t3 - t0), (joules, watts, t3 - t0)


def test_watts_per_core_from_the_tdp_table():
    assert cpu_watts_per_core("AMD EPYC 7763 64-Core Processor") == 280 / 64
    assert cpu_watts_per_core("Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz") == 270 / 40
    assert cpu_watts_per_core("Intel(R) Xeon(R) Processor") == DEFAULT_WATTS_PER_CORE
    assert EstimateMeter(watts_per_core=None).watts_per_core == cpu_watts_per_core()


# -- FLOPs ------------------------------------------------------------------------------------

def test_chunk_flops_by_hand():
    # weights per layer: qkv 64*(4+2*2)*16 = 8192, o 4*16*64 = 4096, MLP 3*64*128 = 24576 -> 36864; 2 layers
    weights = 2 * 36864
    # 2 new tokens after 3 cached: positions 3 and 4 see 4 and 5 keys
    attention = 4 * 2 * 4 * 16 * (4 + 5)
    assert chunk_flops(ARGS, start=3, n=2, sampled=True) == 2 * 2 * weights + 2 * 64 * 100 + attention
    assert chunk_flops(ARGS, start=3, n=2, sampled=False) == 2 * 2 * weights + attention


def test_chunk_flops_adds_up_over_chunks_and_grows_with_context():
    whole = chunk_flops(ARGS, 0, 100, sampled=True)
    chunks = chunk_flops(ARGS, 0, 30, False) + chunk_flops(ARGS, 30, 50, False) + chunk_flops(ARGS, 80, 20, True)
    assert chunks == whole
    assert chunk_flops(ARGS, 500, 1, True) > chunk_flops(ARGS, 10, 1, True)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_chunk_flops_counts_the_models_own_weights(arch):
    """The weight count is the model's matrices but embeddings and norms (for Mixtral,
    with every expert active, so active = all)."""
    import torch

    from leanserve.models.llama import CausalLM

    args = ARGS if arch == "llama" else ModelArgs(**{**vars(ARGS), "arch": "MixtralForCausalLM", "num_experts": 4,
                                                    "num_experts_per_tok": 4})
    with torch.device("meta"):
        model = CausalLM(args)
    weights = sum(p.numel() for name, p in model.named_parameters()
                  if not any(s in name for s in ("embed_tokens", "lm_head", "norm")))
    one_token_attention = 4 * args.num_layers * args.num_heads * args.head_dim  # position 0 sees 1 key
    assert chunk_flops(args, 0, 1, False) == 2 * weights + one_token_attention


# -- the ledger -------------------------------------------------------------------------------

class Clock:
    """Unix time the test sets: the ledger's clock parameter."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


CARBON = CarbonConfig(intensity_g_per_kwh=400, pue=1.2, embodied_g_per_hour=36, price_per_kwh=0.25,
                      machine_price_per_hour=3.6)


def test_ledger_splits_step_energy_by_flops_and_keeps_idle_apart(powercap):
    clock = Clock(1000.0)
    ledger = EnergyLedger(RaplMeter(powercap.root), ARGS, CARBON, clock=clock)
    a, b = Work("a", 10, 0, True), Work("b", 1, 20, True)
    fa, fb = chunk_flops(ARGS, 0, 10, True), chunk_flops(ARGS, 20, 1, True)

    powercap.add("intel-rapl:0", 1_000_000)  # 1 J between steps: idle
    clock.t = 1002.0
    ledger.begin([a, b])
    powercap.add("intel-rapl:0", 4_000_000)
    powercap.add("intel-rapl:0:1", 2_000_000)  # 6 J in the step
    clock.t = 1003.0
    ledger.end()

    billed, idle, total = ledger.totals()
    assert (idle.energy_joules, billed.energy_joules, total) == pytest.approx((1.0, 6.0, 7.0))
    assert idle.active_seconds == 2.0 and billed.active_seconds == 1.0
    bill_a, bill_b = ledger.close("a"), ledger.close("b")
    share = fa / (fa + fb)
    assert bill_a.energy_joules == pytest.approx(6.0 * share, rel=1e-12)
    assert bill_b.energy_joules == pytest.approx(6.0 * (1 - share), rel=1e-12)
    # the factors, exactly: energy * PUE * intensity, embodied and machine price on active time
    step_g = 6.0 * 1.2 / 3.6e6 * 400 + 36 * 1.0 / 3600
    step_usd = 6.0 * 1.2 / 3.6e6 * 0.25 + 3.6 * 1.0 / 3600
    assert bill_a.carbon_grams == pytest.approx(step_g * share, rel=1e-12)
    assert bill_a.cost_usd == pytest.approx(step_usd * share, rel=1e-12)
    assert bill_a.active_seconds == pytest.approx(share, rel=1e-12)
    assert idle.carbon_grams == pytest.approx(1.0 * 1.2 / 3.6e6 * 400 + 36 * 2.0 / 3600, rel=1e-12)
    assert idle.cost_usd == pytest.approx(1.0 * 1.2 / 3.6e6 * 0.25 + 3.6 * 2.0 / 3600, rel=1e-12)
    assert (bill_a + bill_b).carbon_grams == pytest.approx(billed.carbon_grams, rel=1e-12)
    assert bill_a.energy_source == "rapl" and bill_a.usage()["energy_source"] == "rapl"
    assert ledger.close("a") == Bill(energy_source="rapl")  # closed already: nothing more


def test_ledger_conservation_over_many_steps_and_batch_size(powercap):
    clock = Clock(0.0)
    ledger = EnergyLedger(RaplMeter(powercap.root), ARGS, CarbonConfig(), clock=clock)
    closed = []
    plan = [[Work("a", 5, 0, True), Work("b", 9, 0, True)],  # 2 sequences
            [Work("a", 1, 5, True), Work("b", 1, 9, True)],
            [],  # an empty step: its energy is idle
            [Work("b", 1, 10, True)]]  # 1 sequence
    for i, work in enumerate(plan):
        powercap.add("intel-rapl:1", 3_000_000 + i)  # wraps on the way (range 10 J)
        ledger.poll()
        with ledger.step(work):
            powercap.add("intel-rapl:0", 1_000_000 * (i + 1))
            ledger.poll()  # a scrape during the step books nothing
        if i == 1:
            closed.append(ledger.close("a"))
    closed.append(ledger.close("b"))
    billed, idle, total = ledger.totals()
    assert total == pytest.approx(4 * 3 + 6e-6 + (1 + 2 + 3 + 4), abs=1e-9)
    assert sum(b.energy_joules for b in closed) + idle.energy_joules == pytest.approx(total, rel=1e-12)
    assert idle.energy_joules == pytest.approx(4 * 3 + 6e-6 + 3, abs=1e-9)  # the empty step's 3 J too
    assert closed[0].batch_size == 2.0 and closed[1].batch_size == 5 / 3 and closed[1].steps == 3
    assert billed.steps == 3


def test_ledger_refuses_misuse(powercap):
    ledger = EnergyLedger(RaplMeter(powercap.root), ARGS)
    with pytest.raises(RuntimeError):
        ledger.end()
    ledger.begin([Work("a", 1, 0, True)])
    with pytest.raises(RuntimeError):
        ledger.begin([])
    with pytest.raises(RuntimeError, match="after end"):
        ledger.close("a")
    ledger.end()
    assert ledger.close("a").steps == 1


# -- carbon -----------------------------------------------------------------------------------

def test_intensity_from_number_region_default_and_bad_input(tmp_path):
    assert CarbonConfig(intensity_g_per_kwh=400).intensity_at(0) == 400
    assert CarbonConfig(region="fr").intensity_at(0) == REGION_INTENSITY["FR"] == 56
    assert CarbonConfig().intensity_at(0) == REGION_INTENSITY["WORLD"]
    with pytest.raises(ValueError, match="unknown carbon region"):
        CarbonConfig(region="XX")
    with pytest.raises(ValueError, match="give one"):
        CarbonConfig(intensity_g_per_kwh=1, region="FR")
    with pytest.raises(ValueError, match="pue"):
        CarbonConfig(pue=0.9)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,g\n2024-01-01T00:00,lots\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        CarbonConfig(series_file=str(bad))


def test_hourly_series_drives_carbon_of_each_step(tmp_path, powercap):
    series = tmp_path / "grid.csv"
    series.write_text("time,gco2e_per_kwh\n"
                      "2024-06-01T01:00:00Z,300\n"
                      "2024-06-01T00:00:00,100\n"  # rows in any order; no zone means UTC
                      "1717207200,50\n")  # 2024-06-01T02:00:00Z as unix seconds
    carbon = CarbonConfig(series_file=str(series))
    t00 = 1717200000.0  # 2024-06-01T00:00:00Z
    assert carbon.intensity_at(t00 - 1) == 100  # before the series: its first value
    assert carbon.intensity_at(t00 + 1800) == 100
    assert carbon.intensity_at(t00 + 3600 + 5) == 300
    assert carbon.intensity_at(t00 + 7200) == 50
    clock = Clock(t00 + 60)
    ledger = EnergyLedger(RaplMeter(powercap.root), ARGS, CarbonConfig(series_file=str(series)), clock=clock)
    for t in (t00 + 100, t00 + 7200):
        clock.t = t
        with ledger.step([Work("r", 1, 0, True)]):
            powercap.add("intel-rapl:0", 3_600_000)  # 3.6 J = 1e-6 kWh
            clock.t = t + 1
    assert ledger.close("r").carbon_grams == pytest.approx(1e-6 * 100 + 1e-6 * 50, rel=1e-12)


def test_cli_options_make_the_config(tmp_path):
    assert parse_intensity("400") == {"intensity_g_per_kwh": 400.0}
    assert parse_intensity("DE") == {"region": "DE"}
    assert parse_intensity("hourly.csv") == {"series_file": "hourly.csv"}
    parser = argparse.ArgumentParser()
    add_energy_args(parser)
    cfg = energy_config(parser.parse_args(["--carbon-intensity", "SE", "--pue", "1.3", "--price-per-kwh", "0.3",
                                           "--watts-per-core", "4", "--energy-meter", "estimate"]))
    assert (cfg.meter, cfg.watts_per_core, cfg.carbon.region, cfg.carbon.pue, cfg.carbon.price_per_kwh) == \
        ("estimate", 4.0, "SE", 1.3, 0.3)
    assert energy_config(parser.parse_args([])).carbon.intensity_at(0) == REGION_INTENSITY["WORLD"]
    with pytest.raises(ValueError):
        energy_config(parser.parse_args(["--carbon-intensity", "Atlantis"]))


# -- /metrics ---------------------------------------------------------------------------------

def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_prometheus_collector_totals_labels_and_gauges(powercap):
    ledger = EnergyLedger(RaplMeter(powercap.root), ARGS, CarbonConfig(intensity_g_per_kwh=360))
    metrics = EnergyMetrics(ledger, Utilisation(pynvml_module=FakeNvml([0, 0])))
    registry = CollectorRegistry()
    registry.register(metrics)
    with ledger.step([Work("a", 4, 0, True), Work("b", 4, 0, True)]):
        powercap.add("intel-rapl:0", 10_000_000)
    metrics.add(ledger.close("a"), model="m", adapter="", user="alice")
    metrics.add(ledger.close("b"), model="m", adapter="sql", user="alice")
    powercap.add("intel-rapl:0:1", 2_000_000)  # idle, booked by the scrape
    s = _samples(generate_latest(registry).decode())
    assert s["leanserve_energy_joules_total"] == pytest.approx(12.0)
    assert s["leanserve_idle_energy_joules_total"] == pytest.approx(2.0)
    assert s["leanserve_carbon_grams_total"] == pytest.approx(12.0 / 3.6e6 * 360)
    assert s['leanserve_request_energy_joules_total{adapter="",model="m"}'] == pytest.approx(5.0)
    assert s['leanserve_request_energy_joules_total{adapter="sql",model="m"}'] == pytest.approx(5.0)
    assert s['leanserve_user_energy_joules_total{user="alice"}'] == pytest.approx(10.0)
    assert s['leanserve_energy_source_info{source="rapl"}'] == 1.0
    assert s["leanserve_process_resident_memory_bytes"] > 0
    assert "leanserve_process_cpu_percent" in s
    assert s['leanserve_gpu_power_watts{gpu="1"}'] == pytest.approx(123.456)
    assert s['leanserve_gpu_memory_used_bytes{gpu="0"}'] == 3 * 2**30
    assert s['leanserve_gpu_utilization_percent{gpu="0"}'] == 37


def test_utilisation_without_nvml():
    u = Utilisation(pynvml_module=FakeNvml([])).read()
    assert u["gpus"] == [] and u["rss_bytes"] > 0 and u["cpu_percent"] >= 0


# -- usage log and report ---------------------------------------------------------------------

def _record(i: int, **kw) -> dict:
    return {"time": 1_700_000_000 + 60 * i, "request_id": f"r{i}", "model": "tiny", "adapter": None, "user": "u",
            "prompt_tokens": 10, "completion_tokens": 10, "queue_ms": 1.0, "prefill_ms": 2.0, "decode_ms": 7.0 * i,
            "energy_joules": 2.0, "carbon_grams": 0.5, "cost_usd": 0.001, "energy_source": "estimate",
            "batch_size": 1 + i % 3, **kw}


def test_usage_log_lines_stay_whole_across_threads(tmp_path):
    log = report.UsageLog(str(tmp_path / "usage.jsonl"))
    threads = [threading.Thread(target=lambda t=t: [log.write(_record(100 * t + i)) for i in range(50)])
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records, bad = report.load(str(tmp_path / "usage.jsonl"))
    assert bad == 0 and len(records) == 200
    assert set(report.RECORD_FIELDS) <= set(records[0])


def test_report_totals_per_group_and_plot(tmp_path, capsys):
    path = tmp_path / "usage.jsonl"
    rows = [_record(i) for i in range(4)] + [_record(4, user="bob", energy_joules=8.0, completion_tokens=30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"cut short\n")
    by_user = {r["user"]: r for r in report.summarize(report.load(str(path))[0], "user")}
    assert by_user["u"]["requests"] == 4 and by_user["u"]["joules_per_token"] == pytest.approx(8.0 / 80)
    assert by_user["bob"]["joules_per_token"] == pytest.approx(8.0 / 40)
    assert by_user["all"]["energy_joules"] == pytest.approx(16.0)
    assert by_user["all"]["carbon_grams"] == pytest.approx(2.5)
    assert by_user["u"]["latency_ms"]["p50"] == pytest.approx(3 + 7 * 1.5)  # 3, 10, 17, 24 ms
    out_png = tmp_path / "plot.png"
    assert report.main([str(path), "--by", "user", "--plot", str(out_png)]) == 0
    out, err = capsys.readouterr()
    assert "skipped 1 lines" in err
    assert "not measured" in out and "bob" in out and "0.2000" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main([str(tmp_path / "missing.jsonl")]) == 1
