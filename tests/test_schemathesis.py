"""Schemathesis fuzzes a real `leanserve serve` from the server's own /openapi.json: no request
may get a 5xx or hang, every answer must be one the document declares, and the server must
still answer a plain chat completion afterwards."""
from __future__ import annotations

import copy
import tempfile

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)
from server_fixture import ServerProcess, openai_client, small_engine
from starlette.testclient import TestClient

FUZZED = r"^/v1/(chat/completions|completions|files|batches|async|adapters|load_lora_adapter|unload_lora_adapter)"
EXAMPLES = 20  # per operation, 19 operations
REQUEST_TIMEOUT = 30  # seconds; a request taking longer counts as a hang
MAX_NEW_TOKENS = 4
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def test_the_document_declares_request_bodies_and_no_422(tmp_path):
    """Cheap: the app over a real engine, not started; /openapi.json is built from the routes."""
    from leanserve.config import EngineConfig
    from leanserve.engine.engine import AsyncEngine
    from leanserve.jobs import JobsConfig
    from leanserve.serve.app import create_app

    app = create_app(AsyncEngine(EngineConfig(dtype="float32", num_kv_blocks=8)), jobs=JobsConfig(data_dir=str(tmp_path)))
    doc = TestClient(app).get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert {"model", "max_tokens"} <= schemas[model]["properties"].keys()
        assert doc["paths"][path]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == \
            {"$ref": "#/components/schemas/ErrorResponse"}
    assert "multipart/form-data" in doc["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert not [(p, m) for p, ops in doc["paths"].items() for m, op in ops.items() if "422" in op["responses"]]


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="leanserve-adapters-") as adapters:
        s = ServerProcess(*small_engine(max_num_seqs=4), "--lora-dir", adapters)
        yield s
        s.stop()


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]


def bounded(doc: dict, model: str) -> dict:
    """A copy of the served document in which generation requests stay cheap on a shared CPU:
    they name the served model (else every one is a 404) and ask for a few tokens and choices."""
    doc = copy.deepcopy(doc)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schema = doc["components"]["schemas"][name]
        props = schema["properties"]
        props["model"] = {"const": model}
        props["n"]["maximum"] = 2
        props["min_tokens"]["maximum"] = MAX_NEW_TOKENS
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS}
        schema["required"].append("max_tokens")
    return doc


@pytest.fixture(scope="module")
def api(server, model):
    doc = bounded(httpx.get(f"{server.url}/openapi.json", timeout=10).json(), model)
    config = schemathesis.Config.from_dict({
        "base-url": server.url, "request-timeout": REQUEST_TIMEOUT,
        "generation": {"max-examples": EXAMPLES, "database": "none"},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_dict(doc, config=config).include(path_regex=FUZZED)


@pytest.mark.slow
def test_fuzz(api):
    """Every fuzzed operation in one test, through hypothesis directly: schemathesis's pytest
    plugin (`from_fixture`) reads a pytest internal that pytest 9.2 removed."""
    failures = []
    for result in api.get_all_operations():
        operation = result.ok()

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        def fuzz(case):
            case.call_and_validate(checks=CHECKS)

        try:
            fuzz()
        except Exception as e:  # noqa: BLE001 - every operation's failure is reported together
            failures.append(f"{operation.label}: {type(e).__name__}: {str(e)[:2000]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_the_server_still_answers_after_the_fuzz(server, model):
    reply = openai_client(server, timeout=60).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=MAX_NEW_TOKENS)
    assert reply.choices[0].message.content
    assert "Traceback" not in server.output()
