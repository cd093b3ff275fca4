"""Energy meters: cumulative joules since the meter was made.

Three sources, best first: RAPL counters (CPU package and DRAM, the whole machine), NVML's
per-GPU energy counters, and, where no counter can be read, an *estimate* from the engine
process's CPU time and memory. `choose_meter` picks; `Meter.source` says which it picked.

Meters keep state between reads (last raw counter values) and are not thread-safe: the
`EnergyLedger` serialises every read.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

import psutil

from ..errors import LeanserveError

POWERCAP_ROOT = "/sys/class/powercap"
DEFAULT_WATTS_PER_CORE = 10.0  # a mid-range server core at full load, when the CPU model is unknown
DEFAULT_WATTS_PER_GB = 0.375  # DRAM power per GB in use: the figure CodeCarbon's fallback uses
GB = 2**30

# CPU model (a substring of /proc/cpuinfo's "model name", without "(R)" and "(TM)") ->
# (TDP in W, physical cores), from the vendors' spec sheets. TDP / cores is taken as the
# power of one busy core: an estimate.
CPU_TDP = {
    "EPYC 9654": (360, 96),
    "EPYC 7763": (280, 64),
    "EPYC 7742": (225, 64),
    "Xeon Platinum 8480": (350, 56),
    "Xeon Platinum 8380": (270, 40),
    "Xeon Gold 6248": (150, 20),
    "Xeon CPU E5-2686 v4": (145, 18),
    "Core i9-13900K": (125, 24),
    "Core i7-8700 CPU": (65, 6),
    "Ryzen 9 7950X 16-Core": (170, 16),
}


class MeterUnavailable(LeanserveError):
    """This machine has no readable counter of that kind."""


class Meter(Protocol):
    source: str  # "rapl" | "nvml" | "estimate", or several joined by "+"

    def read_joules(self) -> float:
        """Joules since the meter was made: monotonic, counter wrap-around handled."""


class RaplMeter:
    """Intel and AMD RAPL through the powercap sysfs tree: every `package-*` and `dram`
    zone of the `intel-rapl` control type (AMD's driver registers under the same name).
    Core/uncore subzones are skipped, being part of their package; `intel-rapl-mmio`
    zones are skipped, repeating the package counter. This is the whole machine's energy,
    not only leanserve's.

    Each `energy_uj` counter wraps to 0 after `max_energy_range_uj`; reading at least once
    per wrap period (minutes at full load) keeps the total right. Since 2020 Linux lets
    only root read `energy_uj`; unreadable zones are left out, and with none left the
    meter is unavailable.
    """

    source = "rapl"

    def __init__(self, root: str | os.PathLike = POWERCAP_ROOT):
        self.zones: list[tuple[Path, int]] = []  # (energy_uj file, its wrap range)
        for zone in sorted(Path(root).glob("intel-rapl:*")):
            try:
                name = (zone / "name").read_text().strip()
                if not (name.startswith("package") or name == "dram"):
                    continue
                max_uj = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())
            except (OSError, ValueError):  # PermissionError included
                continue
            self.zones.append((zone / "energy_uj", max_uj))
        if not self.zones:
            raise MeterUnavailable(f"no readable RAPL package or dram zone under {root}")
        self._last = [int(f.read_text()) for f, _ in self.zones]
        self._uj = 0

    def read_joules(self) -> float:
        for i, (path, max_uj) in enumerate(self.zones):
            now = int(path.read_text())
            delta = now - self._last[i]
            if delta < 0:  # wrapped past max_energy_range_uj (off by at most one counter unit)
                delta += max_uj
            self._uj += delta
            self._last[i] = now
        return self._uj / 1e6


def import_pynvml():
    try:
        import pynvml
    except ImportError:
        raise MeterUnavailable("nvidia-ml-py is not installed") from None
    return pynvml


class NvmlMeter:
    """NVIDIA GPUs through NVML (the `nvidia-ml-py` package, imported as `pynvml`):
    `nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver loaded, per device
    (Volta and newer). `pynvml_module` lets tests pass a stand-in."""

    source = "nvml"

    def __init__(self, pynvml_module=None):
        nv = self.nv = pynvml_module or import_pynvml()
        try:
            nv.nvmlInit()
            self.handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
            self._start = [nv.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        except nv.NVMLError as e:
            raise MeterUnavailable(f"NVML: {e}") from None
        if not self.handles:
            raise MeterUnavailable("NVML sees no GPU")

    def device_joules(self) -> list[float]:
        """Joules of each GPU since the meter was made, in NVML's device order."""
        return [(self.nv.nvmlDeviceGetTotalEnergyConsumption(h) - s) / 1e3
                for h, s in zip(self.handles, self._start)]

    def read_joules(self) -> float:
        return sum(self.device_joules())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_watts_per_core(model: str | None = None) -> float:
    """TDP per core of a known CPU model, else DEFAULT_WATTS_PER_CORE."""
    model = " ".join((cpu_model() if model is None else model).replace("(R)", "").replace("(TM)", "").split())
    for name, (tdp, cores) in CPU_TDP.items():
        if name in model:
            return tdp / cores
    return DEFAULT_WATTS_PER_CORE


class EstimateMeter:
    """An ESTIMATE, not a measurement, for machines without counters (like CodeCarbon's
    fallback): the process's CPU time (user + system, all threads) times watts per core,
    plus its resident memory times watts per GB, integrated over wall time.

    Only leanserve's own process is counted. A CPU-second of one hardware thread counts as
    a core-second, so with SMT fully busy it overestimates. Memory power is sampled at most
    once a second (RSS_EVERY) and held over the interval since the previous read.

    The engine reads this meter twice per step. Two /proc files per read (psutil) cost ~4%
    of the engine thread at 64 streams, partly waiting to get the GIL back after each file
    read; the own-process CPU time is one `times()` syscall instead, and resident memory,
    which moves slowly, is read once a second.
    """

    source = "estimate"
    RSS_EVERY = 1.0  # seconds between samples of resident memory

    def __init__(self, watts_per_core: float | None = None, watts_per_gb: float = DEFAULT_WATTS_PER_GB,
                 pid: int | None = None):
        self.watts_per_core = cpu_watts_per_core() if watts_per_core is None else watts_per_core
        self.watts_per_gb = watts_per_gb
        self.process = psutil.Process(pid)
        self._own = pid is None or pid == os.getpid()
        self._cpu0 = self._cpu_seconds()
        self._t = self._rss_at = time.monotonic()
        self._rss = self._rss_bytes()
        self._memory_j = 0.0

    def _cpu_seconds(self) -> float:
        t = os.times() if self._own else self.process.cpu_times()  # all threads either way
        return t.user + t.system

    def _rss_bytes(self) -> int:
        return self.process.memory_info().rss

    def read_joules(self) -> float:
        now = time.monotonic()
        if now - self._rss_at >= self.RSS_EVERY:
            self._rss, self._rss_at = self._rss_bytes(), now
        self._memory_j += self._rss / GB * self.watts_per_gb * (now - self._t)
        self._t = now
        return (self._cpu_seconds() - self._cpu0) * self.watts_per_core + self._memory_j


class ProcessesMeter(EstimateMeter):
    """The estimate meter over given processes, e.g. a server under benchmark (leanserve,
    llama-server, vLLM), so that every server is costed by the same formula.

    A process's CPU time is utime + stime of /proc/PID/stat (all its threads). With
    `children`, every live descendant is counted too, and so is the CPU time of the children
    each has reaped (cutime + cstime): a worker that exits and is reaped mid-run moves from
    its own count to its parent's, so it is neither lost nor counted twice.
    """

    RSS_EVERY = 0.0  # read when asked: `bench serve` asks once a second

    def __init__(self, pids: list[int], children: bool = True, watts_per_core: float | None = None,
                 watts_per_gb: float = DEFAULT_WATTS_PER_GB):
        if not pids:
            raise ValueError("no pid to measure")
        self.roots = [_process(pid) for pid in pids]
        self.children = children
        super().__init__(watts_per_core, watts_per_gb, pids[0])

    def _processes(self) -> list[psutil.Process]:
        seen: dict[int, psutil.Process] = {}
        for root in self.roots:
            if not root.is_running():
                raise MeterUnavailable(f"process {root.pid} exited during the measurement")
            seen.setdefault(root.pid, root)
            if self.children:
                try:
                    for child in root.children(recursive=True):
                        seen.setdefault(child.pid, child)
                except psutil.NoSuchProcess:
                    raise MeterUnavailable(f"process {root.pid} exited during the measurement") from None
        return list(seen.values())

    def _cpu_seconds(self) -> float:
        total = 0.0
        for p in self._processes():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:  # a child that just exited: its parent will count it once reaped
                continue
            total += t.user + t.system + (t.children_user + t.children_system if self.children else 0.0)
        return total

    def _rss_bytes(self) -> int:
        total = 0
        for p in self._processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def cpu_seconds(self) -> float:
        """CPU seconds of the processes since the meter was made."""
        return self._cpu_seconds() - self._cpu0


def _process(pid: int) -> psutil.Process:
    try:
        if pid <= 0:
            raise psutil.NoSuchProcess(pid)
        process = psutil.Process(pid)
        process.cpu_times()
        return process
    except psutil.NoSuchProcess:
        raise MeterUnavailable(f"no process with pid {pid} to measure") from None
    except psutil.AccessDenied:
        raise MeterUnavailable(f"not allowed to read the CPU time of pid {pid}") from None


class CompositeMeter:
    """Several meters of disjoint hardware (CPU+DRAM by RAPL, GPUs by NVML), summed."""

    def __init__(self, meters: list[Meter]):
        self.meters = meters
        self.source = "+".join(m.source for m in meters)

    def read_joules(self) -> float:
        return sum(m.read_joules() for m in self.meters)


METER_KINDS = ("auto", "rapl", "nvml", "estimate")


def choose_meter(kind: str = "auto", watts_per_core: float | None = None,
                 watts_per_gb: float = DEFAULT_WATTS_PER_GB, powercap_root: str = POWERCAP_ROOT,
                 pynvml_module=None) -> Meter:
    """`auto`: the CPU side by RAPL if readable, else by the estimate; plus NVML if there
    are GPUs. A named kind must be available, or MeterUnavailable says why."""
    if kind not in METER_KINDS:
        raise ValueError(f"energy meter must be one of {', '.join(METER_KINDS)}, got {kind!r}")
    if kind == "rapl":
        return RaplMeter(powercap_root)
    if kind == "nvml":
        return NvmlMeter(pynvml_module)
    if kind == "estimate":
        return EstimateMeter(watts_per_core, watts_per_gb)
    try:
        cpu: Meter = RaplMeter(powercap_root)
    except MeterUnavailable:
        cpu = EstimateMeter(watts_per_core, watts_per_gb)
    try:
        return CompositeMeter([cpu, NvmlMeter(pynvml_module)])
    except MeterUnavailable:
        return cpu
