import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from leanserve.errors import ModelLoadError
from leanserve.models.loader import SUPPORTED_ARCHITECTURES, builtin_model_path, gguf_model_name, load_model_files
from leanserve.models.gguf_file import GGUFFile, dequantize

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
TINY_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)),
}


def write_tokenizer(folder):
    backend = Backend(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def save_tiny(kind, folder, **save_kwargs):
    torch.manual_seed(0)
    model = TINY_MODELS[kind]()
    model.save_pretrained(folder, **save_kwargs)
    write_tokenizer(folder)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_folder_round_trip(kind, tmp_path):
    model = save_tiny(kind, tmp_path)
    files = load_model_files(str(tmp_path))
    reference = model.state_dict()
    assert files.name == tmp_path.name
    assert files.config["architectures"] == [type(model).__name__]
    assert files.config["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert files.weights.keys() == reference.keys()
    for name, w in reference.items():
        assert torch.equal(files.weights[name], w), name
    assert files.tokenizer.encode("hello") == [3]


def test_mixtral_experts_are_per_expert(tmp_path):
    """transformers 5 holds experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]); we output w1/w2/w3."""
    model = save_tiny("mixtral", tmp_path)
    files = load_model_files(str(tmp_path))
    assert files.config["num_local_experts"] == 4 and files.config["num_experts_per_tok"] == 2
    for layer in range(2):
        fused = model.model.layers[layer].mlp
        moe = f"model.layers.{layer}.block_sparse_moe"
        assert torch.equal(files.weights[f"{moe}.gate.weight"], fused.gate.weight)
        for e in range(4):
            w1, w2, w3 = (files.weights[f"{moe}.experts.{e}.w{i}.weight"] for i in (1, 2, 3))
            assert torch.equal(torch.cat([w1, w3]), fused.experts.gate_up_proj[e])
            assert torch.equal(w2, fused.experts.down_proj[e])
    assert not any(".mlp." in name for name in files.weights)


def test_fused_mixtral_checkpoint_is_split(tmp_path):
    reference = save_tiny("mixtral", tmp_path / "saved")
    os.makedirs(tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "saved" / name, tmp_path / "fused" / name)
    saved = load_model_files(str(tmp_path / "saved")).weights
    fused = load_model_files(str(tmp_path / "fused")).weights
    assert saved.keys() == fused.keys()
    assert all(torch.equal(saved[k], fused[k]) for k in saved)


def test_sharded_checkpoint_and_generation_config(tmp_path):
    model = save_tiny("llama", tmp_path, max_shard_size="50KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 3]}, f)
    files = load_model_files(str(tmp_path))
    assert files.weights.keys() == model.state_dict().keys()
    assert files.tokenizer.eos_token_ids == {2, 3}


def test_unknown_architecture(tmp_path):
    save_tiny("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model_files(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "remove"])
def test_damaged_safetensors(damage, tmp_path):
    save_tiny("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "remove":
        weights.unlink()
    else:
        weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + data[2:])
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model_files(str(tmp_path))


def test_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_files(str(tmp_path))
    with pytest.raises(ModelLoadError):
        load_model_files(str(tmp_path / "nothing.gguf"))


# -- GGUF ---------------------------------------------------------------------------------------

def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows of llama-architecture models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, experts=0):
    """A tiny random model in llama.cpp's layout; returns the HF-named tensors it should load as."""
    hidden, inter, heads, kv_heads, vocab = 64, 96, 4, 2, 260
    rng = np.random.default_rng(0)
    tensors, hf = {}, {}

    def add(gguf_name, hf_name, shape, permute_heads=0):
        w = rng.standard_normal(shape).astype(np.float32)
        hf[hf_name] = torch.from_numpy(w)
        tensors[gguf_name] = llama_cpp_permute(w, permute_heads) if permute_heads and arch == "llama" else w

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden))
    add("output_norm.weight", "model.norm.weight", (hidden,))
    for i in range(2):
        block, hf_block = f"blk.{i}", f"model.layers.{i}"
        add(f"{block}.attn_norm.weight", f"{hf_block}.input_layernorm.weight", (hidden,))
        add(f"{block}.ffn_norm.weight", f"{hf_block}.post_attention_layernorm.weight", (hidden,))
        add(f"{block}.attn_q.weight", f"{hf_block}.self_attn.q_proj.weight", (hidden, hidden), heads)
        add(f"{block}.attn_k.weight", f"{hf_block}.self_attn.k_proj.weight", (hidden // 2, hidden), kv_heads)
        add(f"{block}.attn_v.weight", f"{hf_block}.self_attn.v_proj.weight", (hidden // 2, hidden))
        add(f"{block}.attn_output.weight", f"{hf_block}.self_attn.o_proj.weight", (hidden, hidden))
        if arch == "qwen2":
            add(f"{block}.attn_q.bias", f"{hf_block}.self_attn.q_proj.bias", (hidden,))
            add(f"{block}.attn_k.bias", f"{hf_block}.self_attn.k_proj.bias", (hidden // 2,))
            add(f"{block}.attn_v.bias", f"{hf_block}.self_attn.v_proj.bias", (hidden // 2,))
        if experts:
            moe = f"{hf_block}.block_sparse_moe"
            add(f"{block}.ffn_gate_inp.weight", f"{moe}.gate.weight", (experts, hidden))
            for kind, w, shape in [("gate", "w1", (inter, hidden)), ("down", "w2", (hidden, inter)),
                                   ("up", "w3", (inter, hidden))]:
                stack = rng.standard_normal((experts, *shape)).astype(np.float32)
                tensors[f"{block}.ffn_{kind}_exps.weight"] = stack
                hf.update({f"{moe}.experts.{e}.{w}.weight": torch.from_numpy(stack[e]) for e in range(experts)})
        else:
            add(f"{block}.ffn_gate.weight", f"{hf_block}.mlp.gate_proj.weight", (inter, hidden))
            add(f"{block}.ffn_up.weight", f"{hf_block}.mlp.up_proj.weight", (inter, hidden))
            add(f"{block}.ffn_down.weight", f"{hf_block}.mlp.down_proj.weight", (hidden, inter))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(5e5)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(33 + i) for i in range(vocab - 4)] + ["<s>", "</s>", "<pad>", "<unk>"])
    writer.add_token_types([gguf.TokenType.NORMAL] * (vocab - 4) + [gguf.TokenType.CONTROL] * 4)
    writer.add_token_merges([])
    writer.add_bos_token_id(vocab - 4)
    writer.add_eos_token_id(vocab - 3)
    for name, w in tensors.items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.mark.parametrize("arch,experts,hf_arch", [("llama", 0, "LlamaForCausalLM"), ("qwen2", 0, "Qwen2ForCausalLM"),
                                                  ("llama", 4, "MixtralForCausalLM")])
def test_gguf_names_shapes_and_qk_permutation(arch, experts, hf_arch, tmp_path):
    expected = write_gguf(tmp_path / "tiny.gguf", arch, experts)
    files = load_model_files(str(tmp_path / "tiny.gguf"))
    assert files.name == "tiny"
    assert files.weights.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.equal(files.weights[name], w), name
    config = files.config
    assert config["architectures"] == [hf_arch]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (2, 4, 2)
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (64, 96, 16)
    assert (config["rope_theta"], config["max_position_embeddings"], config["vocab_size"]) == (5e5, 256, 260)
    assert config["tie_word_embeddings"] and config["attention_bias"] == (arch == "qwen2")
    assert config.get("num_local_experts", 0) == experts
    assert files.tokenizer.eos_token_ids == {257}


def test_damaged_gguf(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", "llama")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 1000])
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all")
    for name in ("truncated.gguf", "garbage.gguf"):
        with pytest.raises(ModelLoadError, match=name):
            load_model_files(str(tmp_path / name))


def test_builtin_model_path():
    path = builtin_model_path()
    assert path.endswith(".gguf") and os.path.isfile(path)
    assert {"LlamaForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM"} <= SUPPORTED_ARCHITECTURES


@pytest.mark.slow
def test_builtin_gguf_equals_transformers():
    """Every tensor we load equals transformers' own GGUF dequantization and Q/K un-permutation."""
    from transformers import AutoModelForCausalLM

    files = load_model_files(None)
    path = builtin_model_path()
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).state_dict()
    assert files.config["tie_word_embeddings"]
    assert files.weights.keys() == reference.keys() - {"lm_head.weight"}  # tied: transformers lists it too
    for name, w in files.weights.items():
        assert w.dtype == torch.float32 and w.shape == reference[name].shape, name
        torch.testing.assert_close(w, reference[name], atol=1e-6, rtol=0, msg=name)
    config = files.config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["vocab_size"] == 49152 and config["rope_theta"] == 100000.0


def test_unsupported_gguf_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()
    with pytest.raises(ModelLoadError, match="'phi3'.*'llama', 'qwen2'"):
        load_model_files(str(tmp_path / "phi.gguf"))


BLOCK_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32", "Q6_K"]


@pytest.mark.parametrize("kind", BLOCK_FORMATS)
def test_gguf_dequantization_equals_the_gguf_package(kind):
    """Our torch dequantizers (and the fallback for the other formats) give the gguf package's
    values, bit for bit, on data the gguf package quantized."""
    qtype = gguf.GGMLQuantizationType[kind]
    values = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 3
    if kind == "Q6_K":  # no quantizer in the gguf package: any bytes are a valid Q6_K tensor
        data = np.random.default_rng(1).integers(0, 256, (8, 512 // 256 * 210), dtype=np.uint8)
        data.view(np.float16)[:, -1] = np.float16(0.01)  # a finite scale at the end of each block
    else:
        data = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(-1)
    ours = dequantize(data.view(np.uint8).reshape(-1), qtype)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(expected.copy()))


def test_gguf_fields_and_tensors_equal_the_gguf_packages_reader(tmp_path):
    path = tmp_path / "fields.gguf"
    write_gguf(path, "llama")
    writer = gguf.GGUFWriter(str(tmp_path / "more.gguf"), "llama")
    writer.add_uint8("t.u8", 200), writer.add_int16("t.i16", -3), writer.add_uint64("t.u64", 2**40)
    writer.add_float64("t.f64", 0.1), writer.add_bool("t.bool", True), writer.add_string("t.str", "héllo")
    writer.add_array("t.floats", [0.5, -1.25]), writer.add_array("t.strings", ["a", "", "ç"])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()
    for file in (path, tmp_path / "more.gguf"):
        ours, reference = GGUFFile(str(file)), gguf.GGUFReader(str(file))
        expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
        if "t.nested" in expected:  # the gguf package's contents() flattens arrays of arrays
            assert ours.fields.pop("t.nested") == [[1, 2], [3]] and expected.pop("t.nested") == [1, 2, 3]
        assert ours.fields == expected
        assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
        for t, r in zip(ours.tensors, reference.tensors):
            assert t.shape == tuple(int(d) for d in r.shape) and t.tensor_type == r.tensor_type
            assert t.data.tobytes() == r.data.tobytes(), t.name


@pytest.mark.parametrize("file, name", [("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
                                        ("qwen2-0_5b-instruct-q8_0.gguf", "qwen2-0_5b-instruct"),
                                        ("Mistral-7B-v0.1-IQ4_XS.gguf", "Mistral-7B-v0.1"),
                                        ("model-f16.gguf", "model"), ("Q4_1.gguf", "Q4_1"), ("plain.gguf", "plain")])
def test_a_gguf_is_served_under_its_name_without_the_quantization(file, name):
    assert gguf_model_name(f"/models/{file}") == name
