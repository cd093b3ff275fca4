"""Label values from clients (`user`, adapter names) cannot grow /metrics without bound or
break its text format (issue 26)."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from server_fixture import ServerProcess, small_engine

from leanserve.energy.carbon import CarbonConfig
from leanserve.energy.ledger import Bill, EnergyLedger
from leanserve.energy.meters import EstimateMeter
from leanserve.energy.metrics import MAX_LABEL_CHARS, MAX_LABEL_VALUES, OTHER, EnergyMetrics, label_value
from leanserve.models.llama import ModelArgs
from leanserve.serve.metrics import LoRAMetrics

ARGS = ModelArgs(arch="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=100)
MB = 1 << 20


def energy_metrics() -> tuple[EnergyMetrics, CollectorRegistry]:
    metrics = EnergyMetrics(EnergyLedger(EstimateMeter(), ARGS, CarbonConfig()))
    registry = CollectorRegistry()
    registry.register(metrics)
    return metrics, registry


def samples(text: str, name: str) -> dict[str, float]:
    """Label value -> value of the samples of `name`; also checks that `text` parses."""
    return {s.labels.get("user", s.labels.get("adapter")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def test_label_value_is_cut_with_a_hash_and_loses_control_characters():
    assert label_value("alice") == "alice"
    assert label_value("a\x00b\nc\x7fd\x9f\u00e9") == "abcd\u00e9"
    a, b = label_value("x" * MB), label_value("x" * (MB - 1) + "y")
    assert len(a) == len(b) == MAX_LABEL_CHARS and a != b and a.startswith("x" * 50)
    assert label_value("x" * MB) == a


def test_many_distinct_huge_users_keep_metrics_small_and_parseable():
    metrics, registry = energy_metrics()
    for i in range(2 * MAX_LABEL_VALUES):
        metrics.add(Bill(energy_joules=1.0), model="m", user=f"{i:04d}" + "u" * MB)
    metrics.add(Bill(energy_joules=1.0), model="m", user="nul\x00user")
    text = generate_latest(registry).decode()
    assert len(text) < 100_000 and "\x00" not in text
    users = samples(text, "leanserve_user_energy_joules_total")
    assert len(users) == MAX_LABEL_VALUES + 1
    assert users[OTHER] == MAX_LABEL_VALUES + 1  # the later users and the NUL one
    assert all(len(u) <= MAX_LABEL_CHARS for u in users)


def test_first_users_keep_their_series():
    metrics, registry = energy_metrics()
    for i in range(MAX_LABEL_VALUES + 10):
        metrics.add(Bill(energy_joules=1.0), user=f"u{i}")
    metrics.add(Bill(energy_joules=1.0), user="u0")
    users = samples(generate_latest(registry).decode(), "leanserve_user_energy_joules_total")
    assert users["u0"] == 2 and users[OTHER] == 10 and f"u{MAX_LABEL_VALUES}" not in users


def test_lora_requests_adapter_label_is_bounded():
    registry = CollectorRegistry()
    lora = LoRAMetrics(registry, None)
    for i in range(MAX_LABEL_VALUES + 5):
        lora.requests.labels(adapter=f"a{i}\x00" + "z" * 1000).inc()
    text = generate_latest(registry).decode()
    adapters = samples(text, "leanserve_lora_requests_total")
    assert len(adapters) == MAX_LABEL_VALUES + 1 and adapters[OTHER] == 5 and "\x00" not in text


@pytest.mark.slow
def test_server_metrics_stay_small_with_huge_users():
    server = ServerProcess(*small_engine(), "--energy-meter", "estimate")
    try:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        for user in ["a" * MB, "b" * MB, "nul\x00user"]:
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "user": user})
            assert r.status_code == 200, r.text
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    assert len(text) < 100_000 and "\x00" not in text
    users = samples(text, "leanserve_user_energy_joules_total")
    assert set(users) == {label_value("a" * MB), label_value("b" * MB), "nuluser"}
