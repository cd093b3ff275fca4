"""The native LoRA kernel (kernels/lora.cpp) against the torch fallback and a per-row reference."""
import pytest
import torch

from leanserve.engine.lora import Stack, StepLoRA
from leanserve.kernels import native

kernel = native("lora")
needs_kernel = pytest.mark.skipif(kernel is None, reason="native kernels cannot be built here")

ROW_SLOTS = [
    [0, 1, 2, 3],  # decodes, each on its own slot
    [3, -1, 0, 3, 3, -1, 1],  # base rows between, a slot several times
    [0, 7, 7],
    [-1, 2, 2, 2, 2, 2, 5, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2],  # long runs: several tiles of one slot
    [-1, -1],
    [6],
]


def make_stack(dtype, d_in=40, outs=(48, 16, 16), rank=4, ranks=(4, 2, 3, 4, 1, 0, 4, 2), seed=0):
    """Random factors of 8 slots, zero beyond each slot's rank, as _install leaves them. d_in 40
    and an output of 16 exercise the kernel's partial vectors."""
    gen = torch.Generator().manual_seed(seed)
    slots, parts = len(ranks), len(outs)
    a = torch.randn(slots, parts, rank, d_in, generator=gen)
    bts = [torch.randn(slots, rank, o, generator=gen) for o in outs]
    for s, r in enumerate(ranks):
        a[s, :, r:] = 0
        for bt in bts:
            bt[s, r:] = 0
    return Stack(a.to(dtype), [bt.to(dtype) for bt in bts], list(ranks), torch.tensor(ranks, dtype=torch.int32))


def reference(stack, x, y, row_slots):
    """Each row's delta computed alone in float64."""
    out = y.double().clone()
    for i, s in enumerate(row_slots):
        if s >= 0:
            xi = x[i].double()
            out[i] += torch.cat([(xi @ stack.a[s, p].double().t()) @ bt[s].double() for p, bt in enumerate(stack.bts)])
    return out


@needs_kernel
@pytest.mark.parametrize("row_slots", ROW_SLOTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_torch_fallback_and_reference(row_slots, dtype):
    stack = make_stack(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(row_slots), stack.a.shape[-1], generator=gen).to(dtype)
    y = torch.randn(len(row_slots), sum(bt.shape[-1] for bt in stack.bts), generator=gen).to(dtype)
    got = StepLoRA(row_slots, kernel).apply(stack, x, y.clone())
    fallback = StepLoRA(row_slots).apply(stack, x, y.clone())
    expected = reference(stack, x, y, row_slots)
    # bfloat16: the low-rank activations are rounded to bfloat16 (as torch's and peft's
    # bfloat16 matmuls do) and y once; errors scale with the largest delta
    scale = (expected - y.double()).abs().max().item()
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2 * scale}
    torch.testing.assert_close(got.double(), expected, **tol)
    torch.testing.assert_close(got.double(), fallback.double(), **tol)
    base_rows = [i for i, s in enumerate(row_slots) if s < 0 or stack.ranks[s] == 0]
    assert torch.equal(got[base_rows], y[base_rows])  # rows without an adapter are not touched


@needs_kernel
def test_kernel_on_model_shapes_and_mismatched_output_dtype():
    """SmolLM2's qkv shapes (576 in, 576/192/192 out), rank 8 in a rank-16 stack; a float32
    output (as a quantized projection may give) with bfloat16 factors goes through a copy."""
    stack = make_stack(torch.bfloat16, d_in=576, outs=(576, 192, 192), rank=16, ranks=(8,) * 8)
    row_slots = [5, 0, 1, -1, 2, 3, 4, 5, 6, 7, 7]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(row_slots), 576, generator=gen).to(torch.bfloat16)
    y = torch.randn(len(row_slots), 960, generator=gen)
    got = StepLoRA(row_slots, kernel).apply(stack, x, y.clone())
    assert got.dtype == torch.float32
    expected = reference(stack, x, y, row_slots)
    scale = (expected - y.double()).abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=1e-2 * scale)


# each slot's rank per part (0: the adapter does not touch that part), as peft's rank_pattern
# may give; the slot's rank is the largest. Slot 5 has none: its rows must be skipped.
PART_RANKS = [(4, 4, 4), (2, 2, 2), (3, 0, 1), (4, 2, 4), (1, 1, 1), (0, 0, 0), (4, 4, 4), (2, 1, 2)]


def make_int8_stack(d_in=40, outs=(100, 16, 37), rank=4, part_ranks=PART_RANKS, lora_scale=2.0, seed=0):
    """(int8 stack packed by kernel.pack, the float32 factors it was packed from). d_in 40 and
    outputs 100 / 16 / 37 leave partial vectors in both products; rows have different ranges."""
    gen = torch.Generator().manual_seed(seed)
    slots, parts = len(part_ranks), len(outs)
    a = torch.zeros(slots, parts, rank, d_in)
    bts = [torch.zeros(slots, rank, o) for o in outs]
    a8 = torch.zeros(slots, parts, rank, d_in, dtype=torch.int8)
    bts8 = [torch.zeros(slots, rank, o, dtype=torch.int8) for o in outs]
    a_scale, bt_scales = torch.zeros(slots, parts, rank), [torch.zeros(slots, rank) for _ in outs]
    for s, prs in enumerate(part_ranks):
        args = [[] for _ in range(8)]
        for p, r in enumerate(prs):
            if r:
                a[s, p, :r] = torch.randn(r, d_in, generator=gen) * torch.rand(r, 1, generator=gen) * 3
                bts[p][s, :r] = torch.randn(r, outs[p], generator=gen) * torch.rand(r, 1, generator=gen)
                for lst, v in zip(args, (a8, p, a[s, p, :r].contiguous(), bts8[p],
                                         (bts[p][s, :r] / lora_scale).t().contiguous(), lora_scale, a_scale,
                                         bt_scales[p])):
                    lst.append(v)
        kernel.pack(s, *args)
    ranks = [max(prs) for prs in part_ranks]
    rank_t = torch.tensor(ranks, dtype=torch.int32)
    return (Stack(a8, bts8, list(ranks), rank_t, a_scale, bt_scales), Stack(a, bts, list(ranks), rank_t.clone()))


@needs_kernel
def test_pack_quantizes_each_row_to_int8():
    """Each row of A and of B^T (LoRA scale folded in) is its int8 values times one scale:
    within half a step of the float32 row, the largest value at +-127; rows beyond a part's
    rank stay zero."""
    q, f = make_int8_stack()
    deq = q.dequantized()
    for got, src, scale, int8 in [(deq.a, f.a, q.a_scale.unsqueeze(-1), q.a)] + [
            (d, b, s.unsqueeze(-1), b8) for d, b, s, b8 in zip(deq.bts, f.bts, q.bt_scales, q.bts)]:
        assert torch.all((got - src).abs() <= scale / 2 * (1 + 1e-5) + 1e-7)
        top = int8.abs().amax(-1)
        assert torch.equal(top == 127, src.abs().amax(-1) > 0)  # every non-zero row uses the full range
        assert torch.equal(scale.squeeze(-1) == 0, src.abs().amax(-1) == 0)


def int8_case(row_slots, seed=1, outs=(100, 16, 37), d_in=40):
    q, f = make_int8_stack(d_in=d_in, outs=outs)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(row_slots), d_in, generator=gen).to(torch.bfloat16)
    y = torch.randn(len(row_slots), sum(outs), generator=gen).to(torch.bfloat16)
    return q, f, x, y


@needs_kernel
@pytest.mark.parametrize("row_slots", ROW_SLOTS)
def test_int8_kernel_equals_dequantized_reference(row_slots):
    """int8 factors under bfloat16 x and y: the float64 product of the dequantized factors,
    up to y's one bfloat16 rounding (x and the low-rank activations pass through int16 with
    errors ~1e-5 of their largest value). Tiles of 1 to 4 rows, rank-0 slot 5 skipped."""
    q, _, x, y = int8_case(row_slots)
    got = StepLoRA(row_slots, kernel).apply(q, x, y.clone())
    expected = reference(q.dequantized(), x, y, row_slots)
    scale = (expected - y.double()).abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=2 ** -8, atol=2e-4 * scale)
    base_rows = [i for i, s in enumerate(row_slots) if s < 0 or q.ranks[s] == 0]
    assert torch.equal(got[base_rows], y[base_rows])  # rows without an adapter are not touched


@needs_kernel
@pytest.mark.parametrize("row_slots", ROW_SLOTS[:4])
def test_int8_kernel_close_to_float32_factors(row_slots):
    """Against the float32 factors the int8 ones were packed from: within int8's error (~1%
    of the deltas), which is clearly there but small."""
    q, f, x, y = int8_case(row_slots)
    got = StepLoRA(row_slots, kernel).apply(q, x, y.clone()).double()
    expected = reference(f, x, y, row_slots)
    delta = expected - y.double()
    scale = delta.abs().max().item()
    err = (got - expected).abs().max().item()
    assert err < 3e-2 * scale, (err, scale)
    assert err > 1e-4 * scale  # not the float32 factors by accident


@needs_kernel
def test_int8_kernel_on_model_shapes_and_float32_output():
    """SmolLM2's gate_up and down shapes (576 -> 1536 x 2, 1536 -> 576), rank 8 in a rank-16
    stack, a float32 y (through a bfloat16 copy)."""
    for d_in, outs in ((576, (1536, 1536)), (1536, (576,))):
        q, _ = make_int8_stack(d_in=d_in, outs=outs, rank=16, part_ranks=[(8,) * len(outs)] * 8)
        row_slots = [5, 0, 1, -1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7]
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(len(row_slots), d_in, generator=gen).to(torch.bfloat16)
        y = torch.randn(len(row_slots), sum(outs), generator=gen)
        got = StepLoRA(row_slots, kernel).apply(q, x, y.clone())
        assert got.dtype == torch.float32
        expected = reference(q.dequantized(), x, y, row_slots)
        scale = (expected - y.double()).abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=2 ** -8, atol=2e-4 * scale)


@needs_kernel
def test_int8_kernel_refuses_missing_scales_and_float32_x():
    q, _, x, y = int8_case([0, 1])
    rows, tiles = torch.tensor([0, 1]), torch.tensor([[0, 1, 0], [1, 2, 1]])
    with pytest.raises(RuntimeError, match="a_scale"):
        kernel.apply(x, y, q.a, q.bts, q.rank_t, rows, tiles)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernel.apply(x.float(), y.float(), q.a, q.bts, q.rank_t, rows, tiles, q.a_scale, q.bt_scales)
    with pytest.raises(RuntimeError, match="b\\^t scale"):
        kernel.apply(x, y, q.a, q.bts, q.rank_t, rows, tiles, q.a_scale, q.bt_scales[:1])


@needs_kernel
def test_kernel_refuses_bad_tiles():
    stack = make_stack(torch.float32)
    x, y = torch.randn(2, 40), torch.zeros(2, 80)
    with pytest.raises(RuntimeError, match="bad tile"):
        kernel.apply(x, y, stack.a, stack.bts, stack.rank_t, torch.tensor([0, 1]), torch.tensor([[0, 2, 99]]))
    with pytest.raises(RuntimeError, match="row out of range"):
        kernel.apply(x, y, stack.a, stack.bts, stack.rank_t, torch.tensor([0, 5]), torch.tensor([[0, 2, 1]]))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_native_step_entry_equals_apply(dtype):
    """The C entry a fused decode plan calls (leanserve_lora_step_apply, by address) adds the
    same deltas as the per-projection call; an index with no stack is a no-op."""
    import ctypes

    from leanserve.engine.lora import MODULE_INDEX

    def stack(seed):
        return make_int8_stack(outs=(48, 16, 16), seed=seed)[0] if dtype == torch.int8 else make_stack(dtype, seed=seed)

    stacks = {(layer, m): stack(layer * 4 + MODULE_INDEX[m]) for layer in range(2) for m in ("qkv", "o")}
    slots = kernel.Slots()
    for (layer, m), st in stacks.items():
        slots.add(layer * 4 + MODULE_INDEX[m], st.a, st.bts, st.rank_t, *st.scale_args())
    dtype = stacks[0, "qkv"].act_dtype
    row_slots = [3, -1, 0, 3, 3, 7, 1, 1]
    step = StepLoRA(row_slots, kernel, slots)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)(
        kernel.step_apply_address())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(len(row_slots), 40, generator=gen).to(dtype)
    for (layer, m), st in stacks.items():
        y = torch.randn(len(row_slots), 80, generator=gen).to(dtype)
        expected = step.apply(st, x, y.clone())
        via_c = y.clone()
        fn(step.native_step.address(), layer * 4 + MODULE_INDEX[m], x.data_ptr(), via_c.data_ptr())
        assert torch.equal(via_c, expected)
        via_py = y.clone()
        step.native_step.apply(layer * 4 + MODULE_INDEX[m], x, via_py)
        assert torch.equal(via_py, expected)
    untouched = y.clone()
    fn(step.native_step.address(), 2, x.data_ptr(), untouched.data_ptr())  # layer 0's gate_up: no stack
    assert torch.equal(untouched, y)
