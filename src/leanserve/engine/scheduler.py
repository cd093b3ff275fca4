"""Continuous batching: which tokens of which sequences go into the next forward pass.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). Running decodes come first (one token each, so they never stall behind a
long prompt), then running prefills take what budget is left in chunks, then waiting
requests join. When the block pool runs dry, the newest running sequence is preempted:
its blocks are freed and it is recomputed later from its tokens (same result).
"""
from __future__ import annotations

import bisect

from ..config import EngineConfig
from .kv_cache import BlockManager
from .sequence import Sequence, SeqStatus


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.max_tokens = config.max_num_batched_tokens
        self.max_seqs = config.max_num_seqs
        self.blocks = blocks
        self.waiting: list[Sequence] = []  # ordered by (priority, arrival)
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queues `seq` behind every waiting sequence of the same or more urgent priority."""
        keys = [s.priority for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, seq.priority), seq)

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

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns (sequence, number of new tokens to run) pairs for one step."""
        budget = self.max_tokens
        batch: dict[Sequence, int] = {}
        preempted = False
        decodes = [s for s in self.running if s.num_uncomputed == 1]
        prefills = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, n):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                budget += batch.pop(victim, 0)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.blocks.allocate(seq, n)
                batch[seq] = n
                budget -= n
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, n):
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
