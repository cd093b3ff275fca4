"""What the server does with bad input, bad keys and too many requests: an OpenAI-shaped error
with the right 4xx status each time, never a 500, and the server keeps serving."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_fixture import ServerProcess, small_engine

from leanserve.serve.auth import APIKeyAuth, api_keys
from leanserve.serve.protocol import APIError

KEY = "sk-test-key"
MAX_BODY = 64 * 1024


def test_api_keys_from_args_and_env():
    assert api_keys(["a", "b"], {"LEANSERVE_API_KEY": " c, ,a"}) == ("a", "b", "c")
    assert api_keys(None, {}) == ()


def test_api_key_auth():
    APIKeyAuth(()).check(None)  # no keys: open
    auth = APIKeyAuth(("k1", "k2"))
    auth.check("Bearer k2")
    for header in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1", "Bearer \u00e9"):
        with pytest.raises(APIError) as e:
            auth.check(header)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"


@pytest.fixture(scope="module")
def server():
    """Auth on, one running sequence and two waiting at most, small bodies."""
    s = ServerProcess(*small_engine(max_num_seqs=1), "--max-waiting", "2", "--api-key", KEY, "--max-body-bytes", str(MAX_BODY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def assert_error(r: httpx.Response, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    return error


@pytest.mark.slow
def test_auth(server, model):
    body = {"model": model, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert_error(httpx.post(f"{server.url}/v1/completions", json=body, headers=headers), 401,
                     code="invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/models"), 401, code="invalid_api_key")
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapes stay open
        assert httpx.get(f"{server.url}{path}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=model, prompt="Hi", max_tokens=2).choices[0].text is not None


def chat(**fields):
    return {"model": "MODEL", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


def completion(**fields):
    return {"model": "MODEL", "prompt": "Hi", "max_tokens": 4, **fields}


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = {"Content-Type": "application/json"}

# (name, path, request keyword arguments for httpx, status, param, code)
BAD_INPUTS = [
    ("malformed json", CHAT, dict(content=b'{"model": ', headers=JSON), 400, None, None),
    ("empty body", CHAT, dict(content=b"", headers=JSON), 400, None, None),
    ("invalid utf-8", CHAT, dict(content=b'{"model": "\xff"}', headers=JSON), 400, None, None),
    ("body not an object", CHAT, dict(json=[1, 2]), 400, None, None),
    ("missing messages", CHAT, dict(json={"model": "MODEL"}), 400, "messages", None),
    ("messages not a list", CHAT, dict(json=chat(messages="Hi")), 400, "messages", None),
    ("empty messages", CHAT, dict(json=chat(messages=[])), 400, "messages", None),
    ("unknown role", CHAT, dict(json=chat(messages=[{"role": "bot", "content": "x"}])), 400,
     "messages[0].role", None),
    ("image content", CHAT, dict(json=chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])), 400, "messages[0].content", None),
    ("content a number", CHAT, dict(json=chat(messages=[{"role": "user", "content": 5}])), 400,
     "messages[0].content", None),
    ("unknown field", CHAT, dict(json=chat(frobnicate=1)), 400, "frobnicate", None),
    ("temperature a string", CHAT, dict(json=chat(temperature="hot")), 400, "temperature", None),
    ("temperature NaN", CHAT, dict(content=json.dumps(chat(temperature=float("nan"))).encode(), headers=JSON),
     400, "temperature", None),
    ("temperature too high", CHAT, dict(json=chat(temperature=2.5)), 400, "temperature", None),
    ("top_p zero", CHAT, dict(json=chat(top_p=0)), 400, "top_p", None),
    ("unknown priority class", CHAT, dict(json=chat(priority="urgent")), 400, "priority", None),
    ("top_k negative", CHAT, dict(json=chat(top_k=-5)), 400, "top_k", None),
    ("min_p above one", CHAT, dict(json=chat(min_p=1.5)), 400, "min_p", None),
    ("presence_penalty", CHAT, dict(json=chat(presence_penalty=3)), 400, "presence_penalty", None),
    ("repetition_penalty zero", CHAT, dict(json=chat(repetition_penalty=0)), 400, "repetition_penalty", None),
    ("max_tokens zero", CHAT, dict(json=chat(max_tokens=0)), 400, "max_tokens", None),
    ("max_tokens a float", CHAT, dict(json=chat(max_tokens=1.5)), 400, "max_tokens", None),
    ("min_tokens above max_tokens", CHAT, dict(json=chat(min_tokens=9)), 400, "min_tokens", None),
    ("n zero", CHAT, dict(json=chat(n=0)), 400, "n", None),
    ("stream a string", CHAT, dict(json=chat(stream="yes")), 400, "stream", None),
    ("stop a number", CHAT, dict(json=chat(stop=5)), 400, "stop", None),
    ("top_logprobs without logprobs", CHAT, dict(json=chat(top_logprobs=2)), 400, "top_logprobs", None),
    ("top_logprobs too many", CHAT, dict(json=chat(logprobs=True, top_logprobs=50)), 400, "top_logprobs", None),
    ("logit_bias", CHAT, dict(json=chat(logit_bias={"1": 5})), 400, "logit_bias", None),
    ("unknown stream option", CHAT, dict(json=chat(stream=True, stream_options={"x": 1})), 400,
     "stream_options.x", None),
    ("unknown model", CHAT, dict(json=chat(model="gpt-4")), 404, "model", "model_not_found"),
    ("context overflow", CHAT, dict(json=chat(max_tokens=10**6)), 400, "max_tokens", None),
    ("missing prompt", COMPLETIONS, dict(json={"model": "MODEL"}), 400, "prompt", None),
    ("empty prompt list", COMPLETIONS, dict(json=completion(prompt=[])), 400, "prompt", None),
    ("mixed prompt list", COMPLETIONS, dict(json=completion(prompt=[1, "a"])), 400, "prompt", None),
    ("negative token id", COMPLETIONS, dict(json=completion(prompt=[1, -2])), 400, "prompt", None),
    ("token id beyond vocab", COMPLETIONS, dict(json=completion(prompt=[10**9])), 400, "prompt", None),
    ("empty prompt", COMPLETIONS, dict(json=completion(prompt="")), 400, "prompt", None),
    ("completion logprobs too many", COMPLETIONS, dict(json=completion(logprobs=50)), 400, "logprobs", None),
    ("echo", COMPLETIONS, dict(json=completion(echo=True)), 400, "echo", None),
    ("oversized body", CHAT, dict(json=chat(messages=[{"role": "user", "content": "x" * MAX_BODY}])), 413,
     None, "request_too_large"),
    ("oversized chunked body", CHAT, dict(content=iter([b" " * 4096] * (MAX_BODY // 4096 + 1)), headers=JSON),
     413, None, "request_too_large"),
    ("form content type", CHAT, dict(data={"model": "MODEL"}), 415, None, "unsupported_media_type"),
    ("text content type", CHAT, dict(content=b"{}", headers={"Content-Type": "text/plain"}), 415, None,
     "unsupported_media_type"),
    ("unknown path", "/v1/embedz", dict(json={}), 404, None, "not_found"),
]


def _with_model(value, model):
    """Puts the served model's name where a case says MODEL."""
    if isinstance(value, dict):
        return {k: _with_model(v, model) for k, v in value.items()}
    return model if value == "MODEL" else value


@pytest.mark.slow
def test_bad_inputs(server, http, model):
    failures = []
    for name, path, kwargs, status, param, code in BAD_INPUTS:
        kwargs = {k: _with_model(v, model) if k == "json" else v for k, v in kwargs.items()}
        try:
            assert_error(http.post(path, **kwargs), status, param, code)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert_error(http.get(CHAT), 405, code="method_not_allowed")
    assert not failures, "\n".join(failures)
    r = http.post(CHAT, json=chat(model=model))  # the server still answers
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert not any(k.startswith('leanserve_requests_total{status="5') for k in server.metrics())


@pytest.mark.slow
def test_overload_gets_429_with_retry_after(server, model):
    body = {"model": model, "prompt": "Count:", "max_tokens": 16, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=300) as client:
            return await asyncio.gather(*[client.post(COMPLETIONS, json=body) for _ in range(12)])

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert_error(r, 429, code="server_overloaded")
    metrics = server.metrics()
    assert metrics['leanserve_requests_total{status="429"}'] >= 1
    assert not any(k.startswith('leanserve_requests_total{status="5') for k in metrics)
