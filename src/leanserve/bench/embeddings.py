"""`leanserve bench embeddings`: embeddings/s of our encoder and of sentence-transformers, side by side.

Both embed the same texts in one process with the same torch threads, from text to
normalised vectors (tokenizing included): leanserve's EmbeddingModel (tokenize, truncate,
embed) and `SentenceTransformer.encode` with `batch_size` = the batch. Short texts are
generated sentences of 4 to 40 words; long ones run past the model's 256 tokens and are
cut to it by both. Each (kind, batch) alternates the two `--repeats` times; medians and
ratios are reported, with the lowest cosine between the two outputs as a check that both
did the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from ..cli import HelpFormatter
from ..rag.embed import EmbeddingModel, builtin_embedding_model_path
from .loadgen import machine_info

SUBJECTS = ["The payment service", "A new customer", "Our retrieval index", "The night shift", "This quarterly report",
            "Every vector store", "The model server", "A late delivery", "The support team", "Her first invoice"]
VERBS = ["flagged", "approved", "rejected", "summarised", "delayed", "indexed", "answered", "doubled", "moved", "checked"]
OBJECTS = ["the transfer", "three suspicious logins", "a refund of 40 euros", "the carbon budget", "every chunk",
           "the monthly bill", "an old contract", "the latency target", "the shipping address", "a duplicate order"]
TAILS = ["before noon", "after the outage", "without asking anyone", "because the rules changed", "on Friday",
         "in Lisbon", "for the third time this week", "while the batch job was running", "with great care", ""]


def sentence(rng: random.Random, words: int) -> str:
    parts = []
    while len(" ".join(parts).split()) < words:
        parts.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}".strip())
    return " ".join(" ".join(parts).split()[:words]).rstrip(",") + "."


def make_texts(kind: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, rng.randint(4, 40) if kind == "short" else 320) for _ in range(n)]


def _ours(model: EmbeddingModel, texts: list[str]) -> torch.Tensor:
    return model.embed([model.truncate(ids) for ids in model.tokenize(texts)])


def _timed(fn, texts) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(texts)
    return len(texts) / (time.perf_counter() - start), out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="leanserve bench embeddings", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: the built-in all-MiniLM-L6-v2)")
    ap.add_argument("--dtype", default="auto", help="our encoder's dtype: auto (bf16 only where the CPU has bf16 "
                    "products), float32 or bfloat16; sentence-transformers runs float32")
    ap.add_argument("--batch-sizes", default="1,32,256", help="texts per call, comma-separated")
    ap.add_argument("--kinds", default="short,long", help="short (4-40 words) and/or long (cut to the model's length)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each side per case; medians reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer  # test-only dependency: imported when benchmarking

    path = args.model or builtin_embedding_model_path()
    ours = EmbeddingModel(path, args.dtype)
    reference = SentenceTransformer(path, device="cpu")
    sides = {"leanserve": lambda texts: _ours(ours, texts),
             "sentence_transformers": lambda texts: reference.encode(texts, batch_size=len(texts), convert_to_tensor=True)}
    cases = []
    for kind in args.kinds.split(","):
        for batch in map(int, args.batch_sizes.split(",")):
            texts = make_texts(kind, batch, seed=batch)
            runs: dict[str, list[float]] = {side: [] for side in sides}
            outs = {side: fn(texts) for side, fn in sides.items()}  # warm-up
            for _ in range(args.repeats):
                for side, fn in sides.items():
                    rate, outs[side] = _timed(fn, texts)
                    runs[side].append(rate)
            med = {side: statistics.median(r) for side, r in runs.items()}
            cosine = torch.nn.functional.cosine_similarity(outs["leanserve"].double(),
                                                           outs["sentence_transformers"].double()).min().item()
            tokens = sum(len(ours.truncate(ids)) for ids in ours.tokenize(texts)) / batch
            case = {"kind": kind, "batch": batch, "mean_tokens": round(tokens, 1),
                    "embeddings_per_s": {k: round(v, 1) for k, v in med.items()},
                    "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                    "ratio": round(med["leanserve"] / med["sentence_transformers"], 2), "min_cosine": cosine}
            cases.append(case)
            print(f"{kind:5s} batch {batch:4d} ({tokens:5.1f} tok): leanserve {med['leanserve']:8.1f}/s  "
                  f"sentence-transformers {med['sentence_transformers']:8.1f}/s  ratio {case['ratio']:.2f}  "
                  f"min cos {cosine:.7f}", flush=True)
    result = {"bench": "embeddings", "argv": argv, "model": ours.name, "dtype": str(ours.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "repeats": args.repeats, "machine": machine_info(), "cases": cases}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
