"""BERT-style encoders (the transformer inside sentence-embedding models) in one file.

A batch of sequences runs packed, as the Llama family does: the T tokens of all sequences go
through every projection as one [T, hidden] matrix, so a short sentence next to a long one
costs no padding there. Only attention looks at sequences one at a time: it scatters the
rows of each run of equal-length neighbours into one SDPA call (sorting a batch by length
makes the runs long), so nothing is padded or masked anywhere.

Each sequence's states do not depend on the others in its batch, bit for bit in float32
here: `Packing` rounds the row count up to a multiple of 4, because MKL's sgemm sums a row
differently when fewer than 12 rows that are not a multiple of 4 share the call.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..errors import ModelLoadError

# hidden_act -> (oneDNN post-op, its algorithm), as torch.ops.mkldnn._linear_pointwise takes them
ACTIVATIONS = {"gelu": ("gelu", "none"), "relu": ("relu", ""), "gelu_new": ("gelu", "tanh"),
               "gelu_pytorch_tanh": ("gelu", "tanh")}
ROW_MULTIPLE = 4


@dataclass
class BertArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "BertArgs":
        if cfg.get("model_type") != "bert" and "BertModel" not in (cfg.get("architectures") or []):
            raise ModelLoadError(f"not a BERT model (model_type {cfg.get('model_type')!r}); supported: BertModel")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported")
        if cfg.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {cfg['hidden_act']!r} is not supported: {', '.join(ACTIVATIONS)}")
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg["max_position_embeddings"], cfg.get("type_vocab_size", 2),
                   cfg.get("layer_norm_eps", 1e-12), cfg.get("hidden_act", "gelu"))


class Packing:
    """Where a batch's sequences sit in the packed [T, hidden] matrix: sequence after
    sequence, then up to 3 filler rows; `runs` groups neighbours of equal length, which
    share one attention call (sorting a batch by length makes the runs long)."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths
        self.tokens = sum(lengths)
        self.rows = -(-self.tokens // ROW_MULTIPLE) * ROW_MULTIPLE
        n = torch.tensor(lengths)
        seq = torch.repeat_interleave(torch.arange(len(lengths)), n)
        starts = torch.cumsum(n, 0) - n
        self.positions = torch.arange(self.tokens) - starts[seq]
        self.runs = []  # [first row, sequences, length] of each run of equal-length sequences
        row = 0
        for length in lengths:
            if self.runs and self.runs[-1][2] == length:
                self.runs[-1][1] += 1
            else:
                self.runs.append([row, 1, length])
            row += length


class DnnLinear(nn.Module):
    """A linear layer (+ activation) with its weight reordered once for oneDNN, which then
    adds the bias and applies the activation inside the product."""

    def __init__(self, linear: nn.Linear, act: str = "none"):
        super().__init__()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
        self.bias = linear.bias
        self.post, self.algorithm = ACTIVATIONS[act] if act != "none" else ("none", "")

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.post, [], self.algorithm)


class Layer(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        h = a.hidden_size
        self.heads, self.act = a.num_heads, a.hidden_act
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=a.layer_norm_eps)
        self.up = nn.Linear(h, a.intermediate_size)
        self.down = nn.Linear(a.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=a.layer_norm_eps)

    def attention(self, qkv: torch.Tensor, p: Packing) -> torch.Tensor:
        """Each run of equal-length sequences in one SDPA call, with no padding and no mask."""
        width = qkv.shape[1]
        head_dim = width // 3 // self.heads
        outs = []
        for row, n, length in p.runs:
            q, k, v = qkv[row:row + n * length].view(n, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
            outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * length, width // 3))
        if p.rows > p.tokens:
            outs.append(qkv.new_zeros(p.rows - p.tokens, width // 3))
        return torch.cat(outs)

    def forward(self, x: torch.Tensor, p: Packing) -> torch.Tensor:
        x = self.attn_norm(x + self.out(self.attention(self.qkv(x), p)))
        h = self.up(x)
        if isinstance(self.up, nn.Linear):
            post, algorithm = ACTIVATIONS[self.act]
            h = F.relu(h) if post == "relu" else F.gelu(h, approximate=algorithm)
        return self.mlp_norm(x + self.down(h))


class BertEncoder(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.args = args
        h = args.hidden_size
        self.word_embeddings = nn.Embedding(args.vocab_size, h)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=args.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.num_layers))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, p: Packing) -> torch.Tensor:
        """Token ids of the sequences one after another [T] -> last hidden states [T, hidden]
        (token type 0 throughout, as a single-text sentence embedding has)."""
        filler = ids.new_zeros(p.rows - p.tokens)
        positions = torch.cat([p.positions, filler])
        x = self.word_embeddings(torch.cat([ids, filler])) + self.position_embeddings(positions) \
            + self.token_type_embeddings.weight[0]
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, p)
        return x[:p.tokens]


# HF BertModel name (after any "bert." prefix) -> ours; a layer's q, k, v go into one qkv.
_LAYER_NAMES = {"attention.output.dense": "out", "attention.output.LayerNorm": "attn_norm",
                "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "mlp_norm"}
_EMBED_NAMES = {"embeddings.word_embeddings": "word_embeddings", "embeddings.position_embeddings": "position_embeddings",
                "embeddings.token_type_embeddings": "token_type_embeddings", "embeddings.LayerNorm": "embed_norm"}


def _our_name(name: str) -> str | None:
    name = name.removeprefix("bert.")
    module, _, kind = name.rpartition(".")
    kind = {"gamma": "weight", "beta": "bias"}.get(kind, kind)  # old checkpoints' LayerNorm names
    if module in _EMBED_NAMES:
        return f"{_EMBED_NAMES[module]}.{kind}"
    if module.startswith("encoder.layer."):
        i, _, rest = module.removeprefix("encoder.layer.").partition(".")
        if rest in _LAYER_NAMES:
            return f"layers.{i}.{_LAYER_NAMES[rest]}.{kind}"
        if rest in ("attention.self.query", "attention.self.key", "attention.self.value"):
            return f"layers.{i}.{rest.rpartition('.')[2]}.{kind}"  # fused below
    return None  # pooler, position_ids, MLM heads: not used


def load_bert(path: str, dtype: torch.dtype = torch.float32) -> BertEncoder:
    """The encoder of a Hugging Face BertModel folder (config.json + model.safetensors)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            args = BertArgs.from_hf_config(json.load(f))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot read config.json: {e}") from e
    weights = {}
    try:
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            for name in f.keys():
                if (ours := _our_name(name)) is not None:
                    weights[ours] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types, OSError, or ValueError
        raise ModelLoadError(f"{path}: cannot read model.safetensors: {e}") from e
    for i in range(args.num_layers):
        for kind in ("weight", "bias"):
            parts = [weights.pop(f"layers.{i}.{n}.{kind}", None) for n in ("query", "key", "value")]
            if all(t is not None for t in parts):
                weights[f"layers.{i}.qkv.{kind}"] = torch.cat(parts)
    with torch.device("meta"):
        model = BertEncoder(args)
    missing = set(model.state_dict()) - set(weights)
    if missing:
        raise ModelLoadError(f"{path}: model.safetensors lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
    return model.eval()


def pack(model):
    for layer in model.layers:
        layer.qkv, layer.out, layer.down = DnnLinear(layer.qkv), DnnLinear(layer.out), DnnLinear(layer.down)
        layer.up = DnnLinear(layer.up, layer.act)
