"""A step's layers in one native call (`ForwardPlan` in kernels/paged_attention.cpp).

The plan is built once per (model, KV pool) from the model's own modules and holds
references to their weights and to the pool's caches, so it runs exactly the kernels the
module path runs, in the same order. A model or layer the plan cannot express (Mixtral's
experts, a projection of another kind) simply has no plan and takes the module path. LoRA
rows are added inside the plan after each projection by the LoRA kernel's C entry
(engine/lora.py `native_hook`); without that kernel, steps with adapter rows take the
module path.
"""
from __future__ import annotations

from torch import nn

from ..kernels import native
from .llama import MLP, CausalLM, KVPool
from .quant import AutoLinear, Int4Linear, Int8Linear, PackedLinear, W8A8Linear

# LinearKind in paged_attention.cpp
DENSE, PACKED, INT8, INT4, W8A8, W8A8_PACKED, BF16_PACKED, BF16_PACKED_SWIGLU = range(8)


def linear_spec(m: nn.Module) -> tuple | None:
    """(kind, weight, extra, bias, group, max_rows, dense, dense_kind, sums128, bands) for the
    native plan, None if it cannot run `m` (LinearSpec in paged_attention.cpp). bands: our
    packed kernels' variant per row band (kernels/select.py)."""
    if type(m) is nn.Linear:
        return DENSE, m.weight, None, m.bias, 0, 0, None, DENSE, None, ()
    if type(m) is PackedLinear:
        kind = (BF16_PACKED_SWIGLU if m.swiglu else BF16_PACKED) if m.own else PACKED
        return kind, m.packed, None, m.bias, 0, 0, None, DENSE, None, m.bands
    if type(m) is Int8Linear:
        return INT8, m.weight, m.scales, m.bias, 0, 0, None, DENSE, None, ()
    if type(m) is Int4Linear:
        return INT4, m.weight, m.scales_and_zeros, m.bias, m.GROUP_SIZE, 0, None, DENSE, None, ()
    if type(m) is W8A8Linear:
        if m.emulated:
            return None
        return W8A8_PACKED if m.own else W8A8, m.packed, m.scales, m.bias, 0, 0, None, DENSE, m.sums128, m.bands
    if type(m) is AutoLinear:
        small, dense = linear_spec(m.small), linear_spec(m.dense)
        return *small[:5], m.max_rows, dense[1], dense[0], small[8], dense[9]
    return None


def _base(m: nn.Module) -> nn.Module:
    """The projection under a LoRA wrapper (the plan adds the LoRA deltas itself, see run)."""
    return getattr(m, "base", m)


def build_plan(model: CausalLM, pool: KVPool):
    """The native plan for this model and pool, or None."""
    kernels = native()
    if kernels is None:
        return None
    args = model.args
    plan = kernels.ForwardPlan(args.num_heads, args.num_kv_heads, args.head_dim, args.sliding_window or 0,
                              args.rms_norm_eps, model.rope_cos, model.rope_sin)
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.mlp, MLP):
            return None
        attn, mlp = layer.self_attn, layer.mlp
        specs = [linear_spec(_base(m)) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(s is None for s in specs) or layer.input_layernorm.eps != args.rms_norm_eps:
            return None
        cache = pool.layer(i)
        plan.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, cache.k, cache.v,
                       *specs, cache.k_scale, cache.v_scale)
    return plan
