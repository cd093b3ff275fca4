"""Issue 33: the AVX2 product kernels (kernels/products_avx2.h) against reference products at
every row-count class, their batch invariance, and the kernel choice by measurement
(kernels/select.py): decisions, forcing, the per-machine cache, the model set up with it."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leanserve.kernels import native, select
from leanserve.models.quant import PackedLinear, W8A8Linear, pack_for_tiles

AVX2 = select.AVX2
needs_avx2 = pytest.mark.skipif(native() is None or AVX2 not in native().product_variants(False),
                                reason="needs the native kernels on an x86 CPU with AVX2 + FMA")
# every tile shape and tail of the AVX2 kernels: 1 row (1 x 4 blocks), 2-3 (2 x 2 and a row),
# 4+ (4 x 1), past one 32-row chunk, and a whole token budget
ROWS = [1, 2, 3, 4, 5, 7, 16, 33, 64, 130, 512]
# 4-block groups whole and not (15 blocks), a lone block, odd block counts
SHAPES = [(576, 960), (1536, 576), (64, 16), (96, 48), (64, 80), (576, 16 * 37)]


def bf16_linear(n_in, n_out, bias, seed):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).to(torch.bfloat16)


@needs_avx2
@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_avx2_bf16_product_is_the_float_product_rounded_once(rows, n_in, n_out):
    """float32 FMA sums of the bf16 weights widened in registers, rounded once to bf16: within
    a bf16 step of the exact product, and nearly always its correctly rounded value."""
    for bias in (False, True):
        linear = bf16_linear(n_in, n_out, bias, rows * n_out)
        x = torch.randn(rows, n_in, dtype=torch.bfloat16)
        packed = pack_for_tiles(linear.weight.detach()).contiguous()
        got = native().bf16_linear_packed(x, packed, linear.bias, 0, AVX2)
        exact = x.double() @ linear.weight.double().t() + (linear.bias.double() if bias else 0)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n_out)
        torch.testing.assert_close(got.double(), exact, atol=1e-2, rtol=8e-3)
        assert (got != exact.bfloat16()).double().mean() < 0.01
        if not bias:  # greedy decoding's lm_head: the first argmax of those very logits
            assert torch.equal(native().bf16_linear_packed_argmax(x, packed, AVX2), got.float().argmax(dim=-1))


@needs_avx2
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_out", [960, 3072, 16 * 37])
def test_avx2_bf16_rows_do_not_depend_on_their_batch(n_out, threads):
    """A row's output is the same bits alone, among 2, 3 or 512 rows (other tile shapes), on
    one thread or two: each output is one FMA chain in K order."""
    linear = bf16_linear(576, n_out, False, 0)
    packed = pack_for_tiles(linear.weight.detach()).contiguous()
    x = torch.randn(512, 576, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = native().bf16_linear_packed(x, packed, None, 0, AVX2)
        for a, b in [(0, 1), (5, 6), (511, 512), (0, 2), (7, 10), (3, 36), (100, 233)]:
            assert torch.equal(native().bf16_linear_packed(x[a:b], packed, None, 0, AVX2), together[a:b])
    finally:
        torch.set_num_threads(previous)


@needs_avx2
def test_avx2_matches_the_other_variants_here():
    """Where this CPU also runs the AMX or AVX512-BF16 kernel, the same packed weight gives the
    same products to a bf16 step (their float32 sums round differently)."""
    linear = bf16_linear(576, 960, True, 3)
    packed = pack_for_tiles(linear.weight.detach()).contiguous()
    x = torch.randn(37, 576, dtype=torch.bfloat16)
    mine = native().bf16_linear_packed(x, packed, linear.bias, 0, AVX2)
    for v in native().product_variants(False):
        other = native().bf16_linear_packed(x, packed, linear.bias, 0, v)
        torch.testing.assert_close(other.float(), mine.float(), atol=1e-2, rtol=8e-3)


@pytest.mark.skipif(native() is None or select.AVX512F not in native().product_variants(False),
                    reason="needs AVX-512F")
@pytest.mark.parametrize("rows", ROWS)
def test_avx512f_widening_gives_the_avx2_bits(rows):
    """The 512-bit widening kernel runs each output's FMA chain in the same order as the AVX2
    one: the same bits (so a shape's bands may mix the two), the argmax too."""
    for n_in, n_out in SHAPES:
        linear = bf16_linear(n_in, n_out, True, rows)
        packed = pack_for_tiles(linear.weight.detach()).contiguous()
        x = torch.randn(rows, n_in, dtype=torch.bfloat16)
        wide = native().bf16_linear_packed(x, packed, linear.bias, 0, select.AVX512F)
        assert torch.equal(wide, native().bf16_linear_packed(x, packed, linear.bias, 0, AVX2))
        assert torch.equal(native().bf16_linear_packed_argmax(x, packed, select.AVX512F),
                           native().bf16_linear_packed_argmax(x, packed, AVX2))


@needs_avx2
def test_avx2_swiglu_packing_gives_the_plain_output_and_refuses_the_fused_epilogue():
    linear = bf16_linear(576, 3072, False, 1)
    plain, interleaved = PackedLinear(linear), PackedLinear(linear, swiglu=True)
    plain.bands = interleaved.bands = ((512, AVX2),)
    x = torch.randn(9, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(interleaved(x), plain(x))
    with pytest.raises(RuntimeError, match="SwiGLU"):
        native().bf16_linear_packed(x, interleaved.packed, None, 2, AVX2)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", ROWS)
def test_avx2_w8a8_gives_the_exact_integer_products_bits(rows, dtype):
    """VPMADDWD sums int8 pairs exactly, so the AVX2 W8A8 kernel gives the bits of the float32
    product of the same int8 values (W8A8Linear.emulated, exact below 2**24) and of every other
    W8A8 kernel here; NaN rows stay NaN and alone; a row's result does not depend on its batch."""
    torch.manual_seed(rows)
    for n_in, n_out in [(576, 960), (1536, 576), (64, 16), (128, 48)]:
        linear = nn.Linear(n_in, n_out, bias=False).to(dtype)
        ours, ref = W8A8Linear(linear), W8A8Linear(linear, own=False)
        ours.bands = ((10**6, AVX2),)
        x = torch.randn(rows, n_in, dtype=dtype) * torch.logspace(-3, 2, rows)[:, None].to(dtype)
        if rows > 2:
            x[1, 3] = float("nan")
        with torch.inference_mode():
            out = ours(x)
            torch.testing.assert_close(out, ref(x), rtol=0, atol=0, equal_nan=True)
            for v in native().product_variants(True):
                other = native().w8a8_linear_packed(x, ours.packed, ours.scales, None, ours.sums128, v)
                torch.testing.assert_close(other, out, rtol=0, atol=0, equal_nan=True)
            for i in {0, rows // 2, rows - 1}:
                torch.testing.assert_close(ours(x[i:i + 1]), out[i:i + 1], rtol=0, atol=0, equal_nan=True)


# -- the choice ------------------------------------------------------------------------------------

def choice(kind="bf16", times=None, rows=(1, 4, 64)):
    c = select.Choice(kind, 64, 64, ["x"], list(rows))
    c.times = times
    return c


def test_a_bf16_shape_takes_one_bit_class_in_every_band():
    """The family with the lowest geometric mean wins; a bf16 shape then runs one of our
    kernels in every band (they round differently), W8A8 the fastest per band (same bits)."""
    times = {"amx": [1.0, 2.0, 9.0], "avx2": [0.5, 1.0, 10.0], "torch": [5.0, 5.0, 5.0], "torch-fp32": [0.1] * 3}
    c = choice(times=times)
    select.decide(c)
    assert c.family == "own" and c.bands == [[1, AVX2], [4, AVX2], [64, AVX2]]
    c = choice(times={**times, "avx512f": [0.6, 0.5, 8.0]})  # the same FMA chains as avx2: the bands may mix them
    select.decide(c)
    assert c.bands == [[1, AVX2], [4, select.AVX512F], [64, select.AVX512F]]
    c = choice(times=times)
    select.decide(c, fastest=True)  # LEANSERVE_KERNEL_BANDS=fastest: each band its fastest
    assert c.bands == [[1, AVX2], [4, AVX2], [64, select.AMX]]
    c = choice("w8a8", times={"amx": [1.0, 2.0, 9.0], "avx2": [0.5, 1.0, 10.0]})
    select.decide(c)
    assert c.bands == [[1, AVX2], [4, AVX2], [64, select.AMX]]
    c = choice(times={"avx2": [9.0, 9.0, 9.0], "torch": [1.0, 1.0, 1.0], "w8a8:avx2": [0.1] * 3})
    select.decide(c)  # information-only kernels (float32 weights, lossy W8A8) are never chosen
    assert c.family == "torch" and c.bands == [] and c.kernel_at(2) == "torch"
    assert select.variant_for(((1, 2), (64, 0)), 1) == 2 and select.variant_for(((1, 2), (64, 0)), 500) == 0
    assert select.variant_for((), 5) == -1


def test_forcing_by_env(monkeypatch):
    monkeypatch.setenv("LEANSERVE_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="LEANSERVE_KERNELS"):
        select.mode()
    monkeypatch.setenv("LEANSERVE_KERNELS", "torch")
    c = choice()
    select.forced(c, select.mode())
    assert c.family == "torch"
    if native() is not None and AVX2 in native().product_variants(False):
        c = choice()
        select.forced(c, "avx2")
        assert c.family == "own" and c.bands == [[64, AVX2]]
        monkeypatch.setenv("LEANSERVE_KERNELS", "flags")  # as before issue 33: no AVX2 kernels
        assert AVX2 not in select.variants(False)
    if native() is not None and select.AMX not in native().product_variants(False):
        with pytest.raises(ValueError, match="cannot run"):
            select.forced(choice(), "amx")


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """choose() with a stand-in measurement that counts its calls, caching in tmp_path."""
    monkeypatch.setenv("LEANSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("LEANSERVE_KERNELS", raising=False)
    calls = []

    def fake(c):
        calls.append(c.key)
        c.times = {"avx2": [1.0] * len(c.rows), "torch": [2.0] * len(c.rows)}

    monkeypatch.setattr(select, "measure", fake)
    return calls


def test_the_table_is_measured_once_per_machine_and_cached(measured, monkeypatch, tmp_path):
    shapes = {("bf16", 960, 576): ["qkv_proj"], ("bf16", 49152, 576): ["lm_head"]}
    first = select.choose(shapes, 512)
    assert len(measured) == 2 and first[("bf16", 960, 576)].rows == [1, 4, 16, 64, 256, 512]
    assert first[("bf16", 49152, 576)].rows[-1] == select.HEAD_MAX_ROWS  # one row per sequence sampled
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["cpu"]
    again = select.choose(shapes, 512)  # hit: no measurement
    assert len(measured) == 2 and again[("bf16", 960, 576)].bands == first[("bf16", 960, 576)].bands
    assert select.last() and select.info_labels()[0]["kernel"] == "avx2"
    monkeypatch.setenv("LEANSERVE_KERNELS", "remeasure")  # the re-run flag
    select.choose(shapes, 512)
    assert len(measured) == 4
    monkeypatch.delenv("LEANSERVE_KERNELS")
    select.choose(shapes, 256)  # another key: other bands
    select.choose({("bf16", 960, 576): ["qkv_proj"]}, 512)  # other shapes
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if previous > 1 else 2)  # another thread count
    try:
        select.choose(shapes, 512)
    finally:
        torch.set_num_threads(previous)
    assert len(measured) == 4 + 2 + 1 + 2
    files[0].write_text("{not json")  # a broken file is measured again and replaced
    select.choose(shapes, 512)
    assert len(measured) == 11 and json.loads(files[0].read_text())["choices"]


def test_a_real_measurement_of_small_shapes(monkeypatch, tmp_path):
    """The measurement itself, on shapes small enough for a test: every kernel timed at every
    band (or dropped once far behind), a choice of a kernel that ran, a printable table."""
    monkeypatch.setenv("LEANSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("LEANSERVE_KERNELS", raising=False)
    got = select.choose({("bf16", 64, 128): ["o_proj"], ("w8a8", 64, 128): ["o_proj"]}, 16)
    bf16 = got[("bf16", 64, 128)]
    assert set(bf16.times) >= {"torch", "torch-fp32"} and all(len(t) == 3 for t in bf16.times.values())
    assert all(bf16.times[bf16.kernel_at(i)][i] is not None for i in range(3))
    table = select.format_table(select.last())
    assert "o_proj" in table and "*" in table


# -- a model set up with the choice ------------------------------------------------------------

@needs_avx2
@pytest.mark.parametrize("quantization", [None, "w8a8"])
def test_forced_avx2_plan_matches_the_module_path_and_rows_do_not_depend_on_their_batch(monkeypatch, tiny_models,
                                                                                        quantization):
    """LEANSERVE_KERNELS=avx2: every projection of the tiny Llama in the AVX2 kernels; the fused
    plan gives the module path's bits, and each prompt's greedy tokens and logprobs are the
    same alone and batched with the others (each prefilled in one chunk, no prefix cache)."""
    from leanserve import LLM, SamplingParams
    from leanserve.models import llama

    monkeypatch.setenv("LEANSERVE_KERNELS", "avx2")
    llm = LLM(str(tiny_models["llama"]), dtype="bfloat16", quantization=quantization, num_kv_blocks=64,
              prefix_caching=False, kv_cache_dtype="int8" if quantization else "auto")
    model = llm.engine.runner.model
    proj = model.layers[0].mlp.gate_up_proj
    assert proj.own and proj.bands and {v for _, v in proj.bands} == {AVX2}
    assert "avx2" in repr(proj)
    prompts = [[5 + i, 6, 7, 8, 9] * (2 + i) for i in range(5)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)

    def run(ps):
        return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in llm.generate(ps, params)]

    together = run(prompts)
    assert model._plan[1] is not None  # the native plan ran the step
    assert [run([p])[0] for p in prompts] == together
    monkeypatch.setattr(llama.CausalLM, "fused", False)
    assert run(prompts) == together


def test_flags_mode_is_the_choice_from_before(monkeypatch, tiny_models):
    """LEANSERVE_KERNELS=flags: what ran before issue 33, for side-by-side benchmarks; on a CPU
    without AMX / AVX512-BF16 and oneDNN bf16 the bf16 projections stay plain torch linears."""
    from leanserve import LLM

    monkeypatch.setenv("LEANSERVE_KERNELS", "flags")
    llm = LLM(str(tiny_models["llama"]), dtype="bfloat16", num_kv_blocks=16)
    proj = llm.engine.runner.model.layers[0].mlp.gate_up_proj
    ours = native() is not None and {0, 1} & set(native().product_variants(False))
    assert isinstance(proj, PackedLinear) == bool(ours or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    x = torch.randn(3, proj.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert proj(x).shape == (3, proj.out_features)
