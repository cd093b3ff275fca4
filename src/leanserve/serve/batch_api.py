"""The Batch API (`/v1/files`, `/v1/batches`) and async requests (`/v1/async/...`).

The routes keep work in a `JobStore`; a `JobWorker` runs it. Each stored request is
answered by replaying it through the server's own handler (`OpenAIServer.chat_completions`
or `.completions`) as an in-memory HTTP request, so a batch line or an async request gets
exactly the body, and the errors, the live endpoint would give.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..errors import LeanserveError
from ..jobs import JobsConfig
from ..jobs.carbon_schedule import deadline_of, window_seconds
from ..jobs.store import JobStore
from ..jobs.worker import EngineRates, JobWorker
from . import openapi, protocol as p
from .app import CLIENT_GONE, OpenAIServer
from .protocol import APIError

log = logging.getLogger("leanserve.serve")



async def _embeddings(server: OpenAIServer, request: Request):
    api = getattr(server, "embeddings_api", None)
    if api is None:
        raise APIError(400, "This server has no embedding model (started with --embedding-model none)", param="url")
    return await api.embeddings(request)


HANDLERS = {"/v1/chat/completions": OpenAIServer.chat_completions, "/v1/completions": OpenAIServer.completions,
            "/v1/embeddings": _embeddings}
TRY_LATER = {429, 503, CLIENT_GONE}  # overloaded, shutting down, stopped: not an answer to store
FORM_OVERHEAD = 64 * 1024  # multipart headers and the purpose field, on top of the file
FILE_PURPOSES = ("batch", "assistants", "user_data", "fine-tune")  # batch input; vector store files; training
MIN_MEASURED_TOKENS = 512  # the engine's own rates are trusted after it has run this many


# -- replaying a request through the live handler ---------------------------------------------

def _replayed_request(path: str, body: bytes, stop: asyncio.Event) -> Request:
    """An in-memory POST of `body` to `path`. Its client "disconnects" when `stop` is set,
    which makes the handler abort the request's sequences."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await stop.wait()
        return {"type": "http.disconnect"}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": headers},
                   receive)


async def answer(server: OpenAIServer, path: str, body: bytes, priority: str,
                 stop: asyncio.Event) -> tuple[int, dict] | None:
    """What the live endpoint at `path` answers to `body` run in service class `priority`
    (which overrides the body's own): (status, JSON body), or None when it must be asked
    again later (overloaded, shutting down, stopped)."""
    body = json.dumps(dict(json.loads(body), priority=priority)).encode()
    request = _replayed_request(path, body, stop)
    try:
        response = await HANDLERS[path](server, request)
    except APIError as e:
        response = await server.on_api_error(request, e)
    except LeanserveError as e:
        response = await server.on_engine_error(request, e)
    except Exception as e:  # a bug: answer as the live endpoint would, with a 500
        log.exception("replayed %s request failed", path)
        response = await server.on_internal_error(request, e)
    status = response.status_code
    if status in TRY_LATER or (status >= 500 and not server.ready):
        return None
    return status, json.loads(response.body)


# -- response shapes --------------------------------------------------------------------------

def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def batch_object(row: dict) -> dict:
    errors = json.loads(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"],
        "errors": None if errors is None else {"object": "list", "data": errors},
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        "created_at": row["created_at"], "in_progress_at": row["in_progress_at"],
        "expires_at": deadline_of(row),
        "finalizing_at": row["finalizing_at"],
        "completed_at": row["completed_at"], "failed_at": row["failed_at"], "expired_at": row["expired_at"],
        "cancelling_at": row["cancelling_at"], "cancelled_at": row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        # extension: when its lines run and the carbon that saves (jobs.carbon_schedule.Plan);
        # null until its input is validated
        "leanserve": json.loads(row["plan"]) if row["plan"] else None,
    }


def async_object(row: dict) -> dict:
    """An async request; `response` is {status_code, body} once it is completed or failed."""
    done = row["response"] is not None
    return {"id": row["id"], "object": "async_request", "endpoint": row["endpoint"], "status": row["status"],
            "created_at": row["created_at"], "started_at": row["started_at"], "completed_at": row["completed_at"],
            "response": {"status_code": row["status_code"], "body": json.loads(row["response"])} if done else None}


def list_object(rows: list[dict], limit: int, shape) -> dict:
    """OpenAI's cursor page; `rows` holds one row more than `limit` when there are more."""
    data = [shape(row) for row in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: str  # "24h" as OpenAI's; also any "Nh" up to a week (jobs.carbon_schedule)
    metadata: dict[str, str] | None = None

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        window_seconds(value)
        return value


# -- routes -----------------------------------------------------------------------------------

class BatchAPI:
    def __init__(self, server: OpenAIServer, config: JobsConfig):
        self.server = server
        self.config = config
        self.store = JobStore(config.data_dir)
        self.worker = JobWorker(self.store, functools.partial(answer, server), server.model_name, config,
                                self.rates)

    def rates(self) -> EngineRates:
        """Tokens per second of engine time and joules per token, from this server's energy
        bill: both over every token the engine has run (prefill and decode)."""
        engine = self.server.engine
        billed, _, _ = engine.ledger.totals()
        tokens = engine.stats().get("tokens_run", 0)
        pue = engine.ledger.carbon.pue
        if tokens < MIN_MEASURED_TOKENS or billed.active_seconds <= 0:
            return EngineRates(pue=pue)
        return EngineRates(tokens / billed.active_seconds, billed.energy_joules / tokens or None, pue)

    def _ok(self, body: dict, status: int = 200, headers: dict | None = None) -> JSONResponse:
        self.server.metrics.count(status)
        return JSONResponse(body, status_code=status, headers=headers)

    # files

    async def upload_file(self, request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise APIError(415, "Content-Type must be multipart/form-data", code="unsupported_media_type")
        limit = self.config.max_file_bytes
        too_large = APIError(413, f"The file is larger than {limit} bytes", param="file", code="file_too_large")
        declared = request.headers.get("content-length", "")
        chunks = _chunks(request, limit + FORM_OVERHEAD)
        try:
            if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
                async for _ in chunks:  # read and drop it all, then refuse
                    pass
                raise _TooLarge
            form = await MultiPartParser(request.headers, chunks, max_files=1, max_fields=8).parse()
        except _TooLarge:
            raise too_large from None
        except MultiPartException as e:
            raise APIError(400, f"Invalid multipart body: {e.message}") from None
        except ClientDisconnect:
            raise APIError(CLIENT_GONE, "The client disconnected while sending the file") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if purpose not in FILE_PURPOSES:
                raise APIError(400, f"'purpose' must be one of {', '.join(FILE_PURPOSES)}, not {purpose!r}",
                               param="purpose")
            if not isinstance(upload, UploadFile):
                raise APIError(400, "Missing the 'file' part", param="file")
            temp = self.store.new_temp_path()
            if await asyncio.to_thread(_copy, upload.file, temp) > limit:
                temp.unlink()
                raise too_large
            row = await asyncio.to_thread(self.store.add_file, temp, upload.filename or "input.jsonl", purpose)
        finally:
            await form.close()
        return self._ok(file_object(row))

    async def list_files(self, request: Request) -> JSONResponse:
        q = request.query_params
        limit = _limit(q, default=10000, maximum=10000)
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise APIError(400, "'order' must be 'asc' or 'desc'", param="order")
        rows = await asyncio.to_thread(self.store.list_files, q.get("after"), limit + 1, order, q.get("purpose"))
        return self._ok(list_object(rows, limit, file_object))

    async def retrieve_file(self, file_id: str) -> JSONResponse:
        return self._ok(file_object(await self._file(file_id)))

    async def file_content(self, file_id: str) -> Response:
        await self._file(file_id)
        self.server.metrics.count(200)
        return FileResponse(self.store.file_path(file_id), media_type="application/octet-stream")

    async def delete_file(self, file_id: str) -> JSONResponse:
        if not await asyncio.to_thread(self.store.delete_file, file_id):
            raise _not_found("File", file_id)
        return self._ok({"id": file_id, "object": "file", "deleted": True})

    async def _file(self, file_id: str) -> dict:
        row = await asyncio.to_thread(self.store.file, file_id)
        if row is None:
            raise _not_found("File", file_id)
        return row

    # batches

    async def create_batch(self, request: Request) -> JSONResponse:
        try:
            req = BatchCreateRequest.model_validate_json(await self.server._body(request))
        except ValidationError as e:
            raise p.validation_error(e) from None
        source = await asyncio.to_thread(self.store.file, req.input_file_id)
        if source is None:
            raise _not_found("File", req.input_file_id, param="input_file_id")
        if source["purpose"] != "batch":
            raise APIError(400, f"File {req.input_file_id} has purpose {source['purpose']!r}, not 'batch'",
                           param="input_file_id")
        row = await asyncio.to_thread(self.store.create_batch, req.input_file_id, req.endpoint,
                                      req.completion_window, req.metadata)
        self.worker.wake()
        return self._ok(batch_object(row))

    async def retrieve_batch(self, batch_id: str) -> JSONResponse:
        return self._ok(batch_object(await self._batch(batch_id)))

    async def list_batches(self, request: Request) -> JSONResponse:
        limit = _limit(request.query_params, default=20, maximum=100)
        rows = await asyncio.to_thread(self.store.list_batches, request.query_params.get("after"), limit + 1)
        return self._ok(list_object(rows, limit, batch_object))

    async def cancel_batch(self, batch_id: str) -> JSONResponse:
        row = await asyncio.to_thread(self.store.cancel_batch, batch_id)
        if row is None:
            raise _not_found("Batch", batch_id)
        if row["status"] not in ("cancelling", "cancelled"):
            raise APIError(409, f"A batch with status '{row['status']}' cannot be cancelled",
                           code="batch_not_cancellable")
        self.worker.wake()
        return self._ok(batch_object(row))

    async def _batch(self, batch_id: str) -> dict:
        row = await asyncio.to_thread(self.store.batch, batch_id)
        if row is None:
            raise _not_found("Batch", batch_id)
        return row

    # async requests

    async def submit_chat(self, request: Request) -> JSONResponse:
        """Checks the body as the live endpoint would, so a bad one is refused now, not later."""
        path = "/v1/chat/completions"
        body = await self.server._body(request)
        req = await self.server._parse(_replayed_request(path, body, asyncio.Event()), p.ChatCompletionRequest)
        if req.stream:
            raise APIError(400, "'stream' is not supported for async requests", param="stream")
        await self.server.chat_plan(req)  # a bad schema or tool is refused now, not when it runs
        row = await asyncio.to_thread(self.store.add_async, path, body.decode())
        self.worker.wake()
        return self._ok(async_object(row), 202, {"Location": f"/v1/async/{row['id']}"})

    async def retrieve_async(self, request_id: str) -> JSONResponse:
        row = await asyncio.to_thread(self.store.async_request, request_id)
        if row is None:
            raise _not_found("Async request", request_id)
        return self._ok(async_object(row))


def batch_router(server: OpenAIServer, config: JobsConfig) -> APIRouter:
    """The routes under /v1, with a lifespan that starts the job worker once the engine runs
    and stops it before the engine stops: `app.include_router(batch_router(server, config))`."""
    api = BatchAPI(server, config)
    server.job_store = api.store  # the vector stores read their files from it

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await api.worker.start()
        try:
            yield
        finally:
            await api.worker.stop()
            api.store.close()

    router = APIRouter(prefix="/v1", dependencies=[Depends(server.authorize)], lifespan=lifespan)
    router.post("/files", **openapi.spec(openapi.FILE_UPLOAD, *openapi.JSON_BODY, media_type="multipart/form-data"))(
        api.upload_file)
    router.get("/files", **openapi.spec(None, 400, query=openapi.FILE_QUERY))(api.list_files)
    router.get("/files/{file_id}", **openapi.spec(None, 404))(api.retrieve_file)
    router.get("/files/{file_id}/content", response_class=FileResponse, **openapi.spec(None, 404, ok=openapi.BINARY))(
        api.file_content)
    router.delete("/files/{file_id}", **openapi.spec(None, 404))(api.delete_file)
    router.post("/batches", **openapi.spec(BatchCreateRequest, *openapi.JSON_BODY, 404))(api.create_batch)
    router.get("/batches", **openapi.spec(None, 400, query=openapi.BATCH_QUERY))(api.list_batches)
    router.get("/batches/{batch_id}", **openapi.spec(None, 404))(api.retrieve_batch)
    router.post("/batches/{batch_id}/cancel", **openapi.spec(None, 404, 409))(api.cancel_batch)
    router.post("/async/chat/completions", status_code=202,
                **openapi.spec(p.ChatCompletionRequest, *openapi.JSON_BODY, 404, 503))(api.submit_chat)
    router.get("/async/{request_id}", **openapi.spec(None, 404))(api.retrieve_async)
    return router


# -- helpers ----------------------------------------------------------------------------------

class _TooLarge(Exception):
    pass


async def _chunks(request: Request, limit: int):
    """The body's chunks up to `limit` bytes. Past it, the rest is read and dropped and then
    _TooLarge raised: a client cut off mid-upload would see a reset connection, not the 413."""
    seen, more = 0, True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk, more = message.get("body", b""), message.get("more_body", False)
        seen += len(chunk)
        if seen <= limit:
            yield chunk
    if seen > limit:
        raise _TooLarge


def _copy(source, dest: Path) -> int:
    source.seek(0)
    with open(dest, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        return out.tell()


def _limit(query, default: int, maximum: int) -> int:
    raw = query.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise APIError(400, f"'limit' must be an integer from 1 to {maximum}", param="limit")
    return int(raw)


def _not_found(kind: str, object_id: str, param: str = "id") -> APIError:
    return APIError(404, f"No such {kind} object: {object_id}", param=param, code="not_found")
