"""Energy attribution on the real engine with the estimate meter (this machine has no
energy counter): concurrent requests, conservation, shares that grow with work, and
carbon and cost that follow the configured factors.
"""
from __future__ import annotations

import pytest
import torch

from leanserve.config import EngineConfig
from leanserve.energy.carbon import CarbonConfig
from leanserve.energy.config import EnergyConfig
from leanserve.engine.engine import LLMEngine
from leanserve.engine.sequence import SamplingParams

CARBON = CarbonConfig(intensity_g_per_kwh=400, pue=1.5, embodied_g_per_hour=20, price_per_kwh=0.2,
                      machine_price_per_hour=1.8)
# (prompt tokens, output tokens): each request has more of both than the one before, so in
# every step they share it does more work (longer chunk or longer context) and runs longer.
REQUESTS = {"small": (8, 4), "medium": (40, 12), "large": (120, 24)}


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(17, 49152, (length,), generator=g).tolist()


@pytest.fixture(scope="module")
def run(tiny_llama):
    energy = EnergyConfig(meter="estimate", carbon=CARBON)
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64, block_size=16,
                                    energy=energy))
    for i, (name, (plen, out)) in enumerate(REQUESTS.items()):
        engine.add_request(name, prompt(plen, i), SamplingParams(max_tokens=out, temperature=0, ignore_eos=True))
    bills, outputs = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                bills[o.request_id], outputs[o.request_id] = o.bill, o
    engine.ledger.poll()
    return engine.ledger, engine.ledger.meter.read_joules(), bills, outputs


def test_request_joules_plus_idle_equal_the_meter_total(run):
    ledger, meter_total, bills, outputs = run
    assert {o.num_output_tokens for o in outputs.values()} == {out for _, out in REQUESTS.values()}
    billed, idle, since_ledger = ledger.totals()
    # the meter's total since the ledger was made: the engine's own start (weights, a first
    # kernel measurement on a new machine) runs before, on the meter but before any request
    assert 0 < since_ledger <= meter_total
    assert sum(b.energy_joules for b in bills.values()) + idle.energy_joules == pytest.approx(since_ledger, rel=0.01)
    assert sum(b.energy_joules for b in bills.values()) == pytest.approx(billed.energy_joules, rel=1e-9)
    assert all(b.energy_source == "estimate" for b in bills.values())


def test_a_requests_share_grows_with_its_tokens(run):
    _, _, bills, _ = run
    small, medium, large = (bills[name] for name in REQUESTS)
    assert 0 < small.energy_joules < medium.energy_joules < large.energy_joules
    assert small.batch_size == 3  # it finished while all three were running
    assert small.batch_size > medium.batch_size > large.batch_size >= 1
    assert large.steps == REQUESTS["large"][1]  # one prefill step, then one step per further token


def test_carbon_and_cost_follow_the_configured_factors(run):
    ledger, _, bills, _ = run
    _, idle, _ = ledger.totals()
    for b in [*bills.values(), idle]:
        kwh = b.energy_joules / 3.6e6
        assert b.carbon_grams == pytest.approx(kwh * 1.5 * 400 + 20 * b.active_seconds / 3600, rel=1e-9)
        assert b.cost_usd == pytest.approx(kwh * 1.5 * 0.2 + 1.8 * b.active_seconds / 3600, rel=1e-9)
        assert b.active_seconds > 0
