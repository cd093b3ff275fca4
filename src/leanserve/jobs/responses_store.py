"""Stored Responses API objects (`store: true`), in `responses.sqlite3` of the data directory.

A row holds the response as it was returned and the input items it was generated from:
the items of its `previous_response_id` chain first, then its own. So each row is a whole
conversation on its own, a follow-up needs one read, and deleting a response in the middle
of a chain leaves the later ones intact. The data directory's lock (held by `JobStore`)
already keeps a second server away from this file.

`response_items` maps an item's id to the responses whose conversation holds it (as input
or output), for `item_reference` input items: any of them gives the item.

A background response is stored at once, in progress, and again when it ends; one still in
progress when the store opens was cut off by the last process's end, and is failed then.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, body TEXT NOT NULL,
    input_items TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS response_items (
    item_id TEXT NOT NULL, response_id TEXT NOT NULL, PRIMARY KEY (item_id, response_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS response_items_response ON response_items (response_id);
"""


class ResponseStore:
    """Thread-safe: one connection behind a lock. Callers on an event loop use `asyncio.to_thread`."""

    def __init__(self, path: str | Path):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a response id a client was given survives a power cut
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._fail_interrupted()

    def _fail_interrupted(self) -> None:
        rows = self._db.execute("SELECT id, body FROM responses WHERE status IN ('queued', 'in_progress')").fetchall()
        for response_id, body in rows:
            error = {"code": "server_error", "message": "The server stopped before this response was finished"}
            body = dict(json.loads(body), status="failed", error=error)
            self._db.execute("UPDATE responses SET status = 'failed', body = ? WHERE id = ?",
                             (json.dumps(body), response_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, response: dict, input_items: list[dict]) -> None:
        ids = [(item["id"], response["id"]) for item in input_items + response["output"] if item.get("id")]
        with self._lock, self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (response["id"], int(time.time()), response["status"], json.dumps(response),
                              json.dumps(input_items)))
            self._db.executemany("INSERT OR IGNORE INTO response_items VALUES (?, ?)", ids)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        """(response, input items) or None."""
        with self._lock:
            row = self._db.execute("SELECT body, input_items FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def item(self, item_id: str) -> dict | None:
        """A stored item by its id (from any response that holds it), or None."""
        with self._lock:
            row = self._db.execute("SELECT r.body, r.input_items FROM response_items i JOIN responses r "
                                   "ON r.id = i.response_id WHERE i.item_id = ? LIMIT 1", (item_id,)).fetchone()
        if row is None:
            return None
        return next(i for i in json.loads(row[1]) + json.loads(row[0])["output"] if i.get("id") == item_id)

    def delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM response_items WHERE response_id = ?", (response_id,))
            return bool(self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount)
