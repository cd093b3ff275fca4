"""The paged KV cache: a pool of fixed-size blocks and the block table of each sequence.

The tensors live in `models.llama.KVPool` ([layers, blocks * block_size, kv_heads, head_dim]);
this module only hands out block numbers. A token at position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.
"""
from __future__ import annotations

from collections import deque

import torch

from .sequence import Sequence

GIB = 1024 ** 3


def num_blocks_for_budget(gib: float, num_layers: int, num_kv_heads: int, head_dim: int,
                          block_size: int, dtype: torch.dtype) -> int:
    """How many blocks of keys and values fit in `gib` GiB."""
    bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
    return max(1, int(gib * GIB) // bytes_per_block)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new: int) -> int:
        """Extra blocks `seq` needs so that its next `num_new` tokens have slots."""
        return max(0, self.blocks_for(seq.num_computed + num_new) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        return self.blocks_needed(seq, num_new) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new)):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
