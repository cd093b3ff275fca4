"""The Postgres + pgvector vector-store backend against a real Postgres started here (pgserver
bundles PostgreSQL 16 with pgvector 0.6): the backend-agnostic behaviour every VectorBackend
owes (stores, files, batches, pagination, counts, search, filters, hybrid, durability after
kill -9), then what is particular to pgvector (a filtered HNSW query still returns k rows,
the vector width is checked on reopen).

The behaviour tests take a `backend` fixture and use nothing but the interface, so they hold
for any backend. Each test gets a fresh schema: `pending_files` spans all stores.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from leanserve.rag.backend import UNSET, Chunk
from leanserve.rag.pgvector import PostgresBackend

DIM = 8
AUTO = {"type": "auto"}


@pytest.fixture(scope="module")
def pg_server():
    """Not under pytest's tmp_path: its root is mode 0700 (pytest resets it), and as root
    pgserver runs Postgres as the user `pgserver`, who must reach the data directory."""
    import pgserver

    pgdata = tempfile.mkdtemp(prefix="leanserve-pg-")
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as e:  # noqa: a machine where the bundled Postgres cannot run at all
        shutil.rmtree(pgdata, ignore_errors=True)
        pytest.skip(f"pgserver could not start Postgres on this machine: {e!r}")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    yield server
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)


_schemas = itertools.count()


@pytest.fixture
def pg_url(pg_server):
    """A connection string whose tables land in a new empty schema (cheaper than a database)."""
    name = f"test_{next(_schemas)}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return make_conninfo(pg_server.get_uri(), options=f"-c search_path={name},public")


@pytest.fixture
def backend(pg_url):
    # The HNSW index from the first chunk on, every search through it first: the harder path.
    b = PostgresBackend(pg_url, DIM, exact_below=0, index_above=0)
    yield b
    b.close()


def unit(*xs) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


def random_unit(rng, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def chunk(text: str, vector) -> Chunk:
    return Chunk(text, np.asarray(vector, np.float32), len(text.split()))


def completed_file(backend, store_id, file_id, chunks, attributes=None, filename=None):
    backend.add_file(store_id, file_id, filename or f"{file_id}.txt", attributes, AUTO)
    assert backend.complete_file(store_id, file_id, chunks)


# -- stores ------------------------------------------------------------------------------------

def test_store_crud(backend):
    s = backend.create_store("docs", {"team": "a"}, {"anchor": "last_active_at", "days": 2})
    assert s["id"].startswith("vs_") and s["object"] == "vector_store"
    assert s["name"] == "docs" and s["metadata"] == {"team": "a"} and s["status"] == "completed"
    assert s["expires_at"] == s["last_active_at"] + 2 * 86400
    assert s["usage_bytes"] == 0 and s["file_counts"] == dict(in_progress=0, completed=0, failed=0,
                                                              cancelled=0, total=0)
    assert backend.get_store(s["id"]) == s
    u = backend.update_store(s["id"], name="renamed")
    assert u["name"] == "renamed" and u["metadata"] == {"team": "a"} and u["expires_after"]
    u = backend.update_store(s["id"], metadata={"team": "b"}, expires_after=None)
    assert u["name"] == "renamed" and u["metadata"] == {"team": "b"}
    assert u["expires_after"] is None and u["expires_at"] is None
    assert backend.update_store(s["id"], name=UNSET) == u
    assert backend.update_store("vs_nope", name="x") is None
    backend.touch_store(s["id"])
    assert backend.get_store(s["id"])["last_active_at"] >= s["last_active_at"]
    plain = backend.create_store(None, None, None)
    assert plain["name"] is None and plain["metadata"] == {} and plain["expires_after"] is None
    assert backend.delete_store(s["id"]) and not backend.delete_store(s["id"])
    assert backend.get_store(s["id"]) is None and backend.get_store("vs_nope") is None


def test_expired_store(backend):
    s = backend.create_store("old", None, {"anchor": "last_active_at", "days": 0})
    assert backend.get_store(s["id"])["status"] == "expired"


def test_store_pagination(backend):
    ids = [backend.create_store(f"s{i}", None, None)["id"] for i in range(5)]
    rows, more = backend.list_stores(limit=100, order="asc")
    assert [r["id"] for r in rows] == ids and not more  # creation order, even within a second
    rows, more = backend.list_stores(limit=2)
    assert [r["id"] for r in rows] == ids[::-1][:2] and more
    rows, more = backend.list_stores(limit=2, after=rows[-1]["id"])
    assert [r["id"] for r in rows] == ids[::-1][2:4] and more
    rows, more = backend.list_stores(limit=2, after=rows[-1]["id"])
    assert [r["id"] for r in rows] == [ids[0]] and not more
    rows, more = backend.list_stores(limit=2, order="asc", after=ids[1])
    assert [r["id"] for r in rows] == ids[2:4] and more
    # before: the page just before the cursor, in the asked order
    rows, more = backend.list_stores(limit=2, order="asc", before=ids[3])
    assert [r["id"] for r in rows] == ids[1:3] and more
    rows, more = backend.list_stores(limit=2, order="desc", before=ids[1])
    assert [r["id"] for r in rows] == [ids[3], ids[2]] and more
    rows, more = backend.list_stores(limit=10, order="asc", after=ids[0], before=ids[3])
    assert [r["id"] for r in rows] == ids[1:3] and not more


# -- files -------------------------------------------------------------------------------------

def test_file_lifecycle_and_counts(backend):
    s = backend.create_store("f", None, None)["id"]
    assert backend.add_file("vs_nope", "file-x", "x.txt", None, AUTO) is None
    f = backend.add_file(s, "file-a", "a.txt", {"lang": "en"}, AUTO)
    assert f["id"] == "file-a" and f["object"] == "vector_store.file" and f["vector_store_id"] == s
    assert f["status"] == "in_progress" and f["last_error"] is None and f["usage_bytes"] == 0
    assert f["attributes"] == {"lang": "en"} and f["chunking_strategy"] == AUTO
    assert f["filename"] == "a.txt" and f["batch_id"] is None
    assert backend.get_file(s, "file-a") == f and backend.get_file(s, "file-zz") is None
    assert backend.get_store(s)["status"] == "in_progress"
    texts = ["première partie", "second part"]
    assert backend.complete_file(s, "file-a", [chunk(t, unit(1, i)) for i, t in enumerate(texts)])
    f = backend.get_file(s, "file-a")
    assert f["status"] == "completed" and f["usage_bytes"] == sum(len(t.encode()) for t in texts)
    assert backend.file_chunks(s, "file-a") == texts
    assert not backend.complete_file(s, "file-a", [chunk("again", unit(1))])  # not in_progress
    backend.add_file(s, "file-b", "b.txt", None, AUTO)
    backend.fail_file(s, "file-b", "unsupported_file", "no text in it")
    b = backend.get_file(s, "file-b")
    assert b["status"] == "failed" and b["last_error"] == {"code": "unsupported_file",
                                                           "message": "no text in it"}
    backend.fail_file(s, "file-gone", "server_error", "x")  # no-op
    store = backend.get_store(s)
    assert store["status"] == "completed" and store["usage_bytes"] == f["usage_bytes"]
    assert store["file_counts"] == dict(in_progress=0, completed=1, failed=1, cancelled=0, total=2)
    assert backend.update_file_attributes(s, "file-a", {"lang": "fr"})["attributes"] == {"lang": "fr"}
    assert backend.search(s, unit(1), "", 5)[0].attributes == {"lang": "fr"}  # chunks follow
    assert backend.update_file_attributes(s, "file-zz", {}) is None
    assert backend.delete_file(s, "file-a") and not backend.delete_file(s, "file-a")
    assert backend.file_chunks(s, "file-a") == [] and backend.search(s, unit(1), "", 5) == []
    assert backend.get_store(s)["usage_bytes"] == 0


def test_reattach_resets_the_file(backend):
    s = backend.create_store("r", None, None)["id"]
    completed_file(backend, s, "file-a", [chunk("old text", unit(1))])
    f = backend.add_file(s, "file-a", "a2.txt", {"v": 2}, AUTO)
    assert f["status"] == "in_progress" and f["filename"] == "a2.txt" and f["usage_bytes"] == 0
    assert backend.search(s, unit(1), "", 5) == []  # not searchable until completed again
    assert backend.complete_file(s, "file-a", [chunk("new text", unit(1))])
    assert backend.file_chunks(s, "file-a") == ["new text"]
    assert [h.text for h in backend.search(s, unit(1), "", 5)] == ["new text"]


def test_file_listing(backend):
    s = backend.create_store("l", None, None)["id"]
    other = backend.create_store("other", None, None)["id"]
    backend.add_file(other, "file-0", "0.txt", None, AUTO)
    ids = [f"file-{i}" for i in range(1, 6)]
    for i in ids:
        backend.add_file(s, i, f"{i}.txt", None, AUTO)
    backend.complete_file(s, "file-2", [])
    backend.complete_file(s, "file-4", [])
    rows, more = backend.list_files(s, limit=100)
    assert [r["id"] for r in rows] == ids[::-1] and not more
    rows, more = backend.list_files(s, limit=2, order="asc", after="file-1")
    assert [r["id"] for r in rows] == ["file-2", "file-3"] and more
    rows, more = backend.list_files(s, limit=2, order="asc", before="file-5")
    assert [r["id"] for r in rows] == ["file-3", "file-4"] and more
    rows, _ = backend.list_files(s, status="completed", order="asc")
    assert [r["id"] for r in rows] == ["file-2", "file-4"]
    rows, more = backend.list_files(s, status="in_progress", limit=1, after="file-5")
    assert [r["id"] for r in rows] == ["file-3"] and more
    assert backend.list_files("vs_nope") == ([], False)


def test_pending_files_oldest_first_across_stores(backend):
    a = backend.create_store("a", None, None)["id"]
    b = backend.create_store("b", None, None)["id"]
    backend.add_file(a, "file-1", "1", None, AUTO)
    backend.add_file(b, "file-2", "2", None, AUTO)
    backend.add_file(a, "file-3", "3", None, AUTO)
    backend.complete_file(a, "file-3", [])
    backend.add_file(b, "file-4", "4", None, AUTO)
    assert [(r["vector_store_id"], r["id"]) for r in backend.pending_files()] == [
        (a, "file-1"), (b, "file-2"), (b, "file-4")]


def test_delete_mid_ingestion(backend):
    s = backend.create_store("d", None, None)["id"]
    backend.add_file(s, "file-a", "a", None, AUTO)
    backend.add_file(s, "file-b", "b", None, AUTO)
    assert backend.delete_file(s, "file-a")
    assert not backend.complete_file(s, "file-a", [chunk("x", unit(1))])
    assert backend.get_file(s, "file-a") is None
    assert backend.delete_store(s)
    assert not backend.complete_file(s, "file-b", [chunk("x", unit(1))])
    assert backend.pending_files() == [] and backend.file_chunks(s, "file-b") == []


def test_delete_store_while_complete_file_runs(backend):
    """Threads race a big complete_file against delete_store: whichever commits first wins,
    and nothing of the store is left either way."""
    s = backend.create_store("race", None, None)["id"]
    backend.add_file(s, "file-a", "a", None, AUTO)
    vectors = random_unit(np.random.default_rng(0), 500)
    result = {}
    writer = threading.Thread(target=lambda: result.update(
        done=backend.complete_file(s, "file-a", [chunk(f"t{i}", v) for i, v in enumerate(vectors)])))
    writer.start()
    assert backend.delete_store(s)
    writer.join()
    assert result["done"] in (True, False)
    assert backend.get_store(s) is None and backend.file_chunks(s, "file-a") == []
    assert backend.search(s, vectors[0], "", 5) == []


# -- batches -----------------------------------------------------------------------------------

def test_batches_and_cancel(backend):
    s = backend.create_store("b", None, None)["id"]
    assert backend.create_batch("vs_nope", [("file-1", "1")], None, AUTO) is None
    batch = backend.create_batch(s, [("file-1", "1.txt"), ("file-2", "2.txt"), ("file-3", "3.txt")],
                                 {"src": "batch"}, {"type": "static"})
    assert batch["id"].startswith("vsfb_") and batch["object"] == "vector_store.file_batch"
    assert batch["vector_store_id"] == s and batch["status"] == "in_progress"
    assert batch["file_counts"] == dict(in_progress=3, completed=0, failed=0, cancelled=0, total=3)
    f = backend.get_file(s, "file-1")
    assert f["batch_id"] == batch["id"] and f["attributes"] == {"src": "batch"}
    assert f["chunking_strategy"] == {"type": "static"}
    backend.add_file(s, "file-9", "9.txt", None, AUTO)  # not in the batch
    rows, _ = backend.list_files(s, batch_id=batch["id"], order="asc")
    assert [r["id"] for r in rows] == ["file-1", "file-2", "file-3"]
    assert backend.complete_file(s, "file-1", [chunk("one", unit(1))])
    backend.fail_file(s, "file-2", "invalid_file", "bad")
    got = backend.get_batch(s, batch["id"])
    assert got["status"] == "in_progress" and got["file_counts"]["completed"] == 1
    cancelled = backend.cancel_batch(s, batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["file_counts"] == dict(in_progress=0, completed=1, failed=1, cancelled=1, total=3)
    assert not backend.complete_file(s, "file-3", [chunk("three", unit(1))])
    assert backend.get_file(s, "file-3")["status"] == "cancelled"
    assert backend.get_file(s, "file-9")["status"] == "in_progress"
    assert backend.get_batch(s, "vsfb_nope") is None and backend.cancel_batch(s, "vsfb_nope") is None
    assert backend.get_batch("vs_nope", batch["id"]) is None


def test_batch_completed_and_failed(backend):
    s = backend.create_store("b", None, None)["id"]
    ok = backend.create_batch(s, [("file-1", "1"), ("file-2", "2")], None, AUTO)["id"]
    backend.complete_file(s, "file-1", [])
    backend.fail_file(s, "file-2", "invalid_file", "bad")
    assert backend.get_batch(s, ok)["status"] == "completed"
    bad = backend.create_batch(s, [("file-3", "3"), ("file-4", "4")], None, AUTO)["id"]
    backend.fail_file(s, "file-3", "invalid_file", "bad")
    backend.fail_file(s, "file-4", "unsupported_file", "bad")
    assert backend.get_batch(s, bad)["status"] == "failed"


# -- search ------------------------------------------------------------------------------------

def test_search_ranking_and_scores(backend):
    s = backend.create_store("s", None, None)["id"]
    other = backend.create_store("other", None, None)["id"]
    vectors = {f"c{i}": unit(1, 0.3 * i, 0.1) for i in range(6)}  # c0 nearest e0, then c1, ...
    completed_file(backend, s, "file-a", [chunk(t, v) for t, v in list(vectors.items())[:3]])
    completed_file(backend, s, "file-b", [chunk(t, v) for t, v in list(vectors.items())[3:]],
                   filename="b.md", attributes={"k": 1})
    completed_file(backend, other, "file-o", [chunk("elsewhere", unit(1))])
    backend.add_file(s, "file-p", "p", None, AUTO)  # in progress: not searchable
    query = unit(1)
    hits = backend.search(s, query, "", 4)
    assert [h.text for h in hits] == ["c0", "c1", "c2", "c3"]
    for h in hits:
        assert h.score == pytest.approx(float(vectors[h.text] @ query), abs=1e-5)
    assert (hits[3].file_id, hits[3].filename, hits[3].chunk_index, hits[3].attributes) == (
        "file-b", "b.md", 0, {"k": 1})
    assert [h.text for h in backend.search(s, unit(0, 1), "", 2)] == ["c5", "c4"]
    assert len(backend.search(s, query, "", 50)) == 6
    assert backend.search("vs_nope", query, "", 5) == []


def test_score_threshold(backend):
    s = backend.create_store("t", None, None)["id"]
    completed_file(backend, s, "file-a", [chunk("same", unit(1)), chunk("near", unit(1, 1)),
                                           chunk("far", unit(0, 1))])
    scores = {h.text: h.score for h in backend.search(s, unit(1), "", 10)}
    assert scores["same"] == pytest.approx(1) and scores["near"] == pytest.approx(2 ** -0.5, abs=1e-5)
    assert [h.text for h in backend.search(s, unit(1), "", 10, score_threshold=0.5)] == ["same", "near"]
    assert [h.text for h in backend.search(s, unit(1), "", 10, score_threshold=0.99)] == ["same"]


def test_exact_and_hnsw_paths_agree(pg_url):
    rng = np.random.default_rng(1)
    vectors = random_unit(rng, 300)
    exact, hnsw = PostgresBackend(pg_url, DIM), PostgresBackend(pg_url, DIM, exact_below=0, index_above=0)
    try:
        s = exact.create_store("x", None, None)["id"]
        completed_file(exact, s, "file-a", [chunk(f"t{i}", v) for i, v in enumerate(vectors)])
        assert not exact._indexed and hnsw.build_index()
        for q in random_unit(rng, 5):
            truth = [f"t{i}" for i in np.argsort(-(vectors @ q))[:10]]
            assert [h.text for h in exact.search(s, q, "", 10)] == truth
            assert len(set(h.text for h in hnsw.search(s, q, "", 10)) & set(truth)) >= 9
    finally:
        exact.close()
        hnsw.close()


# Files with attributes chosen to tell the operators apart (types, missing keys, case).
FILTER_FILES = {
    "f1": {"year": 2020, "genre": "fiction", "draft": False, "score": 3.5},
    "f2": {"year": 2021, "genre": "science"},
    "f3": {"year": "2021", "genre": "Fiction"},
    "f4": {},
    "f5": {"year": 2023.0, "genre": "fiction", "draft": True},
}


def cmp(op, key, value):
    return {"type": op, "key": key, "value": value}


FILTER_CASES = [
    (cmp("eq", "genre", "fiction"), {"f1", "f5"}),
    (cmp("eq", "year", 2021), {"f2"}),  # not the string "2021"
    (cmp("eq", "year", "2021"), {"f3"}),
    (cmp("eq", "year", 2023), {"f5"}),  # 2023 == 2023.0
    (cmp("eq", "draft", True), {"f5"}),
    (cmp("ne", "genre", "fiction"), {"f2", "f3", "f4"}),  # a missing key is not equal
    (cmp("ne", "draft", True), {"f1", "f2", "f3", "f4"}),
    (cmp("gt", "year", 2020), {"f2", "f5"}),  # numbers only: "2021" is a string
    (cmp("gte", "year", 2020), {"f1", "f2", "f5"}),
    (cmp("lt", "year", 2021), {"f1"}),
    (cmp("lte", "year", 2021.0), {"f1", "f2"}),
    (cmp("gt", "score", 3), {"f1"}),
    (cmp("gt", "genre", "fiction"), {"f2"}),  # strings by code point: "Fiction" < "fiction"
    (cmp("lt", "genre", "fiction"), {"f3"}),
    (cmp("gte", "year", "2021"), {"f3"}),
    (cmp("in", "genre", ["fiction", "science"]), {"f1", "f2", "f5"}),
    (cmp("in", "year", [2020, "2021"]), {"f1", "f3"}),
    (cmp("nin", "genre", ["fiction", "science"]), {"f3", "f4"}),
    (cmp("nin", "year", [2021, 2023]), {"f1", "f3", "f4"}),
    ({"type": "and", "filters": [cmp("eq", "genre", "fiction"), cmp("gt", "year", 2020)]}, {"f5"}),
    ({"type": "or", "filters": [cmp("lt", "year", 2021), cmp("eq", "genre", "science")]}, {"f1", "f2"}),
    ({"type": "and", "filters": [
        {"type": "or", "filters": [cmp("eq", "genre", "fiction"), cmp("eq", "genre", "Fiction")]},
        cmp("ne", "draft", True)]}, {"f1", "f3"}),
    ({"type": "or", "filters": [cmp("eq", "nothing", 1), cmp("in", "also", [1])]}, set()),
]


@pytest.fixture
def filter_store(backend):
    s = backend.create_store("filters", None, None)["id"]
    for i, (file_id, attributes) in enumerate(FILTER_FILES.items()):
        completed_file(backend, s, file_id, [chunk(f"text of {file_id}", unit(1, i))], attributes)
    return s


@pytest.mark.parametrize("filters,expected", FILTER_CASES, ids=[str(i) for i in range(len(FILTER_CASES))])
def test_filters(backend, filter_store, filters, expected):
    hits = backend.search(filter_store, unit(1), "", 10, filters=filters)
    assert {h.file_id for h in hits} == expected


def test_filters_agree_with_rag_filters(backend, filter_store):
    """The SQL translation and rag/filters.py `matches` pass the same files for every case."""
    filters_module = pytest.importorskip("leanserve.rag.filters")
    for filters, _ in FILTER_CASES:
        filters_module.validate(filters)
        expected = {f for f, attributes in FILTER_FILES.items() if filters_module.matches(filters, attributes)}
        got = {h.file_id for h in backend.search(filter_store, unit(1), "", 10, filters=filters)}
        assert got == expected, filters


def test_hybrid_weights(backend):
    s = backend.create_store("h", None, None)["id"]
    # Vector ranking for unit(1): a, b, c. Text ranking for "zebra": c (twice), then b.
    completed_file(backend, s, "file-a", [
        chunk("a lion sleeps in the grass", unit(1, 0.1)),
        chunk("b the zebra runs past a lion", unit(1, 0.5)),
        chunk("c zebra zebra herd, zebra stripes", unit(1, 1.5)),
        chunk("d nothing to see", unit(0, 1)),
    ])
    vector_only = backend.search(s, unit(1), "zebra", 4, hybrid=(1.0, 0.0))
    assert [h.text[0] for h in vector_only] == ["a", "b", "c", "d"]
    assert [h.score for h in vector_only] == pytest.approx([1 / 61, 1 / 62, 1 / 63, 1 / 64])
    text_first = backend.search(s, unit(1), "zebra", 2, hybrid=(0.0, 1.0))
    assert [h.text[0] for h in text_first] == ["c", "b"]
    assert [h.score for h in text_first] == pytest.approx([1 / 61, 1 / 62])
    fused = backend.search(s, unit(1), "zebra", 4, hybrid=(0.8, 0.2))
    # b: 0.8/62 + 0.2/62 = .01613; c: 0.8/63 + 0.2/61 = .01598; a: 0.8/61 = .01311; d: 0.8/64
    assert [h.text[0] for h in fused] == ["b", "c", "a", "d"]  # neither ranking's order
    assert [h.score for h in fused] == pytest.approx([1 / 62, 0.8 / 63 + 0.2 / 61, 0.8 / 61, 0.8 / 64])
    only_fused = backend.search(s, unit(1), "zebra", 4, hybrid=(0.8, 0.2), score_threshold=0.014)
    assert [h.text[0] for h in only_fused] == ["b", "c"]  # the threshold applies to fused scores
    filtered = backend.search(s, unit(1), "zebra", 4, hybrid=(0.5, 0.5), filters=cmp("eq", "x", 1))
    assert filtered == []
    assert [h.text[0] for h in backend.search(s, unit(1), "the of", 2, hybrid=(0.5, 0.5))] == ["a", "b"]


# -- durability --------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from leanserve.rag.backend import Chunk
    from leanserve.rag.pgvector import PostgresBackend

    url, dim, files, per_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    backend = PostgresBackend(url, dim)
    store = backend.create_store("crash", None, None)["id"]
    for i in range(files):
        backend.add_file(store, f"file-{i}", f"{i}.txt", {"i": i}, {"type": "auto"})
    print("store", store, flush=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        vectors = rng.normal(size=(per_file, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = [Chunk(f"file {i} chunk {j} " + "words " * 40, v, 42) for j, v in enumerate(vectors)]
        print("start", i, flush=True)
        assert backend.complete_file(store, f"file-{i}", chunks)
        print("done", i, flush=True)
""")


def test_kill_9_mid_ingestion_then_reopen(pg_url):
    """A real writer process is killed while a complete_file is under way: every file it
    reported done is intact, the rest are pending with no rows, and finishing them leaves
    each file's chunks exactly once."""
    files, per_file = 6, 3000
    child = subprocess.Popen([sys.executable, "-c", CHILD, pg_url, str(DIM), str(files), str(per_file)],
                             stdout=subprocess.PIPE, text=True)
    store, done = None, set()
    for line in child.stdout:
        word, value = line.split()
        if word == "store":
            store = value
        elif word == "done":
            done.add(int(value))
        elif word == "start" and int(value) == 2:
            break  # file 2's transaction is being written now
    child.kill()
    child.wait()
    assert done == {0, 1}

    backend = PostgresBackend(pg_url, DIM)
    try:
        pending = [r["id"] for r in backend.pending_files()]
        for i in range(files):
            row, texts = backend.get_file(store, f"file-{i}"), backend.file_chunks(store, f"file-{i}")
            if i in done:
                assert row["status"] == "completed" and len(texts) == per_file
            else:  # file 2 may have committed just before the kill: all of it or none
                assert row["status"] in ("in_progress", "completed")
                assert len(texts) == (per_file if row["status"] == "completed" else 0)
            assert (row["status"] == "in_progress") == (f"file-{i}" in pending)
        assert set(pending) >= {f"file-{i}" for i in range(3, files)}
        rng = np.random.default_rng(5)
        for file_id in pending:  # what the ingestor does at start: ingest them from scratch
            chunks = [chunk(f"{file_id} again {j}", v) for j, v in enumerate(random_unit(rng, 50))]
            assert backend.complete_file(store, file_id, chunks)
        assert backend.pending_files() == []
        counts = backend.get_store(store)["file_counts"]
        assert counts["completed"] == files and counts["total"] == files
        for i in range(files):
            texts = backend.file_chunks(store, f"file-{i}")
            assert len(texts) == len(set(texts)) and len(texts) in (per_file, 50)
    finally:
        backend.close()


# -- pgvector in particular --------------------------------------------------------------------

def test_filtered_hnsw_query_still_returns_k(pg_url):
    """A rare attribute: HNSW's 40 candidates hold none of it, so pgvector 0.6 alone returns
    fewer than k rows; the backend still returns the true k nearest of the rare files."""
    rng = np.random.default_rng(2)
    backend = PostgresBackend(pg_url, DIM, exact_below=0, index_above=0)
    try:
        s = backend.create_store("big", None, None)["id"]
        common = random_unit(rng, 4000)
        completed_file(backend, s, "file-common", [chunk(f"c{i}", v) for i, v in enumerate(common)],
                       {"kind": "common"})
        rare = random_unit(rng, 30)
        completed_file(backend, s, "file-rare", [chunk(f"r{i}", v) for i, v in enumerate(rare)],
                       {"kind": "rare"})
        query = rng.normal(size=DIM).astype(np.float32)
        query /= np.linalg.norm(query)
        with psycopg.connect(pg_url) as conn:  # the candidates one HNSW scan yields, then filtered
            plain = conn.execute(
                "SELECT count(*) FROM (SELECT file_id FROM vs_chunks ORDER BY embedding <=> %s::vector "
                "LIMIT 40) t WHERE file_id = 'file-rare'", (str(query.tolist()),)).fetchone()[0]
        assert plain < 10
        hits = backend.search(s, query, "", 10, filters=cmp("eq", "kind", "rare"))
        truth = [f"r{i}" for i in np.argsort(-(rare @ query))[:10]]
        assert [h.text for h in hits] == truth
        # a small store beside a big one: its rows are a sliver of the index
        small = backend.create_store("small", None, None)["id"]
        completed_file(backend, small, "file-s", [chunk(f"s{i}", v) for i, v in enumerate(rare)])
        assert [h.text for h in backend.search(small, query, "", 10)] == [t.replace("r", "s") for t in truth]
    finally:
        backend.close()


def test_vector_width_is_checked_on_reopen(pg_url):
    PostgresBackend(pg_url, DIM).close()
    with pytest.raises(ValueError, match="8-d vectors, not 16-d"):
        PostgresBackend(pg_url, 16)


def test_concurrent_writers_and_readers(backend):
    stores = [backend.create_store(f"c{i}", None, None)["id"] for i in range(4)]
    errors = []

    def work(store_id):
        rng = np.random.default_rng(len(store_id))
        try:
            for j in range(5):
                completed_file(backend, store_id, f"file-{j}",
                               [chunk(f"{store_id} {j} {n}", v) for n, v in enumerate(random_unit(rng, 40))])
                assert len(backend.search(store_id, random_unit(rng)[0], "", 5)) == 5
        except Exception as e:  # noqa: reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for s in stores:
        assert backend.get_store(s)["file_counts"]["completed"] == 5
