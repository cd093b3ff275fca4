"""The paged KV cache: a pool of fixed-size blocks, the block table of each sequence, and
automatic prefix caching.

The tensors live in `models.llama.KVPool` ([layers, blocks, block_size, kv_heads, head_dim]);
this module only hands out block numbers. A token at position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Prefix caching: once a block is full and computed, it is named by a hash chained over every
token before it (the hash of block i covers block i's tokens and block i-1's hash). A new
sequence whose first blocks have known hashes takes those blocks as they are (reference
counted) and starts computing after them. Blocks nobody uses keep their contents, sit in an
LRU list, and are only overwritten when the free list is empty.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import torch

from .sequence import Sequence

GIB = 1024 ** 3


def num_blocks_for_budget(gib: float, num_layers: int, num_kv_heads: int, head_dim: int,
                          block_size: int, dtype: torch.dtype) -> int:
    """How many blocks of keys and values fit in `gib` GiB (an int8 cache also keeps a
    float32 scale per token and kv head)."""
    per_row = head_dim * dtype.itemsize + (4 if dtype == torch.int8 else 0)
    bytes_per_block = 2 * num_layers * block_size * num_kv_heads * per_row
    return max(1, int(gib * GIB) // bytes_per_block)


def root_hash(seq: Sequence) -> bytes:
    """The chain's start: the adapter changes every key and value, so it is part of the name."""
    return b"" if seq.adapter is None else b"lora:%d" % seq.adapter.id


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A collision-resistant name for a block's contents and everything before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks: deque[int] = deque(range(num_blocks))  # no useful contents
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}  # block -> hash, for full computed blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first
        self.queried_tokens = 0  # tokens of admitted sequences (the scheduler counts)
        self.hit_tokens = 0  # of which came from the prefix cache

    def forget_contents(self) -> None:
        """For a pool that was freed: every block empty, the prefix cache forgotten. Only
        when no sequence holds a block."""
        assert not any(self.refs), "blocks are still in use"
        self.free_blocks = deque(range(self.num_blocks))
        self.hash_of.clear()
        self.cached.clear()
        self.evictable.clear()

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get: empty ones and cached ones nobody uses."""
        return len(self.free_blocks) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new: int) -> int:
        """Extra blocks `seq` needs so that its next `num_new` tokens have slots."""
        return max(0, self.blocks_for(seq.num_computed + num_new) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        return self.blocks_needed(seq, num_new) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:  # reuse the least recently used cached block: forget what it held
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the tail is evicted first
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def match_prefix(self, seq: Sequence) -> None:
        """Gives a sequence that has no blocks yet the cached blocks of its longest known
        prefix. At least one token is left to compute: its logits give the next token."""
        if not self.prefix_caching or seq.block_table:
            return
        usable = (len(seq) - 1) // self.block_size
        parent = root_hash(seq)
        for i in range(usable):
            h = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Names the blocks `seq` has filled and computed, so later sequences can share them."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(seq)
            h = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h
