"""Per-request usage records: the JSONL the server writes (`--usage-log PATH`), and
`leanserve report PATH`, which totals them per model, adapter, user and prompt version and can plot
J/token and latency against batch size over time."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict

from ..bench.report import percentiles

# One JSON object per line. Times are ms; batch_size is the mean number of sequences in
# the steps the request took part in; energy_source says how joules were measured.
RECORD_FIELDS = ("time", "request_id", "model", "adapter", "user", "prompt_tokens", "completion_tokens",
                 "queue_ms", "prefill_ms", "decode_ms", "energy_joules", "carbon_grams", "cost_usd",
                 "energy_source", "batch_size")  # + "prompt" ("id@version" or null) from servers with --prompts
GROUPS = ("model", "adapter", "user", "prompt")


def usage_record(out, model: str, adapter: str | None = None, user: str | None = None,
                 prompt: str | None = None) -> dict:
    """The record of one finished engine output (a RequestOutput with its bill); `prompt` is
    "id@version" when the request used a prompt template."""
    m, bill = out.metrics, out.bill
    return {"request_id": out.request_id, "model": model, "adapter": adapter, "user": user,
            "prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "queue_ms": round(m.queue_ms, 3), "prefill_ms": round(m.prefill_ms, 3), "decode_ms": round(m.decode_ms, 3),
            **(bill.usage() if bill else {}), "batch_size": round(bill.batch_size, 3) if bill else None,
            "prompt": prompt}


class UsageLog:
    """Appends one JSON line per finished request and flushes it; safe from any thread."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        """`record` has RECORD_FIELDS; `time` (unix seconds) defaults to now."""
        line = json.dumps({"time": time.time(), **record}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def load(path: str) -> tuple[list[dict], int]:
    """The records of a usage log, and how many lines were not records (e.g. cut short)."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


def _num(record: dict, key: str) -> float:
    return record.get(key) or 0


def latency_ms(record: dict) -> float:
    return _num(record, "queue_ms") + _num(record, "prefill_ms") + _num(record, "decode_ms")


def summarize(records: list[dict], by: str) -> list[dict]:
    """One row per value of `by` (missing: "-"), then one for all records. J/token is
    over prompt and completion tokens."""
    groups = defaultdict(list)
    for r in records:
        groups[str(r.get(by) or "-")].append(r)
    rows = []
    for key, rs in sorted(groups.items()) + [("all", records)]:
        tokens = sum(_num(r, "prompt_tokens") + _num(r, "completion_tokens") for r in rs)
        joules = sum(_num(r, "energy_joules") for r in rs)
        rows.append({
            by: key, "requests": len(rs), "prompt_tokens": sum(_num(r, "prompt_tokens") for r in rs),
            "completion_tokens": sum(_num(r, "completion_tokens") for r in rs), "energy_joules": joules,
            "joules_per_token": joules / tokens if tokens else None,
            "carbon_grams": sum(_num(r, "carbon_grams") for r in rs), "cost_usd": sum(_num(r, "cost_usd") for r in rs),
            "latency_ms": percentiles([latency_ms(r) for r in rs]),
        })
    return rows


def format_table(rows: list[dict], by: str) -> str:
    head = f"{by:<24} {'requests':>8} {'prompt tok':>10} {'output tok':>10} {'J/token':>9} {'gCO2e':>10} " \
           f"{'cost USD':>10}  latency ms p50 / p90 / p99"
    lines = [head, "-" * len(head)]
    for r in rows:
        jpt = "-" if r["joules_per_token"] is None else f"{r['joules_per_token']:.4f}"
        lat = r["latency_ms"]
        lines.append(f"{r[by][:24]:<24} {r['requests']:>8} {r['prompt_tokens']:>10} {r['completion_tokens']:>10} "
                     f"{jpt:>9} {r['carbon_grams']:>10.4f} {r['cost_usd']:>10.6f}  "
                     f"{lat['p50']:.0f} / {lat['p90']:.0f} / {lat['p99']:.0f}")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """J/token and latency against batch size; colour is minutes since the first record."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    rs = [r for r in records if r.get("batch_size") and (_num(r, "prompt_tokens") + _num(r, "completion_tokens"))]
    t0 = min((_num(r, "time") for r in rs), default=0)
    minutes = [(_num(r, "time") - t0) / 60 for r in rs]
    batch = [r["batch_size"] for r in rs]
    panels = [("J/token", [_num(r, "energy_joules") / (_num(r, "prompt_tokens") + _num(r, "completion_tokens"))
                           for r in rs]),
              ("latency (ms)", [latency_ms(r) for r in rs])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, (label, ys) in zip(axes, panels):
        points = ax.scatter(batch, ys, c=minutes, cmap="viridis", s=14, alpha=0.7)
        ax.set_xlabel("mean batch size (sequences per step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.colorbar(points, ax=axes, label="minutes since the first request")
    sources = sorted({str(r.get("energy_source")) for r in rs})
    fig.suptitle(f"{len(rs)} requests; energy source: {', '.join(sources) or '-'}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leanserve report",
                                     description="totals of a usage log (leanserve serve --usage-log PATH)")
    parser.add_argument("path", help="the JSONL usage log")
    parser.add_argument("--by", choices=GROUPS, action="append", help="group by this (repeatable; default: all)")
    parser.add_argument("--plot", metavar="OUT.png", help="draw J/token and latency against batch size over time")
    args = parser.parse_args(argv)
    try:
        records, bad = load(args.path)
    except OSError as e:
        print(f"leanserve report: {e}", file=sys.stderr)
        return 1
    if bad:
        print(f"leanserve report: skipped {bad} lines that are not JSON records", file=sys.stderr)
    if not records:
        print(f"leanserve report: no records in {args.path}", file=sys.stderr)
        return 1
    sources = sorted({str(r.get("energy_source")) for r in records})
    print(f"{len(records)} requests; energy source: {', '.join(sources)}"
          + (" (estimated from CPU time and memory, not measured)" if any("estimate" in s for s in sources) else ""))
    for by in args.by or GROUPS:
        print()
        print(format_table(summarize(records, by), by))
    if args.plot:
        plot(records, args.plot)
        print(f"\nplot: {args.plot}")
    return 0
