"""`POST /v1/embeddings`: sentence embeddings from the server's embedding model.

The embedding model runs on the engine's step thread between generation steps, in batches
bounded by a token budget (AsyncEngine.embed), so a bulk ingestion cannot starve
realtime chat. Inputs longer than the model takes are a 400 unless the request asks for
truncation with vLLM's `truncate_prompt_tokens` (-1: the model's limit; k: keep k tokens).
"""
from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field, PlainValidator

from ..engine.sequence import PRIORITY_CLASSES
from . import protocol as p
from .protocol import APIError

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


def _inputs(value) -> list[str | list[int]]:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of them."""
    prompts = p._prompts(value)
    if len(prompts) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(prompts)}")
    if any(isinstance(x, str) and not x for x in prompts):
        raise ValueError("inputs must not be empty strings")
    return prompts


class EmbeddingRequest(p._Strict):
    model: str
    input: Annotated[list[str | list[int]], PlainValidator(_inputs)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's extension: -1 or k >= 1
    priority: Literal["realtime", "standard", "batch"] = "realtime"


def encode(vector: np.ndarray, fmt: str):
    """A float list, or base64 of little-endian float32 (what the openai client asks for)."""
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(np.float32).tolist()


class EmbeddingsAPI:
    def __init__(self, server, model_name: str):
        self.server, self.model_name = server, model_name

    def token_lists(self, req: EmbeddingRequest) -> list[list[int]]:
        model = self.server.engine.embedding_model
        limit = model.max_length
        texts = [item for item in req.input if isinstance(item, str)]
        encoded = iter(model.tokenize(texts) if texts else [])
        lists = []
        for i, item in enumerate(req.input):
            ids = next(encoded) if isinstance(item, str) else list(item)
            if not isinstance(item, str) and any(t >= model.vocab_size for t in ids):
                raise APIError(400, f"input[{i}] has token ids outside this model's vocabulary of {model.vocab_size} "
                               "(LangChain's OpenAIEmbeddings sends tiktoken ids unless check_embedding_ctx_length="
                               "False)", param="input")
            keep = req.truncate_prompt_tokens
            if keep is not None:  # a text keeps its end token ([SEP]), as sentence-transformers cuts
                ids = model.truncate(ids, limit if keep == -1 else min(keep, limit)) if isinstance(item, str) \
                    else ids[:limit if keep == -1 else min(keep, limit)]
            if len(ids) > limit:
                raise APIError(400, f"input[{i}] has {len(ids)} tokens; this model takes at most {limit} (set "
                               "truncate_prompt_tokens to -1 to have longer inputs cut)", param="input")
            if not ids:
                raise APIError(400, f"input[{i}] is empty", param="input")
            lists.append(ids)
        return lists

    async def embeddings(self, request: Request) -> JSONResponse:
        server = self.server
        if not server.ready:
            raise server._unavailable("The server is starting or shutting down")
        req = p.parse_body(EmbeddingRequest, await server._body(request))
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist or is not an embedding model; this server "
                           f"embeds with '{self.model_name}'", param="model", code="model_not_found")
        model = server.engine.embedding_model
        if req.dimensions is not None and req.dimensions != model.dim and not (
                model.supports_dimensions and req.dimensions < model.dim):
            raise APIError(400, f"This model's embeddings have {model.dim} dimensions and cannot be shortened "
                           f"(dimensions={req.dimensions})", param="dimensions")
        if req.truncate_prompt_tokens == 0:
            raise APIError(400, "truncate_prompt_tokens must be -1 (the model's limit) or at least 1",
                           param="truncate_prompt_tokens")
        lists = self.token_lists(req) if len(req.input) <= 16 else await asyncio.to_thread(self.token_lists, req)
        priority = req.priority if "priority" in req.model_fields_set else \
            getattr(request.state, "service_class", None) or req.priority
        started = time.perf_counter()
        vectors, bill = await server.engine.embed(lists, PRIORITY_CLASSES[priority])
        if req.dimensions is not None and req.dimensions != model.dim:
            vectors = model.shorten(torch.from_numpy(vectors), req.dimensions).numpy()
        tokens = sum(map(len, lists))
        server.metrics.energy.add(bill, model=self.model_name, adapter="", user=req.user or "")
        usage = {"prompt_tokens": tokens, "total_tokens": tokens,
                 "leanserve": {"embed_ms": round(1000 * (time.perf_counter() - started), 3)} | bill.usage()}
        server.metrics.count(200)
        return JSONResponse({"object": "list", "model": req.model, "usage": usage,
                             "data": [{"object": "embedding", "index": i, "embedding": encode(v, req.encoding_format)}
                                      for i, v in enumerate(vectors)]})
