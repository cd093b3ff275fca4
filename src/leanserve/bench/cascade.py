"""`leanserve bench cascade [FILE.jsonl]`: where should a small-first cascade escalate?

Each line of FILE is `{"prompt": str, "answers": [str, ...]}` (an answer is right when it
contains one of them, case-insensitively; default: bench/data/cascade_qa.jsonl, 60 short
questions written for leanserve, Apache-2.0). Every prompt is asked of the small tier (with
logprobs) and of the large tier once each, greedy; the sweep then replays the cascade's
decision at each threshold of the confidence statistic (router/cascade.py) without asking
again: accuracy, joules and latency per answer, against the large tier alone and the small
one alone. It suggests the lowest threshold whose accuracy reaches `--target` x the large
tier's, and plots accuracy and joules against the share escalated.

Tiers are OpenAI-compatible endpoints (`--small-url`, `--large-url`); a tier given as a
model path instead (`--small-model`, `--large-model`) is served here by `leanserve serve`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from ..progress import Progress
from ..router.cascade import RULES, confidence, token_logprobs

DATA = os.path.join(os.path.dirname(__file__), "data", "cascade_qa.jsonl")


def load_questions(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("prompt"), str) or not r.get("answers") or \
                not all(isinstance(a, str) for a in r["answers"]):
            raise ValueError(f"{path}:{i}: expected {{\"prompt\": str, \"answers\": [str, ...]}}")
    return rows


def correct(answer: str, references: list[str]) -> bool:
    text = answer.lower()
    return any(ref.lower() in text for ref in references)


def ask_all(url: str, model: str | None, questions: list[dict], max_tokens: int, logprobs: bool,
            label: str) -> list[dict]:
    import httpx

    out = []
    progress = Progress(len(questions), f"bench cascade {label}")
    with httpx.Client(base_url=url, timeout=600) as http:
        model = model or http.get("/models").json()["data"][0]["id"]
        for q in questions:
            started = time.perf_counter()
            r = http.post("/chat/completions", json={
                "model": model, "temperature": 0, "max_tokens": max_tokens, "logprobs": logprobs,
                "messages": [{"role": "user", "content": q["prompt"]}]})
            r.raise_for_status()
            body = r.json()
            answer = body["choices"][0]["message"].get("content") or ""
            bill = (body.get("usage") or {}).get("leanserve") or {}
            out.append({"answer": answer, "correct": correct(answer, q["answers"]),
                        "seconds": time.perf_counter() - started, "joules": bill.get("energy_joules"),
                        "logprobs": token_logprobs(body)})
            progress.advance()
    progress.close()
    return out


def sweep(small: list[dict], large: list[dict], stat: str, steps: int = 24) -> list[dict]:
    scores = [confidence(s["logprobs"], stat) for s in small]
    lo = min(scores)
    thresholds = sorted({round(lo + (0 - lo) * i / steps, 4) for i in range(steps + 1)} | {round(lo - 1e-3, 4)})
    rows = []
    for t in thresholds:
        escalate = [c < t for c in scores]
        picks = [lg if e else sm for sm, lg, e in zip(small, large, escalate)]
        joules = [sm["joules"] + (lg["joules"] if e else 0.0) for sm, lg, e in zip(small, large, escalate)
                  if sm["joules"] is not None and lg["joules"] is not None]
        seconds = [sm["seconds"] + (lg["seconds"] if e else 0.0) for sm, lg, e in zip(small, large, escalate)]
        rows.append({"threshold": t, "escalated": round(sum(escalate) / len(escalate), 4),
                     "accuracy": round(sum(p["correct"] for p in picks) / len(picks), 4),
                     "joules_per_answer": round(statistics.mean(joules), 3) if joules else None,
                     "seconds_per_answer": round(statistics.mean(seconds), 4)})
    return rows


def alone(results: list[dict]) -> dict:
    joules = [r["joules"] for r in results if r["joules"] is not None]
    return {"accuracy": round(sum(r["correct"] for r in results) / len(results), 4),
            "joules_per_answer": round(statistics.mean(joules), 3) if joules else None,
            "seconds_per_answer": round(statistics.mean(r["seconds"] for r in results), 4)}


def plot(rows: list[dict], large: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["escalated"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [r["accuracy"] for r in rows], "o-", label="cascade accuracy")
    ax.axhline(large["accuracy"], color="grey", linestyle=":", label="large tier alone")
    ax.set_xlabel("share of requests escalated")
    ax.set_ylabel("accuracy")
    if large["joules_per_answer"]:
        ax2 = ax.twinx()
        ax2.plot(xs, [r["joules_per_answer"] / large["joules_per_answer"] if r["joules_per_answer"] else None
                      for r in rows], "s--", color="tab:red", label="joules / large tier's")
        ax2.set_ylabel("joules relative to the large tier")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _tier(url: str | None, model: str | None, extra: list[str], servers: list):
    """(base URL, model name or None): an endpoint as given, or a server started here."""
    if url:
        return url.rstrip("/"), model
    from .retrieval import StartedServer

    server = StartedServer([*(["--model", model] if model else []), "--embedding-model", "none", *extra])
    servers.append(server)
    return f"{server.url}/v1", None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="leanserve bench cascade", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", default=DATA, help="JSONL of {prompt, answers} (default: the shipped set)")
    ap.add_argument("--small-url", default=None, help="the first tier's /v1 URL (default: serve --small-model here)")
    ap.add_argument("--small-model", default=None, help="its model (default: the built-in)")
    ap.add_argument("--large-url", default=None, help="the last tier's /v1 URL (default: serve --large-model here)")
    ap.add_argument("--large-model", default=None, help="its model")
    ap.add_argument("--stat", choices=RULES, default="mean")
    ap.add_argument("--target", type=float, default=0.95, help="accuracy to reach, as a share of the large tier's")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--server-args", default="--dtype float32", help="more `leanserve serve` options for served tiers")
    ap.add_argument("--plot", default=None, metavar="FILE.png")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    if not args.large_url and not args.large_model:
        ap.error("give the last tier: --large-url or --large-model")
    questions = load_questions(args.file)
    servers: list = []
    try:
        small_url, small_model = _tier(args.small_url, args.small_model, args.server_args.split(), servers)
        small = ask_all(small_url, small_model, questions, args.max_tokens, True, "small")
        large_url, large_model = _tier(args.large_url, args.large_model, args.server_args.split(), servers)
        large = ask_all(large_url, large_model, questions, args.max_tokens, False, "large")
    finally:
        for s in servers:
            s.stop()
    rows = sweep(small, large, args.stat)
    big, little = alone(large), alone(small)
    print(f"{len(questions)} questions; small alone: {json.dumps(little)}; large alone: {json.dumps(big)}")
    print(f"{'threshold':>10} {'escalated':>9} {'accuracy':>8} {'J/answer':>9} {'s/answer':>9}")
    for r in rows:
        print(f"{r['threshold']:>10.4f} {r['escalated']:>9.2f} {r['accuracy']:>8.2f} "
              f"{r['joules_per_answer'] if r['joules_per_answer'] is not None else '-':>9} {r['seconds_per_answer']:>9.3f}")
    goal = args.target * big["accuracy"]
    ok = [r for r in rows if r["accuracy"] >= goal]
    best = min(ok, key=lambda r: (r["escalated"], r["threshold"])) if ok else None
    if best:
        print(f"suggested: --cascade-rule {args.stat}:{best['threshold']:g} (accuracy {best['accuracy']:.2f} >= "
              f"{args.target:g} x the large tier's {big['accuracy']:.2f}, {best['escalated']:.0%} escalated)")
    else:
        print(f"no threshold reaches {args.target:g} x the large tier's accuracy")
    if args.plot:
        plot(rows, big, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"small": little, "large": big, "sweep": rows, "suggested": best, "stat": args.stat}, f, indent=2)
    return 0
