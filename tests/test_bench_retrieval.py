"""`leanserve bench retrieval`: its flags, generated inputs and medians (no server started)."""
import pytest

from leanserve.bench import retrieval
from leanserve.cli import build_parser


def test_defaults_and_bad_values():
    args = retrieval.parse_args([])
    assert args.url == "http://127.0.0.1:8000" and not args.start_server
    assert (args.embed_requests, args.ingest_kb, args.repeats) == (200, 300, 1)
    with pytest.raises(SystemExit):
        retrieval.parse_args(["--chat-clients", "0"])


def test_cli_registers_the_bench_kinds():
    for kind in ("embeddings", "vectors", "retrieval"):
        args = build_parser().parse_args(["bench", kind, "--help"])
        assert args.kind == kind and args.rest == ["--help"]


def test_ingest_text_is_sized_and_deterministic():
    text = retrieval.ingest_text(20, seed=1)
    assert len(text) == 20 * 1024 and text == retrieval.ingest_text(20, seed=1)
    assert b"\n\n" in text and text != retrieval.ingest_text(20, seed=2)


def test_chat_bodies_are_distinct_and_exact_length():
    args = retrieval.parse_args(["--max-tokens", "7"])
    bodies = retrieval._chat_bodies("m", args, 3, "t")
    assert len({b["messages"][0]["content"] for b in bodies}) == 3
    assert all(b["max_tokens"] == 7 and b["ignore_eos"] and b["stream"] for b in bodies)


def test_summarize_takes_medians_and_skips_missing():
    runs = [{"embeddings": {"p50_ms": v, "p99_ms": 2 * v}, "chat_alone": {"tpot_ms": {"p50": v, "p99": v}},
             "chat_under_ingestion": {"tpot_ms": None}, "ratio_under_over_alone": {"tpot_p50": 1.0 + v / 10},
             "ingestion_alone": {"chunks_per_s": 10 * v, "chunks": 5}} for v in (1.0, 3.0, 2.0)]
    m = retrieval.summarize(runs)
    assert m["embeddings_p50_ms"] == 2.0 and m["embeddings_p99_ms"] == 4.0
    assert m["chat_alone_tpot_p50_ms"] == 2.0 and m["chat_under_ingestion_tpot_p50_ms"] is None
    assert m["ratio_tpot_p50"] == 1.2 and m["ingestion_alone_chunks_per_s"] == 20.0
    assert m["ingestion_under_chat_chunks_per_s"] is None
