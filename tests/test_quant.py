"""Weight-only quantization: each quantized layer against its float original, the whole model
against the float model (tiny random models made by transformers here), and the built-in
model's greedy tokens against bf16 (slow)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from leanserve.kernels import native
from leanserve.models.llama import AttnBatch, KVPool, build_model
from leanserve.models.loader import _per_expert
from leanserve.models import quant
from leanserve.models.quant import AutoLinear, Int4Linear, Int8Linear, W8A8Linear, quantize_model

# Bound on the relative error of a layer's output, Gaussian weights. Measured: int8 per channel
# 0.8%, int4 in groups of 32 7.7%, W8A8 (int8 rows too) 1.0-1.1% (bf16 itself: 0.2%).
LAYER_TOLERANCE = {Int8Linear: 0.02, Int4Linear: 0.12, W8A8Linear: 0.02}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def float_linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    return linear.to(dtype)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, W8A8Linear])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_is_close_to_the_float_one(cls, dtype, bias):
    linear = float_linear(576, 960, bias, dtype)
    x = torch.randn(5, 576, dtype=dtype)
    ref = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    out = cls(linear)(x)
    assert out.dtype == dtype and out.shape == (5, 960)
    assert relative_error(out, ref) < LAYER_TOLERANCE[cls]


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, W8A8Linear])
def test_a_rows_result_does_not_depend_on_its_batch(cls):
    layer = cls(float_linear(576, 3072, True, torch.bfloat16))
    x = torch.randn(17, 576, dtype=torch.bfloat16)
    batched = layer(x)
    for i in range(17):
        assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1]), f"row {i}"


def test_w8a8_without_int8_dot_products_is_the_exact_integer_product(monkeypatch):
    """Where oneDNN would pair int8 products in saturating int16 (AVX2 only), W8A8 computes
    the same int8 values' products in float32: the exact int32 sums, rescaled."""
    monkeypatch.setattr(quant, "int8_dot_products", lambda: False)
    linear = float_linear(576, 960, True, torch.bfloat16)
    layer = W8A8Linear(linear, own=False)
    assert layer.emulated and "kernel=float32" in repr(layer)
    x = torch.randn(7, 576, dtype=torch.bfloat16)
    q, xs = quant.quantize_kv(x)
    w = linear.weight.float()
    wq = (w / layer.scales[:, None]).round().clamp(-127, 127).to(torch.int64)
    sums = q.to(torch.int64) @ wq.T  # exact
    ref = (sums.float() * layer.scales * xs[:, None] + linear.bias.float()).to(torch.bfloat16)
    assert torch.equal(layer(x), ref)
    assert torch.equal(layer(x[2:3]), layer(x)[2:3])


@pytest.mark.parametrize("n_out", [3072, 576])
def test_w8a8_rows_on_two_threads_do_not_depend_on_their_batch(n_out):
    """With two threads the products split rows and column groups between them (64 rows of
    576 columns: 9 groups, an odd count, so two runs of rows); a row's bits stay its own."""
    layer = W8A8Linear(float_linear(576, n_out, True, torch.bfloat16))
    x = torch.randn(64, 576, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batched = layer(x)
        for i in (0, 5, 35, 36, 63):
            assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1]), f"row {i}"
        assert torch.equal(layer(x[:40]), batched[:40])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("small", [Int8Linear, Int4Linear])
def test_auto_uses_the_small_kernel_for_few_rows_and_the_dense_weight_for_many(small):
    linear = float_linear(576, 960, True, torch.bfloat16)
    auto, quantized = AutoLinear(linear, max_rows=4, small=small), small(linear)
    few, many = torch.randn(4, 576, dtype=torch.bfloat16), torch.randn(5, 576, dtype=torch.bfloat16)
    assert torch.equal(auto(few), quantized(few))
    assert torch.equal(auto(many), linear(many))


@pytest.mark.parametrize("small", [Int8Linear, Int4Linear])
def test_auto_row_limit_follows_the_dense_kernel(small):
    """The row limit is the one measured for the kernel the dense weights run in: the AMX
    tiles, AVX512-BF16 dot products (where int8 never pays: 0 rows) or oneDNN."""
    linear = float_linear(576, 960, False, torch.bfloat16)
    auto = AutoLinear(linear, small=small)
    if not getattr(auto.dense, "own", False):
        expected = quant.MAX_ROWS[small]
    else:
        expected = (quant.MAX_ROWS_AMX if auto.dense.amx else quant.MAX_ROWS_AVX512)[small]
    assert auto.max_rows == expected
    assert quant.MAX_ROWS_AVX512[Int8Linear] == 0 and quant.MAX_ROWS_AVX512[Int4Linear] == 4
    one = torch.randn(1, 576, dtype=torch.bfloat16)
    assert torch.equal(auto(one), (auto.small if auto.max_rows >= 1 else auto.dense)(one))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w8a8_native_and_torch_paths_agree(monkeypatch, dtype):
    """The native entry (one call: quantize rows, oneDNN's int8 product, rescale) and the torch
    ops it stands for give the same numbers: bitwise without a bias (with one, the native
    side may fuse the multiply and the add). A row holding NaN comes out NaN and leaves the
    other rows alone."""
    from leanserve.kernels import native

    assert native() is not None, "the native kernels must build on this machine (g++ and ninja)"
    for bias in (False, True):
        layer = W8A8Linear(float_linear(576, 960, bias, dtype), own=False)
        x = torch.randn(9, 576, dtype=dtype) * torch.logspace(-3, 2, 9)[:, None].to(dtype)
        x[4] = 0  # a zero row: scale 0, output exactly the bias
        x[6, 100] = float("nan")
        fast = layer(x)
        monkeypatch.setattr(quant, "native", lambda: None)
        slow = layer(x)
        monkeypatch.undo()
        assert fast[6].isnan().all() and slow[6].isnan().all()
        keep = torch.arange(9) != 6
        if bias:
            torch.testing.assert_close(fast[keep], slow[keep], rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(fast[keep], slow[keep]) and not fast[4].any()
        assert not fast[keep].isnan().any()


needs_packed_int8 = pytest.mark.skipif(native() is None or not native().w8a8_packed_available(),
                                       reason="this CPU (or its OS) offers neither AMX-INT8, AVX512-VNNI nor AVX2")


@needs_packed_int8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 64, 100, 250])
@pytest.mark.parametrize("n_in,n_out", [(576, 960), (1536, 576), (64, 16), (128, 48), (64, 80), (64, 112)])
def test_w8a8_packed_kernel_gives_the_onednn_paths_bits(dtype, rows, n_in, n_out):
    """Our kernel (AMX-INT8 tiles, else AVX512-VNNI, whose unsigned x signed products need the
    weights' column sums taken back out, else AVX2's exact VPMADDWD pairs) against oneDNN's int8
    product on the same weights: the same bits, bias or not, for row counts around the 16-row
    tiles and the 32 x 32 blocks, widths of one and of an odd number of 16-column blocks; NaN
    rows stay NaN and alone. Where oneDNN has no exact int8 products (AVX2 only) the reference
    is the float32 product of the same int8 values (W8A8Linear.emulated): the same bits without
    a bias; with one, our epilogue may fuse the multiply and the add."""
    for bias in (False, True):
        linear = float_linear(n_in, n_out, bias, dtype, seed=rows)
        tiles, onednn = W8A8Linear(linear), W8A8Linear(linear, own=False)
        assert tiles.own and not onednn.own
        x = torch.randn(rows, n_in, dtype=dtype) * torch.logspace(-3, 2, rows)[:, None].to(dtype)
        x[rows // 2] = 0
        if rows > 2:
            x[1, 3] = float("nan")
        out = tiles(x)
        if bias and onednn.emulated:
            torch.testing.assert_close(out, onednn(x), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5,
                                       equal_nan=True)
        else:
            torch.testing.assert_close(out, onednn(x), rtol=0, atol=0, equal_nan=True)
        assert not out[rows // 2].isnan().any() and (rows <= 2 or out[1].isnan().all())
        # the column sums made at load: 128 x each column's int8 weights, and the same bits as
        # the kernel's own pass over the weights (no sums given)
        blocks = tiles.packed.view(n_out // 16, n_in // 64, 16, 16, 4).int()  # [block, K/64, quad, column, 4]
        assert torch.equal(tiles.sums128, 128 * blocks.sum(dim=(1, 2, 4)).flatten())
        alone = native().w8a8_linear_packed(x, tiles.packed, tiles.scales, tiles.bias)
        torch.testing.assert_close(alone, out, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="columns"):
        tiles(torch.randn(2, n_in + 64, dtype=dtype))


def test_w8a8_activation_rows_quantize_like_the_int8_kv_cache():
    from leanserve.kernels import native
    from leanserve.models.llama import quantize_kv

    assert native() is not None, "the native kernels must build on this machine (g++ and ninja)"
    for n in (576, 1536, 40):  # 40: not a multiple of 16, the scalar path
        x = (torch.randn(33, n) * torch.logspace(-4, 3, 33)[:, None]).bfloat16()
        x[3] = 0
        x[5, 7] = float("inf")
        q, scales = native().quantize_rows(x)
        q_ref, scales_ref = quantize_kv(x)
        assert torch.equal(q, q_ref)
        torch.testing.assert_close(scales, scales_ref, rtol=0, atol=0, equal_nan=True)
        assert scales[5].isnan() and not q[5].any()


def test_int4_falls_back_to_int8_where_its_kernel_cannot_go():
    model = tiny_model("llama", intermediate_size=72)  # down_proj has 72 inputs: not groups of 32
    quantize_model(model, "int4")
    assert isinstance(model.layers[0].mlp.gate_up_proj.small, Int4Linear)
    assert isinstance(model.layers[0].mlp.down_proj.small, Int8Linear)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="int8"):
        quantize_model(tiny_model("llama"), "int3")


# -- whole models ----------------------------------------------------------------------------------

TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),  # q/k/v biases
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_model(arch: str, dtype=torch.bfloat16, **overrides):
    """A random transformers model of `arch`, loaded into leanserve's CausalLM."""
    config_cls, model_cls, extra = TINY_CONFIGS[arch]
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
    config = getattr(transformers, config_cls)(architectures=[model_cls], **{**shape, **extra, **overrides})
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random init leaves biases at 0, which would hide a dropped bias
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return build_model(config.to_dict(), _per_expert(hf.state_dict()), dtype, max_len=128)


def all_logits(model, ids: list[int]) -> torch.Tensor:
    """Float32 logits after every position of one sequence, prefilled in one step."""
    n = len(ids)
    pool = KVPool(model.args, num_blocks=-(-n // 16), block_size=16, dtype=model.embed_tokens.weight.dtype)
    batch = AttnBatch.prefill(n)
    return model(torch.tensor(ids), torch.arange(n), batch, pool, torch.arange(n))


@pytest.mark.parametrize("arch", TINY_CONFIGS)
@pytest.mark.parametrize("method", ["int8", "int4", "auto", "w8a8"])
def test_quantize_model_replaces_the_linear_layers_only(arch, method):
    model = tiny_model(arch)
    embedding = model.embed_tokens.weight.clone()
    quantize_model(model, method)
    kinds = {"int8": Int8Linear, "int4": AutoLinear, "auto": AutoLinear, "w8a8": W8A8Linear}
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            assert type(module) is nn.Linear, name  # Mixtral's router keeps the compute dtype
        elif name.endswith(".dense") and isinstance(model.get_submodule(name[:-6]), AutoLinear):
            continue  # AutoLinear's many-row path: a plain bf16 Linear where the CPU cannot pack bf16
        elif isinstance(module, nn.Linear):
            pytest.fail(f"{name} was not quantized")
    assert isinstance(model.layers[0].self_attn.qkv_proj, kinds[method])
    if method == "int4":  # int4 for few rows (bf16 for many); the lm_head int8 for few rows
        assert isinstance(model.layers[0].self_attn.qkv_proj.small, Int4Linear)
        assert isinstance(model.lm_head.small, Int8Linear)
    else:
        assert isinstance(model.lm_head, kinds[method] if method != "int4" else AutoLinear)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.embed_tokens.weight, embedding)


# (relative error of the logits, share of positions whose argmax agrees) against the float32
# model. Measured on the three tiny models: bf16 1.1% / 97-100%, int8 2.1-2.3% / 97-100%,
# w8a8 3.0-4.4% / 95-100%, int4 24-34% / 57-70%: 4 bits in groups of 32 cost ~8% per Gaussian weight matrix, and that
# compounds; real checkpoints fare better (the built-in model, already 4-bit, loses nothing).
# `auto` runs 40 rows through the dense weights; its int8 path is the one tested above. The
# int4 rows are made to take the int4 kernel (by default 40 rows would take the dense weights).
@pytest.mark.parametrize("arch", TINY_CONFIGS)
@pytest.mark.parametrize("method, max_error, min_top1", [("int8", 0.04, 0.9), ("int4", 0.45, 0.5), ("auto", 0.04, 0.9),
                                                      ("w8a8", 0.07, 0.9)])
def test_quantized_model_logits_are_close_to_the_float_models(monkeypatch, arch, method, max_error, min_top1):
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = all_logits(tiny_model(arch, torch.float32), ids)
    model = tiny_model(arch)
    monkeypatch.setitem(quant.MAX_ROWS, Int4Linear, 1000)
    monkeypatch.setitem(quant.MAX_ROWS_AMX, Int4Linear, 1000)
    monkeypatch.setitem(quant.MAX_ROWS_AVX512, Int4Linear, 1000)
    quantize_model(model, method)
    out = all_logits(model, ids)
    assert relative_error(out, ref) < max_error
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= min_top1


@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_w8a8_smoothing_leaves_a_float_model_unchanged(arch):
    """SmoothQuant's factors are folded into the norms, the value rows and the up rows; in
    float32 the model computes what it did (Mixtral: its attention only), while the
    projections' inputs are divided by factors far from 1."""
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    model = tiny_model(arch, torch.float32)
    ref = all_logits(model, ids)
    qkv_input = model.layers[0].input_layernorm.weight.clone()
    factors = quant.smooth_for_w8a8(model, list(range(3, 200)), alpha=0.5)
    torch.testing.assert_close(all_logits(model, ids), ref, atol=2e-4, rtol=2e-4)
    modules = {"qkv", "o"} | (set() if arch == "mixtral" else {"gate_up", "down"})
    assert {m for _, m in factors} == modules and len(factors) == 2 * len(modules)
    s_in = factors[0, "qkv"][0]
    assert (s_in - 1).abs().min() > 0.5  # the premise: inputs really are rescaled
    torch.testing.assert_close(model.layers[0].input_layernorm.weight * s_in, qkv_input)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()  # untied: its own factors


def test_the_engine_smooths_w8a8_unless_told_not_to(tiny_llama):
    from leanserve import LLM, cli

    parse = cli.build_parser().parse_args
    assert cli._engine_config(parse(["serve", "--quantization", "w8a8"])).w8a8_smoothing is True
    assert cli._engine_config(parse(["serve", "--quantization", "w8a8", "--no-w8a8-smoothing"])).w8a8_smoothing is False
    smoothed = LLM(str(tiny_llama), quantization="w8a8", num_kv_blocks=16).engine
    assert smoothed.smoothing and smoothed.lora.smoothing is smoothed.smoothing
    for options in (dict(quantization="w8a8", w8a8_smoothing=False), dict(quantization="int8"), {}):
        assert LLM(str(tiny_llama), num_kv_blocks=16, **options).engine.smoothing == {}


@pytest.mark.slow
def test_w8a8_smoothing_brings_the_builtin_model_closer_to_bf16(builtin_gguf):
    """On text it was not calibrated on (this repository's README), the built-in model's
    W8A8 next-token distributions, against bf16's: measured mean KL 0.053 plain, 0.024
    smoothed; bf16's top token kept at 89.0% and 90.3% of the 600 positions."""
    from pathlib import Path

    from leanserve.models.loader import load_model_files

    files = load_model_files(str(builtin_gguf))
    readme = (Path(__file__).parent.parent / "README.md").read_text()[:5000]
    ids = files.tokenizer.encode(readme)[:600]

    def build(smooth: bool | None):
        model = build_model(files.config, dict(files.weights), torch.bfloat16, 1024)
        if smooth is None:
            quant.pack_model(model)
            return model
        if smooth:
            quant.smooth_for_w8a8(model, files.tokenizer.encode(quant.CALIBRATION_TEXT))
        quantize_model(model, "w8a8")
        return model

    ref = all_logits(build(None), ids).float().log_softmax(-1)
    results = {}
    for smooth in (False, True):
        out = all_logits(build(smooth), ids).float().log_softmax(-1)
        kl = (ref.exp() * (ref - out)).sum(-1).mean().item()
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        results[smooth] = (kl, top1)
    assert results[True][0] < 0.8 * results[False][0], results
    assert results[True][1] >= results[False][1], results


# -- the built-in model ---------------------------------------------------------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis in one paragraph.",
                "List three uses of Python.", "How do I boil an egg?", "Who wrote Hamlet?",
                "Give me a tip for better sleep.", "Translate 'good morning' into Spanish."]


@pytest.fixture(scope="module")
def builtin_prompts(builtin_gguf):
    from leanserve.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(str(builtin_gguf))
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in CHAT_PROMPTS]


def greedy_and_forced(method: str | None, prompts: list[list[int]], forced_on: list[list[int]] | None):
    """Greedy 16 tokens per prompt, and the next token after each prefix of `forced_on`."""
    from leanserve import LLM, SamplingParams

    llm = LLM(dtype="bfloat16", num_kv_blocks=512, max_num_seqs=4, quantization=method)  # 4 decodes: auto's int8 side
    greedy = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))]
    forced_on = forced_on or greedy
    prefixes = [p + t[:j] for p, t in zip(prompts, forced_on) for j in range(16)]
    forced = [o.token_ids[0] for o in llm.generate(prefixes, SamplingParams(max_tokens=1, temperature=0.0))]
    return greedy, forced


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


# (free-running share, next-token share) each method must reach; see the test's docstring
AGREEMENT_FLOORS = {"int8": (0.4, 0.85), "int4": (0.4, 0.85), "auto": (0.4, 0.85), "w8a8": (0.2, 0.85)}


@pytest.mark.slow
def test_builtin_model_quantized_greedy_tokens_mostly_agree_with_bf16(builtin_prompts):
    """Measured (8 prompts, 16 tokens; share of tokens before the first difference / share of
    next tokens equal after the same prefixes): int8 51-59% / 93-95%, int4 83% / 97%, auto
    77% / 99%, w8a8 21% / 84% (smoothed, on the AMD EPYC: 34% / 90%; int8 71% / 96%, int4
    75% / 100%, auto 100% / 100% there). One different token changes the rest of a greedy answer, so the
    free-running share moves a lot with any rounding (bf16 against float32 itself: ~73%); the
    next-token share is stable. w8a8 rounds every projection's input to 8 bits as well, which
    this 135M-parameter model feels: it is opt-in, for throughput."""
    ref, ref_forced = greedy_and_forced(None, builtin_prompts, None)
    for method, (free_floor, teacher_floor) in AGREEMENT_FLOORS.items():
        greedy, forced = greedy_and_forced(method, builtin_prompts, ref)
        free = sum(matching_prefix(a, b) for a, b in zip(greedy, ref)) / (16 * len(ref))
        teacher = sum(a == b for a, b in zip(forced, ref_forced)) / len(forced)
        assert free >= free_floor, f"{method}: only {free:.0%} of the greedy tokens agree with bf16"
        assert teacher >= teacher_floor, f"{method}: next-token agreement {teacher:.0%}"
