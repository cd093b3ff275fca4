"""Quantization of the linear layers: weight-only `--quantization int8 | int4 | auto`, and
`w8a8` (int8 activations too, W8A8Linear below).

Decoding a few sequences on a CPU is bound by reading weights, so weights stored in fewer
bytes make a step faster, while activations stay in the compute dtype. Large batches are
bound by arithmetic instead, and there the bf16 matrix units beat both weight-only kernels
(on SmolLM2-135M shapes bf16 wins from 5 rows up against int8, from ~12 against int4). So
`auto` keeps both int8 and bf16 weights and picks per call by the number of rows, and `int4`
does the same with int4 weights: through the int4 kernel alone a 128-token prefill of the
built-in model took 177 ms, 5x bf16's 35. Both cost the bf16 weights' memory on top. `int8`
keeps only int8 weights: the choice that saves memory, at the price of slow prefills.

Embeddings, norms and Mixtral's router stay in the compute dtype. A tied lm_head gets its
own quantized copy; the embedding lookup keeps reading the original. Under `int4` the
lm_head is `auto` (int8 for few rows): 4 bits cost it ~9% relative weight error (1% in int8) and changed the
built-in model's greedy tokens from the first few on.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import int8_dot_products, native, select
from .llama import MLP, AttnBatch, CausalLM, KVPool, SparseMoE, quantize_kv

METHODS = ("int8", "int4", "auto", "w8a8")

# Rows up to which `auto` uses the int8 kernel. The kernel works on 4 rows at a time: on the
# SmolLM2-135M shapes (2 threads) one step of projections took 18 ms in int8 vs 26 in bf16
# at 4 rows, and 28 vs 27 at 5 rows; from 5 rows on bf16 is as fast or faster.
AUTO_MAX_ROWS = 4
# Rows up to which `int4` uses the int4 kernel. Decode step of the built-in model, 2 threads,
# int4 kernel vs bf16 (ms): 1 row 8.3 / 16.7, 4 rows 12.3 / 17.6, 6 rows 17.8 / 18.5, 8 rows
# 19.9 / 19.2, 16 rows 33.4 / 22.4.
INT4_MAX_ROWS = 6
# The same two when the bf16 weights run in our packed kernel (PackedLinear.own), measured on
# the AMX-BF16 tiles: a decode step's projections plus lm_head, int8 / int4 / bf16 tiles
# (ms): 1 row 10.8 / 7.6 / 10.8, 4 rows 14.0 / 10.0 / 10.8, 6 rows 21.9 / 15.4 / 11.0. int8
# only ties at one row; int4 pays up to 4.
AMX_AUTO_MAX_ROWS, AMX_INT4_MAX_ROWS = 1, 4
# And when they run on AVX512-BF16 dot products (no tiles; AMD Zen 4, 2 threads, the same
# step, medians of 9 alternating rounds): int8 / int4 / bf16 (ms) 1 row 18.1 / 8.9 / 12.8,
# 3 rows 24.6 / 12.4 / 14.1, 4 rows 25.1 / 13.6 / 15.5, 5 rows 33.3 / 21.5 / 14.4. int8
# never pays there (`auto` stays on bf16); int4 pays up to 4 rows.
AVX512_AUTO_MAX_ROWS, AVX512_INT4_MAX_ROWS = 0, 4


def pack_for_tiles(w: torch.Tensor) -> torch.Tensor:
    """An [n, k] weight (int8 or bf16) in the AMX B-tile layout the native kernels read:
    [n / 16, k / g, 16, g] with g the inputs of one 64-byte tile row (64 int8, 32 bf16); tile
    row r holds, for each of 16 output columns, the 4 (int8) or 2 (bf16) consecutive inputs
    that one tile instruction multiplies together."""
    n, k = w.shape
    pair = 4 // w.element_size()  # inputs per 32-bit lane
    g = 16 * pair
    return w.reshape(n // 16, 16, k // g, 16, pair).permute(0, 2, 3, 1, 4).reshape(n // 16, k // g, 16, g).contiguous()


class Int8Linear(nn.Module):
    """int8 weights with one scale per output channel (symmetric: scale = absmax / 127).

    `aten._weight_int8pack_mm` dequantizes inside the kernel; it wants the activations and
    the scales in the same dtype (bf16, fp16 or fp32). It is batch-invariant: each row's
    result is bitwise the same whatever other rows share the call.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(linear.weight.dtype)
        # Round against the scale as stored, so weight * scale is the closest int8 value.
        self.register_buffer("weight", (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class Int4Linear(nn.Module):
    """4-bit weights in groups of `GROUP_SIZE` inputs, each group with a scale and an offset.

    `aten._weight_int4pack_mm_for_cpu` computes w = (q - 8) * scale + zero for q in 0..15
    from a packed layout made by `_convert_weight_to_int4pack_for_cpu`. It needs
    out_features % 16 == 0, in_features % GROUP_SIZE == 0 and contiguous activations.
    """

    GROUP_SIZE = 32  # 64 is no faster here; 128 does not divide SmolLM2's hidden size 576

    def __init__(self, linear: nn.Linear):
        super().__init__()
        dtype, (n, k) = linear.weight.dtype, linear.weight.shape
        w = linear.weight.detach().float().view(n, k // self.GROUP_SIZE, self.GROUP_SIZE)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(dtype)
        zero = (lo + 8 * scale.float()).to(dtype)
        q = ((w - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32), 1)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.bias = linear.bias
        self.in_features, self.out_features = k, n

    @classmethod
    def fits(cls, linear: nn.Linear) -> bool:
        return linear.out_features % 16 == 0 and linear.in_features % cls.GROUP_SIZE == 0

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.GROUP_SIZE, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.GROUP_SIZE}"


class W8A8Linear(nn.Module):
    """int8 weights (one scale per output channel, as Int8Linear) times int8 activations
    (one scale per row, made at each call): `--quantization w8a8`.

    Weight-only kernels stop paying from a few rows up, because they dequantize into bf16
    arithmetic; this one multiplies int8 by int8, so it halves the weight bytes and doubles
    the matrix units' rate at every batch size. Where the CPU has AMX-INT8 or AVX512-VNNI the
    product runs in our own kernel (`w8a8_linear_packed`: the weight packed for the tiles at
    load; on the tiles, else on VNNI dot products), elsewhere in oneDNN, and on CPUs without
    exact int8 dot products (AVX2 only: `int8_dot_products`) as float32 products of the same
    int8 values (exact while a row's sums stay under 2**24: K * 127**2, K up to 1040; no
    faster than float32 there, but the same numbers as elsewhere). On SmolLM2-135M's
    shapes, 2 threads, one layer's four projections took 184 us at 64 rows on the tiles, 328
    through oneDNN and ~450 in packed bf16 (one row: 104, 177, ~290). The price is accuracy: quantizing activations puts the built-in model's chosen-token
    log-probabilities ~0.13 off transformers' on average (bf16: ~0.02), ~0.08 after the
    engine's smoothing (smooth_for_w8a8), so it is opt-in, like vLLM's W8A8 checkpoints. The int32 sums are exact and the scales per row, so both paths
    give the same bits and a row's result does not depend on the rows it shares a call with.
    """

    def __init__(self, linear: nn.Linear, own: bool = True):
        """own=False keeps oneDNN's layout even where our kernel could run (tests compare the two)."""
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        kernels = native()
        n, k = q.shape
        self.own = own and bool(select.variants(True)) and n % 16 == 0 and k % 64 == 0
        self.amx = self.own and kernels.amx_int8_available()  # on the tiles (else AVX512-VNNI or AVX2)
        self.bands = ()  # (up to rows, variant): kernels/select.py's choice; none: the first variant here
        self.emulated = not self.own and not int8_dot_products()
        if self.emulated:
            packed = q.float()
        else:
            packed = pack_for_tiles(q) if self.own else torch.ops.onednn.qlinear_prepack(q, None)
        self.register_buffer("packed", packed.contiguous())
        # the VNNI path's 128 x column sums, made once here rather than in every call
        self.register_buffer("sums128", kernels.w8a8_column_sums(self.packed) if self.own else None)
        self.register_buffer("scales", scales)  # float32, as oneDNN wants
        self.register_buffer("zero_points", torch.zeros(w.shape[0], dtype=torch.int64))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")

    def forward(self, x):
        if self.own:
            return native().w8a8_linear_packed(x, self.packed, self.scales, self.bias, self.sums128,
                                               select.variant_for(self.bands, x.numel() // x.shape[-1]))
        if not self.emulated and (kernels := native()) is not None:
            return kernels.w8a8_linear(x, self.packed, self.scales, self.zero_points, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        q, xs = quantize_kv(x2)  # the same per-row int8 as the KV cache's
        if self.emulated:
            y = torch.nn.functional.linear(q.float(), self.packed) * self.scales
        else:
            y = torch.ops.onednn.qlinear_pointwise.tensor(q, _ONE, _ZERO, self.packed, self.scales, self.zero_points,
                                                          None, 1.0, 0, torch.float32, "none", [], "")
        y = y * xs[:, None]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = _kernels_text(self.bands, True) if self.own else "float32" if self.emulated else "onednn"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"


_ONE, _ZERO = torch.ones(1), torch.zeros(1, dtype=torch.int64)


def _kernels_text(bands: tuple, int8: bool) -> str:
    """Our packed kernel's variants by row band, for extra_repr."""
    if not bands:
        return select.VARIANT_NAMES[select.variants(int8)[0]]
    return "/".join(dict.fromkeys(select.VARIANT_NAMES[v] for _, v in bands))

MAX_ROWS = {Int8Linear: AUTO_MAX_ROWS, Int4Linear: INT4_MAX_ROWS}
MAX_ROWS_AMX = {Int8Linear: AMX_AUTO_MAX_ROWS, Int4Linear: AMX_INT4_MAX_ROWS}
MAX_ROWS_AVX512 = {Int8Linear: AVX512_AUTO_MAX_ROWS, Int4Linear: AVX512_INT4_MAX_ROWS}


class AutoLinear(nn.Module):
    """A weight-only kernel (`small`: int8 or int4) for calls of up to `max_rows` rows, the
    dense bf16 matmul above (PackedLinear: the AMX tiles, AVX512-BF16 or oneDNN); the row
    limit depends on which of the three the dense weights use (0: never the small kernel).

    Costs the quantized copy on top of the dense weights. Which kernel a row goes through
    then depends on how many rows share its call, so a sequence's greedy tokens can depend
    on what it was batched with.
    """

    def __init__(self, linear: nn.Linear, max_rows: int | None = None, small: type = Int8Linear):
        super().__init__()
        self.small = small(linear)
        # shares the embedding's tensor when the lm_head is tied (unless packed: a copy)
        self.dense = PackedLinear(linear) if PackedLinear.packable(linear) else linear
        if not getattr(self.dense, "own", False):
            table = MAX_ROWS  # oneDNN's packed bf16
        else:
            table = MAX_ROWS_AMX if self.dense.amx else MAX_ROWS_AVX512
        self.max_rows = table[small] if max_rows is None else max_rows

    def forward(self, x):
        if x.numel() <= self.max_rows * x.shape[-1]:
            return self.small(x)
        return self.dense(x)

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}"


class PackedLinear(nn.Module):
    """bf16 weights reordered once, at load, for the CPU's matrix units.

    Where the CPU has AMX-BF16, AVX512-BF16 or AVX2 + FMA, the weight is packed for the AMX
    tiles (`pack_for_tiles`) and the product runs in our own kernel (`bf16_linear_packed`: on
    the tiles, on AVX512-BF16 dot products, or widened to float32 for AVX2 FMA, which all read
    the same layout; `bands`, set by kernels/select.py, says which per row count); elsewhere
    it is reordered into oneDNN's blocked layout. A plain `F.linear` in bf16 hands oneDNN a
    row-major weight, which it reorders on every call: on SmolLM2-135M's shapes that reorder
    was ~35% of a step's projection time at any batch size (1 thread: 13.1 ms packed vs 21.5
    ms plain per step at 32 rows). Our kernel then takes one layer's four projections (2
    threads) on the tiles from 575 to 376 us at 64 rows and from 363 to 269 at one; on AMD
    Zen 4 (AVX512-BF16) from ~2.0 to ~1.4 ms at 64 rows and from ~700 to ~300 us at one. Its
    row's result does not depend on how many rows share the call. Either packed weight is
    opaque, so this module has no `.weight`: a tied lm_head keeps the embedding's tensor
    untouched and gets its own packed copy.
    """

    def __init__(self, linear: nn.Linear, own: bool = True, swiglu: bool = False):
        """own=False keeps oneDNN's layout even where our kernel could run (tests compare the
        two). swiglu: `linear` is an MLP's gate_up projection ([gate; up] rows). For our
        kernel its 16-column blocks are then packed gate, up, gate, up..., so that each pair
        of blocks holds matching gate and up columns: `forward` still returns [gate | up], and
        the fused plan asks the kernel for silu(gate) * up directly (`bf16_linear_packed`)."""
        super().__init__()
        w = linear.weight.detach()
        n, k = w.shape
        kernels = native()
        self.own = own and w.dtype == torch.bfloat16 and bool(select.variants(False)) and n % 16 == 0 and k % 32 == 0
        self.amx = self.own and kernels.amx_bf16_available()  # on the tiles (else AVX512-BF16 or AVX2)
        self.bands = ()  # (up to rows, variant): kernels/select.py's choice; none: the first variant here
        self.swiglu = self.own and swiglu and linear.bias is None and n % 32 == 0
        if self.swiglu:
            w = w.view(2, n // 32, 16, k).transpose(0, 1).reshape(n, k)
        packed = pack_for_tiles(w) if self.own else torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.register_buffer("packed", packed.contiguous())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and (bool(select.variants(False)) or _onednn_bf16())

    @staticmethod
    def packable(linear: nn.Linear) -> bool:
        """Whether PackedLinear can take `linear`: in our kernels, or in oneDNN's bf16 layout."""
        n, k = linear.weight.shape
        ours = bool(select.variants(False)) and n % 16 == 0 and k % 32 == 0
        return linear.weight.dtype == torch.bfloat16 and (ours or _onednn_bf16())

    def variant(self, rows: int) -> int:
        return select.variant_for(self.bands, rows)

    def forward(self, x):
        if self.own:
            return native().bf16_linear_packed(x, self.packed, self.bias, int(self.swiglu),
                                               self.variant(x.numel() // x.shape[-1]))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's first argmax of `forward(x)` ([rows, in] -> [rows] int64) without writing
        the products out (the lm_head of greedy decoding); None where only `forward` runs."""
        if not self.own or self.swiglu or self.bias is not None or x.dim() != 2:
            return None
        return native().bf16_linear_packed_argmax(x, self.packed, self.variant(len(x)))

    def extra_repr(self) -> str:
        kernel = _kernels_text(self.bands, False) if self.own else "onednn"
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"
                + (", swiglu=True" if self.swiglu else ""))


def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _quantized(linear: nn.Linear, method: str) -> nn.Module:
    """A layer whose shape the int4 kernel cannot take gets int8 instead."""
    if method == "int8":
        return Int8Linear(linear)
    if method == "w8a8":
        return W8A8Linear(linear)
    return AutoLinear(linear, small=Int4Linear if method == "int4" and Int4Linear.fits(linear) else Int8Linear)


def _replace_linears(model: CausalLM, make, make_head) -> None:
    """Replaces, in place, the linear layers of the decoder layers (not Mixtral's router) and
    the lm_head: make(linear, gate_up), gate_up telling an MLP's gate_up projection."""
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (isinstance(parent, SparseMoE) and name == "gate"):
                setattr(parent, name, make(child, isinstance(parent, MLP) and name == "gate_up_proj"))
    model.lm_head = make_head(model.lm_head)


# SmoothQuant's migration strength (0: all on the activations, 1: all on the weights)
SMOOTH_ALPHA = 0.5
# Text the W8A8 smoothing measures activations on (any ordinary text does: the channels with
# outsized activations are the same for every input).
CALIBRATION_TEXT = """The history of the city begins in the twelfth century, when a small market grew up at the
crossing of two rivers. Merchants came from the north with wool and timber; by 1300 the
town had a charter, a wall and some 4,000 inhabitants.
Q: What is the capital of France? A: Paris. Q: How many legs does a spider have? A: Eight.
def mean(values):
    return sum(values) / len(values) if values else 0.0
Dear team, the quarterly report is attached. Revenue rose 12% to $3.4 million, while costs
fell slightly; please send your comments before Friday.
Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in
the chloroplasts of plant cells, mostly in the leaves."""


@torch.no_grad()
def smooth_for_w8a8(model: CausalLM, token_ids: list[int], alpha: float = SMOOTH_ALPHA) -> dict:
    """SmoothQuant (Xiao et al., 2023): moves the activations' outlier channels into the
    weights before W8A8 quantization, without changing what the model computes.

    A few channels of the residual stream carry activations tens of times larger than the
    rest, so one int8 scale per row rounds every other channel coarsely. For each projection
    input channel d, s_d = max|x_d|^alpha / max|w_:,d|^(1 - alpha) (the activations measured
    on `token_ids` with the bf16 model); x_d is divided by s_d and the weight's column d
    multiplied by it. The division is folded into what produces x: the RMSNorm weight before
    the qkv and gate_up projections (and before the lm_head, which then gets its own
    weight), the value rows of qkv before o_proj (per kv head and dim, shared by the query
    heads of a group), the up rows of gate_up before down_proj (silu(gate) * up is linear in
    up). Mixtral's MoE blocks are left as they are. The weights are left in float32 for the
    quantization that follows.

    Returns the factors as LoRA needs them, {(layer, module): (input factors, [output factors
    of each part or None])} with modules named as in engine/lora.py: an adapter's A is
    multiplied by the input's factors and its B divided by its part's output factors.
    """
    stats: dict[nn.Module, torch.Tensor] = {}

    def record(module, inputs, _):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
        stats[module] = torch.maximum(stats[module], x) if module in stats else x

    watched = [model.lm_head]
    for layer in model.layers:
        watched += [layer.self_attn.qkv_proj, layer.self_attn.o_proj]
        if isinstance(layer.mlp, MLP):
            watched += [layer.mlp.gate_up_proj, layer.mlp.down_proj]
    hooks = [m.register_forward_hook(record) for m in watched]
    token_ids = token_ids[:model.rope_cos.shape[0]]  # within the rotary tables' positions
    n, args = len(token_ids), model.args
    pool = KVPool(args, -(-n // 16), 16, model.embed_tokens.weight.dtype)
    model.fused = False  # the module path, where the hooks see each projection's input
    try:
        model(torch.tensor(token_ids), torch.arange(n), AttnBatch.prefill(n), pool, torch.arange(n))
    finally:
        del model.fused
        for h in hooks:
            h.remove()

    def factors(act: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
        return (act.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    def as_float(linear: nn.Linear) -> torch.Tensor:
        """The layer's weight as its own float32 parameter (unties a tied lm_head)."""
        if linear.weight.dtype != torch.float32 or linear is model.lm_head:
            linear.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
        return linear.weight.data

    def divide_rows(linear: nn.Linear, rows: slice, s: torch.Tensor) -> None:
        as_float(linear)[rows] /= s[:, None]
        if linear.bias is not None:
            linear.bias.data[rows] = (linear.bias.data[rows].float() / s).to(linear.bias.dtype)

    def through_norm(norm, linear: nn.Linear) -> torch.Tensor:
        w = as_float(linear)
        s = factors(stats[linear], w.abs().amax(dim=0))
        new = (norm.weight.data.float() / s).to(norm.weight.dtype)
        # the factor the rounded norm weight really divides by, so norm x weight stays exact
        s = torch.where(new != 0, norm.weight.data.float() / new.float(), torch.ones_like(s))
        norm.weight.data.copy_(new)
        w *= s[None, :]
        return s

    nh, nkv, hd = args.num_heads, args.num_kv_heads, args.head_dim
    out: dict = {}
    for i, layer in enumerate(model.layers):  # the outputs' side first: it changes the columns' maxima below
        attn = layer.self_attn
        wo = as_float(attn.o_proj)
        act = stats[attn.o_proj].view(nkv, nh // nkv, hd).amax(dim=1)
        s_v = factors(act, wo.abs().amax(dim=0).view(nkv, nh // nkv, hd).amax(dim=1)).reshape(-1)
        divide_rows(attn.qkv_proj, slice((nh + nkv) * hd, (nh + 2 * nkv) * hd), s_v)
        s_o = s_v.view(nkv, 1, hd).expand(nkv, nh // nkv, hd).reshape(-1)
        wo *= s_o[None, :]
        out[i, "o"] = (s_o, [None])
        out[i, "qkv"] = (through_norm(layer.input_layernorm, attn.qkv_proj), [None, None, s_v])
        if isinstance(layer.mlp, MLP):
            mlp = layer.mlp
            wd = as_float(mlp.down_proj)
            s_d = factors(stats[mlp.down_proj], wd.abs().amax(dim=0))
            inter = wd.shape[1]
            divide_rows(mlp.gate_up_proj, slice(inter, 2 * inter), s_d)
            wd *= s_d[None, :]
            out[i, "down"] = (s_d, [None])
            out[i, "gate_up"] = (through_norm(layer.post_attention_layernorm, mlp.gate_up_proj), [None, s_d])
    through_norm(model.norm, model.lm_head)
    return out


@torch.no_grad()
def quantize_model(model: CausalLM, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "w8a8" and not W8A8Linear.available():
        raise ValueError("quantization 'w8a8' needs torch's oneDNN int8 kernels, which this torch build lacks")
    _replace_linears(model, lambda lin, gate_up: _quantized(lin, method),
                     lambda lin: _quantized(lin, "auto" if method == "int4" else method))
    _choose_bands(model)


def _budget() -> int:
    from ..config import EngineConfig

    return EngineConfig().max_num_batched_tokens


def _linear_shapes(model: CausalLM) -> dict[tuple, list[str]]:
    """("bf16", out, in) -> the names of the model's projections of that shape (as _replace_linears walks them)."""
    shapes: dict[tuple, list[str]] = {}
    for parent in list(model.layers.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and not (isinstance(parent, SparseMoE) and name == "gate"):
                shapes.setdefault(("bf16", child.out_features, child.in_features), []).append(name)
    shapes.setdefault(("bf16", model.lm_head.out_features, model.lm_head.in_features), []).append("lm_head")
    return shapes


def _choose_bands(model: CausalLM) -> None:
    """Our packed kernels' variant per row band for each quantized model's PackedLinear (the
    dense weights of `auto`) and W8A8Linear, chosen by kernels/select.py."""
    named: dict[tuple, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, W8A8Linear)) and m.own:
            kind = "w8a8" if isinstance(m, W8A8Linear) else "bf16"
            named.setdefault((kind, m.out_features, m.in_features), []).append((name.rpartition(".")[2], m))
    if not named:
        return
    choices = select.choose({key: [n for n, _ in mods] for key, mods in named.items()}, _budget())
    for key, mods in named.items():
        if choices[key].family == "own":
            for _, m in mods:
                m.bands = tuple(map(tuple, choices[key].bands))


@torch.no_grad()
def pack_model(model: CausalLM) -> bool:
    """Packs the bf16 linear layers for the product kernel kernels/select.py chose for each
    shape (see PackedLinear), or leaves a layer as it is where a plain torch linear won; False
    if this CPU has no packed bf16 kernel at all."""
    if not PackedLinear.available(model.embed_tokens.weight.dtype):
        return False
    choices = select.choose(_linear_shapes(model), _budget())

    def make(lin: nn.Linear, gate_up: bool) -> nn.Module:
        choice = choices[("bf16", lin.out_features, lin.in_features)]
        ours = choice.family == "own" and lin.out_features % 16 == 0 and lin.in_features % 32 == 0
        if choice.family == "torch" or not (ours or _onednn_bf16()):
            return lin  # measured fastest, or a shape our kernels cannot take and no oneDNN bf16 here
        packed = PackedLinear(lin, own=ours, swiglu=gate_up)
        if packed.own:
            packed.bands = tuple(map(tuple, choice.bands))
        return packed

    _replace_linears(model, make, lambda lin: make(lin, False))
    return True
