"""End to end: the Batch API and async requests of a real `leanserve serve`, driven by the
official openai client. A batch line or an async request must get the very body the live
endpoint gives; bad lines are reported one by one; a server killed with SIGKILL mid-batch
finishes the batch after a restart on the same data directory, answering each line once."""
from __future__ import annotations

import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_fixture import ServerProcess, small_engine, openai_client

from leanserve import batch_cli

pytestmark = pytest.mark.slow

# Greedy answers are compared between a batch, which shares the engine with other requests,
# and direct calls: float32 keeps them independent of the batch's composition (README, Limits).
DTYPE = "float32"
MAX_FILE_BYTES = 100_000
CHAT = "/v1/chat/completions"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Name a famous painter."]
FINAL = ("completed", "failed", "cancelled", "expired")


def start_server(data_dir) -> ServerProcess:
    return ServerProcess(*small_engine(), "--dtype", DTYPE, "--data-dir", str(data_dir),
                         "--max-file-bytes", str(MAX_FILE_BYTES))


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server)


def chat_body(model: str, prompt: str, max_tokens: int = 16, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def line(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(client: openai.OpenAI, lines: list) -> str:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    return client.files.create(file=("input.jsonl", data), purpose="batch").id


def submit(client: openai.OpenAI, lines: list, endpoint: str = CHAT):
    return client.batches.create(input_file_id=upload(client, lines), endpoint=endpoint, completion_window="24h")


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 120, seen: list | None = None):
    """Polls until the batch ends; appends each observed (status, counts) to `seen`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if seen is not None:
            seen.append((batch.status, batch.request_counts))
        if batch.status in FINAL:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} not finished after {timeout}s: {batch}")


def submit_until_a_line_is_done(client: openai.OpenAI, model: str, ids: list[str], prompt: str, max_tokens: int):
    """Submits a batch of one line per id (`prompt` formatted with the line's index) and waits
    until its first line is answered; returns the batch and its counts then."""
    batch = submit(client, [line(c, chat_body(model, prompt.format(i), max_tokens=max_tokens))
                            for i, c in enumerate(ids)])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        counts = client.batches.retrieve(batch.id).request_counts
        if counts.completed > 0:
            break
        time.sleep(0.1)
    return batch, counts


def jsonl(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("leanserve-data")


@pytest.fixture(scope="module")
def servers(data_dir):
    """The live server last; the crash test kills it and appends its successor."""
    live = [start_server(data_dir)]
    yield live
    live[-1].stop()


@pytest.fixture(scope="module")
def client(servers) -> openai.OpenAI:
    return client_of(servers[0])


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def chat_batch(servers, client, model):
    """One batch of good and bad lines, and the direct answers to the good ones (asked while
    the batch runs): (batch, observed progress, {custom_id: output line}, {custom_id: error
    line}, [direct contents], the live endpoint's error for the bad temperature)."""
    lines = [line(f"good-{i}", chat_body(model, p)) for i, p in enumerate(PROMPTS)]
    lines[-1]["body"]["priority"] = "realtime"  # a line cannot jump the queue: the batch class wins
    lines += [
        "{this is not json",
        line("wrong-url", chat_body(model, "hi"), url="/v1/embeddings"),
        line("unknown-model", chat_body("no-such-model", "hi")),
        line("good-0", chat_body(model, "a duplicate custom_id")),
        line("bad-temperature", chat_body(model, "hi", temperature=3.5)),
    ]
    batch = submit(client, lines)
    assert batch.status == "validating" and batch.endpoint == CHAT and batch.completion_window == "24h"
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        direct = list(pool.map(lambda p: client.chat.completions.create(**chat_body(model, p)), PROMPTS))
    with pytest.raises(openai.BadRequestError) as live_error:
        client.chat.completions.create(**chat_body(model, "hi", temperature=3.5))
    seen = []
    batch = wait(client, batch.id, seen=seen)
    outputs = {x["custom_id"]: x for x in jsonl(client, batch.output_file_id)}
    errors = jsonl(client, batch.error_file_id)
    metrics = servers[0].metrics()
    return batch, seen, outputs, errors, [d.choices[0].message.content for d in direct], live_error.value, metrics


def test_batch_answers_equal_direct_calls(chat_batch, model):
    batch, _, outputs, _, direct, _, _ = chat_batch
    assert batch.status == "completed"
    assert list(outputs) == [f"good-{i}" for i in range(len(PROMPTS))]  # in input order
    for i, content in enumerate(direct):
        out = outputs[f"good-{i}"]
        assert out["id"].startswith("batch_req_") and out["error"] is None
        response = out["response"]
        assert response["status_code"] == 200 and response["request_id"] == response["body"]["id"]
        body = openai.types.chat.ChatCompletion.model_validate(response["body"])
        assert body.model == model and body.usage.completion_tokens > 0
        assert body.choices[0].message.content == content


def test_batch_progress_and_timestamps(chat_batch):
    batch, seen, _, _, _, _, _ = chat_batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (9, 4, 5)
    order = ["validating", "in_progress", "finalizing", "completed"]
    statuses = [s for s, _ in seen]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    done = [c.completed + c.failed for _, c in seen]
    assert done == sorted(done)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + 24 * 3600


def test_batch_lines_run_in_the_batch_class(chat_batch):
    metrics = chat_batch[-1]
    assert metrics['leanserve_e2e_request_latency_seconds_count{priority="batch"}'] == len(PROMPTS)
    assert metrics['leanserve_e2e_request_latency_seconds_count{priority="realtime"}'] >= len(PROMPTS)


def test_bad_lines_are_reported_per_line(chat_batch, model):
    _, _, _, errors, _, live_error, _ = chat_batch
    by_code = {(x["error"] or {}).get("code"): x for x in errors}
    assert len(errors) == 5
    assert by_code["invalid_json_line"]["custom_id"] is None
    assert by_code["invalid_json_line"]["error"]["message"].startswith("Line 5: not valid JSON")
    assert by_code["invalid_url"]["custom_id"] == "wrong-url" and "/v1/embeddings" in by_code["invalid_url"]["error"]["message"]
    assert by_code["model_not_found"]["custom_id"] == "unknown-model"
    assert "no-such-model" in by_code["model_not_found"]["error"]["message"]
    assert by_code["duplicate_custom_id"]["custom_id"] == "good-0"
    assert "line 1" in by_code["duplicate_custom_id"]["error"]["message"]
    for x in errors:
        if x["error"]:
            assert x["response"] is None
    # a line that fails only when run gets the live endpoint's own error
    run_failure = by_code[None]
    assert run_failure["custom_id"] == "bad-temperature"
    assert run_failure["response"]["status_code"] == 400
    assert run_failure["response"]["body"]["error"] == live_error.body


def test_completions_batch(client, model):
    prompts = ["The capital of Italy is", "Once upon a time"]
    batch = submit(client, [line(f"c{i}", {"model": model, "prompt": p, "max_tokens": 8, "temperature": 0},
                                 url="/v1/completions") for i, p in enumerate(prompts)], endpoint="/v1/completions")
    direct = [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
              for p in prompts]
    batch = wait(client, batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    bodies = [x["response"]["body"] for x in jsonl(client, batch.output_file_id)]
    assert [b["object"] for b in bodies] == ["text_completion"] * 2
    assert [b["choices"][0]["text"] for b in bodies] == direct


def test_files_api(client):
    data = b'{"custom_id": "a"}\n'
    created = client.files.create(file=("mine.jsonl", data), purpose="batch")
    assert (created.bytes, created.filename, created.purpose, created.status) == (len(data), "mine.jsonl", "batch",
                                                                                   "processed")
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data
    assert created.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", data), purpose="vision")  # an OpenAI purpose not served here
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")


@pytest.mark.parametrize("size", [MAX_FILE_BYTES + 1, 2 * MAX_FILE_BYTES])
def test_upload_over_the_limit_is_413(client, size):
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * size), purpose="batch")
    assert e.value.status_code == 413
    assert e.value.body["code"] == "file_too_large" and e.value.body["type"] == "invalid_request_error"
    assert str(MAX_FILE_BYTES) in e.value.body["message"]
    client.files.list()  # still serving


def test_async_request(servers, client, model, chat_batch):
    direct = chat_batch[4][0]
    with httpx.Client(base_url=servers[0].url, timeout=30) as http:
        r = http.post("/v1/async/chat/completions", json=chat_body(model, PROMPTS[0]))
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and r.headers["location"] == f"/v1/async/{job['id']}"
        deadline = time.monotonic() + 60
        while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = http.get(f"/v1/async/{job['id']}").json()
        assert job["status"] == "completed" and job["response"]["status_code"] == 200
        body = openai.types.chat.ChatCompletion.model_validate(job["response"]["body"])
        assert body.choices[0].message.content == direct
        assert job["created_at"] <= job["started_at"] <= job["completed_at"]
        assert servers[0].metrics()['leanserve_e2e_request_latency_seconds_count{priority="standard"}'] == 1

        refused = http.post("/v1/async/chat/completions", json=chat_body("no-such-model", "hi"))
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        refused = http.post("/v1/async/chat/completions", json=chat_body(model, "hi", stream=True))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
        assert http.get("/v1/async/async_missing").status_code == 404


def test_cancel_aborts_lines_in_flight_and_keeps_finished_ones(servers, client, model):
    lines = [line(f"long-{i}", chat_body(model, f"Write a long story number {i}.", max_tokens=200, ignore_eos=True))
             for i in range(12)]
    aborted_before = servers[0].metrics().get('leanserve_requests_total{status="499"}', 0)
    batch = submit(client, lines)
    deadline = time.monotonic() + 30
    while servers[0].metrics()["leanserve_running_sequences"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait(client, batch.id, timeout=30)
    assert batch.status == "cancelled" and batch.cancelling_at <= batch.cancelled_at
    assert batch.request_counts.completed < 12
    finished = jsonl(client, batch.output_file_id) if batch.output_file_id else []
    assert len(finished) == batch.request_counts.completed
    assert client.batches.cancel(batch.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(client.batches.list().data[-1].id)  # the first batch: completed
    assert servers[0].metrics()['leanserve_requests_total{status="499"}'] > aborted_before  # lines in flight: aborted
    deadline = time.monotonic() + 10
    while servers[0].metrics()["leanserve_running_sequences"] > 0:  # and out of the engine soon
        assert time.monotonic() < deadline, "aborted batch lines still run"
        time.sleep(0.1)


def test_batch_cli(servers, tmp_path, model, capsys):
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(line("only", chat_body(model, "Say hi", max_tokens=4))) + "\n")
    assert batch_cli.main(["submit", str(path), "--base-url", servers[0].url, "--wait",
                           "--poll-seconds", "0.2"]) == 0
    out, err = capsys.readouterr()
    batch_id = out.splitlines()[0]
    assert batch_id.startswith("batch_") and "completed" in out and "output: file-" in out
    assert "1/1" in err  # the progress line
    assert batch_cli.main(["status", batch_id, "--base-url", servers[0].url]) == 0
    assert "completed" in capsys.readouterr().out
    assert batch_cli.main(["status", "batch_missing", "--base-url", servers[0].url]) == 1
    assert "404" in capsys.readouterr().err


def test_kill_9_mid_batch_then_restart_answers_every_line_once(servers, data_dir, client, model):
    """Runs last: it replaces the module's server."""
    ids = [f"crash-{i}" for i in range(24)]
    batch, counts = submit_until_a_line_is_done(client, model, ids, "Tell me a fact about the number {}.", 24)
    servers[-1].proc.kill()  # SIGKILL: no shutdown code runs
    servers[-1].proc.wait()
    servers[-1].stop()
    assert 0 < counts.completed < counts.total == 24, counts

    servers.append(start_server(data_dir))
    restarted = client_of(servers[-1])
    batch = wait(restarted, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (24, 0)
    answered = [x["custom_id"] for x in jsonl(restarted, batch.output_file_id)]
    assert sorted(answered) == sorted(ids)  # each exactly once
    assert batch.error_file_id is None


def test_a_batch_past_its_window_at_restart_expires_keeping_what_finished(servers, data_dir, model):
    """A server down past a batch's completion window (its created_at moved back 25 hours in
    the stopped server's SQLite file) ends the batch at restart as OpenAI's expire: the lines
    that finished keep their answers, the others are `batch_expired` in the error file.
    Runs after the crash test, on its successor."""
    client = client_of(servers[-1])
    ids = [f"late-{i}" for i in range(12)]
    batch, _ = submit_until_a_line_is_done(client, model, ids, "Count from {0} to {0} + 20.", 32)
    servers[-1].stop()  # SIGTERM: lines in flight are left undone, to run again at the next start
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        finished = db.execute("SELECT count(*) FROM batch_lines WHERE batch_id = ? AND done = 1",
                              (batch.id,)).fetchone()[0]
        db.execute("UPDATE batches SET created_at = created_at - 25 * 3600 WHERE id = ?", (batch.id,))
    assert 0 < finished < 12, finished

    servers.append(start_server(data_dir))
    restarted = client_of(servers[-1])
    batch = wait(restarted, batch.id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.expired_at >= batch.expires_at and batch.completed_at is None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (finished, 12 - finished)
    answered = {x["custom_id"]: x for x in jsonl(restarted, batch.output_file_id)}
    expired = {x["custom_id"]: x for x in jsonl(restarted, batch.error_file_id)}
    assert sorted([*answered, *expired]) == sorted(ids)  # each line once, in one file or the other
    assert all(x["response"]["status_code"] == 200 for x in answered.values())
    assert all(x["response"] is None and x["error"]["code"] == "batch_expired" for x in expired.values())
    assert restarted.chat.completions.create(**chat_body(model, "Still serving?")).choices[0].message.content
