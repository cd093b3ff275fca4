"""`leanserve bench offline`: output tokens/s of leanserve and of transformers, side by side.

The same N prompts (random token ids, distinct per prompt, fixed seed) of a given input
length each generate a fixed number of tokens (ignore_eos) in three ways, in one process:
leanserve (all prompts handed to the engine at once), transformers `generate` one request at
a time, and transformers `generate` on one static padded batch. Each is repeated and the
median reported, with leanserve's ratio to each baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from ..engine.engine import DTYPES
from ..engine.llm import LLM
from .loadgen import machine_info
from ..engine.sequence import SamplingParams
from ..progress import Progress
from ..cli import HelpFormatter


def make_prompts(n: int, length: int, vocab: int, special: set[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        prompts.append([t if t not in special else t + 1 for t in ids])
    return prompts


def run_progress(label: str, prompts, output_len: int) -> Progress:
    """The progress line of one timed run: requests done of `prompts`, each `output_len` tokens."""
    return Progress(len(prompts), label, total_tokens=len(prompts) * output_len)


@contextlib.contextmanager
def counting_steps(llm: LLM, progress: Progress | None):
    """Counts the engine's finished requests and new tokens into `progress` as `llm.generate`
    steps it (the engine's own `step`, wrapped on the instance for the duration); closes it."""
    if progress is None:
        yield
        return
    step = llm.engine.step

    def counted():
        outs = step()
        progress.advance(sum(1 for o in outs if o.finished), tokens=sum(len(o.token_ids) for o in outs))
        return outs

    llm.engine.step = counted
    try:
        yield
    finally:
        del llm.engine.step  # the class's method again
        progress.close()


def run_leanserve(llm: LLM, prompts, output_len: int, progress: Progress | None = None) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with counting_steps(llm, progress):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / elapsed


def load_transformers(model: str | None, dtype: torch.dtype):
    """The reference model from the same weights (the GGUF through transformers' own reader)."""
    import os

    from transformers import AutoModelForCausalLM

    from ..models.loader import model_path

    path = model_path(model)
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def run_hf(hf, prompts, output_len: int, batched: bool, progress: Progress | None = None) -> float:
    """`progress` advances per prompt one at a time, and once at the end of the static batch."""
    def gen(batch):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                          min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        tokens = (out.shape[1] - width) * len(batch)
        if progress:
            progress.advance(len(batch), tokens=tokens)
        return tokens

    t0 = time.perf_counter()
    tokens = gen(prompts) if batched else sum(gen([p]) for p in prompts)
    rate = tokens / (time.perf_counter() - t0)
    if progress:
        progress.close()
    return rate


def throughput_result(bench: str, argv: list[str] | None, args, runs: dict[str, list[float]],
                      med: dict[str, float]) -> dict:
    """What every throughput benchmark's JSON starts with: the command, the machine, the
    configuration, and output tokens/s per system (median and every run)."""
    return {
        "command": f"leanserve bench {bench} " + " ".join(argv if argv is not None else []),
        "machine": {**machine_info(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": vars(args),
        "output_tokens_per_s": {k: {"median": round(med[k], 1), "runs": [round(x, 1) for x in v]}
                                for k, v in runs.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="leanserve bench offline", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: built-in)")
    ap.add_argument("--num-prompts", type=int, default=32,
                    help="prompts of a run, all handed to leanserve at once and to the static batch")
    ap.add_argument("--input-len", type=int, default=128, help="tokens of every prompt (random ids)")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens of every prompt (ignore_eos)")
    ap.add_argument("--dtype", default="bfloat16",
                    help="dtype of the weights and activations: bfloat16, float16 or float32")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each system; the median is reported")
    ap.add_argument("--serial-prompts", type=int, default=4,
                    help="prompts for the one-at-a-time transformers baseline (it is slow)")
    ap.add_argument("--no-baselines", action="store_true", help="leanserve only")
    ap.add_argument("--quantization", choices=["int8", "int4", "auto", "w8a8"], default=None,
                    help="leanserve's linear layers, as `leanserve serve --quantization` (default: none)")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="leanserve: sequences in one step (default: the engine's)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="leanserve: tokens (prefill chunks + decodes) in one step (default: the engine's)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    engine_kw = {k: v for k, v in (("max_num_seqs", args.max_num_seqs), ("quantization", args.quantization),
                                    ("max_num_batched_tokens", args.max_num_batched_tokens)) if v}
    llm = LLM(args.model, dtype=args.dtype, **engine_kw)
    tok = llm.tokenizer
    prompts = make_prompts(args.num_prompts, args.input_len, llm.engine.model.args.vocab_size,
                           set(tok.all_special_ids))
    run_leanserve(llm, prompts[:2], 4)  # warm-up
    runs: dict[str, list[float]] = {"leanserve": []}
    hf = None
    if not args.no_baselines:
        hf = load_transformers(args.model, DTYPES[args.dtype])
        runs["transformers_serial"], runs["transformers_static_batch"] = [], []
    serial = prompts[:args.serial_prompts]
    for rep in range(args.repeats):
        run = f"run {rep + 1}/{args.repeats}"
        runs["leanserve"].append(run_leanserve(
            llm, prompts, args.output_len, run_progress(f"bench offline leanserve {run}", prompts, args.output_len)))
        if hf is not None:
            runs["transformers_serial"].append(run_hf(
                hf, serial, args.output_len, False,
                run_progress(f"bench offline transformers_serial {run}", serial, args.output_len)))
            runs["transformers_static_batch"].append(run_hf(
                hf, prompts, args.output_len, True,
                run_progress(f"bench offline transformers_static_batch {run}", prompts, args.output_len)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        **throughput_result("offline", argv, args, runs, med),
        "ratios": {f"leanserve/{k}": round(med["leanserve"] / med[k], 2) for k in med if k != "leanserve"},
    }
    print(f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, {args.dtype}, "
          f"median of {args.repeats}:")
    for k, m in med.items():
        print(f"  {k:28s} {m:8.1f} output tok/s   runs {[round(x, 1) for x in runs[k]]}")
    for k, r in result["ratios"].items():
        print(f"  {k:40s} {r:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
