"""Ingestion: an attached file becomes searchable chunks, in the background.

For each file attached to a vector store (status `in_progress`): read its bytes, extract
the text (rag/extract.py), cut it into chunks by the embedding model's tokens
(rag/chunking.py), embed the chunks at the batch service class, and write them with the
file's `completed` status in one transaction (`VectorBackend.complete_file`). Any failure
ends that file alone as `failed` with `last_error`; a file whose store was deleted or that
was cancelled meanwhile is dropped (complete_file refuses it). At start, files a crash left
`in_progress` are ingested again from the beginning.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from .backend import Chunk, VectorBackend

log = logging.getLogger("leanserve.rag")

EMBED_BATCH = 64  # chunks per embedding call; the engine batches them further by tokens


@dataclass
class Source:
    """Where ingestion gets what it needs; the server provides each."""

    read_file: Callable[[str], tuple[bytes, str] | None]  # file id -> (bytes, filename); None if gone
    embed: Callable[[list[list[int]]], Awaitable[np.ndarray]]  # token lists -> float32 [n, dim], batch class
    tokenizer: object  # the embedding model's tokenizers.Tokenizer (chunk boundaries by its offsets)
    max_embed_tokens: int  # the embedding model's input limit


class Ingestor:
    def __init__(self, backend: VectorBackend, source: Source, concurrency: int = 2):
        self.backend = backend
        self.source = source
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.concurrency = concurrency

    async def start(self) -> None:
        for row in await asyncio.to_thread(self.backend.pending_files):
            self.submit(row["vector_store_id"], row["id"])
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def submit(self, store_id: str, file_id: str) -> None:
        self._queue.put_nowait((store_id, file_id))

    async def _work(self) -> None:
        while True:
            store_id, file_id = await self._queue.get()
            try:
                await self.ingest(store_id, file_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: this file fails, the worker goes on
                log.exception("ingesting %s into %s failed", file_id, store_id)
                await asyncio.to_thread(self.backend.fail_file, store_id, file_id, "server_error", repr(e))

    async def ingest(self, store_id: str, file_id: str) -> bool:
        """True when the file was completed."""
        from .chunking import chunk_text  # noqa: the text pipeline, imported when first used
        from .extract import InvalidFile, UnsupportedFile, extract_text

        row = await asyncio.to_thread(self.backend.get_file, store_id, file_id)
        if row is None or row["status"] != "in_progress":
            return False
        found = await asyncio.to_thread(self.source.read_file, file_id)
        if found is None:
            await asyncio.to_thread(self.backend.fail_file, store_id, file_id, "invalid_file",
                                    f"the file {file_id} no longer exists")
            return False
        data, filename = found
        try:
            text = await asyncio.to_thread(extract_text, data, filename)
        except UnsupportedFile as e:
            await asyncio.to_thread(self.backend.fail_file, store_id, file_id, "unsupported_file", str(e))
            return False
        except InvalidFile as e:
            await asyncio.to_thread(self.backend.fail_file, store_id, file_id, "invalid_file", str(e))
            return False
        strategy = row["chunking_strategy"]["static"]
        pieces = await asyncio.to_thread(chunk_text, text, self.source.tokenizer, strategy["max_chunk_size_tokens"],
                                         strategy["chunk_overlap_tokens"], self.source.max_embed_tokens)
        from .chunking import embedding_inputs, pool  # noqa: as above

        chunks = []
        for start in range(0, len(pieces), EMBED_BATCH):
            part = pieces[start:start + EMBED_BATCH]
            if (await asyncio.to_thread(self.backend.get_file, store_id, file_id) or {}).get("status") != "in_progress":
                return False  # deleted or cancelled meanwhile: stop embedding it
            vectors = pool(part, await self.source.embed(embedding_inputs(part)))
            chunks += [Chunk(p.text, v, p.tokens) for p, v in zip(part, vectors)]
        return await asyncio.to_thread(self.backend.complete_file, store_id, file_id, chunks)
