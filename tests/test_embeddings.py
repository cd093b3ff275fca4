"""/v1/embeddings (issue 29) through the official openai client and LangChain's
OpenAIEmbeddings, against the encoder run in this process (itself checked against
sentence-transformers in test_embeddings_model.py)."""
from __future__ import annotations

import numpy as np
import pytest
from server_fixture import openai_client

from leanserve.rag.embed import EmbeddingModel

SENTENCES = ["Hello world", "A card payment of $9,000 at 3am from a new device.", "ünïcödé 日本語 текст",
             "short", " ".join(["payment"] * 240), "The cat sat on the mat.", "Is this transfer fraud?"]


@pytest.mark.slow
def test_embeddings_endpoint(structured_server):
    client = openai_client(structured_server)
    assert "all-MiniLM-L6-v2" in [m.id for m in client.models.list().data]
    both = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES[:3])  # base64, the client's default
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES[:3], encoding_format="float")
    assert len(both.data) == 3 and len(both.data[0].embedding) == 384
    assert np.allclose([d.embedding for d in both.data], [d.embedding for d in floats.data], atol=1e-6)
    assert both.usage.prompt_tokens > 0 and "energy_joules" in both.usage.model_extra["leanserve"]
    model = EmbeddingModel.builtin()
    expected = model.embed(model.tokenize(SENTENCES[:3])).numpy()
    assert np.allclose([d.embedding for d in floats.data], expected, atol=1e-5)
    ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=[model.tokenize(["Hello world"])[0]],
                                   encoding_format="float")
    assert np.allclose(ids.data[0].embedding, expected[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("extra,param", [
    ({"input": ""}, "input"), ({"input": "hi", "dimensions": 10}, "dimensions"),
    ({"input": [[100000]]}, "input"), ({"input": " ".join(["word"] * 400)}, "input")])
def test_bad_embedding_input_is_a_400(structured_server, extra, param):
    import httpx

    r = httpx.post(f"{structured_server.url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    long = httpx.post(f"{structured_server.url}/v1/embeddings", timeout=60, json={
        "model": "all-MiniLM-L6-v2", "input": " ".join(["word"] * 400), "truncate_prompt_tokens": -1})
    assert long.status_code == 200


@pytest.mark.slow
def test_langchain_openai_embeddings(structured_server):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(base_url=f"{structured_server.url}/v1", api_key="none", model="all-MiniLM-L6-v2",
                           check_embedding_ctx_length=False, max_retries=0)
    vectors = emb.embed_documents(SENTENCES[:2])
    model = EmbeddingModel.builtin()
    assert np.allclose(vectors, model.embed(model.tokenize(SENTENCES[:2])).numpy(), atol=1e-5)
    assert len(emb.embed_query("hello")) == 384
