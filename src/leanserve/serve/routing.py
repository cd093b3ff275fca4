"""Chat completions through the router: the response cache first, then a cascade route or
the model the request names.

A cache hit or a cascade's answer is a finished body; a streamed request gets it replayed
as chunks (a cascade buffers each tier's answer until it is accepted: the first byte comes
when the answering tier is done, and nothing streamed ever has to be taken back).
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
import uuid
import weakref
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter, Gauge

from ..config import RouterConfig
from ..engine.sequence import PRIORITY_CLASSES
from ..router import cascade as cc
from ..router.cache import DEFAULT_SEMANTIC_THRESHOLD, Entry, Hit, ResponseCache, deterministic
from . import adapters, protocol as p
from .protocol import APIError

NOTE: ContextVar[dict | None] = ContextVar("leanserve_cache_note", default=None)
# Fields of ours an upstream (OpenAI, vLLM) would refuse or misread: never forwarded.
NOT_FORWARDED = ("priority", "cache", "prompt")


def annotate_usage(usage: dict) -> dict:
    """`usage.leanserve.cache` of a request the cache looked at (a miss, or why it was skipped)."""
    note = NOTE.get()
    if note is not None and "leanserve" in usage:
        usage["leanserve"]["cache"] = note
    return usage


@dataclass
class CachePlan:
    key: str
    scope: str
    vector: np.ndarray | None
    tenant: str
    adapter: object | None  # the Adapter object, to notice its replacement


class Router:
    def __init__(self, server, config: RouterConfig):
        self.server, self.config = server, config
        registry = server.metrics.registry
        threshold = DEFAULT_SEMANTIC_THRESHOLD if config.cache_threshold is None else config.cache_threshold
        self.cache = ResponseCache(config.response_cache, config.cache_max_entries, config.cache_ttl_seconds,
                                   threshold) if config.response_cache != "off" else None
        self.routes = {r.name: r for r in config.cascades}
        self.upstreams = {u.name: cc.UpstreamClient(u) for u in config.upstreams}
        self.cache_requests = Counter("leanserve_response_cache_requests_total",
                                      "Chat requests the response cache looked at, by result", ["result"],
                                      registry=registry)
        self.cache_saved = Counter("leanserve_response_cache_saved_joules_total",
                                   "Energy the response cache's hits did not spend (what the answers first cost)",
                                   registry=registry)
        Gauge("leanserve_response_cache_entries", "Responses in the cache", registry=registry).set_function(
            lambda: len(self.cache) if self.cache is not None else 0)
        self.cascade_answers = Counter("leanserve_cascade_requests_total", "Cascade requests by the tier that answered",
                                       ["route", "tier"], registry=registry)
        self.cascade_escalations = Counter("leanserve_cascade_escalations_total",
                                           "Cascade answers not accepted, by the tier that gave them",
                                           ["route", "tier"], registry=registry)
        self.cascade_errors = Counter("leanserve_cascade_tier_errors_total", "Cascade tiers that failed to answer",
                                      ["route", "tier"], registry=registry)

    # -- startup -----------------------------------------------------------------------------

    def check(self) -> None:
        """Every route's tiers exist (a local model or adapter, or an upstream); names do not clash."""
        s = self.server
        local = set()
        for model in getattr(s, "served", {s.model_name: s}).values():  # every local model and its adapters
            lora = getattr(model.engine, "lora", None)
            local |= {model.model_name, *(lora.adapters if lora is not None else ())}
        for route in self.routes.values():
            if route.name in local or route.name in self.upstreams:
                raise ValueError(f"--cascade {route.name}: the name is taken by a model, adapter or upstream")
            for tier in route.tiers:
                if tier not in local and tier not in self.upstreams:
                    raise ValueError(f"--cascade {route.name}: unknown tier `{tier}` (not the model `{s.model_name}`, "
                                     "a registered adapter or an --upstream)")

    async def close(self) -> None:
        for client in self.upstreams.values():
            await client.close()

    def model_entries(self) -> list[dict]:
        return [{"id": r.name, "object": "model", "created": self.server.created, "owned_by": "leanserve",
                 "leanserve": {"kind": "cascade", "tiers": r.tiers, "rule": f"{r.rule[0]}:{r.rule[1]:g}"}}
                for r in self.routes.values()]

    # -- the request path --------------------------------------------------------------------

    async def chat(self, request: Request, req: p.ChatCompletionRequest) -> Response:
        plan, hit = await self._look_up(request, req)
        if hit is not None:
            return self._replay(req, self._hit_body(hit))
        store = None if plan is None else (lambda body: self._store(plan, body))
        route = self.routes.get(req.model)
        if route is None:
            return await self.server.run_chat(request, req, request.state.adapter, on_body=store)
        body = await self._cascade(request, req, route)
        if body is None:
            return Response(status_code=499)
        if store is not None:
            store(body)
        return self._replay(req, body)

    def _replay(self, req: p.ChatCompletionRequest, body: dict) -> Response:
        self.server.metrics.count(200)
        if not req.stream:
            return JSONResponse(body)

        async def events():
            for chunk in replay_chunks(body, req.include_usage):
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- the cache ---------------------------------------------------------------------------

    def _mode(self, req: p.ChatCompletionRequest) -> tuple[str, float | None, str | None]:
        """(mode, threshold, a note why it is narrower than asked) for this request."""
        asked = req.cache.mode if isinstance(req.cache, p.CacheOptions) else req.cache
        threshold = req.cache.threshold if isinstance(req.cache, p.CacheOptions) else None
        server_mode = self.cache.mode if self.cache is not None else "off"
        if asked is None:
            return server_mode, threshold, None
        if asked == "off":
            return "off", None, None
        if server_mode == "off":
            return "off", None, "this server runs without a response cache (--response-cache)"
        if asked == "semantic" and server_mode == "exact":
            return "exact", threshold, "this server's response cache is exact only"
        return asked, threshold, None

    async def _look_up(self, request: Request, req: p.ChatCompletionRequest) -> tuple[CachePlan | None, Hit | None]:
        mode, threshold, note = self._mode(req)
        if request.client is None:  # a Batch API line or async request the server replays: no key to keep
            mode, note = "off", None  # tenants apart by, so no cache
        if mode == "off":
            if note:
                NOTE.set({"type": "none", "note": note})
            return None, None
        fields = req.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if not deterministic(fields):
            self.cache_requests.labels(result="skipped").inc()
            NOTE.set({"type": "none", "note": "not cached: only deterministic requests (temperature 0 or a seed) are cached"})
            return None, None
        auth = request.headers.get("authorization")
        tenant = "" if not auth else hashlib.sha256(auth.encode()).hexdigest()
        lora = getattr(self.server.engine, "lora", None)
        adapter = lora.adapters.get(request.state.adapter) if lora is not None and request.state.adapter else None
        key, scope, last_turn = self.cache.keys(fields, tenant)
        plan = CachePlan(key, scope, None, tenant, adapter)
        hit = self.cache.get_exact(key, adapter)
        if hit is None and mode == "semantic" and last_turn is not None \
                and getattr(self.server.engine, "embedding_model", None) is not None:
            plan.vector = await self._embed(last_turn)
            hit = self.cache.get_semantic(scope, plan.vector, adapter, threshold)
        result = "miss" if hit is None else f"{hit.kind}_hit"
        self.cache_requests.labels(result=result).inc()
        if hit is not None:
            self.cache_saved.inc(hit.saved_joules)
        else:
            NOTE.set({"type": "miss", **({"note": note} if note else {})})
        return plan, hit

    async def _embed(self, text: str) -> np.ndarray:
        engine = self.server.engine
        ids = engine.embedding_model.tokenize([text])
        vectors, _ = await engine.embed(ids, PRIORITY_CLASSES["realtime"], truncate=True)
        v = vectors[0].astype(np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def _store(self, plan: CachePlan, body: dict) -> None:
        if any(c.get("finish_reason") not in ("stop", "length", "tool_calls") for c in body.get("choices", [])):
            return
        joules = ((body.get("usage") or {}).get("leanserve") or {}).get("energy_joules", 0.0)
        ref = weakref.ref(plan.adapter) if plan.adapter is not None else None
        self.cache.put(plan.key, Entry(copy.deepcopy(body), float(joules), plan.tenant, ref, scope=plan.scope,
                                       vector=plan.vector))

    @staticmethod
    def _hit_body(hit: Hit) -> dict:
        body = copy.deepcopy(hit.body)
        source = body.get("id")
        body.update(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()))  # `model`: what answered
        usage = body.setdefault("usage", {})
        usage["leanserve"] = {"queue_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "energy_joules": 0.0,
                              "carbon_grams": 0.0, "cost_usd": 0.0,
                              "energy_source": (usage.get("leanserve") or {}).get("energy_source", ""),
                              "cache": {"type": hit.kind, "similarity": hit.similarity,
                                        "saved_joules": round(hit.saved_joules, 6), "source_id": source}}
        return body

    # -- the cascade -------------------------------------------------------------------------

    async def _cascade(self, request: Request, req: p.ChatCompletionRequest, route: cc.Route) -> dict | None:
        if req.n != 1:
            raise APIError(400, f"The cascade route `{route.name}` answers one choice; n must be 1", param="n")
        results: list[cc.TierResult] = []
        for i, tier in enumerate(route.tiers):
            last = i == len(route.tiers) - 1
            result = cc.TierResult(tier)
            try:
                result.body = await self._ask_tier(request, req, tier, want_logprobs=not last)
            except cc.UpstreamError as e:
                result.error, result.timeout = str(e), e.timeout
                self.cascade_errors.labels(route=route.name, tier=tier).inc()
                results.append(result)
                continue
            if result.body is None:
                return None  # the client went away
            result.token_logprobs = cc.token_logprobs(result.body)
            result.confidence = cc.confidence(result.token_logprobs, route.rule[0])
            result.accepted = last or result.confidence >= route.rule[1]
            results.append(result)
            if result.accepted:
                break
            self.cascade_escalations.labels(route=route.name, tier=tier).inc()
        answered = [r for r in results if r.body is not None]
        if not answered:
            timeout = all(r.timeout for r in results)
            raise APIError(504 if timeout else 502, f"No tier of the cascade `{route.name}` answered: " +
                           "; ".join(r.error or "" for r in results), type="server_error",
                           code="upstream_timeout" if timeout else "upstream_error")
        chosen = next((r for r in answered if r.accepted), None)
        if chosen is None:  # the accepting tier failed: the most confident answer there is
            chosen = max(answered, key=lambda r: r.confidence if r.confidence is not None else -1e9)
        self.cascade_answers.labels(route=route.name, tier=chosen.tier).inc()
        return self._cascade_body(req, route, chosen, results)

    async def _ask_tier(self, request: Request, req: p.ChatCompletionRequest, tier: str,
                        want_logprobs: bool) -> dict | None:
        logprobs = req.logprobs or want_logprobs
        if tier in self.upstreams:
            body = req.model_dump(mode="json", by_alias=True, exclude_unset=True)
            for name in NOT_FORWARDED:
                body.pop(name, None)
            body.update(stream=False, logprobs=logprobs)
            body.pop("stream_options", None)
            return await self.upstreams[tier].chat(body)
        target = self.server.target(tier) if hasattr(self.server, "target") else self.server  # a local model
        adapter = adapters.resolve(target, tier)
        tier_req = req.model_copy(update={"model": tier, "stream": False, "stream_options": None, "logprobs": logprobs})
        return await target.chat_body(request, tier_req, adapter)

    @staticmethod
    def _cascade_body(req: p.ChatCompletionRequest, route: cc.Route, chosen: cc.TierResult,
                      results: list[cc.TierResult]) -> dict:
        body = copy.deepcopy(chosen.body)
        if not req.logprobs:
            for choice in body.get("choices", []):
                choice["logprobs"] = None
        usage = body.setdefault("usage", {})
        bill = dict(usage.get("leanserve") or {})
        bill.pop("cache", None)
        bill.update(cc.total_bill(results))
        bill.update(route=route.name, tier=chosen.tier, tiers=[r.record() for r in results])
        if not chosen.accepted:
            bill["note"] = "the tier that would have been asked next failed: this is the most confident answer"
        usage["leanserve"] = bill
        return body


def replay_chunks(body: dict, include_usage: bool) -> list[dict]:
    """A finished chat completion as the chunks a stream of it would have sent."""
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}

    def chunk(choices, usage=None):
        out = dict(base, choices=choices)
        if include_usage:
            out["usage"] = usage
        return out

    chunks = []
    for choice in body.get("choices", []):
        i, message = choice["index"], choice.get("message") or {}
        chunks.append(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        if message.get("content"):
            chunks.append(chunk([{"index": i, "delta": {"content": message["content"]}, "logprobs": choice.get("logprobs"),
                                  "finish_reason": None}]))
        for k, call in enumerate(message.get("tool_calls") or []):
            chunks.append(chunk([{"index": i, "delta": {"tool_calls": [dict(call, index=k)]}, "finish_reason": None}]))
        chunks.append(chunk([{"index": i, "delta": {}, "finish_reason": choice.get("finish_reason")}]))
    if include_usage:
        chunks.append(chunk([], body.get("usage")))
    return chunks
