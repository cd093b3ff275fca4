"""The bill end to end: `leanserve serve --usage-log` with the built-in model; usage.leanserve,
/metrics, the usage log and `leanserve report` agree."""
from __future__ import annotations

import json

import httpx
import pytest
from server_fixture import ServerProcess, small_engine

from leanserve.energy import report

pytestmark = pytest.mark.slow


def test_usage_metrics_and_log_agree(tmp_path, capsys):
    log = tmp_path / "usage.jsonl"
    server = ServerProcess(*small_engine(), "--usage-log", str(log), "--carbon-intensity", "FR",
                           "--price-per-kwh", "0.2", "--energy-meter", "estimate")
    try:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        bodies = []
        for user, n in (("alice", 2), ("bob", 1)):
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 8,
                "n": n, "user": user, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            bodies.append(r.json())
        metrics = server.metrics()
    finally:
        server.stop()
    for body in bodies:
        bill = body["usage"]["leanserve"]
        assert bill["energy_source"] == "estimate" and bill["energy_joules"] > 0
        assert bill["carbon_grams"] == pytest.approx(bill["energy_joules"] / 3.6e6 * 56, rel=1e-3, abs=1e-9)
        assert bill["cost_usd"] == pytest.approx(bill["energy_joules"] / 3.6e6 * 0.2, rel=1e-3, abs=1e-9)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["user"] for r in records) == ["alice", "alice", "bob"]
    alice_j = sum(r["energy_joules"] for r in records if r["user"] == "alice")
    assert alice_j == pytest.approx(bodies[0]["usage"]["leanserve"]["energy_joules"], rel=1e-4)
    assert metrics['leanserve_user_energy_joules_total{user="alice"}'] == pytest.approx(alice_j, rel=1e-4)
    total, idle = metrics["leanserve_energy_joules_total"], metrics["leanserve_idle_energy_joules_total"]
    billed = sum(v for k, v in metrics.items() if k.startswith("leanserve_user_energy_joules_total"))
    assert billed + idle == pytest.approx(total, rel=1e-6)
    assert 0 <= metrics["leanserve_kv_cache_usage_ratio"] <= 1 and metrics["leanserve_process_resident_memory_bytes"] > 0
    assert report.main([str(log), "--by", "user"]) == 0
    assert "alice" in capsys.readouterr().out
