"""The native decode-attention kernel and packed bf16 linears against plain torch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanserve.kernels import native
from leanserve.models import llama
from leanserve.models.quant import PackedLinear


def reference(q, kc, vc, tables, lens, window):
    """SDPA over the gathered blocks with an explicit mask: the textbook computation."""
    B, _, D = q.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    k = kc[tables].reshape(B, -1, hkv, D).transpose(1, 2).float()
    v = vc[tables].reshape(B, -1, hkv, D).transpose(1, 2).float()
    pos = torch.arange(tables.shape[1] * bs)
    mask = pos[None, :] < lens[:, None]
    if window:
        mask &= pos[None, :] >= lens[:, None] - window
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    return out.squeeze(2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("bs", [8, 16, 32])
def test_native_decode_attention_matches_sdpa(dtype, tol, heads, kv_heads, head_dim, window, bs):
    """bf16 with head_dim 64 or 128 over blocks of 16 or 32 tokens takes the AMX key pass where
    the CPU has it (both ways of holding the query tiles: 9/3/64 keeps them, 8/2/128 reloads
    them), else the VDPBF16PS one where the CPU has AVX512-BF16; blocks of 8 the float loop."""
    kernels = native()
    assert kernels is not None, "the native kernels must build on this machine (g++ and ninja)"
    gen = torch.Generator().manual_seed(heads * head_dim + window)
    B, nblocks, W = 6, 800 // bs, 80 // bs + 1
    kc = torch.randn(nblocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
    vc = torch.randn(nblocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(B, heads, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(nblocks, generator=gen)[:B * W].view(B, W)
    lens = torch.tensor([1, 16, 17, 40, 63, 80])
    out = kernels.paged_decode_attention(q, kc, vc, tables, lens, window, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), reference(q, kc, vc, tables, lens, window), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("bs", [8, 16, 32])
def test_native_decode_attention_over_an_int8_cache(dtype, tol, heads, kv_heads, head_dim, window, bs):
    """An int8 cache (one scale per token and kv head) gives the attention of its dequantized
    keys and values; and the native cache writer rounds as the torch quantizer does. A row
    holding inf or NaN keeps a NaN scale (attention over it is NaN, as with a bf16 cache).
    bf16 queries over blocks of 16 or 32 tokens take the VNNI kernel where the CPU has it,
    blocks of 8 the float one."""
    kernels = native()
    gen = torch.Generator().manual_seed(heads + window)
    B, nblocks = 6, 800 // bs
    k = torch.randn(nblocks * bs, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(nblocks * bs, kv_heads, head_dim, generator=gen).to(dtype)
    cache = llama.KVPool(llama.ModelArgs("LlamaForCausalLM", 8, 8, 1, heads, kv_heads, head_dim, 8), nblocks, bs,
                         torch.int8).layer(0)
    slots = torch.randperm(nblocks * bs, generator=gen)
    cache.write(slots, k, v)  # the native writer
    qk, sk = llama.quantize_kv(k)
    assert torch.equal(cache.k.view(-1, kv_heads, head_dim)[slots], qk)  # bit-equal with the torch quantizer
    assert torch.equal(cache.k_scale.view(-1, kv_heads)[slots], sk)
    q = torch.randn(B, heads, head_dim, generator=gen).to(dtype)
    W = 80 // bs + 1
    tables = torch.randperm(nblocks, generator=gen)[:B * W].view(B, W)
    lens = torch.tensor([1, 16, 17, 40, 63, 80])
    out = kernels.paged_decode_attention(q, cache.k, cache.v, tables, lens, window, head_dim ** -0.5,
                                         cache.k_scale, cache.v_scale)
    kd = (cache.k.float() * cache.k_scale[..., None]).to(dtype)
    vd = (cache.v.float() * cache.v_scale[..., None]).to(dtype)
    torch.testing.assert_close(out.float(), reference(q, kd, vd, tables, lens, window), atol=tol, rtol=tol)
    with pytest.raises(RuntimeError, match="scales"):
        kernels.paged_decode_attention(q, cache.k, cache.v, tables, lens, window, 0.125)
    bad = k[:2].clone()
    bad[0, 0, 1] = float("inf")
    bad[1, -1, 0] = float("nan")
    cache.write(slots[:2], bad, bad)
    qb, sb = llama.quantize_kv(bad)
    assert torch.isnan(cache.k_scale.view(-1, kv_heads)[slots[:2]]).tolist() == torch.isnan(sb).tolist()
    assert torch.isnan(sb[0, 0]) and torch.isnan(sb[1, -1]) and not torch.isnan(sb[0, 1])
    assert torch.equal(cache.k.view(-1, kv_heads, head_dim)[slots[:2]], qb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_attention_reads_the_query_columns_of_a_fused_row(dtype):
    """q as the model passes it: a view of the qkv output, rows wider than the query heads."""
    kernels = native()
    gen = torch.Generator().manual_seed(3)
    kc = torch.randn(30, 16, 3, 64, generator=gen).to(dtype)
    vc = torch.randn(30, 16, 3, 64, generator=gen).to(dtype)
    qkv = torch.randn(5, (9 + 2 * 3) * 64, generator=gen).to(dtype)
    q = qkv[:, :9 * 64].view(5, 9, 64)
    assert not q.is_contiguous()
    tables = torch.arange(30).view(5, 6)
    lens = torch.tensor([3, 90, 17, 64, 33])
    out = kernels.paged_decode_attention(q, kc, vc, tables, lens, 0, 0.125)
    assert torch.equal(out, kernels.paged_decode_attention(q.contiguous(), kc, vc, tables, lens, 0, 0.125))
    torch.testing.assert_close(out.float(), reference(q, kc, vc, tables, lens, 0), atol=2e-2, rtol=2e-2)


def test_native_decode_row_does_not_depend_on_its_batch():
    kernels = native()
    gen = torch.Generator().manual_seed(0)
    kc = torch.randn(40, 16, 3, 64, generator=gen).to(torch.bfloat16)
    vc = torch.randn(40, 16, 3, 64, generator=gen).to(torch.bfloat16)
    q = torch.randn(8, 9, 64, generator=gen).to(torch.bfloat16)
    tables = torch.arange(40).view(8, 5)
    lens = torch.tensor([5, 80, 33, 17, 64, 2, 49, 71])
    batched = kernels.paged_decode_attention(q, kc, vc, tables, lens, 0, 0.125)
    for i in range(8):
        alone = kernels.paged_decode_attention(q[i:i + 1], kc, vc, tables[i:i + 1], lens[i:i + 1], 0, 0.125)
        assert torch.equal(alone, batched[i:i + 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_native_rms_norm_matches_its_torch_definition(dtype, with_residual):
    """residual += x (rounded to the dtype), then as transformers: normalise in float32, round,
    scale by the weight. 576 columns (the bf16 vector path) and 40 (the scalar loop)."""
    kernels = native()
    gen = torch.Generator().manual_seed(5)
    for n in (576, 40):
        x = torch.randn(37, n, generator=gen).to(dtype)
        res = torch.randn(37, n, generator=gen).to(dtype) if with_residual else None
        w = torch.randn(n, generator=gen).to(dtype)
        h = (res.float() + x.float()).to(dtype) if with_residual else x
        ref = (w.float() * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).float())
        out = kernels.rms_norm(x, None if res is None else res, w, 1e-5)
        if with_residual:
            assert torch.equal(res, h)  # the residual stream, updated in place
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


_AVX512_DECODE = """
import sys, torch
from leanserve.kernels import native
q, kc, vc, tables, lens = torch.load(sys.argv[1])
torch.save(native().paged_decode_attention(q, kc, vc, tables, lens, 0, 0.125), sys.argv[2])
"""


@pytest.mark.parametrize("env", [{"LEANSERVE_AMX_DECODE": "0"},
                                 {"LEANSERVE_AMX_DECODE": "0", "LEANSERVE_BF16_DECODE": "float"}])
def test_amx_and_avx512_decode_attention_agree(tmp_path, env):
    """The key passes of CPUs without AMX (LEANSERVE_AMX_DECODE=0: VDPBF16PS where the CPU has
    AVX512-BF16; with LEANSERVE_BF16_DECODE=float, the float loop): read once per process, so
    in a child. Each agrees with this machine's own path and with SDPA."""
    kernels = native()
    gen = torch.Generator().manual_seed(3)
    kc = torch.randn(40, 16, 3, 64, generator=gen).to(torch.bfloat16)
    vc = torch.randn(40, 16, 3, 64, generator=gen).to(torch.bfloat16)
    q = torch.randn(8, 9, 64, generator=gen).to(torch.bfloat16)
    tables, lens = torch.randperm(40, generator=gen).view(8, 5), torch.tensor([5, 80, 33, 17, 64, 2, 49, 71])
    torch.save((q, kc, vc, tables, lens), tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _AVX512_DECODE, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=dict(os.environ, **env), check=True, timeout=600)
    avx512 = torch.load(tmp_path / "out.pt")
    here = kernels.paged_decode_attention(q, kc, vc, tables, lens, 0, 0.125)
    torch.testing.assert_close(here.float(), avx512.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(avx512.float(), reference(q, kc, vc, tables, lens, 0), atol=2e-2, rtol=2e-2)


def test_native_decode_attention_over_a_bf16_cache_long_and_sharp():
    """bf16 caches over long sequences with sharp attention and windows that start mid-block
    (the VDPBF16PS kernel sums whole 16-token chunks and keeps only the window's scores), row
    by row as in a batch."""
    kernels = native()
    gen = torch.Generator().manual_seed(11)
    heads, kv_heads, D, bs = 9, 3, 64, 16
    lens = torch.tensor([3000, 17, 1, 700, 33])
    W = 3000 // bs + 1
    nblocks = len(lens) * W
    kc = torch.randn(nblocks, bs, kv_heads, D, generator=gen).bfloat16()
    vc = torch.randn(nblocks, bs, kv_heads, D, generator=gen).bfloat16()
    q = (4 * torch.randn(len(lens), heads, D, generator=gen)).bfloat16()  # sharp: a few keys dominate
    tables = torch.randperm(nblocks, generator=gen).view(len(lens), W)
    for window in (0, 1001, 21):
        out = kernels.paged_decode_attention(q, kc, vc, tables, lens, window, D ** -0.5)
        torch.testing.assert_close(out.float(), reference(q, kc, vc, tables, lens, window), atol=2e-2, rtol=2e-2)
        for b in range(len(lens)):  # each row alone: the same bits
            alone = kernels.paged_decode_attention(q[b:b + 1], kc, vc, tables[b:b + 1], lens[b:b + 1], window, D ** -0.5)
            assert torch.equal(alone[0], out[b])


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_model_gives_the_same_logits_with_and_without_the_native_kernel(monkeypatch, kv):
    """The whole paged_attention op (cache writes, decodes, prefill chunks) both ways; with an
    int8 pool, the torch quantizer and dequantizing gathers against the native kernels."""
    from leanserve import LLM, SamplingParams

    prompts = [[5, 6, 7, 8, 9] * 7, [11, 12, 13] * 5, [20, 21] * 20]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    runs = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(llama, "native", lambda: None)
        llm = LLM(dtype="float32", num_kv_blocks=64, max_num_batched_tokens=32, kv_cache_dtype=kv)
        outs = llm.generate(prompts, params)
        runs.append([(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs])
    # int8: a difference in the last float bit can move a later key across a rounding
    # boundary of the quantizer, one int8 step, so the logprobs agree less tightly
    tol = 1e-3 if kv == "auto" else 2e-2
    for (tok_a, lp_a), (tok_b, lp_b) in zip(*runs):
        assert tok_a == tok_b
        assert max(abs(a - b) for a, b in zip(lp_a, lp_b)) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rows,vocab", [(1, 49152), (5, 1000), (33, 4099), (2, 7), (4, 4096), (4, 4100)])
def test_native_first_argmax_is_torch_argmax(dtype, rows, vocab):
    kernels = native()
    assert kernels is not None, "the native kernels must build on this machine (g++ and ninja)"
    torch.manual_seed(rows)
    x = torch.randn(rows, vocab).to(dtype)
    x[0, vocab // 2] = x[0, vocab // 3] = x[0].max() + 1  # a tie: the first index wins
    if rows > 2:
        x[1, 3] = float("nan")  # as torch: the first NaN
        x[2] = -float("inf")
    if rows > 3:
        x[3, -1] = float("nan")  # in the tail past the last whole vector of 16
    assert torch.equal(kernels.first_argmax(x), x.argmax(dim=-1))
    assert torch.equal(kernels.first_argmax(x[:, 1:]), x[:, 1:].argmax(dim=-1))  # rows apart, as a view


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_linear_matches_plain_linear(rows):
    if not PackedLinear.available(torch.bfloat16):
        pytest.skip("oneDNN bf16 is not available on this CPU")
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x).float(), linear(x).float(), atol=2e-2, rtol=2e-2)


# the AMX / AVX512-BF16 paths (the AVX2 one, which any x86 CPU of the last decade runs, is
# tested in tests/test_kernel_select.py)
needs_packed_bf16 = pytest.mark.skipif(native() is None or not {0, 1} & set(native().product_variants(False)),
                                       reason="this CPU (or OS) gives neither AMX-BF16 nor AVX512-BF16")


@needs_packed_bf16
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 16, 33, 64, 130])
@pytest.mark.parametrize("n_in,n_out", [(576, 960), (1536, 576), (96, 48), (64, 80), (64, 112)])
def test_packed_bf16_kernel_matches_onednn_and_float(rows, n_in, n_out, bias):
    """Our kernel (AMX tiles, else AVX512-BF16) against oneDNN's packed bf16 linear and a
    float32 product of the same bf16 numbers: both round float32 sums once, so they agree to
    a bf16 step; column counts that are not a whole pair of tiles or group of four blocks
    (48, 960 = 15 groups) and row counts that are not whole tiles (7, 33) take the edge paths."""
    torch.manual_seed(rows * n_out)
    linear = nn.Linear(n_in, n_out, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, n_in, dtype=torch.bfloat16)
    tiles, onednn = PackedLinear(linear), PackedLinear(linear, own=False)
    assert tiles.own and not onednn.own
    with torch.inference_mode():
        got, ref = tiles(x), onednn(x)
        exact = x.float() @ linear.weight.float().t() + (linear.bias.float() if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n_out)
    # one rounding of (nearly) the same float32 sum: within a bf16 step of the exact value
    torch.testing.assert_close(got.float(), exact, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=8e-3)
    assert (got != ref).float().mean() < 0.01


@needs_packed_bf16
@pytest.mark.parametrize("n_out,threads", [(1536, 1), (1536, 2), (576, 2)])
def test_packed_bf16_kernel_is_batch_invariant(n_out, threads):
    """A row's output is the same bits whether it is alone in the call or among 300 others
    (oneDNN picks its kernel by the row count, so its rows may change with the batch; the
    AVX-512 path with two threads splits 301 rows into runs of 78, 78, 78 and 67, and 64 rows
    of a 576-column weight into runs of 36 and 28, since 9 column groups are an odd count)."""
    torch.manual_seed(0)
    linear = nn.Linear(576, n_out, bias=False).to(torch.bfloat16)
    tiles = PackedLinear(linear)
    x = torch.randn(301, 576, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            together = tiles(x)
            for i in (0, 17, 77, 78, 233, 234, 300):
                assert torch.equal(tiles(x[i:i + 1]), together[i:i + 1])
            assert torch.equal(tiles(x[3:140]), together[3:140])
            assert torch.equal(tiles(x[:64]), together[:64])
            assert torch.equal(tiles(x.view(1, 301, 576)), together.view(1, 301, n_out))  # leading dims kept
            exact = x.float() @ linear.weight.float().t()
            torch.testing.assert_close(together.float(), exact, atol=1e-2, rtol=8e-3)
    finally:
        torch.set_num_threads(previous)


_PACKED_BF16 = """
import sys, torch
from leanserve.kernels import native
x, packed = torch.load(sys.argv[1])
k = native()
torch.save((k.amx_bf16_available(), k.bf16_linear_packed(x, packed), k.bf16_linear_packed_argmax(x, packed)), sys.argv[2])
"""


@needs_packed_bf16
def test_amx_and_avx512_bf16_products_agree(tmp_path):
    """The same packed weight on both of our kernels: the AVX512-BF16 one in a child process
    with LEANSERVE_AMX=0 (read once per process), so on a machine with AMX the path that CPUs
    without it run is tested too. Both round float32 sums once: within a bf16 step, and the
    same greedy tokens."""
    torch.manual_seed(5)
    linear = nn.Linear(576, 16 * 37, bias=False).to(torch.bfloat16)
    packed = PackedLinear(linear)
    x = torch.randn(23, 576, dtype=torch.bfloat16)
    torch.save((x, packed.packed), tmp_path / "in.pt")
    env = dict(os.environ, LEANSERVE_AMX="0")
    subprocess.run([sys.executable, "-c", _PACKED_BF16, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=600)
    child_amx, avx512, avx512_argmax = torch.load(tmp_path / "out.pt")
    assert not child_amx
    with torch.inference_mode():
        here = packed(x)
    exact = x.float() @ linear.weight.float().t()
    torch.testing.assert_close(avx512.float(), exact, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(here.float(), avx512.float(), atol=1e-2, rtol=8e-3)
    assert torch.equal(avx512_argmax, avx512.float().argmax(dim=-1))


@needs_packed_bf16
@pytest.mark.parametrize("rows", [1, 5, 64, 70, 200])
@pytest.mark.parametrize("ties", [(3, 200, 301, 590), (450, 590)])
def test_lm_head_argmax_is_first_argmax_of_the_logits(rows, ties):
    """PackedLinear.argmax (greedy decoding's lm_head) == first_argmax of forward's bf16
    logits, ties included: the same maximum in several columns, on both threads' sides or
    both on the side of the thread that takes its column groups last to first, gives the
    first. 37 column blocks: the last pair is a single block."""
    from leanserve.engine.sampling import first_argmax

    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(576, 16 * 37, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16 * 37, 576, generator=gen) * 0.05)
        for j in ties:  # one strong column, repeated: each row's max sits in all of them
            linear.weight[j] = linear.weight[rows % 7] * 0 + torch.randn(576, generator=torch.Generator().manual_seed(9))
    tiles = PackedLinear(linear)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    x[: rows // 2] *= -1  # half the rows prefer other columns
    got = tiles.argmax(x)
    assert got.dtype == torch.long and got.shape == (rows,)
    assert torch.equal(got, first_argmax(tiles(x)))
    assert torch.equal(got, tiles(x).float().argmax(dim=-1))  # torch's argmax: the first maximum too
    assert (got == ties[0]).any() or rows == 1  # the ties happen, and the first of them wins


@needs_packed_bf16
def test_packed_bf16_kernel_rejects_what_it_cannot_take():
    linear = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    tiles = PackedLinear(linear)
    with pytest.raises(RuntimeError, match="columns"):
        native().bf16_linear_packed(torch.randn(2, 32, dtype=torch.bfloat16), tiles.packed)
    with pytest.raises(RuntimeError, match="bf16"):
        native().bf16_linear_packed(torch.randn(2, 64), tiles.packed)
    # shapes the tiles cannot cover whole fall back to oneDNN's layout
    assert not PackedLinear(nn.Linear(48, 32).to(torch.bfloat16)).own
    assert not PackedLinear(nn.Linear(64, 24).to(torch.bfloat16)).own


@needs_packed_bf16
@pytest.mark.parametrize("rows", [1, 37, 64])
def test_packed_gate_up_gives_its_output_and_its_swiglu_in_the_epilogue(rows):
    """A gate_up weight packed with gate and up blocks interleaved (PackedLinear(swiglu=True))
    returns the plain packing's output bit for bit, and the kernel's SwiGLU epilogue gives
    silu_mul of that output bit for bit, close to float32 silu(gate) * up."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 3072, bias=False).to(torch.bfloat16)
    plain, interleaved = PackedLinear(linear), PackedLinear(linear, swiglu=True)
    assert interleaved.swiglu and not plain.swiglu
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        gate_up = plain(x)
        assert torch.equal(interleaved(x), gate_up)
        act = native().bf16_linear_packed(x, interleaved.packed, None, 2)
        assert act.shape == (rows, 1536)
        assert torch.equal(act, native().silu_mul(gate_up))
        g, u = gate_up.float().chunk(2, dim=-1)
        torch.testing.assert_close(act.float(), F.silu(g) * u, atol=2e-2, rtol=1e-2)


@needs_packed_bf16
def test_swiglu_packing_is_only_for_what_it_can_take():
    assert not PackedLinear(nn.Linear(64, 256).to(torch.bfloat16), swiglu=True).swiglu  # a bias
    assert not PackedLinear(nn.Linear(64, 48, bias=False).to(torch.bfloat16), swiglu=True).swiglu  # 48 % 32
    tiles = PackedLinear(nn.Linear(64, 64, bias=False).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="swiglu"):
        native().bf16_linear_packed(torch.randn(2, 64, dtype=torch.bfloat16), tiles.packed, torch.zeros(64), 2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("dtype,quantization,kv", [("float32", None, "auto"), ("bfloat16", None, "auto"),
                                                   ("bfloat16", "int8", "auto"), ("bfloat16", "int4", "auto"),
                                                   ("bfloat16", "auto", "auto"), ("bfloat16", None, "int8"),
                                                   ("bfloat16", "w8a8", "int8")])
def test_fused_plan_matches_the_module_path(monkeypatch, tiny_models, arch, dtype, quantization, kv):
    """Steps run every layer in one native call (models/fused.py); the module path runs the
    same kernels one by one. Six sequences and a 24-token step budget, so steps mix decodes
    with prefill chunks that start fresh or continue over cached blocks, and `auto` takes
    both of its kernels (int8 up to 1 row beside the AMX tiles, 4 beside oneDNN; dense
    above). No prefix cache: the second run would start from the first run's cached blocks,
    another path."""
    from leanserve import LLM, SamplingParams

    assert native() is not None, "the native kernels must build on this machine (g++ and ninja)"
    prompts = [[5 + i, 6, 7, 8, 9] * (2 + i) for i in range(6)]
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0.0, ignore_eos=True, logprobs=3) for i in range(6)]
    llm = LLM(str(tiny_models[arch]), dtype=dtype, quantization=quantization, num_kv_blocks=64, prefix_caching=False,
              max_num_batched_tokens=24, kv_cache_dtype=kv)
    model = llm.engine.runner.model
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(llama.CausalLM, "fused", fused)
        outs = llm.generate(prompts, params)
        runs.append([(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs])
        if fused:  # Mixtral's experts, and W8A8 emulated in float32 (no VNNI), have no plan: the module path
            emulated = any(getattr(m, "emulated", False) for m in model.modules())
            assert (model._plan[1] is None) == (arch == "mixtral" or emulated)
    assert runs[0] == runs[1]  # bitwise: the same kernels on the same inputs


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_equal_fresh_prefill_chunks_share_one_attention_call_with_the_same_numbers(monkeypatch, use_native, dtype):
    """Adjacent prompts of one length, each starting fresh, are one SDPA batch
    (AttnBatch.prefill_chunks); each prompt's rows come out bit for bit as when it is the
    step's only chunk. A chunk of another length, or one over cached blocks, stays apart."""
    if not use_native:
        monkeypatch.setattr(llama, "native", lambda: None)
    torch.manual_seed(0)
    H, Hkv, D, bs, n = 9, 3, 64, 16, 24
    q, k, v = torch.randn(4 * n, H, D, dtype=dtype), torch.randn(4 * n, Hkv, D, dtype=dtype), torch.randn(4 * n, Hkv, D, dtype=dtype)
    # three fresh 24-token prompts, then a 10-token one, each from block 8 * i of the pool
    meta = [[0, n, 0], [n, n, 0], [2 * n, n, 0], [3 * n, 10, 0]]
    slots = torch.cat([torch.arange(10 if i == 3 else n) + 8 * bs * i for i in range(4)])
    rows = 3 * n + 10
    positions = torch.cat([torch.arange(n)] * 3 + [torch.arange(10)])
    none = torch.zeros(0, dtype=torch.long)

    def attend(sl, qq, kk, vv, pos, mt):
        cache = llama.LayerCache(torch.zeros(40, bs, Hkv, D, dtype=dtype), torch.zeros(40, bs, Hkv, D, dtype=dtype))
        batch = llama.AttnBatch(sl, none.view(0, 1), none, torch.tensor(mt), none)
        out = llama.paged_attention(qq, kk, vv, cache, pos, batch, 0)
        return out, batch.chunks[0]  # the chunks of window 0 (AttnBatch.prefill_chunks keeps them per window)

    together, chunks = attend(slots, q[:rows], k[:rows], v[:rows], positions, meta)
    assert [(c[0], c[1], c[4]) for c in chunks] == [(0, n, 3), (3 * n, 10, 1)]
    for i, (start, length, _) in enumerate(meta):
        alone, _ = attend(slots[start:start + length], q[start:start + length], k[start:start + length],
                          v[start:start + length], positions[start:start + length], [[0, length, 0]])
        assert torch.equal(alone, together[start:start + length])


def test_prompt_rows_attend_as_decodes_in_the_plan_and_the_module_path_alike(monkeypatch, tiny_models):
    """With the native kernels the runner gives every row of a step, a prompt's too, its
    sequence's block table and position: the step has no prefill chunks (no SDPA), and the
    plan and the module path give the same numbers."""
    from leanserve import LLM, SamplingParams

    prompts = [[5 + i, 6, 7, 8, 9, 10, 11, 12, 13, 14] * (1 + i) for i in range(4)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3)
    llm = LLM(str(tiny_models["llama"]), dtype="bfloat16", num_kv_blocks=64, prefix_caching=False)
    chunks = []
    chunks_of = llama.AttnBatch.prefill_chunks
    monkeypatch.setattr(llama.AttnBatch, "prefill_chunks", lambda self, *a: chunks.append(got := chunks_of(self, *a)) or got)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(llama.CausalLM, "fused", fused)
        outs = llm.generate(prompts, params)
        runs.append([(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs])
    assert chunks and all(c == [] for c in chunks)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_a_prompts_numbers_do_not_depend_on_its_chunks_or_its_cached_prefix(tiny_models, kv):
    """bf16: the same prompts prefilled whole, in 16-token chunks beside each other, and a
    second time over their cached prefixes give the same tokens and log-probabilities, bit
    for bit (each row attends as a decode of its position; every projection's row is
    computed alone)."""
    from leanserve import LLM, SamplingParams

    prompts = [[5 + i, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] * (2 + i) for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    runs = []
    for budget, cache in ((512, False), (16, False), (512, True)):
        llm = LLM(str(tiny_models["llama"]), dtype="bfloat16", num_kv_blocks=64, prefix_caching=cache,
                  max_num_batched_tokens=budget, kv_cache_dtype=kv)
        for _ in range(2 if cache else 1):  # with the cache: the second run starts from the first's blocks
            outs = llm.generate(prompts, params)
        runs.append([(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs])
        if cache:
            assert llm.engine.kv.hit_tokens > 0  # the second run did start from cached blocks
    assert runs[0] == runs[1] == runs[2]


def test_the_cli_passes_the_kv_cache_dtype_and_the_engine_checks_it():
    from leanserve import EngineConfig, cli
    from leanserve.engine.engine import LLMEngine

    parse = cli.build_parser().parse_args
    assert cli._engine_config(parse(["serve", "--kv-cache-dtype", "int8"])).kv_cache_dtype == "int8"
    assert cli._engine_config(parse(["serve"])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parse(["serve", "--kv-cache-dtype", "fp8"])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(EngineConfig(kv_cache_dtype="fp8"))


def test_an_int8_kv_pool_holds_almost_twice_the_tokens_per_gib():
    from leanserve.engine.kv_cache import GIB, num_blocks_for_budget

    bf16 = num_blocks_for_budget(1.0, 30, 3, 64, 16, torch.bfloat16)
    int8 = num_blocks_for_budget(1.0, 30, 3, 64, 16, torch.int8)
    assert int8 / bf16 == pytest.approx(128 / 68, rel=1e-3)  # 64 int8 + a float32 scale vs 64 bf16 per row
    blocks = num_blocks_for_budget(0.01, 30, 3, 64, 16, torch.int8)  # the pool really fits its budget
    pool = llama.KVPool(llama.ModelArgs("LlamaForCausalLM", 8, 8, 30, 9, 3, 64, 8), blocks, 16, torch.int8)
    used = sum(t.nbytes for ts in (pool.k, pool.v, pool.k_scale, pool.v_scale) for t in ts)
    block = 2 * 30 * 16 * 3 * (64 + 4)  # bytes of one block over all layers
    assert 0.01 * GIB - block < used <= 0.01 * GIB


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_gather_of_an_int8_cache_dequantizes_as_torch_does(monkeypatch, dtype):
    """Prefill chunks over an int8 pool read whole blocks back, dequantized: the native
    gather gives the torch path's numbers bit for bit (NaN scales stay NaN)."""
    assert native() is not None, "the native kernels must build on this machine (g++ and ninja)"
    torch.manual_seed(0)
    k, v = (torch.randint(-127, 128, (20, 16, 3, 64), dtype=torch.int8) for _ in range(2))
    ks, vs = torch.rand(20, 16, 3) * 0.05, torch.rand(20, 16, 3) * 0.05
    ks[3, 2, 1] = float("nan")
    cache = llama.LayerCache(k, v, ks, vs)
    blocks = torch.tensor([5, 3, 19, 0])
    fast = cache.gather(blocks, dtype)
    monkeypatch.setattr(llama, "native", lambda: None)
    slow = cache.gather(blocks, dtype)
    for a, b in zip(fast, slow):
        assert a.shape == (64, 3, 64) and a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert fast[0][16 + 2, 1].isnan().all()


def test_native_decode_attention_over_an_int8_cache_long_sharp_and_nan():
    """The int8 kernels over long sequences with sharp attention (the VNNI kernel keeps each
    weight as 16-bit fixed point of the largest), row by row as in a batch, and a NaN scale
    (a key that held inf or NaN) makes its kv head's query heads NaN."""
    kernels = native()
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, D, bs = 9, 3, 64, 16
    lens = torch.tensor([3000, 17, 1, 700])
    W = 3000 // bs + 1
    nblocks = len(lens) * W
    k = torch.randn(nblocks * bs, kv_heads, D, generator=gen)
    v = torch.randn(nblocks * bs, kv_heads, D, generator=gen)
    cache = llama.KVPool(llama.ModelArgs("LlamaForCausalLM", 8, 8, 1, heads, kv_heads, D, 8), nblocks, bs,
                         torch.int8).layer(0)
    cache.write(torch.arange(nblocks * bs), k, v)
    q = (4 * torch.randn(len(lens), heads, D, generator=gen)).bfloat16()  # sharp: a few keys dominate
    tables = torch.randperm(nblocks, generator=gen).view(len(lens), W)
    out = kernels.paged_decode_attention(q, cache.k, cache.v, tables, lens, 0, D ** -0.5, cache.k_scale, cache.v_scale)
    kd = (cache.k.float() * cache.k_scale[..., None]).bfloat16()
    vd = (cache.v.float() * cache.v_scale[..., None]).bfloat16()
    torch.testing.assert_close(out.float(), reference(q, kd, vd, tables, lens, 0), atol=2e-2, rtol=2e-2)
    for b in range(len(lens)):  # each row alone: the same bits
        alone = kernels.paged_decode_attention(q[b:b + 1], cache.k, cache.v, tables[b:b + 1], lens[b:b + 1], 0,
                                               D ** -0.5, cache.k_scale, cache.v_scale)
        assert torch.equal(alone[0], out[b])
    block, off = tables[3, 5].item(), 3  # a key of row 3 (700 tokens), kv head 1
    cache.k_scale[block, off, 1] = float("nan")
    out = kernels.paged_decode_attention(q, cache.k, cache.v, tables, lens, 0, D ** -0.5, cache.k_scale, cache.v_scale)
    assert torch.isnan(out[3, 3:6]).all()
    assert not torch.isnan(out[3, :3]).any() and not torch.isnan(out[:3]).any()


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed midway leaves torch's lock file, and every later load waited on it forever."""
    import time as _time

    from leanserve import kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = tmp_path.joinpath(_get_build_directory("leanserve_x_test", False), "lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    assert not kernels.clear_stale_lock("leanserve_x_test") and lock.exists()  # a build may be running
    old = _time.time() - kernels.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert kernels.clear_stale_lock("leanserve_x_test") and not lock.exists()
    assert not kernels.clear_stale_lock("leanserve_x_test")  # nothing to clear
