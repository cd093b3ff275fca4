"""Structured outputs inside the engine, on a tiny random Llama (its tokenizer is the built-in
one's): the grammar holds through preemption, LoRA adapters, seeds, prefix caching and stop
strings, and a constrained sequence gives the same tokens alone and in a batch."""
from __future__ import annotations

import json

import jsonschema
import pytest
from test_lora import make_adapter

from leanserve import LLM, Constraint, SamplingParams

# bounded in every field, so even random weights close it within a few dozen tokens
SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "kind": {"enum": ["card", "wire", "cash"]},
    "score": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}},
    "required": ["ok", "kind", "score", "tags"], "additionalProperties": False}
PROMPTS = ["The payment was", "Check this transfer:", "Answer in JSON please", "Is it fraud?",
           "A wire of $5,000", "Three cash deposits"]


def params(seed: int | None = None, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 80)
    return SamplingParams(temperature=0 if seed is None else 1.0, seed=seed, constraint=Constraint("json", SCHEMA),
                          **kw)


def assert_valid(out) -> None:
    assert out.finish_reason == "stop", (out.finish_reason, out.text)
    jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_kv_blocks=128, block_size=16)


def test_alone_and_batched_equal_greedy_and_seeded(llm):
    batch = [params()] * 3 + [params(seed=s) for s in (1, 2, 3)]
    together = llm.generate(PROMPTS, batch)
    for prompt, p, out in zip(PROMPTS, batch, together):
        assert_valid(out)
        alone, = llm.generate([prompt], [p])
        assert alone.token_ids == out.token_ids
    assert llm.engine.forced_tokens > 0  # `{"ok":` and the other keys are forced


def test_preempted_constrained_sequences_give_the_same_tokens(tiny_llama, llm):
    """A pool of 12 blocks of 8 for 6 sequences of ~30 tokens each: some are preempted and
    recomputed, their matchers keeping their state."""
    small = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=12, block_size=8)
    prompts = [p * 3 for p in PROMPTS]
    outs = small.generate(prompts, params(max_tokens=40))
    assert small.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_valid(out)
        assert out.token_ids == llm.generate([prompt], params(max_tokens=40))[0].token_ids


def test_prefix_cache_hit_gives_the_same_constrained_tokens(llm):
    prompt = "A long shared prefix about a card payment made abroad at night. " * 4
    first = llm.generate([prompt], params())[0]
    hits = llm.engine.kv.hit_tokens
    second = llm.generate([prompt], params())[0]
    assert llm.engine.kv.hit_tokens > hits
    assert_valid(second)
    assert second.token_ids == first.token_ids


def test_a_stop_string_still_stops_a_constrained_sequence(llm):
    out = llm.generate([PROMPTS[0]], params(stop=[","]))[0]
    assert out.finish_reason == "stop" and "," not in out.text and out.text.startswith('{"ok":')


def test_max_tokens_before_the_structure_closes_is_length(llm):
    out = llm.generate([PROMPTS[0]], params(max_tokens=3))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_constrained_under_a_lora_adapter(tiny_llama, tmp_path):
    make_adapter(tiny_llama, tmp_path / "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    llm = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=64, lora={"adapters": {"a": str(tmp_path / "a")}})
    mixed = llm.generate(PROMPTS[:3], params(), adapter=["a", None, "a"])
    for prompt, adapter, out in zip(PROMPTS[:3], ["a", None, "a"], mixed):
        assert_valid(out)
        assert llm.generate([prompt], params(), adapter=adapter)[0].token_ids == out.token_ids


def test_logprobs_turn_fast_forward_off(llm):
    forced = llm.engine.forced_tokens
    out = llm.generate([PROMPTS[1]], params(logprobs=2))[0]
    assert_valid(out)
    assert llm.engine.forced_tokens == forced
    assert len(out.logprobs) == len(out.token_ids)
