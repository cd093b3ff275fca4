"""Automatic prefix caching: shared prompt prefixes reuse KV blocks and change no output."""
from __future__ import annotations

import random

import pytest

from leanserve import LLM, SamplingParams
from leanserve.engine.kv_cache import BlockManager
from leanserve.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(shared: int, tails: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 40000) for _ in range(shared)]
    return [prefix + [rng.randrange(3, 40000) for _ in range(t)] for t in tails]


@pytest.fixture(scope="module")
def cached(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def uncached(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", block_size=4, prefix_caching=False)


def test_shared_prefix_hits_and_same_tokens(cached, uncached):
    prompts = _prompts(shared=37, tails=[5, 9, 2])
    before = cached.engine.kv.hit_tokens
    first = cached.generate(prompts[0], GREEDY)  # fills the cache with the prefix
    rest = [cached.generate(p, GREEDY)[0] for p in prompts[1:]]
    # 37 shared tokens = 9 full blocks of 4, reused by each later prompt
    assert cached.engine.kv.hit_tokens - before == 2 * 36
    expected = uncached.generate(prompts, GREEDY)
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in expected]
    assert cached.engine.kv.num_free_blocks == cached.engine.kv.num_blocks


def test_a_whole_cached_prompt_still_computes_its_last_token(cached, uncached):
    prompt = _prompts(shared=16, tails=[0], seed=1)[0]  # exactly 4 blocks
    a = cached.generate(prompt, GREEDY)[0]
    b = cached.generate(prompt, GREEDY)[0]  # 3 blocks from the cache, the last one recomputed
    assert a.token_ids == b.token_ids == uncached.generate(prompt, GREEDY)[0].token_ids


def test_generated_tokens_are_cached_for_the_next_turn(cached, uncached):
    prompt = _prompts(shared=10, tails=[0], seed=2)[0]
    first = cached.generate(prompt, GREEDY)[0]
    follow_up = prompt + first.token_ids + [17, 18, 19]
    before = cached.engine.kv.hit_tokens
    again = cached.generate(follow_up, GREEDY)[0]
    assert cached.engine.kv.hit_tokens - before >= 16  # prompt and answer blocks were reused
    assert again.token_ids == uncached.generate(follow_up, GREEDY)[0].token_ids


def test_eviction_under_a_small_pool(tiny_llama, uncached):
    """More distinct prompts than the pool holds: cached blocks are evicted, nothing breaks."""
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=24)
    prompts = _prompts(shared=8, tails=[20, 24, 18, 22, 26], seed=3)
    for _ in range(2):
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in uncached.generate(prompts, GREEDY)]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(0, "r", tokens, GREEDY, 1)


def test_hash_chain_covers_the_whole_prefix():
    """The same block of tokens after a different prefix is a different block."""
    bm = BlockManager(num_blocks=8, block_size=2)
    a = _seq([1, 2, 3, 4, 9])
    bm.allocate(a, 5)
    a.num_computed = 5
    bm.register_full_blocks(a)
    b = _seq([7, 7, 3, 4, 9])  # second block equal to a's, first block not
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed == 0
    c = _seq([1, 2, 3, 4, 5])
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:2] and c.num_computed == 4
    assert bm.refs[a.block_table[0]] == 2
    bm.free(a)
    bm.free(c)
    assert bm.num_free_blocks == 8 and len(bm.evictable) == 2


def test_disabled_cache_never_shares():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    a = _seq([1, 2, 3, 4, 9])
    bm.allocate(a, 5)
    a.num_computed = 5
    bm.register_full_blocks(a)
    b = _seq([1, 2, 3, 4, 9])
    bm.match_prefix(b)
    assert b.num_computed == 0 and not bm.cached
