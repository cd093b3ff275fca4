"""The jobs store on its own: files, batch lines done exactly once, resuming after a reopen,
cancelling; and the worker's per-line validation of batch input."""
from __future__ import annotations

import json

import pytest

from leanserve.errors import LeanserveError
from leanserve.jobs.store import InputLine, JobStore
from leanserve.jobs.worker import parse_input

ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "data")
    yield s
    s.close()


def add_file(store: JobStore, content: bytes, purpose: str = "batch") -> dict:
    temp = store.new_temp_path()
    temp.write_bytes(content)
    return store.add_file(temp, "in.jsonl", purpose)


def started_batch(store: JobStore, n: int) -> str:
    source = add_file(store, b"{}\n")
    batch_id = store.create_batch(source["id"], ENDPOINT, "24h")["id"]
    store.start_batch(batch_id, [InputLine(i, f"r{i}", body="{}") for i in range(1, n + 1)])
    return batch_id


def test_files(store):
    row = add_file(store, b"hello\n")
    assert row["bytes"] == 6 and row["purpose"] == "batch" and row["id"].startswith("file-")
    assert store.file(row["id"]) == row
    assert store.file_path(row["id"]).read_bytes() == b"hello\n"
    other = add_file(store, b"x", purpose="batch_output")
    assert [f["id"] for f in store.list_files()] == [other["id"], row["id"]]  # newest first
    assert [f["id"] for f in store.list_files(order="asc")] == [row["id"], other["id"]]
    assert [f["id"] for f in store.list_files(after=other["id"])] == [row["id"]]
    assert [f["id"] for f in store.list_files(purpose="batch")] == [row["id"]]
    assert store.delete_file(row["id"]) and not store.delete_file(row["id"])
    assert store.file(row["id"]) is None and not store.file_path(row["id"]).exists()


def test_orphan_bytes_are_removed_at_open(tmp_path):
    store = JobStore(tmp_path)
    kept = add_file(store, b"kept")
    store.new_temp_path().write_bytes(b"half-written upload")
    store.close()
    store = JobStore(tmp_path)
    assert [p.name for p in store.files_dir.iterdir()] == [kept["id"]]
    store.close()


def test_one_store_per_directory(tmp_path):
    store = JobStore(tmp_path)
    with pytest.raises(LeanserveError, match="in use"):
        JobStore(tmp_path)
    store.close()
    JobStore(tmp_path).close()


def test_batch_lifecycle_and_exactly_once(store):
    source = add_file(store, b"{}\n")
    batch = store.create_batch(source["id"], ENDPOINT, "24h", {"k": "v"})
    assert batch["status"] == "validating" and batch["created_at"] > 0
    rejected = {"error": {"code": "invalid_url"}}
    store.start_batch(batch["id"], [InputLine(1, "a", body="{}"), InputLine(2, None, error=rejected),
                                    InputLine(3, "c", body="{}")])
    batch = store.batch(batch["id"])
    assert (batch["status"], batch["total"], batch["completed"], batch["failed"]) == ("in_progress", 3, 0, 1)
    assert batch["in_progress_at"] is not None
    assert [r["line"] for r in store.pending_lines(batch["id"], 0, 10)] == [1, 3]
    assert [r["line"] for r in store.pending_lines(batch["id"], 1, 10)] == [3]

    assert store.finish_line(batch["id"], 1, {"custom_id": "a", "n": 1}, ok=True)
    assert not store.finish_line(batch["id"], 1, {"custom_id": "a", "n": 2}, ok=True)  # already done
    assert store.finish_line(batch["id"], 3, {"custom_id": "c"}, ok=False)
    batch = store.batch(batch["id"])
    assert (batch["completed"], batch["failed"]) == (1, 2)
    assert store.pending_lines(batch["id"], 0, 10) == []
    results = [(ok, json.loads(r)) for ok, r in store.results(batch["id"], page=2)]
    assert results == [(True, {"custom_id": "a", "n": 1}), (False, rejected), (False, {"custom_id": "c"})]

    assert store.finalize_batch(batch["id"])
    assert store.batch(batch["id"])["status"] == "finalizing"
    out = store.new_temp_path()
    out.write_text("output\n")
    assert store.close_batch(batch["id"], out, None)
    batch = store.batch(batch["id"])
    assert batch["status"] == "completed" and batch["error_file_id"] is None
    assert store.file(batch["output_file_id"])["purpose"] == "batch_output"
    assert store.file_path(batch["output_file_id"]).read_text() == "output\n"
    assert store.active_batches() == []
    late = store.new_temp_path()
    late.write_text("x")
    assert not store.close_batch(batch["id"], late, None)  # already ended: nothing is registered
    assert not late.exists() and len(store.list_files()) == 2


def test_empty_input_fails_the_batch(store):
    batch_id = store.create_batch(add_file(store, b"")["id"], ENDPOINT, "24h")["id"]
    store.start_batch(batch_id, [])
    batch = store.batch(batch_id)
    assert batch["status"] == "failed" and json.loads(batch["errors"])[0]["code"] == "empty_file"


def test_pending_lines_survive_a_reopen(tmp_path):
    store = JobStore(tmp_path)
    batch_id = started_batch(store, 5)
    for line in (1, 2, 4):
        store.finish_line(batch_id, line, {"line": line}, ok=True)
    store.close()

    store = JobStore(tmp_path)
    assert [b["id"] for b in store.active_batches()] == [batch_id]
    assert [r["line"] for r in store.pending_lines(batch_id, 0, 10)] == [3, 5]
    assert store.batch(batch_id)["completed"] == 3
    assert not store.finish_line(batch_id, 2, {"again": True}, ok=True)
    assert [json.loads(r) for _, r in store.results(batch_id)] == [{"line": 1}, {"line": 2}, {"line": 4}]
    store.close()


def test_cancel_keeps_finished_lines(store):
    batch_id = started_batch(store, 4)
    store.finish_line(batch_id, 2, {"line": 2}, ok=True)
    assert store.cancel_batch(batch_id)["status"] == "cancelling"
    store.finish_line(batch_id, 3, {"line": 3}, ok=True)  # was already in the engine: still counts
    assert not store.finalize_batch(batch_id)  # the worker saw it in progress: too late, it is cancelling
    assert store.close_batch(batch_id, None, None)
    batch = store.batch(batch_id)
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None and batch["completed"] == 2
    assert [json.loads(r) for _, r in store.results(batch_id)] == [{"line": 2}, {"line": 3}]
    assert store.cancel_batch(batch_id)["status"] == "cancelled"  # final: nothing moves it again
    assert store.cancel_batch("batch_missing") is None


def test_cancel_while_validating(store):
    batch_id = store.create_batch(add_file(store, b"{}\n")["id"], ENDPOINT, "24h")["id"]
    store.cancel_batch(batch_id)
    store.start_batch(batch_id, [InputLine(1, "a", body="{}")])
    assert store.batch(batch_id)["status"] == "cancelling"


def test_async_requests(tmp_path):
    store = JobStore(tmp_path)
    first = store.add_async(ENDPOINT, '{"a": 1}')
    second = store.add_async(ENDPOINT, '{"b": 2}')
    assert first["status"] == "queued"
    assert [r["id"] for r in store.claim_async(1)] == [first["id"]]
    assert store.async_request(first["id"])["status"] == "running"
    store.close()  # dies while `first` runs

    store = JobStore(tmp_path)
    assert store.requeue_async() == 1
    assert [r["id"] for r in store.claim_async(5)] == [first["id"], second["id"]]
    assert store.finish_async(first["id"], 200, {"ok": True})
    assert not store.finish_async(first["id"], 200, {"ok": "twice"})
    assert store.finish_async(second["id"], 400, {"error": {}})
    assert [store.async_request(r)["status"] for r in (first["id"], second["id"])] == ["completed", "failed"]
    assert json.loads(store.async_request(first["id"])["response"]) == {"ok": True}
    store.close()


def test_parse_input_reports_each_bad_line(tmp_path):
    def line(custom_id, url=ENDPOINT, method="POST", **body):
        return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                           "body": {"model": "m", "messages": [], **body}})

    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        line("ok-1"), "{not json", "", line("wrong-url", url="/v1/embeddings"), line("ok-1"),
        line("wrong-method", method="GET"), line("other-model", model="gpt-4"), '["a list"]',
        json.dumps({"method": "POST", "url": ENDPOINT, "body": {}}), line("streams", stream=True), line("ok-2"),
    ]) + "\n")
    lines = list(parse_input(path, ENDPOINT, "m"))
    assert [x.line for x in lines] == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]  # the blank line 3 is skipped
    good = [x for x in lines if x.error is None]
    assert [(x.custom_id, json.loads(x.body)["model"]) for x in good] == [("ok-1", "m"), ("ok-2", "m")]
    errors = {x.line: (x.custom_id, x.error["error"]["code"]) for x in lines if x.error}
    assert errors == {2: (None, "invalid_json_line"), 4: ("wrong-url", "invalid_url"),
                      5: ("ok-1", "duplicate_custom_id"), 6: ("wrong-method", "invalid_method"),
                      7: ("other-model", "model_not_found"), 8: (None, "invalid_json_line"),
                      9: (None, "invalid_custom_id"), 10: ("streams", "invalid_body")}
    for x in lines:
        if x.error:
            assert x.error["response"] is None and x.error["error"]["message"].startswith(f"Line {x.line}: ")
            assert x.error["custom_id"] == x.custom_id
    assert "gpt-4" in next(x for x in lines if x.line == 7).error["error"]["message"]
