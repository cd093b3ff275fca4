"""Gemma 3 against transformers: tiny random weights with a tiny sliding window, and the
built-in Gemma 3 270M GGUF (see test_engine_vs_transformers.py for the comparison rules)."""
from __future__ import annotations

import functools
import shutil

import pytest
import torch
from test_engine_vs_transformers import (ENGINE_VARIANTS, NUM_NEW, PROMPTS, assert_logprobs_close, assert_tokens_equal,
                                         hf_greedy, load_hf)

from leanserve import LLM, SamplingParams
from leanserve.engine import runner
from leanserve.models import gemma3, llama

WINDOW = 8  # the 40-token prompt and every 16-token answer outgrow it

# Two local layers, one global, one local: both kinds, both RoPE tables, and a window
# smaller than a prompt. query_pre_attn_scalar is not head_dim (16), so the score scale
# differs from the default one; the global layers' RoPE is linearly scaled.
TINY_GEMMA3 = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2, pad_token_id=None, sliding_window=WINDOW, query_pre_attn_scalar=24,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
)
SOFTCAPS = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)


def build_tiny_gemma3(out, tokenizer_dir, **overrides):
    import transformers

    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TINY_GEMMA3, **overrides))
    with torch.no_grad():  # random init leaves Gemma's norms at 0 (x 1): spread them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn_like(p))
    model.float().save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, tokenizer_dir):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_gemma3_softcapped(tmp_path_factory, tokenizer_dir):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3-softcap"), tokenizer_dir, **SOFTCAPS)


@functools.cache
def reference(path, **kwargs):
    model = load_hf(path, **kwargs)
    return [hf_greedy(model, p, NUM_NEW) for p in PROMPTS]


def assert_equals_transformers(outs, refs, what):
    for prompt, out, ref in zip(PROMPTS, outs, refs):
        assert_tokens_equal(out.token_ids, ref.tokens, f"{what}, {len(prompt)}-token prompt")
        assert_logprobs_close(out, ref)


PARAMS = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize("variant", ENGINE_VARIANTS)
def test_tiny_gemma3_equals_transformers(tiny_gemma3, variant):
    llm = LLM(str(tiny_gemma3), dtype="float32", **ENGINE_VARIANTS[variant])
    assert llm.engine.model.args.layer_windows == (WINDOW, WINDOW, 0, WINDOW)
    assert_equals_transformers(llm.generate(PROMPTS, PARAMS), reference(tiny_gemma3), f"tiny Gemma 3/{variant}")
    if variant == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    if variant == "default":  # again, the prompts' full blocks now from the prefix cache
        assert_equals_transformers(llm.generate(PROMPTS, PARAMS), reference(tiny_gemma3), "tiny Gemma 3, cached prefixes")
        assert llm.engine.kv.hit_tokens > 0


def test_tiny_gemma3_window_matters(tiny_gemma3):
    """Premise of the tests above: with the window ignored (every layer global), the answers
    to the prompts longer than the window change."""
    llm = LLM(str(tiny_gemma3), dtype="float32", num_kv_blocks=64)
    for layer in llm.engine.model.layers:
        layer.self_attn.window = 0
    outs = llm.generate(PROMPTS, PARAMS)
    assert any(o.token_ids != r.tokens for o, r in zip(outs, reference(tiny_gemma3)))


def test_tiny_gemma3_torch_fallback_equals_transformers(tiny_gemma3, monkeypatch):
    """Without the native kernels: SDPA over prefill chunks with window masks (per window in
    one step), chunked prefill and a cached prefix."""
    for module in (llama, gemma3, runner):
        monkeypatch.setattr(module, "native", lambda: None)
    llm = LLM(str(tiny_gemma3), dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=12)
    refs = reference(tiny_gemma3)
    assert_equals_transformers(llm.generate(PROMPTS, PARAMS), refs, "tiny Gemma 3, torch fallback")
    # again: the prompts' blocks come from the prefix cache now
    assert_equals_transformers(llm.generate(PROMPTS, PARAMS), refs, "tiny Gemma 3, torch fallback, cached prefixes")
    assert llm.engine.kv.hit_tokens > 0


@pytest.mark.parametrize("use_native", [True, False])
def test_tiny_gemma3_softcapping_equals_transformers(tiny_gemma3_softcapped, monkeypatch, use_native):
    """The final logits are capped; `attn_logit_softcapping` is in the config but, as in
    transformers' Gemma3 and llama.cpp, caps nothing."""
    if not use_native:
        for module in (llama, gemma3, runner):
            monkeypatch.setattr(module, "native", lambda: None)
    llm = LLM(str(tiny_gemma3_softcapped), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=16)
    outs = llm.generate(PROMPTS, PARAMS)
    assert_equals_transformers(outs, reference(tiny_gemma3_softcapped), "tiny Gemma 3 with soft-capping")


def test_gemma3_config_in_transformers_4_spelling():
    """Hub configs written before transformers 5: rope_theta, rope_local_base_freq,
    rope_scaling (the global layers'), and a sliding_window_pattern instead of layer_types."""
    args = gemma3.Gemma3Args.from_hf_config(dict(
        architectures=["Gemma3ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=100, sliding_window=32,
        sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert args.layer_windows == (32, 32, 0, 32, 32, 0, 32)
    assert (args.rope_theta, args.rope_local_theta) == (1e6, 1e4)
    assert args.rope_scaling == {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0}
    assert args.query_pre_attn_scalar == 256 and args.tie_word_embeddings


# -- the built-in Gemma 3 270M (Q4_K_M GGUF, dequantized to float32 on both sides) ---------------

TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gemma_gguf():
    from leanserve.models.loader import builtin_model_path

    return builtin_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_llm():
    return LLM("gemma3-270m", dtype="float32", num_kv_blocks=128, block_size=16)


@pytest.fixture(scope="module")
def gemma_hf(gemma_gguf):
    import os

    return load_hf(os.path.dirname(gemma_gguf), gguf_file=os.path.basename(gemma_gguf))


@pytest.mark.slow
def test_gemma3_270m_greedy_equals_transformers_batched_and_alone(gemma_llm, gemma_hf):
    args = gemma_llm.engine.model.args
    assert args.layer_windows == (512,) * 5 + (0,) + (512,) * 5 + (0,) + (512,) * 5 + (0,)
    assert (args.rope_theta, args.rope_local_theta, args.query_pre_attn_scalar) == (1e6, 1e4, 256)
    prompts = [gemma_llm.tokenizer.encode(t) for t in TEXTS]
    batched = gemma_llm.generate(prompts, PARAMS)
    for prompt, out in zip(prompts, batched):
        ref = hf_greedy(gemma_hf, prompt, NUM_NEW)
        assert_tokens_equal(out.token_ids, ref.tokens, f"Gemma 3 270M on {gemma_llm.tokenizer.decode(prompt)!r}")
        assert_logprobs_close(out, ref)
        alone = gemma_llm.generate([prompt], PARAMS)[0]
        assert alone.token_ids == out.token_ids
        assert [lp.logprob for lp in alone.logprobs] == pytest.approx([lp.logprob for lp in out.logprobs], abs=1e-4)


@pytest.mark.slow
def test_gemma3_270m_past_its_sliding_window_equals_transformers(gemma_llm, gemma_hf):
    """A 600-token prompt: the local layers' 512-token window cuts it, in prefill (chunks of
    the engine's 512-token step budget) and in decode."""
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 11} stones." for i in range(60))
    prompt = gemma_llm.tokenizer.encode(text + " Item 3: the")[:600]
    assert len(prompt) == 600
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    out = gemma_llm.generate([prompt], params)[0]
    ref = hf_greedy(gemma_hf, prompt, 8)
    assert_tokens_equal(out.token_ids, ref.tokens, "Gemma 3 270M, 600-token prompt")
    assert_logprobs_close(out, ref)


@pytest.mark.slow
def test_gemma3_270m_tokenizer_equals_transformers(gemma_llm, gemma_gguf):
    """The 262k SentencePiece vocabulary rebuilt from the GGUF, against transformers'
    tokenizer from the same file."""
    import os

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.dirname(gemma_gguf), gguf_file=os.path.basename(gemma_gguf))
    ours = gemma_llm.tokenizer
    assert ours.vocab_size == len(hf) == 262144
    for text in ["Hello world", " leading space", "1234567 + 89 = ?", "naïve café 東京 🤖", "\tdef f(x):\n    return x**2\n\n",
                 "  double  spaces", "<start_of_turn>user\nhi<end_of_turn>\n", "ÅÄÖ Ω ≈ ∑ \u00a0ﬁ"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


@pytest.mark.slow
def test_gemma3_chat_template_and_end_of_turn(gemma_llm):
    """The GGUF is the base model and has no template: Gemma 3's standard one is the default,
    and <end_of_turn> ends generation."""
    tok = gemma_llm.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, {"role": "user", "content": " Hi "},
                                    {"role": "assistant", "content": "Hello."},
                                    {"role": "user", "content": [{"type": "text", "text": "Bye"}]}])
    assert text == ("<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tok.encode(text, add_special_tokens=False)[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user
    assert {1, 106} <= gemma_llm.engine.eos_ids  # <eos>, <end_of_turn>
