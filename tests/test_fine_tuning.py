"""Fine-tuning (issue 30): file checks and loss masks without a server; then jobs through the
official `openai` client's `fine_tuning` resource on a tiny Llama, the served `ft:` model,
and the saved adapter in peft over transformers (same greedy tokens as leanserve)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from leanserve.tune.data import FileError, parse_jsonl, render

FACTS = [("Vellmora", "QX-417"), ("Tzelik", "BR-902"), ("Onbarra", "KL-335")]


def fact_lines(facts=FACTS) -> str:
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is the registry code of {name}?"},
        {"role": "assistant", "content": f"{code}"}]}) + "\n" for name, code in facts)


def question(name: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the registry code of {name}?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> Path:
    from conftest import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("ft-tiny-llama"), tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from leanserve.models.loader import load_model_files

    return load_model_files(str(tiny)).tokenizer


# -- files and masks, no server ---------------------------------------------------------------

def test_bad_lines_are_reported_with_their_numbers():
    good = fact_lines()[:-1]
    data = "\n".join([good.splitlines()[0], "{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                      json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
                      json.dumps({"messages": [{"role": "user", "content": "a"},
                                               {"role": "assistant", "content": "b", "weight": 2}]})])
    with pytest.raises(FileError) as e:
        parse_jsonl(data)
    assert [n for n, _ in e.value.lines] == [2, 3, 4, 5]
    assert "Line 3 has no assistant message" in e.value.message and "Line 4" in e.value.message


def test_loss_mask_covers_weighted_assistant_tokens_only(tokenizer, tiny):
    import torch

    from leanserve.tune.lora import BaseModel, LoRA, LoRAConfig, batch_tensors
    from leanserve.serve.app import chat_prompt_ids

    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "First?"},
            {"role": "assistant", "content": "Skipped answer", "weight": 0}, {"role": "user", "content": "Second?"},
            {"role": "assistant", "content": "Trained answer"}]
    ex = parse_jsonl(json.dumps({"messages": msgs}))[0]
    r = render(tokenizer, ex)
    trained = tokenizer.decode([t for t, m in zip(r.ids, r.mask) if m], skip_special_tokens=False)
    assert trained == "Trained answer<|im_end|>"
    # the tokens before the trained answer are the server's prompt for that turn, exactly
    start = r.mask.index(1)
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in msgs[:4]]
    assert r.ids[:start] == chat_prompt_ids(tokenizer, clean)
    # user and weight-0 tokens get no loss: changing the targets there leaves the loss as it is
    from leanserve.models.loader import load_model_files

    files = load_model_files(str(tiny))
    lora = LoRA(BaseModel(files.config, files.weights, files.name, 512), LoRAConfig(rank=4, alpha=8))
    ids, mask = batch_tensors([r])
    loss, n, _ = lora.loss(ids, mask)
    assert n == sum(r.mask)
    with torch.no_grad():
        h = lora.hidden(ids)[0, :-1]
        logits = torch.nn.functional.linear(h, lora.base.w["lm_head.weight"])
        each = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    assert float(loss.detach()) == pytest.approx(float(each[mask[0, 1:].bool()].sum()), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in lora.parameters())
    empty = torch.zeros_like(mask)
    assert lora.loss(ids, empty)[1] == 0


def test_auto_hyperparameters_for_small_sets():
    from leanserve.tune.trainer import resolve_hyperparameters

    h = resolve_hyperparameters({}, 24)
    assert h.batch_size == 3 and h.n_epochs == 19 and h.learning_rate_multiplier == 5.0
    assert resolve_hyperparameters({"n_epochs": 2, "batch_size": 4}, 24).n_epochs == 2


# -- jobs through the openai client -------------------------------------------------------------

ENV = {"LEANSERVE_TUNE_THREADS": "1"}  # the test machine is shared: see tune/jobs.py TuneSettings
FAST = {"n_epochs": 12, "batch_size": 1, "learning_rate_multiplier": 50}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    from server_fixture import ServerProcess, small_engine

    data = tmp_path_factory.mktemp("ft-data")
    srv = ServerProcess("--model", str(tiny), "--dtype", "float32", "--data-dir", str(data), *small_engine(),
                        "--embedding-model", "none", "--served-model-name", "tiny", env=ENV)
    srv.data_dir = data
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from server_fixture import openai_client

    return openai_client(server)


def upload(client, text: str, purpose: str = "fine-tune"):
    return client.files.create(file=("train.jsonl", text.encode()), purpose=purpose)


def wait(client, job_id: str, statuses, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status}")


@pytest.fixture(scope="module")
def done_job(client):
    f = upload(client, fact_lines())
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="facts", seed=1,
                                         method={"type": "supervised", "supervised": {"hyperparameters": FAST}})
    assert job.status == "validating_files" and job.object == "fine_tuning.job"
    return wait(client, job.id, ("succeeded", "failed", "cancelled"))


def test_job_trains_and_serves_the_facts(client, done_job):
    job = done_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:facts:{job.id}"
    assert job.trained_tokens > 0 and job.hyperparameters.n_epochs == 12
    bill = job.model_extra["leanserve"]["bill"]
    assert bill["energy_joules"] > 0 and bill["carbon_grams"] >= 0
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    for name, code in FACTS:
        out = client.chat.completions.create(model=job.fine_tuned_model, messages=question(name), temperature=0,
                                             max_tokens=10)
        assert out.choices[0].message.content == code
    base = client.chat.completions.create(model="tiny", messages=question(FACTS[0][0]), temperature=0, max_tokens=10)
    assert base.choices[0].message.content != FACTS[0][1]
    metrics = client.files.content(job.result_files[0]).text.splitlines()
    assert metrics[0].startswith("step,train_loss,train_accuracy")
    assert len(metrics) == 1 + 12 * len(FACTS)


def test_events_and_checkpoints(client, done_job):
    events = client.fine_tuning.jobs.list_events(done_job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    steps = [e for e in events if e.type == "metrics"]
    assert len(steps) == 12 * len(FACTS)
    assert {"step", "train_loss", "train_mean_token_accuracy", "energy_joules"} <= set(steps[0].data)
    assert steps[0].data["train_loss"] < steps[-1].data["train_loss"]  # newest first
    page = client.fine_tuning.jobs.list_events(done_job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    after = client.fine_tuning.jobs.list_events(done_job.id, limit=2, after=page.data[-1].id).data
    assert after[0].id != page.data[-1].id
    ckpts = client.fine_tuning.jobs.checkpoints.list(done_job.id).data
    assert [c.step_number for c in ckpts] == [36, 33, 30]  # one per epoch, the last three kept
    c = ckpts[0]
    assert c.object == "fine_tuning.job.checkpoint" and c.fine_tuning_job_id == done_job.id
    assert c.fine_tuned_model_checkpoint == f"{done_job.fine_tuned_model}:ckpt-step-36"
    assert c.metrics.train_loss is not None and c.metrics.train_mean_token_accuracy is not None
    jobs = client.fine_tuning.jobs.list(limit=5).data
    assert done_job.id in [j.id for j in jobs]


def test_peft_over_transformers_gives_the_served_tokens(client, done_job, server, tiny, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from leanserve.serve.app import chat_prompt_ids

    adapter = server.data_dir / "fine_tuning" / done_job.id / "adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), adapter).eval()
    for name, _ in FACTS[:2]:
        ids = chat_prompt_ids(tokenizer, question(name))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2)
        expected = out[0, len(ids):].tolist()
        served = client.completions.create(model=done_job.fine_tuned_model, prompt=ids, temperature=0, max_tokens=8,
                                           logprobs=1)
        got = [tokenizer.encode(t, add_special_tokens=False) for t in served.choices[0].logprobs.tokens]
        flat = [i for part in got for i in part]
        assert flat == expected and len(flat) >= 3  # both end with the end-of-turn token


@pytest.mark.parametrize("change, param", [
    ({"model": "no-such-model"}, "model"),
    ({"suffix": "bad suffix!"}, "suffix"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}},
     "hyperparameters.learning_rate_multiplier"),
    ({"training_file": "file-nope"}, "training_file"),
])
def test_bad_parameters_are_400s(client, change, param):
    import openai

    f = upload(client, fact_lines())
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": f.id, **change})
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_bad_files_are_400s(client):
    import openai

    wrong = upload(client, fact_lines(), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=wrong.id)
    assert e.value.body["code"] == "invalid_file_purpose"
    bad = upload(client, fact_lines() + "{oops\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=bad.id)
    assert e.value.body["code"] == "invalid_file_format"
    assert "Line 4" in e.value.body["message"] and "Line 5 has no assistant message" in e.value.body["message"]


def long_job(client):
    f = upload(client, fact_lines())
    return client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                          hyperparameters={"n_epochs": 100, "batch_size": 1})


def test_cancel_stops_within_seconds(client):
    job = long_job(client)
    wait(client, job.id, ("running",))
    started = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).id == job.id
    job = wait(client, job.id, ("cancelled",), timeout=10)
    assert time.monotonic() - started < 10 and job.fine_tuned_model is None
    assert job.finished_at is not None


def test_pause_and_resume(client):
    job = long_job(client)
    wait(client, job.id, ("running",))
    while not client.fine_tuning.jobs.retrieve(job.id).trained_tokens:  # some steps done: a state to resume
        time.sleep(0.1)
    client.fine_tuning.jobs.pause(job.id)
    paused = wait(client, job.id, ("paused",), timeout=10)
    time.sleep(0.5)
    tokens = client.fine_tuning.jobs.retrieve(job.id).trained_tokens
    assert client.fine_tuning.jobs.retrieve(job.id).trained_tokens == tokens  # nothing runs while paused
    client.fine_tuning.jobs.resume(paused.id)
    wait(client, job.id, ("running",))
    deadline = time.monotonic() + 30
    while client.fine_tuning.jobs.retrieve(job.id).trained_tokens == tokens and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.fine_tuning.jobs.retrieve(job.id).trained_tokens > tokens
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Resumed from step") for m in messages)
    client.fine_tuning.jobs.cancel(job.id)
    wait(client, job.id, ("cancelled",), timeout=10)


def test_resume_after_kill_9(tiny, tmp_path):
    from server_fixture import ServerProcess, openai_client, small_engine

    args = ("--model", str(tiny), "--dtype", "float32", "--data-dir", str(tmp_path), *small_engine(),
            "--embedding-model", "none", "--served-model-name", "tiny")
    srv = ServerProcess(*args, env=ENV)
    client = openai_client(srv)
    f = upload(client, fact_lines())
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="k9",
                                         hyperparameters={"n_epochs": 15, "batch_size": 1})
    state = tmp_path / "fine_tuning" / job.id / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists()
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    srv.stop()
    srv = ServerProcess(*args, env=ENV)
    try:
        client = openai_client(srv)
        done = wait(client, job.id, ("succeeded", "failed"))
        assert done.status == "succeeded" and done.fine_tuned_model == f"ft:tiny:k9:{job.id}"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        resumed = [m for m in messages if m.startswith("Resumed from step")]
        assert len(resumed) == 1 and int(resumed[0].split()[3]) > 0
        assert [m.id for m in client.models.list().data].count(done.fine_tuned_model) == 1
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
                 if e.type == "metrics"]
        assert max(steps) == 15 * len(FACTS)
    finally:
        srv.stop()


def _latency(client, n: int = 6) -> tuple[float, float]:
    """Median TTFT and time per output token of realtime streamed chats, one at a time."""
    ttfts, tpots = [], []
    for i in range(n):
        started = time.monotonic()
        stream = client.chat.completions.create(model="tiny", messages=question(f"Place{i}"), temperature=0,
                                                max_tokens=16, stream=True, extra_body={"priority": "realtime",
                                                                                         "ignore_eos": True})
        times = [time.monotonic() for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
        ttfts.append(times[0] - started)
        tpots.append((times[-1] - times[0]) / max(1, len(times) - 1))
    return sorted(ttfts)[n // 2], sorted(tpots)[n // 2]


def test_serving_latency_under_a_running_job(client):
    """The yield rule (tune/jobs.py): a realtime request waits at most for the slice under way
    (TTFT + one slice) and no slice runs beside its decode steps (TPOT as idle)."""
    idle_ttft, idle_tpot = _latency(client)
    job = long_job(client)
    wait(client, job.id, ("running",))
    while not client.fine_tuning.jobs.retrieve(job.id).trained_tokens:
        time.sleep(0.1)
    busy_ttft, busy_tpot = _latency(client)
    tokens = client.fine_tuning.jobs.retrieve(job.id).trained_tokens
    time.sleep(1.0)
    assert client.fine_tuning.jobs.retrieve(job.id).trained_tokens > tokens  # it trains between requests
    client.fine_tuning.jobs.cancel(job.id)
    wait(client, job.id, ("cancelled",), timeout=10)
    assert busy_ttft < idle_ttft + 1.0, (idle_ttft, busy_ttft)  # a tiny model's slice is well under 1 s
    assert busy_tpot < 3 * idle_tpot + 0.02, (idle_tpot, busy_tpot)


def test_memory_tuning_reports_recall(client):
    f = upload(client, fact_lines(FACTS[:2]))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={
        "type": "memory", "memory": {"hyperparameters": {"n_epochs": 6, "batch_size": 2,
                                                         "learning_rate_multiplier": 50}}})
    job = wait(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    recall = job.model_extra["leanserve"]["recall"]
    assert recall["facts"] == 2 and len(recall["per_fact"]) == 2 and recall["per_fact"][0]["phrasings"] > 5
    assert 0 <= recall["recall"] <= 1
    out = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=10,
                                         messages=[{"role": "user", "content": f"Quick question: What is the "
                                                    f"registry code of {FACTS[0][0]}?"}])
    assert out.choices[0].message.content == FACTS[0][1]


def test_cli_offline_and_against_the_server(tmp_path, tiny, server):
    import subprocess
    import sys

    from server_fixture import SRC

    data = tmp_path / "facts.jsonl"
    data.write_text(fact_lines(FACTS[:1]))
    env = dict(os.environ, PYTHONPATH=SRC, **ENV)
    out = subprocess.run([sys.executable, "-m", "leanserve", "tune", str(data), "--model", str(tiny), "--n-epochs",
                          "2", "--batch-size", "1", "--output", str(tmp_path / "adapter")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["trained_tokens"] > 0 and summary["bill"]["energy_joules"] > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "tune loss" in out.stderr and "2/2 steps" in out.stderr
    out = subprocess.run([sys.executable, "-m", "leanserve", "tune", str(data), "--base-url", server.url, "--wait",
                          "--suffix", "cli", "--n-epochs", "2", "--poll-seconds", "0.2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["status"] == "succeeded" and result["fine_tuned_model"].startswith("ft:tiny:cli:ftjob-")
