"""The durable part of jobs: files, batches with their lines, and async requests.

A data directory holds:

    jobs.sqlite3      files' metadata, batches, each batch line (request and result), async requests
    files/<file id>   each file's bytes
    lock              held (flock) while a store is open: one server per directory

File bytes live on disk, not in BLOBs: an upload may be 100 MB, and as a BLOB it would be
written twice (WAL, then the database at checkpoint), be read whole to serve it, and sit in
the database that every line result is written to. A file is fsynced and renamed into
place before its row is committed, so a row never names missing bytes; bytes left without
a row by a crash in between are removed when the store opens.

SQLite runs in WAL mode (status polls read while results are written) with
`synchronous=FULL`: every commit fsyncs the WAL, so whatever a client has been told (a
file, batch or async request id; a counted result) survives a power cut, not only kill -9
as NORMAL would. It costs one fsync per commit, milliseconds against the hundreds of
milliseconds a batch line takes to generate.

Exactly once: a line's result is written in the transaction that marks it done and counts
it, and only if it was not done yet. A line not done is run again after a restart.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import LeanserveError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, metadata TEXT, errors TEXT,
    output_file_id TEXT, error_file_id TEXT,
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, body TEXT,
    done INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0, result TEXT,
    PRIMARY KEY (batch_id, line));
CREATE TABLE IF NOT EXISTS async_requests (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL,
    status_code INTEGER, response TEXT,
    created_at INTEGER NOT NULL, started_at INTEGER, completed_at INTEGER);
CREATE INDEX IF NOT EXISTS async_by_status ON async_requests (status);
"""

# Columns added after the first release, ADDed to older databases when they are opened.
ADDED_COLUMNS = {
    "batches": [
        ("scheduled_start_at", "INTEGER"),  # the batch's lines run from then on (carbon-aware deferral)
        ("plan", "TEXT"),  # JSON: jobs.carbon_schedule.Plan.as_dict(), the batch's `leanserve` field
        ("expired_at", "INTEGER"),  # when a batch's completion window ran out before its lines did
    ],
}

# Batch statuses the worker still has something to do for.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass
class InputLine:
    """One line of a batch's input file: a request to run (`body`), or already an `error` line."""

    line: int  # 1-based line number in the file
    custom_id: str | None
    body: str | None = None
    error: dict | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class JobStore:
    """Thread-safe: one connection behind a lock. Callers on an event loop use `asyncio.to_thread`."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / "lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise LeanserveError(f"the data directory {self.root} is in use by another leanserve process; "
                                 "pass --data-dir DIR to run a second server with its own state") from None
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._add_columns()
        self._lock = threading.Lock()
        self._remove_orphans()

    def _add_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:  # waits for a transaction still running in another thread
            self._db.close()
        self._lock_file.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, *args) -> list[dict]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args)]

    def _one(self, sql: str, *args) -> dict | None:
        rows = self._read(sql, *args)
        return rows[0] if rows else None

    def _page(self, table: str, after: str | None, limit: int, order: str = "desc",
              where: str = "1", args: tuple = ()) -> list[dict]:
        """Rows in creation order (`desc`: newest first) after the row with id `after`."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        if after is not None:
            where += f" AND rowid {op} (SELECT rowid FROM {table} WHERE id = ?)"
            args += (after,)
        return self._read(f"SELECT * FROM {table} WHERE {where} ORDER BY rowid {direction} LIMIT ?", *args, limit)

    # -- files --------------------------------------------------------------------------------

    def new_temp_path(self) -> Path:
        """Where to write bytes for `add_file`: in files/, so taking them in is a rename."""
        return self.files_dir / f".tmp-{uuid.uuid4().hex}"

    def add_file(self, temp: Path, filename: str, purpose: str) -> dict:
        row = self._place(temp, filename, purpose)
        with self._write() as db:
            db.execute("INSERT INTO files VALUES (:id, :filename, :purpose, :bytes, :created_at)", row)
        return row

    def _place(self, temp: Path, filename: str, purpose: str) -> dict:
        """Makes `temp` durable under a new file id; the caller commits the returned row."""
        row = {"id": new_id("file-"), "filename": filename, "purpose": purpose,
               "bytes": temp.stat().st_size, "created_at": int(time.time())}
        _fsync(temp)
        os.replace(temp, self.files_dir / row["id"])
        _fsync(self.files_dir)
        return row

    def file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ?", file_id)

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def list_files(self, after: str | None = None, limit: int = 10000, order: str = "desc",
                   purpose: str | None = None) -> list[dict]:
        if purpose is None:
            return self._page("files", after, limit, order)
        return self._page("files", after, limit, order, "purpose = ?", (purpose,))

    def delete_file(self, file_id: str) -> bool:
        with self._write() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)  # after a crash here: an orphan, removed at open
        return bool(deleted)

    def _remove_orphans(self) -> None:
        known = {row["id"] for row in self._read("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name not in known:
                path.unlink()

    # -- batches ------------------------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict | None = None) -> dict:
        batch_id = new_id("batch_")
        with self._write() as db:
            db.execute("INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, metadata, "
                       "created_at) VALUES (?, ?, ?, ?, 'validating', ?, ?)",
                       (batch_id, input_file_id, endpoint, completion_window,
                        None if metadata is None else json.dumps(metadata), int(time.time())))
        return self.batch(batch_id)

    def batch(self, batch_id: str) -> dict | None:
        return self._one("SELECT * FROM batches WHERE id = ?", batch_id)

    def list_batches(self, after: str | None = None, limit: int = 20) -> list[dict]:
        return self._page("batches", after, limit)

    def active_batches(self) -> list[dict]:
        """Batches with work left, oldest first."""
        marks = ", ".join("?" * len(ACTIVE))
        return self._read(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY rowid", *ACTIVE)

    @staticmethod
    def _move(db: sqlite3.Connection, batch_id: str, status: str, sources: tuple[str, ...]) -> bool:
        """Sets `status` and its timestamp if the batch is in one of `sources`."""
        marks = ", ".join("?" * len(sources))
        return bool(db.execute(f"UPDATE batches SET status = ?, {status}_at = ? WHERE id = ? AND status IN ({marks})",
                               (status, int(time.time()), batch_id, *sources)).rowcount)

    def start_batch(self, batch_id: str, lines: Iterable[InputLine],
                    schedule: Callable[[], dict] | None = None) -> None:
        """Stores a validated input's lines, the rejected ones already done as failures, and
        moves the batch to in_progress (unless it is being cancelled). An input without
        lines fails the batch. `schedule()`, called once the lines are consumed, returns the
        batch's plan (a dict with `scheduled_start_at`), stored in the same transaction."""
        with self._write() as db:
            db.executemany("INSERT INTO batch_lines (batch_id, line, custom_id, body, done, result) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           ((batch_id, x.line, x.custom_id, x.body, x.error is not None,
                             None if x.error is None else json.dumps(x.error)) for x in lines))
            total, failed = db.execute("SELECT count(*), coalesce(sum(done), 0) FROM batch_lines WHERE batch_id = ?",
                                       (batch_id,)).fetchone()
            db.execute("UPDATE batches SET total = ?, failed = ? WHERE id = ?", (total, failed, batch_id))
            if total == 0:
                self._fail(db, batch_id, [{"code": "empty_file", "message": "The batch input file has no requests."}])
            else:
                if schedule is not None:
                    plan = schedule()
                    db.execute("UPDATE batches SET scheduled_start_at = ?, plan = ? WHERE id = ?",
                               (plan["scheduled_start_at"], json.dumps(plan), batch_id))
                self._move(db, batch_id, "in_progress", ("validating",))

    def fail_batch(self, batch_id: str, errors: list[dict]) -> None:
        """A batch whose input cannot be used at all; `errors` are {code, message, line?, param?}."""
        with self._write() as db:
            self._fail(db, batch_id, errors)

    def _fail(self, db: sqlite3.Connection, batch_id: str, errors: list[dict]) -> None:
        if self._move(db, batch_id, "failed", ("validating",)):
            db.execute("UPDATE batches SET errors = ? WHERE id = ?", (json.dumps(errors), batch_id))

    def pending_lines(self, batch_id: str, after_line: int = 0, limit: int = 1) -> list[dict]:
        """Lines not done yet, in file order, numbered above `after_line`."""
        return self._read("SELECT line, custom_id, body FROM batch_lines WHERE batch_id = ? AND done = 0 "
                          "AND line > ? ORDER BY line LIMIT ?", batch_id, after_line, limit)

    def finish_line(self, batch_id: str, line: int, result: dict, ok: bool) -> bool:
        """Stores a line's result and counts it (completed if `ok`, else failed), unless the
        line is done already. Returns whether it was stored."""
        with self._write() as db:
            stored = db.execute("UPDATE batch_lines SET done = 1, ok = ?, result = ? "
                                "WHERE batch_id = ? AND line = ? AND done = 0",
                                (ok, json.dumps(result), batch_id, line)).rowcount
            if stored:
                counter = "completed" if ok else "failed"
                db.execute(f"UPDATE batches SET {counter} = {counter} + 1 WHERE id = ?", (batch_id,))
        return bool(stored)

    def results(self, batch_id: str, page: int = 1000) -> Iterator[tuple[bool, str]]:
        """(ok, result JSON) of each done line, in file order, read a page at a time."""
        last = 0
        while rows := self._read("SELECT line, ok, result FROM batch_lines WHERE batch_id = ? AND done = 1 "
                                 "AND line > ? ORDER BY line LIMIT ?", batch_id, last, page):
            for row in rows:
                yield bool(row["ok"]), row["result"]
            last = rows[-1]["line"]

    def cancel_batch(self, batch_id: str) -> dict | None:
        """Moves a validating or in-progress batch to cancelling; returns the batch as it is then."""
        with self._write() as db:
            self._move(db, batch_id, "cancelling", ("validating", "in_progress"))
        return self.batch(batch_id)

    def finalize_batch(self, batch_id: str) -> bool:
        """in_progress → finalizing; False if the batch was cancelled meanwhile."""
        with self._write() as db:
            return self._move(db, batch_id, "finalizing", ("in_progress",))

    def expire_lines(self, batch_id: str, result: Callable[[str | None], dict]) -> int:
        """Ends each line of a validating or in-progress batch that is not done yet as failed,
        with `result(custom_id)` (the `batch_expired` error line), and counts them, in one
        transaction; a line still generating then finds itself done and its answer is not
        stored. Returns how many lines it ended."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM batches WHERE id = ? AND status IN ('validating', 'in_progress')",
                          (batch_id,)).fetchone() is None:
                return 0
            rows = db.execute("SELECT line, custom_id FROM batch_lines WHERE batch_id = ? AND done = 0",
                              (batch_id,)).fetchall()
            db.executemany("UPDATE batch_lines SET done = 1, ok = 0, result = ? WHERE batch_id = ? AND line = ?",
                           ((json.dumps(result(row["custom_id"])), batch_id, row["line"]) for row in rows))
            db.execute("UPDATE batches SET failed = failed + ? WHERE id = ?", (len(rows), batch_id))
        return len(rows)

    def close_batch(self, batch_id: str, output: Path | None, errors: Path | None, expired: bool = False) -> bool:
        """Ends a finalizing batch as completed, a cancelling one as cancelled, or (`expired`)
        a validating or in-progress one as expired, and registers its output and error files
        (temp paths, None when there is nothing to write) in the same transaction. False, and
        the files dropped, if it was in none of those."""
        rows = [None if path is None else self._place(path, f"{batch_id}_{kind}.jsonl", "batch_output")
                for kind, path in (("output", output), ("error", errors))]
        with self._write() as db:
            if expired:
                closed = self._move(db, batch_id, "expired", ("validating", "in_progress"))
            else:
                closed = (self._move(db, batch_id, "completed", ("finalizing",))
                          or self._move(db, batch_id, "cancelled", ("cancelling",)))
            if closed:
                for row in filter(None, rows):
                    db.execute("INSERT INTO files VALUES (:id, :filename, :purpose, :bytes, :created_at)", row)
                db.execute("UPDATE batches SET output_file_id = ?, error_file_id = ? WHERE id = ?",
                           tuple(row["id"] if row else None for row in rows) + (batch_id,))
        if not closed:
            for row in filter(None, rows):
                self.file_path(row["id"]).unlink()
        return closed

    # -- async requests -----------------------------------------------------------------------

    def add_async(self, endpoint: str, body: str) -> dict:
        request_id = new_id("async_")
        with self._write() as db:
            db.execute("INSERT INTO async_requests (id, endpoint, body, status, created_at) VALUES (?, ?, ?, 'queued', ?)",
                       (request_id, endpoint, body, int(time.time())))
        return self.async_request(request_id)

    def async_request(self, request_id: str) -> dict | None:
        return self._one("SELECT * FROM async_requests WHERE id = ?", request_id)

    def claim_async(self, limit: int) -> list[dict]:
        """Up to `limit` queued requests, oldest first, now marked running."""
        with self._write() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM async_requests WHERE status = 'queued' "
                                                "ORDER BY rowid LIMIT ?", (limit,))]
            db.executemany("UPDATE async_requests SET status = 'running', started_at = ? WHERE id = ?",
                           [(int(time.time()), r["id"]) for r in rows])
        return rows

    def finish_async(self, request_id: str, status_code: int, response: dict) -> bool:
        """Stores the answer of a running request: completed on 200, failed otherwise."""
        with self._write() as db:
            return bool(db.execute(
                "UPDATE async_requests SET status = ?, status_code = ?, response = ?, completed_at = ? "
                "WHERE id = ? AND status = 'running'",
                ("completed" if status_code == 200 else "failed", status_code, json.dumps(response),
                 int(time.time()), request_id)).rowcount)

    def requeue_async(self) -> int:
        """At startup: requests that were running when the last process died run again."""
        with self._write() as db:
            return db.execute("UPDATE async_requests SET status = 'queued' WHERE status = 'running'").rowcount


def _fsync(path: Path) -> None:
    """Flushes a file's bytes, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
