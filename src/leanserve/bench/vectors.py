"""`python -m leanserve.bench.vectors`: vector-store search latency and recall, any backend.

Loads N chunks into a fresh store of each backend asked for (SQLite in a temporary folder,
Postgres at --url or in a pgserver started here), then runs the same queries through
`VectorBackend.search(k=10)` and reports p50/p99 latency and recall@10 against exact
search (numpy over the same vectors), and ingestion chunks/s through `complete_file`.

Vectors are like real ones, because uniform random 384-d vectors are HNSW's worst case and
say nothing about real use: `minilm` embeds generated sentences about 200 topics with the
built-in all-MiniLM-L6-v2; `clustered` draws points around 200 random centres (cosine ~0.5
within a topic), much faster to make at 100k. Queries come from the same topics.

Postgres loads with its HNSW index deferred (rag/pgvector.py says why), then builds it
(timed apart), then measures a further file's ingestion into the indexed table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from ..cli import HelpFormatter
from ..rag.backend import Chunk

K = 10
FILE_CHUNKS = 1000  # chunks per complete_file call while loading
TOPICS = 200


def clustered(n: int, dim: int, rng, centres: np.ndarray) -> np.ndarray:
    sigma = 1 / np.sqrt(dim)  # |noise| ~ |centre|: cosine ~0.7 to the centre, ~0.5 within a topic
    x = centres[rng.integers(0, len(centres), n)] + sigma * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sentences(n: int, rng, words: list[str], topics: list[list[str]]) -> list[str]:
    """Each sentence: a topic's keywords mixed with general words, 12 to 24 of them."""
    out = []
    for _ in range(n):
        topic = topics[rng.integers(len(topics))]
        length = int(rng.integers(12, 25))
        picks = [topic[rng.integers(len(topic))] if rng.random() < 0.5 else words[rng.integers(len(words))]
                 for _ in range(length)]
        out.append(" ".join(picks))
    return out


def minilm(n_data: int, n_query: int, rng) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from ..rag.embed import EmbeddingModel

    model = EmbeddingModel.builtin()
    vocab = [w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 4]
    vocab.sort()
    words = [vocab[i] for i in rng.choice(len(vocab), 3000, replace=False)]
    topics = [[vocab[i] for i in rng.choice(len(vocab), 12, replace=False)] for _ in range(TOPICS)]
    texts = sentences(n_data + n_query, rng, words, topics)
    vectors = []
    for i in range(0, len(texts), 256):
        vectors.append(model.embed(model.tokenize(texts[i:i + 256])).float().numpy())
    v = np.concatenate(vectors).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v[:n_data], v[n_data:], texts[:n_data]


def make_data(kind: str, n: int, queries: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "minilm":
        return minilm(n, queries, rng)
    centres = rng.standard_normal((TOPICS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data, qs = clustered(n, dim, rng, centres), clustered(queries, dim, rng, centres)
    return data, qs, [f"chunk {i}" for i in range(n)]


def load(backend, data: np.ndarray, texts: list[str]) -> tuple[str, float]:
    """(store id, chunks/s) through attach + complete_file, FILE_CHUNKS per file."""
    store = backend.create_store("bench", None, None)["id"]
    start = time.perf_counter()
    for f, i in enumerate(range(0, len(data), FILE_CHUNKS)):
        backend.add_file(store, f"file-{f}", f"{f}.txt", {"part": f % 10}, {"type": "auto"})
        assert backend.complete_file(store, f"file-{f}", [
            Chunk(texts[j], data[j], 32) for j in range(i, min(i + FILE_CHUNKS, len(data)))])
    return store, len(data) / (time.perf_counter() - start)


PART_0 = {"type": "eq", "key": "part", "value": 0}  # a tenth of the files (load tags them)


def measure(backend, store: str, data: np.ndarray, queries: np.ndarray, filtered: bool = False) -> dict:
    """Latency and recall@10 over `queries`; `filtered`: with PART_0, a tenth of the rows."""
    scores = queries @ data.T
    if filtered:
        scores[:, (np.arange(len(data)) // FILE_CHUNKS) % 10 != 0] = -np.inf
    truth = np.argsort(-scores, axis=1)[:, :K]
    filters = PART_0 if filtered else None
    for q in queries[:10]:  # warm: caches, a lazily built graph
        backend.search(store, q, "", K, filters=filters, score_threshold=-1.0)
    latencies, recalls = [], []
    for q, want in zip(queries, truth):
        start = time.perf_counter()
        hits = backend.search(store, q, "", K, filters=filters, score_threshold=-1.0)
        latencies.append(time.perf_counter() - start)
        got = {int(h.file_id[5:]) * FILE_CHUNKS + h.chunk_index for h in hits}
        recalls.append(len(got & set(want.tolist())) / K)
    latencies.sort()
    return {"p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "recall_at_10": float(np.mean(recalls))}


def bench_sqlite(data, queries, texts, dim) -> list[dict]:
    from ..rag.store import SQLiteBackend

    with tempfile.TemporaryDirectory() as folder:
        backend = SQLiteBackend(f"{folder}/vectors.sqlite3", dim)
        try:
            store, rate = load(backend, data, texts)
            settle = getattr(getattr(backend, "vectors", None), "settle", None)
            backend.search(store, queries[0], "", K)  # starts the graph's build past its threshold
            if settle:
                settle()
            return [{"backend": "sqlite", "ingest_chunks_per_s": rate, **measure(backend, store, data, queries)},
                    {"backend": "sqlite, filtered to 10%", **measure(backend, store, data, queries, True)}]
        finally:
            backend.close()


def bench_postgres(data, queries, texts, dim, url: str, ef_searches: list[int]) -> list[dict]:
    import psycopg

    from ..rag.pgvector import PostgresBackend

    schema = f"bench_{int(time.time())}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE SCHEMA {schema}")
    url = psycopg.conninfo.make_conninfo(url, options=f"-c search_path={schema},public")
    backend = PostgresBackend(url, dim, index_above=len(data) + 1, exact_below=0)
    try:
        store, rate = load(backend, data, texts)
        rows = [{"backend": "postgres exact", "ingest_chunks_per_s": rate,
                 **measure(backend, store, data, queries[: max(20, len(queries) // 5)])}]
        start = time.perf_counter()
        backend.build_index()
        build = time.perf_counter() - start
        for ef in ef_searches:
            backend.ef_search = ef
            rows.append({"backend": f"postgres hnsw ef_search={ef}", "index_build_s": build,
                         **measure(backend, store, data, queries)})
            rows.append({"backend": f"postgres hnsw ef_search={ef}, filtered to 10%",
                         **measure(backend, store, data, queries, True)})
        extra = data[:FILE_CHUNKS]  # one more file into the indexed table
        backend.add_file(store, "file-extra", "x.txt", None, {"type": "auto"})
        start = time.perf_counter()
        backend.complete_file(store, "file-extra", [Chunk("x", v, 1) for v in extra])
        rows.append({"backend": "postgres, one more file into the index",
                     "ingest_chunks_per_s": len(extra) / (time.perf_counter() - start)})
        return rows
    finally:
        backend.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def postgres_url(url: str | None, keep: list):
    if url:
        return url
    import pgserver  # a local Postgres with pgvector, as the tests start it

    folder = tempfile.mkdtemp(prefix="leanserve-bench-pg-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    keep.append(server)
    return server.get_uri()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leanserve.bench.vectors", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"],
                   help="which backends to measure, side by side on the same data")
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000], metavar="N", help="chunks per run")
    p.add_argument("--vectors", choices=["clustered", "minilm"], default="clustered",
                   help="clustered points, or MiniLM embeddings of generated sentences (slower to make)")
    p.add_argument("--dim", type=int, default=384, help="vector width (clustered only; MiniLM is 384)")
    p.add_argument("--queries", type=int, default=300, help="queries per measurement")
    p.add_argument("--ef-search", nargs="+", type=int, default=[40, 100], metavar="EF",
                   help="pgvector hnsw.ef_search values to measure (40 is its default)")
    p.add_argument("--url", help="a Postgres with pgvector (default: start one with pgserver)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    keep: list = []
    results = []
    try:
        url = postgres_url(args.url, keep) if "postgres" in args.backends else None
        for n in args.sizes:
            data, queries, texts = make_data(args.vectors, n, args.queries, args.dim, args.seed)
            for name in args.backends:
                rows = (bench_sqlite(data, queries, texts, data.shape[1]) if name == "sqlite" else
                        bench_postgres(data, queries, texts, data.shape[1], url, args.ef_search))
                for row in rows:
                    row.update(chunks=n, vectors=args.vectors)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                          flush=True)
                results += rows
    finally:
        for server in keep:
            server.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
