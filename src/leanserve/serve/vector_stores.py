"""OpenAI's vector stores API (`/v1/vector_stores/...`), the `openai` client's `vector_stores`.

The routes shape requests and rows; the rows live in a `VectorBackend` (rag/backend.py:
SQLite by default, Postgres with `--vector-store postgresql://...`), files come from the
Files API's store, and an `Ingestor` (rag/ingest.py) turns attached files into chunks in
the background at the batch service class. Search embeds the query at the realtime class.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pathlib import Path

import numpy as np

from ..engine.sequence import PRIORITY_CLASSES
from ..errors import InvalidRequest
from ..rag import chunking, filters as rag_filters
from ..rag.backend import UNSET, VectorBackend
from ..rag.ingest import Ingestor, Source
from . import openapi, protocol as p
from .protocol import APIError

MAX_FILES_PER_CALL = 500  # file_ids in one create or batch call, as OpenAI


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ExpiresAfter(_Strict):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class StoreCreate(_Strict):
    name: str | None = None
    file_ids: list[str] = Field([], max_length=MAX_FILES_PER_CALL)
    expires_after: ExpiresAfter | None = None
    chunking_strategy: dict | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    description: str | None = None


class StoreUpdate(_Strict):
    name: str | None = None
    expires_after: ExpiresAfter | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)


class FileAttach(_Strict):
    file_id: str
    attributes: dict | None = None
    chunking_strategy: dict | None = None


class FileUpdate(_Strict):
    attributes: dict | None


class BatchFile(_Strict):
    file_id: str
    attributes: dict | None = None
    chunking_strategy: dict | None = None


class BatchCreate(_Strict):
    file_ids: list[str] | None = Field(None, max_length=MAX_FILES_PER_CALL)
    files: list[BatchFile] | None = Field(None, max_length=MAX_FILES_PER_CALL)
    attributes: dict | None = None
    chunking_strategy: dict | None = None


class HybridSearch(_Strict):
    embedding_weight: float = Field(ge=0)
    text_weight: float = Field(ge=0)


class RankingOptions(_Strict):
    ranker: Literal["auto", "default-2024-11-15", "none"] = "auto"
    score_threshold: float = Field(0.0, ge=0, le=1)
    hybrid_search: HybridSearch | None = None


class SearchRequest(_Strict):
    query: str | list[str]
    filters: dict | None = None
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False


def _chunking(strategy: dict | None, param: str) -> dict:
    try:
        return chunking.validate_chunking(strategy)
    except InvalidRequest as e:
        raise APIError(400, e.message, param=f"{param}.{e.param}" if e.param else param) from None


def _attributes(attrs: dict | None, param: str) -> dict | None:
    if attrs is None:
        return None
    try:
        rag_filters.validate_attributes(attrs)
    except InvalidRequest as e:
        raise APIError(400, e.message, param=param) from None
    return attrs


def _list(rows: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": rows, "first_id": rows[0]["id"] if rows else None,
            "last_id": rows[-1]["id"] if rows else None, "has_more": has_more}


def _store_object(row: dict) -> dict:
    return {k: row[k] for k in ("id", "object", "created_at", "name", "usage_bytes", "file_counts", "status",
                                "expires_after", "expires_at", "last_active_at", "metadata")}


def _file_object(row: dict) -> dict:
    return {k: row[k] for k in ("id", "object", "usage_bytes", "created_at", "vector_store_id", "status",
                                "last_error", "chunking_strategy", "attributes")}


def _batch_object(row: dict) -> dict:
    return {k: row[k] for k in ("id", "object", "created_at", "vector_store_id", "status", "file_counts")}


class VectorStoresAPI:
    def __init__(self, server, backend: VectorBackend, files, ingestor: Ingestor, embed_query):
        """`files`: the Files API's JobStore (file rows); `embed_query(text)` -> float32 [dim]."""
        self.server, self.backend, self.files, self.ingestor = server, backend, files, ingestor
        self.embed_query = embed_query

    def _ok(self, body: dict) -> JSONResponse:
        self.server.metrics.count(200)
        return JSONResponse(body)

    async def _body(self, request: Request, model):
        return p.parse_body(model, await self.server._body(request))

    async def _store(self, store_id: str) -> dict:
        row = await asyncio.to_thread(self.backend.get_store, store_id)
        if row is None:
            raise _not_found("Vector store", store_id)
        return row

    async def _uploaded(self, file_id: str, param: str) -> dict:
        row = await asyncio.to_thread(self.files.file, file_id)
        if row is None:
            raise APIError(404, f"No file found with id '{file_id}'.", param=param, code="not_found")
        return row

    @staticmethod
    def _cursor(request: Request) -> dict:
        q = request.query_params
        raw = q.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise APIError(400, "'limit' must be an integer from 1 to 100", param="limit")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise APIError(400, "'order' must be 'asc' or 'desc'", param="order")
        return {"limit": int(raw), "order": order, "after": q.get("after"), "before": q.get("before")}

    # -- stores ---------------------------------------------------------------------------------

    async def create_store(self, request: Request) -> JSONResponse:
        req = await self._body(request, StoreCreate)
        strategy = _chunking(req.chunking_strategy, "chunking_strategy")
        uploads = [await self._uploaded(f, f"file_ids[{i}]") for i, f in enumerate(req.file_ids)]
        expires = req.expires_after.model_dump() if req.expires_after else None
        row = await asyncio.to_thread(self.backend.create_store, req.name, req.metadata, expires)
        for up in uploads:
            await self._attach(row["id"], up, None, strategy)
        return self._ok(_store_object(await self._store(row["id"])))

    async def list_stores(self, request: Request) -> JSONResponse:
        rows, more = await asyncio.to_thread(lambda: self.backend.list_stores(**self._cursor(request)))
        return self._ok(_list([_store_object(r) for r in rows], more))

    async def retrieve_store(self, store_id: str) -> JSONResponse:
        return self._ok(_store_object(await self._store(store_id)))

    async def modify_store(self, store_id: str, request: Request) -> JSONResponse:
        req = await self._body(request, StoreUpdate)
        given = req.model_fields_set
        changes = {k: (getattr(req, k).model_dump() if k == "expires_after" and getattr(req, k) else getattr(req, k))
                   if k in given else UNSET for k in ("name", "metadata", "expires_after")}
        row = await asyncio.to_thread(self.backend.update_store, store_id, **changes)
        if row is None:
            raise _not_found("Vector store", store_id)
        return self._ok(_store_object(row))

    async def delete_store(self, store_id: str) -> JSONResponse:
        if not await asyncio.to_thread(self.backend.delete_store, store_id):
            raise _not_found("Vector store", store_id)
        return self._ok({"id": store_id, "object": "vector_store.deleted", "deleted": True})

    # -- files ----------------------------------------------------------------------------------

    async def _attach(self, store_id: str, upload: dict, attributes: dict | None, strategy: dict,
                      batch_id: str | None = None) -> dict:
        row = await asyncio.to_thread(self.backend.add_file, store_id, upload["id"], upload["filename"], attributes,
                                      strategy, batch_id)
        if row is None:
            raise _not_found("Vector store", store_id)
        self.ingestor.submit(store_id, upload["id"])
        return row

    async def attach_file(self, store_id: str, request: Request) -> JSONResponse:
        req = await self._body(request, FileAttach)
        await self._store(store_id)
        upload = await self._uploaded(req.file_id, "file_id")
        row = await self._attach(store_id, upload, _attributes(req.attributes, "attributes"),
                                 _chunking(req.chunking_strategy, "chunking_strategy"))
        await asyncio.to_thread(self.backend.touch_store, store_id)
        return self._ok(_file_object(row))

    async def list_files(self, store_id: str, request: Request) -> JSONResponse:
        await self._store(store_id)
        status = _status_filter(request)
        cursor = self._cursor(request)
        rows, more = await asyncio.to_thread(lambda: self.backend.list_files(store_id, status=status, **cursor))
        return self._ok(_list([_file_object(r) for r in rows], more))

    async def _file(self, store_id: str, file_id: str) -> dict:
        await self._store(store_id)
        row = await asyncio.to_thread(self.backend.get_file, store_id, file_id)
        if row is None:
            raise _not_found("Vector store file", file_id)
        return row

    async def retrieve_file(self, store_id: str, file_id: str) -> JSONResponse:
        return self._ok(_file_object(await self._file(store_id, file_id)))

    async def update_file(self, store_id: str, file_id: str, request: Request) -> JSONResponse:
        req = await self._body(request, FileUpdate)
        await self._file(store_id, file_id)
        attrs = _attributes(req.attributes, "attributes") or {}
        row = await asyncio.to_thread(self.backend.update_file_attributes, store_id, file_id, attrs)
        if row is None:
            raise _not_found("Vector store file", file_id)
        return self._ok(_file_object(row))

    async def delete_file(self, store_id: str, file_id: str) -> JSONResponse:
        await self._store(store_id)
        if not await asyncio.to_thread(self.backend.delete_file, store_id, file_id):
            raise _not_found("Vector store file", file_id)
        return self._ok({"id": file_id, "object": "vector_store.file.deleted", "deleted": True})

    async def file_content(self, store_id: str, file_id: str) -> JSONResponse:
        await self._file(store_id, file_id)
        texts = await asyncio.to_thread(self.backend.file_chunks, store_id, file_id)
        return self._ok({"object": "vector_store.file_content.page", "data": [{"type": "text", "text": t}
                                                                              for t in texts],
                         "has_more": False, "next_page": None})

    # -- file batches -----------------------------------------------------------------------------

    async def create_batch(self, store_id: str, request: Request) -> JSONResponse:
        req = await self._body(request, BatchCreate)
        if (req.file_ids is None) == (req.files is None):
            raise APIError(400, "Give either 'file_ids' or 'files'", param="file_ids")
        await self._store(store_id)
        strategy = _chunking(req.chunking_strategy, "chunking_strategy")
        attributes = _attributes(req.attributes, "attributes")
        entries = [BatchFile(file_id=f) for f in req.file_ids] if req.file_ids is not None else req.files
        if not entries:
            raise APIError(400, "A file batch needs at least one file", param="file_ids")
        uploads = [await self._uploaded(e.file_id, f"files[{i}].file_id") for i, e in enumerate(entries)]
        for i, e in enumerate(entries):  # per-file settings checked before anything is attached
            _attributes(e.attributes, f"files[{i}].attributes")
            _chunking(e.chunking_strategy, f"files[{i}].chunking_strategy") if e.chunking_strategy else None
        row = await asyncio.to_thread(self.backend.create_batch, store_id, [(u["id"], u["filename"]) for u in uploads],
                                      attributes, strategy)
        if row is None:
            raise _not_found("Vector store", store_id)
        for e, up in zip(entries, uploads):
            if e.attributes is not None or e.chunking_strategy is not None:  # its own settings win
                await asyncio.to_thread(self.backend.add_file, store_id, up["id"], up["filename"],
                                        e.attributes if e.attributes is not None else attributes,
                                        _chunking(e.chunking_strategy, "chunking_strategy")
                                        if e.chunking_strategy else strategy, row["id"])
            self.ingestor.submit(store_id, up["id"])
        return self._ok(_batch_object(await self._batch(store_id, row["id"])))

    async def _batch(self, store_id: str, batch_id: str) -> dict:
        await self._store(store_id)
        row = await asyncio.to_thread(self.backend.get_batch, store_id, batch_id)
        if row is None:
            raise _not_found("Vector store file batch", batch_id)
        return row

    async def retrieve_batch(self, store_id: str, batch_id: str) -> JSONResponse:
        return self._ok(_batch_object(await self._batch(store_id, batch_id)))

    async def cancel_batch(self, store_id: str, batch_id: str) -> JSONResponse:
        await self._batch(store_id, batch_id)
        row = await asyncio.to_thread(self.backend.cancel_batch, store_id, batch_id)
        return self._ok(_batch_object(row))

    async def batch_files(self, store_id: str, batch_id: str, request: Request) -> JSONResponse:
        await self._batch(store_id, batch_id)
        status = _status_filter(request)
        cursor = self._cursor(request)
        rows, more = await asyncio.to_thread(lambda: self.backend.list_files(store_id, status=status,
                                                                             batch_id=batch_id, **cursor))
        return self._ok(_list([_file_object(r) for r in rows], more))

    # -- search ---------------------------------------------------------------------------------

    async def search(self, store_id: str, request: Request) -> JSONResponse:
        req = await self._body(request, SearchRequest)
        queries = [req.query] if isinstance(req.query, str) else req.query
        if not queries or any(not q.strip() for q in queries):
            raise APIError(400, "'query' must be a non-empty string (or a list of them)", param="query")
        if req.filters is not None:
            try:
                rag_filters.validate(req.filters)
            except InvalidRequest as e:
                raise APIError(400, e.message, param=e.param or "filters") from None
        store = await self._store(store_id)
        if store["status"] == "expired":
            raise APIError(400, f"Vector store {store_id} has expired", param="vector_store_id", code="expired")
        ranking = req.ranking_options or RankingOptions()
        hybrid = ranking.hybrid_search
        if hybrid is not None and hybrid.embedding_weight + hybrid.text_weight == 0:
            raise APIError(400, "hybrid_search weights must not both be 0", param="ranking_options.hybrid_search")
        text = " ".join(queries)
        vector = await self.embed_query(text)
        hits = await asyncio.to_thread(
            self.backend.search, store_id, vector, text, req.max_num_results, req.filters, ranking.score_threshold,
            (hybrid.embedding_weight, hybrid.text_weight) if hybrid else None)
        await asyncio.to_thread(self.backend.touch_store, store_id)
        return self._ok({"object": "vector_store.search_results.page", "search_query": queries,
                         "data": [{"file_id": h.file_id, "filename": h.filename, "score": round(h.score, 6),
                                   "attributes": h.attributes, "content": [{"type": "text", "text": h.text}]}
                                  for h in hits],
                         "has_more": False, "next_page": None})


def _status_filter(request: Request) -> str | None:
    status = request.query_params.get("filter")
    if status is not None and status not in ("in_progress", "completed", "failed", "cancelled"):
        raise APIError(400, "'filter' must be one of in_progress, completed, failed, cancelled", param="filter")
    return status


def _not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No {kind.lower()} found with id '{object_id}'.", code="not_found")


def open_backend(url: str | None, data_dir: str, dim: int) -> VectorBackend:
    """`--vector-store`: None or a path -> SQLite (default `<data_dir>/vectors.sqlite3`);
    `postgresql://...` -> Postgres with pgvector."""
    if url and url.startswith(("postgresql://", "postgres://")):
        from ..rag.pgvector import PostgresBackend  # noqa: psycopg only when asked for

        return PostgresBackend(url, dim)
    from ..rag.store import SQLiteBackend  # noqa: apsw only when vector stores are served

    path = Path(url.removeprefix("sqlite://")) if url else Path(data_dir) / "vectors.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    return SQLiteBackend(path, dim)


def server_router(server, files, url: str | None, data_dir: str) -> APIRouter:
    """The vector-store routes of a server with an embedding model and a Files API store:
    ingestion embeds at the batch service class, queries at realtime; both are billed."""
    engine = server.engine
    model = engine.embedding_model

    async def embed(lists: list[list[int]], priority: int) -> np.ndarray:
        vectors, bill = await engine.embed(lists, priority)
        server.metrics.energy.add(bill, model=model.name, adapter="", user="")
        return vectors

    def read_file(file_id: str) -> tuple[bytes, str] | None:
        row = files.file(file_id)
        if row is None:
            return None
        try:
            return files.file_path(file_id).read_bytes(), row["filename"]
        except FileNotFoundError:
            return None

    async def embed_query(text: str) -> np.ndarray:
        ids = model.truncate(model.tokenize([text])[0])  # a long query is cut, not refused
        return (await embed([ids], PRIORITY_CLASSES["realtime"]))[0]

    backend = open_backend(url, data_dir, model.dim)
    source = Source(read_file=read_file, embed=lambda lists: embed(lists, PRIORITY_CLASSES["batch"]),
                    tokenizer=model.tokenizer, max_embed_tokens=model.max_length)
    return vector_store_router(server, backend, files, Ingestor(backend, source), embed_query)


def vector_store_router(server, backend: VectorBackend, files, ingestor: Ingestor, embed_query) -> APIRouter:
    api = VectorStoresAPI(server, backend, files, ingestor, embed_query)
    server.vector_stores = api  # the file_search tool of /v1/responses searches through it

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await ingestor.start()
        try:
            yield
        finally:
            await ingestor.stop()
            backend.close()

    r = APIRouter(prefix="/v1/vector_stores", dependencies=[Depends(server.authorize)], lifespan=lifespan)
    body = (*openapi.JSON_BODY, 404)
    r.post("", **openapi.spec(StoreCreate, *body))(api.create_store)
    r.get("", **openapi.spec(None, 400))(api.list_stores)
    r.get("/{store_id}", **openapi.spec(None, 404))(api.retrieve_store)
    r.post("/{store_id}", **openapi.spec(StoreUpdate, *body))(api.modify_store)
    r.delete("/{store_id}", **openapi.spec(None, 404))(api.delete_store)
    r.post("/{store_id}/files", **openapi.spec(FileAttach, *body))(api.attach_file)
    r.get("/{store_id}/files", **openapi.spec(None, 400, 404))(api.list_files)
    r.get("/{store_id}/files/{file_id}", **openapi.spec(None, 404))(api.retrieve_file)
    r.post("/{store_id}/files/{file_id}", **openapi.spec(FileUpdate, *body))(api.update_file)
    r.delete("/{store_id}/files/{file_id}", **openapi.spec(None, 404))(api.delete_file)
    r.get("/{store_id}/files/{file_id}/content", **openapi.spec(None, 404))(api.file_content)
    r.post("/{store_id}/file_batches", **openapi.spec(BatchCreate, *body))(api.create_batch)
    r.get("/{store_id}/file_batches/{batch_id}", **openapi.spec(None, 404))(api.retrieve_batch)
    r.post("/{store_id}/file_batches/{batch_id}/cancel", **openapi.spec(None, 404))(api.cancel_batch)
    r.get("/{store_id}/file_batches/{batch_id}/files", **openapi.spec(None, 400, 404))(api.batch_files)
    r.post("/{store_id}/search", **openapi.spec(SearchRequest, *body))(api.search)
    return r
