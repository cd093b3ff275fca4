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

    def _visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[..., q, k] bool: causal, and inside the sliding window when the model has one."""
        ok = k_pos <= q_pos
        if self.window:
            ok &= q_pos - k_pos < self.window
        return ok

    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Runs the scheduled tokens. Returns logits [S, vocab] for the S sequences that
        reached their end in this step (so sample a next token), and those sequences."""
        bs = self.block_size
        decodes = [(s, n) for s, n in batch if n == 1 and s.num_computed > 0]
        others = [(s, n) for s, n in batch if not (n == 1 and s.num_computed > 0)]
        ids, pos, logit_rows, sampled = [], [], [], []
        tables = []
        prefills: list[PrefillChunk] = []
        row = 0
        for seq, n in decodes + others:
            start = seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            tables.extend([seq.block_table] * n)
            if row >= len(decodes):
                if start == 0 and not self.window:
                    prefills.append(PrefillChunk(row, n, None, None))
                else:
                    blocks = torch.tensor(seq.block_table[:-(-(start + n) // bs)])
                    k_pos = torch.arange(len(blocks) * bs)
                    q_pos = torch.arange(start, start + n)
                    prefills.append(PrefillChunk(row, n, blocks, self._visible(q_pos[:, None], k_pos[None, :])[None, None]))
            row += n
            if start + n == len(seq):
                logit_rows.append(row - 1)
                sampled.append(seq)
        positions = torch.tensor(pos)
        block_of_token = torch.tensor([t[p // bs] for t, p in zip(tables, pos)])
        attn = AttnBatch(slot_mapping=block_of_token * bs + positions % bs, prefills=prefills,
                         num_decodes=len(decodes))
        if decodes:
            width = max(len(s.block_table) for s, _ in decodes)
            attn.decode_blocks = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s, _ in decodes])
            q_pos = positions[:len(decodes), None]
            k_pos = torch.arange(width * bs)[None, :]
            attn.decode_mask = self._visible(q_pos, k_pos)[:, None, None, :]
        logits = self.model(torch.tensor(ids), positions, attn, self.pool, torch.tensor(logit_rows, dtype=torch.long))
        return logits, sampled
