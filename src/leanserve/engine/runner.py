"""Turns one step's schedule into tensors and runs the model once for the whole batch."""
from __future__ import annotations

import torch

from ..models.llama import AttnBatch, CausalLM, KVPool, PrefillChunk
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, block_size: int):
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.window = model.args.sliding_window

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[..., q, k] bool: causal, and inside the sliding window when the model has one."""
        ok = k_pos <= q_pos
        if self.window:
            ok &= q_pos - k_pos < self.window
        return ok

    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Runs the scheduled tokens. Returns logits [S, vocab] for the S sequences that
        reached their end in this step (so sample a next token), and those sequences."""
        ids, pos, slots, logit_rows, sampled = [], [], [], [], []
        decode_rows, decode_tables, decode_lens = [], [], []
        prefills: list[PrefillChunk] = []
        row = 0
        for seq, n in batch:
            start = seq.num_computed
            table = torch.tensor(seq.block_table, dtype=torch.long)
            p = torch.arange(start, start + n)
            ids.extend(seq.token_ids[start:start + n])
            pos.append(p)
            slots.append(self._slots(table, p))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_lens.append(start + 1)
            elif start == 0 and not self.window:
                prefills.append(PrefillChunk(row, n, None, None))
            else:
                k_pos = torch.arange(start + n)
                mask = self._visible(p[:, None], k_pos[None, :])[None, None]
                prefills.append(PrefillChunk(row, n, self._slots(table, k_pos), mask))
            row += n
            if start + n == len(seq):
                logit_rows.append(row - 1)
                sampled.append(seq)
        attn = AttnBatch(slot_mapping=torch.cat(slots), prefills=prefills)
        if decode_rows:
            attn.decode_rows = torch.tensor(decode_rows)
            lens = torch.tensor(decode_lens)
            k_pos = torch.arange(int(lens.max()))
            tables = torch.nn.utils.rnn.pad_sequence(decode_tables, batch_first=True)
            kpb = k_pos // self.block_size
            attn.decode_slots = tables[:, kpb] * self.block_size + k_pos % self.block_size
            visible = (k_pos[None, :] < lens[:, None]) & self._visible((lens - 1)[:, None], k_pos[None, :])
            attn.decode_mask = visible[:, None, None, :]
        logits = self.model(torch.tensor(ids), torch.cat(pos), attn, self.pool, torch.tensor(logit_rows, dtype=torch.long))
        return logits, sampled
