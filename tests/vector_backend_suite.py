"""The behaviour every VectorBackend (rag/backend.py) must have, as pytest tests any backend
reuses. A test module imports them and provides one fixture, `backend_spec`: where a fresh,
empty backend lives, as ("package.module:Class", kwargs) with JSON-serialisable kwargs
that include "dim" (a subprocess opens the same spec to be killed mid-write):

    from vector_backend_suite import *  # noqa: F401,F403  (the tests and their fixtures)

    @pytest.fixture
    def backend_spec(tmp_path):
        return "leanserve.rag.store:SQLiteBackend", {"path": str(tmp_path / "v.sqlite3"), "dim": 32}
"""
from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from leanserve.errors import InvalidRequest
from leanserve.rag import filters as attribute_filters
from leanserve.rag.backend import UNSET, Chunk
from leanserve.rag.chunking import validate_chunking

AUTO = validate_chunking(None)


def open_backend(spec):
    target, kwargs = spec
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


@pytest.fixture
def backend(backend_spec):
    b = open_backend(backend_spec)
    yield b
    b.close()


def unit(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(v: np.ndarray, rng, noise: float = 0.05) -> np.ndarray:
    x = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    return (x / np.linalg.norm(x)).astype(np.float32)


def attach(backend, store_id, file_id, vectors, texts=None, attributes=None, filename=None) -> list[Chunk]:
    """Attaches and completes a file whose chunks have these vectors."""
    assert backend.add_file(store_id, file_id, filename or f"{file_id}.txt", attributes, AUTO) is not None
    texts = texts or [f"{file_id} chunk {i}" for i in range(len(vectors))]
    chunks = [Chunk(t, v, len(t.split())) for t, v in zip(texts, vectors)]
    assert backend.complete_file(store_id, file_id, chunks)
    return chunks


# -- stores -------------------------------------------------------------------------------------


def test_store_crud(backend):
    s = backend.create_store("docs", {"team": "a"}, {"anchor": "last_active_at", "days": 3})
    assert s["id"].startswith("vs_") and s["object"] == "vector_store" and s["status"] == "completed"
    assert s["expires_at"] == s["last_active_at"] + 3 * 86400 and s["usage_bytes"] == 0
    assert s["file_counts"] == {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0, "total": 0}
    assert backend.get_store(s["id"]) == s
    u = backend.update_store(s["id"], name="renamed")
    assert (u["name"], u["metadata"], u["expires_after"]) == ("renamed", {"team": "a"}, s["expires_after"])
    u = backend.update_store(s["id"], metadata={"team": "b"}, expires_after=None)
    assert (u["name"], u["metadata"], u["expires_after"], u["expires_at"]) == ("renamed", {"team": "b"}, None, None)
    assert backend.update_store(s["id"], name=UNSET)["name"] == "renamed"
    plain = backend.create_store(None, None, None)
    assert plain["name"] is None and plain["metadata"] == {} and plain["expires_at"] is None
    assert backend.delete_store(s["id"]) and not backend.delete_store(s["id"])
    assert backend.get_store(s["id"]) is None and backend.update_store(s["id"], name="x") is None
    assert backend.add_file(s["id"], "file-a", "a.txt", None, AUTO) is None


def test_touch_moves_expiry(backend):
    s = backend.create_store("t", None, {"anchor": "last_active_at", "days": 2})
    time.sleep(1.05)
    backend.touch_store(s["id"])
    t = backend.get_store(s["id"])
    assert t["last_active_at"] > s["last_active_at"] and t["expires_at"] == t["last_active_at"] + 2 * 86400


def _walk(list_fn, limit, order, **kw):
    """Every id of a listing, page by page with `after`, checking has_more on the way."""
    ids, after = [], None
    while True:
        rows, more = list_fn(limit=limit, order=order, after=after, **kw)
        ids += [r["id"] for r in rows]
        if not more:
            return ids
        assert len(rows) == limit
        after = rows[-1]["id"]


def test_store_pagination(backend):
    made = [backend.create_store(f"s{i}", None, None)["id"] for i in range(7)]
    full, more = backend.list_stores(limit=100, order="asc")
    asc = [r["id"] for r in full]
    assert sorted(asc) == sorted(made) and not more
    assert _walk(backend.list_stores, 3, "asc") == asc
    assert _walk(backend.list_stores, 2, "desc") == asc[::-1]
    rows, more = backend.list_stores(limit=2, order="asc", before=asc[4])
    assert [r["id"] for r in rows] == asc[2:4] and more
    rows, more = backend.list_stores(limit=5, order="asc", before=asc[2])
    assert [r["id"] for r in rows] == asc[:2] and not more
    rows, _ = backend.list_stores(limit=10, order="desc", after=asc[3], before=asc[0])
    assert [r["id"] for r in rows] == [asc[2], asc[1]]
    with pytest.raises(InvalidRequest):
        backend.list_stores(after="vs_nonexistent")


# -- files --------------------------------------------------------------------------------------


def test_files_counts_and_usage(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    rng = np.random.default_rng(1)
    s = backend.create_store("f", None, None)["id"]
    row = backend.add_file(s, "file-a", "a.md", {"lang": "en"}, AUTO)
    assert row["status"] == "in_progress" and row["object"] == "vector_store.file" and row["last_error"] is None
    assert (row["vector_store_id"], row["filename"], row["attributes"]) == (s, "a.md", {"lang": "en"})
    assert row["chunking_strategy"] == AUTO and backend.get_store(s)["status"] == "in_progress"
    texts = ["alpha beta", "gamma délta"]
    attach(backend, s, "file-b", unit(rng, 2, dim), texts)
    backend.fail_file(s, "file-a", "unsupported_file", "a.md: nope")
    failed = backend.get_file(s, "file-a")
    assert failed["status"] == "failed" and failed["last_error"] == {"code": "unsupported_file", "message": "a.md: nope"}
    store = backend.get_store(s)
    assert store["status"] == "completed" and store["file_counts"]["failed"] == 1
    assert store["file_counts"]["completed"] == 1 and store["file_counts"]["total"] == 2
    assert store["usage_bytes"] == backend.get_file(s, "file-b")["usage_bytes"] == sum(len(t.encode()) for t in texts)
    assert backend.file_chunks(s, "file-b") == texts
    completed, _ = backend.list_files(s, status="completed")
    assert [r["id"] for r in completed] == ["file-b"]
    assert backend.update_file_attributes(s, "file-b", {"n": 2})["attributes"] == {"n": 2}
    assert backend.update_file_attributes(s, "file-zz", {"n": 2}) is None
    # attaching again: in_progress, chunks gone until ingested again
    again = backend.add_file(s, "file-b", "b2.txt", None, AUTO)
    assert again["status"] == "in_progress" and again["usage_bytes"] == 0 and again["attributes"] == {}
    assert backend.file_chunks(s, "file-b") == [] and backend.search(s, unit(rng, 1, dim)[0], "x", 5) == []
    assert backend.delete_file(s, "file-b") and not backend.delete_file(s, "file-b")
    assert backend.get_file(s, "file-b") is None and backend.get_store(s)["file_counts"]["total"] == 1
    backend.fail_file(s, "file-b", "server_error", "gone")  # a no-op, no error


def test_file_pagination_by_status(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    s = backend.create_store("p", None, None)["id"]
    for i in range(5):
        backend.add_file(s, f"file-{i}", f"{i}.txt", None, AUTO)
    asc = [r["id"] for r in backend.list_files(s, limit=100, order="asc")[0]]
    assert sorted(asc) == [f"file-{i}" for i in range(5)]
    assert _walk(lambda **kw: backend.list_files(s, **kw), 2, "desc") == asc[::-1]
    rows, more = backend.list_files(s, limit=2, order="asc", status="in_progress")
    assert [r["id"] for r in rows] == asc[:2] and more
    backend.complete_file(s, asc[2], [Chunk("x", np.eye(dim, dtype=np.float32)[0], 1)])
    rows, more = backend.list_files(s, limit=2, order="asc", status="in_progress", after=asc[2])
    assert [r["id"] for r in rows] == asc[3:] and not more  # a cursor whose file changed status still works


def test_complete_refused_after_delete_or_cancel(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    chunk = [Chunk("text", np.eye(dim, dtype=np.float32)[0], 1)]
    s = backend.create_store("d", None, None)["id"]
    backend.add_file(s, "file-a", "a.txt", None, AUTO)
    assert backend.delete_file(s, "file-a") and not backend.complete_file(s, "file-a", chunk)
    backend.add_file(s, "file-b", "b.txt", None, AUTO)
    assert backend.complete_file(s, "file-b", chunk) and not backend.complete_file(s, "file-b", chunk)
    assert backend.file_chunks(s, "file-b") == ["text"]
    backend.add_file(s, "file-c", "c.txt", None, AUTO)
    assert backend.delete_store(s)  # deleting the store mid-ingestion: the worker's write is refused
    assert not backend.complete_file(s, "file-c", chunk) and backend.get_file(s, "file-c") is None
    assert backend.search(s, chunk[0].vector, "text", 5) == []


def test_batches_and_cancel(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    chunk = [Chunk("text", np.eye(dim, dtype=np.float32)[0], 1)]
    s = backend.create_store("b", None, None)["id"]
    assert backend.create_batch("vs_unknown", [("file-x", "x.txt")], None, AUTO) is None
    b = backend.create_batch(s, [("file-1", "1.txt"), ("file-2", "2.txt"), ("file-3", "3.txt")], {"src": "b"}, AUTO)
    assert b["id"].startswith("vsfb_") and b["object"] == "vector_store.file_batch" and b["status"] == "in_progress"
    assert b["file_counts"]["in_progress"] == 3 and b["file_counts"]["total"] == 3
    assert backend.get_file(s, "file-2")["batch_id"] == b["id"]
    assert backend.get_file(s, "file-2")["attributes"] == {"src": "b"}
    assert backend.complete_file(s, "file-1", chunk)
    c = backend.cancel_batch(s, b["id"])
    assert c["status"] == "cancelled" and c["file_counts"]["cancelled"] == 2 and c["file_counts"]["completed"] == 1
    assert not backend.complete_file(s, "file-2", chunk) and backend.get_file(s, "file-2")["status"] == "cancelled"
    rows, _ = backend.list_files(s, batch_id=b["id"], status="cancelled", limit=10)
    assert sorted(r["id"] for r in rows) == ["file-2", "file-3"]
    assert backend.get_batch(s, "vsfb_unknown") is None and backend.cancel_batch(s, "vsfb_unknown") is None
    done = backend.create_batch(s, [("file-4", "4.txt")], None, AUTO)
    backend.complete_file(s, "file-4", chunk)
    assert backend.get_batch(s, done["id"])["status"] == "completed"
    bad = backend.create_batch(s, [("file-5", "5.txt"), ("file-6", "6.txt")], None, AUTO)
    backend.fail_file(s, "file-5", "invalid_file", "empty")
    assert backend.get_batch(s, bad["id"])["status"] == "in_progress"
    backend.fail_file(s, "file-6", "invalid_file", "empty")
    assert backend.get_batch(s, bad["id"])["status"] == "failed"


def test_pending_files_after_restart(backend_spec):
    dim = backend_spec[1]["dim"]
    chunk = [Chunk("text", np.eye(dim, dtype=np.float32)[0], 1)]
    b = open_backend(backend_spec)
    s = b.create_store("r", None, None)["id"]
    b.add_file(s, "file-a", "a.txt", None, AUTO)
    b.add_file(s, "file-b", "b.txt", None, AUTO)
    b.complete_file(s, "file-a", chunk)
    b.close()  # as a crash would leave it: file-b never completed
    b = open_backend(backend_spec)
    try:
        assert [(r["vector_store_id"], r["id"]) for r in b.pending_files()] == [(s, "file-b")]
        assert b.complete_file(s, "file-b", chunk * 2) and b.pending_files() == []
        assert b.file_chunks(s, "file-b") == ["text", "text"] and b.file_chunks(s, "file-a") == ["text"]
    finally:
        b.close()


# -- search -------------------------------------------------------------------------------------


def test_search_ranks_by_cosine(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    rng = np.random.default_rng(2)
    s = backend.create_store("s", None, None)["id"]
    vectors = {f"file-{i}": unit(rng, 20, dim) for i in range(5)}
    target = vectors["file-3"][7]
    vectors["file-1"][4] = near(target, rng, 0.1)  # a near duplicate in another file
    for f, v in vectors.items():
        attach(backend, s, f, v)
    other = backend.create_store("other", None, None)["id"]
    attach(backend, other, "file-9", np.stack([target]))  # an exact match in another store is not found
    q = near(target, rng, 0.02)
    hits = backend.search(s, q, "anything", 10, score_threshold=-1.0)
    assert len(hits) == 10 and (hits[0].file_id, hits[0].chunk_index) == ("file-3", 7)
    assert (hits[1].file_id, hits[1].chunk_index) == ("file-1", 4)
    everything = [(f, i, float(m[i] @ q)) for f, m in vectors.items() for i in range(len(m))]
    expect = sorted(everything, key=lambda e: -e[2])[:10]
    assert [(h.file_id, h.chunk_index) for h in hits] == [(f, i) for f, i, _ in expect]
    assert np.allclose([h.score for h in hits], [e[2] for e in expect], atol=1e-5)
    assert hits[0].text == "file-3 chunk 7" and hits[0].filename == "file-3.txt"
    assert len(backend.search(s, q, "anything", 3)) == 3
    assert backend.search("vs_unknown", q, "anything", 3) == []


def test_score_threshold(backend, backend_spec):
    """Scores are cosines and the threshold applies as given: the default 0.0 drops negative ones."""
    dim = backend_spec[1]["dim"]
    rng = np.random.default_rng(3)
    s = backend.create_store("t", None, None)["id"]
    base = unit(rng, 1, dim)[0]
    attach(backend, s, "file-a", np.stack([near(base, rng, 0.05), near(base, rng, 0.3)] + list(unit(rng, 10, dim))))
    hits = backend.search(s, base, "", 20, score_threshold=0.8)
    assert 1 <= len(hits) <= 2 and all(h.score >= 0.8 for h in hits) and hits[0].chunk_index == 0
    assert backend.search(s, base, "", 20, score_threshold=0.9999) == []
    assert all(h.score >= 0 for h in backend.search(s, base, "", 20))
    assert len(backend.search(s, base, "", 20, score_threshold=-1.0)) == 12


FILES_ATTRS = {
    "file-a": {"lang": "en", "year": 2021, "draft": False},
    "file-b": {"lang": "fr", "year": 2023, "draft": True},
    "file-c": {"lang": "en", "year": 2024},
    "file-d": {"year": "2022"},  # a string, not a number: ordering comparisons with numbers skip it
}
FILTERS = [
    {"type": "eq", "key": "lang", "value": "en"},
    {"type": "ne", "key": "lang", "value": "en"},
    {"type": "gt", "key": "year", "value": 2021},
    {"type": "gte", "key": "year", "value": 2021},
    {"type": "lt", "key": "year", "value": 2024},
    {"type": "lte", "key": "year", "value": 2023},
    {"type": "in", "key": "lang", "value": ["fr", "de"]},
    {"type": "nin", "key": "lang", "value": ["fr", "de"]},
    {"type": "eq", "key": "draft", "value": False},
    {"type": "and", "filters": [{"type": "eq", "key": "lang", "value": "en"},
                                {"type": "gte", "key": "year", "value": 2022}]},
    {"type": "or", "filters": [{"type": "eq", "key": "draft", "value": True},
                               {"type": "and", "filters": [{"type": "lt", "key": "year", "value": 2022},
                                                           {"type": "eq", "key": "lang", "value": "en"}]}]},
]
EXPECTED = [{"file-a", "file-c"}, {"file-b", "file-d"}, {"file-b", "file-c"}, {"file-a", "file-b", "file-c"},
            {"file-a", "file-b"}, {"file-a", "file-b"}, {"file-b"}, {"file-a", "file-c", "file-d"}, {"file-a"},
            {"file-c"}, {"file-a", "file-b"}]


@pytest.mark.parametrize("case", range(len(FILTERS)))
def test_search_filters(backend, backend_spec, case):
    dim = backend_spec[1]["dim"]
    rng = np.random.default_rng(4)
    s = backend.create_store("f", None, None)["id"]
    for f, attrs in FILES_ATTRS.items():
        attach(backend, s, f, unit(rng, 6, dim), attributes=attrs)
    f = FILTERS[case]
    attribute_filters.validate(f)
    assert {n for n, a in FILES_ATTRS.items() if attribute_filters.matches(f, a)} == EXPECTED[case]
    hits = backend.search(s, unit(rng, 1, dim)[0], "chunk", 50, filters=f, score_threshold=-1.0)
    assert {h.file_id for h in hits} == EXPECTED[case] and len(hits) == 6 * len(EXPECTED[case])
    assert all(h.attributes == FILES_ATTRS[h.file_id] for h in hits)
    hybrid = backend.search(s, unit(rng, 1, dim)[0], "chunk", 50, filters=f, hybrid=(1.0, 1.0))
    assert hybrid and all(h.score > 0 for h in hybrid)
    assert {h.file_id for h in hybrid} == EXPECTED[case]


def test_filters_follow_attribute_updates(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    rng = np.random.default_rng(5)
    s = backend.create_store("u", None, None)["id"]
    attach(backend, s, "file-a", unit(rng, 3, dim), attributes={"tier": "gold"})
    gold = {"type": "eq", "key": "tier", "value": "gold"}
    assert len(backend.search(s, unit(rng, 1, dim)[0], "", 10, filters=gold, score_threshold=-1.0)) == 3
    backend.update_file_attributes(s, "file-a", {"tier": "silver"})
    assert backend.search(s, unit(rng, 1, dim)[0], "", 10, filters=gold) == []


def test_hybrid_text_weight_lifts_keyword_chunk(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    rng = np.random.default_rng(6)
    s = backend.create_store("h", None, None)["id"]
    q = unit(rng, 1, dim)[0]
    vectors = np.stack([near(q, rng, 0.3 + 0.05 * i) for i in range(20)] + [-q])  # the keyword chunk is far
    texts = [f"ordinary passage number {i} about cooking" for i in range(20)] + ["the flux capacitor part XJ-9000"]
    attach(backend, s, "file-a", vectors, texts)
    keyword = ("file-a", 20)

    def rank(hybrid):
        found = [(h.file_id, h.chunk_index) for h in backend.search(s, q, "where is the XJ-9000 capacitor", 10,
                                                                    hybrid=hybrid)]
        return found.index(keyword) if keyword in found else None

    assert rank(None) is None and rank((1.0, 0.0)) is None
    assert rank((1.0, 1.0)) is not None and rank((0.2, 1.0)) == 0
    fused = backend.search(s, q, "XJ-9000 capacitor", 10, hybrid=(0.2, 1.0))
    assert all(0 <= h.score <= 1 for h in fused) and fused == sorted(fused, key=lambda h: -h.score)


def test_concurrent_readers_and_writer(backend, backend_spec):
    dim = backend_spec[1]["dim"]
    rng = np.random.default_rng(7)
    s = backend.create_store("c", None, None)["id"]
    attach(backend, s, "file-0", unit(rng, 10, dim))
    errors, done = [], threading.Event()

    def read():
        try:
            while not done.is_set():
                hits = backend.search(s, unit(np.random.default_rng(), 1, dim)[0], "chunk", 5, score_threshold=-1.0)
                assert len(hits) == 5
                backend.list_files(s, limit=100)
        except Exception as e:  # surfaced below
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(1, 15):
        attach(backend, s, f"file-{i}", unit(rng, 10, dim))
    done.set()
    for t in readers:
        t.join()
    assert not errors and backend.get_store(s)["file_counts"]["completed"] == 15
    assert len(backend.search(s, unit(rng, 1, dim)[0], "", 200, score_threshold=-1.0)) == 150


# -- crash safety: kill -9 of a real process mid-ingestion --------------------------------------

CHUNKS_PER_FILE = 200
WRITER = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from vector_backend_suite import AUTO, open_backend
from leanserve.rag.backend import Chunk
spec = json.loads(sys.argv[1])
b = open_backend(spec)
dim, store = spec[1]["dim"], sys.argv[2]
rng = np.random.default_rng(0)
b.add_file(store, "file-never", "never.txt", None, AUTO)  # in_progress whenever the kill lands
i = 0
while True:
    b.add_file(store, f"file-{{i}}", f"{{i}}.txt", {{"n": i}}, AUTO)
    print("attached", i, flush=True)
    v = rng.standard_normal((%d, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert b.complete_file(store, f"file-{{i}}", [Chunk(f"file {{i}} chunk {{j}} " * 20, v[j], 80) for j in range(len(v))])
    print("completed", i, flush=True)
    i += 1
""" % CHUNKS_PER_FILE


def test_kill9_mid_ingestion_loses_nothing_completed(backend_spec):
    import os

    b = open_backend(backend_spec)
    store = b.create_store("crash", None, None)["id"]
    b.close()
    code = WRITER.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(list(backend_spec)), store],
                            stdout=subprocess.PIPE, text=True)
    completed, attached = set(), set()
    try:
        for line in proc.stdout:
            what, n = line.split()
            (completed if what == "completed" else attached).add(f"file-{n}")
            if len(completed) >= 4 and what == "attached":
                time.sleep(0.01 * len(completed))  # somewhere inside the next file's transaction
                break
        else:
            pytest.fail(f"the writer exited with {proc.wait()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    b = open_backend(backend_spec)
    try:
        rows = {r["id"]: r for r in b.list_files(store, limit=100)[0]}
        assert completed <= set(rows) and all(rows[f]["status"] == "completed" for f in completed)
        for f, row in rows.items():
            texts = b.file_chunks(store, f)
            assert len(texts) == (CHUNKS_PER_FILE if row["status"] == "completed" else 0), (f, row["status"])
        pending = [r["id"] for r in b.pending_files()]
        assert "file-never" in pending and all(rows[f]["status"] == "in_progress" for f in pending)
        assert set(pending) | {f for f, r in rows.items() if r["status"] == "completed"} == set(rows)
        dim = backend_spec[1]["dim"]
        for f in pending:  # ingested again after the restart: all its chunks, once
            chunks = [Chunk(f"again {j}", np.eye(dim, dtype=np.float32)[j % dim], 2) for j in range(CHUNKS_PER_FILE)]
            assert b.complete_file(store, f, chunks)
            assert len(b.file_chunks(store, f)) == CHUNKS_PER_FILE
        assert b.pending_files() == []
        total = b.get_store(store)["file_counts"]
        assert total["completed"] == total["total"] == len(rows)
        q = np.eye(dim, dtype=np.float32)[0]
        assert len(b.search(store, q, "chunk", 50, score_threshold=-1.0)) == 50
    finally:
        b.close()
