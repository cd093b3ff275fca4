"""Turns one step's schedule into tensors and runs the model once for the whole batch."""
from __future__ import annotations

import torch

from ..kernels import native
from ..models.llama import AttnBatch, CausalLM, KVPool
from .sequence import Sequence


class ModelRunner:
    lora = None  # the engine's LoRAManager, set by the engine
    def __init__(self, model: CausalLM, pool: KVPool, block_size: int):
        self.model = model
        self.pool = pool
        self.block_size = block_size

    def execute(self, batch: list[tuple[Sequence, int]], greedy=None) -> tuple[torch.Tensor, list[Sequence], bool]:
        """Runs the scheduled tokens. Returns logits [S, vocab] (model dtype) for the S
        sequences that reached their end in this step (so sample a next token), those
        sequences, and False; or, when `greedy(those sequences)` says their tokens are the
        argmax of the logits as they come, their tokens [S] (int64) and True."""
        bs = self.block_size
        quantized = self.pool.dtype == torch.int8
        decodes = [(s, n) for s, n in batch if n == 1 and s.num_computed > 0]
        others = [(s, n) for s, n in batch if not (n == 1 and s.num_computed > 0)]
        # With the native kernels every row, a prompt's too, attends as a decode of its position
        # does: over its sequence's blocks in the pool (its own keys are written first), up to
        # itself. So a row's numbers depend neither on how its prompt was split into chunks nor
        # on whether its prefix was cached, and one call takes all rows (SDPA over each chunk
        # ran its products in float32 at ~42 GFLOP/s here). The torch fallback keeps chunks.
        as_rows = (decodes + others) if native() is not None else decodes
        ids, pos, slots, logit_rows, sampled = [], [], [], [], []
        meta, ctx_blocks = [], []
        row = 0
        for i, (seq, n) in enumerate(decodes + others):
            start = seq.num_computed
            table = seq.block_table
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if i >= len(as_rows):  # a prefill chunk (the torch fallback only)
                # A chunk continuing a sequence reads its keys from the pool. So does every chunk
                # over an int8 pool: attending to its own fresh keys would make a prompt's result
                # depend on whether its prefix was cached (quantized) or computed just now.
                ctx = 0 if start == 0 and not quantized else -(-(start + n) // bs)
                meta.append((row, n, ctx))
                ctx_blocks.extend(table[:ctx])
            row += n
            if start + n == len(seq):
                logit_rows.append(row - 1)
                sampled.append(seq)
        positions = torch.tensor(pos)
        if as_rows:
            width = max(len(s.block_table) for s, _ in as_rows)
            decode_blocks = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s, _ in as_rows])
            if len(as_rows) > len(decodes):
                decode_blocks = decode_blocks.repeat_interleave(torch.tensor([n for _, n in as_rows]), dim=0)
        else:
            decode_blocks = torch.zeros(0, 1, dtype=torch.long)
        attn = AttnBatch(slot_mapping=torch.tensor(slots), decode_blocks=decode_blocks,
                         decode_lens=positions[:len(decode_blocks)] + 1,
                         prefill_meta=torch.tensor(meta, dtype=torch.long).view(-1, 3),
                         prefill_blocks=torch.tensor(ctx_blocks, dtype=torch.long))
        if self.lora is not None:  # which rows run which LoRA adapter (engine/lora.py)
            self.lora.prepare_step(self.model, decodes + others)
        argmax = bool(sampled) and greedy is not None and greedy(sampled)
        out = self.model(torch.tensor(ids), positions, attn, self.pool, torch.tensor(logit_rows, dtype=torch.long),
                         float_logits=False, greedy=argmax)
        return out, sampled, argmax
