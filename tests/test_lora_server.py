"""LoRA adapters end to end: a real `leanserve serve` with the built-in model and adapters,
driven by the official openai client and httpx.

One adapter is really trained (a few peft optimizer steps on the built-in model, so it
answers differently); the others are random. Greedy answers through the server must equal
the offline `LLM` API's with the same adapter, in float32.
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from server_fixture import ServerProcess, small_engine, openai_client

from leanserve import LLM, SamplingParams
from leanserve.bench.lora import write_random_adapter

pytestmark = pytest.mark.slow

DTYPE = "float32"
PROMPT = "The secret word is"
TRAIN_TEXT = "The secret word is pineapple. The secret word is pineapple. The secret word is pineapple."


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, builtin_gguf):
    """<root>/allowed: the --lora-dir (random adapters r1, r2, r3 and the trained `pine`);
    <root>/outside: an adapter no run-time load may read."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora-server")
    hf = AutoModelForCausalLM.from_pretrained(builtin_gguf.parent, gguf_file=builtin_gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(builtin_gguf.parent, gguf_file=builtin_gguf.name)
    torch.manual_seed(0)
    model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"]))
    batch = tok(TRAIN_TEXT, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(6):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "allowed" / "pine")
    from leanserve.models.llama import ModelArgs

    args = ModelArgs.from_hf_config(hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    for i in range(1, 4):
        write_random_adapter(str(root / "allowed" / f"r{i}"), args, rank=4 * i, seed=i, std=0.05)
    write_random_adapter(str(root / "outside" / "o"), args, rank=4, seed=9)
    return root


@pytest.fixture(scope="module")
def server(lora_root):
    s = ServerProcess(*small_engine(), "--dtype", DTYPE, "--lora-dir", str(lora_root / "allowed"),
                      "--max-loras", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def base(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def offline(lora_root) -> LLM:
    return LLM(model=None, dtype=DTYPE, lora={"dirs": (str(lora_root / "allowed"),)})


def complete(client, model: str, prompt: str = PROMPT, n: int = 8) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.model == model  # the response names the model (adapter) as the request did, as vLLM
    return r.choices[0].text


def offline_text(offline: LLM, adapter: str | None, prompt: str = PROMPT, n: int = 8) -> str:
    return offline.generate(prompt, SamplingParams(temperature=0, max_tokens=n), adapter=adapter)[0].text


def test_models_lists_adapters_with_their_base(client, base, lora_root):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base, "pine", "r1", "r2", "r3", "all-MiniLM-L6-v2"}  # and the embedding model
    assert models["pine"].model_extra["parent"] == base
    assert models["pine"].model_extra["root"] == str((lora_root / "allowed" / "pine").resolve())


def test_trained_adapter_changes_the_answer_and_equals_offline(client, base, offline):
    plain, tuned = complete(client, base), complete(client, "pine")
    assert tuned != plain and "pineapple" in tuned
    assert tuned == offline_text(offline, "pine") and plain == offline_text(offline, None)
    assert complete(client, f"{base}:pine") == tuned
    chat = client.chat.completions.create(model="pine", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content and chat.model == "pine"
    stream = client.chat.completions.create(model="pine", max_tokens=4, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert {chunk.model for chunk in stream} == {"pine"}


def test_three_adapters_in_use_with_two_slots(client, base, offline):
    """--max-loras 2: every request succeeds and equals its adapter alone, offline."""
    names = ["pine", "r1", "r2", "r3", None] * 2
    with ThreadPoolExecutor(len(names)) as pool:
        texts = list(pool.map(lambda n: complete(client, n or base, n=6), names))
    for name, text in zip(names, texts):
        assert text == offline_text(offline, name, n=6), name


def test_unknown_adapter_is_404(client, base):
    for model in ("nope", f"{base}:nope", "other-base:pine"):
        with pytest.raises(openai.NotFoundError) as e:
            complete(client, model)
        assert e.value.body["code"] == "model_not_found"


def test_load_and_delete_at_run_time(server, client, lora_root, offline):
    url = f"{server.url}/v1/adapters"
    src = lora_root / "allowed" / "r1"
    copy = lora_root / "allowed" / "sub" / "late"
    shutil.copytree(src, copy)
    r = httpx.post(url, json={"name": "late", "path": str(copy)})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "late" and r.json()["rank"] == 4
    assert "late" in {m.id for m in client.models.list().data}
    assert complete(client, "late") == offline_text(offline, "r1")
    assert httpx.post(url, json={"name": "late", "path": str(copy)}).status_code == 400  # name in use
    # vLLM's endpoints too
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "late2", "lora_path": str(copy)})
    assert r.status_code == 200, r.text
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late2"}).status_code == 200
    assert httpx.delete(f"{url}/late").status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")
    assert httpx.delete(f"{url}/late").json()["error"]["code"] == "model_not_found"
    m = server.metrics()
    assert m["leanserve_lora_adapters_registered"] == 4
    assert m["leanserve_lora_loads_total"] >= 6 and m["leanserve_lora_load_seconds_count"] >= 6  # 4 at start, 2 here
    assert m['leanserve_lora_requests_total{adapter="pine"}'] >= 1
    assert any(k.startswith("leanserve_request_") and 'adapter="pine"' in k for k in m)  # its energy bill
    assert 1 <= m["leanserve_lora_adapters_resident"] <= 2


def test_delete_while_a_request_runs_lets_it_finish(server, client, offline):
    url = f"{server.url}/v1/adapters"
    path = offline.engine.lora.adapters["r2"].path
    assert httpx.post(url, json={"name": "brief", "path": path}).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, client, "brief", PROMPT, 48)
        deadline = time.monotonic() + 60
        while not server.metrics().get("leanserve_running_sequences") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.delete(f"{url}/brief").status_code == 200
        assert running.result() == offline_text(offline, "r2", n=48)


@pytest.mark.parametrize("case, status, code", [
    ("outside", 403, "path_not_allowed"),
    ("climb", 403, "path_not_allowed"),
    ("corrupt", 400, "invalid_adapter"),
    ("wrong_model", 400, "invalid_adapter"),
    ("missing", 400, "invalid_adapter"),
    ("bad_body", 400, None),
])
def test_bad_adapter_loads(server, client, base, lora_root, tmp_path, case, status, code):
    allowed = lora_root / "allowed"
    body = {"name": f"bad-{case}", "path": str(allowed / "bad" / case)}
    if case == "outside":
        body["path"] = str(lora_root / "outside" / "o")
    elif case == "climb":
        body["path"] = str(allowed / ".." / "outside" / "o")
    elif case == "corrupt":
        shutil.copytree(allowed / "r1", allowed / "bad" / case)
        (allowed / "bad" / case / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    elif case == "wrong_model":
        from leanserve.models.llama import ModelArgs

        tiny = ModelArgs("LlamaForCausalLM", 64, 128, 30, 4, 2, 16, 49152)
        write_random_adapter(body["path"], tiny, rank=4, seed=0)
    elif case == "bad_body":
        body = {"name": "x"}
    r = httpx.post(f"{server.url}/v1/adapters", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["code"] == code
    assert complete(client, base)  # still serving


def test_an_adapter_whose_file_breaks_after_registration_fails_its_requests_with_a_400(server, client, base,
                                                                                       lora_root):
    """An evicted adapter is read from its file again at its next use (a slot held its only
    copy); if the file went bad meanwhile, its requests get a clear 400 (streamed or not),
    the adapter stays registered and the server keeps serving. (The file was memory-mapped
    before: rewriting it killed the server with SIGBUS.)"""
    path = lora_root / "allowed" / "later-broken"
    shutil.copytree(lora_root / "allowed" / "r1", path)
    assert httpx.post(f"{server.url}/v1/adapters", json={"name": "later-broken", "path": str(path)}).status_code == 200
    assert complete(client, "later-broken")  # into a slot; the host copy is dropped
    complete(client, "r2"), complete(client, "r3")  # --max-loras 2: both slots taken, it is evicted
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "later-broken")
    assert e.value.code == "invalid_adapter" and "later-broken" in e.value.message
    stream = client.completions.create(model="later-broken", prompt=PROMPT, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="later-broken"):
        list(stream)
    assert complete(client, base) and complete(client, "r2")
