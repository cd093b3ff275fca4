"""End to end, on one real `leanserve serve` driven by the openai client: API keys with a
default service class, realtime latency under a running batch, and carbon-aware deferral
of batches (the forecast file is read again for each batch, so tests rewrite it)."""
from __future__ import annotations

import itertools
import json
import statistics
import time

import openai
import pytest
from server_fixture import ServerProcess, small_engine, openai_client

from leanserve import batch_cli
from leanserve.serve.auth import APIKeyAuth, api_key_classes, api_keys
from leanserve.serve.protocol import APIError

H = 3600
CHAT = "/v1/chat/completions"
REALTIME_KEY, BATCH_KEY, STANDARD_KEY = "rt-key", "bulk-key==", "std-key"  # '=' as in base64 keys
PROMPTS = ["What is the capital of France?", "Name a famous painter.", "List three primary colors.",
           "Give me a synonym for happy.", "What is 12 times 12?", "How many legs does a spider have?",
           "Write a haiku about the sea.", "Explain what a CPU does in one sentence."]


def write_forecast(path, clean_hours: set[int]) -> int:
    """An hourly forecast around now: 50 g/kWh in the hours `clean_hours` (0 = the current
    hour), 500 in the others. Returns the current hour's start."""
    hour = int(time.time()) // H * H
    rows = [f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(hour + i * H))},{50 if i in clean_hours else 500}"
            for i in range(-2, 30)]
    path.write_text("timestamp,gco2e_per_kwh\n" + "\n".join(rows) + "\n")
    return hour


@pytest.fixture(scope="module")
def forecast_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("forecast") / "forecast.csv"
    write_forecast(path, {0})
    return path


@pytest.fixture(scope="module")
def server(forecast_path):
    s = ServerProcess(*small_engine(), "--api-key", REALTIME_KEY, "--api-key-class", f"{BATCH_KEY}=batch",
                      "--carbon-forecast", str(forecast_path),
                      env={"LEANSERVE_API_KEY_CLASSES": f"{STANDARD_KEY}=standard"})
    yield s
    s.stop()


def client_of(server, key: str = REALTIME_KEY) -> openai.OpenAI:
    return openai_client(server, key)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_of(server)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def chat_body(model: str, prompt: str, max_tokens: int = 8, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def submit(client, lines: list[dict], window: str = "24h"):
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    source = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window=window)


def batch_lines(model: str, n: int, max_tokens: int) -> list[dict]:
    return [{"custom_id": f"line-{i}", "method": "POST", "url": CHAT,
             "body": chat_body(model, f"Tell me a fact about the number {i}.", max_tokens, ignore_eos=True)}
            for i in range(n)]


def wait_status(client, batch_id: str, statuses: tuple, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} not in {statuses} after {timeout}s: {batch}")


def e2e_count(server, service_class: str) -> float:
    return server.metrics().get(f'leanserve_e2e_request_latency_seconds_count{{priority="{service_class}"}}', 0)


def extra(obj) -> dict:
    """An extension field the openai types keep as an extra attribute."""
    return obj.model_extra["leanserve"]


# -- API keys and their default class -----------------------------------------------------------

def test_key_classes_parse():
    env = {"LEANSERVE_API_KEY_CLASSES": "a=batch, b==standard", "LEANSERVE_API_KEY": "c"}
    assert api_key_classes(["k1=realtime", "x=y=batch"], env) == {
        "k1": "realtime", "x=y": "batch", "a": "batch", "b=": "standard"}
    assert api_keys(["k1"], env) == ("k1", "c")  # unchanged: keys only
    for bad in ("nokey", "k=urgent", "=batch"):
        with pytest.raises(ValueError, match="KEY=CLASS"):
            api_key_classes([bad], {})
    auth = APIKeyAuth(("plain",), {"bulk": "batch"})
    assert auth.check("Bearer plain") is None and auth.check("Bearer bulk") == "batch"
    with pytest.raises(APIError):
        auth.check("Bearer other")
    assert APIKeyAuth(()).check(None) is None  # auth off


@pytest.mark.slow
def test_a_keys_class_is_the_default_and_an_explicit_priority_wins(server, model):
    def run(key: str, **extra) -> dict[str, float]:
        before = {c: e2e_count(server, c) for c in ("realtime", "standard", "batch")}
        client_of(server, key).chat.completions.create(**chat_body(model, "Say hi", 2, **extra))
        return {c: e2e_count(server, c) - before[c] for c in before}

    assert run(BATCH_KEY) == {"realtime": 0, "standard": 0, "batch": 1}
    assert run(STANDARD_KEY) == {"realtime": 0, "standard": 1, "batch": 0}  # from the environment
    assert run(REALTIME_KEY) == {"realtime": 1, "standard": 0, "batch": 0}
    assert run(BATCH_KEY, extra_body={"priority": "realtime"}) == {"realtime": 1, "standard": 0, "batch": 0}
    assert run(REALTIME_KEY, extra_body={"priority": "batch"}) == {"realtime": 0, "standard": 0, "batch": 1}
    with pytest.raises(openai.AuthenticationError):
        client_of(server, "wrong").models.list()


# -- realtime latency under a running batch ------------------------------------------------------

PROBES = itertools.count(100)  # numbers every TTFT probe's prompt apart (same token count)


def ttft(client, model: str, prompt: str) -> float:
    """Seconds to the first content chunk of a stream. Each probe's prompt is new, so none
    finds its prompt in the prefix cache from an earlier probe."""
    prompt = f"{next(PROBES)}. {prompt}"
    start = time.perf_counter()
    stream = client.chat.completions.create(**chat_body(model, prompt), stream=True)
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return time.perf_counter() - start
    finally:
        stream.close()
    raise AssertionError("no content streamed")


TTFT_BOUND = 3  # busy median / idle median
ROUNDS = 3  # a failed bound measures again, twice at most (the load of other processes moves)
GROUP = 4  # probes of each kind in a row
LINES, LINE_TOKENS = 8, 32  # a batch that fills the engine (max_batch_concurrency 8) for 32 steps


def running_batch(server, client, model: str):
    """Submits a batch of LINES lines and returns it once it fills the engine."""
    batch = submit(client, batch_lines(model, LINES, LINE_TOKENS))
    deadline = time.monotonic() + 60
    while server.metrics()["leanserve_running_sequences"] < 4:
        assert time.monotonic() < deadline, "the batch does not run"
        time.sleep(0.02)
    return batch


def finish(client, batch) -> None:
    """Waits for the batch to end and checks that every line was answered."""
    batch = wait_status(client, batch.id, ("completed", "failed", "cancelled"), timeout=300)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (LINES, 0)


def wait_engine_empty(server, timeout: float = 30) -> None:
    """Until the engine runs nothing (the probes' closed streams are aborted a moment later)."""
    deadline = time.monotonic() + timeout
    while server.metrics()["leanserve_running_sequences"] > 0:
        assert time.monotonic() < deadline, "the engine does not empty"
        time.sleep(0.02)


def ttft_round(server, client, model: str) -> tuple[list[float], list[float]]:
    """Idle and busy TTFT probes, alternated so that both meet the same load of other
    processes: GROUP prompts on the idle server, the same prompts under a batch that fills
    the engine, the batch runs out, and again with the next GROUP prompts."""
    idle, busy = [], []
    for group in (PROMPTS[i:i + GROUP] for i in range(0, len(PROMPTS), GROUP)):
        wait_engine_empty(server)
        idle += [ttft(client, model, p) for p in group]
        batch = running_batch(server, client, model)
        for p in group:
            assert server.metrics()["leanserve_running_sequences"] >= 4
            busy.append(ttft(client, model, p))
        # its lines started together and end together: none done yet, so it ran throughout
        # (a realtime request queued behind the batch would find it done)
        assert client.batches.retrieve(batch.id).request_counts.completed == 0, \
            "the batch ended before the realtime requests were answered"
        finish(client, batch)
    return idle, busy


@pytest.mark.slow
def test_realtime_ttft_under_a_running_batch(server, client, model, forecast_path):
    write_forecast(forecast_path, {0})  # batches start at once
    for p in PROMPTS[:2]:  # warm up: first calls pay for allocations, first batch steps too
        ttft(client, model, p)
    finish(client, submit(client, batch_lines(model, LINES, 2)))
    # A realtime arrival shares its steps with up to 8 batch decodes and may wait for the
    # step in flight; its prefill is never queued behind batch lines. Measured on a shared
    # 2-core machine: busy median 1.6x the idle one (0.31 s idle), and 1.45x with a CPU hog
    # on one core (0.98 s idle); behind the batch (FIFO) it would wait for all 32 steps.
    # No absolute time: both medians come from the same round, idle and busy probes
    # alternated, so other processes' load slows both; a round that misses the bound is
    # measured again (load moves), the bound itself stays.
    rounds = []
    for _ in range(ROUNDS):
        idle, busy = ttft_round(server, client, model)
        rounds.append((statistics.median(busy) / statistics.median(idle), idle, busy))
        print(f"round {len(rounds)}: busy/idle TTFT median {rounds[-1][0]:.2f} "
              f"(idle {statistics.median(idle):.3f} s, busy {statistics.median(busy):.3f} s)")
        if rounds[-1][0] <= TTFT_BOUND:
            break
    assert rounds[-1][0] <= TTFT_BOUND, rounds


# -- carbon-aware deferral -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_batch_waits_for_the_clean_hour(server, client, model, forecast_path):
    hour = write_forecast(forecast_path, {1})
    if hour + H - time.time() < 60:  # too close to the next hour for the "not before" check
        hour = write_forecast(forecast_path, {2}) + H
    ran_before = e2e_count(server, "batch")
    batch = submit(client, batch_lines(model, 3, 8))
    assert extra(batch) is None  # not planned before its input is validated
    batch = wait_status(client, batch.id, ("in_progress", "failed"), timeout=30)
    plan = extra(batch)
    assert batch.status == "in_progress" and plan["scheduled_start_at"] == hour + H
    assert plan["carbon_intensity_at_once_g_per_kwh"] == 500 and plan["carbon_intensity_scheduled_g_per_kwh"] == 50
    assert plan["estimated_carbon_grams_saved"] > 0 and plan["estimated_tokens"] >= 3 * 8
    assert plan["joules_per_token"] > 0 and plan["joules_per_token_source"] in ("measured", "default")
    assert batch.metadata is None  # the user's field stays the user's
    time.sleep(3)  # the worker polls every second: it would have started by now
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "in_progress" and batch.request_counts.completed == 0
    assert e2e_count(server, "batch") == ran_before
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait_status(client, batch.id, ("cancelled",), timeout=30)
    assert batch.output_file_id is None and e2e_count(server, "batch") == ran_before


@pytest.mark.slow
def test_a_batch_starts_at_once_when_now_is_clean_or_the_window_is_too_short(server, client, model,
                                                                            forecast_path):
    write_forecast(forecast_path, {0})
    started = time.time()
    batch = wait_status(client, submit(client, batch_lines(model, 2, 4)).id, ("completed", "failed"), 60)
    plan = extra(batch)
    assert batch.status == "completed" and batch.request_counts.completed == 2
    assert started - 1 <= plan["scheduled_start_at"] <= batch.in_progress_at + 1
    assert plan["estimated_carbon_grams_saved"] == 0

    write_forecast(forecast_path, {2})  # clean in two hours, but the window is one hour
    batch = submit(client, batch_lines(model, 2, 4), window="1h")
    assert batch.expires_at == batch.created_at + H
    batch = wait_status(client, batch.id, ("completed", "failed"), 60)
    assert batch.status == "completed" and extra(batch)["estimated_carbon_grams_saved"] == 0
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        submit(client, batch_lines(model, 1, 4), window="2d")


def test_batch_cli_shows_the_scheduled_start():
    batch = openai.types.Batch.model_validate({
        "id": "batch_x", "object": "batch", "endpoint": CHAT, "input_file_id": "file-x", "completion_window": "24h",
        "status": "in_progress", "created_at": 0, "request_counts": {"total": 4, "completed": 0, "failed": 0},
        "leanserve": {"scheduled_start_at": 1_767_268_800, "estimated_carbon_grams_saved": 0.0421}})
    assert "scheduled start: 2026-01-01 12:00:00Z  (est. 0.0421 g CO2e saved)" in batch_cli.summary(batch)
