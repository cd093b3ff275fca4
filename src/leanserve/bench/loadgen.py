"""`leanserve bench serve`: latency and throughput of any OpenAI-compatible server under load.

The same tool measures leanserve, llama.cpp's llama-server or vLLM. Each load level sends
`--num-prompts` streamed requests, either closed loop (`--concurrency C`: C clients, each
sending its next request when the previous one ends) or open loop (`--request-rate R`:
Poisson arrivals). SSE is read directly with aiohttp (its C HTTP parser), so every chunk is
timed on arrival and the client takes little of the CPU it shares with a server on the same
machine: with httpx it took ~80% of a core at 64 streams, on a 2-core machine.
A bearer key, if the server wants one, is read from $OPENAI_API_KEY (never from the
command line, which is saved with the results).

Prompts are runs of words that are one token each in the built-in model's tokenizer (or
`--tokenizer`), so a prompt is exactly `--input-len` tokens as the server counts them. Every
prompt starts with a word of its own, so no two share a cached prefix, except the
`--shared-prefix-len` tokens all of them share when asked. Each level gets fresh prompts, so
a level never reuses what the previous one left in the server's prefix cache.

Energy, per level, as joules per output token: a leanserve server's own figure, read from
its /metrics counters before and after (found automatically); and, for any server on this
machine, `--measure-pid PID`: the CPU time and memory of that process and its children,
costed by leanserve's estimate meter (energy/meters.py), so that leanserve, llama-server
and vLLM are compared on the same footing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shlex
import sys
import time
from datetime import datetime, timezone

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..energy.meters import DEFAULT_WATTS_PER_GB, ProcessesMeter
from ..progress import Progress
from ..cli import HelpFormatter
from . import report
from .report import RequestRecord

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_WORD = re.compile(r" [a-z]{2,}")


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("every level must be >= 1")
    return values


def _rate_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError("every rate must be > 0")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="leanserve bench serve", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    ap.add_argument("--endpoint", choices=list(ENDPOINTS), default="completions",
                    help="completions: POST /v1/completions; chat: POST /v1/chat/completions")
    ap.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, default=None,
                      help="closed loop: clients per level, e.g. 1,8,32 (default: 1)")
    load.add_argument("--request-rate", type=_rate_list, default=None,
                      help="open loop: Poisson arrivals, req/s per level, e.g. 1,4")
    ap.add_argument("--num-prompts", type=int, default=32, help="requests per level")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens (for chat: of the message content)")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens of every request (ignore_eos)")
    ap.add_argument("--shared-prefix-len", type=int, default=0, help="leading prompt tokens all requests share")
    ap.add_argument("--token-ids", action="store_true", help="send prompts as token ids (completions only)")
    ap.add_argument("--tokenizer", default=None, help="a .gguf file or HF folder (default: the built-in model's)")
    ap.add_argument("--response-format", choices=["json_object", "json_schema"], default=None,
                    help="run every level twice, unconstrained then under this response_format (same prompts, "
                         "no ignore_eos when constrained), and report the ratios and the server's mask times")
    ap.add_argument("--schema", default=None, metavar="FILE",
                    help="a JSON schema file for --response-format json_schema (strict; implies json_schema)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput: TTFT at most this")
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput: TPOT at most this")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take in all")
    ap.add_argument("--seed", type=int, default=0,
                    help="the same seed gives the same prompts: against a server that ran them before,"
                         " its prefix cache will serve them (the level then reports its hit rate)")
    ap.add_argument("--label", default=None, help="name of this run in tables, plots and comparisons")
    ap.add_argument("--json", default=None, metavar="PATH", help="write results, command and machine here")
    ap.add_argument("--plot", default=None, metavar="PATH.png", help="plot tok/s, TTFT and TPOT against load")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                    help="print the ratios A/B of two saved runs per load level, and run nothing")
    energy = ap.add_argument_group("energy (a leanserve server's /metrics are read without asking)")
    energy.add_argument("--measure-pid", type=int, action="append", default=None, metavar="PID",
                        help="estimate the energy of this server process (repeatable) from its CPU time and "
                             "memory, as leanserve's estimate meter does; works for any server on this machine")
    energy.add_argument("--no-measure-children", dest="measure_children", action="store_false",
                        help="count only the given pids, not their child processes")
    energy.add_argument("--watts-per-core", type=float, default=None,
                        help="--measure-pid: W per busy core (default: the CPU model's TDP per core, else 10)")
    energy.add_argument("--watts-per-gb", type=float, default=DEFAULT_WATTS_PER_GB,
                        help="--measure-pid: W per GB of resident memory")
    args = ap.parse_args(argv)
    if args.request_rate is None and args.concurrency is None:
        args.concurrency = [1]
    for name in ("num_prompts", "input_len", "output_len", "timeout"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.shared_prefix_len < args.input_len:
        ap.error("--shared-prefix-len must be >= 0 and smaller than --input-len")
    if args.token_ids and args.endpoint != "completions":
        ap.error("--token-ids needs --endpoint completions")
    if args.schema and args.response_format is None:
        args.response_format = "json_schema"
    if args.response_format == "json_schema" and not args.schema:
        ap.error("--response-format json_schema needs --schema FILE")
    if args.schema and args.response_format != "json_schema":
        ap.error("--schema goes with --response-format json_schema")
    if (args.watts_per_core is not None and args.watts_per_core < 0) or args.watts_per_gb < 0:
        ap.error("--watts-per-core and --watts-per-gb must be >= 0")
    return args


# -- prompts ----------------------------------------------------------------------------------

def load_tokenizer(path: str | None):
    """Only the tokenizer: no weights are loaded."""
    from ..models.loader import model_path
    from ..models.tokenizer import Tokenizer

    path = model_path(path)
    if os.path.isdir(path):
        return Tokenizer.from_hf_folder(path)
    if not (os.path.isfile(path) and path.endswith(".gguf")):
        raise ValueError(f"{path}: not a .gguf file or a Hugging Face folder")
    return Tokenizer.from_gguf(path)


def one_token_words(tokenizer) -> list[int]:
    """Ids of lowercase words with a leading space that encode back to exactly themselves:
    any run of them tokenizes to the same ids, one per word."""
    ids = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.token_text(i)
        if i not in tokenizer.all_special_ids and _WORD.fullmatch(text) and \
                tokenizer.encode(text, add_special_tokens=False) == [i]:
            ids.append(i)
    if not ids:
        raise ValueError("the tokenizer has no one-token words (' word'); prompts cannot be calibrated")
    return ids


def make_prompts(words: list[int], count: int, length: int, shared_len: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` word ids: `shared_len` common ones, then one word unique to
    the prompt (the word pool is large: ~20k for the built-in model), then random ones."""
    if count > len(words):
        raise ValueError(f"{count} distinct prompts need more than the tokenizer's {len(words)} one-token words")
    rng = random.Random(seed)
    firsts = rng.sample(words, count)
    shared = rng.choices(words, k=shared_len)
    return [shared + [first] + rng.choices(words, k=length - shared_len - 1) for first in firsts]


def prompt_payloads(tokenizer, args, count: int) -> list[str | list[int]]:
    """Text whose encoding (special tokens included, as the server encodes it) is exactly
    --input-len tokens; or the ids themselves with --token-ids."""
    specials = 0 if args.token_ids else len(tokenizer.encode(""))
    if specials >= args.input_len or (args.shared_prefix_len and specials > args.shared_prefix_len):
        raise ValueError(f"the tokenizer adds {specials} special tokens: more than the lengths asked for")
    ids = make_prompts(one_token_words(tokenizer), count, args.input_len - specials,
                       max(args.shared_prefix_len - specials, 0), args.seed)
    if args.token_ids:
        return ids
    texts = [tokenizer.decode(p) for p in ids]
    if any(len(tokenizer.encode(t)) != args.input_len for t in texts):
        raise ValueError("the prompt text does not encode to --input-len tokens with this tokenizer")
    return texts


def response_format(args) -> dict | None:
    """The request's response_format from --response-format and --schema (None: unconstrained)."""
    if args.response_format is None:
        return None
    if args.response_format == "json_object":
        return {"type": "json_object"}
    with open(args.schema) as f:
        schema = json.load(f)
    name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(args.schema))[0])[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def request_body(args, model: str, prompt: str | list[int], constraint: dict | None = None) -> dict:
    """Exactly --output-len tokens: ignore_eos and min_tokens are the vLLM/leanserve extensions.
    With a `constraint` (a response_format) neither: the answer ends when its JSON closes."""
    body = {"model": model, "max_tokens": args.output_len, "min_tokens": args.output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if constraint is not None:
        del body["min_tokens"], body["ignore_eos"]
        body["response_format"] = constraint
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


# -- requests ---------------------------------------------------------------------------------

async def send(client: aiohttp.ClientSession, url: str, body: dict, timeout: float, index: int,
               t0: float) -> RequestRecord:
    """One streamed request, cut off after `timeout` seconds in all."""
    start = time.perf_counter()
    record = RequestRecord(index=index, start=start - t0)
    try:
        await asyncio.wait_for(_stream(client, url, body, record, start), timeout)
    except asyncio.TimeoutError:
        record.error = "timeout"
    except aiohttp.ClientError as e:
        record.error = type(e).__name__
    except json.JSONDecodeError:
        record.error = "malformed SSE data"
    record.e2e = time.perf_counter() - start
    return record


async def _stream(client: aiohttp.ClientSession, url: str, body: dict, record: RequestRecord, start: float) -> None:
    """Fills `record` from the SSE stream. Output tokens come from the final usage chunk;
    servers that send none get their text chunks counted instead."""
    async with client.post(url, json=body) as response:
        record.status = response.status
        if response.status != 200:
            record.error = _error_message(await response.read())
            return
        chunks, usage, finished = 0, None, False
        async for raw in response.content:  # one line at a time
            if not raw.startswith(b"data:"):
                continue
            data = raw[5:].strip().decode()
            if data == "[DONE]":
                finished = True
                break
            event = json.loads(data)
            if "error" in event:
                record.error = _error_message(data.encode())
                return
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    chunks += 1
                    if record.ttft is None:
                        record.ttft = time.perf_counter() - start
                finished = finished or choice.get("finish_reason") is not None
        if not finished:
            record.error = "stream ended early"
        usage = usage or {}
        record.output_tokens = usage.get("completion_tokens", chunks)
        record.prompt_tokens = usage.get("prompt_tokens")


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]


async def _tick(progress: Progress) -> None:
    """A line every `progress.every` seconds even while no request finishes."""
    while True:
        await asyncio.sleep(progress.every)
        progress.tick()


async def run_level(client: aiohttp.ClientSession, url: str, bodies: list[dict], timeout: float,
                    concurrency: int | None, rate: float | None, seed: int,
                    progress: Progress | None = None) -> tuple[list[RequestRecord], float]:
    """All `bodies` at one load level (`rate` None: closed loop of `concurrency` clients);
    returns their records, in order, and the wall time. `progress` counts finished requests
    and their output tokens, and is closed at the end."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        record = await send(client, url, bodies[i], timeout, i, t0)
        records.append(record)
        if progress:
            progress.advance(1, tokens=record.output_tokens if record.ok else 0)

    ticker = asyncio.create_task(_tick(progress)) if progress else None
    try:
        if rate is None:
            pending = iter(range(len(bodies)))  # shared: each client takes the next request

            async def client_loop() -> None:
                for i in pending:
                    await one(i)

            await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(bodies)))))
        else:
            gaps = random.Random(seed)
            tasks = []
            for i in range(len(bodies)):
                if i:
                    await asyncio.sleep(gaps.expovariate(rate))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
    finally:
        if ticker:
            ticker.cancel()
            progress.close()
    return sorted(records, key=lambda r: r.index), time.perf_counter() - t0


# -- energy -----------------------------------------------------------------------------------

async def _get(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url, raise_for_status=True) as response:
        return await response.text()


async def server_counters(client: aiohttp.ClientSession, base: str) -> dict | None:
    """A leanserve server's counters from /metrics: `{"total_j", "idle_j", "energy_source",
    "prefix_queried", "prefix_hits"}`; None for a server without them (not leanserve, or no
    /metrics)."""
    try:
        text = await _get(client, f"{base}/metrics")
        samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    except (aiohttp.ClientError, ValueError):
        return None
    if "leanserve_energy_joules_total" not in samples:
        return None
    source = samples.get("leanserve_energy_source_info")
    queried, hits = samples.get("leanserve_prefix_cache_queries_tokens_total"), \
        samples.get("leanserve_prefix_cache_hits_tokens_total")
    return {"total_j": samples["leanserve_energy_joules_total"].value,
            "idle_j": samples["leanserve_idle_energy_joules_total"].value,
            "energy_source": source.labels.get("source", "unknown") if source else "unknown",
            "prefix_queried": queried.value if queried else None, "prefix_hits": hits.value if hits else None}


async def structured_counters(client: aiohttp.ClientSession, base: str) -> dict | None:
    """A leanserve server's structured-output counters: tokens, forced tokens, and the
    cumulative buckets of its mask and compile histograms; None without them."""
    try:
        text = await _get(client, f"{base}/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
    except (aiohttp.ClientError, ValueError):
        return None
    out = {}
    for key, name in (("tokens", "leanserve_structured_tokens"), ("forced", "leanserve_structured_forced_tokens")):
        family = families.get(name)
        if family is None:
            return None
        out[key] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    for key, name in (("mask", "leanserve_structured_mask_seconds"), ("compile", "leanserve_structured_compile_seconds")):
        family = families.get(name)
        out[key] = {float(s.labels["le"]): s.value for s in (family.samples if family else ())
                    if s.name.endswith("_bucket")}
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus' estimate of a quantile from the growth of cumulative buckets (linear within
    the bucket it falls in; the highest finite bound when it falls in +Inf)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def structured_delta(before: dict, after: dict) -> dict:
    tokens, forced = after["tokens"] - before["tokens"], after["forced"] - before["forced"]
    mask = {f"p{round(q * 100)}_us": (None if v is None else round(v * 1e6, 2))
            for q in (0.5, 0.99) for v in [histogram_quantile(q, before["mask"], after["mask"])]}
    return {"structured_tokens": tokens, "forced_tokens": forced,
            "forced_share": round(forced / tokens, 4) if tokens else None, "mask": mask,
            "masks": (after["mask"].get(float("inf"), 0) - before["mask"].get(float("inf"), 0))}


def constrained_ratios(levels: list[dict]) -> list[dict]:
    """Per load level, constrained over unconstrained: output tok/s and TPOT p50."""
    out = []
    free = {report.level_name(lv): lv for lv in levels if not lv.get("response_format")}
    for lv in levels:
        base = free.get(report.level_name(lv))
        if not lv.get("response_format") or base is None:
            continue
        a, b = lv["summary"], base["summary"]
        tpot = (a["tpot_ms"] or {}).get("p50"), (b["tpot_ms"] or {}).get("p50")
        out.append({"level": report.level_name(lv), "response_format": lv["response_format"],
                    "output_tok_s": round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 3)
                    if b["output_tokens_per_s"] else None,
                    "tpot_p50": round(tpot[0] / tpot[1], 3) if tpot[0] and tpot[1] else None,
                    "output_tokens_mean": (a["output_tokens_mean"], b["output_tokens_mean"]),
                    "structured": lv.get("structured")})
    return out


def prefix_hit_rate(before: dict, after: dict) -> float | None:
    """The share of the level's prompt tokens whose KV the server's prefix cache supplied."""
    if before.get("prefix_queried") is None or after.get("prefix_queried") is None:
        return None
    queried = after["prefix_queried"] - before["prefix_queried"]
    return (after["prefix_hits"] - before["prefix_hits"]) / queried if queried > 0 else 0.0


def pid_meter(args) -> ProcessesMeter | None:
    """Starts measuring the --measure-pid processes; MeterUnavailable on a pid that is not there."""
    if not args.measure_pid:
        return None
    return ProcessesMeter(args.measure_pid, args.measure_children, args.watts_per_core, args.watts_per_gb)


async def _sample_memory(meter: ProcessesMeter, every: float = 1.0) -> None:
    """The meter integrates memory between its reads: read it every second during a level."""
    while True:
        await asyncio.sleep(every)
        meter.read_joules()


async def measured_level(client: aiohttp.ClientSession, base: str, url: str, bodies: list[dict], args, level: dict,
                         seed: int, server: bool) -> tuple[list[RequestRecord], float, dict | None]:
    """`run_level` with the server's energy counters (`server`) and the pid meter read around it."""
    before = await server_counters(client, base) if server else None
    meter = pid_meter(args)
    sampler = asyncio.create_task(_sample_memory(meter)) if meter else None
    progress = Progress(len(bodies), f"bench serve {report.level_name(level)}",
                        total_tokens=len(bodies) * args.output_len)
    try:
        records, duration = await run_level(client, url, bodies, args.timeout, level["concurrency"],
                                            level["request_rate"], seed, progress)
    finally:
        if sampler:
            sampler.cancel()
    tokens = sum(r.output_tokens for r in records if r.ok)
    energy = {}
    if meter:
        energy["pid"] = report.pid_energy(meter.read_joules(), meter.cpu_seconds(), tokens, pids=args.measure_pid,
                                          children=args.measure_children, watts_per_core=meter.watts_per_core,
                                          watts_per_gb=meter.watts_per_gb)
    after = await server_counters(client, base) if before else None
    if after:
        energy["server"] = report.server_energy(before, after, tokens)
        level["prefix_cache_hit_rate"] = rate = prefix_hit_rate(before, after)
        if rate and rate > 0.05 and not args.shared_prefix_len:
            # Same arguments, same prompts: a rerun against a warm server measures cached prompts.
            print(f"bench serve: note: the server's prefix cache supplied {rate:.0%} of this level's prompt "
                  "tokens (the prompts repeat an earlier run's; pass another --seed for fresh ones)",
                  file=sys.stderr)
    return records, duration, (dict(energy, output_tokens=tokens) if energy else None)


# -- the run ----------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "python": platform.python_version()}


def _api_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


async def _served_model(client: aiohttp.ClientSession, base: str) -> str | None:
    try:
        return json.loads(await _get(client, f"{base}/v1/models"))["data"][0]["id"]
    except (aiohttp.ClientError, ValueError, KeyError, IndexError, TypeError) as e:
        print(f"bench serve: no model name from {base}/v1/models ({e!r}); give --model", file=sys.stderr)
        return None


def client_session(headers: dict) -> aiohttp.ClientSession:
    """The load generator's HTTP client. It never queues requests (no connection limit), and
    it opens a fresh connection per request: a server may drop a kept-alive connection just
    after its last event (llama-server does), and a request sent on it in that moment fails
    at once (~10% of requests at c=32 when connections were reused). Timeouts are send()'s:
    aiohttp's default (5 minutes in all) would cut long runs short."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True), headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=None), trust_env=False)


async def _run(args, payloads: list) -> dict | None:
    """The probe request first (the last payload): it fails fast on a wrong URL, model or
    key, and warms the server up (and its cache of the shared prefix) before measuring."""
    base = _api_base(args.base_url)
    url = base + ENDPOINTS[args.endpoint]
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with client_session(headers) as client:
        model = args.model or await _served_model(client, base)
        if model is None:
            return None
        probe = await send(client, url, request_body(args, model, payloads[-1]), args.timeout, -1, time.perf_counter())
        if not probe.ok:
            print(f"bench serve: the probe request to {url} failed: status {probe.status}: {probe.error}",
                  file=sys.stderr)
            return None
        server = await server_counters(client, base) is not None
        levels = []
        loads = [("concurrency", c) for c in args.concurrency] if args.request_rate is None \
            else [("request_rate", r) for r in args.request_rate]
        constraint = response_format(args)
        if constraint is not None:  # the probe of the constrained side: a refused schema fails now
            probe = await send(client, url, request_body(args, model, payloads[-1], constraint), args.timeout, -1,
                               time.perf_counter())
            if not probe.ok:
                print(f"bench serve: the constrained probe request failed: status {probe.status}: {probe.error}",
                      file=sys.stderr)
                return None
        variants = [None] if constraint is None else [None, constraint]
        for k, (kind, value) in enumerate(loads):
            prompts = payloads[k * args.num_prompts:(k + 1) * args.num_prompts]
            for variant in variants:  # the same prompts unconstrained, then constrained
                level = {"concurrency": None, "request_rate": None, kind: value}
                if constraint is not None:
                    level["response_format"] = variant["type"] if variant else None
                what = f" ({level['response_format'] or 'unconstrained'})" if constraint is not None else ""
                print(f"{report.level_name(level)}{what}: {args.num_prompts} requests ...", file=sys.stderr,
                      flush=True)
                bodies = [request_body(args, model, p, variant) for p in prompts]
                before = await structured_counters(client, base) if variant else None
                records, duration, energy = await measured_level(client, base, url, bodies, args, level,
                                                                 args.seed + k, server)
                after = await structured_counters(client, base) if before else None
                if after:
                    level["structured"] = structured_delta(before, after)
                level["summary"] = report.summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
                if energy:
                    level["summary"]["energy"] = energy
                level["requests"] = [dict(vars(r), tpot=r.tpot) for r in records]
                levels.append(level)
    return {"model": model, "url": url, "levels": levels}


def _event_loop_run(coroutine):
    """asyncio.run on uvloop where it is installed (it is a leanserve dependency off Windows):
    a cheaper loop leaves more of a shared machine to the server being measured."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare:
        print(report.compare(report.load(args.compare[0]), report.load(args.compare[1])))
        return 0
    if args.plot:
        import matplotlib  # noqa: F401  (missing: fail now, not after the whole run)
    pid_meter(args)  # a wrong --measure-pid fails now, not after the prompts are made
    num_levels = len(args.request_rate or args.concurrency)
    payloads = prompt_payloads(load_tokenizer(args.tokenizer), args, num_levels * args.num_prompts + 1)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    measured = _event_loop_run(_run(args, payloads))
    if measured is None:
        return 1
    result = {"label": args.label, "command": "leanserve bench serve " + shlex.join(argv), "started": started,
              "machine": machine_info(), "config": vars(args), **measured}
    print(f"{args.label or measured['model']} at {measured['url']}: {args.input_len} in / {args.output_len} out "
          f"tokens, {args.num_prompts} requests per level, "
          f"SLO TTFT {args.slo_ttft_ms:g} ms TPOT {args.slo_tpot_ms:g} ms")
    if args.response_format:
        for variant in (None, args.response_format):
            print(f"\n{variant or 'unconstrained'}:")
            print(report.format_table([lv for lv in result["levels"] if lv.get("response_format") == variant]))
    else:
        print(report.format_table(result["levels"]))
    if args.response_format:
        result["constrained_ratios"] = ratios = constrained_ratios(result["levels"])
        print(f"\nconstrained ({args.response_format}) / unconstrained, same prompts:")
        for r in ratios:
            st = r["structured"] or {}
            mask = st.get("mask") or {}
            share = st.get("forced_share")
            print(f"{r['level']:>10}  output tok/s x{r['output_tok_s']}  TPOT p50 x{r['tpot_p50']}  "
                  f"tokens/request {r['output_tokens_mean'][0]} vs {r['output_tokens_mean'][1]}  "
                  f"forced {'-' if share is None else f'{share:.1%}'}  "
                  f"mask p50/p99 {mask.get('p50_us')}/{mask.get('p99_us')} us (server histogram)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        report.plot(result, args.plot)
    return 0
