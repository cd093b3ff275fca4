"""leanserve on a real local Ray Serve cluster (serve/ray_app.py): two single-thread replicas of
the built-in model behind the ingress. Requests sharing a prompt prefix land on one replica
(the x-leanserve-replica header), distinct prefixes spread over both, and greedy answers equal
a plain `leanserve serve`'s. One cluster for the module: Ray's start-up is the slow part."""
from __future__ import annotations

import os

import httpx
import pytest
from server_fixture import ServerProcess, free_port, small_engine

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")  # the `ray` extra, in `dev`: CI has it
from ray import serve  # noqa: E402

from leanserve.serve.ray_app import REPLICA_HEADER, build_app  # noqa: E402

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=256, kv_cache_gib=0.25, dtype="float32")
SYSTEMS = [f"You are assistant number {i}. You answer in one short sentence about topic {i}." for i in range(6)]


def chat(system: str, question: str) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


@pytest.fixture(scope="module")
def ray_url():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns token auth on by default
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(num_replicas=2, replica_cpus=1, **ENGINE), name="leanserve", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def post(url: str, body: dict) -> httpx.Response:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.xfail(reason="known bug (issue 34, open): requests sharing a system prompt still land on both replicas; "
                          "PrefixAffinityRouter's first choice is not what the handle uses", strict=False)
def test_shared_prefix_one_replica_distinct_spread(ray_url):
    same = {post(ray_url, chat(SYSTEMS[0], f"Question {i}?")).headers[REPLICA_HEADER] for i in range(4)}
    assert len(same) == 1
    spread = {post(ray_url, chat(s, "Hello?")).headers[REPLICA_HEADER] for s in SYSTEMS}
    assert len(spread) == 2


def test_stream_and_models_through_ingress(ray_url):
    r = httpx.get(f"{ray_url}/v1/models", timeout=30)
    assert r.status_code == 200 and r.headers[REPLICA_HEADER]
    with httpx.stream("POST", f"{ray_url}/v1/chat/completions", json=dict(chat(SYSTEMS[1], "Hi"), stream=True),
                      timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        text = "".join(s.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    bad = httpx.post(f"{ray_url}/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct"}, timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()


def test_greedy_equals_plain_server(ray_url):
    bodies = [chat(SYSTEMS[2], "What is 2+2?"), chat(SYSTEMS[3], "Name a colour.")]
    through_ray = [post(ray_url, b).json()["choices"][0]["message"]["content"] for b in bodies]
    plain = ServerProcess(*small_engine(4), "--dtype", "float32")
    try:
        direct = [post(plain.url, b).json()["choices"][0]["message"]["content"] for b in bodies]
    finally:
        plain.stop()
    assert through_ray == direct
