"""Postgres + pgvector: the vector-store backend for stores past one machine or shared by
replicas (`--vector-store postgresql://...`).

Four tables (stores, batches, files, chunks); a chunk row holds its text, a `vector(dim)`
with an HNSW index (cosine) and a generated tsvector with a GIN index (hybrid search). A
file's attributes, filename and status live on its file row only: search joins them in, so
re-tagging a file is one UPDATE. Every method is one transaction on a pooled connection.

The HNSW index is built when the chunks first outnumber `index_above`, not at creation:
measured here (2 EPYC cores, 384-d), complete_file COPYs ~12,800 chunks/s into the table
without the index and 500-1,100/s into it (100k / 10k rows), while building it over rows
already there takes 4.7 s for 10k and 37 s for 100k (~2,700 rows/s). Below the threshold,
exact search costs ~23 ms at 10k. A bulk import can raise the threshold and call
`build_index()` once at the end. CREATE INDEX is transactional: a crash mid-build leaves no
half index, and the next complete_file builds it again.

Search, and why it is not one query: pgvector 0.6 has no iterative index scans, so HNSW
hands back at most `hnsw.ef_search` candidates from the whole table, and the WHERE clause
(this store, completed files, the attribute filters) is applied to those after. A store that
is a small part of the table, or a selective filter, leaves fewer than k rows. So each
search first counts the chunks that pass (from the file rows: cheap). At most `exact_below`
of them: exact search over those. Else HNSW with ef_search raised until twice k such rows
are expected among its candidates, then at pgvector's maximum (1000) if that fell short, and
exact search over the passing rows when even that would or did. Without the index, every
search is exact.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from contextlib import contextmanager

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..errors import InvalidRequest
from .backend import UNSET, Chunk, SearchHit, VectorBackend
from .fusion import CANDIDATES, fuse
from .pgfilters import to_sql

log = logging.getLogger("leanserve.rag")

MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
SCHEMA_LOCK = 290_029  # advisory locks: replicas opening at once create the schema once,
INDEX_LOCK = 290_030  # and one of them builds the index
INDEX_MEMORY = "1GB"  # maintenance_work_mem for the build: 100k 384-d rows fit in ~400 MB

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS vs_stores (
    id text PRIMARY KEY,
    seq bigserial UNIQUE,  -- creation order, the order lists page in
    created_at bigint NOT NULL,
    name text,
    metadata jsonb NOT NULL,
    expires_after jsonb,
    last_active_at bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS vs_batches (
    store_id text NOT NULL REFERENCES vs_stores ON DELETE CASCADE,
    id text NOT NULL,
    created_at bigint NOT NULL,
    cancelled boolean NOT NULL DEFAULT FALSE,
    PRIMARY KEY (store_id, id)
);
CREATE TABLE IF NOT EXISTS vs_files (
    store_id text NOT NULL REFERENCES vs_stores ON DELETE CASCADE,
    id text NOT NULL,
    seq bigserial,
    created_at bigint NOT NULL,
    status text NOT NULL,
    last_error jsonb,
    usage_bytes bigint NOT NULL DEFAULT 0,
    chunk_count integer NOT NULL DEFAULT 0,
    attributes jsonb NOT NULL,
    chunking_strategy jsonb NOT NULL,
    filename text NOT NULL,
    batch_id text,
    PRIMARY KEY (store_id, id)
);
CREATE INDEX IF NOT EXISTS vs_files_order ON vs_files (store_id, seq);
CREATE INDEX IF NOT EXISTS vs_files_status ON vs_files (status, seq);
CREATE TABLE IF NOT EXISTS vs_chunks (
    store_id text NOT NULL,
    file_id text NOT NULL,
    idx integer NOT NULL,
    text text NOT NULL,
    tokens integer NOT NULL,
    embedding vector({dim}) NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    PRIMARY KEY (store_id, file_id, idx),
    FOREIGN KEY (store_id, file_id) REFERENCES vs_files ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS vs_chunks_tsv ON vs_chunks USING gin (tsv);
"""

INDEX_SQL = "CREATE INDEX IF NOT EXISTS vs_chunks_hnsw ON vs_chunks USING hnsw (embedding vector_cosine_ops)"

STORE_SQL = """
SELECT s.*,
    count(f.id) FILTER (WHERE f.status = 'in_progress') AS in_progress,
    count(f.id) FILTER (WHERE f.status = 'completed') AS completed,
    count(f.id) FILTER (WHERE f.status = 'failed') AS failed,
    count(f.id) FILTER (WHERE f.status = 'cancelled') AS cancelled,
    count(f.id) AS total, coalesce(sum(f.usage_bytes), 0) AS usage_bytes
FROM vs_stores s LEFT JOIN vs_files f ON f.store_id = s.id
WHERE {where} GROUP BY s.id {order}
"""

HIT_COLUMNS = "c.file_id, c.idx, c.text, f.filename, f.attributes"
FROM_CHUNKS = """vs_chunks c JOIN vs_files f ON f.store_id = c.store_id AND f.id = c.file_id
    WHERE c.store_id = %s AND f.status = 'completed' AND {where}"""
# `+ 0` makes the ORDER BY an expression the HNSW index cannot serve: an exact scan.
EXACT_SQL = f"""SELECT {HIT_COLUMNS}, 1 - (c.embedding <=> %s) AS score FROM {FROM_CHUNKS}
    ORDER BY (c.embedding <=> %s) + 0 LIMIT %s"""
# The candidates an HNSW scan yields (ef_search of them, from the whole table), then the
# WHERE clause: what pgvector 0.6 does anyway, written so that the planner cannot pick
# another plan (with the WHERE beside the ORDER BY it may walk the store's rows and sort).
ANN_SQL = f"""SELECT {HIT_COLUMNS}, 1 - c.distance AS score
    FROM (SELECT store_id, file_id, idx, text, embedding <=> %s AS distance FROM vs_chunks
          ORDER BY embedding <=> %s LIMIT %s) c
    JOIN vs_files f ON f.store_id = c.store_id AND f.id = c.file_id
    WHERE c.store_id = %s AND f.status = 'completed' AND {{where}} ORDER BY c.distance LIMIT %s"""
# plainto_tsquery ANDs the words; a ranking wants any of them (as BM25 does), so '&' -> '|'.
TEXT_SQL = f"""SELECT {HIT_COLUMNS}, ts_rank(c.tsv, t.q, 1) AS score
    FROM (SELECT replace(plainto_tsquery('english', %s)::text, ' & ', ' | ')::tsquery AS q) t,
    {FROM_CHUNKS} AND c.tsv @@ t.q ORDER BY score DESC, c.file_id, c.idx LIMIT %s"""

COPY_SQL = ("COPY vs_chunks (store_id, file_id, idx, text, tokens, embedding) "
            "FROM STDIN WITH (FORMAT BINARY)")
COPY_TYPES = ["text", "text", "int4", "text", "int4", "vector"]


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _page(cur, col: str, cursor_sql: str, scope: list, limit: int, order: str, after: str | None,
          before: str | None, params: list) -> tuple[str, str, bool]:
    """(condition, ORDER BY, flipped) for a page in creation order (`col`, a seq: created_at
    is in seconds and ids are random), with OpenAI's cursors as rag/store.py has them:
    `after` the rows following that id in the listing's order, `before` the nearest `limit`
    preceding it (walked backwards, so the caller flips the page). `cursor_sql` finds a
    cursor's seq from `scope` params and its id; the values go into `params`."""
    if not 1 <= limit <= 100 or order not in ("asc", "desc"):
        raise InvalidRequest("limit must be 1 to 100 and order 'asc' or 'desc'", "limit")
    desc = order == "desc"
    flipped = before is not None and after is None
    conds = []
    for name, cursor, past in (("after", after, desc), ("before", before, not desc)):
        if cursor is not None:
            cur.execute(cursor_sql, [*scope, cursor])
            row = cur.fetchone()
            if row is None:
                raise InvalidRequest(f"'{name}' names no object in this list: {cursor!r}", name)
            conds.append(f"{col} {'<' if past else '>'} %s")
            params.append(row["seq"])
    walk = "DESC" if desc != flipped else "ASC"
    return " AND ".join(conds) or "TRUE", f"ORDER BY {col} {walk}", flipped


def _finish_page(rows: list, limit: int, flipped: bool) -> tuple[list, bool]:
    has_more = len(rows) > limit
    rows = rows[:limit]
    return (rows[::-1] if flipped else rows), has_more


def _expiry(expires_after: dict | None) -> Jsonb | None:
    if not expires_after:
        return None
    if expires_after.get("anchor") != "last_active_at" or not isinstance(expires_after.get("days"), int):
        raise InvalidRequest("expires_after must be {'anchor': 'last_active_at', 'days': n}", "expires_after")
    return Jsonb({"anchor": "last_active_at", "days": expires_after["days"]})


def _counts(r: dict) -> dict:
    return {k: r[k] for k in ("in_progress", "completed", "failed", "cancelled", "total")}


def _store_row(r: dict) -> dict:
    expires_after = r["expires_after"]
    expires_at = r["last_active_at"] + 86400 * expires_after["days"] if expires_after else None
    if expires_at is not None and time.time() >= expires_at:  # as SQLiteBackend: expiry first
        status = "expired"
    elif r["in_progress"]:
        status = "in_progress"
    else:
        status = "completed"
    return {"id": r["id"], "object": "vector_store", "created_at": r["created_at"],
            "name": r["name"], "metadata": r["metadata"], "expires_after": expires_after,
            "expires_at": expires_at, "last_active_at": r["last_active_at"], "status": status,
            "usage_bytes": int(r["usage_bytes"]), "file_counts": _counts(r)}


def _file_row(r: dict) -> dict:
    return {"id": r["id"], "object": "vector_store.file", "vector_store_id": r["store_id"],
            "created_at": r["created_at"], "status": r["status"], "last_error": r["last_error"],
            "usage_bytes": r["usage_bytes"], "attributes": r["attributes"],
            "chunking_strategy": r["chunking_strategy"], "filename": r["filename"],
            "batch_id": r["batch_id"]}


def _key(r: dict) -> tuple[str, int]:
    return r["file_id"], r["idx"]


def _hit(r: dict, score: float) -> SearchHit:
    return SearchHit(file_id=r["file_id"], filename=r["filename"], score=float(score),
                     attributes=r["attributes"], text=r["text"], chunk_index=r["idx"])


class PostgresBackend(VectorBackend):
    """`url`: a libpq connection string. `ef_search`: HNSW's candidate list for a query
    (pgvector's default, 40, gives recall@10 0.92 at 100k clustered 384-d vectors here; 100
    gives 0.99 at 2.1 ms p50). `exact_below`: stores of at most this many chunks are
    searched exactly. `index_above`: the HNSW index is built once the table holds more chunks
    than this. `pool_size`: connections at most (each server worker thread takes one per
    call)."""

    def __init__(self, url: str, dim: int, ef_search: int = 100, exact_below: int = 2000,
                 index_above: int = 10000, pool_size: int = 4):
        self.dim = dim
        self.ef_search = ef_search
        self.exact_below = exact_below
        self.index_above = index_above
        self._create_schema(url, dim)
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, configure=self._configure,
                                    open=True)
        self._indexed = False
        with self._cursor() as cur:
            self._has_index(cur)

    @staticmethod
    def _create_schema(url: str, dim: int) -> None:
        with psycopg.connect(url) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA.format(dim=int(dim)))
            width = conn.execute("SELECT atttypmod FROM pg_attribute WHERE attrelid = "
                                 "'vs_chunks'::regclass AND attname = 'embedding'").fetchone()[0]
        if width != dim:
            raise ValueError(f"the database's vector stores hold {width}-d vectors, not {dim}-d: "
                             "use the embedding model they were made with, or another database")

    def _has_index(self, cur) -> bool:
        """Whether the HNSW index exists (another replica may have built it)."""
        if not self._indexed:
            cur.execute("SELECT to_regclass('vs_chunks_hnsw') IS NOT NULL AS yes")
            self._indexed = cur.fetchone()["yes"]
        return self._indexed

    def build_index(self) -> bool:
        """Builds the HNSW index now, if no other replica is building it; True when it
        exists after the call. Ingestion into the table waits for the build; searches do not."""
        with self._cursor() as cur:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s) AS got", (INDEX_LOCK,))
            if cur.fetchone()["got"]:
                cur.execute("SELECT set_config('maintenance_work_mem', %s, true)", (INDEX_MEMORY,))
                cur.execute(INDEX_SQL)
                self._indexed = True
        return self._indexed

    def _index_if_due(self) -> None:
        with self._cursor() as cur:
            if self._has_index(cur):
                return
            cur.execute("SELECT count(*) AS n FROM (SELECT 1 FROM vs_chunks LIMIT %s) t",
                        (self.index_above + 1,))
            due = cur.fetchone()["n"] > self.index_above
        if due:
            try:
                self.build_index()
            except psycopg.Error:  # the file is completed all the same; the next one retries
                log.exception("building the HNSW index failed")

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        register_vector(conn)
        conn.commit()  # the pool wants its connections idle

    @contextmanager
    def _cursor(self):
        """One transaction on a pooled connection: committed when the block ends, rolled back
        if it raises."""
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    # -- stores --------------------------------------------------------------------------------

    def create_store(self, name, metadata, expires_after) -> dict:
        store_id, now = _new_id("vs_"), int(time.time())
        with self._cursor() as cur:
            cur.execute("INSERT INTO vs_stores (id, created_at, name, metadata, expires_after, "
                        "last_active_at) VALUES (%s, %s, %s, %s, %s, %s)",
                        (store_id, now, name, Jsonb(metadata or {}), _expiry(expires_after), now))
            return self._store(cur, store_id)

    def _store(self, cur, store_id: str) -> dict | None:
        cur.execute(STORE_SQL.format(where="s.id = %s", order=""), (store_id,))
        r = cur.fetchone()
        return _store_row(r) if r else None

    def get_store(self, store_id):
        with self._cursor() as cur:
            return self._store(cur, store_id)

    def list_stores(self, limit=20, order="desc", after=None, before=None):
        params: list = []
        with self._cursor() as cur:
            cond, order_by, flipped = _page(cur, "s.seq", "SELECT seq FROM vs_stores WHERE id = %s", [],
                                            limit, order, after, before, params)
            cur.execute(STORE_SQL.format(where=cond, order=order_by + " LIMIT %s"), params + [limit + 1])
            rows, more = _finish_page(cur.fetchall(), limit, flipped)
        return [_store_row(r) for r in rows], more

    def update_store(self, store_id, name=UNSET, metadata=UNSET, expires_after=UNSET):
        sets, params = [], []
        for column, value in (("name", name), ("metadata", metadata), ("expires_after", expires_after)):
            if value is not UNSET:
                sets.append(f"{column} = %s")
                params.append(value if column == "name" else
                              Jsonb(value or {}) if column == "metadata" else _expiry(value))
        with self._cursor() as cur:
            if sets:
                cur.execute(f"UPDATE vs_stores SET {', '.join(sets)} WHERE id = %s", params + [store_id])
            return self._store(cur, store_id)

    def delete_store(self, store_id) -> bool:
        with self._cursor() as cur:
            cur.execute("DELETE FROM vs_stores WHERE id = %s", (store_id,))
            return cur.rowcount > 0

    def touch_store(self, store_id) -> None:
        with self._cursor() as cur:
            cur.execute("UPDATE vs_stores SET last_active_at = %s WHERE id = %s",
                        (int(time.time()), store_id))

    # -- files in stores -----------------------------------------------------------------------

    def add_file(self, store_id, file_id, filename, attributes, chunking_strategy, batch_id=None):
        with self._cursor() as cur:
            return self._attach(cur, store_id, file_id, filename, attributes, chunking_strategy, batch_id)

    def _attach(self, cur, store_id, file_id, filename, attributes, chunking_strategy, batch_id):
        """Attaching again resets the file: in_progress, its old chunks gone."""
        cur.execute("SELECT 1 FROM vs_stores WHERE id = %s FOR KEY SHARE", (store_id,))
        if cur.fetchone() is None:
            return None
        cur.execute("DELETE FROM vs_chunks WHERE store_id = %s AND file_id = %s", (store_id, file_id))
        cur.execute("""INSERT INTO vs_files (store_id, id, created_at, status, attributes,
                chunking_strategy, filename, batch_id) VALUES (%s, %s, %s, 'in_progress', %s, %s, %s, %s)
            ON CONFLICT (store_id, id) DO UPDATE SET status = 'in_progress', last_error = NULL,
                usage_bytes = 0, chunk_count = 0, attributes = EXCLUDED.attributes,
                chunking_strategy = EXCLUDED.chunking_strategy, filename = EXCLUDED.filename,
                batch_id = EXCLUDED.batch_id
            RETURNING *""", (store_id, file_id, int(time.time()), Jsonb(attributes or {}),
                             Jsonb(chunking_strategy), filename, batch_id))
        return _file_row(cur.fetchone())

    def get_file(self, store_id, file_id):
        with self._cursor() as cur:
            cur.execute("SELECT * FROM vs_files WHERE store_id = %s AND id = %s", (store_id, file_id))
            r = cur.fetchone()
        return _file_row(r) if r else None

    def list_files(self, store_id, limit=20, order="desc", after=None, before=None, status=None,
                   batch_id=None):
        params: list = [store_id, status, status, batch_id, batch_id]
        with self._cursor() as cur:
            cond, order_by, flipped = _page(cur, "seq", "SELECT seq FROM vs_files WHERE store_id = %s AND id = %s",
                                            [store_id], limit, order, after, before, params)
            cur.execute(f"""SELECT * FROM vs_files WHERE store_id = %s
                AND (%s::text IS NULL OR status = %s) AND (%s::text IS NULL OR batch_id = %s)
                AND {cond} {order_by} LIMIT %s""", params + [limit + 1])
            rows, more = _finish_page(cur.fetchall(), limit, flipped)
        return [_file_row(r) for r in rows], more

    def update_file_attributes(self, store_id, file_id, attributes):
        with self._cursor() as cur:
            cur.execute("UPDATE vs_files SET attributes = %s WHERE store_id = %s AND id = %s RETURNING *",
                        (Jsonb(attributes or {}), store_id, file_id))
            r = cur.fetchone()
        return _file_row(r) if r else None

    def delete_file(self, store_id, file_id) -> bool:
        with self._cursor() as cur:
            cur.execute("DELETE FROM vs_files WHERE store_id = %s AND id = %s", (store_id, file_id))
            return cur.rowcount > 0

    def complete_file(self, store_id, file_id, chunks: list[Chunk]) -> bool:
        """The file row is locked first: a delete or cancel waits for this to commit, or this
        finds the file gone. Postgres text cannot hold NUL, so NULs are dropped from chunks."""
        texts = [c.text.replace("\x00", "") for c in chunks]
        if self._write_chunks(store_id, file_id, chunks, texts):
            self._index_if_due()
            return True
        return False

    def _write_chunks(self, store_id, file_id, chunks, texts) -> bool:
        with self._cursor() as cur:
            cur.execute("SELECT status FROM vs_files WHERE store_id = %s AND id = %s FOR UPDATE",
                        (store_id, file_id))
            r = cur.fetchone()
            if r is None or r["status"] != "in_progress":
                return False
            cur.execute("DELETE FROM vs_chunks WHERE store_id = %s AND file_id = %s", (store_id, file_id))
            with cur.copy(COPY_SQL) as copy:
                copy.set_types(COPY_TYPES)
                for i, (text, c) in enumerate(zip(texts, chunks)):
                    copy.write_row((store_id, file_id, i, text, c.tokens, np.asarray(c.vector, np.float32)))
            cur.execute("""UPDATE vs_files SET status = 'completed', last_error = NULL,
                usage_bytes = %s, chunk_count = %s WHERE store_id = %s AND id = %s""",
                        (sum(len(t.encode()) for t in texts), len(chunks), store_id, file_id))
            return True

    def fail_file(self, store_id, file_id, code, message) -> None:
        """Only an in_progress file fails: a cancelled or re-completed one keeps its status."""
        with self._cursor() as cur:
            cur.execute("""UPDATE vs_files SET status = 'failed', last_error = %s
                WHERE store_id = %s AND id = %s AND status = 'in_progress'""",
                        (Jsonb({"code": code, "message": message}), store_id, file_id))

    def pending_files(self) -> list[dict]:
        with self._cursor() as cur:
            cur.execute("SELECT * FROM vs_files WHERE status = 'in_progress' ORDER BY seq")
            return [_file_row(r) for r in cur.fetchall()]

    def file_chunks(self, store_id, file_id) -> list[str]:
        with self._cursor() as cur:
            cur.execute("SELECT text FROM vs_chunks WHERE store_id = %s AND file_id = %s ORDER BY idx",
                        (store_id, file_id))
            return [r["text"] for r in cur.fetchall()]

    # -- file batches --------------------------------------------------------------------------

    def create_batch(self, store_id, files, attributes, chunking_strategy):
        batch_id = _new_id("vsfb_")
        with self._cursor() as cur:
            cur.execute("SELECT 1 FROM vs_stores WHERE id = %s FOR KEY SHARE", (store_id,))
            if cur.fetchone() is None:
                return None
            cur.execute("INSERT INTO vs_batches (store_id, id, created_at) VALUES (%s, %s, %s)",
                        (store_id, batch_id, int(time.time())))
            for file_id, filename in files:
                self._attach(cur, store_id, file_id, filename, attributes, chunking_strategy, batch_id)
            return self._batch(cur, store_id, batch_id)

    def _batch(self, cur, store_id, batch_id) -> dict | None:
        cur.execute("""SELECT b.*,
                count(f.id) FILTER (WHERE f.status = 'in_progress') AS in_progress,
                count(f.id) FILTER (WHERE f.status = 'completed') AS completed,
                count(f.id) FILTER (WHERE f.status = 'failed') AS failed,
                count(f.id) FILTER (WHERE f.status = 'cancelled') AS cancelled, count(f.id) AS total
            FROM vs_batches b LEFT JOIN vs_files f ON f.store_id = b.store_id AND f.batch_id = b.id
            WHERE b.store_id = %s AND b.id = %s GROUP BY b.store_id, b.id""", (store_id, batch_id))
        r = cur.fetchone()
        if r is None:
            return None
        if r["in_progress"]:
            status = "in_progress"
        elif r["cancelled"]:
            status = "cancelled"
        elif r["total"] and r["failed"] == r["total"]:
            status = "failed"
        else:
            status = "completed"
        return {"id": r["id"], "object": "vector_store.file_batch", "vector_store_id": store_id,
                "created_at": r["created_at"], "status": status, "file_counts": _counts(r)}

    def get_batch(self, store_id, batch_id):
        with self._cursor() as cur:
            return self._batch(cur, store_id, batch_id)

    def cancel_batch(self, store_id, batch_id):
        with self._cursor() as cur:
            cur.execute("UPDATE vs_batches SET cancelled = TRUE WHERE store_id = %s AND id = %s",
                        (store_id, batch_id))
            if cur.rowcount == 0:
                return None
            cur.execute("""UPDATE vs_files SET status = 'cancelled'
                WHERE store_id = %s AND batch_id = %s AND status = 'in_progress'""", (store_id, batch_id))
            return self._batch(cur, store_id, batch_id)

    # -- search --------------------------------------------------------------------------------

    def search(self, store_id, vector, query, k, filters=None, score_threshold=0.0, hybrid=None):
        """Hybrid: rag/fusion.py fuses the two rankings, each CANDIDATES deep."""
        where, params = to_sql(filters, "f.attributes")
        vector = np.asarray(vector, np.float32).reshape(-1)
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        depth = k if hybrid is None else max(k, CANDIDATES)
        with self._cursor() as cur:
            by_vector = self._by_vector(cur, store_id, vector, depth, where, params)
            if hybrid is None:
                hits = [_hit(r, r["score"]) for r in by_vector]
            else:
                cur.execute(TEXT_SQL.format(where=where), [query, store_id, *params, depth])
                by_text = cur.fetchall()
                rows = {_key(r): r for r in by_text + by_vector}
                fused = fuse([_key(r) for r in by_vector], [_key(r) for r in by_text], *hybrid)
                hits = [_hit(rows[key], score) for key, score in fused]
        return [h for h in hits if h.score >= score_threshold][:k]

    def _by_vector(self, cur, store_id, vector, n, where, params) -> list[dict]:
        """The n nearest rows that pass `where`: see the module docstring for the steps."""
        cur.execute(f"""SELECT coalesce(sum(f.chunk_count), 0) AS passing,
                (SELECT reltuples FROM pg_class WHERE oid = 'vs_chunks'::regclass) AS total
            FROM vs_files f WHERE f.store_id = %s AND f.status = 'completed' AND {where}""",
                    [store_id, *params])
        r = cur.fetchone()
        passing, total = r["passing"], max(r["total"], r["passing"])
        if passing > max(self.exact_below, n) and self._has_index(cur):
            # HNSW's candidates are drawn from the whole table: enough for n passing rows?
            first = max(self.ef_search, n, math.ceil(2 * n * total / passing))
            for ef in (first, MAX_EF_SEARCH) if first < MAX_EF_SEARCH else ():
                cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
                cur.execute(ANN_SQL.format(where=where), [vector, vector, ef, store_id, *params, n])
                rows = cur.fetchall()
                if len(rows) >= n:
                    return rows
        cur.execute(EXACT_SQL.format(where=where), [vector, store_id, *params, vector, n])
        return cur.fetchall()

    def close(self) -> None:
        self._pool.close()
