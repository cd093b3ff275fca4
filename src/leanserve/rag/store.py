"""`SQLiteBackend`: the embedded vector-store backend, one SQLite file (e.g.
`<data_dir>/vectors.sqlite3`) holding stores, their files, batches, chunks with their
vectors, and an FTS5 index of the chunks' text for hybrid search.

It goes through `apsw`, which bundles a current SQLite (3.54 here) whatever the system
has: Python's own `sqlite3` here is 3.40, whose FTS5 lacks `contentless_delete` (so the
text would be stored twice). Vectors are float32 BLOBs (sqlite-vec's layout, so its SQL
functions read them); searches run in memory over vectors loaded from these rows
(rag/vector_index.py says why, with the measurements).

WAL mode: searches and listings read beside the one writer. Each thread has its own
connection; writes go one at a time (a lock, then BEGIN IMMEDIATE), with synchronous=FULL
so that a commit survives a power cut, not only kill -9. `complete_file` is one
transaction: a file is `completed` with all its chunks, or still `in_progress` with none.
Invariant: a file has chunks only while it is completed (attaching it again drops them),
so search never needs to look at file statuses.
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
from pathlib import Path

import apsw
import numpy as np

from ..errors import InvalidRequest
from . import filters as attribute_filters
from .backend import UNSET, Chunk, SearchHit, VectorBackend
from .fusion import CANDIDATES, fuse
from .vector_index import ANN_THRESHOLD, VectorIndex

SCHEMA = """
CREATE TABLE IF NOT EXISTS vs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vs_stores (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT, metadata TEXT NOT NULL,
    expires_days INTEGER, created_at INTEGER NOT NULL, last_active_at INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0);  -- bumped by every change to the store's chunks
CREATE TABLE IF NOT EXISTS vs_files (
    seq INTEGER PRIMARY KEY, store_id TEXT NOT NULL, file_id TEXT NOT NULL, filename TEXT NOT NULL,
    status TEXT NOT NULL, last_error TEXT, usage_bytes INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0, attributes TEXT NOT NULL, chunking_strategy TEXT NOT NULL,
    batch_id TEXT, created_at INTEGER NOT NULL, UNIQUE (store_id, file_id));
CREATE INDEX IF NOT EXISTS vs_files_status ON vs_files (status);
CREATE INDEX IF NOT EXISTS vs_files_batch ON vs_files (batch_id);
CREATE TABLE IF NOT EXISTS vs_batches (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, store_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, cancelled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vs_chunks (  -- AUTOINCREMENT: an id is never reused, so the ANN's keys stay unique
    id INTEGER PRIMARY KEY AUTOINCREMENT, store_id TEXT NOT NULL, file_id TEXT NOT NULL, idx INTEGER NOT NULL,
    text TEXT NOT NULL, tokens INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS vs_chunks_file ON vs_chunks (store_id, file_id, idx);
CREATE VIRTUAL TABLE IF NOT EXISTS vs_chunks_fts USING fts5(
    text, content='', contentless_delete=1, tokenize='porter unicode61 remove_diacritics 2');
"""
STATUSES = ("in_progress", "completed", "failed", "cancelled")
DAY = 86400


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class SQLiteBackend(VectorBackend):
    def __init__(self, path: str | Path, dim: int, ann_threshold: int = ANN_THRESHOLD):
        self.path, self.dim = str(path), dim
        self._local = threading.local()
        self._connections: list[apsw.Connection] = []
        self._lock = threading.Lock()  # one writer at a time; guards _connections too
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")
        with self._write() as (db, _):
            db.execute(SCHEMA)
            db.execute("INSERT OR IGNORE INTO vs_meta VALUES ('dim', ?)", (str(dim),))
            (stored,) = db.execute("SELECT value FROM vs_meta WHERE key = 'dim'").fetchone()
        if int(stored) != dim:
            raise ValueError(f"{self.path} holds {stored}-dimensional vectors, not {dim}")
        self.vectors = VectorIndex(dim, self._load_vectors, ann_threshold)

    # -- connections and transactions ------------------------------------------------------------

    def _db(self) -> apsw.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = apsw.Connection(self.path)
            db.set_busy_timeout(30_000)
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def _write(self):
        """A write transaction: yields (connection, after), `after` a list of callables run
        once it has committed (still in turn with other writers: keeping the vectors in step)."""
        db, after = self._db(), []
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db, after
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            for fn in after:
                fn()

    @contextlib.contextmanager
    def _read(self):
        """A consistent snapshot for several statements (WAL: never waits for the writer)."""
        db = self._db()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()

    # -- stores ------------------------------------------------------------------------------------

    def create_store(self, name, metadata, expires_after) -> dict:
        store_id, now = new_id("vs"), int(time.time())
        with self._write() as (db, _):
            db.execute("INSERT INTO vs_stores (id, name, metadata, expires_days, created_at, last_active_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (store_id, name, json.dumps(metadata or {}),
                                                      _days(expires_after), now, now))
            return self._store_row(db, store_id)

    def get_store(self, store_id):
        with self._read() as db:
            return self._store_row(db, store_id)

    def list_stores(self, limit=20, order="desc", after=None, before=None):
        with self._read() as db:
            ids, more = _page(db, "vs_stores", "1", (), limit, order, after, before)
            return [self._store_row(db, i) for i in ids], more

    def update_store(self, store_id, name=UNSET, metadata=UNSET, expires_after=UNSET):
        changes = {"name": name, "metadata": json.dumps(metadata or {}) if metadata is not UNSET else UNSET,
                   "expires_days": _days(expires_after) if expires_after is not UNSET else UNSET}
        changes = {k: v for k, v in changes.items() if v is not UNSET}
        with self._write() as (db, _):
            if changes:
                db.execute(f"UPDATE vs_stores SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                           (*changes.values(), store_id))
            return self._store_row(db, store_id)

    def delete_store(self, store_id) -> bool:
        with self._write() as (db, after):
            if not db.execute("DELETE FROM vs_stores WHERE id = ? RETURNING id", (store_id,)).fetchall():
                return False
            db.execute("DELETE FROM vs_chunks_fts WHERE rowid IN (SELECT id FROM vs_chunks WHERE store_id = ?)",
                       (store_id,))
            for table in ("vs_chunks", "vs_files", "vs_batches"):
                db.execute(f"DELETE FROM {table} WHERE store_id = ?", (store_id,))
            after.append(lambda: self.vectors.drop(store_id))
            return True

    def touch_store(self, store_id) -> None:
        with self._write() as (db, _):
            db.execute("UPDATE vs_stores SET last_active_at = ? WHERE id = ?", (int(time.time()), store_id))

    def _store_row(self, db, store_id) -> dict | None:
        row = db.execute("SELECT id, name, metadata, expires_days, created_at, last_active_at FROM vs_stores "
                         "WHERE id = ?", (store_id,)).fetchone()
        if row is None:
            return None
        sid, name, metadata, days, created_at, last_active_at = row
        counts, usage = _counts(db, "store_id", store_id)
        expires_at = last_active_at + days * DAY if days else None
        status = ("expired" if expires_at is not None and time.time() >= expires_at
                  else "in_progress" if counts["in_progress"] else "completed")
        return {"id": sid, "object": "vector_store", "created_at": created_at, "name": name,
                "metadata": json.loads(metadata),
                "expires_after": {"anchor": "last_active_at", "days": days} if days else None,
                "expires_at": expires_at, "last_active_at": last_active_at, "status": status,
                "usage_bytes": usage, "file_counts": counts}

    # -- files -------------------------------------------------------------------------------------

    def add_file(self, store_id, file_id, filename, attributes, chunking_strategy, batch_id=None):
        with self._write() as (db, after):
            if not self._attach(db, after, store_id, file_id, filename, attributes, chunking_strategy, batch_id):
                return None
            return _file_row(db, store_id, file_id)

    def _attach(self, db, after, store_id, file_id, filename, attributes, strategy, batch_id) -> bool:
        if db.execute("SELECT 1 FROM vs_stores WHERE id = ?", (store_id,)).fetchone() is None:
            return False
        if self._drop_chunks(db, store_id, file_id):
            self._changed(db, after, store_id, file_id)
        db.execute("INSERT INTO vs_files (store_id, file_id, filename, status, attributes, chunking_strategy, "
                   "batch_id, created_at) VALUES (?, ?, ?, 'in_progress', ?, ?, ?, ?) "
                   "ON CONFLICT (store_id, file_id) DO UPDATE SET filename = excluded.filename, "
                   "status = 'in_progress', last_error = NULL, usage_bytes = 0, chunks = 0, "
                   "attributes = excluded.attributes, chunking_strategy = excluded.chunking_strategy, "
                   "batch_id = excluded.batch_id, created_at = excluded.created_at",
                   (store_id, file_id, filename, json.dumps(attributes or {}), json.dumps(strategy), batch_id,
                    int(time.time())))
        return True

    def get_file(self, store_id, file_id):
        with self._read() as db:
            return _file_row(db, store_id, file_id)

    def list_files(self, store_id, limit=20, order="desc", after=None, before=None, status=None, batch_id=None):
        where, params = "store_id = ?", [store_id]
        if status is not None:
            where, params = where + " AND status = ?", params + [status]
        if batch_id is not None:
            where, params = where + " AND batch_id = ?", params + [batch_id]
        with self._read() as db:
            ids, more = _page(db, "vs_files", where, tuple(params), limit, order, after, before, "file_id",
                              ("store_id = ?", (store_id,)))
            return [_file_row(db, store_id, i) for i in ids], more

    def update_file_attributes(self, store_id, file_id, attributes):
        with self._write() as (db, _):
            db.execute("UPDATE vs_files SET attributes = ? WHERE store_id = ? AND file_id = ?",
                       (json.dumps(attributes), store_id, file_id))
            return _file_row(db, store_id, file_id)

    def delete_file(self, store_id, file_id) -> bool:
        with self._write() as (db, after):
            if self._drop_chunks(db, store_id, file_id):
                self._changed(db, after, store_id, file_id)
            return bool(db.execute("DELETE FROM vs_files WHERE store_id = ? AND file_id = ? RETURNING 1",
                                   (store_id, file_id)).fetchall())

    def complete_file(self, store_id, file_id, chunks: list[Chunk]) -> bool:
        vectors = self._matrix(chunks)
        with self._write() as (db, after):
            row = db.execute("SELECT status FROM vs_files WHERE store_id = ? AND file_id = ?",
                             (store_id, file_id)).fetchone()
            if row is None or row[0] != "in_progress":
                return False
            self._drop_chunks(db, store_id, file_id)  # rows a crash left behind, if any
            ids, usage = np.empty(len(chunks), np.int64), 0
            for i, (chunk, vector) in enumerate(zip(chunks, vectors)):
                (ids[i],) = db.execute("INSERT INTO vs_chunks (store_id, file_id, idx, text, tokens, vector) "
                                       "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                                       (store_id, file_id, i, chunk.text, int(chunk.tokens),
                                        vector.tobytes())).fetchone()
                db.execute("INSERT INTO vs_chunks_fts (rowid, text) VALUES (?, ?)", (int(ids[i]), chunk.text))
                usage += len(chunk.text.encode())
            db.execute("UPDATE vs_files SET status = 'completed', last_error = NULL, usage_bytes = ?, chunks = ? "
                       "WHERE store_id = ? AND file_id = ?", (usage, len(chunks), store_id, file_id))
            self._changed(db, after, store_id, file_id, ids, vectors)
            return True

    def _matrix(self, chunks: list[Chunk]) -> np.ndarray:
        """The chunks' vectors as float32 [n, dim], L2-normalised (so a dot product is the cosine)."""
        m = np.array([np.asarray(c.vector, dtype=np.float32).reshape(-1) for c in chunks], dtype=np.float32)
        m = m.reshape(len(chunks), -1)
        if len(chunks) and m.shape[1] != self.dim:
            raise ValueError(f"chunk vectors have {m.shape[1]} dimensions; this store's have {self.dim}")
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        if not np.all(np.isfinite(m)) or np.any(norms == 0):
            raise ValueError("chunk vectors must be finite and non-zero")
        return (m / norms).astype("<f4")

    def _drop_chunks(self, db, store_id, file_id) -> bool:
        gone = db.execute("DELETE FROM vs_chunks WHERE store_id = ? AND file_id = ? RETURNING id",
                          (store_id, file_id)).fetchall()
        if gone:
            db.executemany("DELETE FROM vs_chunks_fts WHERE rowid = ?", gone)
        return bool(gone)

    def _changed(self, db, after, store_id, file_id, ids=None, vectors=None) -> None:
        """Bumps the store's version; once committed, the in-memory vectors follow."""
        (version,) = db.execute("UPDATE vs_stores SET version = version + 1 WHERE id = ? RETURNING version",
                                (store_id,)).fetchone()
        after.append(lambda: self.vectors.apply(store_id, version, file_id, ids, vectors))

    def fail_file(self, store_id, file_id, code, message) -> None:
        """Only an in_progress file fails: a late report must not undo a completion or a cancel."""
        with self._write() as (db, _):
            db.execute("UPDATE vs_files SET status = 'failed', last_error = ? WHERE store_id = ? AND file_id = ? "
                       "AND status = 'in_progress'", (json.dumps({"code": code, "message": message}), store_id,
                                                      file_id))

    def pending_files(self) -> list[dict]:
        with self._read() as db:
            keys = db.execute("SELECT store_id, file_id FROM vs_files WHERE status = 'in_progress' "
                              "ORDER BY created_at, seq").fetchall()
            return [_file_row(db, s, f) for s, f in keys]

    def file_chunks(self, store_id, file_id) -> list[str]:
        return [t for (t,) in self._db().execute("SELECT text FROM vs_chunks WHERE store_id = ? AND file_id = ? "
                                                 "ORDER BY idx", (store_id, file_id))]

    # -- batches -----------------------------------------------------------------------------------

    def create_batch(self, store_id, files, attributes, chunking_strategy):
        batch_id = new_id("vsfb")
        with self._write() as (db, after):
            for file_id, filename in files:
                if not self._attach(db, after, store_id, file_id, filename, attributes, chunking_strategy, batch_id):
                    return None
            db.execute("INSERT INTO vs_batches (id, store_id, created_at) VALUES (?, ?, ?)",
                       (batch_id, store_id, int(time.time())))
            return _batch_row(db, store_id, batch_id)

    def get_batch(self, store_id, batch_id):
        with self._read() as db:
            return _batch_row(db, store_id, batch_id)

    def cancel_batch(self, store_id, batch_id):
        with self._write() as (db, _):
            if not db.execute("UPDATE vs_batches SET cancelled = 1 WHERE id = ? AND store_id = ? RETURNING 1",
                              (batch_id, store_id)).fetchall():
                return None
            db.execute("UPDATE vs_files SET status = 'cancelled' WHERE store_id = ? AND batch_id = ? "
                       "AND status = 'in_progress'", (store_id, batch_id))
            return _batch_row(db, store_id, batch_id)

    # -- search ------------------------------------------------------------------------------------

    def search(self, store_id, vector, query, k, filters=None, score_threshold=0.0, hybrid=None):
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        allowed = passing = None
        with self._read() as db:
            row = db.execute("SELECT version FROM vs_stores WHERE id = ?", (store_id,)).fetchone()
            if row is None:
                return []
            if filters is not None:
                files = db.execute("SELECT file_id, attributes, chunks FROM vs_files WHERE store_id = ? "
                                   "AND status = 'completed'", (store_id,)).fetchall()
                allowed = {f for f, attrs, _ in files if attribute_filters.matches(filters, json.loads(attrs))}
                passing = sum(n for f, _, n in files if f in allowed)
                if not allowed:
                    return []
        depth = k if hybrid is None else max(k, CANDIDATES)
        found = self.vectors.search(store_id, row[0], q, depth, allowed, passing)
        if hybrid is None:
            ranked = [(c, score) for c, _, score in found]
        else:
            ranked = fuse([c for c, _, _ in found], self._text_ranking(store_id, query, depth, allowed), *hybrid)
        ranked = [(c, s) for c, s in ranked if s >= score_threshold][:k]
        return self._hits(ranked)

    def _text_ranking(self, store_id, query: str, depth: int, allowed: set[str] | None) -> list[int]:
        """Chunk ids by BM25 of any of the query's words (quoted: no FTS5 syntax from users)."""
        words = dict.fromkeys(re.findall(r"\w+", query.lower()))
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in words)
        sql = ("SELECT c.id FROM vs_chunks_fts JOIN vs_chunks c ON c.id = vs_chunks_fts.rowid "
               "WHERE vs_chunks_fts MATCH ? AND c.store_id = ?")
        params: tuple = (match, store_id)
        if allowed is not None:
            sql, params = sql + " AND c.file_id IN (SELECT value FROM json_each(?))", params + (json.dumps(
                sorted(allowed)),)
        return [c for (c,) in self._db().execute(sql + " ORDER BY bm25(vs_chunks_fts) LIMIT ?", params + (depth,))]

    def _hits(self, ranked: list[tuple[int, float]]) -> list[SearchHit]:
        if not ranked:
            return []
        rows = {r[0]: r[1:] for r in self._db().execute(
            "SELECT c.id, c.file_id, c.idx, c.text, f.filename, f.attributes FROM vs_chunks c "
            "JOIN vs_files f ON f.store_id = c.store_id AND f.file_id = c.file_id "
            "WHERE c.id IN (SELECT value FROM json_each(?))", (json.dumps([c for c, _ in ranked]),))}
        return [SearchHit(file_id=r[0], filename=r[3], score=float(s), attributes=json.loads(r[4]), text=r[2],
                          chunk_index=r[1]) for c, s in ranked if (r := rows.get(c)) is not None]

    def _load_vectors(self, store_id: str) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The store's version and, per file, its chunk ids and vectors (for VectorIndex)."""
        with self._read() as db:
            row = db.execute("SELECT version FROM vs_stores WHERE id = ?", (store_id,)).fetchone()
            rows = db.execute("SELECT file_id, id, vector FROM vs_chunks WHERE store_id = ? ORDER BY file_id, idx",
                              (store_id,)).fetchall()
        files, start = {}, 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or rows[end][0] != rows[start][0]:
                part = rows[start:end]
                ids = np.fromiter((r[1] for r in part), np.int64, len(part))
                matrix = np.frombuffer(b"".join(r[2] for r in part), "<f4").reshape(len(part), self.dim)
                files[rows[start][0]] = (ids, matrix)
                start = end
        return (row[0] if row else 0), files


def _days(expires_after: dict | None) -> int | None:
    if not expires_after:
        return None
    if expires_after.get("anchor") != "last_active_at" or not isinstance(expires_after.get("days"), int):
        raise InvalidRequest("expires_after must be {'anchor': 'last_active_at', 'days': n}", "expires_after")
    return expires_after["days"]


def _counts(db, column: str, value: str) -> tuple[dict, int]:
    counts, usage = dict.fromkeys(STATUSES, 0), 0
    for status, n, used in db.execute(f"SELECT status, count(*), sum(usage_bytes) FROM vs_files WHERE {column} = ? "
                                      "GROUP BY status", (value,)):
        counts[status], usage = n, usage + (used or 0)
    return counts | {"total": sum(counts.values())}, usage


def _file_row(db, store_id: str, file_id: str) -> dict | None:
    row = db.execute("SELECT file_id, store_id, created_at, status, last_error, usage_bytes, attributes, "
                     "chunking_strategy, filename, batch_id FROM vs_files WHERE store_id = ? AND file_id = ?",
                     (store_id, file_id)).fetchone()
    if row is None:
        return None
    fid, sid, created_at, status, last_error, usage, attributes, strategy, filename, batch_id = row
    return {"id": fid, "object": "vector_store.file", "vector_store_id": sid, "created_at": created_at,
            "status": status, "last_error": json.loads(last_error) if last_error else None, "usage_bytes": usage,
            "attributes": json.loads(attributes), "chunking_strategy": json.loads(strategy), "filename": filename,
            "batch_id": batch_id}


def _batch_row(db, store_id: str, batch_id: str) -> dict | None:
    row = db.execute("SELECT created_at, cancelled FROM vs_batches WHERE id = ? AND store_id = ?",
                     (batch_id, store_id)).fetchone()
    if row is None:
        return None
    counts, _ = _counts(db, "batch_id", batch_id)
    status = ("in_progress" if counts["in_progress"] else "cancelled" if row[1]
              else "failed" if counts["total"] and counts["failed"] == counts["total"] else "completed")
    return {"id": batch_id, "object": "vector_store.file_batch", "vector_store_id": store_id, "created_at": row[0],
            "status": status, "file_counts": counts}


def _page(db, table: str, where: str, params: tuple, limit: int, order: str, after: str | None,
          before: str | None, id_column: str = "id", scope: tuple[str, tuple] | None = None) -> tuple[list[str], bool]:
    """One page of ids in (created_at, insertion) order, OpenAI's cursors: `after` gives the
    rows following that id in the listing's order, `before` those preceding it (the nearest
    `limit`); has_more says whether rows lie beyond the page on the side it moves to. A
    cursor is looked up in `scope` (default: `where`), so a status filter does not make a
    file that changed status meanwhile an unknown cursor."""
    if not 1 <= limit <= 100 or order not in ("asc", "desc"):
        raise InvalidRequest("limit must be 1 to 100 and order 'asc' or 'desc'", "limit")
    conditions, values = [where], list(params)
    for name, cursor, later in (("after", after, True), ("before", before, False)):
        if cursor is None:
            continue
        scope_where, scope_params = scope or (where, params)
        key = db.execute(f"SELECT created_at, seq FROM {table} WHERE {scope_where} AND {id_column} = ?",
                         (*scope_params, cursor)).fetchone()
        if key is None:
            raise InvalidRequest(f"'{name}' names no object in this list: {cursor!r}", name)
        forward = later == (order == "asc")  # does this cursor bound the rows from below?
        conditions.append(f"(created_at, seq) {'>' if forward else '<'} (?, ?)")
        values += key
    ascending = (order == "asc") != (before is not None and after is None)
    direction = "ASC" if ascending else "DESC"
    ids = [i for (i,) in db.execute(f"SELECT {id_column} FROM {table} WHERE {' AND '.join(conditions)} "
                                    f"ORDER BY created_at {direction}, seq {direction} LIMIT ?",
                                    (*values, limit + 1))]
    more = len(ids) > limit
    ids = ids[:limit]
    return (ids[::-1] if before is not None and after is None else ids), more
