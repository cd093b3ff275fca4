"""What /metrics shows of energy: the ledger's totals, totals per model/adapter and per
user of finished requests, and utilisation gauges (process CPU and memory, GPUs by NVML).

Label values that come from clients (`user`, adapter names) are bounded (`LabelBound`): every
distinct value is a series in every later scrape, and 20 chats with distinct 1 MB users made
/metrics 63 MB.
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections import defaultdict

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from .ledger import Bill, EnergyLedger
from .meters import MeterUnavailable, import_pynvml

MAX_LABEL_VALUES = 100  # distinct values per label; later new ones are counted under OTHER
MAX_LABEL_CHARS = 64  # longer values are cut and end in a hash of the whole value
OTHER = "other"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def label_value(value: str) -> str:
    """`value` without control characters, at most MAX_LABEL_CHARS long; a cut value ends in
    `~` and 8 hex digits of its hash, so distinct long values stay distinct."""
    value = _CONTROL.sub("", value)
    if len(value) <= MAX_LABEL_CHARS:
        return value
    digest = hashlib.blake2b(value.encode(), digest_size=4).hexdigest()
    return f"{value[:MAX_LABEL_CHARS - 9]}~{digest}"


class LabelBound:
    """At most `limit` distinct values of one label: the first ones seen keep their series for
    the life of the process and later new ones become OTHER. (Top-N by use would move series
    into OTHER and back, and a counter that vanishes and returns reads as a reset.)"""

    def __init__(self, limit: int = MAX_LABEL_VALUES):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = label_value(value)
        with self._lock:
            if value not in self._seen and len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
        return value


class BoundedLabels:
    """A labelled prometheus_client metric whose `labels(name=value)` bounds each value."""

    def __init__(self, metric):
        self.metric = metric
        self.bounds: dict[str, LabelBound] = defaultdict(LabelBound)

    def labels(self, **values: str):
        return self.metric.labels(**{k: self.bounds[k](v) for k, v in values.items()})


class Utilisation:
    """Process CPU % since the previous read (100 = one core busy), resident memory, and
    per-GPU utilisation, memory and power through NVML when there are GPUs."""

    def __init__(self, pid: int | None = None, pynvml_module=None):
        self.process = psutil.Process(pid)
        self.process.cpu_percent(None)  # starts the interval of the first read
        self.nv, self.gpus = _gpus(pynvml_module)

    def read(self) -> dict:
        out = {"cpu_percent": self.process.cpu_percent(None), "rss_bytes": self.process.memory_info().rss,
               "gpus": []}
        for h in self.gpus:
            out["gpus"].append({
                "utilization_percent": self.nv.nvmlDeviceGetUtilizationRates(h).gpu,
                "memory_used_bytes": self.nv.nvmlDeviceGetMemoryInfo(h).used,
                "power_watts": self.nv.nvmlDeviceGetPowerUsage(h) / 1e3,
            })
        return out


def _gpus(pynvml_module) -> tuple[object, list]:
    """NVML and its device handles; (None, []) without nvidia-ml-py or a working driver."""
    try:
        nv = pynvml_module or import_pynvml()
    except MeterUnavailable:
        return None, []
    try:
        nv.nvmlInit()
        return nv, [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
    except nv.NVMLError:
        return None, []


class EnergyMetrics:
    """A Prometheus collector (`registry.register(EnergyMetrics(ledger))`). Feed it each
    finished request's bill with `add`; totals and gauges are read at scrape time."""

    def __init__(self, ledger: EnergyLedger, utilisation: Utilisation | None = None):
        self.ledger = ledger
        self.utilisation = utilisation
        self._lock = threading.Lock()
        self._by_model: dict[tuple[str, str], Bill] = defaultdict(Bill)
        self._by_user: dict[str, Bill] = defaultdict(Bill)
        self._model, self._adapter, self._user = LabelBound(), LabelBound(), LabelBound()

    def add(self, bill: Bill, model: str = "", adapter: str = "", user: str = "") -> None:
        key, user = (self._model(model), self._adapter(adapter)), self._user(user)
        with self._lock:
            self._by_model[key] += bill
            self._by_user[user] += bill

    def collect(self):
        self.ledger.poll()
        billed, idle, _ = self.ledger.totals()
        everything = billed + idle
        yield InfoMetricFamily("leanserve_energy_source", "How energy is measured (estimate: not a measurement)",
                               value={"source": self.ledger.source})
        for name, doc, value in [
            ("leanserve_energy_joules", "Metered energy, requests and idle", everything.energy_joules),
            ("leanserve_idle_energy_joules", "Energy between engine steps, billed to no request", idle.energy_joules),
            ("leanserve_carbon_grams", "gCO2e of all energy (PUE and embodied included), requests and idle",
             everything.carbon_grams),
            ("leanserve_cost_usd", "Cost of energy and machine time, requests and idle", everything.cost_usd),
        ]:
            yield CounterMetricFamily(name, doc, value=value)
        with self._lock:
            by_model, by_user = dict(self._by_model), dict(self._by_user)
        for what in ("energy_joules", "carbon_grams", "cost_usd"):
            m = CounterMetricFamily(f"leanserve_request_{what}", f"{what} of finished requests by model and adapter",
                                    labels=["model", "adapter"])
            for (model, adapter), bill in by_model.items():
                m.add_metric([model, adapter], getattr(bill, what))
            yield m
            u = CounterMetricFamily(f"leanserve_user_{what}", f"{what} of finished requests by user", labels=["user"])
            for user, bill in by_user.items():
                u.add_metric([user], getattr(bill, what))
            yield u
        if self.utilisation is not None:
            yield from self._gauges(self.utilisation.read())

    @staticmethod
    def _gauges(u: dict):
        yield GaugeMetricFamily("leanserve_process_cpu_percent", "CPU of the server process since the previous "
                                "scrape (100 = one core)", value=u["cpu_percent"])
        yield GaugeMetricFamily("leanserve_process_resident_memory_bytes", "Resident memory of the server process",
                                value=u["rss_bytes"])
        for key, name, doc in (("utilization_percent", "leanserve_gpu_utilization_percent", "GPU busy time"),
                               ("memory_used_bytes", "leanserve_gpu_memory_used_bytes", "GPU memory in use"),
                               ("power_watts", "leanserve_gpu_power_watts", "GPU power draw")):
            g = GaugeMetricFamily(name, doc, labels=["gpu"])
            for i, gpu in enumerate(u["gpus"]):
                g.add_metric([str(i)], gpu[key])
            yield g
