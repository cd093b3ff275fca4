"""The scheduler alone (no model): budgets, chunking, preemption, priority classes, aging."""
from __future__ import annotations

import time

from leanserve.config import EngineConfig
from leanserve.engine.kv_cache import BlockManager
from leanserve.engine.scheduler import Scheduler
from leanserve.engine.sequence import PRIORITY_CLASSES, SamplingParams, Sequence

REALTIME, STANDARD, BATCH = (PRIORITY_CLASSES[c] for c in ("realtime", "standard", "batch"))
_ids = iter(range(10**6))


def make(num_blocks=64, block_size=4, **config):
    cfg = EngineConfig(max_num_batched_tokens=config.pop("budget", 64), **config)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, prefix_caching=False))


def seq(n_prompt=8, priority=STANDARD) -> Sequence:
    i = next(_ids)
    return Sequence(i, f"r{i}", list(range(1, n_prompt + 1)), SamplingParams(), 100, priority)


def run(sched, batch):
    """What the engine does after a forward pass: the scheduled tokens are computed, and each
    sequence that reached its end gets one new token."""
    for s, n in dict(batch).items():
        s.num_computed += n
        if s.num_computed == len(s):
            s.token_ids.append(7)


def test_decodes_first_and_long_prompt_chunked():
    sched = make(budget=10)
    a = seq(4)
    sched.add(a)
    run(sched, sched.schedule())  # a prefilled, now decoding
    long = seq(25)
    sched.add(long)
    steps = []
    while long.num_computed < len(long) - 1:
        batch = sched.schedule()
        steps.append([(s.request_id, n) for s, n in batch])
        assert batch[0] == (a, 1)  # the decode never waits for the long prefill
        run(sched, batch)
    assert [n for _, n in (step[1] for step in steps)] == [9, 9, 7]


def test_more_urgent_class_admitted_first():
    sched = make(max_num_seqs=1)
    batch_seq, rt = seq(priority=BATCH), seq(priority=REALTIME)
    sched.add(batch_seq)
    sched.add(rt)
    assert [s for s, _ in sched.schedule()] == [rt]


def test_realtime_arrival_preempts_batch_work_for_a_seat():
    sched = make(max_num_seqs=2)
    b1, b2 = seq(priority=BATCH), seq(priority=BATCH)
    for s in (b1, b2):
        sched.add(s)
    run(sched, sched.schedule())
    rt = seq(priority=REALTIME)
    sched.add(rt)
    batch = dict(sched.schedule())
    assert rt in batch and b2 not in batch and b1 in batch  # the newest batch sequence gave way
    assert sched.num_preemptions == 1 and b2.block_table == [] and b2.num_computed == 0


def test_equal_priority_never_preempts_for_a_seat():
    sched = make(max_num_seqs=1)
    first, second = seq(), seq()
    sched.add(first)
    run(sched, sched.schedule())
    sched.add(second)
    assert [s for s, _ in sched.schedule()] == [first]
    assert sched.num_preemptions == 0


def test_block_shortage_preempts_least_urgent_newest():
    sched = make(num_blocks=6, block_size=4)  # 24 token slots
    rt, st, bt = seq(7, REALTIME), seq(7, STANDARD), seq(7, BATCH)
    for s in (bt, st, rt):
        sched.add(s)
    run(sched, sched.schedule())  # all three prefilled: 2 blocks each, pool full
    assert sched.blocks.num_free_blocks == 0
    batch = dict(sched.schedule())  # each decode (token 8 fits) ...
    run(sched, batch)
    batch = dict(sched.schedule())  # ... token 9 needs a third block each: batch-class goes
    assert bt not in batch and rt in batch and st in batch
    assert bt in sched.waiting and sched.num_preemptions >= 1


def test_aging_lets_old_batch_work_through():
    sched = make(max_num_seqs=1, priority_aging_seconds=10)
    old_batch, rt = seq(priority=BATCH), seq(priority=REALTIME)
    old_batch.metrics.arrival = time.perf_counter() - 25  # waited 2.5 agings: now outranks realtime
    sched.add(rt)
    sched.add(old_batch)
    assert [s for s, _ in sched.schedule()] == [old_batch]
