"""leanserve on Ray Serve: replicas of `leanserve serve` behind one ingress, with prefix affinity.

Two deployments. `Ingress` (no CPUs) takes every HTTP request, reads its body and hands it,
whole, to `LeanserveReplica` through a deployment handle. Each replica holds one engine and the
very app `leanserve serve` runs (`create_app`), and calls it in-process over ASGI: every
endpoint behaves as it does there, streams included. The handle routes with
`PrefixAffinityRouter`, a request router on Ray's public `RequestRouter` API: requests whose
prompts start alike (same model, same first PREFIX_CHARS characters) go to the replica that
served that prefix last, where its KV blocks are cached, unless that replica is busier than
the least busy by more than `imbalanced_threshold` requests. Routing by the handle is why the
ingress exists: Ray's HTTP proxy routes before the body is read.

Replicas are stateless: the job-store APIs (files, batches, responses, vector stores,
fine-tuning) are not served here (a shared state deployment is still to come, issue 34).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

REPLICA_HEADER = "x-leanserve-replica"
PREFIX_CHARS = 256  # the affinity key: a prompt's first characters (a few KV blocks of tokens)
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@dataclass
class HTTPCall:
    """One HTTP request as the ingress read it; `prefix` is its routing key (None: no prompt)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    prefix: str | None


def prompt_prefix(body: bytes) -> str | None:
    """The model and the first PREFIX_CHARS characters of what a request's prompt starts with:
    its messages but the last (chat), prompt (completions) or input items but the last
    (responses), as the JSON they are."""
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    for field in ("messages", "prompt", "input"):
        if field in req:
            value = req[field]
            if isinstance(value, list) and len(value) > 1 and field != "prompt":
                value = value[:-1]  # the shared part of a conversation: all but the newest turn
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            return f"{req.get('model')}\n{text[:PREFIX_CHARS]}"
    return None


class PrefixAffinityRouter(RequestRouter):
    """A prefix's replica is the one that served it last. A new prefix goes to the replica that
    owns the fewest prefixes, so distinct ones spread; an owner busier than the least busy
    candidate by more than `imbalanced_threshold` loses the prefix to it. Ray then sends to the
    first rank's replica unless it is full (max_ongoing_requests), else to the next rank."""

    def initialize_state(self, imbalanced_threshold: int = 4, max_prefixes: int = 10_000, **kwargs):
        self.imbalanced_threshold, self.max_prefixes = imbalanced_threshold, max_prefixes
        self.owners: OrderedDict[str, object] = OrderedDict()  # prefix -> ReplicaID, least recent first
        self.owned: Counter = Counter()  # ReplicaID -> prefixes it owns

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prefix = _call_prefix(pending_request)
        if prefix is None or not candidate_replicas:
            return [candidate_replicas]  # Ray probes them and picks the least busy
        by_id = {r.replica_id: r for r in candidate_replicas}
        load = {rid: self.replica_queue_len_cache.get(rid) or 0 for rid in by_id}
        owner = self.owners.get(prefix)
        if owner not in by_id or load[owner] > min(load.values()) + self.imbalanced_threshold:
            owner = min(by_id, key=lambda rid: (self.owned[rid], load[rid]))
            self._assign(prefix, owner)
        self.owners.move_to_end(prefix)
        return [[by_id[owner]], [r for r in candidate_replicas if r.replica_id != owner]]

    def _assign(self, prefix: str, owner) -> None:
        old = self.owners.pop(prefix, None)
        if old is not None:
            self.owned[old] -= 1
        self.owners[prefix] = owner
        self.owned[owner] += 1
        while len(self.owners) > self.max_prefixes:
            _, evicted = self.owners.popitem(last=False)
            self.owned[evicted] -= 1

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.owned.pop(replica_id, None)  # its prefixes move at their next request


def _call_prefix(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    call = pending_request.args[0]
    return call.prefix if isinstance(call, HTTPCall) else None


@serve.deployment(max_ongoing_requests=64)
class LeanserveReplica:
    """One engine and `leanserve serve`'s app; `__call__` runs one HTTP request through it and
    streams the ASGI messages back."""

    def __init__(self, engine_config, server_config):
        from ..engine.engine import AsyncEngine
        from .app import create_app

        self.name = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(AsyncEngine(engine_config), server_config, None)
        self._lifespan = None
        self._start_lock = asyncio.Lock()

    async def _started(self) -> None:
        async with self._start_lock:  # the engine starts on this replica's event loop
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan

    async def __call__(self, call: HTTPCall):
        await self._started()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call.method,
                 "scheme": "http", "path": call.path, "raw_path": call.path.encode(), "root_path": "",
                 "query_string": call.query_string, "headers": call.headers, "client": call.client,
                 "server": ("127.0.0.1", 0)}
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": call.body, "more_body": False}]

        async def receive():
            if body:
                return body.pop()
            await gone.wait()  # the app's disconnect watch: the ingress closed this stream
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []),
                                                 (REPLICA_HEADER.encode(), self.name.encode())])
            await messages.put(message)

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await messages.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                yield message
        finally:
            gone.set()
            with contextlib.suppress(Exception):
                await task

    async def __del__(self):
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)


ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class Ingress:
    """Reads each request and forwards it to a replica through the prefix-affine handle."""

    def __init__(self, replicas):
        self.replicas = replicas.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=HTTP_METHODS)
    async def forward(self, request: Request, path: str):
        body = await request.body()
        client = (request.client.host, request.client.port) if request.client else None
        call = HTTPCall(request.method, request.url.path, request.url.query.encode(), request.headers.raw,
                        body, client, prompt_prefix(body) if request.method == "POST" else None)
        stream = self.replicas.remote(call)
        start = await stream.__anext__()

        async def chunks():
            async for message in stream:
                if message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]

        response = StreamingResponse(chunks(), status_code=start["status"])
        response.raw_headers = list(start.get("headers", []))
        return response


def _serve_args(options: dict) -> list[str]:
    """`leanserve serve` flags from keyword options: max_num_seqs=8 -> --max-num-seqs 8; a list
    repeats its flag; True is a bare flag."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is True:
                argv.append(flag)
            elif v not in (None, False):
                argv += [flag, str(v)]
    return argv


def build_app(*, num_replicas: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None,
              replica_cpus: float = 1, imbalanced_threshold: int = 4, downscale_delay_s: float = 60.0,
              serve_argv: tuple[str, ...] = (), **serve_options):
    """A Ray Serve application of leanserve replicas: `serve.run(build_app(num_replicas=2))`.
    `serve_options` are `leanserve serve`'s flags as keywords (model=..., max_num_seqs=...).
    Fixed `num_replicas`, or autoscaling between `min_replicas` (0: scale to zero; the first
    request waits for a replica) and `max_replicas`. Torch uses `replica_cpus` threads."""
    from .. import cli

    parser = argparse.ArgumentParser(prog="leanserve ray-serve")
    cli._add_serve(parser)
    args = parser.parse_args([*serve_argv, *_serve_args(serve_options)])
    engine_config = dataclasses.replace(cli._serve_engine_config(args), num_threads=max(1, int(replica_cpus)))
    server_config = cli._server_config(args)
    if max_replicas is not None or min_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": min_replicas or 0, "max_replicas": max_replicas or 1,
                                          "initial_replicas": min_replicas or 0,
                                          "target_ongoing_requests": 8, "upscale_delay_s": 0,
                                          "downscale_delay_s": downscale_delay_s}}
    else:
        scaling = {"num_replicas": num_replicas or 1}
    replicas = LeanserveReplica.options(
        ray_actor_options={"num_cpus": replica_cpus},
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalanced_threshold": imbalanced_threshold}),
        **scaling).bind(engine_config, server_config)
    return Ingress.bind(replicas)


def app_builder(args: dict):
    """For a Serve config file: `import_path: leanserve.serve.ray_app:app_builder`, `args:` the
    keywords of `build_app`."""
    return build_app(**args)
