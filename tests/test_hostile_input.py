"""Nothing one client sends may hurt another (issue 26): each request of the hostile-input
findings against one real server with small limits, and after each, that the server still
serves everyone else. The engine-level failure injection is in test_isolation.py, /metrics
label bounds in test_metrics_labels.py, slow clients in test_server_errors.py."""
from __future__ import annotations

import http.client
import json
import threading
import time

import httpx
import pytest
from server_fixture import ServerProcess, openai_client, small_engine

pytestmark = pytest.mark.slow

DEFAULT_MAX_TOKENS = 8
PER_REQUEST = 8
PER_CLIENT = 6
DEEP = 10_000


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(*small_engine(max_num_seqs=8), "--default-max-tokens", str(DEFAULT_MAX_TOKENS),
                      "--max-sequences-per-request", str(PER_REQUEST), "--max-seqs-per-client", str(PER_CLIENT))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]


def chat(model: str, content: str = "Tell me about the sea.", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def streams_beside(server, model: str, count: int, max_tokens: int = 16) -> tuple[list[threading.Thread], list]:
    """`count` streaming chats started in threads; each appends (status, finish_reason)."""
    results: list = []

    def run(i: int) -> None:
        body = chat(model, f"Count to {i + 10}.", max_tokens=max_tokens, ignore_eos=True, stream=True)
        finish = None
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer neighbour-{i}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    finish = choices[0]["finish_reason"] if choices else finish
            results.append((r.status_code, finish))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads, results


def wait_running(server, count: int) -> None:
    deadline = time.monotonic() + 60
    while server.metrics()["leanserve_running_sequences"] < count:
        assert time.monotonic() < deadline, "the neighbours do not start"
        time.sleep(0.05)


@pytest.mark.parametrize("top_k", [2**63, 1e20])
def test_a_huge_top_k_is_a_400_and_the_chats_beside_it_finish(server, model, top_k):
    threads, results = streams_beside(server, model, 3)
    wait_running(server, 3)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(model, temperature=1.0, top_k=top_k), timeout=60)
    assert error_of(r, 400)["param"] == "top_k"
    for t in threads:
        t.join(120)
    assert results == [(200, "length")] * 3
    assert "engine step failed" not in server.output()


def nested(depth: int, name: str = "name") -> bytes:
    return b'{"%s": ' % name.encode() + b"[" * depth + b"]" * depth + b', "path": "x"}'


@pytest.mark.parametrize("path, name", [("/v1/adapters", "name"), ("/v1/load_lora_adapter", "name"),
                                        ("/v1/load_lora_adapter", "lora_name"), ("/v1/unload_lora_adapter", "name"),
                                        ("/v1/chat/completions", "model"), ("/v1/completions", "model")])
def test_json_nested_10000_deep_is_a_400_and_the_connection_stays_usable(server, path, name):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read() and True
    before = conn.sock.getsockname()
    conn.request("POST", path, body=nested(DEEP, name), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 400 and "nested" in body["error"]["message"], body
    conn.request("GET", "/v1/models")  # the same keep-alive connection
    assert conn.getresponse().status == 200
    assert conn.sock.getsockname() == before
    conn.close()


@pytest.mark.parametrize("path, body", [("/v1/adapters", {"name": "a", "path": "/adapters/a\u0000b"}),
                                        ("/v1/adapters", {"name": "a\u0000b", "path": "/adapters/a"}),
                                        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x/\u0000"})])
def test_a_null_byte_in_an_adapter_field_is_a_400(server, path, body):
    error = error_of(httpx.post(f"{server.url}{path}", json=body, timeout=30), 400)
    assert "null byte" in error["message"]


def test_a_deep_batch_line_fails_alone_and_the_next_batch_runs_at_once(server, model):
    client = openai_client(server)
    valid = {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
             "body": chat(model, "Say hi.", max_tokens=2)}
    deep = b'{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": ' + \
        b"[" * DEEP + b"]" * DEEP + b"}"

    def run(lines: list[bytes], timeout: float):
        file = client.files.create(file=("in.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + timeout
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
        return batch

    first = run([deep, json.dumps(valid).encode()], 120)
    assert first.status == "completed" and (first.request_counts.completed, first.request_counts.failed) == (1, 1)
    errors = client.files.content(first.error_file_id).text
    assert "Line 1" in errors and "nested" in errors
    began = time.monotonic()
    second = run([json.dumps(valid).encode()], 60)
    assert second.status == "completed" and second.request_counts.completed == 1
    assert time.monotonic() - began < 30  # ~45 s behind the bad batch before the fix
    assert "job worker pass failed" not in server.output()


def test_too_many_sequences_in_one_request_is_a_400_and_nothing_waits_behind_it(server, model):
    r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                   json={"model": model, "prompt": ["a"] * 1000, "max_tokens": 1})
    error = error_of(r, 400)
    assert error["param"] == "prompt" and "1000" in error["message"] and "--max-sequences-per-request" in error["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(model, n=PER_REQUEST + 1, max_tokens=1), timeout=30)
    assert error_of(r, 400)["param"] == "n"
    assert server.metrics()["leanserve_waiting_sequences"] == 0
    reply = openai_client(server, timeout=30).chat.completions.create(**chat(model, max_tokens=2))
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_a_full_client_gets_429_while_another_client_is_served_at_once(server, model):
    busy = {"Authorization": "Bearer busy-client"}
    body = {"model": model, "prompt": ["Once upon a time"] * PER_CLIENT, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=busy) as held:
            assert held.status_code == 200
            wait_running(server, PER_CLIENT)
            r = http.post(f"{server.url}/v1/chat/completions", json=chat(model, max_tokens=1), headers=busy)
            error = error_of(r, 429)
            assert "--max-seqs-per-client" in error["message"] and r.headers["retry-after"]
            began = time.monotonic()
            other = http.post(f"{server.url}/v1/chat/completions", json=chat(model, max_tokens=2),
                              headers={"Authorization": "Bearer other-client"})
            assert other.status_code == 200 and time.monotonic() - began < 30
    r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                   json={"model": model, "prompt": ["a"] * (PER_CLIENT + 1), "max_tokens": 1})
    assert "at most 6" in error_of(r, 400)["message"]  # more than a client may ever hold: not a 429


def test_a_chat_without_max_tokens_stops_at_the_servers_default(server, model):
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat(model, ignore_eos=True), timeout=60).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/chat/completions", {"min_tokens": 10**9}),
    ("/v1/completions", {"min_tokens": 10**9, "max_tokens": None}),
])
def test_min_tokens_beyond_what_can_be_generated_is_a_400(server, model, endpoint, body):
    request = chat(model, **body) if "chat" in endpoint else {"model": model, "prompt": "Hi", **body}
    error = error_of(httpx.post(f"{server.url}{endpoint}", json=request, timeout=30), 400)
    assert error["param"] == "min_tokens"


def test_an_unknown_model_lists_the_served_ids(server, model):
    error = error_of(httpx.post(f"{server.url}/v1/chat/completions", json=chat("gpt-3.5-turbo"), timeout=30), 404)
    assert error["code"] == "model_not_found" and f"`{model}`" in error["message"]


@pytest.mark.parametrize("path", ["/v1/moderations", "/v1/audio/speech", "/v1/images/generations"])
def test_an_unserved_openai_route_says_it_is_not_supported(server, path):
    error = error_of(httpx.post(f"{server.url}{path}", json={}, timeout=30), 404)
    assert error["code"] == "unsupported_endpoint" and "not supported by this server" in error["message"]
    assert "/v1/chat/completions" in error["message"]
    error = error_of(httpx.get(f"{server.url}/v1/nothing-here", timeout=30), 404)
    assert error["message"] == "Invalid URL (GET /v1/nothing-here)"


def test_a_500_keeps_the_keep_alive_connection(tmp_path):
    """An unexpected exception in a handler: an OpenAI-shaped 500, and the same connection
    serves the next request (uvicorn closes the connection of an app that raises)."""
    import uvicorn

    from leanserve.config import EngineConfig
    from leanserve.engine.engine import AsyncEngine
    from leanserve.serve.app import create_app
    from server_fixture import free_port

    app = create_app(AsyncEngine(EngineConfig(dtype="float32", num_kv_blocks=8)))

    async def broken():
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/broken")
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 500 and body["error"]["code"] == "internal_error"
        before = conn.sock.getsockname()
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200 and conn.sock.getsockname() == before
        conn.close()
    finally:
        web.should_exit = True
        thread.join(10)
