"""Continuous batching: which tokens of which sequences go into the next forward pass.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). Running decodes come first (one token each, so they never stall behind a
long prompt), then running prefills take what budget is left in chunks, then waiting
requests join. Within each group the more urgent priority class goes first
(realtime < standard < batch; lower is more urgent), then the older request.

When the block pool runs dry, the least urgent, newest running sequence is preempted: its
blocks are freed and it is recomputed later from its tokens (same result). A waiting
request may also preempt running sequences of a strictly less urgent class when there is no
seat or no block for it. Waiting requests gain one class of urgency per
`priority_aging_seconds` waited, so batch work is never starved for good.
"""
from __future__ import annotations

import time

from ..config import EngineConfig
from .kv_cache import BlockManager
from .sequence import Sequence, SeqStatus


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.max_tokens = config.max_num_batched_tokens
        self.max_seqs = config.max_num_seqs
        self.aging = config.priority_aging_seconds
        self.blocks = blocks
        self.waiting: list[Sequence] = []  # sorted at each step by (aged priority, arrival)
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or aborted sequence out and returns its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _rank(self, seq: Sequence, now: float) -> int:
        waited = now - seq.metrics.arrival
        return seq.priority - (int(waited // self.aging) if self.aging else 0)

    def _victim(self, now: float) -> Sequence:
        """The running sequence to give up first: least urgent (aged) class, then newest."""
        return max(self.running, key=lambda s: (self._rank(s, now), s.seq_id))

    def _preempt(self, seq: Sequence, batch: dict[Sequence, int]) -> int:
        """Sends `seq` back to waiting; returns the budget it had taken in this step."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self.num_preemptions += 1
        return batch.pop(seq, 0)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns (sequence, number of new tokens to run) pairs for one step."""
        now = time.perf_counter()
        budget = self.max_tokens
        batch: dict[Sequence, int] = {}
        short = False  # blocks ran out for running sequences: admit only what outranks them
        self.running.sort(key=lambda s: (s.num_uncomputed > 1, s.priority, s.seq_id))
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, n):
                short = True
                victim = self._victim(now)
                budget += self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.blocks.allocate(seq, n)
                batch[seq] = n
                budget -= n
        self.waiting.sort(key=lambda s: (self._rank(s, now), s.seq_id))
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)

            def blocked() -> bool:
                return len(self.running) >= self.max_seqs or not self.blocks.can_allocate(seq, n)

            rank = self._rank(seq, now)
            while blocked() and self.running and self._rank(self._victim(now), now) > rank:
                budget += self._preempt(self._victim(now), batch)
                n = min(seq.num_uncomputed, budget)
            outranks = any(self._rank(r, now) > rank for r in self.running)
            if blocked() or (short and not outranks):
                self.blocks.free(seq)  # hand back the prefix blocks it took
                break
            self.waiting.pop(0)
            self.blocks.queried_tokens += len(seq)
            self.blocks.hit_tokens += seq.num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.blocks.allocate(seq, n)
            batch[seq] = n
            budget -= n
        return list(batch.items())
