"""The sentence-embedding model (models/bert.py, rag/embed.py) against sentence-transformers,
and the token-budget batcher that feeds it."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from leanserve.errors import InvalidRequest
from leanserve.rag.embed import BATCH, REALTIME, EmbeddingBatcher, EmbeddingModel, builtin_embedding_model_path

LONG = " ".join(f"clause {i} of the agreement binds the parties;" for i in range(28))  # ~250 tokens
SENTENCES = [
    "Hello world", "", "a", "The cat sat on the mat.", "Is this card payment of $9,000 at 3am fraud?",
    "ünïcödé naïve café — déjà vu", "日本語のテキストです。", "Текст на русском языке.", "emoji 🙂🚀 and symbols ∑∫√",
    "def f(x):\n    return x ** 2  # code", "   leading and trailing spaces   ", "UPPER CASE SHOUTING TEXT",
    "Numbers 3.14159 2.71828 1e-9 42", "A much longer sentence that talks about retrieval augmented generation, "
    "vector stores, embeddings and low-latency search over millions of chunks.", "tab\tseparated\tvalues",
    " ".join(["payment"] * 240), LONG, LONG[: len(LONG) // 2], "Why is the sky blue?", "ok",
]


@pytest.fixture(scope="module")
def reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(builtin_embedding_model_path(), device="cpu")


@pytest.fixture(scope="module")
def model():
    return EmbeddingModel.builtin(torch.float32)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double())


def test_folder_description(model):
    assert (model.name, model.dim, model.max_length, model.pooling, model.normalize) == \
        ("all-MiniLM-L6-v2", 384, 256, ["mean"], True)
    assert model.supports_dimensions is False
    with pytest.raises(InvalidRequest):
        model.shorten(torch.zeros(1, 384), 128)


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 0.99999), (torch.bfloat16, 0.999)])
def test_equal_to_sentence_transformers(reference, model, dtype, floor):
    ours = model if dtype == torch.float32 else EmbeddingModel.builtin(dtype)
    ids = ours.tokenize(SENTENCES)
    assert ids == [reference.tokenizer(s)["input_ids"] for s in SENTENCES]
    assert max(map(len, ids)) <= ours.max_length
    got = ours.embed(ids)
    assert got.dtype == torch.float32 and got.shape == (len(SENTENCES), 384)
    assert cosines(got, torch.tensor(reference.encode(SENTENCES))).min() >= floor
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_batched_equals_alone(model):
    ids = model.tokenize(SENTENCES)
    batched = model.embed(ids)
    alone = torch.cat([model.embed([i]) for i in ids])
    assert (batched - alone).abs().max() <= 1e-6  # bit-equal here (models/bert.py: Packing)
    assert torch.equal(model.embed(ids[::-1]), batched.flip(0))


def test_over_length_refused_unless_truncated(reference, model):
    text = " ".join(["retrieval"] * 400)
    ids = model.tokenize([text])[0]
    assert len(ids) > model.max_length
    batcher = EmbeddingBatcher(model)
    with pytest.raises(ValueError):
        batcher.submit([ids])
    with pytest.raises(InvalidRequest):
        batcher.submit([[]])
    future = batcher.submit([ids], truncate=True)
    assert batcher.run_batch() == model.max_length
    cut = model.truncate(ids)
    assert len(cut) == model.max_length and cut[0] == ids[0] and cut[-1] == ids[-1] == 102
    assert cut == reference.tokenizer(text, truncation=True, max_length=model.max_length)["input_ids"]
    assert cosines(future.result(timeout=0), torch.tensor(reference.encode([text]))).item() >= 0.99999


def test_batcher_budget_and_priorities(model):
    ids = model.tokenize(SENTENCES)
    batcher = EmbeddingBatcher(model, max_tokens=300)
    bulk = batcher.submit(ids, priority=BATCH, tag="bulk")
    chat = batcher.submit(ids[3:6], priority=REALTIME, tag="chat")
    first = batcher.next_batch(100)
    assert [item.request.tag for item in first] == ["chat"] * 3 + ["bulk"] * (len(first) - 3)
    assert sum(len(item.tokens) for item in first) <= 100
    assert [item.index for item in first[3:]] == list(range(len(first) - 3))  # oldest first within a class
    batcher.run(first)
    assert chat.done() and torch.allclose(chat.result(), model.embed(ids[3:6]), atol=1e-6)
    sizes = []
    while tokens := batcher.run_batch():
        sizes.append(tokens)
    assert all(s <= 300 or s == max(map(len, ids)) for s in sizes) and len(batcher) == 0
    assert torch.allclose(bulk.result(timeout=0), model.embed(ids), atol=1e-6)
    assert batcher.run_batch() == 0  # a no-op when nothing waits
    tiny = EmbeddingBatcher(model, max_tokens=8)  # an input over the budget still runs, alone
    long = tiny.submit([ids[16], ids[0]])
    assert tiny.run_batch() == len(ids[16]) and tiny.run_batch() == len(ids[0]) and long.done()


def test_batcher_cancel_and_threads(model):
    ids = model.tokenize(SENTENCES[:8])
    batcher = EmbeddingBatcher(model, max_tokens=64)
    dropped = batcher.submit(ids)
    assert dropped.cancel()
    futures, lock = [], threading.Lock()

    def client(k):
        for j in range(5):
            f = batcher.submit([ids[(k + j) % 8], ids[j]], priority=(k + j) % 3)
            with lock:
                futures.append((f, [(k + j) % 8, j]))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or len(batcher):
        batcher.run_batch()
    for t in threads:
        t.join()
    expected = model.embed(ids)
    assert len(futures) == 20
    for f, which in futures:
        assert torch.allclose(f.result(timeout=0), expected[which], atol=1e-6)
