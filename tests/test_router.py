"""The router end to end: the response cache and cascade routes on a real server, whose
upstream tier is a second leanserve process (the shared float32 server), driven by the
official openai client. A small HTTP server in this process plays the upstreams that
misbehave (malformed JSON, no answer).
"""
from __future__ import annotations

import http.server
import threading
import time

import openai
import pytest
from server_fixture import ServerProcess, free_port, openai_client, small_engine

from leanserve.bench.lora import write_random_adapter
from leanserve.models.llama import ModelArgs
from leanserve.models.loader import load_model_files
from leanserve.router.cache import Entry, ResponseCache
from leanserve.router.cascade import Route, Upstream, confidence, parse_rule

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path.startswith("/hang/"):
            time.sleep(8)
        body = b"this is not json {"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def misbehaving():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("router-adapters")
    args = ModelArgs.from_hf_config(load_model_files(None).config)
    write_random_adapter(str(root / "r1"), args, rank=4, seed=1, std=0.05)
    return root


@pytest.fixture(scope="module")
def server(structured_server, misbehaving, adapter_dir):
    up = f"{structured_server.url}/v1"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    s = ServerProcess(
        *small_engine(), "--dtype", "float32", "--response-cache", "semantic", "--api-key", "k1", "--api-key", "k2",
        "--lora-dir", str(adapter_dir),
        "--upstream", f"big={up}", "--upstream", f"down={dead}#model=m",
        "--upstream", f"bad={misbehaving}/bad/v1#model=m", "--upstream", f"hang={misbehaving}/hang/v1#model=m&timeout=1.5",
        "--cascade", f"fast={MODEL},big", "--cascade-rule", "fast=mean:-0.5",
        "--cascade", f"sure={MODEL},big", "--cascade-rule", "sure=mean:-100",
        "--cascade", f"unsure={MODEL},big", "--cascade-rule", "unsure=min:0",
        "--cascade", f"fallback={MODEL},down", "--cascade-rule", "fallback=min:0",
        "--cascade", "nowhere=down,bad", "--cascade", "stuck=hang,hang")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, api_key="k1")


def ask(client, content: str, model: str = MODEL, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=kw.pop("max_tokens", 12), **{"temperature": 0, **kw})


def leanserve(response) -> dict:
    return response.usage.model_extra["leanserve"]


# -- the cache, in process ------------------------------------------------------------------------

def test_cache_entries_expire_and_are_evicted_least_recently_used():
    cache = ResponseCache("exact", max_entries=2, ttl_seconds=0.3)
    for key in "abc":
        cache.put(key, Entry({"id": key}, 1.0, "", None))
    assert cache.get_exact("a", None) is None and len(cache) == 2  # evicted: the oldest
    assert cache.get_exact("b", None).body == {"id": "b"}
    time.sleep(0.4)
    assert cache.get_exact("b", None) is None and cache.get_exact("c", None) is None  # expired


def test_route_rule_and_upstream_specs_are_checked():
    assert Route.parse("fast=a,b").tiers == ["a", "b"]
    assert parse_rule("p10:-1.5") == ("p10", -1.5)
    up = Upstream.parse("big=http://h:1/v1/#model=m&timeout=3")
    assert (up.url, up.model, up.timeout) == ("http://h:1/v1", "m", 3.0)
    for bad in ("fast=a", "=a,b", "fast"):
        with pytest.raises(ValueError):
            Route.parse(bad)
    for bad in ("mean", "avg:-1", "mean:x", "mean:0.5", "mean:nan"):
        with pytest.raises(ValueError):
            parse_rule(bad)
    for bad in ("big", "big=ftp://h", "big=http://h#colour=red", "big=http://h#timeout=0"):
        with pytest.raises(ValueError):
            Upstream.parse(bad)
    assert confidence([-0.1, -3.0, -0.2], "min") == -3.0 and confidence([], "mean") == 0.0


# -- the cache, served ------------------------------------------------------------------------------

def test_exact_hit_replays_the_answer_at_no_energy(server, client):
    first = ask(client, "Name a fruit that is yellow.")
    assert leanserve(first)["cache"]["type"] == "miss" and leanserve(first)["energy_joules"] > 0
    again = ask(client, "Name a fruit that is yellow.")
    hit = leanserve(again)["cache"]
    assert hit["type"] == "exact" and hit["source_id"] == first.id and again.id != first.id
    assert again.choices[0].message.content == first.choices[0].message.content
    assert leanserve(again)["energy_joules"] == 0 and hit["saved_joules"] == leanserve(first)["energy_joules"]
    assert (again.usage.prompt_tokens, again.usage.completion_tokens) == \
        (first.usage.prompt_tokens, first.usage.completion_tokens)
    metrics = server.metrics()
    assert metrics['leanserve_response_cache_requests_total{result="exact_hit"}'] >= 1
    assert metrics["leanserve_response_cache_saved_joules_total"] > 0


def test_semantic_hit_for_a_paraphrase_and_miss_for_another_question(client):
    first = ask(client, "How do I reset my password?")
    para = ask(client, "How can I reset my password?")
    hit = leanserve(para)["cache"]
    assert hit["type"] == "semantic" and 0.9 <= hit["similarity"] < 1 and hit["source_id"] == first.id
    assert para.choices[0].message.content == first.choices[0].message.content
    assert leanserve(ask(client, "How do I delete my account?"))["cache"]["type"] == "miss"
    strict = ask(client, "How can one reset my password?", extra_body={"cache": {"mode": "semantic", "threshold": 0.9999}})
    assert leanserve(strict)["cache"]["type"] == "miss"
    exact_only = ask(client, "How could I reset my password?", extra_body={"cache": "exact"})
    assert leanserve(exact_only)["cache"]["type"] == "miss"


def test_tenants_never_share_answers(server, client):
    ask(client, "Say hello to the tenant.")
    other = openai_client(server, api_key="k2")
    assert leanserve(ask(other, "Say hello to the tenant."))["cache"]["type"] == "miss"
    assert leanserve(ask(other, "Say hello to the tenant."))["cache"]["type"] == "exact"


def test_only_deterministic_requests_are_cached_and_a_request_can_opt_out(client):
    sampled = [ask(client, "Pick a number.", temperature=0.8) for _ in range(2)]
    for r in sampled:
        assert r.usage.model_extra["leanserve"]["cache"]["type"] == "none"
        assert "deterministic" in leanserve(r)["cache"]["note"]
    seeded = [ask(client, "Pick a number.", temperature=0.8, seed=7) for _ in range(2)]
    assert leanserve(seeded[1])["cache"]["type"] == "exact"
    ask(client, "Pick a letter.")
    off = ask(client, "Pick a letter.", extra_body={"cache": "off"})
    assert "cache" not in leanserve(off)
    with pytest.raises(openai.BadRequestError):
        ask(client, "Pick a letter.", extra_body={"cache": "sometimes"})


def test_streams_are_stored_and_replayed(client):
    def stream(content):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finish, chunks[-1].usage.model_extra["leanserve"]

    text, finish, usage = stream("Describe the sea in one line.")
    assert usage["cache"]["type"] == "miss" and finish
    assert ask(client, "Describe the sea in one line.").choices[0].message.content == text  # stored from the stream
    replayed, finish2, usage2 = stream("Describe the sea in one line.")
    assert (replayed, finish2, usage2["cache"]["type"]) == (text, finish, "exact")


def test_batch_lines_bypass_the_cache(client):
    import io
    import json

    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}}
    data = "".join(json.dumps(dict(line, custom_id=f"l{i}")) + "\n" for i in range(2)).encode()
    file_id = client.files.create(file=("lines.jsonl", io.BytesIO(data)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    rows = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert len(rows) == 2
    for row in rows:  # replayed without the caller's key: never cached, never answered from the cache
        assert "cache" not in row["response"]["body"]["usage"]["leanserve"]


def test_a_replaced_adapter_invalidates_its_entries(server, client, adapter_dir):
    import httpx

    headers = {"Authorization": "Bearer k1"}

    def register():
        r = httpx.post(f"{server.url}/v1/adapters", json={"name": "inv", "path": str(adapter_dir / "r1")},
                       headers=headers, timeout=60)
        assert r.status_code == 200, r.text

    register()
    patient = client.with_options(timeout=900)  # the first adapter request may build the native LoRA kernel
    assert leanserve(ask(patient, "Adapter question.", model="inv"))["cache"]["type"] == "miss"
    assert leanserve(ask(client, "Adapter question.", model="inv"))["cache"]["type"] == "exact"
    assert leanserve(ask(client, "Adapter question."))["cache"]["type"] == "miss"  # the base model: its own entry
    assert httpx.delete(f"{server.url}/v1/adapters/inv", headers=headers, timeout=30).status_code == 200
    register()
    assert leanserve(ask(client, "Adapter question.", model="inv"))["cache"]["type"] == "miss"


# -- cascades ---------------------------------------------------------------------------------------

OFF = {"cache": "off"}


def test_routes_are_listed(client):
    models = {m.id: m for m in client.models.list().data}
    assert models["fast"].model_extra["leanserve"] == {"kind": "cascade", "tiers": [MODEL, "big"], "rule": "mean:-0.5"}


def test_escalation_follows_the_rule_and_bills_every_tier(client, structured_server):
    up = openai_client(structured_server)
    for prompt in ("What is 2 + 2?", "Write a strange poem about a teapot.", "What colour is the sky?"):
        r = ask(client, prompt, model="fast", extra_body=OFF)
        bill = leanserve(r)
        first = bill["tiers"][0]
        assert first["accepted"] == (first["confidence"] >= -0.5), bill
        assert len(bill["tiers"]) == (1 if first["accepted"] else 2)
        assert bill["tier"] == (MODEL if first["accepted"] else "big") and bill["route"] == "fast"
        assert bill["energy_joules"] == pytest.approx(sum(t["energy_joules"] for t in bill["tiers"]), abs=1e-5)
        assert r.choices[0].logprobs is None  # asked for internally, not by the client
        direct = ask(up, prompt) if bill["tier"] == "big" else ask(client, prompt, extra_body=OFF)
        assert r.choices[0].message.content == direct.choices[0].message.content


def test_sure_answers_stay_on_the_first_tier_and_unsure_ones_escalate(server, client):
    sure = leanserve(ask(client, "Write a strange poem about a teapot.", model="sure", extra_body=OFF))
    assert sure["tier"] == MODEL and len(sure["tiers"]) == 1
    unsure = leanserve(ask(client, "Write a strange poem about a teapot.", model="unsure", extra_body=OFF,
                           max_tokens=20))
    assert unsure["tier"] == "big" and unsure["tiers"][0]["confidence"] < 0 and not unsure["tiers"][0]["accepted"]
    assert unsure["energy_joules"] > unsure["tiers"][0]["energy_joules"] > 0  # the upstream's bill is counted too
    metrics = server.metrics()
    assert metrics['leanserve_cascade_escalations_total{route="unsure",tier="SmolLM2-135M-Instruct"}'] >= 1
    assert metrics['leanserve_cascade_requests_total{route="sure",tier="SmolLM2-135M-Instruct"}'] >= 1


def test_a_stream_on_a_route_is_the_accepted_answer(client):
    chunks = list(client.chat.completions.create(
        model="unsure", messages=[{"role": "user", "content": "Write a strange poem about a teapot."}], max_tokens=20,
        temperature=0, stream=True, extra_body=OFF))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(client, "Write a strange poem about a teapot.", model="unsure", extra_body=OFF,
                       max_tokens=20).choices[0].message.content


def test_a_down_upstream_leaves_the_best_answer_there_is(client):
    r = ask(client, "Write a strange poem about a teapot.", model="fallback", extra_body=OFF)
    bill = leanserve(r)
    assert bill["tier"] == MODEL and "unreachable" in bill["tiers"][1]["error"] and "note" in bill
    assert r.choices[0].message.content


def test_no_tier_answering_is_502_or_504_never_a_hang(client):
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "Hello?", model="nowhere", extra_body=OFF)
    assert e.value.status_code == 502 and "malformed JSON" in e.value.message and "unreachable" in e.value.message
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "Hello?", model="stuck", extra_body=OFF)
    assert e.value.status_code == 504 and e.value.body["code"] == "upstream_timeout"
    assert time.monotonic() - started < 6


def test_bad_route_requests_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Hello?", model="fast", n=2, extra_body=OFF)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        ask(client, "Hello?", model="slow-route")


# -- gateway metric names (issue 34: Kubernetes inference gateways read vLLM's) ---------------------

def test_the_gateway_protocol_metric_names_alias_ours(server):
    m = server.metrics()  # an idle server: the pairs read the same state
    assert m["vllm:num_requests_waiting"] == m["leanserve_waiting_sequences"]
    assert m["vllm:num_requests_running"] == m["leanserve_running_sequences"]
    assert m["vllm:kv_cache_usage_perc"] == pytest.approx(m["leanserve_kv_cache_usage_ratio"])
    info = [k for k in m if k.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="8"' in info[0] and 'running_lora_adapters=""' in info[0]
    assert abs(m[info[0]] - time.time()) < 60
