"""Embeddings (issue 29): our BERT encoder against sentence-transformers, (the served
/v1/embeddings is not wired yet)."""
from __future__ import annotations

import os

import pytest
import torch

from leanserve.rag.embed import EmbeddingModel, builtin_embedding_model_path

SENTENCES = ["Hello world", "A card payment of $9,000 at 3am from a new device.", "ünïcödé 日本語 текст",
             "short", " ".join(["payment"] * 240), "The cat sat on the mat.", "Is this transfer fraud?"]


@pytest.fixture(scope="module")
def reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(builtin_embedding_model_path(), device="cpu")


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 0.99999), (torch.bfloat16, 0.999)])
def test_equal_to_sentence_transformers_and_batched_equals_alone(reference, dtype, floor):
    model = EmbeddingModel.builtin(dtype)
    ids = model.tokenize(SENTENCES)
    assert [len(i) for i in ids] == [len(reference.tokenizer(s)["input_ids"]) for s in SENTENCES]
    ours = model.embed(ids)
    ref = torch.tensor(reference.encode(SENTENCES))
    assert torch.nn.functional.cosine_similarity(ours, ref).min() >= floor
    if dtype == torch.float32:
        alone = torch.stack([model.embed([i])[0] for i in ids])
        assert torch.equal(alone, ours)
