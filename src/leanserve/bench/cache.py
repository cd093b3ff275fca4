"""`leanserve bench cache`: is a semantic cache hit the answer to the question asked?

A labelled set of question pairs (bench/data/paraphrases.jsonl, written for leanserve,
Apache-2.0 like the project: 50 paraphrase pairs and 50 pairs on the same topic that ask
something else, e.g. enable vs disable) is embedded with the server's embedding model. For
each threshold: the hit rate (paraphrase pairs that would hit) and the precision of hits
(hits that are true paraphrases). Then, with `--serve`, the set is replayed against a real
server with `--response-cache semantic`: each pair's first question, then its second, and
the second's latency and saved joules, hit or miss.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from ..progress import Progress

DATA = os.path.join(os.path.dirname(__file__), "data", "paraphrases.jsonl")


def load_pairs(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(rows, 1):
        if not (isinstance(r.get("a"), str) and isinstance(r.get("b"), str) and isinstance(r.get("paraphrase"), bool)):
            raise ValueError(f"{path}:{i}: expected {{\"a\": str, \"b\": str, \"paraphrase\": bool}}")
    return rows


def similarities(pairs: list[dict], model_path: str | None) -> np.ndarray:
    from ..rag.embed import EmbeddingModel

    model = EmbeddingModel(model_path) if model_path else EmbeddingModel.builtin()
    a = model.embed(model.tokenize([p["a"] for p in pairs])).numpy()
    b = model.embed(model.tokenize([p["b"] for p in pairs])).numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def sweep(sim: np.ndarray, labels: np.ndarray, thresholds: list[float]) -> list[dict]:
    rows = []
    for t in thresholds:
        hit = sim >= t
        true_hits = int((hit & labels).sum())
        rows.append({"threshold": round(t, 3), "hit_rate": round(true_hits / max(int(labels.sum()), 1), 4),
                     "precision": round(true_hits / int(hit.sum()), 4) if hit.any() else None,
                     "false_hits": int((hit & ~labels).sum())})
    return rows


def suggest(rows: list[dict], min_precision: float) -> dict | None:
    """The lowest threshold from which on every threshold's precision is >= min_precision."""
    ok = None
    for row in reversed(rows):
        if row["precision"] is not None and row["precision"] < min_precision:
            break
        ok = row
    return ok


def replay(pairs: list[dict], threshold: float, max_tokens: int, server_args: list[str]) -> dict:
    import httpx

    from .retrieval import StartedServer

    server = StartedServer(["--response-cache", "semantic", "--cache-threshold", str(threshold), *server_args])
    hits, misses, saved, wrong = [], [], [], 0
    progress = Progress(len(pairs), "bench cache replay")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            model = http.get("/v1/models").json()["data"][0]["id"]

            def ask(text):
                started = time.perf_counter()
                r = http.post("/v1/chat/completions", json={"model": model, "temperature": 0, "max_tokens": max_tokens,
                                                            "messages": [{"role": "user", "content": text}]})
                r.raise_for_status()
                return time.perf_counter() - started, r.json()["usage"]["leanserve"]

            for pair in pairs:
                ask(pair["a"])
                seconds, bill = ask(pair["b"])
                cache = bill.get("cache", {})
                if cache.get("type") == "semantic":
                    hits.append(seconds)
                    saved.append(cache["saved_joules"])
                    wrong += not pair["paraphrase"]
                else:
                    misses.append(seconds)
                progress.advance()
    finally:
        progress.close()
        server.stop()
    return {"threshold": threshold, "requests": 2 * len(pairs), "semantic_hits": len(hits), "wrong_hits": wrong,
            "hit_p50_ms": round(1000 * statistics.median(hits), 2) if hits else None,
            "miss_p50_ms": round(1000 * statistics.median(misses), 2) if misses else None,
            "saved_joules_per_hit": round(statistics.mean(saved), 3) if saved else None}


def plot(rows: list[dict], path: str, default: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [r["hit_rate"] for r in rows], label="hit rate (paraphrases found)")
    ax.plot(xs, [r["precision"] for r in rows], label="precision of hits")
    ax.axvline(default, color="grey", linestyle=":", label=f"default {default:g}")
    ax.set_xlabel("cosine similarity threshold")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    ax.set_title("semantic cache on the paraphrase set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from ..router.cache import DEFAULT_SEMANTIC_THRESHOLD

    ap = argparse.ArgumentParser(prog="leanserve bench cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=DATA, help="JSONL of {a, b, paraphrase} (default: the shipped set)")
    ap.add_argument("--embedding-model", default=None, metavar="PATH", help="default: the built-in all-MiniLM-L6-v2")
    ap.add_argument("--min-precision", type=float, default=0.95)
    ap.add_argument("--serve", action="store_true", help="also replay the set against a server at the threshold")
    ap.add_argument("--threshold", type=float, default=DEFAULT_SEMANTIC_THRESHOLD, help="the replay's threshold")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--server-args", default="--dtype float32", help="more `leanserve serve` options for the replay")
    ap.add_argument("--plot", default=None, metavar="FILE.png")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    pairs = load_pairs(args.pairs)
    labels = np.array([p["paraphrase"] for p in pairs])
    sim = similarities(pairs, args.embedding_model)
    rows = sweep(sim, labels, [round(0.8 + 0.01 * i, 2) for i in range(19)])
    best = suggest(rows, args.min_precision)
    print(f"{len(pairs)} pairs ({int(labels.sum())} paraphrases); similarity of paraphrases median "
          f"{np.median(sim[labels]):.3f}, of the others median {np.median(sim[~labels]):.3f}, max {sim[~labels].max():.3f}")
    print(f"{'threshold':>9} {'hit rate':>9} {'precision':>9} {'false hits':>10}")
    for r in rows:
        print(f"{r['threshold']:>9.2f} {r['hit_rate']:>9.2f} {r['precision'] if r['precision'] is not None else '-':>9} "
              f"{r['false_hits']:>10}")
    if best:
        print(f"suggested: {best['threshold']:g} (precision >= {args.min_precision:g} from there up; hit rate "
              f"{best['hit_rate']:.2f})")
    clean = next((r for r in rows if r["false_hits"] == 0), None)
    if clean:
        print(f"lowest threshold with no false hit: {clean['threshold']:g} (hit rate {clean['hit_rate']:.2f}); the "
              "default is chosen this way: half of this set are paraphrases, real traffic has far fewer, so its "
              "precision at a threshold is lower than here")
    result = {"pairs": len(pairs), "sweep": rows, "suggested": best, "no_false_hits": clean}
    if args.serve:
        result["replay"] = replay(pairs, args.threshold, args.max_tokens, args.server_args.split())
        print("replay:", json.dumps(result["replay"]))
    if args.plot:
        plot(rows, args.plot, args.threshold)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
