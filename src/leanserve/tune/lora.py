"""LoRA training on the weights the server serves, saved as a PEFT folder.

The base is read with the server's own loader (`load_model_files`: the dequantized GGUF of
the built-in model, or a Hugging Face folder) and kept in float32 (bfloat16 is emulated on
CPUs without AVX-512 BF16, and slow). The forward pass is the Llama math of models/llama.py
(its rotary tables, RMSNorm, SwiGLU) written once more as plain differentiable torch over a
padded batch: the served model's forward is inference-only, over a paged cache and native
kernels with no backward. Only the LoRA factors have gradients; the logits (the vocabulary
matmul, the largest single product of a small model) are computed only at the positions
that are trained on.

The adapter is peft's: per target projection lora_A [r, in] (Kaiming-uniform, as peft
initialises it) and lora_B [out, r] (zeros), delta = (x @ A^T @ B^T) * alpha / r; saved as
adapter_config.json + adapter_model.safetensors with peft's key names, which peft loads
over transformers and engine/lora.py serves.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ModelLoadError
from ..models.llama import ModelArgs, rope_inv_freq, rotate

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PART = {t: ("self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp") for t in TARGETS}


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS


class BaseModel:
    """Frozen float32 weights by their Hugging Face names, plus the model's arguments."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], name: str, max_len: int = 2048):
        self.args = ModelArgs.from_hf_config(config)
        if self.args.num_experts:
            raise ModelLoadError("training LoRA on Mixtral (mixture-of-experts) models is not supported")
        self.name = name
        self.w = {k: v.float().contiguous() for k, v in weights.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float), rope_inv_freq(self.args, max_len))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.max_len = max_len

    @classmethod
    def load(cls, model: str | None, max_len: int = 2048) -> "BaseModel":
        from ..models.loader import load_model_files

        files = load_model_files(model)
        base = cls(files.config, files.weights, files.name, max_len)
        base.tokenizer = files.tokenizer
        return base

    def shape(self, layer: int, target: str) -> tuple[int, int]:
        out, d_in = self.w[f"model.layers.{layer}.{_PART[target]}.{target}.weight"].shape
        return d_in, out


class LoRA:
    """The trainable factors of one adapter over a BaseModel."""

    def __init__(self, base: BaseModel, config: LoRAConfig, seed: int = 0):
        self.base, self.config = base, config
        self.scale = config.alpha / config.rank
        gen = torch.Generator().manual_seed(seed)
        self.params: dict[str, torch.Tensor] = {}
        for layer in range(base.args.num_layers):
            for t in config.targets:
                d_in, out = base.shape(layer, t)
                a = torch.empty(config.rank, d_in)
                bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
                a.uniform_(-bound, bound, generator=gen)
                self.params[self.key(layer, t, "A")] = a.requires_grad_()
                self.params[self.key(layer, t, "B")] = torch.zeros(out, config.rank).requires_grad_()

    @staticmethod
    def key(layer: int, target: str, ab: str) -> str:
        return f"base_model.model.model.layers.{layer}.{_PART[target]}.{target}.lora_{ab}.weight"

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def proj(self, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        w = self.base.w
        prefix = f"model.layers.{layer}.{_PART[target]}.{target}"
        y = F.linear(x, w[f"{prefix}.weight"], w.get(f"{prefix}.bias"))
        a = self.params.get(self.key(layer, target, "A"))
        if a is None:
            return y
        return y + F.linear(F.linear(x, a), self.params[self.key(layer, target, "B")]) * self.scale

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [B, T, hidden] of right-padded ids [B, T] (causal
        attention: a real token never sees the padding after it)."""
        base, args, w = self.base, self.base.args, self.base.w
        B, T = ids.shape
        nh, nkv, hd = args.num_heads, args.num_kv_heads, args.head_dim
        cos, sin = base.cos[:T, None, :], base.sin[:T, None, :]  # [T, 1, D]
        x = F.embedding(ids, w["model.embed_tokens.weight"])
        for i in range(args.num_layers):
            pre = f"model.layers.{i}"
            h = F.rms_norm(x, (x.shape[-1],), w[f"{pre}.input_layernorm.weight"], args.rms_norm_eps)
            q = rotate(self.proj(h, i, "q_proj").view(B, T, nh, hd), cos, sin)
            k = rotate(self.proj(h, i, "k_proj").view(B, T, nkv, hd), cos, sin)
            v = self.proj(h, i, "v_proj").view(B, T, nkv, hd)
            window = args.sliding_window
            mask = None
            if window and window < T:
                pos = torch.arange(T)
                mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            x = x + self.proj(o.transpose(1, 2).reshape(B, T, nh * hd), i, "o_proj")
            h = F.rms_norm(x, (x.shape[-1],), w[f"{pre}.post_attention_layernorm.weight"], args.rms_norm_eps)
            x = x + self.proj(F.silu(self.proj(h, i, "gate_proj")) * self.proj(h, i, "up_proj"), i, "down_proj")
        return F.rms_norm(x, (x.shape[-1],), w["model.norm.weight"], args.rms_norm_eps)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(summed cross-entropy over the trained tokens, trained tokens, correct argmaxes).
        mask[b, t] = 1: token t is a target, predicted at position t - 1."""
        h = self.hidden(ids)
        target = mask[:, 1:].bool()
        rows = h[:, :-1][target]
        logits = F.linear(rows, self.base.w["lm_head.weight"])
        labels = ids[:, 1:][target]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        correct = int((logits.detach().argmax(-1) == labels).sum())
        return loss, len(labels), correct

    # -- files --------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.params.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(v)

    def save(self, path: str) -> None:
        """A PEFT LoRA folder; written to a temporary name first, then renamed."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base.name,
               "r": self.config.rank, "lora_alpha": self.config.alpha, "lora_dropout": 0.0, "bias": "none",
               "target_modules": list(self.config.targets), "fan_in_fan_out": False, "inference_mode": True,
               "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
               "revision": None}
        tmp = os.path.join(path, ".adapter_model.safetensors.tmp")
        save_file(self.state(), tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, ".adapter_config.json.tmp"), "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(os.path.join(path, ".adapter_config.json.tmp"), os.path.join(path, "adapter_config.json"))


def batch_tensors(rows, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and masks [B, T] of Rendered rows."""
    T = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r.ids)] = torch.tensor(r.ids)
        mask[b, :len(r.mask)] = torch.tensor(r.mask)
    return ids, mask
