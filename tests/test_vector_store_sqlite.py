"""SQLiteBackend (rag/store.py): the backend-agnostic suite (tests/vector_backend_suite.py),
then what is SQLite's own: expiry, the in-memory vectors following writes from another
connection, and the HNSW graph (recall against exact search, kept in step, rebuilt)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from vector_backend_suite import *  # noqa: F401,F403  (the shared tests and their fixtures)
from vector_backend_suite import attach, near, unit

from leanserve.rag.store import SQLiteBackend


@pytest.fixture
def backend_spec(tmp_path):
    return "leanserve.rag.store:SQLiteBackend", {"path": str(tmp_path / "vectors.sqlite3"), "dim": 32}


def test_expired_status(backend, monkeypatch):
    s = backend.create_store("e", None, {"anchor": "last_active_at", "days": 1})
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 86400 + 5)
    assert backend.get_store(s["id"])["status"] == "expired"
    backend.touch_store(s["id"])  # used again: the clock restarts
    assert backend.get_store(s["id"])["status"] == "completed"


def test_reopen_with_other_dim_refused(backend_spec):
    SQLiteBackend(**backend_spec[1]).close()
    with pytest.raises(ValueError, match="32-dimensional"):
        SQLiteBackend(backend_spec[1]["path"], 16)


def test_search_sees_writes_of_another_connection(backend_spec):
    rng = np.random.default_rng(8)
    a, b = SQLiteBackend(**backend_spec[1]), SQLiteBackend(**backend_spec[1])
    try:
        s = a.create_store("x", None, None)["id"]
        attach(a, s, "file-a", unit(rng, 5, 32))
        q = unit(rng, 1, 32)[0]
        assert len(b.search(s, q, "", 10, score_threshold=-1.0)) == 5  # b loads the store's vectors
        attach(a, s, "file-b", np.stack([q]))
        hits = b.search(s, q, "", 10, score_threshold=-1.0)  # b's copy is behind a's version: reloaded
        assert len(hits) == 6 and hits[0].file_id == "file-b"
        a.delete_file(s, "file-b")
        assert len(b.search(s, q, "", 10, score_threshold=-1.0)) == 5
    finally:
        a.close()
        b.close()


def clustered(rng, n: int, dim: int, centres: int = 40) -> np.ndarray:
    """Like real embeddings, bunched around topics (uniform random vectors are HNSW's worst case)."""
    c = unit(rng, centres, dim)
    x = c[rng.integers(0, centres, n)] + 0.12 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ann_recall_and_kept_in_step(tmp_path):
    dim, threshold = 64, 1000
    rng = np.random.default_rng(9)
    path = tmp_path / "v.sqlite3"
    b = SQLiteBackend(path, dim, ann_threshold=threshold)
    s = b.create_store("big", None, None)["id"]
    data = clustered(rng, 4000, dim)
    for i in range(20):
        attach(b, s, f"file-{i}", data[200 * i:200 * (i + 1)], attributes={"part": i})
    queries = clustered(rng, 50, dim)
    exact = [b.search(s, q, "", 10) for q in queries]  # the first search starts the graph's build
    b.vectors.settle()
    assert b.vectors._stores[s].ann is not None
    approx = [b.search(s, q, "", 10) for q in queries]
    recall = np.mean([len({(h.file_id, h.chunk_index) for h in e} & {(h.file_id, h.chunk_index) for h in a}) / 10
                      for e, a in zip(exact, approx)])
    assert recall >= 0.95
    assert all(np.allclose([h.score for h in a], sorted((float(q @ data[200 * int(h.file_id[5:]) + h.chunk_index])
                                                         for h in a), reverse=True), atol=1e-5)
               for q, a in zip(queries, approx))  # scores are exact cosines, not the graph's float16 ones
    # kept in step: a new file is found through the graph, a deleted one is not
    q = queries[0]
    attach(b, s, "file-new", np.stack([q]))
    assert b.search(s, q, "", 1)[0].file_id == "file-new"
    b.delete_file(s, "file-new")
    assert b.search(s, q, "", 1)[0].file_id != "file-new"
    # a selective filter: too few of the graph's neighbours pass, the search is exact over the passing rows
    only = {"type": "eq", "key": "part", "value": 7}
    hits = b.search(s, q, "", 10, filters=only)
    truth = sorted(range(1400, 1600), key=lambda j: -float(q @ data[j]))[:10]
    assert [h.chunk_index + 1400 for h in hits] == truth and {h.file_id for h in hits} == {"file-7"}
    # a loose filter goes through the graph and still fills k
    most = {"type": "ne", "key": "part", "value": 7}
    assert len(b.search(s, q, "", 10, filters=most)) == 10
    b.close()
    # after a restart the graph is rebuilt from the SQLite rows
    b = SQLiteBackend(path, dim, ann_threshold=threshold)
    b.search(s, q, "", 10)
    b.vectors.settle()
    again = [b.search(s, q, "", 10) for q in queries[:10]]
    assert b.vectors._stores[s].ann is not None
    assert np.mean([len({h.chunk_index for h in e} & {h.chunk_index for h in a}) >= 9
                    for e, a in zip(exact, again)]) >= 0.9
    b.close()


def test_near_duplicate_beats_exact_search_neighbours(backend):
    rng = np.random.default_rng(10)
    s = backend.create_store("n", None, None)["id"]
    base = unit(rng, 50, 32)
    attach(backend, s, "file-a", base)
    hits = backend.search(s, near(base[17], rng, 0.01), "", 1)
    assert hits[0].chunk_index == 17 and hits[0].score > 0.99
