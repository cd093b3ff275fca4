"""`leanserve bench retrieval`: what retrieval costs a leanserve server, over HTTP.

Against a running server (`--url`) or one started here (`--start-server`), in one run:
(a) `/v1/embeddings` latency: one short generated sentence per request, sequential, on one
    kept-alive connection, `--embed-requests` of them (after a warm-up): p50/p99;
(b) realtime chat latency (streamed TTFT and TPOT of `--chat-clients` closed-loop clients,
    exactly `--max-tokens` output tokens each) alone, then while a bulk ingestion runs: a
    generated text file of `--ingest-kb` KB uploaded to /v1/files (purpose "assistants"), a
    vector store created with it and polled until it is completed. The chat clients keep
    sending until the ingestion ends; only requests that ended before it count. Reported:
    TTFT/TPOT p50/p99 of both phases, their ratio (under ingestion / alone), and the
    ingestion's chunks/s with chat running and (c) with nothing else running.
Each part runs `--repeats` times; medians are reported. The server's engine gives background
embeddings at most a share of its step thread while generation runs (engine.EmbedShare,
25%), so the TPOT ratio should stay near 1/(1-0.25) = 1.33 or below.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from argparse import Namespace
from datetime import datetime, timezone

import aiohttp

from ..cli import HelpFormatter
from ..progress import Progress
from . import report
from .embeddings import make_texts, sentence
from .loadgen import _api_base, _event_loop_run, _served_model, _tick, client_session, machine_info, request_body, send


def add_server_options(ap: argparse.ArgumentParser) -> None:
    """--url, --start-server and --server-args, as the HTTP benches take them."""
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running leanserve server (with or without /v1)")
    ap.add_argument("--start-server", action="store_true",
                    help="start `leanserve serve` on a free port here (temporary --data-dir) instead of using --url")
    ap.add_argument("--server-args", default="", help="with --start-server: more `leanserve serve` flags, one string")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="leanserve bench retrieval", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    add_server_options(ap)
    ap.add_argument("--embed-requests", type=int, default=200, help="(a) sequential one-sentence embedding requests")
    ap.add_argument("--chat-clients", type=int, default=4, help="(b) concurrent streamed chat clients")
    ap.add_argument("--chat-requests", type=int, default=16, help="(b) chat requests of the phase without ingestion")
    ap.add_argument("--max-tokens", type=int, default=64, help="(b) output tokens of every chat request (ignore_eos)")
    ap.add_argument("--ingest-kb", type=int, default=300, help="(b, c) size of the generated file to ingest, KB")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each part; medians reported")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one request or one ingestion may take")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated texts")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    args = ap.parse_args(argv)
    for name in ("embed_requests", "chat_clients", "chat_requests", "max_tokens", "ingest_kb", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- a server of our own ------------------------------------------------------------------------

class StartedServer:
    """`leanserve serve` in a subprocess on a free port, ready once /ready answers 200."""

    def __init__(self, extra: list[str], timeout: float = 300, label: str = "bench"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir = tempfile.mkdtemp(prefix="leanserve-bench-")
        self.log = open(os.path.join(self.data_dir, "server.log"), "w+")
        args = [*extra] if "--data-dir" in extra else [*extra, "--data-dir", self.data_dir]
        self.command = [sys.executable, "-m", "leanserve", "serve", "--port", str(port), *args]
        print(f"{label}: starting {shlex.join(self.command[1:])}", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not ready after {timeout:g}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the parts ----------------------------------------------------------------------------------

def _quantiles(seconds: list[float]) -> dict:
    stats = report.percentiles(seconds, 1000) or {}
    return {"p50_ms": stats.get("p50"), "p99_ms": stats.get("p99"), "mean_ms": stats.get("mean"), "n": len(seconds)}


async def embedding_latency(base: str, model: str, n: int, seed: int, headers: dict) -> dict:
    """(a): `n` sequential single-sentence requests on one kept-alive connection."""
    texts = make_texts("short", n + 10, seed=seed)
    latencies = []
    progress = Progress(n, "bench retrieval embeddings")
    async with aiohttp.ClientSession(headers=headers, trust_env=False,
                                     connector=aiohttp.TCPConnector(limit=1)) as session:
        for i, text in enumerate(texts):
            start = time.perf_counter()
            async with session.post(f"{base}/v1/embeddings", json={"model": model, "input": text}) as r:
                body = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"/v1/embeddings answered {r.status}: {body[:300]!r}")
            if i >= 10:  # the first ten warm up
                latencies.append(time.perf_counter() - start)
                progress.advance(1)
    progress.close()
    return _quantiles(latencies)


def ingest_text(kb: int, seed: int) -> bytes:
    """Paragraphs of generated sentences, `kb` KB of them."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < kb * 1024:
        paragraph = " ".join(sentence(rng, rng.randint(8, 30)) for _ in range(rng.randint(3, 8)))
        out.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(out).encode()[:kb * 1024]


async def _json(response: aiohttp.ClientResponse) -> dict:
    body = await response.read()
    if response.status != 200:
        raise RuntimeError(f"{response.method} {response.url} answered {response.status}: {body[:300]!r}")
    return json.loads(body)


class Ingestion:
    """Upload, create the store with the file, poll until done. `seconds` is from the store's
    creation to the first poll that saw it completed (polls every `poll` seconds)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, data: bytes, name: str, timeout: float,
                 poll: float = 0.1):
        self.session, self.base, self.data, self.name = session, base, data, name
        self.timeout, self.poll = timeout, poll
        self.store_id = self.file_id = None
        self.seconds = self.chunks = None
        self.done = asyncio.Event()

    async def upload(self) -> None:
        form = aiohttp.FormData()
        form.add_field("purpose", "assistants")
        form.add_field("file", self.data, filename=f"{self.name}.txt", content_type="text/plain")
        async with self.session.post(f"{self.base}/v1/files", data=form) as r:
            self.file_id = (await _json(r))["id"]

    async def run(self) -> None:
        """The store's creation and its wait; `upload()` first."""
        try:
            start = time.perf_counter()
            async with self.session.post(f"{self.base}/v1/vector_stores",
                                         json={"name": self.name, "file_ids": [self.file_id]}) as r:
                self.store_id = (await _json(r))["id"]
            while True:
                async with self.session.get(f"{self.base}/v1/vector_stores/{self.store_id}") as r:
                    store = await _json(r)
                counts = store.get("file_counts") or {}
                if store.get("status") == "completed" or counts.get("in_progress") == 0:
                    self.seconds = time.perf_counter() - start
                    break
                if time.perf_counter() - start > self.timeout:
                    raise RuntimeError(f"the ingestion of {self.store_id} took over {self.timeout:g}s")
                await asyncio.sleep(self.poll)
            if counts.get("failed") or counts.get("completed", 1) < 1:
                raise RuntimeError(f"the ingestion of {self.store_id} failed: {store}")
        finally:
            self.done.set()
        async with self.session.get(f"{self.base}/v1/vector_stores/{self.store_id}/files/{self.file_id}/content") as r:
            self.chunks = len((await _json(r))["data"])

    async def cleanup(self) -> None:
        for path in (f"/v1/vector_stores/{self.store_id}", f"/v1/files/{self.file_id}"):
            if path.rsplit("/", 1)[1] != "None":
                async with self.session.delete(self.base + path) as r:
                    await r.read()

    def result(self) -> dict:
        return {"chunks": self.chunks, "seconds": round(self.seconds, 3),
                "chunks_per_s": round(self.chunks / self.seconds, 2), "bytes": len(self.data)}


def _chat_bodies(model: str, args, count: int, tag: str) -> list[dict]:
    """Distinct prompts (a word of their own first: no shared cached prefix), exactly
    `--max-tokens` output tokens each."""
    shape = Namespace(output_len=args.max_tokens, endpoint="chat")
    texts = make_texts("short", count, seed=zlib.crc32(tag.encode()))
    return [request_body(shape, model, f"{tag}{i} Continue this story: {t}") for i, t in enumerate(texts)]


async def chat_phase(client, base: str, model: str, args, tag: str, until: asyncio.Event | None = None) -> dict:
    """Closed loop of `--chat-clients` streamed clients: `--chat-requests` requests, or, with
    `until`, requests until that event is set (only those that ended before it count)."""
    url = f"{base}/v1/chat/completions"
    records: list[report.RequestRecord] = []
    counter = iter(range(10**9))
    total = args.chat_requests
    progress = Progress(total, f"bench retrieval chat {tag}", unit="requests")
    ticker = asyncio.create_task(_tick(progress))
    t0 = time.perf_counter()
    bodies = _chat_bodies(model, args, 4096, tag)

    async def loop() -> None:
        for i in counter:
            if until is None and i >= total:
                return
            if until is not None and until.is_set():
                return
            record = await send(client, url, bodies[i % len(bodies)], args.timeout, i, t0)
            if until is not None and until.is_set():
                return  # ended after the ingestion: not under it
            records.append(record)
            if until is not None:  # open-ended: the total grows with what was done
                progress.total = max(progress.total, progress.done + 1 + args.chat_clients)
            progress.advance(1, tokens=record.output_tokens if record.ok else 0)

    try:
        await asyncio.gather(*(loop() for _ in range(args.chat_clients)))
    finally:
        ticker.cancel()
        progress.close()
    duration = time.perf_counter() - t0
    summary = report.summarize(records, duration, 1000.0, 100.0)
    if summary["failed"]:
        print(f"bench retrieval: {summary['failed']} chat requests failed: {summary['failures']}", file=sys.stderr)
    return {k: summary[k] for k in ("completed", "failed", "duration_s", "output_tokens_per_s", "output_tokens_mean",
                                    "ttft_ms", "tpot_ms")}


async def _run(args, base: str) -> dict:
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with client_session(headers) as client:
        async with client.get(f"{base}/v1/models") as r:
            models = (await _json(r))["data"]
        embedder = next((m["id"] for m in models if (m.get("leanserve") or {}).get("kind") == "embedding"), None)
        if embedder is None:
            raise RuntimeError(f"{base} serves no embedding model (started with --embedding-model none?)")
        model = await _served_model(client, base)
        warm = await send(client, f"{base}/v1/chat/completions", _chat_bodies(model, args, 1, "warm")[0],
                          args.timeout, -1, time.perf_counter())
        if not warm.ok:
            raise RuntimeError(f"the warm-up chat request failed: status {warm.status}: {warm.error}")
        runs = []
        for rep in range(args.repeats):
            print(f"bench retrieval: run {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
            run = {"embeddings": await embedding_latency(base, embedder, args.embed_requests, args.seed + rep,
                                                         headers)}
            e = run["embeddings"]
            print(f"  /v1/embeddings one sentence: p50 {e['p50_ms']} ms  p99 {e['p99_ms']} ms", file=sys.stderr)
            alone = Ingestion(client, base, ingest_text(args.ingest_kb, args.seed + 100 + rep), f"alone-{rep}",
                              args.timeout)
            await alone.upload()
            await alone.run()
            run["ingestion_alone"] = alone.result()
            await alone.cleanup()
            print(f"  ingestion alone: {alone.result()}", file=sys.stderr)
            run["chat_alone"] = await chat_phase(client, base, model, args, f"alone{rep}")
            under = Ingestion(client, base, ingest_text(args.ingest_kb, args.seed + 200 + rep), f"under-{rep}",
                              args.timeout)
            await under.upload()
            task = asyncio.create_task(under.run())
            run["chat_under_ingestion"] = await chat_phase(client, base, model, args, f"under{rep}", under.done)
            await task
            run["ingestion_under_chat"] = under.result()
            await under.cleanup()
            a, u = run["chat_alone"], run["chat_under_ingestion"]
            run["ratio_under_over_alone"] = {
                f"{m}_{q}": round(u[f"{m}_ms"][q] / a[f"{m}_ms"][q], 3) if a[f"{m}_ms"] and u[f"{m}_ms"] else None
                for m in ("ttft", "tpot") for q in ("p50", "p99")}
            print(f"  chat alone TPOT p50 {a['tpot_ms'] and a['tpot_ms']['p50']} ms, under ingestion "
                  f"{u['tpot_ms'] and u['tpot_ms']['p50']} ms ({u['completed']} requests); ingestion under chat "
                  f"{run['ingestion_under_chat']['chunks_per_s']} chunks/s", file=sys.stderr, flush=True)
            runs.append(run)
    return {"model": model, "embedding_model": embedder, "runs": runs}


def summarize(runs: list[dict]) -> dict:
    out = {"embeddings_p50_ms": report.median_at(runs, "embeddings", "p50_ms"),
           "embeddings_p99_ms": report.median_at(runs, "embeddings", "p99_ms")}
    for phase in ("chat_alone", "chat_under_ingestion"):
        for m in ("ttft", "tpot"):
            for q in ("p50", "p99"):
                out[f"{phase}_{m}_{q}_ms"] = report.median_at(runs, phase, f"{m}_ms", q)
    for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
        out[f"ratio_{k}"] = report.median_at(runs, "ratio_under_over_alone", k)
    out["ingestion_alone_chunks_per_s"] = report.median_at(runs, "ingestion_alone", "chunks_per_s")
    out["ingestion_under_chat_chunks_per_s"] = report.median_at(runs, "ingestion_under_chat", "chunks_per_s")
    out["ingestion_chunks"] = report.median_at(runs, "ingestion_alone", "chunks")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    server = StartedServer(shlex.split(args.server_args)) if args.start_server else None
    try:
        base = _api_base(server.url if server else args.url)
        measured = _event_loop_run(_run(args, base))
    finally:
        if server:
            server.stop()
    medians = summarize(measured["runs"])
    result = {"bench": "retrieval", "command": "leanserve bench retrieval " + shlex.join(argv), "started": started,
              "machine": machine_info(), "config": vars(args), "url": base,
              "server_command": server and shlex.join(server.command[1:]), **measured, "medians": medians}
    m = medians
    print(f"{measured['model']} + {measured['embedding_model']} at {base}, median of {args.repeats}:")
    print(f"  /v1/embeddings, one sentence, sequential   p50 {m['embeddings_p50_ms']} ms   "
          f"p99 {m['embeddings_p99_ms']} ms   (target p50 <= 10 ms)")
    print(f"  chat ({args.chat_clients} clients, {args.max_tokens} tokens)        alone: TTFT p50 "
          f"{m['chat_alone_ttft_p50_ms']} ms  TPOT p50 {m['chat_alone_tpot_p50_ms']} "
          f"p99 {m['chat_alone_tpot_p99_ms']} ms")
    print(f"  chat under a {args.ingest_kb} KB ingestion         TTFT p50 {m['chat_under_ingestion_ttft_p50_ms']} ms  "
          f"TPOT p50 {m['chat_under_ingestion_tpot_p50_ms']} p99 {m['chat_under_ingestion_tpot_p99_ms']} ms")
    print(f"  under/alone                              TTFT p50 x{m['ratio_ttft_p50']}  TPOT p50 x{m['ratio_tpot_p50']}"
          f"  p99 x{m['ratio_tpot_p99']}")
    print(f"  ingestion ({m['ingestion_chunks']} chunks)                  alone {m['ingestion_alone_chunks_per_s']} "
          f"chunks/s   under chat {m['ingestion_under_chat_chunks_per_s']} chunks/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
