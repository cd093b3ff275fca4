"""Vector stores end to end (issue 29): a real server, the official `openai` client, files
uploaded through /v1/files, ingestion in the background, search over a small corpus written
here; each test runs against the embedded SQLite store and against Postgres + pgvector (a
real one, started by the `pg_server` fixture). Then kill -9 in the middle of an ingestion.

The corpus: each file answers one question asked in other words than its own, so the
right file ranking first means the embeddings (not shared words) found it.
"""
from __future__ import annotations

import io
import itertools
import json
import time

import httpx
import openai
import psycopg
import pytest
from server_fixture import ServerProcess, openai_client, small_engine

from leanserve.rag.chunking import chunk_text
from leanserve.rag.embed import EmbeddingModel

pytestmark = pytest.mark.slow

CORPUS = {
    "refunds.md": "# Returns\nAn unused item can be sent back within 30 days of purchase; the money goes back to the "
                  "original card within a week.",
    "shipping.txt": "Parcels leave our warehouse every weekday. Delivery inside the European Union takes five to seven "
                    "working days; elsewhere up to three weeks.",
    "security.html": "<html><head><title>Account</title><style>p {color: red}</style></head><body><h1>Account "
                     "security</h1><p>Reset your password from the sign-in page: we email you a link that works for "
                     "one hour.</p></body></html>",
    "pricing.json": json.dumps({"plans": [{"name": "Starter", "monthly_fee_eur": 9, "seats": 1},
                                          {"name": "Team", "monthly_fee_eur": 49, "seats": 10}]}),
    "fraud.txt": "Card payments above 5,000 euros made at night from a device we have never seen are held for a "
                 "manual review by the risk team before they go through.",
    "outage.md": "## Incident report\nOn 3 March the database cluster lost its primary node; the service was down "
                 "for 42 minutes until a replica took over.",
}
ATTRIBUTES = {"refunds.md": {"team": "support", "year": 2024}, "shipping.txt": {"team": "support", "year": 2023},
              "security.html": {"team": "security", "year": 2024}, "pricing.json": {"team": "sales", "year": 2025},
              "fraud.txt": {"team": "risk", "year": 2025}, "outage.md": {"team": "sre", "year": 2022}}
QUESTIONS = {  # paraphrases: few or no words shared with the answer
    "How long until my package arrives in Germany?": "shipping.txt",
    "Can I get reimbursed if I change my mind about an order?": "refunds.md",
    "I forgot my login credentials, what now?": "security.html",
    "Why was my large late-night transaction blocked?": "fraud.txt",
    "How much is the subscription for a group?": "pricing.json",
    "When did the site go offline and for how long?": "outage.md",
}
_databases = itertools.count()


def _pg_url(pg_server) -> str:
    """A new empty database of the shared Postgres, with the vector extension."""
    name = f"leanserve_e2e_{next(_databases)}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    with psycopg.connect(pg_server.get_uri(database=name), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return pg_server.get_uri(database=name)


@pytest.fixture(scope="module", params=["sqlite", "pgvector"])
def backend(request):
    """(server, its --vector-store args): the shared float32 server for SQLite, one more
    server on a Postgres database for pgvector."""
    if request.param == "sqlite":
        yield request.getfixturevalue("structured_server"), ()
        return
    args = ("--vector-store", _pg_url(request.getfixturevalue("pg_server")))
    server = ServerProcess(*small_engine(), *args)
    yield server, args
    server.stop()


@pytest.fixture(scope="module")
def client(backend):
    return openai_client(backend[0])


@pytest.fixture(scope="module")
def corpus(client):
    """name -> uploaded file id (purpose "assistants")."""
    return {name: client.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants").id
            for name, text in CORPUS.items()}


@pytest.fixture(scope="module")
def store(client, corpus):
    """A store with the corpus attached file by file (with attributes) and ingested."""
    vs = client.vector_stores.create(name="kb", metadata={"owner": "tests"})
    for name, file_id in corpus.items():
        row = client.vector_stores.files.create(vector_store_id=vs.id, file_id=file_id, attributes=ATTRIBUTES[name])
        assert row.status == "in_progress" and row.attributes == ATTRIBUTES[name]
    wait_files(client, vs.id)
    return vs.id


def wait_files(client, store_id: str, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = client.vector_stores.files.list(vector_store_id=store_id, limit=100).data
        if all(f.status != "in_progress" for f in files):
            return files
        time.sleep(0.2)
    raise AssertionError(f"ingestion into {store_id} did not finish in {timeout}s")


def ranked(client, store_id: str, query: str, **kw) -> list[str]:
    return [hit.filename for hit in client.vector_stores.search(vector_store_id=store_id, query=query, **kw).data]


def test_ingested_and_counted(client, store, corpus):
    files = wait_files(client, store)
    assert {f.id for f in files} == set(corpus.values()) and {f.status for f in files} == {"completed"}
    vs = client.vector_stores.retrieve(store)
    assert vs.status == "completed" and vs.file_counts.completed == len(CORPUS) and vs.file_counts.total == len(CORPUS)
    assert vs.usage_bytes > 0 and vs.name == "kb" and vs.metadata == {"owner": "tests"}
    page = client.vector_stores.files.content(vector_store_id=store, file_id=corpus["security.html"])
    text = " ".join(part.text for part in page.data)
    assert "Reset your password" in text and "<p>" not in text and "color: red" not in text  # HTML: visible text
    pricing = " ".join(p.text for p in client.vector_stores.files.content(vector_store_id=store,
                                                                          file_id=corpus["pricing.json"]).data)
    assert "Team" in pricing and "49" in pricing


@pytest.mark.parametrize("question,answer", QUESTIONS.items())
def test_paraphrased_question_ranks_its_file_first(client, store, question, answer):
    results = client.vector_stores.search(vector_store_id=store, query=question).data
    assert results[0].filename == answer, [(r.filename, r.score) for r in results]
    assert results[0].attributes == ATTRIBUTES[answer] and 0 < results[0].score <= 1
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert results[0].content[0].type == "text" and results[0].content[0].text


def test_filters_ranking_options_and_limits(client, store):
    q = "How long until my package arrives in Germany?"
    assert set(ranked(client, store, q, filters={"type": "eq", "key": "team", "value": "support"})) <= {
        "shipping.txt", "refunds.md"}
    assert ranked(client, store, q, filters={"type": "eq", "key": "team", "value": "support"})[0] == "shipping.txt"
    recent = ranked(client, store, q, filters={"type": "and", "filters": [
        {"type": "gte", "key": "year", "value": 2024}, {"type": "nin", "key": "team", "value": ["sales"]}]})
    assert recent and set(recent) <= {"refunds.md", "security.html", "fraud.txt"}
    either = ranked(client, store, q, filters={"type": "or", "filters": [
        {"type": "eq", "key": "team", "value": "sre"}, {"type": "lt", "key": "year", "value": 2024}]})
    assert set(either) <= {"outage.md", "shipping.txt"} and either[0] == "shipping.txt"
    assert ranked(client, store, q, filters={"type": "in", "key": "team", "value": ["nobody"]}) == []
    assert len(ranked(client, store, q, max_num_results=1)) == 1
    assert ranked(client, store, q, ranking_options={"score_threshold": 0.99}) == []
    hybrid = client.vector_stores.search(vector_store_id=store, query="database replica primary node",
                                         ranking_options={"hybrid_search": {"embedding_weight": 1, "text_weight": 1}})
    assert hybrid.data[0].filename == "outage.md"
    text_only = ranked(client, store, "replica", ranking_options={"hybrid_search": {"embedding_weight": 0,
                                                                                   "text_weight": 1}})
    assert text_only == ["outage.md"]  # full-text alone: only the file with the word


def test_listing_modifying_and_batches(client, store, corpus):
    first = client.vector_stores.files.list(vector_store_id=store, limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    rest = client.vector_stores.files.list(vector_store_id=store, limit=100, order="asc", after=first.data[-1].id)
    assert len(first.data) + len(rest.data) == len(CORPUS) and not rest.has_more
    assert client.vector_stores.update(store, name="kb2").name == "kb2"
    assert store in [vs.id for vs in client.vector_stores.list(limit=100).data]
    other = client.vector_stores.create(name="batched")
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=other.id, file_ids=[corpus["fraud.txt"], corpus["outage.md"]], poll_interval_ms=200)
    assert batch.status == "completed" and batch.file_counts.completed == 2
    listed = client.vector_stores.file_batches.list_files(vector_store_id=other.id, batch_id=batch.id)
    assert {f.id for f in listed.data} == {corpus["fraud.txt"], corpus["outage.md"]}
    assert ranked(client, other.id, "Why was my large late-night transaction blocked?")[0] == "fraud.txt"
    # a file deleted from a store stops matching; the store itself goes away with its chunks
    assert client.vector_stores.files.delete(vector_store_id=other.id, file_id=corpus["fraud.txt"]).deleted
    assert "fraud.txt" not in ranked(client, other.id, "Why was my large late-night transaction blocked?")
    assert client.vector_stores.retrieve(other.id).file_counts.total == 1
    assert client.vector_stores.delete(other.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(other.id)


def test_bad_input_is_a_clear_error(backend, client, store, corpus):
    server, _ = backend
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve("vs_nope")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(vector_store_id=store, file_id="file-nope")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=store, file_id="file-nope")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.search(vector_store_id="vs_nope", query="x")
    url = f"{server.url}/v1/vector_stores/{store}/search"
    for body, param in [({"query": "x", "max_num_results": 0}, "max_num_results"),
                        ({"query": "x", "max_num_results": 51}, "max_num_results"), ({"query": "  "}, "query"),
                        ({"query": "x", "filters": {"type": "eq", "key": "team"}}, "filters"),
                        ({"query": "x", "filters": {"type": "near", "key": "team", "value": 1}}, "filters")]:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"].startswith(param), (body, r.json())
    r = httpx.post(f"{server.url}/v1/vector_stores/{store}/files", json={
        "file_id": corpus["refunds.md"], "chunking_strategy": {"type": "static", "static": {
            "max_chunk_size_tokens": 50, "chunk_overlap_tokens": 40}}}, timeout=30)
    assert r.status_code == 400 and "chunking_strategy" in r.json()["error"]["param"], r.text
    # unreadable files fail on their own, with the reason; the others are untouched
    bad = {"blob.bin": b"\x00\x01\x02\x03", "broken.pdf": b"%PDF-1.4 not really a pdf", "empty.txt": b""}
    vs = client.vector_stores.create(name="bad files")
    ids = {}
    for name, data in bad.items():
        ids[name] = client.files.create(file=(name, io.BytesIO(data)), purpose="user_data").id
        client.vector_stores.files.create(vector_store_id=vs.id, file_id=ids[name])
    statuses = {f.id: f for f in wait_files(client, vs.id)}
    assert statuses[ids["blob.bin"]].status == "failed"
    assert statuses[ids["blob.bin"]].last_error.code == "unsupported_file"
    assert statuses[ids["broken.pdf"]].status == "failed" and statuses[ids["broken.pdf"]].last_error.message
    assert client.vector_stores.retrieve(vs.id).file_counts.failed >= 2
    assert ranked(client, store, "How long until my package arrives in Germany?")[0] == "shipping.txt"
    client.vector_stores.delete(vs.id)


def long_text(paragraphs: int) -> str:
    words = ["ledger", "invoice", "carbon", "latency", "replica", "tenant", "refund", "parcel", "token", "shard"]
    return "\n\n".join(f"Paragraph {i}: " + " ".join(words[(i * 7 + j) % 10] for j in range(120))
                       for i in range(paragraphs))


def test_deleting_a_store_mid_ingestion_stops_it_cleanly(backend, client):
    server, _ = backend
    file_id = client.files.create(file=("big.txt", io.BytesIO(long_text(300).encode())), purpose="assistants").id
    vs = client.vector_stores.create(name="doomed", file_ids=[file_id])
    assert client.vector_stores.retrieve(vs.id).file_counts.in_progress == 1
    assert client.vector_stores.delete(vs.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(vector_store_id=vs.id, file_id=file_id)
    chat = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content is not None  # the server goes on serving


def test_kill_9_during_ingestion_loses_and_duplicates_nothing(backend, tmp_path, request):
    """A file `completed` before the kill keeps exactly its chunks; the one in progress is
    ingested again after the restart, once."""
    _, args = backend
    if args:  # a database of its own: this test counts every chunk in it
        args = ("--vector-store", _pg_url(request.getfixturevalue("pg_server")))
    data_dir = str(tmp_path / "data")
    server = ServerProcess(*small_engine(), "--data-dir", data_dir, *args)
    try:
        client = openai_client(server)
        small = client.files.create(file=("refunds.md", io.BytesIO(CORPUS["refunds.md"].encode())),
                                    purpose="assistants").id
        text = long_text(30)  # ~30 chunks: seconds of embedding even on a fast CPU
        big = client.files.create(file=("big.txt", io.BytesIO(text.encode())), purpose="assistants").id
        vs = client.vector_stores.create(name="durable", file_ids=[small])
        wait_files(client, vs.id)
        before = client.vector_stores.files.content(vector_store_id=vs.id, file_id=small).data
        client.vector_stores.files.create(vector_store_id=vs.id, file_id=big)
        # no sleep: on a fast CPU the file could finish first; killed now, it is surely unfinished
        assert client.vector_stores.files.retrieve(vector_store_id=vs.id, file_id=big).status == "in_progress"
        server.proc.kill()  # SIGKILL: no shutdown code runs
        server.proc.wait()
    finally:
        server.stop()
    server = ServerProcess(*small_engine(), "--data-dir", data_dir, *args)
    try:
        client = openai_client(server)
        files = {f.id: f.status for f in wait_files(client, vs.id, timeout=300)}
        assert files == {small: "completed", big: "completed"}
        counts = client.vector_stores.retrieve(vs.id).file_counts
        assert (counts.completed, counts.total, counts.in_progress) == (2, 2, 0)
        assert client.vector_stores.files.content(vector_store_id=vs.id, file_id=small).data == before
        model = EmbeddingModel.builtin()
        expected = chunk_text(text, model.tokenizer, 800, 400, model.max_length)
        got = client.vector_stores.files.content(vector_store_id=vs.id, file_id=big).data
        assert [c.text for c in got] == [p.text for p in expected]  # every chunk once, in order
        hits = client.vector_stores.search(vector_store_id=vs.id, query="money back for an unused item",
                                           max_num_results=50).data
        assert [h.filename for h in hits].count("refunds.md") == 1
    finally:
        server.stop()
