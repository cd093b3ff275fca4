"""Continuous batching: which tokens of which sequences go into the next forward pass.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). Running decodes come first (one token each, so they never stall behind a
long prompt), then running prefills take what budget is left in chunks, then waiting
requests join. Within each group the more urgent priority class goes first
(realtime < standard < batch; lower is more urgent), then the older request.

A request on a LoRA adapter joins only once its adapter holds a slot (`LoRAManager.acquire`);
until then it waits without holding back the requests behind it. Its slot stays pinned while
it runs.

When the block pool runs dry, the least urgent, newest running sequence is preempted: its
blocks are freed and it is recomputed later from its tokens (same result). A waiting
request may also preempt running sequences of a strictly less urgent class when there is no
seat or no block for it. Waiting requests gain one class of urgency per
`priority_aging_seconds` waited, so batch work is never starved for good.

Within a class, waiting requests take turns by client (`Sequence.client`): the k-th waiting
sequence of every client goes before the (k+1)-th of any, and among equal turns the client
whose last admission is oldest goes first; so a caller who queued a thousand prompts delays
another caller's one by a seat, not by the thousand.
"""
from __future__ import annotations

import time

from ..config import EngineConfig
from .kv_cache import BlockManager
from .sequence import Sequence, SeqStatus

MAX_REMEMBERED_CLIENTS = 4096  # last admissions kept beyond the clients present


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.max_tokens = config.max_num_batched_tokens
        self.max_seqs = config.max_num_seqs
        self.aging = config.priority_aging_seconds
        self.blocks = blocks
        self.waiting: list[Sequence] = []  # sorted at each step by (aged priority, arrival)
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.lora = None  # the engine's LoRAManager
        self.failed: list[Sequence] = []  # their adapter could not be loaded; the engine ends them
        self._admitted: dict[str | None, int] = {}  # client -> when (an admission count) it last had a seat
        self._admissions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or aborted sequence out and returns its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
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
        self._release(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self.num_preemptions += 1
        return batch.pop(seq, 0)

    def _release(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.lora.release(seq.adapter)

    def _adapter_ready(self, seq: Sequence) -> bool:
        """Pins the adapter of a sequence about to run; False while it loads or has no slot."""
        if seq.adapter is None:
            return True
        try:
            return self.lora.acquire(seq.adapter)
        except Exception as e:  # the file went bad after it was registered
            seq.adapter.error = str(e)
            self.waiting.remove(seq)
            self.failed.append(seq)
            return False

    def _sort_waiting(self, now: float) -> None:
        """By (aged class, the sequence's turn among its client's waiting ones, its client's
        last admission, arrival)."""
        turn: dict[Sequence, int] = {}
        taken: dict[tuple[int, str | None], int] = {}
        for seq in sorted(self.waiting, key=lambda s: s.seq_id):
            key = (self._rank(seq, now), seq.client)
            turn[seq] = taken[key] = taken.get(key, -1) + 1
        if len(self._admitted) > MAX_REMEMBERED_CLIENTS:  # forget clients with nothing here
            present = {s.client for s in self.waiting} | {s.client for s in self.running}
            self._admitted = {c: t for c, t in self._admitted.items() if c in present}
        self.waiting.sort(key=lambda s: (self._rank(s, now), turn[s], self._admitted.get(s.client, -1), s.seq_id))

    def _admit(self, seq: Sequence) -> None:
        self._admitted[seq.client] = self._admissions
        self._admissions += 1

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
        self._sort_waiting(now)
        for seq in list(self.waiting):
            if budget <= 0:
                break
            if not self._adapter_ready(seq):
                continue
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
                self._release(seq)
                break
            self.waiting.remove(seq)
            self.blocks.queried_tokens += len(seq)
            self.blocks.hit_tokens += seq.num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._admit(seq)
            self.blocks.allocate(seq, n)
            batch[seq] = n
            budget -= n
        if not batch and self.lora is not None and self.waiting:
            self.lora.wait_for_loads(0.01)  # nothing to run but adapters loading: do not spin
        return list(batch.items())
