"""The Llama family (Llama, Mistral, Qwen2, Qwen3) and Mixtral in one file, over a paged KV cache.

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
from ..kernels import first_argmax, native

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM")


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
    rope_freq_factors: tuple[float, ...] | None = None  # a GGUF's rope_freqs: divide each frequency
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head before RoPE
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
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not cfg.get("use_sliding_window", False):
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
            rope_freq_factors=tuple(cfg["rope_freq_factors"]) if cfg.get("rope_freq_factors") else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM",
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
    """Inverse frequencies with the config's scaling (default, linear, dynamic NTK, llama3) and a
    GGUF's per-frequency factors."""
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
    if args.rope_freq_factors is not None:
        # llama.cpp's form of Llama 3.1 scaling (any scaling, in fact): one divisor per frequency
        if len(args.rope_freq_factors) != dim // 2:
            raise ModelLoadError(f"rope_freqs has {len(args.rope_freq_factors)} factors; head_dim {dim} "
                                 f"has {dim // 2} frequencies")
        inv_freq = inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
    return inv_freq


@dataclass
class AttnBatch:
    """Where one step's tokens read and write keys and values in the paged pool, as tensors
    built once per step by the runner and shared by every layer.

    Decodes come first in the flat batch: rows [0, B) are one token each, each with its
    sequence's block table and key count (with the native kernels the runner makes every row
    of the step such a row, a prompt's too: B = all rows, no chunks). Prefill chunks follow;
    chunk i covers rows [start, start + length) and, when it continues a sequence (or the
    pool is int8), reads its keys from `ctx` whole blocks of the pool.
    """

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    decode_blocks: torch.Tensor  # [B, W] block table of each decode, padded with block 0
    decode_lens: torch.Tensor  # [B] keys of each decode, its new token included
    prefill_meta: torch.Tensor  # [P, 3] int64: start row, length, context blocks (0: chunk alone)
    prefill_blocks: torch.Tensor  # the context blocks of all chunks, concatenated
    # Both made at their first use in a step, one per window (Gemma 3 mixes windowed and global layers):
    decode_mask: dict = field(default_factory=dict)  # window -> decode_visible(), the torch fallback only
    chunks: dict = field(default_factory=dict)  # window -> prefill_chunks()

    @classmethod
    def prefill(cls, n: int) -> "AttnBatch":
        """One fresh sequence of n tokens written to slots [0, n)."""
        none = torch.zeros(0, dtype=torch.long)
        return cls(torch.arange(n), none.view(0, 1), none, torch.tensor([[0, n, 0]]), none)

    def prefill_chunks(self, positions: torch.Tensor, block_size: int, window: int, dtype: torch.dtype) -> list:
        """The prefill chunks as attention takes them: (start row, length, context blocks or
        None, additive mask [1, 1, length, keys] or None for plain causal, count). Adjacent
        fresh chunks of one length (plain causal over their own keys) are one entry of
        `count` chunks, rows [start, start + count * length): one SDPA call takes them as a
        batch, with the same numbers as one call each (SDPA's rows do not depend on the
        batch): 0.68x the time for four 128-token chunks, and a prefill of 64 such prompts
        went from 156 to 147 µs per token. Built at the first layer and reused by the others
        (rebuilding the masks per layer, and SDPA converting bool masks, were ~8% of a
        cached-prefix prefill); the native plan takes the same list."""
        if window not in self.chunks:
            chunks, offset = [], 0
            for start, length, ctx in self.prefill_meta.tolist():
                blocks = self.prefill_blocks[offset:offset + ctx] if ctx else None
                offset += ctx
                mask = None
                if ctx or window:  # over its context blocks, or itself under a sliding window
                    q_pos = positions[start:start + length, None]
                    k_pos = torch.arange(ctx * block_size) if ctx else positions[start:start + length]
                    mask = torch.zeros(length, len(k_pos), dtype=dtype)
                    mask = mask.masked_fill_(~visible(q_pos, k_pos[None, :], window), float("-inf"))[None, None]
                last = chunks[-1] if chunks else None
                if (mask is None and last is not None and last[3] is None and last[2] is None and last[1] == length
                        and last[0] + last[4] * length == start):
                    chunks[-1] = (*last[:4], last[4] + 1)
                else:
                    chunks.append((start, length, blocks, mask, 1))
            self.chunks[window] = chunks
        return self.chunks[window]

    def decode_visible(self, block_size: int, window: int) -> torch.Tensor:
        """[B, 1, 1, W * block_size] bool: the padded keys each decode may see (for SDPA)."""
        if window not in self.decode_mask:
            k_pos = torch.arange(self.decode_blocks.shape[1] * block_size)[None, :]
            self.decode_mask[window] = visible(self.decode_lens[:, None] - 1, k_pos, window)[:, None, None, :]
        return self.decode_mask[window]


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 keys or values: each [..., D] row times 127 / its absmax, rounded half to even,
    bit-equal with `write_kv` in the native kernels. Returns (int8 rows, float32 scales
    [...] = absmax / 127; NaN for a row holding inf or NaN, so attention over it is NaN)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    finite = torch.isfinite(x).all(dim=-1)
    inv = torch.where((amax > 0) & finite, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))  # one division
    q = torch.round(torch.nan_to_num(x, 0.0, 0.0, 0.0) * inv[..., None])
    scale = amax * (1 / 127)  # a multiply, as in the native writer
    return q.to(torch.int8), torch.where(finite, scale, torch.full_like(amax, float("nan")))


@dataclass
class LayerCache:
    """One layer's keys and values in the pool: [blocks, block_size, kv_heads, head_dim] each;
    int8 caches also hold one float32 scale per (slot, kv head)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        nkv, hd = k.shape[1], k.shape[2]
        if self.k_scale is not None and (kernels := native()) is not None:  # the fused plan's numbers
            kernels.write_kv(k.reshape(len(k), -1), slots, self.k, self.k_scale)
            kernels.write_kv(v.reshape(len(v), -1), slots, self.v, self.v_scale)
            return
        if self.k_scale is None:
            self.k.view(-1, nkv, hd).index_copy_(0, slots, k)
            self.v.view(-1, nkv, hd).index_copy_(0, slots, v)
            return
        for x, cache, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, s = quantize_kv(x)
            cache.view(-1, nkv, hd).index_copy_(0, slots, q)
            scales.view(-1, nkv).index_copy_(0, slots, s)

    def gather(self, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks' keys and values as [len(blocks) * block_size, kv_heads, head_dim] in `dtype`
        (index_select copies whole blocks: far faster than indexing)."""
        out = []
        kernels = native() if self.k_scale is not None else None
        for cache, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            if kernels is not None:  # the same numbers in one pass (gather_dequant)
                out.append(kernels.gather_dequant(cache, scales, blocks, dtype))
                continue
            x = cache.index_select(0, blocks).flatten(0, 1)
            if scales is not None:
                x = (x.float() * scales.index_select(0, blocks).flatten(0, 1)[..., None]).to(dtype)
            out.append(x)
        return out[0], out[1]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, positions: torch.Tensor,
                    batch: AttnBatch, window: int, scale: float | None = None) -> torch.Tensor:
    """Writes the step's keys/values into one layer's cache, then attends. q: [T, H, D];
    k, v: [T, Hkv, D]; `scale` multiplies the scores (default head_dim ** -0.5)."""
    nkv, hd = k.shape[1], k.shape[2]
    bs = cache.k.shape[1]
    cache.write(batch.slot_mapping, k, v)
    decode_blocks = batch.decode_blocks
    out = torch.empty_like(q)
    if (B := decode_blocks.shape[0]) and (kernels := native()) is not None:
        out[:B] = kernels.paged_decode_attention(q[:B], cache.k, cache.v, decode_blocks, batch.decode_lens, window,
                                                 scale or hd ** -0.5, cache.k_scale, cache.v_scale)
    elif B:
        qd = q[:B].unsqueeze(2)  # [B, H, 1, D]
        kd, vd = cache.gather(decode_blocks.view(-1), q.dtype)
        kd = kd.view(B, -1, nkv, hd).transpose(1, 2)  # [B, Hkv, K, D]
        vd = vd.view(B, -1, nkv, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_visible(bs, window), scale=scale,
                                           enable_gqa=True)
        out[:B] = o.squeeze(2)
    for start, length, blocks, mask, count in batch.prefill_chunks(positions, bs, window, q.dtype):
        rows = slice(start, start + count * length)
        if blocks is None:
            ks, vs = k[rows], v[rows]
        else:
            ks, vs = cache.gather(blocks, q.dtype)
        o = F.scaled_dot_product_attention(
            q[rows].unflatten(0, (count, -1)).transpose(1, 2), ks.unflatten(0, (count, -1)).transpose(1, 2),
            vs.unflatten(0, (count, -1)).transpose(1, 2), attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=True)
        out[rows].unflatten(0, (count, -1)).copy_(o.transpose(1, 2))  # one strided copy
    return out


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[q, k] bool: causal, and inside the sliding window when the model has one."""
    ok = k_pos <= q_pos
    if window:
        ok &= q_pos - k_pos < window
    return ok


class KVPool:
    """Keys and values, preallocated: per layer one [blocks, block_size, kv_heads, head_dim]
    tensor each, so a layer's cache is one plain contiguous tensor for the native kernels.
    `dtype` is the cache's: the model's, or torch.int8 (then with float32 scales per slot and
    kv head, [blocks, block_size, kv_heads]: half the bytes each decode step reads)."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype):
        shape = (num_blocks, block_size, args.num_kv_heads, args.head_dim)
        self.dtype = dtype
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(args.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(args.num_layers)]
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = [torch.zeros(shape[:3], dtype=torch.float32) for _ in range(args.num_layers)]
            self.v_scale = [torch.zeros(shape[:3], dtype=torch.float32) for _ in range(args.num_layers)]

    def layer(self, i: int) -> LayerCache:
        if self.k_scale is None:
            return LayerCache(self.k[i], self.v[i])
        return LayerCache(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        """Normalises x; with `residual`, first adds x into it in place and normalises the sum."""
        if (kernels := native()) is not None:
            return kernels.rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual.add_(x)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class Rope:
    """Rotary tables: float32 [max_len, head_dim] for the native kernel; the torch fallback
    also gets this step's rows, [T, 1, head_dim] in the model dtype."""

    cos_table: torch.Tensor
    sin_table: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def rotate(x, cos, sin):
    """Rotary embedding, half-split layout (the Hugging Face weight order). x: [T, heads, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    scale = None  # of the scores; None: head_dim ** -0.5

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = args.num_heads, args.num_kv_heads, args.head_dim
        self.window = args.sliding_window or 0
        self.qkv_proj = nn.Linear(args.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, args.rms_norm_eps)

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv with each query and key head normalised (Qwen3, Gemma 3): new [T, width] rows."""
        T, q_width, kv_width = qkv.shape[0], self.nh * self.hd, self.nkv * self.hd
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        q = self.q_norm(q.reshape(T * self.nh, self.hd).contiguous()).view(T, q_width)
        k = self.k_norm(k.reshape(T * self.nkv, self.hd).contiguous()).view(T, kv_width)
        return torch.cat([q, k, v], dim=-1)

    def forward(self, x, rope: "Rope", positions, batch: AttnBatch, cache: LayerCache):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if hasattr(self, "q_norm"):
            qkv = self.norm_qk(qkv)
        if (kernels := native()) is not None:
            kernels.rope_(qkv, positions, rope.cos_table, rope.sin_table, self.nh + self.nkv, self.hd)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k, v = q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd), v.view(T, self.nkv, self.hd)
        if kernels is None:
            q, k = rotate(q, rope.cos, rope.sin), rotate(k, rope.cos, rope.sin)
        out = paged_attention(q, k, v, cache, positions, batch, self.window, self.scale)
        return self.o_proj(out.view(T, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matrix."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if (kernels := native()) is not None:
            return self.down_proj(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
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

    def forward(self, x, residual, rope, positions, batch, cache: LayerCache):
        """x: the previous layer's output (or the embeddings); residual: the stream x is added
        into, in place (None in the first layer: x starts it). Returns this layer's output
        and the residual stream, as vLLM does, so each add fuses into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, positions, batch, cache)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    # Steps run all layers in one native call when the kernels are built (models/fused.py);
    # False forces the module path (tests compare the two).
    fused = True
    _plan = None  # (pool, plan)

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
        self._plan = None

    def plan(self, pool: KVPool):
        """The native plan of this model over `pool` (built at first use), or None."""
        if not self.fused or native() is None or self.args.qk_norm:  # the plan has no q/k norms
            return None
        if self._lora_hook() is False:
            return None  # LoRA rows the plan cannot add (no native LoRA kernel): the wrapped modules
        if self._plan is None or self._plan[0] is not pool:
            from .fused import build_plan

            self._plan = (pool, build_plan(self, pool))
        return self._plan[1]

    def _lora_hook(self) -> tuple | None | bool:
        """This step's LoRA entry for the native plan (engine/lora.py `native_hook`): None
        when no row has an adapter, False when some do but the LoRA kernel is unavailable."""
        lora = getattr(self, "_lora_manager", None)
        if lora is None or lora.step is None:
            return None
        return lora.native_hook() or False

    @torch.inference_mode()
    def forward(self, input_ids, positions, batch: AttnBatch, pool: KVPool, logit_rows, float_logits: bool = True,
                greedy: bool = False):
        """Runs the step's tokens; returns the logits of the rows in `logit_rows` only, in
        float32, or with `float_logits=False` in the model dtype (the engine converts only
        what sampling needs: at 128 rows the float32 copy alone was ~4 ms of a decode step).
        `greedy`: those rows' first argmax over the model-dtype logits instead ([rows] int64),
        from the lm_head's own kernel where it has one (no logits written out)."""
        x = self.embed_tokens(input_ids)
        if (plan := self.plan(pool)) is not None:
            x, residual = plan.run(x, positions, batch.slot_mapping, batch.decode_blocks, batch.decode_lens,
                                   batch.prefill_chunks(positions, pool.k[0].shape[1], self.args.sliding_window or 0,
                                                        x.dtype), *(self._lora_hook() or ()))
            return self._logits(x, residual, logit_rows, float_logits, greedy)
        rope = Rope(self.rope_cos, self.rope_sin)
        if native() is None:  # the torch fallback rotates with per-token rows in the model dtype
            rope.cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)
            rope.sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, positions, batch, pool.layer(i))
        return self._logits(x, residual, logit_rows, float_logits, greedy)

    def _logits(self, x, residual, rows, float_logits: bool, greedy: bool = False) -> torch.Tensor:
        h = self.norm(x[rows], residual[rows])
        if greedy:
            fused = getattr(self.lm_head, "argmax", None)
            tokens = fused(h) if fused is not None else None
            if tokens is None:
                tokens = first_argmax(self.lm_head(h))
            return tokens
        logits = self.lm_head(h)
        return logits.float() if float_logits else logits


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
        if args.qk_norm:
            for norm in ("q_norm", "k_norm"):
                wanted[f"{ours}.self_attn.{norm}.weight"] = weights.get(f"{attn}.{norm}.weight")
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
    if "Gemma3ForCausalLM" in (config.get("architectures") or []):
        from .gemma3 import build_model as build_gemma3

        return build_gemma3(config, weights, dtype, max_len)
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
