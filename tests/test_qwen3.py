"""Qwen3 beyond the shared tiny-model suite (test_engine_vs_transformers.py runs the tiny
Qwen3 folder like every architecture): the torch fallback, and the same weights as a GGUF
file laid out as llama.cpp's converter writes one."""
from __future__ import annotations

import json

import gguf
import pytest
from safetensors.torch import load_file
from test_engine_vs_transformers import (NUM_NEW, PROMPTS, assert_logprobs_close, assert_tokens_equal,
                                         tiny_reference)

from leanserve import LLM, SamplingParams
from leanserve.engine import runner
from leanserve.models import llama

PARAMS = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=5)
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tiny_qwen3(tiny_models):
    return tiny_models["qwen3"]


def assert_equals_transformers(llm, folder, what):
    for prompt, out, ref in zip(PROMPTS, llm.generate(PROMPTS, PARAMS), tiny_reference(folder)):
        assert_tokens_equal(out.token_ids, ref.tokens, f"{what}, {len(prompt)}-token prompt")
        assert_logprobs_close(out, ref)


def test_qwen3_torch_fallback_equals_transformers(tiny_qwen3, monkeypatch):
    for module in (llama, runner):
        monkeypatch.setattr(module, "native", lambda: None)
    llm = LLM(str(tiny_qwen3), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=8)
    assert llm.engine.model.args.qk_norm and llm.engine.model.args.head_dim == 32
    assert_equals_transformers(llm, tiny_qwen3, "Qwen3, torch fallback")


def write_qwen3_gguf(folder, path) -> None:
    """The tiny folder as llama.cpp writes a Qwen3 GGUF: float32 tensors in HF's row order
    (no Q/K permutation for Qwen), q/k norms as attn_q_norm / attn_k_norm, tied output."""
    cfg = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base((cfg.get("rope_parameters") or cfg)["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    writer.add_token_types([gguf.TokenType.NORMAL] * cfg["vocab_size"])
    writer.add_token_merges([])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    for name, w in load_file(str(folder / "model.safetensors")).items():
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            gname = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm"}[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}"
        writer.add_tensor(f"{gname}.weight", w.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen3_gguf_equals_transformers(tiny_qwen3, tmp_path):
    write_qwen3_gguf(tiny_qwen3, tmp_path / "tiny-qwen3.gguf")
    llm = LLM(str(tmp_path / "tiny-qwen3.gguf"), dtype="float32", num_kv_blocks=64)
    assert llm.engine.model.args.arch == "Qwen3ForCausalLM"
    assert_equals_transformers(llm, tiny_qwen3, "Qwen3 GGUF")
