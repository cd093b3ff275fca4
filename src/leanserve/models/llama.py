"""The Llama family (Llama, Mistral, Qwen2) and Mixtral in one file, over a paged KV cache.

The model works on a flat batch: the T tokens of one engine step (prefill chunks of some
sequences and the newest token of others) go through every projection together as one
[T, hidden] matrix. Only attention looks at sequences one group at a time; `AttnBatch`
says where each token's keys and values live in the block pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")


@dataclass
class ModelArgs:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(f"unsupported architecture {archs or 'missing'}; supported: {', '.join(ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        sliding = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            arch=arch,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            sliding_window=sliding,
            num_experts=cfg.get("num_local_experts", 0) if arch == "MixtralForCausalLM" else 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
        )


def _rope_scaling(cfg: dict) -> dict | None:
    """transformers 4 writes `rope_scaling`, transformers 5 `rope_parameters`; both mean the same."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    return None if kind == "default" else {**rs, "rope_type": kind}


def rope_inv_freq(args: ModelArgs, max_len: int) -> torch.Tensor:
    """Inverse frequencies with the config's scaling (default, linear, dynamic NTK, llama3)."""
    dim, base = args.head_dim, args.rope_theta
    rs = args.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    if kind == "dynamic":
        # As transformers: unchanged up to the trained length; beyond it the base grows.
        # The engine fixes the longest length once (max_model_len) instead of per step.
        orig = rs.get("original_max_position_embeddings", args.max_position_embeddings)
        if max_len > orig:
            factor = rs["factor"]
            base = base * ((factor * max_len / orig) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind not in ("default", "dynamic"):
        raise ModelLoadError(f"unsupported rope scaling type {kind!r}")
    return inv_freq


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens: rows [start, start+length) of the flat batch."""

    start: int
    length: int
    ctx_blocks: torch.Tensor | None  # blocks holding all its keys (context + chunk); None: chunk alone
    mask: torch.Tensor | None  # [1, 1, length, blocks * block_size] bool; None: plain causal


@dataclass
class AttnBatch:
    """Where one step's tokens read and write keys and values in the paged pool.

    Decodes come first in the flat batch: rows [0, num_decodes) are one token each.
    Keys are read a whole block at a time (a contiguous copy) and padding is masked out.
    """

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decodes: int = 0
    decode_blocks: torch.Tensor | None = None  # [B, max_blocks] block table of each decode
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] real keys
    prefills: list[PrefillChunk] = field(default_factory=list)


class KVPool:
    """Keys and values of every layer, preallocated: [layers, blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype):
        shape = (args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate(x, cos, sin):
    """Rotary embedding, half-split layout (the Hugging Face weight order). x: [T, heads, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = args.num_heads, args.num_kv_heads, args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, batch: AttnBatch, pool: KVPool):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = rotate(q.view(T, self.nh, self.hd), cos, sin)
        k = rotate(k.view(T, self.nkv, self.hd), cos, sin)
        v = v.view(T, self.nkv, self.hd)
        kc, vc = pool.k[self.layer], pool.v[self.layer]
        kc.view(-1, self.nkv, self.hd).index_copy_(0, batch.slot_mapping, k)
        vc.view(-1, self.nkv, self.hd).index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)
        if B := batch.num_decodes:
            qd = q[:B].unsqueeze(2)  # [B, H, 1, D]
            blocks = batch.decode_blocks.view(-1)  # index_select copies whole blocks: far faster than kc[blocks]
            kd = kc.index_select(0, blocks).view(B, -1, self.nkv, self.hd).transpose(1, 2)  # [B, Hkv, K, D]
            vd = vc.index_select(0, blocks).view(B, -1, self.nkv, self.hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, enable_gqa=True)
            out[:B] = o.squeeze(2)
        for p in batch.prefills:
            rows = slice(p.start, p.start + p.length)
            if p.ctx_blocks is None:
                ks, vs = k[rows], v[rows]
            else:
                ks = kc.index_select(0, p.ctx_blocks).view(-1, self.nkv, self.hd)
                vs = vc.index_select(0, p.ctx_blocks).view(-1, self.nkv, self.hd)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0), attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1)
        return self.o_proj(out.view(T, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matrix."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """Mixtral's block: a softmax router picks the top-k experts per token; only those run."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(args.hidden_size, args.intermediate_size) for _ in range(args.num_experts))

    def forward(self, x):
        weights = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = SparseMoE(args) if args.num_experts else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos, sin, batch, pool):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, pool)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_rope(self, max_len: int) -> None:
        """cos/sin tables for positions [0, max_len), computed in float32 as transformers does."""
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float), rope_inv_freq(self.args, max_len))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    @torch.inference_mode()
    def forward(self, input_ids, positions, batch: AttnBatch, pool: KVPool, logit_rows):
        """Runs the step's tokens; returns float32 logits of the rows in `logit_rows` only."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, cos, sin, batch, pool)
        return self.lm_head(self.norm(x[logit_rows])).float()


def _fuse(weights: dict, prefix: str, names: list[str]):
    parts = [weights.get(f"{prefix}.{n}") for n in names]
    if any(p is None for p in parts):
        return None
    return torch.cat(parts, dim=0)


def load_weights(model: CausalLM, weights: dict[str, torch.Tensor]) -> None:
    """Copies Hugging Face-named tensors into the fused layout; a missing tensor is an error."""
    args = model.args
    params = dict(model.named_parameters())
    wanted: dict[str, torch.Tensor | None] = {
        "embed_tokens.weight": weights.get("model.embed_tokens.weight"),
        "norm.weight": weights.get("model.norm.weight"),
        "lm_head.weight": weights.get("lm_head.weight"),
    }
    for i in range(args.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            wanted[f"{ours}.{norm}.weight"] = weights.get(f"{hf}.{norm}.weight")
        attn = f"{hf}.self_attn"
        wanted[f"{ours}.self_attn.qkv_proj.weight"] = _fuse(weights, attn, ["q_proj.weight", "k_proj.weight", "v_proj.weight"])
        if args.qkv_bias:
            wanted[f"{ours}.self_attn.qkv_proj.bias"] = _fuse(weights, attn, ["q_proj.bias", "k_proj.bias", "v_proj.bias"])
        wanted[f"{ours}.self_attn.o_proj.weight"] = weights.get(f"{attn}.o_proj.weight")
        if args.num_experts:
            moe = f"{hf}.block_sparse_moe"
            wanted[f"{ours}.mlp.gate.weight"] = weights.get(f"{moe}.gate.weight")
            for e in range(args.num_experts):
                ex = f"{moe}.experts.{e}"
                wanted[f"{ours}.mlp.experts.{e}.gate_up_proj.weight"] = _fuse(weights, ex, ["w1.weight", "w3.weight"])
                wanted[f"{ours}.mlp.experts.{e}.down_proj.weight"] = weights.get(f"{ex}.w2.weight")
        else:
            wanted[f"{ours}.mlp.gate_up_proj.weight"] = _fuse(weights, f"{hf}.mlp", ["gate_proj.weight", "up_proj.weight"])
            wanted[f"{ours}.mlp.down_proj.weight"] = weights.get(f"{hf}.mlp.down_proj.weight")
    for name, param in params.items():
        tensor = wanted.get(name)
        if tensor is None:
            raise ModelLoadError(f"weights are missing tensor for {name}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelLoadError(f"tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)


def build_model(config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype, max_len: int) -> CausalLM:
    args = ModelArgs.from_hf_config(config)
    if "lm_head.weight" not in weights:  # GGUF files without an output tensor tie it
        args.tie_word_embeddings = True
    with torch.device("meta"):
        model = CausalLM(args)
    model = model.to_empty(device="cpu")
    if args.tie_word_embeddings:  # to_empty makes a fresh tensor per module: tie again
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, weights)
    model = model.to(dtype).eval()
    model.set_rope(max_len)
    return model
