"""`leanserve bench responses`: an agent's 30 model calls over `/v1/responses`, and what
the Responses layer costs over chat completions, over HTTP.

Against a running server (`--url`) or one started here (`--start-server`), each repeat:
(a) `--calls` requests sharing one instructions prefix (an agent's system prompt of about
    `--instructions-words` words), each its own short task, greedy, `--max-output-tokens`
    at most, `store: false`: sent one after another, then (other tasks, same shape) all at
    once. Total time, joules (the requests' own bills, `usage.leanserve.energy_joules`, and
    the server's energy counter over the phase, idle included) and output tokens, both ways.
(b) The same number of calls as `--chains` conversations chained by
    `previous_response_id` (turns of a chain one after another, the chains side by side,
    each turn sending the instructions again, as OpenAI wants): the share of prompt tokens
    the server's prefix cache supplied over the phase (its /metrics counters), with the
    share a plain (not chained) phase of (a) got for comparison.
(c) The overhead of `/v1/responses` over `/v1/chat/completions` for the same request (one
    short prompt, the same for all, so its prefix is cached and one token is generated:
    what remains is the HTTP and API layers): `--overhead-pairs` pairs, the two endpoints
    alternating on one kept-alive connection, `store: false` (nothing to store, as chat);
    the p50 of the per-pair differences and of each endpoint, and the same with `store:
    true` (a durable SQLite write per response). Target: <= 2 ms p50.
(d) The same difference in process, without HTTP and the engine (no server needed, so a
    loaded machine blurs it less): the Responses layer's own work for that request (parse,
    items to chat messages, the chat request validated, the response object built and
    serialised) minus chat's (parse, response built and serialised), p50 of
    `--layer-iterations` alternating runs. Everything else is the same code on both paths.
`--parts` picks which run. Medians over `--repeats` are reported.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

import aiohttp

from ..cli import HelpFormatter
from . import report
from .embeddings import sentence
from .loadgen import _api_base, _event_loop_run, _served_model, client_session, machine_info, server_counters
from .loadgen import prefix_hit_rate
from .retrieval import StartedServer, add_server_options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="leanserve bench responses", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    add_server_options(ap)
    ap.add_argument("--calls", type=int, default=30, help="(a, b) model calls of the agent workload")
    ap.add_argument("--instructions-words", type=int, default=300, help="(a, b) words of the shared instructions")
    ap.add_argument("--max-output-tokens", type=int, default=16, help="(a, b) output tokens of a call at most")
    ap.add_argument("--chains", type=int, default=6, help="(b) conversations the calls are chained into")
    ap.add_argument("--overhead-pairs", type=int, default=100, help="(c) chat/responses request pairs")
    ap.add_argument("--layer-iterations", type=int, default=2000, help="(d) in-process runs of each layer")
    ap.add_argument("--parts", default="agent,overhead,layer", help="comma-separated: agent (a, b), overhead (c), "
                                                                      "layer (d, in process: no server used)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each part; medians reported")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated texts")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    args = ap.parse_args(argv)
    for name in ("calls", "instructions_words", "max_output_tokens", "chains", "overhead_pairs", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.calls % args.chains:
        ap.error("--calls must be a multiple of --chains")
    args.parts = set(args.parts.split(","))
    if not args.parts or args.parts - {"agent", "overhead", "layer"}:
        ap.error("--parts takes agent, overhead, layer")
    return args


def instructions(words: int, seed: int) -> str:
    rng = random.Random(seed)
    text = "You are a careful planning agent. Follow these rules exactly."
    while len(text.split()) < words:
        text += " " + sentence(rng, rng.randint(8, 20))
    return text


def tasks(count: int, tag: str, seed: int) -> list[str]:
    """Short distinct user turns; `tag` first so no two phases share more than the instructions."""
    rng = random.Random(f"{seed}-{tag}")
    return [f"Step {tag}-{i}: {sentence(rng, rng.randint(6, 12))} What next?" for i in range(count)]


async def _post(session: aiohttp.ClientSession, url: str, body: dict, timeout: float) -> dict:
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"POST {url} answered {r.status}: {data[:300]!r}")
    return json.loads(data)


def _bill(responses: list[dict]) -> dict:
    return {"requests_j": round(sum(r["usage"]["leanserve"]["energy_joules"] for r in responses), 4),
            "output_tokens": sum(r["usage"]["output_tokens"] for r in responses),
            "input_tokens": sum(r["usage"]["input_tokens"] for r in responses)}


async def _measured(client, base: str, work) -> dict:
    """Runs `work()` (-> the responses) with the server's counters read around it."""
    before = await server_counters(client, base)
    start = time.perf_counter()
    responses = await work()
    seconds = time.perf_counter() - start
    after = await server_counters(client, base)
    out = {"seconds": round(seconds, 3), **_bill(responses)}
    if before and after:
        out["server"] = report.server_energy(before, after, out["output_tokens"])
        out["prefix_cache_hit_rate"] = round(prefix_hit_rate(before, after), 4)
    return out


async def agent_phases(client, base: str, model: str, args, rep: int) -> dict:
    """(a) and (b) of one repeat."""
    url = f"{base}/v1/responses"
    shared = instructions(args.instructions_words, args.seed)

    def body(text: str, **extra) -> dict:
        return {"model": model, "instructions": shared, "input": text, "temperature": 0,
                "max_output_tokens": args.max_output_tokens, "store": False, **extra}

    async def sequential():
        return [await _post(client, url, body(t), args.timeout) for t in tasks(args.calls, f"s{rep}", args.seed)]

    async def concurrent():
        return await asyncio.gather(*(_post(client, url, body(t), args.timeout)
                                      for t in tasks(args.calls, f"c{rep}", args.seed)))

    turns = args.calls // args.chains

    async def chain(c: int) -> list[dict]:
        out, previous = [], None
        for t in tasks(turns, f"k{rep}.{c}", args.seed):
            r = await _post(client, url, body(t, store=True, previous_response_id=previous), args.timeout)
            previous = r["id"]
            out.append(r)
        return out

    async def chains():
        return [r for rs in await asyncio.gather(*(chain(c) for c in range(args.chains))) for r in rs]

    await _post(client, url, body("Warm up."), args.timeout)  # the instructions are cached before each phase
    run = {"sequential": await _measured(client, base, sequential),
           "concurrent": await _measured(client, base, concurrent),
           "chains": await _measured(client, base, chains)}
    s, c = run["sequential"], run["concurrent"]
    run["concurrent_over_sequential"] = {"seconds": round(c["seconds"] / s["seconds"], 3),
                                         "requests_j": round(c["requests_j"] / s["requests_j"], 3)
                                         if s["requests_j"] else None}
    return run


async def overhead(base: str, model: str, args, store: bool, headers: dict) -> dict:
    """(c): p50 of responses minus chat, per alternating pair, on one kept-alive connection."""
    prompt = "Reply with one word."
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0}
    resp = {"model": model, "input": prompt, "max_output_tokens": 1, "temperature": 0, "store": store}
    times = {"chat": [], "responses": []}
    async with aiohttp.ClientSession(headers=headers, trust_env=False,
                                     connector=aiohttp.TCPConnector(limit=1)) as session:
        for i in range(args.overhead_pairs + 5):  # five pairs warm up
            order = [("chat", "/v1/chat/completions", chat), ("responses", "/v1/responses", resp)]
            for name, path, body in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                await _post(session, base + path, body, args.timeout)
                if i >= 5:
                    times[name].append(time.perf_counter() - start)
    diffs = [(r - c) * 1000 for r, c in zip(times["responses"], times["chat"])]
    return {"chat_p50_ms": round(statistics.median(times["chat"]) * 1000, 3),
            "responses_p50_ms": round(statistics.median(times["responses"]) * 1000, 3),
            "overhead_p50_ms": round(statistics.median(diffs), 3), "pairs": len(diffs)}


def layer_cost(iterations: int) -> dict:
    """(d): p50 of the Responses layer's own work minus chat completions', in process."""
    from ..serve import file_search, protocol as p, responses as R

    model, prompt, rid = "SmolLM2-135M-Instruct", "Reply with one word.", "resp_0123456789abcdef"
    chat_body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
                            "temperature": 0}).encode()
    resp_body = json.dumps({"model": model, "input": prompt, "max_output_tokens": 1, "temperature": 0,
                            "store": False}).encode()
    usage = {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31, "leanserve": {
        "queue_ms": 0.1, "prefill_ms": 5.0, "decode_ms": 0.0, "energy_joules": 0.5, "carbon_grams": 1e-5,
        "cost_usd": 1e-7, "energy_source": "estimate"}}

    def chat() -> None:
        req = p.parse_body(p.ChatCompletionRequest, chat_body)
        json.dumps(p.chat_completion("chatcmpl-0", req.model, [p.chat_choice(0, "Hi", None, "stop")], usage))

    def responses() -> None:
        req = p.parse_body(R.ResponsesRequest, resp_body)
        items = R.normalize_input(req.input)
        file_search.parse(req.tools)
        R.chat_request(req, items, "realtime")
        body = R.finished(R.shell(rid, req, "default"), [R.message_item("Hi")], "stop", usage)
        json.dumps(body)

    times = {"chat": [], "responses": []}
    for i in range(iterations + 100):  # a hundred warm up
        for name, fn in (("chat", chat), ("responses", responses)) if i % 2 else (("responses", responses),
                                                                                   ("chat", chat)):
            start = time.perf_counter()
            fn()
            if i >= 100:
                times[name].append(time.perf_counter() - start)
    diffs = [(r - c) * 1000 for r, c in zip(times["responses"], times["chat"])]
    return {"chat_p50_ms": round(statistics.median(times["chat"]) * 1000, 4),
            "responses_p50_ms": round(statistics.median(times["responses"]) * 1000, 4),
            "overhead_p50_ms": round(statistics.median(diffs), 4), "iterations": iterations}


async def _run(args, base: str) -> dict:
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with client_session(headers) as client:
        model = await _served_model(client, base)
        if model is None:
            raise RuntimeError(f"no model served at {base}")
        runs = []
        for rep in range(args.repeats):
            print(f"bench responses: run {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
            run = {}
            if "agent" in args.parts:
                run = await agent_phases(client, base, model, args, rep)
                s, c, k = run["sequential"], run["concurrent"], run["chains"]
                print(f"  {args.calls} calls one by one {s['seconds']} s {s['requests_j']} J; all at once "
                      f"{c['seconds']} s {c['requests_j']} J; chains: prefix cache hit rate "
                      f"{k.get('prefix_cache_hit_rate')} (one by one: {s.get('prefix_cache_hit_rate')})",
                      file=sys.stderr, flush=True)
            if "overhead" in args.parts:
                for store in (False, True):
                    run[f"overhead_store_{str(store).lower()}"] = await overhead(base, model, args, store, headers)
                print(f"  overhead p50 {run['overhead_store_false']['overhead_p50_ms']} ms (store true: "
                      f"{run['overhead_store_true']['overhead_p50_ms']} ms)", file=sys.stderr, flush=True)
            runs.append(run)
    return {"model": model, "runs": runs}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for phase in ("sequential", "concurrent", "chains"):
        for key in ("seconds", "requests_j", "output_tokens", "input_tokens", "prefix_cache_hit_rate"):
            out[f"{phase}_{key}"] = report.median_at(runs, phase, key, digits=4)
        out[f"{phase}_server_total_j"] = report.median_at(runs, phase, "server", "total_j", digits=4)
        out[f"{phase}_server_active_j"] = report.median_at(runs, phase, "server", "active_j", digits=4)
    for key in ("seconds", "requests_j"):
        out[f"concurrent_over_sequential_{key}"] = report.median_at(runs, "concurrent_over_sequential", key, digits=4)
    for store in ("false", "true"):
        for key in ("chat_p50_ms", "responses_p50_ms", "overhead_p50_ms"):
            out[f"store_{store}_{key}"] = report.median_at(runs, f"overhead_store_{store}", key, digits=4)
    for key in ("chat_p50_ms", "responses_p50_ms", "overhead_p50_ms"):
        out[f"layer_{key}"] = report.median_at(runs, "layer", key, digits=4)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    http = bool(args.parts & {"agent", "overhead"})
    server = StartedServer(shlex.split(args.server_args)) if args.start_server and http else None
    try:
        base = _api_base(server.url if server else args.url)
        measured = _event_loop_run(_run(args, base)) if http else {"model": None,
                                                                    "runs": [{} for _ in range(args.repeats)]}
    finally:
        if server:
            server.stop()
    if "layer" in args.parts:
        for run in measured["runs"]:
            run["layer"] = layer_cost(args.layer_iterations)
    m = summarize(measured["runs"])
    result = {"bench": "responses", "command": "leanserve bench responses " + shlex.join(argv), "started": started,
              "machine": machine_info(), "config": dict(vars(args), parts=sorted(args.parts)), "url": base,
              "server_command": server and shlex.join(server.command[1:]), **measured, "medians": m}
    print(f"{measured['model']} at {base}, median of {args.repeats}:" if http else f"median of {args.repeats}:")
    if "agent" in args.parts:
        for phase, label in (("sequential", "one after another"), ("concurrent", "all at once"),
                             ("chains", f"{args.chains} previous_response_id chains")):
            print(f"  {args.calls} calls {label:<30} {m[f'{phase}_seconds']} s   requests' bills "
                  f"{m[f'{phase}_requests_j']} J   server {m[f'{phase}_server_total_j']} J   "
                  f"{m[f'{phase}_output_tokens']} output tokens   prefix cache hit rate "
                  f"{m[f'{phase}_prefix_cache_hit_rate']}")
        print(f"  all at once / one after another        time x{m['concurrent_over_sequential_seconds']}   "
              f"joules x{m['concurrent_over_sequential_requests_j']}")
    if "overhead" in args.parts:
        for store in ("false", "true"):
            print(f"  /v1/responses over chat (store {store}) p50 {m[f'store_{store}_overhead_p50_ms']} ms   (chat p50 "
                  f"{m[f'store_{store}_chat_p50_ms']} ms, responses p50 {m[f'store_{store}_responses_p50_ms']} ms; "
                  "target <= 2 ms)")
    if "layer" in args.parts:
        print(f"  the Responses layer over chat's, in process p50 {m['layer_overhead_p50_ms']} ms   (chat "
              f"{m['layer_chat_p50_ms']} ms, responses {m['layer_responses_p50_ms']} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
