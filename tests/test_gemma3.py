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
