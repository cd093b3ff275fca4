"""Which product kernel runs each projection: chosen by measurement on this machine (issue 33).

CPU flags say what a CPU can run, not what is fast on it: on an Intel Xeon with AVX512-BF16
but no AMX, torch's bf16 matmul ran at half its fp32 rate, and on an AVX2-only AMD EPYC (Zen
3) torch's bf16 matmul emulates bf16 and took 7.8 ms for one row of SmolLM2's gate_up
projection where float32 took 0.18. So at the first start on a machine the engine times,
at the model's projection shapes and at each row band of a step (1 row up to the token
budget), every kernel this CPU can run:

- our packed kernels (kernels/products*.h, one packed weight for all): `amx` (AMX
  tiles), `avx512` (AVX512-BF16 / AVX512-VNNI dot products), `avx512f` (bf16 weights widened
  to float32 in 512-bit registers, FMA), `avx2` (AVX2 + FMA: the same in 256-bit registers,
  and int8 pairs summed exactly by VPMADDWD);
- `onednn` (torch's packed bf16 linear, where oneDNN has bf16) and `torch` (a plain linear
  in the model dtype);
- for information only, not chosen: `torch-fp32` (float32 weights: twice the memory) and,
  beside bf16 weights, `w8a8:*` (int8 activations: lossy, `--quantization w8a8`).

and chooses per shape first a kernel family (the lowest geometric mean over the bands), then,
per band, the fastest kernel of that family whose results are the same bits as the others
chosen for that shape. That keeps batch invariance: a row's result does not depend on how
many rows share its step. Our bf16 kernels are each batch-invariant, but differ from each
other in rounding (tiles, dot products and FMA chains sum differently), so a bf16 shape runs
one of them in every band (`avx512f` and `avx2` are the same FMA chains: they may mix); our W8A8 kernels all give the exact int32 sums and the same
epilogue, so W8A8 bands may mix them. `LEANSERVE_KERNEL_BANDS=fastest` lifts that rule (each
band its fastest kernel of the family; a row's bits may then depend on its batch's size).

The table is cached per machine (CPU model and flags, threads, torch, the kernels' sources,
the shapes and bands) in the user cache dir (`LEANSERVE_KERNEL_CACHE` overrides it).
`LEANSERVE_KERNELS` forces a choice: `remeasure` (measure again, rewrite the cache),
`flags` (no measurement: the choice by CPU flags from before this module: AMX, else AVX-512
dot products, else oneDNN or torch; the AVX2 kernels unused), or a kernel name (`amx`,
`avx512`, `avx512f`, `avx2`, `onednn`, `torch`) for every shape and band. `leanserve bench kernels`
prints the table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import HERE, cpu_flags, native

log = logging.getLogger(__name__)

SCHEMA = 1  # bump when the measurement or the table changes meaning
AMX, AVX512, AVX2, AVX512F = 0, 1, 2, 3  # Variant in kernels/isa.h
VARIANT_NAMES = {AMX: "amx", AVX512: "avx512", AVX2: "avx2", AVX512F: "avx512f"}
# which of our kernels give the same bits as each other (see the module docstring)
BF16_BITS = {AMX: "tiles", AVX512: "dot products", AVX2: "fma chains", AVX512F: "fma chains"}
FAMILIES = ("own", "onednn", "torch")
FORCED = tuple(VARIANT_NAMES.values()) + ("onednn", "torch")
ROUNDS, MIN_CALLS, BAND_SECONDS, CUT, HOPELESS = 7, 4, 0.3, 8.0, 30.0  # see measure
HEAD_MAX_ROWS = 64  # the lm_head takes one row per sequence sampled in a step, not the token budget (more: the last band)


def mode() -> str:
    """measure | remeasure | flags | a kernel name (LEANSERVE_KERNELS)."""
    m = os.environ.get("LEANSERVE_KERNELS", "measure").strip().lower() or "measure"
    if m not in ("measure", "remeasure", "flags") + FORCED:
        raise ValueError(f"LEANSERVE_KERNELS must be measure, remeasure, flags or one of {', '.join(FORCED)}; got {m!r}")
    return m


def variants(int8: bool) -> list[int]:
    """Our packed kernels' variants this CPU runs (AVX2 left out under LEANSERVE_KERNELS=flags)."""
    kernels = native()
    if kernels is None:
        return []
    found = list(kernels.product_variants(int8))
    return [v for v in found if v != AVX2] if mode() == "flags" else found


def row_bands(budget: int) -> tuple[int, ...]:
    """The bands' upper row counts: 1, 4, 16, 64, 256 below the budget, then the budget."""
    return tuple(b for b in (1, 4, 16, 64, 256) if b < budget) + (budget,)


def variant_for(bands: tuple, rows: int) -> int:
    """The variant a call of `rows` rows takes under `bands` ((up to rows, variant), rising); -1: the first one here."""
    for most, v in bands:
        if rows <= most:
            return v
    return bands[-1][1] if bands else -1


@dataclass
class Choice:
    """One projection shape's measurements and the kernels chosen for it."""
    kind: str  # "bf16" or "w8a8": the weights' form
    n: int
    k: int
    names: list[str]  # the modules of this shape, for the table
    rows: list[int]  # the bands' upper row counts
    times: dict[str, list[float | None]] = field(default_factory=dict)  # kernel -> seconds per band (None: not run)
    family: str = "own"
    bands: list[list] = field(default_factory=list)  # [[up to rows, variant], ...] when family is "own"

    @property
    def key(self) -> tuple:
        return self.kind, self.n, self.k

    def kernel_at(self, i: int) -> str:
        if self.family != "own":
            return self.family
        return VARIANT_NAMES[variant_for(tuple(map(tuple, self.bands)), self.rows[i])]


_last: list[Choice] = []  # the choices of the last model set up in this process


def last() -> list[Choice]:
    return list(_last)


# -- measuring -------------------------------------------------------------------------------

def _candidates(kind: str, n: int, k: int, copies: int) -> dict:
    """name -> (callable(x, i), info_only) for one shape; i picks one of `copies` weights."""
    import torch

    from ..models.quant import pack_for_tiles

    kernels = native()
    gen = torch.Generator().manual_seed(n * 131 + k)
    ws = [(torch.randn(n, k, generator=gen) * 0.05).bfloat16() for _ in range(copies)]
    out: dict = {}

    def int8_weights():
        qs = []
        for w in ws:
            scales = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
            q = (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
            p = pack_for_tiles(q).contiguous()
            qs.append((p, scales, kernels.w8a8_column_sums(p)))
        return qs

    tiles_ok = n % 16 == 0 and k % 64 == 0
    if kind == "bf16":
        if n % 16 == 0 and k % 32 == 0:
            packed = [pack_for_tiles(w).contiguous() for w in ws] if variants(False) else []
            for v in variants(False):
                out[VARIANT_NAMES[v]] = (lambda x, i, v=v: kernels.bf16_linear_packed(x, packed[i], None, 0, v), False)
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            reordered = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
            out["onednn"] = (lambda x, i: torch.ops.mkldnn._linear_pointwise(x, reordered[i], None, "none", [], ""), False)
        out["torch"] = (lambda x, i: torch.nn.functional.linear(x, ws[i]), False)
        wf = [w.float() for w in ws]
        out["torch-fp32"] = (lambda x, i: torch.nn.functional.linear(x.float(), wf[i]).to(x.dtype), True)
        if tiles_ok and variants(True):
            qs = int8_weights()
            for v in variants(True):
                out[f"w8a8:{VARIANT_NAMES[v]}"] = (
                    lambda x, i, v=v: kernels.w8a8_linear_packed(x, qs[i][0], qs[i][1], None, qs[i][2], v), True)
    elif tiles_ok:
        qs = int8_weights()
        for v in variants(True):
            out[VARIANT_NAMES[v]] = (lambda x, i, v=v: kernels.w8a8_linear_packed(x, qs[i][0], qs[i][1], None, qs[i][2], v),
                                     False)
    return out


def measure(choice: Choice) -> None:
    """Fills choice.times: each candidate's fastest call per band. The candidates take turns
    (rounds of one call each, the order rotated) so that a burst of load from elsewhere hits
    them alike, over a few weight copies so that large shapes are read from memory as in a
    real step. Every candidate gets MIN_CALLS calls at least: on a loaded machine a call now
    and then waits a scheduler tick (~15 ms here) for a descheduled thread, whatever its
    kernel. One slower than CUT times the best at two bands running is not run at larger
    bands; one HOPELESS times slower after MIN_CALLS calls is not repeated at that band."""
    import torch

    copies = max(1, min(4, (16 << 20) // max(1, 2 * choice.n * choice.k)))
    cands = _candidates(choice.kind, choice.n, choice.k, copies)
    choice.times = {name: [] for name in cands}
    behind: dict[str, int] = {}  # bands in a row a candidate was CUT times slower than the best
    gen = torch.Generator().manual_seed(choice.k)

    def timed(fn, x, i):
        t0 = time.perf_counter()
        fn(x, i)
        return time.perf_counter() - t0

    with torch.inference_mode():
        for rows in choice.rows:
            x = torch.randn(rows, choice.k, generator=gen).bfloat16()
            live = [n for n in cands if behind.get(n, 0) < 2]
            best_of = {n: timed(cands[n][0], x, 0) for n in live}  # the first call: warm-up, and a first sample
            started = time.perf_counter()
            for r in range(ROUNDS):
                best = min(t for n, t in best_of.items() if not cands[n][1])
                for n in live[r % len(live):] + live[:r % len(live)]:
                    if r + 2 <= MIN_CALLS or best_of[n] < HOPELESS * best:
                        best_of[n] = min(best_of[n], timed(cands[n][0], x, (r + 1) % copies))
                if r + 2 >= MIN_CALLS and time.perf_counter() - started > BAND_SECONDS:
                    break
            best = min(t for n, t in best_of.items() if not cands[n][1])
            for n in cands:
                choice.times[n].append(best_of.get(n))
                if n in best_of:
                    behind[n] = behind.get(n, 0) + 1 if best_of[n] > CUT * best else 0


def _t(seconds: float | None) -> float:
    return math.inf if seconds is None else seconds


def _family_of(name: str) -> str:
    return "own" if name in VARIANT_NAMES.values() else name


def decide(choice: Choice, fastest: bool = False) -> None:
    """choice.family and choice.bands from choice.times (see the module docstring)."""
    ids = {name: v for v, name in VARIANT_NAMES.items()}
    options: dict[tuple, list[str]] = {}  # (family, bits class) -> kernels
    for name in choice.times:
        if name.startswith("w8a8:") or name == "torch-fp32":
            continue  # information only
        fam = _family_of(name)
        cls = "any" if fastest or fam != "own" or choice.kind == "w8a8" else BF16_BITS[ids[name]]
        options.setdefault((fam, cls), []).append(name)

    def per_band(names):
        return [min(names, key=lambda n: _t(choice.times[n][i])) for i in range(len(choice.rows))]

    def score(names):
        return sum(math.log(max(_t(choice.times[b][i]), 1e-9)) for i, b in enumerate(per_band(names)))

    (fam, _), names = min(options.items(), key=lambda item: score(item[1]))
    choice.family = fam
    choice.bands = [[rows, ids[b]] for rows, b in zip(choice.rows, per_band(names))] if fam == "own" else []


def forced(choice: Choice, m: str) -> None:
    """LEANSERVE_KERNELS=flags or a kernel name: the choice without measuring."""
    int8 = choice.kind == "w8a8"
    here = variants(int8)
    import torch

    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if m == "flags":
        choice.family = "own" if here else ("onednn" if onednn else "torch")
        choice.bands = []  # the first variant here, as before
        return
    v = {name: v for v, name in VARIANT_NAMES.items()}.get(m)
    if int8 and v not in here:  # a bf16-only kernel forced: W8A8 keeps its own first kernel here
        choice.family, choice.bands = "own", []
        return
    if m in ("onednn", "torch"):
        if m == "onednn" and not onednn:
            raise ValueError(f"LEANSERVE_KERNELS={m} cannot run {choice.kind} products here")
        choice.family, choice.bands = m, []
        return
    if v not in here:
        raise ValueError(f"LEANSERVE_KERNELS={m}: this CPU cannot run that kernel (here: "
                         f"{', '.join(VARIANT_NAMES[x] for x in here) or 'none of ours'})")
    choice.family, choice.bands = "own", [[choice.rows[-1], v]]


# -- the cache -------------------------------------------------------------------------------

def cache_dir() -> Path:
    if env := os.environ.get("LEANSERVE_KERNEL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leanserve" / "kernels"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(choices: list[Choice], fastest: bool) -> dict:
    import torch

    sources = hashlib.blake2b(digest_size=8)
    for p in sorted(HERE.glob("*.cpp")) + sorted(HERE.glob("*.h")) + [Path(__file__)]:
        sources.update(p.read_bytes())
    return {"schema": SCHEMA, "cpu": _cpu_model(), "flags": " ".join(sorted(cpu_flags())),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "kernels": sources.hexdigest(),
            "fastest": fastest, "shapes": [[c.kind, c.n, c.k, c.rows] for c in choices]}


def _cache_file(key: dict) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return cache_dir() / f"{digest}.json"


def _load(path: Path, key: dict) -> list[dict] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data["choices"] if data.get("key") == key else None


def _store(path: Path, key: dict, choices: list[Choice]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "choices": [asdict(c) for c in choices]}, indent=1))
        tmp.replace(path)  # atomic: another process reads the old file or the new one
    except OSError as e:
        log.warning("could not store the kernel table in %s: %s", path, e)


# -- choosing for a model ----------------------------------------------------------------------

def choose(shapes: dict[tuple, list[str]], budget: int) -> dict[tuple, Choice]:
    """The choice for each (kind, n, k) shape, its module names given; measured, cached or forced."""
    m = mode()
    fastest = os.environ.get("LEANSERVE_KERNEL_BANDS", "") == "fastest"
    choices = []
    for (kind, n, k), names in sorted(shapes.items()):
        head = all(name == "lm_head" for name in names)
        choices.append(Choice(kind, n, k, sorted(set(names)), list(row_bands(min(budget, HEAD_MAX_ROWS) if head else budget))))
    source = m
    if m in ("measure", "remeasure"):
        key = cache_key(choices, fastest)
        path = _cache_file(key)
        cached = _load(path, key) if m == "measure" else None
        if cached is not None:
            choices = [Choice(**c) for c in cached]
            source = f"cached in {path}"
        else:
            started = time.perf_counter()
            for c in choices:
                measure(c)
                decide(c, fastest)
            _store(path, key, choices)
            source = f"measured in {time.perf_counter() - started:.1f} s, cached in {path}"
    else:
        for c in choices:
            forced(c, m)
    _last[:] = choices
    _report(choices, source)
    return {c.key: c for c in choices}


def _bands_text(c: Choice) -> str:
    if c.family != "own":
        return c.family
    if not c.bands:
        return VARIANT_NAMES[variants(c.kind == "w8a8")[0]] + " (by flags)"
    parts, lo = [], 1
    for rows, v in c.bands:
        if parts and parts[-1][1] == v:
            parts[-1][0][1] = rows
        else:
            parts.append([[lo, rows], v])
        lo = rows + 1
    return ", ".join(f"{VARIANT_NAMES[v]} {a}-{b} rows" for (a, b), v in parts)


def _startup_log() -> None:
    """The choice belongs in the startup log, at INFO; where the application set up no logging
    (`leanserve serve` leaves the root logger alone) this module's lines go to stderr."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _report(choices: list[Choice], source: str) -> None:
    _startup_log()
    log.info("product kernels (%s):", source)
    for c in choices:
        log.info("  %s %s %dx%d: %s", c.kind, "/".join(c.names), c.k, c.n, _bands_text(c))
        if not c.times:
            continue
        chosen = [c.times[c.kernel_at(i)][i] for i in range(len(c.rows))]
        lossy = [name for name in c.times if name.startswith("w8a8:")]
        if lossy:  # say so when a lossy mode is much faster here; never switch to it silently
            best = [min(_t(c.times[n][i]) for n in lossy) for i in range(len(c.rows))]
            factor = max((a / b for a, b in zip(chosen, best) if b < math.inf), default=0.0)
            if factor >= 1.5:
                log.info("    --quantization w8a8 (lossy) measured up to %.1fx faster on this shape here; not switched",
                         factor)


def format_table(choices: list[Choice]) -> str:
    """The measured table: per shape and band, each kernel's time (ms), the chosen one marked *."""
    lines = []
    for c in choices:
        lines.append(f"{c.kind} {'/'.join(c.names)}  {c.k} -> {c.n}: {_bands_text(c)}")
        names = list(c.times)
        if not names:
            continue
        lines.append("  rows  " + "".join(f"{n:>14}" for n in names))
        for i, rows in enumerate(c.rows):
            cells = []
            for n in names:
                t = c.times[n][i]
                mark = "*" if n == c.kernel_at(i) else " "
                cells.append(f"{t * 1e3:>12.3f}{mark} " if t is not None else f"{'-':>14}")
            lines.append(f"  {rows:>4}  " + "".join(cells))
    return "\n".join(lines)


def info_labels() -> list[dict[str, str]]:
    """One label set per shape and band run, for /metrics' leanserve_kernel_info."""
    out = []
    for c in _last:
        lo = 1
        for i, rows in enumerate(c.rows):
            out.append({"weights": c.kind, "shape": f"{c.k}x{c.n}", "modules": "/".join(c.names),
                        "rows": f"{lo}-{rows}", "kernel": c.kernel_at(i)})
            lo = rows + 1
    return out


def main(argv: list[str] | None = None) -> None:
    """`leanserve bench kernels`: sets up the model as the server would and prints the table."""
    import argparse

    from ..config import EngineConfig

    p = argparse.ArgumentParser(prog="leanserve bench kernels", description=main.__doc__)
    p.add_argument("--model", default=None, help="model folder or GGUF (default: the built-in model)")
    p.add_argument("--quantization", default=None, help="e.g. w8a8: the table of that model's projections")
    p.add_argument("--remeasure", action="store_true", help="measure again (LEANSERVE_KERNELS=remeasure)")
    p.add_argument("--budget", type=int, default=EngineConfig().max_num_batched_tokens, help="the largest band")
    args = p.parse_args(argv)
    if args.remeasure:
        os.environ["LEANSERVE_KERNELS"] = "remeasure"
    from ..engine.llm import LLM

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kw = {"quantization": args.quantization, "max_num_batched_tokens": args.budget, "num_kv_blocks": 16}
    LLM(args.model, **kw) if args.model else LLM(**kw)
    import torch

    print(f"# {_cpu_model()}, {torch.get_num_threads()} threads; times in ms (fastest of up to {ROUNDS + 1} calls), * chosen")
    print(format_table(last()))
