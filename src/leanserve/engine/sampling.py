"""Batched sampling for one step: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

Sampling draws `argmax(probs / E)` with E ~ Exponential(1) per vocabulary entry: the same
distribution as a categorical draw, but the noise of each row can come from that request's
own generator. A seeded request thus samples the same tokens whatever shares its batch.
"""
from __future__ import annotations

import logging

import torch

from ..kernels import first_argmax
from .sequence import Logprob, Sequence

log = logging.getLogger("leanserve.engine")


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq: Sequence) -> None:
        self.seq_generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        gen = self.seq_generators.get(seq.seq_id)
        if gen is None:
            gen = self.seq_generators[seq.seq_id] = torch.Generator().manual_seed(seq.params.seed)
        return gen

    @staticmethod
    def argmax_only(seqs: list[Sequence], eos_ids: set[int]) -> bool:
        """Whether this step's tokens for `seqs` are the first argmax of their logits as the
        model gives them: every row greedy, no logprobs, no penalties and no token banned
        (`__call__` would then do exactly that). The model may then pick them itself."""
        for seq in seqs:
            p = seq.params
            if seq.matcher is not None:
                return False
            if not p.greedy or p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty \
                    or p.frequency_penalty:
                return False
            if seq.num_output < p.min_tokens and (p.stop_token_ids or not p.ignore_eos and eos_ids):
                return False
        return True

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int], allowed: dict | None = None
               ) -> tuple[list[int | None], list[Logprob | None], list[Exception | None]]:
        """`__call__` over the batch; if that raises, each row alone, so one row's failure
        costs only that row (its token is None and its error is given). Seeded rows first go
        back to their generator's state before the batch try, so they draw what they would have."""
        states = {s.seq_id: g.get_state() for s in seqs if (g := self.seq_generators.get(s.seq_id)) is not None}
        try:
            tokens, logprobs = self(logits, seqs, eos_ids, allowed)
            return tokens, logprobs, [None] * len(seqs)
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows one by one", len(seqs))
        rows = []
        for i, seq in enumerate(seqs):
            if seq.seq_id in states:
                self.seq_generators[seq.seq_id].set_state(states[seq.seq_id])
            else:
                self.seq_generators.pop(seq.seq_id, None)
            try:
                (token,), (lp,) = self(logits[i:i + 1], [seq], eos_ids, allowed)
                rows.append((token, lp, None))
            except Exception as e:
                rows.append((None, None, e))
        tokens, logprobs, errors = (list(column) for column in zip(*rows))
        return tokens, logprobs, errors

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int], allowed: dict | None = None
                 ) -> tuple[list[int], list[Logprob | None]]:
        """logits: [B, vocab], one row per sequence, in the model dtype or float32. Returns
        token ids and logprobs. Greedy rows without penalties take the argmax of the logits as
        they come (float32 holds every bf16 value exactly, so the pick is the same); anything
        that does arithmetic on them first converts to float32. `allowed` (seq_id -> bool
        [vocab], structured outputs) bans every other token of those rows, after penalties;
        logprobs stay those of the model's own distribution, as with penalties."""
        if any(not s.params.greedy or s.params.logprobs is not None for s in seqs):
            logits = logits.float()
        raw = logits
        copied = False
        for i, seq in enumerate(seqs):
            p = seq.params
            banned = []
            if seq.num_output < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
                banned = [t for t in banned if t < logits.shape[1]]
            penalized = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
            mask = allowed.get(seq.seq_id) if allowed else None
            if not copied and (banned or penalized or mask is not None):
                logits = logits.clone() if logits.dtype == torch.float32 else logits.float()
                copied = True  # `raw` stays the model's own, for logprobs
            if penalized:
                self._penalize(logits[i], seq)
            if banned:
                logits[i, banned] = -float("inf")
            if mask is not None:
                row = logits[i].masked_fill(~mask, -float("inf"))
                # nothing left (a ban on EOS where the grammar allows only EOS): the grammar wins
                logits[i] = row if bool(torch.isfinite(row).any()) else raw[i].float().masked_fill(~mask, -float("inf"))
        tokens = first_argmax(logits)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            idx = torch.tensor(sampled)
            tokens[idx] = self._sample(logits[idx], [seqs[i] for i in sampled])
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, seqs, token_list)

    @staticmethod
    def _penalize(row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output:
            counts = torch.bincount(torch.tensor(seq.output_ids), minlength=row.shape[0])[: row.shape[0]]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temp = torch.tensor([s.params.temperature for s in seqs]).unsqueeze(1)
        probs = torch.softmax(logits / temp, dim=-1)
        top_k = torch.tensor([s.params.top_k or probs.shape[1] for s in seqs])
        top_p = torch.tensor([s.params.top_p for s in seqs])
        min_p = torch.tensor([s.params.min_p for s in seqs])
        if (top_k < probs.shape[1]).any() or (top_p < 1).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
            rank = torch.arange(probs.shape[1]).unsqueeze(0)
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
            drop = (rank >= top_k.unsqueeze(1)) | (before >= top_p.unsqueeze(1))
            probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
        if (min_p > 0).any():
            floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=self._generator(seq))
        return first_argmax(probs / noise)

    @staticmethod
    def _logprobs(raw: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[Logprob | None]:
        """Log-probabilities of the model's own distribution (before penalties and temperature)."""
        wanted = [s.params.logprobs for s in seqs]
        if all(w is None for w in wanted):
            return [None] * len(seqs)
        logp = torch.log_softmax(raw, dim=-1)
        k = max(w or 0 for w in wanted)
        top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
        chosen = logp[torch.arange(len(seqs)), torch.tensor(tokens)].tolist()
        out: list[Logprob | None] = []
        for i, w in enumerate(wanted):
            if w is None:
                out.append(None)
                continue
            top = list(zip(top_i[i, :w].tolist(), top_v[i, :w].tolist())) if w else []
            out.append(Logprob(tokens[i], chosen[i], top))
        return out
