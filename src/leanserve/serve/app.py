"""The OpenAI-compatible HTTP server: FastAPI routes over one `AsyncEngine`.

A request's path: auth → body checks (content type, size) → strict parsing → admission
(`engine.add_request` validates it and may refuse with Overloaded) → one JSON body or an SSE
stream. Every failure leaves as an OpenAI-shaped error. A client that goes away aborts its
sequences, so their KV blocks return to the pool at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..config import RouterConfig, ServerConfig
from ..energy.ledger import Bill
from ..energy.report import UsageLog, usage_record
from ..engine.sequence import PRIORITY_CLASSES, Logprob, RequestOutput, SamplingParams
from ..jobs import JobsConfig
from ..router.templates import PromptLibrary
from ..errors import InvalidRequest, LeanserveError, Overloaded
from . import adapters, banner, connections, openapi, prompts, protocol as p, routing, tools
from .auth import APIKeyAuth
from .metrics import ServerMetrics, render_models
from .protocol import APIError

# anyio (4.16 here) loads its asyncio backend lazily, at the first task group, which is the
# first streamed response; once, with 64 streams arriving together, that import failed
# ("No module named 'anyio._core._resources'") and the request got a 500. Importing the
# backend with this module does it once, at start-up, before any request (a private module:
# if a later anyio moves it, the lazy import is all there is).
with contextlib.suppress(ImportError):
    import anyio._backends._asyncio  # noqa: F401

log = logging.getLogger("leanserve.serve")

SHUTDOWN_GRACE_SECONDS = 5.0  # for requests in flight at a shutdown signal; then they are aborted
CLIENT_GONE = 499  # nginx's status for "client closed the request"; only ever seen in metrics
SERVED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models",
                 "/v1/files", "/v1/batches", "/v1/async", "/v1/vector_stores", "/v1/adapters", "/v1/fine_tuning")
# Routes of the OpenAI API not served here (yet): their 404 says so, instead of "Invalid URL".
UNSERVED_OPENAI_ROUTES = ("/v1/audio",
                          "/v1/images", "/v1/moderations", "/v1/assistants", "/v1/threads", "/v1/uploads",
                          "/v1/realtime", "/v1/evals", "/v1/containers", "/v1/conversations")


def chat_prompt_ids(tokenizer, messages: list[dict], **template_vars) -> list[int]:
    """The chat template already writes the special tokens, so encoding adds none."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_vars)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Choice:
    """Everything one sequence has streamed so far."""

    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.logprobs += out.logprobs or []
        self.last = out


class OpenAIServer:
    """Route handlers and the state they share: engine, auth, metrics, readiness."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_name or engine.model_name
        self.auth = APIKeyAuth(config.api_keys, config.api_key_classes)
        self.metrics = ServerMetrics(engine.stats, engine.ledger)
        self.usage_log = UsageLog(config.usage_log) if config.usage_log else None
        self.ready = False  # True between engine start and the first shutdown signal
        self.created = int(time.time())
        self.tool_format = tools.tool_format(engine.tokenizer.chat_template)
        self.prompts = PromptLibrary(config.prompts_dir) if config.prompts_dir else None
        self.router = routing.Router(self, config.router)
        # several models in one server: name -> its OpenAIServer (this one included); the
        # first model's server takes every request and hands it to the one `model` names
        self.served: dict[str, OpenAIServer] = {self.model_name: self}

    def target(self, model: str) -> "OpenAIServer":
        """The model's server a request's `model` names (`MODEL` or `MODEL:ADAPTER`); this one
        for anything else (a cascade, an adapter of this model, or unknown: its 404)."""
        if model in self.served:
            return self.served[model]
        return self.served.get(model.split(":", 1)[0], self)

    # -- probes and listings ----------------------------------------------------------------

    async def health(self) -> dict:
        return {"status": "ok"}

    async def readiness(self) -> JSONResponse:
        """503 also while the model is unloaded (scale to zero) or loading again; requests are
        still accepted then, and wait for the load."""
        if not self.ready:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if getattr(self.engine, "loading", False):
            return JSONResponse({"status": "loading", "message": "The model is being loaded again; "
                                 "requests are accepted and wait for it."}, status_code=503)
        if not getattr(self.engine, "loaded", True):
            return JSONResponse({"status": "unloaded", "message": "The model was unloaded after "
                                 f"{self.engine.config.idle_unload_seconds:g} idle seconds; the next "
                                 "request loads it again and waits for it."}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def prometheus(self) -> Response:
        if len(self.served) > 1:  # one exposition, each model's metrics with its `model` label
            body = render_models({name: s.metrics.registry for name, s in self.served.items()})
            return Response(body, media_type=CONTENT_TYPE_LATEST)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def authorize(self, request: Request) -> None:
        """Also notes the key's default service class for `_priority`."""
        request.state.service_class = self.auth.check(request.headers.get("authorization"))

    async def models(self) -> JSONResponse:
        self.metrics.count(200)
        body = p.model_list([self.model_name], self.created, banner.model_facts(self.engine))
        body["data"] += adapters.model_entries(self) + self.router.model_entries()
        for name, other in self.served.items():
            if other is not self:
                body["data"] += p.model_list([name], self.created, banner.model_facts(other.engine))["data"]
                body["data"] += adapters.model_entries(other)
        embedder = getattr(self.engine, "embedding_model", None)
        if embedder is not None:
            body["data"].append({"id": embedder.name, "object": "model", "created": self.created,
                                 "owned_by": "leanserve", "leanserve": {"kind": "embedding", "dimensions": embedder.dim,
                                                                        "max_input_tokens": embedder.max_length}})
        return JSONResponse(body)

    # -- generation -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        """Through the router (serve/routing.py): the response cache, cascade routes."""
        req = prompts.apply(self.prompts, await self._parse(request, p.ChatCompletionRequest))
        return await request.state.server.router.chat(request, req)

    async def run_chat(self, request: Request, req: p.ChatCompletionRequest, adapter: str | None,
                       on_body=None) -> Response:
        """The engine's answer as JSON or an SSE stream; `on_body(body)` gets the whole answer
        once it is complete (the cache stores it)."""
        if not req.stream:
            body = await self.chat_body(request, req, adapter)
            if body is None:
                return Response(status_code=CLIENT_GONE)
            if on_body is not None:
                on_body(body)
            self.metrics.count(200)
            return JSONResponse(body)
        rid, streams, plan = await self._start_chat(request, req, adapter)
        return self._sse(self._chat_events(rid, req, streams, plan.fmt, on_body), rid, len(streams))

    async def chat_body(self, request: Request, req: p.ChatCompletionRequest, adapter: str | None) -> dict | None:
        """A non-streamed chat completion's body, None when the client went away."""
        rid, streams, plan = await self._start_chat(request, req, adapter)
        choices = await self._collect(request, rid, streams, req.user)
        return None if choices is None else self._chat_completion(rid, req, choices, plan.fmt)

    async def _start_chat(self, request: Request, req: p.ChatCompletionRequest, adapter: str | None):
        plan = await self.chat_plan(req)
        prompt = chat_prompt_ids(self.engine.tokenizer, plan.messages, **plan.template_vars)
        params = self._sampling(req, max_tokens=req.max_new_tokens, logprobs=req.num_logprobs(),
                                constraint=plan.constraint)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return rid, self._submit(rid, [prompt], params, self._priority(request, req), adapter, request), plan

    def _chat_completion(self, rid: str, req: p.ChatCompletionRequest, choices: list[Choice], fmt) -> dict:
        token_text = self.engine.tokenizer.token_text
        return prompts.annotate(p.chat_completion(rid, req.model, [
            self._chat_choice(i, c, fmt, p.chat_logprobs(c.logprobs, token_text) if req.logprobs else None)
            for i, c in enumerate(choices)], self._usage(choices, req.n)))

    async def chat_plan(self, req: p.ChatCompletionRequest) -> tools.ChatPlan:
        """The request's prompt messages and constraint, compiled (a bad one is a 400 now)."""
        plan = tools.plan_chat(req, self.tool_format)
        for check in plan.checks:  # each tool's parameters alone first: errors then name the tool
            await self._compile(check)
        await self._compile(plan.constraint)
        return plan

    @staticmethod
    def _chat_choice(index: int, choice: Choice, fmt, logprobs) -> dict:
        content, calls, finish = tools.answer(choice.text, choice.last.finish_reason, fmt)
        return p.chat_choice(index, content, logprobs, finish, calls)

    async def _compile(self, constraint) -> None:
        """Compiles a structured-output constraint off the event loop (its errors are 400s)."""
        if constraint is not None:
            await self.engine.grammars.compile_async(constraint)

    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, p.CompletionRequest)
        return await request.state.server.run_completion(request, req)

    async def run_completion(self, request: Request, req: p.CompletionRequest) -> Response:
        constraint = req.constraint()
        await self._compile(constraint)
        params = self._sampling(req, max_tokens=req.max_tokens, logprobs=req.logprobs, constraint=constraint)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = self._submit(rid, req.prompt, params, self._priority(request, req), request.state.adapter, request)
        if req.stream:
            return self._sse(self._completion_events(rid, req, streams), rid, len(streams))
        choices = await self._collect(request, rid, streams, req.user)
        if choices is None:
            return Response(status_code=CLIENT_GONE)
        token_text = self.engine.tokenizer.token_text
        body = p.completion(rid, req.model, [
            p.completion_choice(i, c.text, None if req.logprobs is None else
                                p.completion_logprobs(c.logprobs, token_text, 0), c.last.finish_reason)
            for i, c in enumerate(choices)], self._usage(choices, req.n))
        self.metrics.count(200)
        return JSONResponse(body)

    async def _parse(self, request: Request, model: type[p.BaseModel]):
        if not self.ready:
            raise self._unavailable("The server is starting or shutting down")
        req = p.parse_body(model, await self._body(request))
        request.state.server = target = self.target(getattr(req, "model", None) or "")
        if isinstance(req, p.GenerateRequest):  # the latest request's keep_alive rules (None: the server's)
            target.engine.set_keep_alive(req.keep_alive)  # for the model it names
        if model is p.ChatCompletionRequest and req.model in self.router.routes:  # a cascade picks per tier
            request.state.adapter = None
            return req
        request.state.adapter = adapters.resolve(target, req.model)  # 404 for an unknown model or adapter
        # responses then name the model as the request did (an adapter's name, as vLLM does)
        return req

    async def _body(self, request: Request) -> bytes:
        """The raw body, refused early when it is not JSON or larger than max_body_bytes."""
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, not {ctype!r}",
                           code="unsupported_media_type")
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"The request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        stall = self.config.body_timeout_seconds
        try:  # counts bytes too: chunked bodies declare no length
            async for chunk in connections.chunks(request.stream(), stall):
                body += chunk
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:
            raise APIError(CLIENT_GONE, "The client disconnected while sending the body") from None
        except TimeoutError:
            raise connections.body_stalled(self.metrics.registry, stall) from None
        return bytes(body)

    @staticmethod
    def _sampling(req: p.GenerateRequest, **kwargs) -> list[SamplingParams]:
        """One SamplingParams per choice; a seeded request gives choice i the seed + i."""
        out = []
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i
            try:
                out.append(SamplingParams(**req.sampling_kwargs(), seed=seed, **kwargs))
            except ValueError as e:  # SamplingParams names the field first: "top_p must be ..."
                raise APIError(400, str(e), param=str(e).split()[0]) from None
        return out

    @staticmethod
    def _priority(request: Request, req: p.GenerateRequest) -> str:
        """The body's `priority` if it sets one, else its API key's class, else the field's default."""
        if "priority" in req.model_fields_set:
            return req.priority
        return getattr(request.state, "service_class", None) or req.priority

    def _submit(self, rid: str, prompts: list, params: list[SamplingParams], priority: str,
                adapter: str | None, request: Request) -> list:
        """Adds n sequences per prompt, all of them or (refused) none."""
        count, limit = len(prompts) * len(params), self.config.max_sequences_per_request
        if count > limit:
            raise APIError(400, f"This request asks for {count} sequences ({len(prompts)} prompts x n={len(params)}); "
                           f"this server takes at most {limit} per request (--max-sequences-per-request). Send "
                           "fewer at a time, or use the Batch API.", param="prompt" if len(prompts) > 1 else "n")
        work = [(f"{rid}-{i * len(params) + j}", prompt, sp) for i, prompt in enumerate(prompts)
                for j, sp in enumerate(params)]
        return self.engine.add_requests(work, PRIORITY_CLASSES[priority], adapter, client_of(request),
                                        self.config.default_max_tokens)

    def _abort(self, rid: str, count: int) -> None:
        for i in range(count):
            self.engine.abort(f"{rid}-{i}")

    async def _outputs(self, streams: list, user: str | None):
        """Yields (choice index, output) from all streams as they arrive; records finished ones."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:  # re-raised in the consumer
                queue.put_nowait((i, e))

        def check(item: RequestOutput) -> None:
            if item.finished:
                self._finished(item, user)
                if item.error:
                    e = item.error
                    raise APIError(e.status, e.message, "invalid_request_error" if e.status < 500 else "server_error",
                                   e.param, e.code)

        if len(streams) == 1:  # the usual n=1: no task and queue hop per token (~7% of a core at 64 streams)
            async with contextlib.aclosing(streams[0]) as stream:  # closed (and aborted) with this generator
                async for item in stream:
                    check(item)
                    yield 0, item
            return
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(streams)
        try:
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                check(item)
                yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def _finished(self, out: RequestOutput, user: str | None) -> None:
        """Latency metrics (not of aborted sequences), energy totals and the usage log."""
        if out.finish_reason != "abort":
            self.metrics.observe(out)
        self.metrics.energy.add(out.bill or Bill(), model=self.model_name, adapter=out.adapter or "", user=user or "")
        if self.usage_log is not None:
            self.usage_log.write(usage_record(out, self.model_name, adapter=out.adapter, user=user,
                                              prompt=prompts.used_label()))

    async def _collect(self, request: Request, rid: str, streams: list, user: str | None) -> list[Choice] | None:
        """Every choice, or None when the client disconnects first (its sequences are aborted)."""
        async def gather():
            choices = [Choice() for _ in streams]
            async with contextlib.aclosing(self._outputs(streams, user)) as outputs:
                async for i, out in outputs:
                    choices[i].add(out)
            return choices

        work = asyncio.create_task(gather())
        gone = asyncio.create_task(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            work.cancel()
            # a stream cancelled before it first ran cannot abort its own sequence
            self._abort(rid, len(streams))
        if work not in done:
            self.metrics.count(CLIENT_GONE)
            return None
        choices = work.result()
        if any(c.last.finish_reason == "abort" for c in choices):
            raise self._unavailable("The request was aborted: the server is shutting down") if not self.ready \
                else APIError(500, "The engine aborted the request", type="server_error")
        return choices

    def _usage(self, choices: list[Choice], n: int) -> dict:
        """Prompts are counted once per prompt, not once per choice."""
        outs = [c.last for c in choices]
        return routing.annotate_usage(p.usage(sum(o.num_prompt_tokens for o in outs[::n]),
                                              sum(o.num_output_tokens for o in outs), [o.metrics for o in outs],
                                              sum((o.bill for o in outs if o.bill), Bill())))

    async def _chat_events(self, rid: str, req: p.ChatCompletionRequest, streams: list, fmt=None, on_body=None):
        """`fmt`: the tool-call format to parse the answer in (content and tool-call deltas);
        `on_body(body)`: gets the whole answer when the stream ends complete."""
        created = int(time.time())

        def chunk(choices, usage=None):
            return p.chat_chunk(rid, req.model, created, choices, usage, req.include_usage)

        token_text = self.engine.tokenizer.token_text
        choices = [Choice() for _ in streams]
        parsers = [tools.ToolStream(fmt) if fmt is not None else None for _ in streams]
        for i in range(len(streams)):
            yield prompts.annotate(chunk([p.chat_chunk_choice(i, {"role": "assistant", "content": ""})]))
        async with contextlib.aclosing(self._outputs(streams, req.user)) as outputs:
            async for i, out in outputs:
                choices[i].add(out)
                logprobs = p.chat_logprobs(out.logprobs, token_text) if out.logprobs else None
                if parsers[i] is None:
                    deltas = [{"content": out.text}] if out.text or logprobs else []
                else:
                    deltas = parsers[i].feed(out.text, out.finished) or ([{}] if logprobs else [])
                for k, delta in enumerate(deltas):
                    yield chunk([p.chat_chunk_choice(i, delta, logprobs if k == 0 else None)])
                if out.finished:
                    finish = out.finish_reason
                    if parsers[i] is not None and parsers[i].ids and finish == "stop":
                        finish = "tool_calls"
                    yield chunk([p.chat_chunk_choice(i, {}, finish_reason=finish)])
        if req.include_usage:
            yield chunk([], self._usage(choices, req.n))
        if on_body is not None and all(c.last is not None and c.last.finish_reason != "abort" for c in choices):
            on_body(self._chat_completion(rid, req, choices, fmt))

    async def _completion_events(self, rid: str, req: p.CompletionRequest, streams: list):
        created = int(time.time())
        token_text = self.engine.tokenizer.token_text
        choices = [Choice() for _ in streams]
        async with contextlib.aclosing(self._outputs(streams, req.user)) as outputs:
            async for i, out in outputs:
                offset = len(choices[i].text)
                choices[i].add(out)
                logprobs = None if req.logprobs is None else p.completion_logprobs(out.logprobs or [],
                                                                                 token_text, offset)
                if out.text or out.logprobs or out.finished:
                    yield p.completion(rid, req.model, [
                        p.completion_choice(i, out.text, logprobs, out.finish_reason)], None, created,
                        req.include_usage)
        if req.include_usage:
            yield p.completion(rid, req.model, [], self._usage(choices, req.n), created)

    def _sse(self, events, rid: str, count: int) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except APIError as e:  # the request's own fault, found after the stream began
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception:  # the status line is gone: the error can only travel in the stream
                log.exception("stream %s failed", rid)
                error = APIError(500, "Internal error while streaming", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
            finally:
                await events.aclose()
                self._abort(rid, count)
            yield "data: [DONE]\n\n"

        self.metrics.count(200)
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- errors -----------------------------------------------------------------------------

    def _unavailable(self, message: str) -> APIError:
        return APIError(503, message, type="server_error", code="service_unavailable",
                        headers={"Retry-After": str(self.config.retry_after_seconds)})

    async def on_api_error(self, request: Request, exc: APIError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            self.metrics.count(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def on_engine_error(self, request: Request, exc: LeanserveError) -> JSONResponse:
        if isinstance(exc, InvalidRequest):
            error = APIError(400, exc.message, param=exc.param)
        elif isinstance(exc, Overloaded):
            error = APIError(429, exc.message, type="server_error", code="server_overloaded",
                             headers={"Retry-After": str(self.config.retry_after_seconds)}) \
                if self.ready else self._unavailable(exc.message)
        else:
            error = APIError(500, exc.message, type="server_error")
        return await self.on_api_error(request, error)

    async def on_http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        """Unknown paths and wrong methods, in OpenAI's shape too; a route of the OpenAI API
        that is not served here says so."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"Invalid URL ({request.method} {request.url.path})"
            if request.url.path.startswith(UNSERVED_OPENAI_ROUTES):
                message = (f"{request.method} {request.url.path} is part of the OpenAI API but is not supported by "
                           f"this server; it serves {', '.join(SERVED_ROUTES)}.")
                code = "unsupported_endpoint"
        return await self.on_api_error(request, APIError(exc.status_code, message, code=code, headers=exc.headers))

    async def on_internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        """A bug: the client gets a 500 in OpenAI's shape and the traceback goes to the log."""
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return await self.on_api_error(request, APIError(500, "Internal server error", type="server_error",
                                                         code="internal_error"))


class _ContainErrors:
    """Answers an unexpected exception with `on_internal_error`'s 500 and keeps the connection.
    Starlette's outermost error middleware would answer it too, but then re-raise it, and
    uvicorn closes the connection of an app that raised: the client's next request on that
    keep-alive connection failed. Once a response has started (a stream) nothing can be sent
    in its place, so the exception goes on up."""

    def __init__(self, app, server: OpenAIServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:
                raise
            response = await self.server.on_internal_error(Request(scope, receive), e)
            await response(scope, receive, send)


def client_of(request: Request) -> str:
    """Who sent a request, for the per-client limits: its bearer key (hashed, so no key sits in
    memory beside the counts), else its peer address; requests the server replays itself (Batch
    API lines, async requests) have neither."""
    auth = request.headers.get("authorization")
    if auth:
        return "key:" + hashlib.sha256(auth.encode()).hexdigest()[:16]
    return f"addr:{request.client.host}" if request.client else "internal"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine, config: ServerConfig | None = None, jobs: JobsConfig | None = None,
               more_models: dict | None = None) -> FastAPI:
    """An app over a loaded engine; its lifespan starts the engine and shuts it down.
    `more_models`: name -> engine, more models served beside the first (built on the same
    SharedStepLoop), each chosen by `model`; the first model's server keeps every other API."""
    config = config or ServerConfig()
    server = OpenAIServer(engine, config)
    for name, other in (more_models or {}).items():
        if name in server.served:
            raise ValueError(f"--model {name}: the name is used twice")
        server.served[name] = OpenAIServer(other, dataclasses.replace(
            config, served_model_name=name, router=RouterConfig(), prompts_dir=None))
    servers = list(server.served.values())
    server.router.check()  # a cascade naming a tier that does not exist: ValueError, before serving

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for s in servers:
            await s.engine.start()
        for s in servers:
            s.ready = True
        yield
        for s in servers:
            s.ready = False
        await shutdown_all(server, SHUTDOWN_GRACE_SECONDS)
        await server.router.close()

    app = FastAPI(title="leanserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_exception_handler(APIError, server.on_api_error)
    app.add_exception_handler(LeanserveError, server.on_engine_error)
    app.add_exception_handler(HTTPException, server.on_http_error)
    app.add_middleware(_ContainErrors, server=server)
    app.get("/health")(server.health)
    app.get("/ready")(server.readiness)
    app.get("/metrics")(server.prometheus)
    api = APIRouter(prefix="/v1", dependencies=[Depends(server.authorize)])
    api.get("/models", **openapi.spec(None))(server.models)
    api.post("/chat/completions", **openapi.spec(p.ChatCompletionRequest, *openapi.GENERATE, ok=openapi.STREAM))(
        server.chat_completions)
    api.post("/completions", **openapi.spec(p.CompletionRequest, *openapi.GENERATE, ok=openapi.STREAM))(
        server.completions)
    embedder = getattr(engine, "embedding_model", None)
    if embedder is not None:
        from .embeddings import EmbeddingRequest, EmbeddingsAPI

        server.embeddings_api = EmbeddingsAPI(server, embedder.name)  # also the Batch API's /v1/embeddings
        api.post("/embeddings", **openapi.spec(EmbeddingRequest, *openapi.GENERATE))(server.embeddings_api.embeddings)
    app.include_router(api)
    app.include_router(adapters.adapter_router(server))
    if jobs is not None:
        from .batch_api import batch_router  # it imports this module
        from .responses import responses_router  # it too; it stores in the job store's data directory

        app.include_router(batch_router(server, jobs))
        app.include_router(responses_router(server))
        from .fine_tuning import fine_tuning_router  # it needs the job store's files

        app.include_router(fine_tuning_router(server, jobs))
        if embedder is not None:  # vector stores need files to ingest and a model to embed them
            from .vector_stores import server_router

            try:
                app.include_router(server_router(server, server.job_store, jobs.vector_store, jobs.data_dir))
            except ImportError as e:  # installed without the rag extra: everything else still serves
                log.warning("no /v1/vector_stores: %s (pip install 'leanserve[rag]')", e)
    openapi.install(app)
    return app


class _DrainingServer(uvicorn.Server):
    """One drain window from the shutdown signal on. uvicorn alone waits its graceful timeout
    for the connections, then cancels the requests still running (each a 500, from the
    CancelledError) and only then runs the lifespan shutdown, whose engine drain has nothing
    left to drain. Here the engine drains at once, beside uvicorn's wait: at
    SHUTDOWN_GRACE_SECONDS it aborts what still runs, those requests answer 503 (a stream ends
    with finish_reason "abort"), and uvicorn, which waits twice as long, cancels only a request
    stuck elsewhere."""

    def __init__(self, config: uvicorn.Config, openai_server: OpenAIServer):
        super().__init__(config)
        self.openai_server = openai_server

    def handle_exit(self, sig, frame) -> None:
        for s in self.openai_server.served.values():
            s.ready = False
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.create_task(shutdown_all(self.openai_server, SHUTDOWN_GRACE_SECONDS))
        await super().shutdown(sockets)  # its lifespan shutdown finds the engine drained
        await drain


async def shutdown_all(server: OpenAIServer, timeout: float) -> None:
    """Drains every model's engine at once (each waits up to `timeout` for its requests)."""
    await asyncio.gather(*(s.engine.shutdown(timeout) for s in server.served.values()))


def run_server(engine, config: ServerConfig, jobs: JobsConfig | None = None, more_models: dict | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then: /ready and new requests get 503, requests in
    flight get SHUTDOWN_GRACE_SECONDS to finish before they are aborted (and answer 503), the
    engine stops. Connections that are slow to send a request are cut (connections.py)."""
    app = create_app(engine, config, jobs, more_models)
    protocol = connections.header_timeout_protocol(config.header_timeout_seconds,
                                                   app.state.server.metrics.registry)
    server = _DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, http=protocol,
                                            timeout_graceful_shutdown=2 * SHUTDOWN_GRACE_SECONDS),
                             app.state.server)
    # After a graceful stop uvicorn re-raises the signal it caught, under the handlers it found,
    # so that the default ones end the process. Ignoring them lets a clean shutdown exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    banner.show(app.state.server, jobs.data_dir if jobs else None)
    server.run()
