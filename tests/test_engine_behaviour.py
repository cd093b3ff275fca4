"""How the engine behaves: batch independence, streaming, aborts, bad input, sampling parameters.

Most tests use the tiny random-weight Llama (fast); the ones that need real text (multi-byte
characters, an answer that ends with EOS) use the built-in model and are marked slow.
"""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
from collections import defaultdict

import pytest
import torch

from leanserve import LLM, SamplingParams
from leanserve.errors import InvalidRequest, ModelLoadError

MAX_MODEL_LEN = 128
EOS = 2  # <|im_end|> of SmolLM2's tokenizer, the EOS of every test model
GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(17, 49152, (length,), generator=g).tolist()  # ids 0..16 are special


GOOD_PROMPT = random_prompt(9, seed=99)
GOOD_PARAMS = SamplingParams(max_tokens=8, **GREEDY)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def good_tokens(llm) -> list[int]:
    """What a fresh engine answers to GOOD_PROMPT; a healthy engine answers it the same later."""
    return llm.generate(GOOD_PROMPT, GOOD_PARAMS)[0].token_ids


def assert_still_serves(llm, good_tokens) -> None:
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    assert llm.generate(GOOD_PROMPT, GOOD_PARAMS)[0].token_ids == good_tokens


def run_to_end(engine, outputs: dict | None = None) -> dict[str, list]:
    """Steps until every request finished; request id -> its RequestOutput deltas."""
    outputs = defaultdict(list) if outputs is None else outputs
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def joined_tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the engine hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- batch independence ----------------------------------------------------------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
                "List three prime numbers.", "Why is the sky blue?", "Give me a tip for learning Python.",
                "What does a CPU do?", "Translate 'good morning' into Spanish."]


@pytest.mark.slow
def test_bf16_requests_do_not_depend_on_their_batch(builtin_gguf):
    """The built-in model in bf16, eight prompts greedy for 48 tokens, each alone and all
    together. Where the CPU has AMX-BF16 or AVX512-BF16 every projection runs in our kernel, whose rows
    do not depend on the other rows of the call, and decode attention reads each sequence on
    its own; with each prompt prefilled in one chunk (no prefix cache) the tokens are equal.
    (oneDNN's bf16 kernels change their summation order with the row count: there, some of
    these prompts parted after a few tokens.)"""
    from leanserve.kernels import native

    if native() is None or not native().bf16_packed_available():
        pytest.skip("bf16 batch invariance needs our packed bf16 kernel (AMX-BF16 or AVX512-BF16)")
    llm = LLM(str(builtin_gguf), num_kv_blocks=128, block_size=16, prefix_caching=False)
    assert llm.engine.runner.model.layers[0].mlp.gate_up_proj.own
    params = SamplingParams(max_tokens=48, **GREEDY)
    alone = [llm.generate(p, params)[0].token_ids for p in CHAT_PROMPTS]
    together = [out.token_ids for out in llm.generate(CHAT_PROMPTS, params)]
    assert together == alone
    assert len({tuple(t) for t in alone}) == len(CHAT_PROMPTS)  # real, distinct answers


def test_greedy_steps_take_their_tokens_from_the_lm_head_kernel(builtin_gguf, monkeypatch):
    """bf16 in our packed kernel: when every row of a step is plain greedy, the lm_head's own
    kernel picks the tokens (no logits written out). The same tokens as the sampler's argmax
    over the logits; rows with logprobs or a banned EOS keep the sampler."""
    from leanserve.kernels import native
    from leanserve.engine.sampling import Sampler
    from leanserve.models.quant import PackedLinear

    if native() is None or not native().bf16_packed_available():
        pytest.skip("the fused lm_head argmax needs our packed bf16 kernel (AMX-BF16 or AVX512-BF16)")
    llm = LLM(str(builtin_gguf), num_kv_blocks=128, block_size=16, prefix_caching=False)
    calls = []
    fused = PackedLinear.argmax
    monkeypatch.setattr(PackedLinear, "argmax", lambda self, x: calls.append(len(x)) or fused(self, x))
    params = SamplingParams(max_tokens=16, **GREEDY)
    prompts = CHAT_PROMPTS[:4]
    got = [out.token_ids for out in llm.generate(prompts, params)]
    assert calls and sum(calls) >= 4 * 15  # every step's tokens came from the kernel
    monkeypatch.setattr(Sampler, "argmax_only", staticmethod(lambda seqs, eos: False))
    calls.clear()
    assert [out.token_ids for out in llm.generate(prompts, params)] == got
    assert not calls
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(PackedLinear, "argmax", lambda self, x: calls.append(len(x)) or fused(self, x))
    llm.generate(prompts[0], SamplingParams(max_tokens=4, logprobs=2, **GREEDY))
    llm.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0.0, min_tokens=4))  # EOS banned
    assert not calls


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=16, **GREEDY),
    SamplingParams(temperature=0.8, seed=123, top_p=0.9, top_k=20, max_tokens=16, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_a_request_does_not_depend_on_its_batch(llm, params):
    target = random_prompt(12, seed=1)
    alone = llm.generate(target, params)[0].token_ids

    others = [  # (prompt, params): seeded differently, unseeded, greedy, the same seed on another prompt
        (random_prompt(3, seed=2), SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)),
        (random_prompt(30, seed=3), SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True)),
        (random_prompt(7, seed=4), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
        (random_prompt(19, seed=5), SamplingParams(temperature=1.2, top_k=5, max_tokens=12, ignore_eos=True)),
        (random_prompt(1, seed=6), SamplingParams(temperature=0.8, seed=123, top_p=0.9, top_k=20, max_tokens=16)),
    ]
    engine = llm.engine
    for i, (prompt, p) in enumerate(others[:3]):
        engine.add_request(f"other-{i}", prompt, p)
    outputs = defaultdict(list)
    for _ in range(2):  # the target joins while the others are mid-prefill or decoding
        for out in engine.step():
            outputs[out.request_id].append(out)
    engine.add_request("target", target, params)
    for i, (prompt, p) in enumerate(others[3:], start=3):
        engine.add_request(f"other-{i}", prompt, p)
    outputs = run_to_end(engine, outputs)

    assert len(outputs) == 6
    assert joined_tokens(outputs["target"]) == alone
    if params.seed is not None:  # the premise: this request really samples
        assert alone != llm.generate(target, SamplingParams(max_tokens=16, **GREEDY))[0].token_ids


# -- streaming ------------------------------------------------------------------------------------

@pytest.fixture(params=["tiny", pytest.param("builtin", marks=pytest.mark.slow)])
def stream_case(request):
    """(llm, prompt ids, real text?): the tiny model on random ids, or the built-in model asked
    for text in three scripts, which it answers with multi-byte characters split across tokens."""
    if request.param == "tiny":
        return request.getfixturevalue("llm"), random_prompt(10, seed=11), False
    llm = request.getfixturevalue("builtin_llm")
    messages = [{"role": "user", "content": "Write the word 'hello' in Chinese, Japanese and Korean."}]
    return llm, llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False), True


@functools.cache
def greedy_answer(llm, prompt: tuple[int, ...]):
    """One greedy run per model and prompt, shared by the streaming tests (the built-in model is slow)."""
    return llm.generate(list(prompt), SamplingParams(temperature=0, max_tokens=24))[0]


def stream(engine, prompt, params, request_id="stream") -> list:
    engine.add_request(request_id, prompt, params)
    deltas = run_to_end(engine)[request_id]
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    return deltas


def test_stream_deltas_concatenate_to_the_final_text(stream_case):
    llm, prompt, real_text = stream_case
    deltas = stream(llm.engine, prompt, SamplingParams(temperature=0, max_tokens=24))
    final = greedy_answer(llm, tuple(prompt))

    assert joined_tokens(deltas) == final.token_ids
    assert "".join(d.text for d in deltas) == final.text
    assert deltas[-1].finish_reason == final.finish_reason
    if real_text:  # check it against a plain decode
        tok = llm.tokenizer
        assert final.text == tok.decode(final.token_ids)
        assert any(ord(c) > 0x7F for c in final.text) and "\ufffd" not in final.text
        # the premise: some characters are split across tokens
        assert any("\ufffd" in tok.decode([t]) for t in final.token_ids)


def pick_stop_string(tokenizer, token_ids: list[int], text: str) -> str:
    """The text of two adjacent output tokens, both printable, from the second half of the output."""
    for k in range(len(token_ids) // 2, len(token_ids) - 1):
        first, second = tokenizer.decode([token_ids[k]]), tokenizer.decode([token_ids[k + 1]])
        both = tokenizer.decode(token_ids[k:k + 2])
        if first.strip() and second.strip() and "\ufffd" not in both and both in text:
            return both
    raise AssertionError(f"no two adjacent printable tokens in {text!r}")


def test_stop_string_spanning_two_tokens(stream_case):
    llm, prompt, _ = stream_case
    base = greedy_answer(llm, tuple(prompt))
    stop = pick_stop_string(llm.tokenizer, base.token_ids, base.text)
    expected = base.text[:base.text.index(stop)]

    deltas = stream(llm.engine, prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    assert "".join(d.text for d in deltas) == expected
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", stop)
    tokens = joined_tokens(deltas)
    assert tokens == base.token_ids[:len(tokens)]


# -- aborts, bad input, a pool too small -----------------------------------------------------------

def test_abort_frees_every_block(llm, good_tokens):
    engine = llm.engine
    for i, n in enumerate((5, 40, 70)):
        engine.add_request(f"abort-{i}", random_prompt(n, seed=20 + i), SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    for i in range(3):
        engine.abort(f"abort-{i}")
    engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert_still_serves(llm, good_tokens)


@pytest.mark.parametrize("prompt", [
    "", [[]], [49152], [-1], [5] * (MAX_MODEL_LEN + 1),
    [GOOD_PROMPT, []],  # one bad prompt refuses the whole call, and leaves nothing running
], ids=["empty-text", "empty-ids", "id-past-vocab", "negative-id", "longer-than-context", "one-bad-in-batch"])
def test_bad_prompt_is_refused_and_the_engine_still_serves(llm, good_tokens, prompt):
    with pytest.raises(InvalidRequest):
        llm.generate(prompt, SamplingParams(max_tokens=4))
    assert_still_serves(llm, good_tokens)


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.5), dict(top_k=-2),
    dict(min_tokens=5, max_tokens=2), dict(logprobs=21), dict(repetition_penalty=0.0),
])
def test_bad_sampling_params_raise_value_error(llm, good_tokens, kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
    params = SamplingParams()  # made valid, then broken: the engine validates again
    for name, value in kwargs.items():
        setattr(params, name, value)
    with pytest.raises(ValueError):
        llm.generate(GOOD_PROMPT, params)
    assert_still_serves(llm, good_tokens)


def test_request_that_can_never_fit_the_kv_pool_is_refused(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=4, block_size=4)  # 16 tokens in all
    with deadline(60):
        with pytest.raises(InvalidRequest):
            llm.generate(random_prompt(30, seed=5), SamplingParams(max_tokens=4))
        with pytest.raises(InvalidRequest):  # the prompt fits, its answer would not
            llm.generate(random_prompt(10, seed=5), SamplingParams(max_tokens=20))
        out = llm.generate(random_prompt(10, seed=5), SamplingParams(max_tokens=6, **GREEDY))[0]
    assert (len(out.token_ids), out.finish_reason) == (6, "length")


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture_is_a_model_load_error(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "foo")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FooForCausalLM"], "foo"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="FooForCausalLM"):
        LLM(str(folder), dtype="float32", num_kv_blocks=8)


def test_truncated_weights_are_a_model_load_error(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError):
        LLM(str(folder), dtype="float32", num_kv_blocks=8)


def test_missing_tensor_is_a_model_load_error(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model(tiny_llama, tmp_path / "missing")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"layers\.1\."):
        LLM(str(folder), dtype="float32", num_kv_blocks=8)


def test_missing_model_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        LLM(str(tmp_path / "nothing-here"), dtype="float32", num_kv_blocks=8)


# -- sampling parameters --------------------------------------------------------------------------

def greedy_tokens(llm, prompt, n: int) -> list[int]:
    return llm.generate(prompt, SamplingParams(max_tokens=n, **GREEDY))[0].token_ids


def test_max_tokens_is_respected(llm):
    prompt = random_prompt(6, seed=30)
    for params in (SamplingParams(max_tokens=7, **GREEDY), SamplingParams(temperature=1.0, max_tokens=5)):
        out = llm.generate(prompt, params)[0]
        assert (len(out.token_ids), out.finish_reason) == (params.max_tokens, "length")
    out = llm.generate(prompt, SamplingParams(max_tokens=0))[0]
    assert (out.token_ids, out.text, out.finish_reason) == ([], "", "length")


def test_stop_token_ids_and_min_tokens(llm):
    prompt = random_prompt(6, seed=31)
    base = greedy_tokens(llm, prompt, 16)
    stop_token = base[3]
    assert stop_token not in base[:3]

    out = llm.generate(prompt, SamplingParams(max_tokens=16, stop_token_ids=[stop_token], **GREEDY))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids in (base[:3], base[:4])  # with or without the stop token itself

    # min_tokens: the stop token may not be sampled before 8 tokens are out
    out = llm.generate(prompt, SamplingParams(max_tokens=16, min_tokens=8, stop_token_ids=[stop_token], **GREEDY))[0]
    assert out.token_ids[:3] == base[:3]
    assert len(out.token_ids) >= 8
    assert stop_token not in out.token_ids[:8]


@pytest.mark.slow
def test_min_tokens_holds_back_eos(builtin_llm):
    prompt = builtin_llm.tokenizer.encode(builtin_llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]), add_special_tokens=False)
    base = builtin_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0]
    answer = [t for t in base.token_ids if t != EOS]
    assert base.finish_reason == "stop" and len(answer) < 12, "premise: a short answer that ends with EOS"

    out = builtin_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, min_tokens=12))[0]
    assert out.token_ids[:len(answer)] == answer
    assert len(out.token_ids) >= 12
    assert EOS not in out.token_ids[:12]


def test_seed_is_reproducible(llm):
    prompt = random_prompt(8, seed=32)

    def sample(seed):
        return llm.generate(prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True))[0].token_ids

    first = sample(42)
    assert sample(42) == first
    assert sample(43) != first
    assert sample(None) != first
    assert greedy_tokens(llm, prompt, 16) != first


REPETITIVE_PROMPT = random_prompt(1, seed=100) * 20  # greedy decoding of the tiny Llama loops on it


def first_repeat(tokens: list[int], seen=()) -> int | None:
    seen = set(seen)
    for i, t in enumerate(tokens):
        if t in seen:
            return i
        seen.add(t)
    return None


@pytest.mark.parametrize("penalty", [
    dict(presence_penalty=2.0), dict(frequency_penalty=1.0), dict(repetition_penalty=1.5),
], ids=lambda p: next(iter(p)))
def test_penalties_change_a_repetitive_greedy_path(llm, penalty):
    plain = greedy_tokens(llm, REPETITIVE_PROMPT, 24)
    # presence and frequency count the output tokens; repetition counts the prompt too
    seen = REPETITIVE_PROMPT if "repetition_penalty" in penalty else ()
    i = first_repeat(plain, seen)
    assert i is not None, "premise: the plain greedy path repeats a token"

    out = llm.generate(REPETITIVE_PROMPT, SamplingParams(max_tokens=24, **GREEDY, **penalty))[0].token_ids
    assert out[:i] == plain[:i]  # a penalty only lowers tokens already seen: nothing changes before
    assert out != plain


@pytest.mark.parametrize("narrow", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)], ids=lambda p: next(iter(p)))
def test_sampling_narrowed_to_one_token_is_greedy(llm, narrow):
    prompt = random_prompt(8, seed=33)
    out = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, **narrow))[0]
    assert out.token_ids == greedy_tokens(llm, prompt, 16)


def test_the_async_engine_builds_and_steps_on_one_thread(tiny_llama):
    """Loading on the caller's thread and stepping on another leaves two OpenMP pools, and
    with more OpenMP threads than cores every barrier sleeps (a 2x slower step, measured)."""
    import asyncio
    import threading

    from leanserve.config import EngineConfig
    from leanserve.engine.engine import AsyncEngine

    async def run():
        engine = AsyncEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=32))
        assert engine.engine.built_on != threading.get_ident()
        await engine.start()
        stepped_on = []
        step = engine.engine.step
        engine.engine.step = lambda: stepped_on.append(threading.get_ident()) or step()
        outs = [o async for o in engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))]
        await engine.shutdown(timeout=1)
        return engine, outs, stepped_on

    engine, outs, stepped_on = asyncio.run(run())
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 3
    assert set(stepped_on) == {engine.engine.built_on}


def test_an_async_engine_that_fails_to_load_raises_on_the_caller(tmp_path):
    from leanserve.config import EngineConfig
    from leanserve.engine.engine import AsyncEngine

    with pytest.raises(ModelLoadError):
        AsyncEngine(EngineConfig(model=str(tmp_path / "missing")))


def test_first_argmax_is_argmax_with_ties_and_infinities():
    from leanserve.engine.sampling import first_argmax

    x = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0))
    x[1, [7, 9000, 40000]] = 100.0  # ties: the first index wins
    x[2, :] = -float("inf")
    x[2, 123] = 0.0
    x[3, :] = 1.0  # all equal: index 0
    assert torch.equal(first_argmax(x), x.argmax(dim=-1))
    assert first_argmax(x)[1].item() == 7 and first_argmax(x)[3].item() == 0


def test_the_sampler_leaves_the_models_logits_alone(llm):
    """Penalties and min_tokens work on a copy: the caller's logits (and logprobs) stay."""
    from leanserve.engine.sampling import Sampler

    seq = llm.engine.make_sequence("s", [5, 6, 7], SamplingParams(repetition_penalty=1.5, min_tokens=2, temperature=0),
                                   0, None)
    logits = torch.randn(1, llm.engine.args.vocab_size, generator=torch.Generator().manual_seed(1))
    logits[0, 6] = 50.0  # the best token, but it repeats the prompt: the penalty must not touch the original
    before = logits.clone()
    Sampler()(logits, [seq], llm.engine.eos_ids)
    assert torch.equal(logits, before)
