"""The vector-store backend: OpenAI's vector stores, their files, chunks, vectors and search,
behind one interface with two implementations, chosen by `--vector-store`:

- `rag/store.py`, `SQLiteBackend`: embedded, the default: one SQLite file in the data
  directory (WAL), vectors as float32 blobs (searched in memory, exactly or by a usearch
  HNSW index past a size), text in FTS5 (for hybrid search).
- `rag/pgvector.py`, `PostgresBackend`: Postgres + pgvector (HNSW), for a store that
  outgrows one machine or is shared by replicas.

Rows cross the interface as plain dicts with OpenAI's field names, so the HTTP layer
(serve/vector_stores.py) only shapes them. Ids are made here: `vs_...` stores, `vsfb_...`
file batches; a store's files keep the id the Files API gave them (`file-...`).
Vectors are float32 and L2-normalised (cosine = dot product); `score` is that cosine.

Durability: `complete_file` writes a file's chunks, vectors and its `completed` status in
one transaction, so a file reported completed survives kill -9, and a file left
`in_progress` by a crash is listed by `pending_files` and ingested again from scratch
(its partial rows, if any, replaced), never duplicated.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

FILE_STATUSES = ("in_progress", "completed", "cancelled", "failed")
UNSET = object()  # update_store: leave this field as it is


@dataclass
class Chunk:
    text: str
    vector: np.ndarray  # float32 [dim], L2-normalised
    tokens: int  # in the embedding model's tokenizer


@dataclass
class SearchHit:
    file_id: str
    filename: str
    score: float
    attributes: dict = field(default_factory=dict)
    text: str = ""
    chunk_index: int = 0


class VectorBackend(ABC):
    """All methods are synchronous and thread-safe; the server calls them from worker
    threads (asyncio.to_thread). Listing methods take OpenAI's cursor arguments: `limit`
    (1-100), `order` ("asc" | "desc" by created_at, then id), `after` / `before` (an id) and
    return (rows, has_more)."""

    dim: int  # vector width, fixed when the backend is opened

    # -- stores --------------------------------------------------------------------------------
    # A store row: {"id", "object": "vector_store", "created_at", "name", "metadata",
    #   "expires_after" (None | {"anchor": "last_active_at", "days": n}), "expires_at",
    #   "last_active_at", "status" ("in_progress" while any file is, "expired", else
    #   "completed"), "usage_bytes" (sum of its chunks' text bytes),
    #   "file_counts": {"in_progress", "completed", "failed", "cancelled", "total"}}

    @abstractmethod
    def create_store(self, name: str | None, metadata: dict | None, expires_after: dict | None) -> dict: ...

    @abstractmethod
    def get_store(self, store_id: str) -> dict | None: ...

    @abstractmethod
    def list_stores(self, limit: int = 20, order: str = "desc", after: str | None = None,
                    before: str | None = None) -> tuple[list[dict], bool]: ...

    @abstractmethod
    def update_store(self, store_id: str, name=UNSET, metadata=UNSET, expires_after=UNSET) -> dict | None: ...

    @abstractmethod
    def delete_store(self, store_id: str) -> bool:
        """Removes the store, its files' rows, chunks and vectors; False if unknown. An
        ingestion still running for it then finds its file gone (`complete_file` -> False)."""

    @abstractmethod
    def touch_store(self, store_id: str) -> None:
        """Sets last_active_at (and expires_at) to now: a search or an attach uses the store."""

    # -- files in stores -----------------------------------------------------------------------
    # A file row: {"id" (the file id), "object": "vector_store.file", "vector_store_id",
    #   "created_at", "status", "last_error" (None | {"code", "message"}), "usage_bytes",
    #   "attributes", "chunking_strategy", "filename", "batch_id" (None or vsfb_...)}

    @abstractmethod
    def add_file(self, store_id: str, file_id: str, filename: str, attributes: dict | None,
                 chunking_strategy: dict, batch_id: str | None = None) -> dict | None:
        """Attaches a file (status in_progress); attaching it again resets it to in_progress.
        None if the store is unknown."""

    @abstractmethod
    def get_file(self, store_id: str, file_id: str) -> dict | None: ...

    @abstractmethod
    def list_files(self, store_id: str, limit: int = 20, order: str = "desc", after: str | None = None,
                   before: str | None = None, status: str | None = None,
                   batch_id: str | None = None) -> tuple[list[dict], bool]: ...

    @abstractmethod
    def update_file_attributes(self, store_id: str, file_id: str, attributes: dict) -> dict | None:
        """Also updates the attributes its chunks are filtered by."""

    @abstractmethod
    def delete_file(self, store_id: str, file_id: str) -> bool:
        """Detaches the file: its row, chunks and vectors go (the uploaded file stays)."""

    @abstractmethod
    def complete_file(self, store_id: str, file_id: str, chunks: list[Chunk]) -> bool:
        """In one transaction: replaces the file's chunks and vectors with `chunks`, sets its
        usage_bytes and status completed. False (and nothing written) when the store or the
        file is gone or the file is no longer in_progress (cancelled, re-attached)."""

    @abstractmethod
    def fail_file(self, store_id: str, file_id: str, code: str, message: str) -> None:
        """status failed with last_error {"code", "message"} (code: "server_error",
        "unsupported_file", "invalid_file"); a no-op if the file is gone."""

    @abstractmethod
    def pending_files(self) -> list[dict]:
        """Every file row still in_progress, oldest first (to resume after a restart)."""

    @abstractmethod
    def file_chunks(self, store_id: str, file_id: str) -> list[str]:
        """The file's chunk texts in order (the `/content` endpoint)."""

    # -- file batches --------------------------------------------------------------------------
    # A batch row: {"id", "object": "vector_store.file_batch", "vector_store_id", "created_at",
    #   "status" ("in_progress" while any of its files is, "cancelled" if cancelled, else
    #   "completed"; "failed" if all its files failed), "file_counts": {...}}

    @abstractmethod
    def create_batch(self, store_id: str, files: list[tuple[str, str]], attributes: dict | None,
                     chunking_strategy: dict) -> dict | None:
        """Attaches (file_id, filename) pairs under a new batch id; None if the store is unknown."""

    @abstractmethod
    def get_batch(self, store_id: str, batch_id: str) -> dict | None: ...

    @abstractmethod
    def cancel_batch(self, store_id: str, batch_id: str) -> dict | None:
        """Its files still in_progress become cancelled; the batch status cancelled."""

    # -- search --------------------------------------------------------------------------------

    @abstractmethod
    def search(self, store_id: str, vector: np.ndarray, query: str, k: int, filters: dict | None = None,
               score_threshold: float = 0.0, hybrid: tuple[float, float] | None = None) -> list[SearchHit]:
        """The k best chunks of the store's completed files whose attributes pass `filters`
        (rag/filters.py: already validated), by cosine similarity to `vector`, those scoring
        below `score_threshold` dropped. `hybrid` = (embedding_weight, text_weight): fuse the
        vector ranking with a full-text (BM25) ranking of `query` by weighted reciprocal rank
        (score = sum of weight / (60 + rank)), as OpenAI's hybrid_search describes; the
        threshold then applies to the fused score."""

    def close(self) -> None:
        pass
