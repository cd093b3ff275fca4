"""`leanserve bench structured`: what structured outputs (JSON schemas via llguidance) cost.

Offline, in one process, on the built-in model (or --model):
- compile time p50/p99 of every distinct schema of --schemas (default: the bundled set of 57
  realistic schemas: API payloads, forms, tool parameters, nested objects, bounded arrays,
  enums, $ref/$defs, anyOf, patterns, formats), each compiled uncached (a fresh compiler per
  repeat, its tokenizer bridge built before timing);
- while --concurrency requests (default 32) generate under --gen-schemas of them: per-token
  mask time p50/p99 (each constrained row of each step, on the mask thread) and the share of
  constrained tokens the grammar forced (fast-forwarded, appended without sampling);
- the same prompts unconstrained (ignore_eos: exactly --max-tokens each) and constrained (they
  stop when the JSON closes): output tokens/s of each, their ratio, and tokens per request.
Every timed part is repeated --repeats times and the median reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from ..cli import HelpFormatter
from ..engine.llm import LLM
from ..engine.sequence import SamplingParams
from ..engine.structured import Constraint, GrammarCompiler
from ..errors import InvalidRequest
from .offline import counting_steps, run_progress, throughput_result

SCHEMAS = os.path.join(os.path.dirname(__file__), "data", "schemas.jsonl")


def default_dtype() -> str:
    """bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX), else float32."""
    from ..kernels import cpu_flags

    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


def load_schemas(path: str) -> list[dict]:
    """`{"name", "schema"}` per line (a bare schema line is named by its line number)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                out.append(row if "schema" in row else {"name": f"line{i + 1}", "schema": row})
    return out


def _ms(seconds: float | None, digits: int = 3) -> float | None:
    return None if seconds is None else round(1000 * seconds, digits)


def _quantile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def compile_times(llm: LLM, schemas: list[dict]) -> tuple[list[float], dict[str, str]]:
    """Seconds to compile each schema on a fresh compiler (nothing cached), and the errors."""
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.grammars.vocab_size)
    compiler.tokenizer  # the tokenizer bridge, once per model: not part of a schema's time
    errors = {}
    for s in schemas:
        try:
            compiler.compile(Constraint("json", s["schema"]))
        except InvalidRequest as e:
            errors[s["name"]] = str(e)
    return list(compiler.compile_seconds.latest), errors


def prompt_for(schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Return one JSON object for a {schema['name'].replace('_', ' ')}, "
                                        f"matching this JSON schema: {json.dumps(schema['schema'])}"}]


def generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], label: str, max_tokens: int) -> dict:
    """One timed batch: output tokens/s, tokens per request, and the structured counters' deltas."""
    engine = llm.engine
    forced, constrained = engine.forced_tokens, engine.constrained_tokens
    engine.masks.mask_seconds.clear()
    with counting_steps(llm, run_progress(label, prompts, max_tokens)):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
    tokens = [len(o.token_ids) for o in outs]
    return {"tok_per_s": sum(tokens) / elapsed, "tokens_per_request": statistics.mean(tokens),
            "seconds": elapsed, "texts": [o.text for o in outs],
            "forced": engine.forced_tokens - forced, "constrained": engine.constrained_tokens - constrained,
            "mask_seconds": list(engine.masks.mask_seconds.latest)}


def _valid_json_share(texts: list[str]) -> float:
    ok = 0
    for t in texts:
        try:
            json.loads(t)
            ok += 1
        except ValueError:
            pass
    return ok / len(texts) if texts else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="leanserve bench structured", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: built-in)")
    ap.add_argument("--dtype", default=None,
                    help="bfloat16, float16 or float32 (default: bfloat16 with AVX512-BF16/AMX, else float32)")
    ap.add_argument("--schemas", default=SCHEMAS, help="JSONL of {\"name\", \"schema\"}, one distinct schema a line")
    ap.add_argument("--num-schemas", type=int, default=None, help="only the first N schemas of the file")
    ap.add_argument("--gen-schemas", type=int, default=8,
                    help="generation runs under the first N (compilable) schemas, cycled over the requests")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in the constrained/unconstrained batch")
    ap.add_argument("--max-tokens", type=int, default=128,
                    help="max output tokens per request (the unconstrained ones generate exactly this many)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each part; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", default=None, help="write the report to this file")
    args = ap.parse_args(argv)
    for name in ("gen_schemas", "concurrency", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    args.dtype = args.dtype or default_dtype()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    schemas = load_schemas(args.schemas)[:args.num_schemas]
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(64, args.concurrency), num_threads=args.threads)

    # (a) compile times, uncached
    per_run, errors = [], {}
    for _ in range(args.repeats):
        times, errors = compile_times(llm, schemas)
        per_run.append(times)
    compile_p50 = statistics.median(_quantile(t, 0.5) for t in per_run)
    compile_p99 = statistics.median(_quantile(t, 0.99) for t in per_run)

    # (b, c) the same prompts unconstrained and constrained
    usable = [s for s in schemas if s["name"] not in errors][:args.gen_schemas]
    chosen = [usable[i % len(usable)] for i in range(args.concurrency)]
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(prompt_for(s)), add_special_tokens=False) for s in chosen]
    free = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)] * len(prompts)
    bound = [SamplingParams(temperature=0, max_tokens=args.max_tokens, constraint=Constraint("json", s["schema"]))
             for s in chosen]
    llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=4)] * 2)  # warm-up
    llm.generate(prompts[:2], bound[:2])
    runs = {"unconstrained": [], "constrained": []}
    for rep in range(args.repeats):
        run = f"run {rep + 1}/{args.repeats}"
        runs["unconstrained"].append(generate(llm, prompts, free, f"bench structured unconstrained {run}",
                                              args.max_tokens))
        runs["constrained"].append(generate(llm, prompts, bound, f"bench structured constrained {run}",
                                            args.max_tokens))
    rates = {k: [r["tok_per_s"] for r in v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    con = runs["constrained"]
    mask_p50 = statistics.median(_quantile(r["mask_seconds"], 0.5) for r in con)
    mask_p99 = statistics.median(_quantile(r["mask_seconds"], 0.99) for r in con)
    forced_share = statistics.median(r["forced"] / r["constrained"] if r["constrained"] else 0.0 for r in con)
    result = {
        **throughput_result("structured", argv, args, rates, med),
        "ratio_constrained_over_unconstrained": round(med["constrained"] / med["unconstrained"], 3),
        "tokens_per_request": {k: round(statistics.median(r["tokens_per_request"] for r in v), 1)
                               for k, v in runs.items()},
        "compile_ms": {"schemas": len(schemas), "compiled": len(schemas) - len(errors),
                       "p50": _ms(compile_p50), "p99": _ms(compile_p99),
                       "runs": [{"p50": _ms(_quantile(t, 0.5)), "p99": _ms(_quantile(t, 0.99)),
                                 "max": _ms(max(t, default=None))} for t in per_run]},
        "compile_errors": errors,
        "mask_us": {"p50": _ms(mask_p50 and mask_p50 * 1000), "p99": _ms(mask_p99 and mask_p99 * 1000),
                    "masks": statistics.median(len(r["mask_seconds"]) for r in con)},
        "forced_token_share": round(forced_share, 4),
        "valid_json_share": round(_valid_json_share(con[-1]["texts"]), 3),
        "gen_schemas": [s["name"] for s in usable],
    }
    print(f"{len(schemas)} schemas ({len(errors)} refused), {args.dtype}, median of {args.repeats}:")
    c = result["compile_ms"]
    print(f"  compile (uncached)          p50 {c['p50']} ms   p99 {c['p99']} ms")
    m = result["mask_us"]
    print(f"  mask per token              p50 {m['p50']} us   p99 {m['p99']} us   ({m['masks']} masks per run)")
    print(f"  fast-forwarded (forced)     {forced_share:.1%} of constrained tokens")
    print(f"  {args.concurrency} requests under {len(usable)} schemas, max {args.max_tokens} tokens:")
    for k, v in med.items():
        print(f"  {k:27s} {v:8.1f} output tok/s   runs {[round(x, 1) for x in rates[k]]}   "
              f"{result['tokens_per_request'][k]} tokens/request")
    print(f"  constrained/unconstrained   {result['ratio_constrained_over_unconstrained']:.3f}   "
          f"(valid JSON {result['valid_json_share']:.0%})")
    for name, e in errors.items():
        print(f"  refused {name}: {e[:160]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
