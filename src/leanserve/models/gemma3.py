"""Gemma 3 (Gemma3ForCausalLM, the text model) over the paged KV cache of models/llama.py.

What differs from Llama, and how each is done here:
- Layers alternate between local attention (a sliding window, its own RoPE base, 10k) and
  global attention (the full context, RoPE base 1M, maybe scaled): five local, then one
  global, by `layer_types` or the `sliding_window_pattern`. The KV cache keeps every block of
  every layer; a local layer only masks keys older than its window (in the native decode
  kernel and in the torch fallback alike, in prefill and decode, with chunks and cached
  prefixes), so one pool and one block table serve both kinds.
- q and k are RMS-normalised per head before RoPE; scores are scaled by
  `query_pre_attn_scalar ** -0.5` (not head_dim's). The scores are not soft-capped even when
  a config sets `attn_logit_softcapping` (Gemma 2's cap, which q/k norms replaced): neither
  transformers' Gemma3 nor llama.cpp applies it.
- Norms multiply by (1 + weight): the shift is added to the weights once at load, so Llama's
  RMSNorm (and its native kernel) computes them. Each sublayer's output is normalised again
  (post_attention_layernorm, post_feedforward_layernorm) before it joins the residual stream.
- The MLP is GeGLU (tanh-approximated gelu), embeddings are multiplied by sqrt(hidden), the
  lm_head is the embedding matrix, final logits are tanh-capped if the config says so.

Steps take the module path (with the native per-operation kernels where they are built):
the fused ForwardPlan runs Llama's layer, with one window for all layers and SwiGLU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from ..kernels import native
from .llama import (AttnBatch, Attention, CausalLM, KVPool, LayerCache, ModelArgs, RMSNorm, Rope, _fuse,
                    _rope_scaling, rope_inv_freq)

ARCHITECTURE = "Gemma3ForCausalLM"
END_OF_TURN = "<end_of_turn>"

# Gemma 3's chat format, for files that carry no template (the 270M GGUF is the base model):
# turns are "<start_of_turn>{user|model}\n{text}<end_of_turn>\n" after one <bos>; a system
# message has no turn of its own but opens the first user turn, followed by a blank line.
# Content is a string or a list of text parts; turns must alternate user / assistant.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set system = '' -%}
{%- set turns = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] if messages[0]['content'] is string
      else messages[0]['content'] | map(attribute='text') | join('') -%}
  {%- set system = system + '\n\n' -%}
  {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 is even) -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}
  {%- if loop.first -%}{{- system -}}{%- endif -%}
  {%- if message['content'] is string -%}
    {{- message['content'] | trim -}}
  {%- else -%}
    {%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endfor -%}
  {%- endif -%}
  {{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""


@dataclass
class Gemma3Args(ModelArgs):
    layer_windows: tuple[int, ...] = ()  # per layer: its sliding window, 0 for a global layer
    rope_local_theta: float = 10000.0  # the local layers' RoPE base (`rope_theta` is the global layers')
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "Gemma3Args":
        if cfg.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelLoadError(f"Gemma 3 with hidden_activation {cfg['hidden_activation']!r} is not supported")
        if cfg.get("use_bidirectional_attention"):
            raise ModelLoadError("Gemma 3 with bidirectional attention (an embedding model) is not a causal LM")
        n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        types = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                           for i in range(n)]
        if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
            raise ModelLoadError(f"layer_types must name {n} layers 'full_attention' or 'sliding_attention'")
        window = cfg.get("sliding_window") or 4096
        # transformers 5: rope_parameters per layer type; 4: rope_theta, rope_local_base_freq, rope_scaling
        rope = cfg.get("rope_parameters") or {}
        full, local = rope.get("full_attention"), rope.get("sliding_attention")
        if full is None:
            full = {"rope_theta": cfg.get("rope_theta") or rope.get("rope_theta", 1_000_000.0),
                    **(cfg.get("rope_scaling") or {})}
        local = local or {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
        if _rope_scaling({"rope_parameters": local}):
            raise ModelLoadError("Gemma 3 with scaled RoPE on its local layers is not supported")
        return cls(
            arch=ARCHITECTURE,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=n,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or 256,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=full.get("rope_theta", 1_000_000.0),
            rope_scaling=_rope_scaling({"rope_parameters": full}),
            max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            qkv_bias=cfg.get("attention_bias", False),
            qk_norm=True,
            layer_windows=tuple(window if t == "sliding_attention" else 0 for t in types),
            rope_local_theta=local.get("rope_theta", 10000.0),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") or 256,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
        )


class Gemma3Attention(Attention):
    def __init__(self, args: Gemma3Args, layer: int):
        super().__init__(args, layer)
        self.window = args.layer_windows[layer]
        self.scale = args.query_pre_attn_scalar ** -0.5


class GeGLU(nn.Module):
    """gelu_tanh(gate) * up, with the gate and up projections fused into one matrix."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: Gemma3Args, layer: int):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Gemma3Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.mlp = GeGLU(dim, args.intermediate_size)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def forward(self, x, residual, rope: Rope, positions, batch: AttnBatch, cache: LayerCache):
        """As llama.DecoderLayer: returns (this layer's output, the residual stream it is to be
        added to), each add fused into the norm that follows it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, positions, batch, cache))
        h = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3ForCausalLM(nn.Module):
    """The interface of llama.CausalLM (forward, set_rope, plan), for the engine's runner."""

    fused = False  # no native plan (see the module docstring)

    def __init__(self, args: Gemma3Args):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_rope(self, max_len: int) -> None:
        """cos/sin tables of the global layers (rope_cos, rope_sin) and of the local ones."""
        local = dataclasses.replace(self.args, rope_theta=self.args.rope_local_theta, rope_scaling=None)
        tables = []
        for args in (self.args, local):
            freqs = torch.outer(torch.arange(max_len, dtype=torch.float), rope_inv_freq(args, max_len))
            emb = torch.cat((freqs, freqs), dim=-1)
            tables.append((emb.cos(), emb.sin()))
        (self.rope_cos, self.rope_sin), (self.local_cos, self.local_sin) = tables

    def plan(self, pool: KVPool):
        return None

    @torch.inference_mode()
    def forward(self, input_ids, positions, batch: AttnBatch, pool: KVPool, logit_rows, float_logits: bool = True,
                greedy: bool = False):
        """As llama.CausalLM.forward."""
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.args.hidden_size ** 0.5).to(x.dtype)  # rounded to the dtype first, as transformers
        ropes = {False: Rope(self.rope_cos, self.rope_sin), True: Rope(self.local_cos, self.local_sin)}
        if native() is None:  # the torch fallback rotates with per-token rows in the model dtype
            for rope in ropes.values():
                rope.cos = rope.cos_table[positions].to(x.dtype).unsqueeze(1)
                rope.sin = rope.sin_table[positions].to(x.dtype).unsqueeze(1)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, ropes[layer.self_attn.window > 0], positions, batch, pool.layer(i))
        out = CausalLM._logits(self, x, residual, logit_rows, float_logits, greedy)
        if (cap := self.args.final_logit_softcapping) and not greedy:  # capping keeps the argmax
            out = torch.tanh(out / cap) * cap
        return out


NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def load_weights(model: Gemma3ForCausalLM, weights: dict[str, torch.Tensor]) -> None:
    """Copies transformers-named tensors in (norm weights shifted by 1, q/k/v and gate/up
    fused); a missing tensor is an error."""
    wanted = {"embed_tokens.weight": weights.get("model.embed_tokens.weight"),
              "norm.weight": weights.get("model.norm.weight"), "lm_head.weight": weights.get("lm_head.weight")}
    for i in range(model.args.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        for norm in NORMS:
            wanted[f"{ours}.{norm}.weight"] = weights.get(f"{hf}.{norm}.weight")
        attn = f"{hf}.self_attn"
        wanted[f"{ours}.self_attn.qkv_proj.weight"] = _fuse(weights, attn, ["q_proj.weight", "k_proj.weight",
                                                                            "v_proj.weight"])
        if model.args.qkv_bias:
            wanted[f"{ours}.self_attn.qkv_proj.bias"] = _fuse(weights, attn, ["q_proj.bias", "k_proj.bias", "v_proj.bias"])
        wanted[f"{ours}.self_attn.o_proj.weight"] = weights.get(f"{attn}.o_proj.weight")
        for norm in ("q_norm", "k_norm"):
            wanted[f"{ours}.self_attn.{norm}.weight"] = weights.get(f"{attn}.{norm}.weight")
        wanted[f"{ours}.mlp.gate_up_proj.weight"] = _fuse(weights, f"{hf}.mlp", ["gate_proj.weight", "up_proj.weight"])
        wanted[f"{ours}.mlp.down_proj.weight"] = weights.get(f"{hf}.mlp.down_proj.weight")
    for name, param in model.named_parameters():
        tensor = wanted.get(name)
        if tensor is None:
            raise ModelLoadError(f"weights are missing tensor for {name}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelLoadError(f"tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor.float() + 1 if name.endswith("norm.weight") else tensor)


def build_model(config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype, max_len: int) -> Gemma3ForCausalLM:
    args = Gemma3Args.from_hf_config(config)
    args.tie_word_embeddings = "lm_head.weight" not in weights
    with torch.device("meta"):
        model = Gemma3ForCausalLM(args)
    model = model.to_empty(device="cpu")
    if args.tie_word_embeddings:  # to_empty makes a fresh tensor per module: tie again
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, weights)
    model = model.to(dtype).eval()
    model.set_rope(max_len)
    return model
