"""LoRA adapters over HTTP: naming them in `model`, listing them, loading and deleting them.

A request names an adapter as `model: "<adapter>"` or `"<base>:<adapter>"` (vLLM, LoRAX).
`POST /v1/adapters {"name", "path"}` registers one (also at vLLM's
`/v1/load_lora_adapter` with `lora_name` / `lora_path`); `DELETE /v1/adapters/{name}` (and
vLLM's `/v1/unload_lora_adapter`) removes it while requests already running on it finish.
The file is read and checked in a worker thread, never on the event loop or the step thread.

Status codes: unknown adapter 404 (`model_not_found`, as OpenAI for an unknown model); a
path outside the allowed adapter directories 403 (`path_not_allowed`); an adapter that
does not fit the base model, a corrupt file or a rank above --max-lora-rank 400
(`invalid_adapter`); a name in use 400.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator

from .. import jsonsafe
from ..errors import InvalidRequest, ModelLoadError
from . import openapi, protocol as p
from .metrics import LoRAMetrics
from .protocol import APIError


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    path: str

    @field_validator("name", "path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:  # os.stat would raise ValueError deep in the loader
            raise ValueError("must not contain a null byte")
        return value


def _lora(server):
    return getattr(server.engine, "lora", None)


def resolve(server, model: str) -> str | None:
    """The adapter a request's `model` names, None for the base model; 404 if neither."""
    lora = _lora(server)
    if model == server.model_name:
        return None
    name = model[len(server.model_name) + 1:] if model.startswith(server.model_name + ":") else model
    if lora is None or name not in lora.adapters:
        served = [server.model_name, *(lora.adapters if lora is not None else ())]
        listed = ", ".join(f"`{n}`" for n in served[:20]) + (f" and {len(served) - 20} more" if len(served) > 20 else "")
        raise APIError(404, f"The model `{model}` does not exist. This server serves {listed} (GET /v1/models "
                       "lists them).", param="model", code="model_not_found")
    server.lora_metrics.requests.labels(adapter=name).inc()
    return name


def model_entries(server) -> list[dict]:
    """/v1/models rows of the adapters, with `parent` / `root` as vLLM lists them."""
    lora = _lora(server)
    if lora is None:
        return []
    return [{"id": a.name, "object": "model", "created": server.created, "owned_by": "leanserve",
             "root": a.path, "parent": server.model_name}
            for a in list(lora.adapters.values())]


def adapter_router(server) -> APIRouter:
    lora = _lora(server)
    metrics = LoRAMetrics(server.metrics.registry, lora)
    server.lora_metrics = metrics
    if lora is not None:
        for seconds in list(lora.load_seconds):  # the adapters registered at start
            metrics.loaded("", seconds)
        lora.on_load.append(metrics.loaded)

    async def load(request: Request) -> JSONResponse:
        req = p.parse_body(LoadAdapter, _vllm_names(await server._body(request)))
        if lora is None:
            raise APIError(400, "LoRA adapters are not enabled on this server")
        started = time.perf_counter()
        try:
            adapter = await asyncio.to_thread(lora.register, req.name, req.path)
        except PermissionError as e:
            raise APIError(403, str(e), param="path", code="path_not_allowed") from None
        except ModelLoadError as e:
            raise APIError(400, e.message, param="path", code="invalid_adapter") from None
        except InvalidRequest as e:
            raise APIError(400, e.message, param=e.param) from None
        server.metrics.count(200)
        return JSONResponse({"id": adapter.name, "object": "adapter", "root": adapter.path,
                             "parent": server.model_name, "rank": adapter.rank, "targets": adapter.targets,
                             "load_ms": round(1000 * (time.perf_counter() - started), 2)})

    async def delete(name: str) -> JSONResponse:
        try:
            lora.unregister(name)
        except (KeyError, AttributeError):
            raise APIError(404, f"The adapter `{name}` does not exist.", param="name",
                           code="model_not_found") from None
        server.metrics.count(200)
        return JSONResponse({"id": name, "object": "adapter", "deleted": True})

    async def vllm_unload(request: Request) -> JSONResponse:
        body = await server._body(request)
        try:
            data = jsonsafe.loads(body)
        except ValueError as e:
            raise p.unparsable(e) from None
        name = (data.get("lora_name") or data.get("name")) if isinstance(data, dict) else None
        if not isinstance(name, str):
            raise APIError(400, "lora_name is required", param="lora_name")
        return await delete(name)

    router = APIRouter(prefix="/v1", dependencies=[Depends(server.authorize)])
    router.post("/adapters", **openapi.spec(LoadAdapter, *openapi.JSON_BODY, 403))(load)
    router.delete("/adapters/{name}", **openapi.spec(None, 404))(delete)
    router.post("/load_lora_adapter", **openapi.spec(openapi.VLLMLoadAdapter, *openapi.JSON_BODY, 403))(load)
    router.post("/unload_lora_adapter", **openapi.spec(openapi.UNLOAD_ADAPTER, *openapi.JSON_BODY, 404))(vllm_unload)
    return router


def _vllm_names(body: bytes) -> bytes:
    """vLLM's load body says lora_name / lora_path; ours name / path."""
    if b"lora_name" not in body and b"lora_path" not in body:
        return body
    try:
        data = jsonsafe.loads(body)
    except ValueError:
        return body  # parse_body says what is wrong with it
    if isinstance(data, dict):
        data = {{"lora_name": "name", "lora_path": "path"}.get(k, k): v for k, v in data.items()}
    return json.dumps(data).encode()
