"""PostgresBackend (rag/pgvector.py) against a real Postgres started here (pgserver bundles
PostgreSQL 16 with pgvector 0.6): the backend-agnostic suite (tests/vector_backend_suite.py),
then what is Postgres's own: the SQL filters against rag/filters.py on typed edge cases,
exact fused scores, a filtered HNSW query that pgvector alone answers short still returning
k rows, the index built past its threshold, locking against a concurrent delete, kill -9 in
the middle of a large transaction, the vector width checked on reopen.

Every test gets a fresh schema (cheaper than a database): `pending_files` spans all stores.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import threading

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from vector_backend_suite import *  # noqa: F401,F403  (the shared tests and their fixtures)
from vector_backend_suite import AUTO

from leanserve.rag import filters as attribute_filters
from leanserve.rag.backend import Chunk
from leanserve.rag.pgvector import PostgresBackend

DIM = 8


_schemas = itertools.count()


@pytest.fixture
def pg_url(pg_server):
    """A connection string whose tables land in a new empty schema (cheaper than a database)."""
    name = f"test_{next(_schemas)}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return make_conninfo(pg_server.get_uri(), options=f"-c search_path={name},public")


@pytest.fixture
def backend_spec(pg_url):
    # The HNSW index from the first chunk on, every search through it first: the harder path.
    return "leanserve.rag.pgvector:PostgresBackend", {"url": pg_url, "dim": 32, "exact_below": 0,
                                                      "index_above": 0}


@pytest.fixture
def pg(pg_url):
    """A backend of this file's own tests (8-d vectors, built by hand)."""
    b = PostgresBackend(pg_url, DIM, exact_below=0, index_above=0)
    yield b
    b.close()


def vec(*xs) -> np.ndarray:
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


# -- Postgres's own ---------------------------------------------------------------------------

def test_expired_store(pg):
    s = pg.create_store("old", None, {"anchor": "last_active_at", "days": 0})
    assert pg.get_store(s["id"])["status"] == "expired"


def test_pending_files_oldest_first_across_stores(pg):
    a = pg.create_store("a", None, None)["id"]
    b = pg.create_store("b", None, None)["id"]
    pg.add_file(a, "file-1", "1", None, AUTO)
    pg.add_file(b, "file-2", "2", None, AUTO)
    pg.add_file(a, "file-3", "3", None, AUTO)
    pg.complete_file(a, "file-3", [])
    pg.add_file(b, "file-4", "4", None, AUTO)
    assert [(r["vector_store_id"], r["id"]) for r in pg.pending_files()] == [
        (a, "file-1"), (b, "file-2"), (b, "file-4")]


def test_delete_store_while_complete_file_runs(pg):
    """Threads race a big complete_file against delete_store: whichever commits first wins,
    and nothing of the store is left either way."""
    s = pg.create_store("race", None, None)["id"]
    pg.add_file(s, "file-a", "a", None, AUTO)
    vectors = random_unit(np.random.default_rng(0), 500)
    result = {}
    writer = threading.Thread(target=lambda: result.update(
        done=pg.complete_file(s, "file-a", [chunk(f"t{i}", v) for i, v in enumerate(vectors)])))
    writer.start()
    assert pg.delete_store(s)
    writer.join()
    assert result["done"] in (True, False)
    assert pg.get_store(s) is None and pg.file_chunks(s, "file-a") == []
    assert pg.search(s, vectors[0], "", 5) == []


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


def test_sql_filters_agree_with_rag_filters(pg):
    """For typed edge cases (a string year, 2023.0, case, missing keys), the SQL translation
    passes exactly the files rag/filters.py `matches` passes."""
    s = pg.create_store("filters", None, None)["id"]
    for i, (file_id, attributes) in enumerate(FILTER_FILES.items()):
        completed_file(pg, s, file_id, [chunk(f"text of {file_id}", vec(1, i))], attributes)
    for filters, expected in FILTER_CASES:
        attribute_filters.validate(filters)
        assert {f for f, a in FILTER_FILES.items() if attribute_filters.matches(filters, a)} == expected, filters
        assert {h.file_id for h in pg.search(s, vec(1), "", 10, filters=filters)} == expected, filters




def test_hybrid_fused_scores(pg):
    s = pg.create_store("h", None, None)["id"]
    # Vector ranking for vec(1): a, b, c, d. Text ranking for "zebra": c (three times), then b.
    completed_file(pg, s, "file-a", [
        chunk("a lion sleeps in the grass", vec(1, 0.1)),
        chunk("b the zebra runs past a lion", vec(1, 0.5)),
        chunk("c zebra zebra herd, zebra stripes", vec(1, 1.5)),
        chunk("d nothing to see", vec(0, 1)),
    ])
    # rag/fusion.py: sum of weight / (60 + rank), over what first in both rankings scores
    vector_only = pg.search(s, vec(1), "zebra", 4, hybrid=(1.0, 0.0))
    assert [h.text[0] for h in vector_only] == ["a", "b", "c", "d"]
    assert [h.score for h in vector_only] == pytest.approx([61 / 61, 61 / 62, 61 / 63, 61 / 64])
    text_first = pg.search(s, vec(1), "zebra", 2, hybrid=(0.0, 1.0))
    assert [h.text[0] for h in text_first] == ["c", "b"]
    assert [h.score for h in text_first] == pytest.approx([1, 61 / 62])
    fused = pg.search(s, vec(1), "zebra", 4, hybrid=(0.8, 0.2))
    assert [h.text[0] for h in fused] == ["b", "c", "a", "d"]  # neither ranking's order
    assert [h.score for h in fused] == pytest.approx(
        [61 / 62, 61 * (0.8 / 63 + 0.2 / 61), 0.8, 0.8 * 61 / 64])
    above = pg.search(s, vec(1), "zebra", 4, hybrid=(0.8, 0.2), score_threshold=0.9)
    assert [h.text[0] for h in above] == ["b", "c"]  # the threshold applies to fused scores
    assert pg.search(s, vec(1), "zebra", 4, hybrid=(0.5, 0.5), filters=cmp("eq", "x", 1)) == []
    stopwords = pg.search(s, vec(1), "the of", 2, hybrid=(0.5, 0.5))  # no text ranking at all
    assert [h.text[0] for h in stopwords] == ["a", "b"]


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
        hits = backend.search(s, query, "", 10, filters=cmp("eq", "kind", "rare"), score_threshold=-1)
        truth = [f"r{i}" for i in np.argsort(-(rare @ query))[:10]]
        assert [h.text for h in hits] == truth
        # a small store beside a big one: its rows are a sliver of the index
        small = backend.create_store("small", None, None)["id"]
        completed_file(backend, small, "file-s", [chunk(f"s{i}", v) for i, v in enumerate(rare)])
        assert [h.text for h in backend.search(small, query, "", 10, score_threshold=-1)] == [t.replace("r", "s") for t in truth]
    finally:
        backend.close()


def test_index_is_built_past_index_above(pg_url):
    rng = np.random.default_rng(4)
    backend = PostgresBackend(pg_url, DIM, exact_below=0, index_above=50)
    try:
        s = backend.create_store("lazy", None, None)["id"]
        first, second = random_unit(rng, 40), random_unit(rng, 20)
        completed_file(backend, s, "file-1", [chunk(f"a{i}", v) for i, v in enumerate(first)])
        assert not backend._indexed
        query = random_unit(rng)[0]
        assert [h.text for h in backend.search(s, query, "", 3, score_threshold=-1)] == [
            f"a{i}" for i in np.argsort(-(first @ query))[:3]]
        completed_file(backend, s, "file-2", [chunk(f"b{i}", v) for i, v in enumerate(second)])
        assert backend._indexed
        with psycopg.connect(pg_url) as conn:  # (at 60 rows the planner would rather sort them)
            conn.execute("SET enable_seqscan = off")
            plan = conn.execute("EXPLAIN SELECT 1 FROM vs_chunks ORDER BY embedding <=> %s::vector LIMIT 5",
                                (str(query.tolist()),)).fetchall()
        assert "vs_chunks_hnsw" in str(plan)
        both = np.concatenate([first, second])
        names = [f"a{i}" for i in range(40)] + [f"b{i}" for i in range(20)]
        assert [h.text for h in backend.search(s, query, "", 3, score_threshold=-1)] == [
            names[i] for i in np.argsort(-(both @ query))[:3]]
    finally:
        backend.close()
    reopened = PostgresBackend(pg_url, DIM)
    assert reopened._indexed
    reopened.close()


def test_vector_width_is_checked_on_reopen(pg_url):
    PostgresBackend(pg_url, DIM).close()
    with pytest.raises(ValueError, match="8-d vectors, not 16-d"):
        PostgresBackend(pg_url, 16)


def test_concurrent_writers_and_readers(pg):
    stores = [pg.create_store(f"c{i}", None, None)["id"] for i in range(4)]
    errors = []

    def work(store_id):
        rng = np.random.default_rng(len(store_id))
        try:
            for j in range(5):
                completed_file(pg, store_id, f"file-{j}",
                               [chunk(f"{store_id} {j} {n}", v) for n, v in enumerate(random_unit(rng, 40))])
                assert len(pg.search(store_id, random_unit(rng)[0], "", 5, score_threshold=-1)) == 5
        except Exception as e:  # noqa: reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for s in stores:
        assert pg.get_store(s)["file_counts"]["completed"] == 5
