"""What `leanserve bench serve` measured, made readable: per-level summaries (latency
percentiles, throughput, goodput), the printed table, the plot, and the comparison of two
saved runs (e.g. leanserve against llama-server on the same machine).

A result file is the JSON `bench serve --json` writes: `{"label", "command", "machine",
"config", "levels": [{"concurrency" | "request_rate", "summary", "requests"}]}`. A level's
`summary["energy"]`, when measured, holds the server's own figure (`server`: a leanserve
server's /metrics counters) and the CPU-time estimate over given pids (`pid`), each with
its joules and joules per output token of the level's completed requests.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds; `start` counts from the level's start."""

    index: int
    start: float = 0.0
    status: int | None = None  # HTTP status; None when no response arrived (timeout, connection error)
    error: str | None = None
    ttft: float | None = None  # until the first chunk that carries text
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them (usage), when it says

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None when there is no second token."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def failure(self) -> str:
        """How a failed request failed, as counted in the summary: a status code or an error."""
        return str(self.status) if self.status not in (None, 200) else (self.error or "unknown")


def median_at(runs: list[dict], *path: str, digits: int = 3) -> float | None:
    """The median over repeated runs of the value at `path` (nested keys), None if no run has it."""
    values = []
    for run in runs:
        v = run
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if v is not None:
            values.append(v)
    return round(statistics.median(values), digits) if values else None


def percentiles(values: list[float], scale: float = 1.0) -> dict | None:
    """p50/p90/p99 and mean (numpy's linear interpolation), times `scale`; None for no values."""
    if not values:
        return None
    arr = np.asarray(values, dtype=float) * scale
    out = {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in PERCENTILES}
    out["mean"] = round(float(arr.mean()), 3)
    return out


def meets_slo(r: RequestRecord, slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    """A one-token answer has no TPOT and is judged by its TTFT alone."""
    tpot = r.tpot
    return (r.ok and r.ttft is not None and r.ttft * 1000 <= slo_ttft_ms
            and (tpot is None or tpot * 1000 <= slo_tpot_ms))


def summarize(records: list[RequestRecord], duration: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """Rates are over the level's wall time `duration` (first request sent to last one done)."""
    done = [r for r in records if r.ok]
    prompt_tokens = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "failures": dict(Counter(r.failure() for r in records if not r.ok)),
        "duration_s": round(duration, 3),
        "requests_per_s": round(len(done) / duration, 3),
        "output_tokens_per_s": round(sum(r.output_tokens for r in done) / duration, 2),
        "goodput_requests_per_s": round(sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in done) / duration, 3),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "prompt_tokens_mean": round(float(np.mean(prompt_tokens)), 1) if prompt_tokens else None,
        "output_tokens_mean": round(float(np.mean([r.output_tokens for r in done])), 1) if done else None,
        "ttft_ms": percentiles([r.ttft for r in done if r.ttft is not None], 1000),
        "tpot_ms": percentiles([r.tpot for r in done if r.tpot is not None], 1000),
        "e2e_ms": percentiles([r.e2e for r in done], 1000),
    }


def _per_token(joules: float, tokens: int) -> float | None:
    return round(joules / tokens, 6) if tokens else None


def server_energy(before: dict, after: dict, output_tokens: int) -> dict:
    """A leanserve server's energy over a level, from its /metrics counters read before and
    after: `{"total_j", "idle_j", "energy_source"}` each time (idle is energy between engine
    steps, part of the total)."""
    total, idle = after["total_j"] - before["total_j"], after["idle_j"] - before["idle_j"]
    return {"energy_source": after["energy_source"], "active_j": round(total - idle, 4), "idle_j": round(idle, 4),
            "total_j": round(total, 4), "j_per_output_token": _per_token(total, output_tokens),
            "active_j_per_output_token": _per_token(total - idle, output_tokens)}


def pid_energy(joules: float, cpu_seconds: float, output_tokens: int, **about) -> dict:
    """The CPU-time estimate of the measured processes over a level: it cannot tell active
    from idle time, so all of it is the total. `about`: pids, watts per core and per GB."""
    return {"energy_source": "estimate", "active_j": None, "idle_j": None, "total_j": round(joules, 4),
            "j_per_output_token": _per_token(joules, output_tokens), "cpu_s": round(cpu_seconds, 3), **about}


def level_name(level: dict) -> str:
    return f"c={level['concurrency']}" if level.get("concurrency") else f"rate={level['request_rate']:g}/s"


def level_value(level: dict) -> float:
    return level.get("concurrency") or level["request_rate"]


def _triple(stats: dict | None) -> str:
    return "-" if stats is None else " / ".join(f"{stats[f'p{q}']:.0f}" for q in PERCENTILES)


def format_table(levels: list[dict]) -> str:
    head = (f"{'level':>10} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>9} {'goodput':>8}"
            f" {'TTFT p50/90/99 ms':>22} {'TPOT p50/90/99 ms':>20} {'E2E p50/90/99 ms':>22}")
    rows = [head]
    for level in levels:
        s = level["summary"]
        rows.append(f"{level_name(level):>10} {s['completed']:5d} {s['failed']:5d} {s['requests_per_s']:7.2f}"
                    f" {s['output_tokens_per_s']:9.1f} {s['goodput_requests_per_s']:8.2f}"
                    f" {_triple(s['ttft_ms']):>22} {_triple(s['tpot_ms']):>20} {_triple(s['e2e_ms']):>22}")
        if s["failures"]:
            rows.append(f"{'':>10} failures: {s['failures']}")
    energy = format_energy(levels)
    return "\n".join(rows) + ("\n\n" + energy if energy else "")


ENERGY_SOURCES = {"server": "server /metrics", "pid": "CPU time of pids"}


def format_energy(levels: list[dict]) -> str:
    """One row per level and way of measuring; empty when nothing was measured."""
    rows = [f"{'level':>10} {'measured by':>18} {'source':>10} {'active J':>10} {'idle J':>10} {'total J':>10}"
            f" {'J/out tok':>10}"]
    for level in levels:
        for key, what in ENERGY_SOURCES.items():
            e = (level["summary"].get("energy") or {}).get(key)
            if e:
                rows.append(f"{level_name(level):>10} {what:>18} {e['energy_source']:>10} {_num(e['active_j']):>10}"
                            f" {_num(e['idle_j']):>10} {_num(e['total_j']):>10} {_num(e['j_per_output_token'], 4):>10}")
    return "\n".join(rows) if len(rows) > 1 else ""


def plot(result: dict, path: str) -> None:
    """Output tok/s, TTFT p50 and TPOT p50 against the load level, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    levels = result["levels"]
    xs = [level_value(lv) for lv in levels]
    xlabel = "concurrency" if levels[0].get("concurrency") else "request rate (req/s)"

    def p50(key):
        return [None if lv["summary"][key] is None else lv["summary"][key]["p50"] for lv in levels]

    panels = [("output tokens/s", [lv["summary"]["output_tokens_per_s"] for lv in levels]),
              ("TTFT p50 (ms)", p50("ttft_ms")), ("TPOT p50 (ms)", p50("tpot_ms"))]
    for key, what in ENERGY_SOURCES.items():
        joules = [_j_per_token(key)(lv["summary"]) for lv in levels]
        if any(j is not None for j in joules):
            panels.append((f"J / output token ({what})", joules))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), layout="constrained")
    for ax, (title, ys) in zip(axes, panels):
        ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=result.get("label") or None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_xticks(xs)
        top = max((y for y in ys if y is not None), default=0)
        ax.set_ylim(0, 1.1 * top or 1)
        ax.grid(alpha=0.3)
    if result.get("label"):
        axes[0].legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


COMPARED = [("out tok/s", lambda s: s["output_tokens_per_s"]), ("req/s", lambda s: s["requests_per_s"]),
            ("goodput", lambda s: s["goodput_requests_per_s"]),
            ("TTFT p50 ms", lambda s: s["ttft_ms"] and s["ttft_ms"]["p50"]),
            ("TPOT p50 ms", lambda s: s["tpot_ms"] and s["tpot_ms"]["p50"]),
            ("E2E p50 ms", lambda s: s["e2e_ms"] and s["e2e_ms"]["p50"])]


def _j_per_token(key: str):
    return lambda s: ((s.get("energy") or {}).get(key) or {}).get("j_per_output_token")


ENERGY_COMPARED = [("J/tok server", _j_per_token("server")), ("J/tok pid", _j_per_token("pid"))]


def compare(a: dict, b: dict) -> str:
    """A's and B's metrics side by side with the ratio A/B, for each load level both ran."""
    name_a, name_b = a.get("label") or "A", b.get("label") or "B"
    b_levels = {level_name(lv): lv for lv in b["levels"]}
    rows = [f"A = {name_a}: {a['command']}", f"B = {name_b}: {b['command']}",
            f"{'level':>10} {'metric':>12} {name_a[:12]:>12} {name_b[:12]:>12} {'A/B':>7}"]
    for level in a["levels"]:
        other = b_levels.get(level_name(level))
        if other is None:
            continue
        for metric, get in COMPARED + ENERGY_COMPARED:
            va, vb = get(level["summary"]), get(other["summary"])
            energy = (metric, get) in ENERGY_COMPARED
            if energy and va is None and vb is None:
                continue  # neither run measured it that way
            digits = 4 if energy else 2
            ratio = f"{va / vb:7.2f}" if va is not None and vb else f"{'-':>7}"
            rows.append(f"{level_name(level):>10} {metric:>12} {_num(va, digits):>12} {_num(vb, digits):>12} {ratio}")
    if len(rows) == 3:
        rows.append("no load level in common")
    return "\n".join(rows)


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
