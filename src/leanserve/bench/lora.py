"""`leanserve bench lora`: the cost of serving many LoRA adapters over one base model.

In one process, on the built-in model (or --model), with random PEFT adapters written to a
temporary folder:
- output tokens/s of N concurrent requests with no adapter, all on one adapter, and each on
  a different adapter (N adapters of rank --rank on every projection), and the ratios;
- time from registering a new adapter (rank --cold-rank, read from its file) to its first
  token, from a resident adapter to its first token, and the base model's for comparison;
- memory per resident adapter (its slot in the stacked tensors with any int8 scales, and its
  file); --factor-dtype chooses the stacks' dtype (default: int8 under a bfloat16 model).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from ..engine import lora as lora_mod
from ..engine.llm import LLM
from ..engine.lora import TARGETS, module_shapes
from ..engine.sequence import SamplingParams
from ..progress import Progress
from ..cli import HelpFormatter
from .offline import counting_steps, make_prompts, run_progress, throughput_result


def write_random_adapter(folder: str, args, rank: int, seed: int, targets=tuple(TARGETS), alpha: float | None = None,
                         std: float = 0.02, base_model: str | None = None) -> str:
    """A PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors) with
    random A and B, for `args` (a ModelArgs). Tests and benchmarks use it."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(args)
    tensors = {}
    for layer in range(args.num_layers):
        for target in targets:
            module, part = TARGETS[target]
            d_in, outs = shapes[module]
            parent = "self_attn" if module in ("qkv", "o") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(outs[part], rank, generator=gen) * std
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": list(targets),
              "base_model_name_or_path": base_model, "bias": "none", "task_type": "CAUSAL_LM"}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def _tok_per_s(llm: LLM, prompts, output_len: int, adapters, progress: Progress | None = None) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with counting_steps(llm, progress):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, adapter=adapters)
        elapsed = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / elapsed


def _first_token_ms(llm: LLM, prompt, adapter: str | None, register: str | None = None) -> float:
    t0 = time.perf_counter()
    if register:
        llm.engine.lora.register(adapter, register)
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), adapter=adapter)
    return 1000 * (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="leanserve bench lora", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: built-in)")
    ap.add_argument("--dtype", default="bfloat16",
                    help="dtype of the weights and activations: bfloat16, float16 or float32")
    ap.add_argument("--concurrency", type=int, default=32, help="requests at once, each on its own adapter")
    ap.add_argument("--rank", type=int, default=8, help="rank of the resident adapters, on every projection")
    ap.add_argument("--cold-rank", type=int, default=16,
                    help="rank of the new adapters whose first token is timed from registering them")
    ap.add_argument("--input-len", type=int, default=128, help="tokens of every prompt (random ids)")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens of every request (ignore_eos)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each mode, and of each time to first token; the median is reported")
    ap.add_argument("--segment-min-rows", type=int, default=None,
                    help="override engine.lora.SEGMENT_MIN_ROWS (1: every run of rows its own matmuls; "
                         "a large number: every row gathered)")
    ap.add_argument("--no-native", action="store_true",
                    help="the torch ops instead of the native LoRA kernel (float32 factors)")
    ap.add_argument("--factor-dtype", default="auto", choices=["auto", "int8", "bfloat16", "float32"],
                    help="the stacked LoRA factors (auto: int8 under a bfloat16 model with the native kernel)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.segment_min_rows is not None:
        lora_mod.SEGMENT_MIN_ROWS = args.segment_min_rows
    lora_mod.NATIVE = not args.no_native

    n = args.concurrency
    root = tempfile.mkdtemp(prefix="leanserve-bench-lora-")
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(64, n), num_threads=args.threads,
              lora={"max_loras": n + 2, "max_rank": max(args.rank, args.cold_rank), "dirs": (root,),
                    "factor_dtype": args.factor_dtype})
    margs = llm.engine.model.args
    names = [f"bench-{i}" for i in range(n)]
    for i, name in enumerate(names):
        llm.engine.lora.register(name, write_random_adapter(os.path.join(root, name), margs, args.rank, seed=i))
    special = set(llm.tokenizer.all_special_ids)
    prompts = make_prompts(n, args.input_len, margs.vocab_size, special)
    _tok_per_s(llm, prompts, 4, names)  # warm-up, and every adapter into its slot
    modes = {"no_adapter": None, "one_adapter": names[0], f"{n}_adapters": names}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for k, (mode, adapters) in enumerate(modes.items()):
            # new prompts every run: no run reuses another's prefix-cached prefill
            fresh = make_prompts(n, args.input_len, margs.vocab_size, special, seed=1 + rep * len(modes) + k)
            progress = run_progress(f"bench lora {mode} run {rep + 1}/{args.repeats}", fresh, args.output_len)
            runs[mode].append(_tok_per_s(llm, fresh, args.output_len, adapters, progress))
    med = {k: statistics.median(v) for k, v in runs.items()}

    # time to first token: a new adapter read from its file, a resident one, the base model
    short = prompts[0][:16]
    cold, warm, base = [], [], []
    for i in range(args.repeats):
        path = write_random_adapter(os.path.join(root, f"cold-{i}"), margs, args.cold_rank, seed=1000 + i)
        cold.append(_first_token_ms(llm, short, f"cold-{i}", register=path))
        warm.append(_first_token_ms(llm, short, f"cold-{i}"))
        base.append(_first_token_ms(llm, short, None))
    stack = llm.engine.lora.stacks
    # one slot's factors, and for int8 factors their per-row scales
    slot_bytes = sum(s.a[0].nbytes + sum(bt[0].nbytes for bt in s.bts) +
                     (s.a_scale[0].nbytes + sum(t[0].nbytes for t in s.bt_scales) if s.a_scale is not None else 0)
                     for s in stack.values())
    file_bytes = os.path.getsize(os.path.join(root, names[0], "adapter_model.safetensors"))
    result = {
        **throughput_result("lora", argv, args, runs, med),
        "ratios": {f"{k}/no_adapter": round(med[k] / med["no_adapter"], 3) for k in med if k != "no_adapter"},
        "first_token_ms": {"new_adapter_from_file": round(statistics.median(cold), 1),
                           "resident_adapter": round(statistics.median(warm), 1),
                           "base_model": round(statistics.median(base), 1)},
        "memory_per_adapter_bytes": {"slot": slot_bytes, f"rank{args.rank}_file": file_bytes},
    }
    print(f"{n} requests x {args.input_len} in / {args.output_len} out, {args.dtype}, rank {args.rank} "
          f"on every projection, median of {args.repeats}:")
    for k, m in med.items():
        print(f"  {k:16s} {m:8.1f} output tok/s   runs {[round(x, 1) for x in runs[k]]}")
    for k, r in result["ratios"].items():
        print(f"  {k:28s} {r:.3f}")
    ft = result["first_token_ms"]
    print(f"  first token: new rank-{args.cold_rank} adapter from file {ft['new_adapter_from_file']} ms, "
          f"resident {ft['resident_adapter']} ms, base model {ft['base_model']} ms")
    print(f"  memory per resident adapter: slot {slot_bytes / 2**20:.1f} MiB "
          f"(max rank {max(args.rank, args.cold_rank)}, {str(llm.engine.lora.factor_dtype).removeprefix('torch.')}), "
          f"rank-{args.rank} file {file_bytes / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
