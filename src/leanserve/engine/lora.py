"""Many LoRA adapters over one base model, mixed in one batch.

An adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors` or `.bin`)
with LoRA on any of q/k/v/o/gate/up/down. `LoRAManager` keeps the registry of adapters and
a resident set of at most `max_loras` of them in fixed slots of stacked tensors, evicting
the least recently used idle one when a new one needs a slot.

The model is not changed: each projection (`qkv_proj`, `o_proj`, `gate_up_proj`,
`down_proj`) is wrapped from outside in a `LoRALinear` whose output is the base output plus,
for the rows of each adapter, `(x @ A^T) @ B^T` (scale folded into B). The base projection
runs once for the whole batch. For the fused projections an adapter's q, k and v (or gate
and up) A factors are stacked (one matmul gives every part's low-rank activations) and each
part's B^T writes its own slice of the fused output.

Which rows belong to which adapter is set once per step (`prepare_step`); a step without
adapter rows costs one attribute check per projection, and the model is not even wrapped
until a step first has an adapter. With the native kernel (kernels/lora.cpp, "BGMV" as in
Punica/S-LoRA) one call per projection adds every row's delta: rows grouped by slot in
tiles of up to 4, each tile reading its slot's factors once, tiles in parallel. A step of
many adapters' decodes is bound by reading the factors, so under a bfloat16 model they are
int8 by default (`LoRAConfig.factor_dtype`): one float32 scale per row of A and of B^T
(LoRA scale folded in), quantized from the float32 file weights when installed; products on
the AVX-512 VNNI int16 dot products (x and the low-rank activations scaled to int16 per
row), sums in float32, y rounded to bfloat16 once. The difference from the float32 factors
is ~1% of the deltas (int8's rounding), within bfloat16 error of the float32 engine on the
tiny model's logprobs (tests/test_lora.py). factor_dtype="bfloat16" keeps bfloat16 factors
(the AVX-512 BF16 dot products); float32 models keep float32 factors (equal to peft).
Measured on SmolLM2-135M shapes (120 projections, one thread, the machine shared), 32
decode rows on 32 rank-8 adapters in a rank-16 stack: bfloat16 factors ~19-20 ms per step
(156 MB, ~8 GB/s), int8 ~11-12 ms (78 MB, ~7 GB/s: each slot's factors are short runs of
lines, so the kernel prefetches the next tile's factors into L2; ~2.7 ms when they are all
in cache), against +40-65 ms for the torch ops below (float32 factors, measured the same
way before the kernel). `native_hook` lets native code that runs the projections itself (a
fused forward plan) call the same kernel.

Without the kernel (LEANSERVE_NATIVE_KERNELS=0), torch ops: long runs of one adapter's rows
(prefill chunks) get plain matmuls on their slice; the other rows (decodes of many
adapters) go through batched matmuls over a window of slots (`StepLoRA`), on float32
factors (torch's small bfloat16 matmuls were ~3x slower here).

Loading runs in a worker thread: a request whose adapter is not resident waits in the
scheduler (`acquire` returns False) while the file is read, and joins the batch after.
Slots change only on the step thread, between forward passes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoRAConfig
from ..errors import InvalidRequest, ModelLoadError

log = logging.getLogger("leanserve.lora")

# peft target name -> (our fused module, index of its part)
TARGETS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
           "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
MODULES = {"qkv": ("self_attn", "qkv_proj"), "o": ("self_attn", "o_proj"),
           "gate_up": ("mlp", "gate_up_proj"), "down": ("mlp", "down_proj")}
# native code names a (layer, module) by layer * 4 + this (kernels/lora.cpp, Slots)
MODULE_INDEX = {m: i for i, m in enumerate(MODULES)}
KEY_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")

# Torch fallback: runs of at least this many rows of one adapter get their own matmuls;
# shorter runs are gathered. A decode is one row; a prefill chunk is usually longer.
SEGMENT_MIN_ROWS = 4
# The native kernel's tile: rows of one adapter that share one read of its factors.
TILE = 4
# Torch fallback: the low-rank factors are kept and multiplied in float32: on this CPU
# (Xeon, AVX-512) torch's small matmuls ran ~3x faster in float32 than in bfloat16. The
# native kernel keeps them in int8 when the model is bfloat16 (a quarter of float32's bytes
# to read each step; LoRAConfig.factor_dtype="bfloat16": half), else in float32.
LORA_DTYPE = torch.float32
# LoRAConfig.factor_dtype -> the stacks' dtype ("auto": LoRAManager._factor_dtype)
FACTOR_DTYPES = {"auto": None, "int8": torch.int8, "bfloat16": torch.bfloat16, "float32": torch.float32}


def activation_dtype(factor_dtype: torch.dtype) -> torch.dtype:
    """The dtype of x and y the native kernel takes with factors of `factor_dtype`."""
    return torch.bfloat16 if factor_dtype == torch.int8 else factor_dtype


# False: the torch ops even where the native kernel builds (to compare them, bench lora).
NATIVE = True


def module_shapes(args) -> dict[str, tuple[int, list[int]]]:
    """Our fused module -> (input size, output sizes of its parts)."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return {"qkv": (args.hidden_size, [q, kv, kv]), "o": (q, [args.hidden_size]),
            "gate_up": (args.hidden_size, [args.intermediate_size] * 2),
            "down": (args.intermediate_size, [args.hidden_size])}


@dataclass
class LoRAWeights:
    """One adapter as read from its file: (layer, module) -> per part of the fused module
    (q, k, v or gate, up) None or (A [r, in], B [part's out, r], scale). They are converted
    (B transposed, scaled, to the slots' dtype) only while being copied into a slot."""

    factors: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, float] | None]]
    rank: int  # the largest per-target rank
    targets: list[str]  # peft module names it changes (q_proj, ...)



@dataclass(eq=False)
class Adapter:
    """A registered adapter. `id` is unique for the process's life: it names the adapter in
    prefix-cache hashes, so a name re-registered with other weights never shares KV."""

    id: int
    name: str
    path: str
    rank: int
    targets: list[str]
    weights: LoRAWeights | None = None  # read from disk, not yet in a slot
    slot: int | None = None
    pins: int = 0  # running sequences using it: it cannot be evicted
    last_used: float = 0.0
    loading: Future | None = None
    error: str | None = None  # the last load from disk failed
    deleted: bool = False


def _pattern_value(patterns: dict, module_name: str, default):
    """peft's rank_pattern / alpha_pattern: the first key that matches the module's name."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module_name):
            return value
    return default


def read_adapter(path: str, args, max_rank: int, base_names: set[str]) -> tuple[dict, LoRAWeights]:
    """Reads and checks a PEFT LoRA folder against the model; ModelLoadError says what is wrong."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path} has no adapter_config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelLoadError(f"only LoRA adapters are supported, this one is {cfg.get('peft_type')}")
    for feature in ("use_dora", "modules_to_save"):
        if cfg.get(feature):
            raise ModelLoadError(f"adapter uses {feature}, which is not supported")
    base = cfg.get("base_model_name_or_path")
    if base and base_names and _norm_name(base) not in base_names:
        raise ModelLoadError(f"adapter was made for base model {base!r}, not this one ({sorted(base_names)[0]})")
    tensors = _read_tensors(path)
    shapes = module_shapes(args)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY_RE.fullmatch(key)
        if m is None or m.group(3) not in TARGETS:
            raise ModelLoadError(f"unsupported tensor {key!r}: LoRA is supported on the q/k/v/o and "
                                 f"gate/up/down projections of the decoder layers only")
        layer, target = int(m.group(1)), m.group(3)
        if layer >= args.num_layers:
            raise ModelLoadError(f"tensor {key!r} is for layer {layer}; the model has {args.num_layers}")
        if args.num_experts and TARGETS[target][0] in ("gate_up", "down"):
            raise ModelLoadError("LoRA on Mixtral's experts is not supported (attention projections only)")
        pairs.setdefault((layer, target), {})[m.group(4)] = t
    if not pairs:
        raise ModelLoadError(f"{path} holds no LoRA weights")
    alpha, rslora = cfg.get("lora_alpha", cfg.get("r", 8)), bool(cfg.get("use_rslora"))
    factors: dict[tuple[int, str], list] = {}
    top_rank = 0
    for (layer, target), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"layer {layer} {target}: lora_A and lora_B must both be present")
        module, part = TARGETS[target]
        d_in, outs = shapes[module]
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (outs[part], r):
            raise ModelLoadError(
                f"layer {layer} {target}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this "
                f"model (expected [r, {d_in}] / [{outs[part]}, r]): the adapter is for another base model")
        if r > max_rank:
            raise ModelLoadError(f"adapter rank {r} exceeds --max-lora-rank {max_rank}")
        name = f"model.layers.{layer}.{MODULES[module][0]}.{target}"
        r_cfg = _pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", r))
        if r_cfg != r:
            raise ModelLoadError(f"layer {layer} {target}: weights have rank {r}, adapter_config.json says {r_cfg}")
        a_scale = _pattern_value(cfg.get("alpha_pattern"), name, alpha)
        scale = a_scale / (math.sqrt(r) if rslora else r)
        top_rank = max(top_rank, r)
        parts = factors.setdefault((layer, module), [None] * len(outs))
        parts[part] = (a.float(), b.float(), float(scale))
    return cfg, LoRAWeights(factors, top_rank, sorted({t for _, t in pairs}))


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    st, binary = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load

            # Into memory, not memory-mapped: a mapped file that is rewritten or truncated
            # while its tensors live kills the server with SIGBUS (a broken adapter must only
            # fail its own requests).
            with open(st, "rb") as f:
                return load(f.read())
        if os.path.isfile(binary):
            out = torch.load(binary, map_location="cpu", weights_only=True)
            if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
                raise ValueError("not a dict of tensors")
            return out
    except Exception as e:  # safetensors, pickle and zip each raise their own kind
        raise ModelLoadError(f"cannot read the adapter weights in {path}: {e}") from None
    raise ModelLoadError(f"{path} has neither adapter_model.safetensors nor adapter_model.bin")


def _norm_name(name: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct', '/x/SmolLM2-135M-Instruct.Q4_1.gguf' -> 'smollm2-135m-instruct'."""
    base = os.path.basename(os.path.normpath(str(name))).lower()
    base = re.sub(r"\.gguf$", "", base)
    return re.sub(r"[.-](q\d\w*|f16|f32|bf16)$", "", base)


def _base_names(names: list[str | None]) -> set[str]:
    """Names an adapter's base_model_name_or_path may give for this model: the model's
    name, its folder or file, and for a GGUF file the folder holding it (what transformers
    records when it loads one with `gguf_file=`). None is the built-in model."""
    out = set()
    for name in names:
        if name is None:
            from ..models.loader import builtin_model_path

            name = builtin_model_path()
        out.add(_norm_name(name))
        if str(name).endswith(".gguf"):
            out.add(_norm_name(os.path.dirname(os.path.abspath(name))))
    return out


class LoRALinear(nn.Module):
    """A projection plus the low-rank deltas of the adapters in this step."""

    def __init__(self, base: nn.Module, manager: "LoRAManager", layer: int, module: str):
        super().__init__()
        self.base = base
        self.manager, self.layer, self.module = manager, layer, module

    def forward(self, x):
        y = self.base(x)
        step = self.manager.step
        return y if step is None else step.apply(self.manager.stacks[self.layer, self.module], x, y)


@dataclass
class Stack:
    """One fused module's factors of every slot: A [slots, parts, R, in] and, per part, B^T
    [slots, R, part's out] (R: the max rank; a smaller rank is zero-padded). B^T is kept per
    part, not as one block-diagonal matrix: no zeros to read, and each part's matmul runs on
    contiguous memory (on strided column slices it ran ~4x slower).

    int8 factors (native kernel only) have one float32 scale per row: `a_scale` [slots,
    parts, R] for A's rows, `bt_scales` per part [slots, R] for B^T's rows (the LoRA scale
    folded in); a factor is its int8 rows times their scales."""

    a: torch.Tensor
    bts: list[torch.Tensor]
    ranks: list[int]  # each slot's rank in this module (0: the adapter does not touch it)
    rank_t: torch.Tensor  # the same as int32, for the native kernel
    a_scale: torch.Tensor | None = None
    bt_scales: list[torch.Tensor] | None = None

    @property
    def act_dtype(self) -> torch.dtype:
        """The dtype of x and y the native kernel takes with these factors."""
        return activation_dtype(self.a.dtype)

    def scale_args(self) -> tuple:
        """The kernel's (a_scale, bt_scales) arguments."""
        return (self.a_scale, self.bt_scales) if self.a.dtype == torch.int8 else (None, [])

    def dequantized(self) -> "Stack":
        """The factors as float32 (int8 rows times their scales): references for tests."""
        if self.a.dtype != torch.int8:
            return Stack(self.a.float(), [bt.float() for bt in self.bts], list(self.ranks), self.rank_t.clone())
        return Stack(self.a.float() * self.a_scale.unsqueeze(-1),
                     [bt.float() * s.unsqueeze(-1) for bt, s in zip(self.bts, self.bt_scales)],
                     list(self.ranks), self.rank_t.clone())

    def delta(self, h: torch.Tensor, bts: list[torch.Tensor]) -> torch.Tensor:
        """h [..., parts, k, r] (each part's low-rank activations) @ each part's B^T -> [..., k, out]."""
        if len(bts) == 1:
            return h.select(-3, 0) @ bts[0]
        return torch.cat([h.select(-3, p) @ bt for p, bt in enumerate(bts)], dim=-1)


class StepLoRA:
    """Rows -> adapter slots of one step, in the form the projections use.

    With the native kernel (kernels/lora.cpp), the adapter rows are grouped by slot into
    tiles of at most TILE rows and one call per projection adds every row's delta, reading
    each used slot's factors once per tile.

    The torch fallback: long runs of one adapter's rows (prefill chunks) are `segments`:
    plain matmuls on a slice. The other rows (decodes) are grouped by slot into a [slots,
    rows per slot, in] batch for batched matmuls straight on the stacked factors of a window
    of slots, with no copy of the factors. When the used slots are scattered (the window
    would be over twice their number), the used slots' factors are gathered first instead.
    """

    def __init__(self, row_slots: list[int], kernel=None, slots=None):
        self.kernel = kernel
        self.native_step = None  # kernel.Step over `slots`, for native callers (native_hook)
        self.segments: list[tuple[int, int, int]] = []  # (start, end, slot) of long runs
        self.rows = None
        groups: dict[int, list[int]] = {}
        if kernel is not None:
            for row, slot in enumerate(row_slots):
                if slot >= 0:
                    groups.setdefault(slot, []).append(row)
            rows, tiles = [], []
            for slot, g in groups.items():
                for i in range(0, len(g), TILE):
                    tiles.append((len(rows), len(rows) + len(g[i:i + TILE]), slot))
                    rows.extend(g[i:i + TILE])
            self.native_rows = torch.tensor(rows, dtype=torch.long)
            self.tiles = torch.tensor(tiles, dtype=torch.long).view(-1, 3)
            if slots is not None:
                self.native_step = kernel.Step(slots, self.native_rows, self.tiles)
            return
        start = 0
        while start < len(row_slots):
            slot, end = row_slots[start], start + 1
            while end < len(row_slots) and row_slots[end] == slot:
                end += 1
            if slot >= 0:
                if end - start >= SEGMENT_MIN_ROWS:
                    self.segments.append((start, end, slot))
                else:
                    groups.setdefault(slot, []).extend(range(start, end))
            start = end
        self.used = sorted(groups)
        if not groups:
            return
        lo, hi = self.used[0], self.used[-1]
        if hi - lo + 1 <= 2 * len(self.used):
            self.window, self.gather = slice(lo, hi + 1), None
            position = {s: s - lo for s in self.used}
        else:
            self.window, self.gather = None, torch.tensor(self.used)
            position = {s: i for i, s in enumerate(self.used)}
        self.span = len(position) if self.gather is not None else hi - lo + 1
        self.per_slot = max(len(g) for g in groups.values())
        self.rows = torch.tensor([row for s in self.used for row in groups[s]])
        self.index = torch.tensor([position[s] * self.per_slot + j for s in self.used for j in range(len(groups[s]))])

    def apply(self, stack: Stack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            act = stack.act_dtype
            if y.dtype != act or not y.is_contiguous():  # e.g. a quantized projection's output
                out = y.to(act, memory_format=torch.contiguous_format)
                self.kernel.apply(x.to(act).contiguous(), out, stack.a, stack.bts, stack.rank_t,
                                  self.native_rows, self.tiles, *stack.scale_args())
                return out.to(y.dtype)
            self.kernel.apply(x.to(act).contiguous(), y, stack.a, stack.bts, stack.rank_t,
                              self.native_rows, self.tiles, *stack.scale_args())
            return y
        d_in, dtype = x.shape[1], stack.a.dtype
        for start, end, slot in self.segments:
            r = stack.ranks[slot]
            if r:
                a = stack.a[slot, :, :r]  # [parts, r, in]
                h = (x[start:end].to(dtype) @ a.reshape(-1, d_in).t()).view(end - start, len(a), r)
                y[start:end] += stack.delta(h.transpose(0, 1), [bt[slot, :r] for bt in stack.bts]).to(y.dtype)
        if self.rows is not None:
            r = max(stack.ranks[s] for s in self.used)
            if r:
                span, k, parts = self.span, self.per_slot, stack.a.shape[1]
                if self.gather is None:
                    a, bts = stack.a[self.window, :, :r], [bt[self.window, :r] for bt in stack.bts]
                else:
                    a = stack.a[:, :, :r].index_select(0, self.gather)
                    bts = [bt[:, :r].index_select(0, self.gather) for bt in stack.bts]
                # rows as [slot, k-th row of it], zeros where a slot has fewer rows
                xs = x.new_zeros(span * k, d_in, dtype=dtype)
                xs.index_copy_(0, self.index, x.index_select(0, self.rows).to(dtype))
                xs = xs.view(span, 1, k, d_in).expand(span, parts, k, d_in).reshape(span * parts, k, d_in)
                h = torch.bmm(xs, a.reshape(span * parts, r, d_in).transpose(1, 2))  # (a view: no copy)
                delta = stack.delta(h.view(span, parts, k, r), bts).view(span * k, -1).index_select(0, self.index)
                y.index_add_(0, self.rows, delta.to(y.dtype))
        return y


class LoRAManager:
    """The adapter registry, the resident slots and the per-step row mapping."""

    def __init__(self, args, config: LoRAConfig, base_names: list[str], dtype: torch.dtype = torch.float32):
        self.args = args
        self.model_dtype = dtype
        self.kernel = None  # kernels/lora.cpp, or None: torch ops (set with the stacks)
        self.native_slots = None  # kernel.Slots: every stack, for native callers
        self.factor_dtype = None  # the stacks' dtype
        if config.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"LoRA factor dtype {config.factor_dtype!r}: expected one of {', '.join(FACTOR_DTYPES)}")
        self.config = config
        self.base_names = _base_names(base_names)
        self.adapters: dict[str, Adapter] = {}
        self.allowed_roots = [os.path.realpath(d) for d in config.dirs]
        self.slots: list[Adapter | None] = [None] * config.max_loras
        self.stacks: dict[tuple[int, str], Stack] = {}
        self.step: StepLoRA | None = None
        # W8A8 smoothing's factors (models/quant.py smooth_for_w8a8): {(layer, module): (input
        # factors, [output factors per part or None])}; {} for a model as its files have it
        self.smoothing: dict = {}
        self.load_seconds: list[float] = []  # every read of an adapter file, for metrics
        self.on_load = []  # callbacks(name, seconds), e.g. metrics
        self._ids = 0
        self._loading: list[Adapter] = []  # reads from disk under way
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="leanserve-lora")
        for name, path in config.adapters.items():
            self.allowed_roots.append(os.path.realpath(os.path.dirname(os.path.abspath(path))))
            self.register(name, path, check_path=False)
        for root in config.dirs:
            for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                folder = os.path.join(root, entry)
                if entry not in self.adapters and os.path.isfile(os.path.join(folder, "adapter_config.json")):
                    try:
                        self.register(entry, folder, keep=False)
                    except (ModelLoadError, InvalidRequest) as e:  # one bad folder does not stop the server
                        log.warning("skipped adapter %s: %s", folder, e)

    # -- the registry (any thread) ----------------------------------------------------------

    def register(self, name: str, path: str, keep: bool = True, check_path: bool = True) -> Adapter:
        """Reads and checks the adapter now (InvalidRequest / ModelLoadError / PermissionError);
        keeps its weights for the first use when `keep` (and fewer than max_loras are kept)."""
        # ":" separates base and adapter in a request's model, except in fine-tuned names (ft:<base>:...)
        if not name or (":" in name and not name.startswith("ft:")) or "/" in name or name in self.base_names:
            raise InvalidRequest(f"invalid adapter name {name!r}", "name")
        if name in self.adapters:
            raise InvalidRequest(f"adapter {name!r} is already registered; delete it first", "name")
        real = os.path.realpath(path)
        if check_path and not any(real == root or real.startswith(root + os.sep) for root in self.allowed_roots):
            raise PermissionError(f"adapter path {path!r} is outside the allowed adapter directories"
                                  " (--lora-dir)")
        if self.config.max_loras < 1:
            raise InvalidRequest("LoRA adapters are disabled (--max-loras 0)")
        started = time.perf_counter()
        _, weights = read_adapter(real, self.args, self.config.max_rank, self.base_names)
        self._loaded(name, started)
        with self._lock:
            if name in self.adapters:
                raise InvalidRequest(f"adapter {name!r} is already registered; delete it first", "name")
            self._ids += 1
            # host copies waiting for a slot are bounded by the slots; others are read again at first use
            keep = keep and sum(a.weights is not None for a in self.adapters.values()) < self.config.max_loras
            adapter = Adapter(self._ids, name, real, weights.rank, weights.targets, weights if keep else None)
            self.adapters[name] = adapter
        log.info("registered adapter %s (rank %d) from %s", name, weights.rank, real)
        return adapter

    def unregister(self, name: str) -> None:
        """New requests can no longer name it; sequences already in keep it until they finish."""
        with self._lock:
            adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise KeyError(name)
        adapter.deleted = True  # its slot is freed when its last running sequence ends

    def get(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise InvalidRequest(f"unknown adapter {name!r}", "model")
        return adapter

    @property
    def num_loads(self) -> int:
        return len(self.load_seconds)

    @property
    def num_resident(self) -> int:
        return sum(a is not None for a in self.slots)

    def _loaded(self, name: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.load_seconds.append(seconds)
        for callback in self.on_load:
            callback(name, seconds)

    # -- the step thread ----------------------------------------------------------------------

    def acquire(self, adapter: Adapter) -> bool:
        """Pins the adapter in a slot for one more running sequence. False: not yet (loading,
        or every slot is pinned); the sequence stays waiting. A failed load raises ModelLoadError."""
        if adapter.slot is None:
            if adapter.weights is None and not self._finish_load(adapter):
                return False
            slot = self._free_slot()
            if slot is None:
                return False
            self._install(adapter, slot)
        adapter.pins += 1
        adapter.last_used = time.monotonic()
        return True

    def release(self, adapter: Adapter) -> None:
        adapter.pins -= 1
        adapter.last_used = time.monotonic()
        if adapter.deleted and adapter.pins == 0 and adapter.slot is not None:
            self._evict(adapter.slot)

    def release_slots(self) -> None:
        """Scale to zero: empties every slot and frees the stacks, and drops the host copies
        kept for a first use. The adapters stay registered; each is read from its file again
        at its next use (as after an eviction), into stacks allocated again. Only with no
        sequence on an adapter (the engine unloads when it has no requests)."""
        if any(a is not None and a.pins for a in self.slots):
            raise RuntimeError("cannot free LoRA slots while sequences use them")
        for slot, adapter in enumerate(self.slots):
            if adapter is not None:
                self._evict(slot)
        with self._lock:
            for adapter in self.adapters.values():
                if adapter.loading is None:
                    adapter.weights = None
        self.stacks = {}
        self.native_slots = None
        self.step = None

    def wait_for_loads(self, timeout: float) -> None:
        """Called when the step had nothing to run: sleep until a load finishes, not spin."""
        pending = [a.loading for a in self._loading if a.loading is not None]
        if pending:
            wait(pending, timeout)

    def _finish_load(self, adapter: Adapter) -> bool:
        """Starts reading the adapter from disk, or takes the finished read."""
        if adapter.loading is None:
            started = time.perf_counter()

            def load():
                _, weights = read_adapter(adapter.path, self.args, self.config.max_rank, self.base_names)
                self._loaded(adapter.name, started)
                return weights

            adapter.loading = self._pool.submit(load)
            self._loading.append(adapter)
            return False
        if not adapter.loading.done():
            return False
        future, adapter.loading = adapter.loading, None
        self._loading.remove(adapter)
        adapter.weights = future.result()  # raises ModelLoadError: the file changed since registration
        return True

    def _free_slot(self) -> int | None:
        for i, a in enumerate(self.slots):
            if a is None:
                return i
        idle = [a for a in self.slots if a.pins == 0]
        if not idle:
            return None
        victim = min(idle, key=lambda a: (not a.deleted, a.last_used))
        slot = victim.slot
        self._evict(slot)
        return slot

    def _evict(self, slot: int) -> None:
        adapter = self.slots[slot]
        self.slots[slot] = None
        adapter.slot = None
        log.info("adapter %s left slot %d", adapter.name, slot)

    def _install(self, adapter: Adapter, slot: int) -> None:
        """Copies the adapter's factors into `slot`, converting them on the way (B transposed
        and scaled, to the slots' dtype): with the native kernel in one call for all ~420
        factors (a torch op each took ~20 us, most of a cold start's install time)."""
        if not self.stacks:
            self._allocate()
        a_stacks, part_ids, a_src, bt_stacks, b_src, scales, a_scales, bt_scales = [], [], [], [], [], [], [], []
        for (layer, module), stack in self.stacks.items():
            parts = adapter.weights.factors.get((layer, module)) or [None] * len(stack.bts)
            old = stack.ranks[slot]  # rows the slot's last adapter left: zero what is not overwritten
            stack.ranks[slot] = max((f[0].shape[0] for f in parts if f is not None), default=0)
            stack.rank_t[slot] = stack.ranks[slot]
            for p, bt in enumerate(stack.bts):
                r = 0
                if parts[p] is not None:
                    a, b, scale = parts[p]
                    if (layer, module) in self.smoothing:  # the projection sees x / s_in and writes y / s_out
                        s_in, s_out = self.smoothing[layer, module]
                        a = a * s_in[None, :]
                        if s_out[p] is not None:
                            b = b / s_out[p][:, None]
                    r = a.shape[0]
                    a_stacks.append(stack.a)
                    part_ids.append(p)
                    a_src.append(a)
                    bt_stacks.append(bt)
                    b_src.append(b)
                    scales.append(scale)
                    if stack.a_scale is not None:
                        a_scales.append(stack.a_scale)
                        bt_scales.append(stack.bt_scales[p])
                if old > r:
                    stack.a[slot, p, r:old].zero_()
                    bt[slot, r:old].zero_()
                    if stack.a_scale is not None:
                        stack.a_scale[slot, p, r:old].zero_()
                        stack.bt_scales[p][slot, r:old].zero_()
        if self.kernel is not None:
            self.kernel.pack(slot, a_stacks, part_ids, a_src, bt_stacks, b_src, scales, a_scales, bt_scales)
        else:
            for stack_a, p, a, bt, b, scale in zip(a_stacks, part_ids, a_src, bt_stacks, b_src, scales):
                stack_a[slot, p, :a.shape[0]].copy_(a)
                torch.mul(b.t(), scale, out=bt[slot, :a.shape[0]])
        self.slots[slot] = adapter
        adapter.slot = slot
        adapter.weights = None  # the slot holds them now; an eviction reads the file again

    def _allocate(self) -> None:
        from ..kernels import native

        self.kernel = native("lora") if NATIVE else None
        self.factor_dtype = dtype = self._factor_dtype()
        n, r = self.config.max_loras, self.config.max_rank
        for module, (d_in, outs) in module_shapes(self.args).items():
            if self.args.num_experts and module in ("gate_up", "down"):
                continue  # Mixtral's experts take no LoRA
            for layer in range(self.args.num_layers):
                stack = Stack(torch.zeros(n, len(outs), r, d_in, dtype=dtype),
                              [torch.zeros(n, r, o, dtype=dtype) for o in outs], [0] * n,
                              torch.zeros(n, dtype=torch.int32))
                if dtype == torch.int8:
                    stack.a_scale = torch.zeros(n, len(outs), r)
                    stack.bt_scales = [torch.zeros(n, r) for _ in outs]
                self.stacks[layer, module] = stack
        if self.kernel is not None:
            self.native_slots = self.kernel.Slots()
            for (layer, module), st in self.stacks.items():
                self.native_slots.add(layer * 4 + MODULE_INDEX[module], st.a, st.bts, st.rank_t, *st.scale_args())

    def _factor_dtype(self) -> torch.dtype:
        """The stacks' dtype from LoRAConfig.factor_dtype: int8 and bfloat16 factors need the
        native kernel under a bfloat16 model (elsewhere float32, with a warning); auto is int8
        there, else float32."""
        choice = self.config.factor_dtype
        native_bf16 = self.kernel is not None and self.model_dtype == torch.bfloat16
        if choice == "auto":
            return torch.int8 if native_bf16 else LORA_DTYPE
        if choice in ("int8", "bfloat16") and not native_bf16:
            log.warning("LoRA factors in %s need the native LoRA kernel and a bfloat16 model; using float32", choice)
            return LORA_DTYPE
        return FACTOR_DTYPES[choice]

    def attach(self, model: nn.Module) -> None:
        """Wraps the model's projections (once per model object)."""
        if getattr(model, "_lora_manager", None) is self:
            return
        for i, layer in enumerate(model.layers):
            for module, (parent, attr) in MODULES.items():
                owner = getattr(layer, parent)
                if not hasattr(owner, attr):  # Mixtral: the experts are not wrapped
                    continue
                base = getattr(owner, attr)
                if isinstance(base, LoRALinear):
                    base = base.base
                setattr(owner, attr, LoRALinear(base, self, i, module))
        model._lora_manager = self

    def prepare_step(self, model: nn.Module, batch) -> None:
        """`batch`: (sequence, rows) in the order of the flat batch. Sets the row mapping."""
        if not any(seq.adapter is not None for seq, _ in batch):
            self.step = None
            return
        self.attach(model)
        row_slots = []
        for seq, n in batch:
            slot = -1 if seq.adapter is None else seq.adapter.slot
            row_slots.extend([slot] * n)
        self.step = StepLoRA(row_slots, self.kernel, self.native_slots)

    def native_hook(self) -> tuple[int, int] | None:
        """For native code that runs the projections itself (a fused decode plan): (address of
        `void leanserve_lora_step_apply(const void* step, int64_t index, const void* x, void* y)`,
        address of this step), to call after each projection of layer l with index
        l * 4 + MODULE_INDEX[module], its contiguous input x and output y in the factors'
        dtype (bfloat16 for int8 factors). None: no adapter rows in this step, or no native
        kernel (or factors the kernel cannot take in the model's dtype)."""
        if self.step is None or self.step.native_step is None or activation_dtype(self.factor_dtype) != self.model_dtype:
            return None
        return self.kernel.step_apply_address(), self.step.native_step.address()
