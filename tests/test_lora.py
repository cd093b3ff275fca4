"""LoRA adapters in the engine against peft, on the tiny random models, in float32.

Adapters are made by peft with random non-zero A and B (`init_lora_weights=False`; peft's
default B = 0 would be a no-op), with different ranks, targets, rsLoRA and per-module rank
and alpha patterns. Greedy tokens must equal transformers + peft's, alone and when four
adapters and the base model share every batch.
"""
from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from test_engine_vs_transformers import NUM_NEW, PROMPTS, assert_tokens_equal, hf_greedy, load_hf

from leanserve import LLM, SamplingParams
from leanserve.engine.kv_cache import BlockManager, root_hash
from leanserve.engine.sequence import Sequence
from leanserve.errors import InvalidRequest, ModelLoadError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig arguments
ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=16, target_modules=ALL),
    "mlp_rs": dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "ko_patterns": dict(r=16, lora_alpha=32, target_modules=["k_proj", "o_proj"],
                        rank_pattern={"o_proj": 4}, alpha_pattern={"o_proj": 2}),
}
PARAMS = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


def make_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs):
    """Saves a random peft LoRA adapter of `base_dir` to `out`; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    model = load_hf(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs)).eval()
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, tuple[Path, list[list[int]]]]:
    """name -> (folder, peft's greedy tokens for each of PROMPTS)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        peft_model = make_adapter(tiny_llama, root / name, seed, **kwargs)
        out[name] = (root / name, [hf_greedy(peft_model, p, NUM_NEW).tokens for p in PROMPTS])
    return out


@pytest.fixture(scope="module")
def base_tokens(tiny_llama) -> list[list[int]]:
    hf = load_hf(tiny_llama)
    return [hf_greedy(hf, p, NUM_NEW).tokens for p in PROMPTS]


def engine(model: Path, adapters: dict, **kw) -> LLM:
    lora = {"adapters": {name: str(path) for name, (path, _) in adapters.items()}, **kw.pop("lora", {})}
    return LLM(str(model), dtype="float32", num_kv_blocks=kw.pop("num_kv_blocks", 128), block_size=kw.pop("block_size", 16),
               lora=lora, **kw)


def test_each_adapter_alone_equals_peft(tiny_llama, adapters, base_tokens):
    llm = engine(tiny_llama, adapters)
    for name, (_, expected) in adapters.items():
        outs = llm.generate(PROMPTS, PARAMS, adapter=name)
        for prompt, out, ref, base in zip(PROMPTS, outs, expected, base_tokens):
            assert_tokens_equal(out.token_ids, ref, f"adapter {name}, {len(prompt)}-token prompt")
        assert any(r != b for r, b in zip(expected, base_tokens)), f"premise: {name} changes the output"
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == base_tokens


@pytest.mark.parametrize("variant", [
    dict(),
    dict(max_num_batched_tokens=8),  # prefills in chunks next to decodes of other adapters
    dict(num_kv_blocks=24, block_size=4),  # preemption: recomputed with the same adapter
])
def test_four_adapters_and_base_mixed_in_one_batch(tiny_llama, adapters, base_tokens, variant):
    variant = dict(variant)
    llm = engine(tiny_llama, adapters, num_kv_blocks=variant.pop("num_kv_blocks", 128), **variant)
    names = [None, *adapters]
    prompts = [p for p in PROMPTS for _ in names]
    which = [n for _ in PROMPTS for n in names]
    outs = llm.generate(prompts, PARAMS, adapter=which)
    for i, (out, name) in enumerate(zip(outs, which)):
        expected = base_tokens if name is None else adapters[name][1]
        assert_tokens_equal(out.token_ids, expected[i // len(names)], f"{name} in a mixed batch")
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    assert all(a.pins == 0 for a in llm.engine.lora.adapters.values())


def test_lru_eviction_with_two_slots_and_three_adapters(tiny_llama, adapters):
    three = dict(list(adapters.items())[:3])
    llm = engine(tiny_llama, three, lora={"max_loras": 2})
    names = list(three)
    outs = llm.generate(PROMPTS[:3] * 3, PARAMS, adapter=[n for n in names for _ in range(3)])
    for i, out in enumerate(outs):
        name = names[i // 3]
        assert_tokens_equal(out.token_ids, three[name][1][i % 3], f"{name} with 2 slots")
    lora = llm.engine.lora
    assert lora.num_resident == 2
    # a fourth round reloads the evicted adapter from disk (in the loader thread)
    loads = lora.num_loads
    for name in names:
        out = llm.generate(PROMPTS[0], PARAMS, adapter=name)[0]
        assert_tokens_equal(out.token_ids, three[name][1][0], f"{name} again")
    assert lora.num_loads > loads


def test_unload_frees_the_slots_and_the_next_use_reads_the_adapter_again(tiny_llama, adapters):
    """Scale to zero frees the LoRA slots with the weights: the stacks go (nothing else holds
    them), the adapters stay registered, and their next use reads their files again and
    answers as before."""
    two = dict(list(adapters.items())[:2])
    first, second = two
    llm = engine(tiny_llama, two)
    out = llm.generate(PROMPTS[0], PARAMS, adapter=first)[0]
    assert_tokens_equal(out.token_ids, two[first][1][0], f"{first} before the unload")
    lora = llm.engine.lora
    assert lora.num_resident == 1 and lora.stacks
    stack = weakref.ref(next(iter(lora.stacks.values())).a)
    loads = lora.num_loads
    llm.engine.unload()
    gc.collect()
    assert not llm.engine.loaded and lora.num_resident == 0 and not lora.stacks
    assert stack() is None, "a LoRA stack outlived the unload"
    assert all(a.weights is None for a in lora.adapters.values())  # the host copies went too
    for name in (first, second):
        again = llm.generate(PROMPTS[0], PARAMS, adapter=name)[0]
        assert_tokens_equal(again.token_ids, two[name][1][0], f"{name} after the unload")
    assert llm.engine.loaded and lora.num_resident == 2
    assert lora.num_loads == loads + 2  # each read from its file again


def test_runtime_register_and_delete_with_requests_in_flight(tiny_llama, adapters):
    llm = engine(tiny_llama, {}, lora={"dirs": (str(adapters["qv"][0].parent),)})
    lora = llm.engine.lora
    assert set(lora.adapters) == set(adapters)  # the directory scan registered every subfolder
    lora.unregister("qv")
    with pytest.raises(InvalidRequest, match="unknown adapter"):
        llm.generate(PROMPTS[0], PARAMS, adapter="qv")
    lora.register("qv2", str(adapters["qv"][0]))
    e = llm.engine
    seq = e.add_request("r1", PROMPTS[1], PARAMS, adapter="qv2")
    tokens = []
    for _ in range(4):
        tokens += [t for out in e.step() for t in out.token_ids]
    lora.unregister("qv2")  # in flight: it finishes on the adapter it started with
    while e.has_unfinished():
        tokens += [t for out in e.step() for t in out.token_ids]
    assert_tokens_equal(tokens, adapters["qv"][1][1], "deleted while running")
    assert seq.adapter.slot is None and lora.num_resident == 0  # its slot was freed when it finished


def test_prefix_cache_is_per_adapter(tiny_llama, adapters, base_tokens):
    llm = engine(tiny_llama, adapters)
    kv = llm.engine.kv
    prompt = PROMPTS[2]  # 40 tokens: two full blocks
    llm.generate(prompt, PARAMS, adapter="all")
    hits = kv.hit_tokens
    out = llm.generate(prompt, PARAMS)[0]  # the base model must not reuse the adapter's KV
    assert kv.hit_tokens == hits
    assert_tokens_equal(out.token_ids, base_tokens[2], "base after adapter")
    out = llm.generate(prompt, PARAMS, adapter="qv")[0]
    assert kv.hit_tokens == hits
    assert_tokens_equal(out.token_ids, adapters["qv"][1][2], "another adapter")
    out = llm.generate(prompt, PARAMS, adapter="all")[0]  # the same adapter does
    assert kv.hit_tokens == hits + 32
    assert_tokens_equal(out.token_ids, adapters["all"][1][2], "same adapter from the cache")


def test_block_hash_chain_starts_from_the_adapter():
    class A:  # an Adapter is only read for its id here
        def __init__(self, i):
            self.id = i

    params = SamplingParams()
    seqs = [Sequence(i, str(i), list(range(40)), params, 4, adapter=a) for i, a in enumerate([None, A(1), A(2)])]
    assert len({root_hash(s) for s in seqs}) == 3
    kv = BlockManager(16, 16)
    for s in seqs:
        kv.allocate(s, len(s))
        s.num_computed = len(s)
        kv.register_full_blocks(s)
    assert len({tuple(s.block_hashes) for s in seqs}) == 3


def test_mixtral_attention_adapter_equals_peft_and_expert_adapter_is_refused(tiny_models, tmp_path):
    path = tiny_models["mixtral"]
    peft_model = make_adapter(path, tmp_path / "attn", 0, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    expected = [hf_greedy(peft_model, p, NUM_NEW).tokens for p in PROMPTS[:2]]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, lora={"adapters": {"attn": str(tmp_path / "attn")}})
    for out, ref in zip(llm.generate(PROMPTS[:2], PARAMS, adapter="attn"), expected):
        assert_tokens_equal(out.token_ids, ref, "mixtral attention adapter")
    bad = tmp_path / "experts"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_tensors(bad, {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(2, 128),
                       "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.randn(64, 2)})
    with pytest.raises(ModelLoadError, match="Mixtral"):
        llm.engine.lora.register("experts", str(bad), check_path=False)


# -- bad adapters -------------------------------------------------------------------------------

def save_tensors(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"))


def copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def llm_for_errors(tiny_llama, adapters):
    return engine(tiny_llama, {}, lora={"max_rank": 8, "dirs": (str(adapters["qv"][0].parent),)})


@pytest.mark.parametrize("case, match", [
    ("other_base_name", "made for base model"),
    ("wrong_shape", "another base model"),
    ("truncated", "cannot read"),
    ("garbage_config", "not valid JSON"),
    ("no_config", "no adapter_config.json"),
    ("no_weights", "neither"),
    ("rank_too_large", "exceeds --max-lora-rank 8"),
    ("rank_mismatch", "adapter_config.json says"),
    ("dora", "use_dora"),
    ("lm_head", "unsupported tensor"),
    ("missing_b", "must both be present"),
    ("not_lora", "only LoRA"),
])
def test_bad_adapters_are_refused_at_load(llm_for_errors, adapters, tmp_path, case, match):
    qv = adapters["qv"][0]
    path = tmp_path / case
    if case == "other_base_name":
        copy_adapter(qv, path, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    elif case == "wrong_shape":
        copy_adapter(qv, path)
        save_tensors(path, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
                            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4)})
    elif case == "truncated":
        copy_adapter(qv, path)
        f = path / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif case == "garbage_config":
        copy_adapter(qv, path)
        (path / "adapter_config.json").write_text("{not json")
    elif case == "no_config":
        copy_adapter(qv, path)
        (path / "adapter_config.json").unlink()
    elif case == "no_weights":
        copy_adapter(qv, path)
        (path / "adapter_model.safetensors").unlink()
    elif case == "rank_too_large":
        copy_adapter(adapters["ko_patterns"][0], path)  # rank 16
    elif case == "rank_mismatch":
        copy_adapter(qv, path, r=6)
    elif case == "dora":
        copy_adapter(qv, path, use_dora=True)
    elif case in ("lm_head", "missing_b"):
        copy_adapter(qv, path)
        name = "lm_head" if case == "lm_head" else "model.layers.0.self_attn.q_proj"
        t = {f"base_model.model.{name}.lora_A.weight": torch.randn(4, 64)}
        if case == "lm_head":
            t[f"base_model.model.{name}.lora_B.weight"] = torch.randn(49152, 4)
        save_tensors(path, t)
    elif case == "not_lora":
        copy_adapter(qv, path, peft_type="IA3")
    lora = llm_for_errors.engine.lora
    with pytest.raises(ModelLoadError, match=match):
        lora.register(case, str(path), check_path=False)
    assert case not in lora.adapters
    # the engine keeps serving
    out = llm_for_errors.generate(PROMPTS[0], PARAMS, adapter="qv")[0]
    assert_tokens_equal(out.token_ids, adapters["qv"][1][0], "after a refused adapter")


def test_paths_outside_the_allowed_dirs_and_bad_names_are_refused(llm_for_errors, adapters, tmp_path):
    lora = llm_for_errors.engine.lora
    outside = copy_adapter(adapters["qv"][0], tmp_path / "elsewhere")
    with pytest.raises(PermissionError):
        lora.register("x", str(outside))
    inside = adapters["qv"][0].parent
    with pytest.raises(PermissionError):  # .. cannot climb out of an allowed root
        lora.register("x", str(inside / ".." / outside.relative_to(tmp_path.parent.parent)))
    for name in ("", "a:b", "a/b"):
        with pytest.raises(InvalidRequest):
            lora.register(name, str(inside / "qv"))
    with pytest.raises(InvalidRequest, match="already registered"):
        lora.register("qv", str(inside / "qv"))



# -- the batched low-rank path ----------------------------------------------------------------------

@pytest.mark.parametrize("row_slots", [
    [0, 1, 2, 3],  # decodes on a window of slots
    [3, -1, 0, 3, 3, -1, 1],  # base rows between, a slot twice
    [0, 7, 7],  # scattered slots: their factors are gathered
    [-1, 2, 2, 2, 2, 2, 5, 1, 1, 1, 1],  # long runs: plain matmuls on a slice
    [-1, -1],
])
def test_step_lora_equals_per_row_reference(row_slots):
    from leanserve.engine.lora import Stack, StepLoRA

    torch.manual_seed(0)
    slots, parts, rank, d_in, outs = 8, 3, 4, 16, [16, 8, 8]
    ranks = [4, 2, 3, 4, 1, 4, 4, 2]
    a = torch.randn(slots, parts, rank, d_in)
    bts = [torch.randn(slots, rank, o) for o in outs]
    for s, r in enumerate(ranks):  # what _install leaves beyond an adapter's rank
        a[s, :, r:] = 0
        for bt in bts:
            bt[s, r:] = 0
    stack = Stack(a, bts, ranks, torch.tensor(ranks, dtype=torch.int32))
    x = torch.randn(len(row_slots), d_in)
    y = torch.randn(len(row_slots), sum(outs))
    expected = y.clone()
    for i, s in enumerate(row_slots):
        if s >= 0:
            expected[i] += torch.cat([(x[i] @ a[s, p].t()) @ bts[p][s] for p in range(parts)])
    got = StepLoRA(row_slots).apply(stack, x, y.clone())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_adapter_no_wrapping(tiny_llama, adapters):
    """A model that never ran an adapter is not wrapped; a base-only step sets no row map."""
    from leanserve.engine.lora import LoRALinear

    llm = engine(tiny_llama, adapters)
    llm.generate(PROMPTS, PARAMS)
    assert not any(isinstance(m, LoRALinear) for m in llm.engine.model.modules())
    llm.generate(PROMPTS, PARAMS, adapter="qv")
    assert any(isinstance(m, LoRALinear) for m in llm.engine.model.modules())
    llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2))
    assert llm.engine.lora.step is None


@pytest.mark.parametrize("quantization", ["int8", "w8a8"])
def test_adapter_over_quantized_weights_is_batch_independent(tiny_llama, adapters, quantization):
    """Quantized projections are wrapped the same way; int8 weights (and W8A8, whose int32
    sums are exact and scales per row) are batch-invariant, so each adapter alone equals the
    mixed batch exactly."""
    llm = engine(tiny_llama, adapters, quantization=quantization)
    names = [None, "all", "qv"]
    alone = {n: llm.generate(PROMPTS[1], PARAMS, adapter=n)[0].token_ids for n in names}
    assert alone["all"] != alone[None]
    mixed = llm.generate([PROMPTS[1]] * 3, PARAMS, adapter=names)
    assert [o.token_ids for o in mixed] == [alone[n] for n in names]


def test_adapter_over_a_smoothed_model_equals_peft(tiny_llama, adapters):
    """W8A8's smoothing (models/quant.py) divides the projections' inputs, and the value and
    up outputs, by per-channel factors; an adapter's A and B are scaled to match when it is
    installed. Smoothing alone (float32, no quantization) must leave every adapter's answer
    as peft's; installed without the scaling, the adapters' log-probabilities move."""
    from leanserve.models.quant import smooth_for_w8a8

    first = SamplingParams(temperature=0, max_tokens=1, logprobs=5)

    def first_logprobs(llm, name):
        return dict(llm.generate(PROMPTS[1], first, adapter=name)[0].logprobs[0].top)

    plain = engine(tiny_llama, adapters)
    before = {name: first_logprobs(plain, name) for name in adapters}
    llm = engine(tiny_llama, adapters, prefix_caching=False)
    lora = llm.engine.lora
    factors = smooth_for_w8a8(llm.engine.model, list(range(3, 100)))  # as the engine does, before any adapter runs
    unscaled = {name: first_logprobs(llm, name) for name in adapters}
    lora.smoothing = factors
    lora.release_slots()
    for name, (_, expected) in adapters.items():
        outs = llm.generate(PROMPTS, PARAMS, adapter=name)
        for prompt, out, ref in zip(PROMPTS, outs, expected):
            assert_tokens_equal(out.token_ids, ref, f"adapter {name} over the smoothed model")
        got = first_logprobs(llm, name)
        assert all(abs(got[t] - before[name][t]) < 1e-4 for t in set(got) & set(before[name])), name
    moved = max(abs(unscaled[n][t] - before[n][t]) for n in adapters for t in set(unscaled[n]) & set(before[n]))
    assert moved > 1e-2


def test_adapter_file_gone_before_its_reload_aborts_its_request(tiny_llama, adapters, tmp_path):
    folder = copy_adapter(adapters["qv"][0], tmp_path / "gone")
    llm = engine(tiny_llama, {}, lora={"dirs": (str(tmp_path),)})  # a scanned adapter is read at first use
    (folder / "adapter_model.safetensors").unlink()
    out = llm.generate(PROMPTS[0], PARAMS, adapter="gone")[0]
    assert out.finish_reason == "abort" and out.token_ids == []
    assert llm.generate(PROMPTS[0], PARAMS)[0].finish_reason == "length"


def test_bfloat16_model_adapter_close_to_float32(tiny_llama, adapters, monkeypatch):
    """Under a bfloat16 model the native kernel keeps int8 factors by default, bfloat16 ones
    on request (the torch fallback float32): each path's first-token distribution with an
    adapter stays within bfloat16 error of the float32 engine's (which equals peft's, above),
    and the adapter's effect is far larger than that error."""
    from leanserve import kernels
    from leanserve.engine import lora as lora_mod

    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)

    def first_logprobs(dtype, adapter, native=True, factor_dtype="auto"):
        monkeypatch.setattr(lora_mod, "NATIVE", native)
        llm = LLM(str(tiny_llama), dtype=dtype, num_kv_blocks=64,
                  lora={"adapters": {"all": str(adapters["all"][0])}, "factor_dtype": factor_dtype})
        lp = llm.generate(PROMPTS[0], params, adapter=adapter)[0].logprobs[0]
        factors = llm.engine.lora.factor_dtype
        return dict(lp.top), factors

    ref, factors = first_logprobs("float32", "all")
    assert factors == torch.float32  # float32 models keep float32 factors (equal to peft, above)
    base, _ = first_logprobs("float32", None)
    effect = max(abs(ref[t] - base.get(t, min(base.values()))) for t in ref)
    has_kernel = kernels.native("lora") is not None
    for native, choice, expected in ((True, "auto", torch.int8), (True, "int8", torch.int8),
                                     (True, "bfloat16", torch.bfloat16), (False, "auto", torch.float32)):
        got, factors = first_logprobs("bfloat16", "all", native, choice)
        assert factors == (expected if native and has_kernel else torch.float32)
        common = set(got) & set(ref)
        assert len(common) >= 3
        err = max(abs(got[t] - ref[t]) for t in common)
        assert err < 0.1 and err < effect / 3, (native, choice, err, effect)


def test_factor_dtype_choice(tiny_llama, adapters):
    """float32 factors on request under a bfloat16 model (the kernel then works on float32
    copies, and the fused plan gets no LoRA hook); an unknown choice is refused."""
    llm = LLM(str(tiny_llama), dtype="bfloat16", num_kv_blocks=64,
              lora={"adapters": {"qv": str(adapters["qv"][0])}, "factor_dtype": "float32"})
    assert llm.generate(PROMPTS[0], PARAMS, adapter="qv")[0].finish_reason == "length"
    assert llm.engine.lora.factor_dtype == torch.float32
    with pytest.raises(ValueError, match="factor dtype"):
        LLM(str(tiny_llama), dtype="bfloat16", num_kv_blocks=64, lora={"factor_dtype": "int4"})


def test_the_cli_passes_the_lora_options_to_the_engine_config(tmp_path):
    from leanserve import cli

    args = cli.build_parser().parse_args(["serve", "--lora", f"a={tmp_path}", "--max-loras", "3",
                                          "--max-lora-rank", "32", "--lora-factor-dtype", "bfloat16"])
    config = cli._engine_config(args).lora
    assert (config.adapters, config.max_loras, config.max_rank, config.factor_dtype) == \
        ({"a": str(tmp_path)}, 3, 32, "bfloat16")
    assert cli._engine_config(cli.build_parser().parse_args(["serve"])).lora.factor_dtype == "auto"
