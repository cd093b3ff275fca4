"""One request's failure stays that request's: a step never fails for everyone, and one
client's burst does not starve another's request (the hostile-input issue, engine side).

The failures are injected (a raising sampler, detokenizer or forward pass for one chosen
sequence): the real ones they stand for are bugs, which no valid input reaches on purpose.
"""
from __future__ import annotations

import pytest

from leanserve import LLM, SamplingParams
from leanserve.errors import InvalidRequest

from test_engine_behaviour import GREEDY, random_prompt, run_to_end

PROMPTS = [random_prompt(7 + i, seed=40 + i) for i in range(4)]
PARAMS = [SamplingParams(max_tokens=6, **GREEDY), SamplingParams(max_tokens=6, **GREEDY),
          SamplingParams(max_tokens=6, temperature=0.8, seed=7, ignore_eos=True),  # seeded: draws as alone
          SamplingParams(max_tokens=6, repetition_penalty=1.3, **GREEDY)]  # row 3 takes the sampler's full path


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=128)


@pytest.fixture(scope="module")
def solo(llm) -> list[list[int]]:
    """Each prompt's tokens when it runs alone."""
    return [llm.generate(p, sp)[0].token_ids for p, sp in zip(PROMPTS, PARAMS)]


def run_batch(llm, bad: str | None = None) -> dict[str, list]:
    engine = llm.engine
    for i, (prompt, sp) in enumerate(zip(PROMPTS, PARAMS)):
        engine.add_request(f"r{i}", prompt, SamplingParams(**vars(sp)))
    return run_to_end(engine)


def check_neighbours(llm, outputs: dict, solo: list, bad: str) -> None:
    for i in range(len(PROMPTS)):
        rid = f"r{i}"
        last = outputs[rid][-1]
        if rid == bad:
            assert last.finish_reason == "abort" and last.error.status == 500 and last.error.code == "engine_error"
        else:
            assert last.error is None and last.finish_reason == "length"
            assert [t for o in outputs[rid] for t in o.token_ids] == solo[i], rid
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_a_row_whose_sampling_fails_ends_alone(llm, solo, monkeypatch):
    penalize = llm.engine.sampler._penalize

    def failing(row, seq):
        if seq.request_id == "r3":
            raise OverflowError("injected")
        penalize(row, seq)

    monkeypatch.setattr(llm.engine.sampler, "_penalize", failing)
    outputs = run_batch(llm)
    check_neighbours(llm, outputs, solo, "r3")
    assert "injected" in outputs["r3"][-1].error.message


def test_a_row_whose_detokenizing_fails_ends_alone(llm, solo, monkeypatch):
    engine = llm.engine
    add_sequence = engine.add_sequence

    def add_then_break(seq):
        add_sequence(seq)
        if seq.request_id == "r1":
            def failing(token):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            engine.detoks["r1"].add = failing

    monkeypatch.setattr(engine, "add_sequence", add_then_break)
    check_neighbours(llm, run_batch(llm), solo, "r1")


def test_a_failed_forward_pass_runs_again_without_the_newest_sequence(llm, solo, monkeypatch):
    runner = llm.engine.runner
    execute = runner.execute

    def failing(batch, greedy=None):
        if any(seq.request_id == "r3" for seq, _ in batch):
            raise RuntimeError("injected")
        return execute(batch, greedy)

    monkeypatch.setattr(runner, "execute", failing)
    check_neighbours(llm, run_batch(llm), solo, "r3")


def test_a_forward_pass_that_fails_again_fails_the_step(llm, monkeypatch):
    def failing(batch, greedy=None):
        raise RuntimeError("injected")

    monkeypatch.setattr(llm.engine.runner, "execute", failing)
    llm.engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=2, **GREEDY))
    llm.engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=2, **GREEDY))
    with pytest.raises(RuntimeError, match="injected"):
        llm.engine.step()
    monkeypatch.undo()
    for rid in ("a", "b"):
        llm.engine.abort(rid)
    assert not llm.engine.has_unfinished() and llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_top_k_and_min_tokens_are_bounded(llm):
    vocab = llm.engine.args.vocab_size
    for top_k in (vocab + 1, 2**63):
        with pytest.raises(InvalidRequest, match="top_k") as e:
            llm.engine.make_sequence("x", PROMPTS[0], SamplingParams(temperature=1.0, top_k=top_k))
        assert e.value.param == "top_k"
    llm.engine.make_sequence("x", PROMPTS[0], SamplingParams(temperature=1.0, top_k=vocab))
    capped = SamplingParams(max_tokens=None, min_tokens=10**9)
    with pytest.raises(InvalidRequest, match="default of 32") as e:
        llm.engine.make_sequence("x", PROMPTS[0], capped, max_tokens_cap=32)
    assert e.value.param == "min_tokens"
    with pytest.raises(InvalidRequest, match="left in the context"):
        llm.engine.make_sequence("x", PROMPTS[0], capped)
    assert llm.engine.make_sequence("x", PROMPTS[0], SamplingParams(max_tokens=None), max_tokens_cap=32).max_tokens == 32
    assert llm.engine.make_sequence("x", PROMPTS[0], SamplingParams(max_tokens=None), max_tokens_cap=10**6
                                    ).max_tokens == 128 - len(PROMPTS[0])


def test_waiting_sequences_take_turns_by_client(tiny_llama):
    """One seat: a client that queued five sequences first gets one turn before the client
    that queued one, not five."""
    engine = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=128,
                 max_num_seqs=1).engine
    params = SamplingParams(max_tokens=2, **GREEDY)
    for i in range(5):
        engine.add_sequence(engine.make_sequence(f"greedy-{i}", PROMPTS[0], params, client="greedy"))
    engine.add_sequence(engine.make_sequence("other", PROMPTS[1], params, client="other"))
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["greedy-0", "other", "greedy-1", "greedy-2", "greedy-3", "greedy-4"]
