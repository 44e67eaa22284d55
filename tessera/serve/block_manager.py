"""The paged KV cache's bookkeeping: which block belongs to whom.

The pool holds `num_blocks` blocks of `block_size` token slots each (the tensors live in
`kv_pool.py`, owned by the model runner; this module never touches them). A sequence's
block table lists its blocks in order; token i of the sequence sits in slot
`block_table[i // block_size] * block_size + i % block_size`.

- Blocks are reference-counted: n > 1 siblings and prefix-cache hits share blocks.
- Prefix caching: once a FULL block's keys and values are computed, it is registered under
  a chained hash of (parent block's hash, its token ids). A new sequence reuses the leading
  blocks whose hashes match, after checking the stored tokens and parent hash, so a hash
  collision costs a cache miss, never a wrong output. The chain itself is trusted through a
  128-bit digest.
- Freed blocks go back to the free pool in LRU order; a free block that is still registered
  can be revived by a hit until it is evicted (the least recently freed goes first; blocks
  that hold nothing reusable go before any registered one).
- Copy-on-write: before a sequence writes into a block it shares (a partial last block
  shared by n > 1 siblings), it gets a private copy; `append_slots` returns the
  (source, destination) pairs that the runner copies in the pool.

It knows nothing about devices, models or the scheduling policy.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tessera.serve.sequence import Sequence

HashFn = Callable[[int | None, tuple[int, ...]], int]


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """128-bit digest of (parent block's hash, this block's token ids)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"root" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed
    parent_hash: int | None = None  # checked on a hit, with token_ids
    token_ids: tuple[int, ...] = ()

    def register(self, block_hash: int, parent_hash: int | None,
                 token_ids: tuple[int, ...]) -> None:
        self.hash, self.parent_hash, self.token_ids = block_hash, parent_hash, token_ids

    def forget(self) -> None:
        self.hash, self.parent_hash, self.token_ids = None, None, ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 hash_fn: HashFn = hash_block):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        self._num_hashed: dict[int, int] = {}  # seq id -> leading blocks already registered
        self.num_queried_tokens = 0  # prefix-cache statistics, over admissions
        self.num_hit_tokens = 0

    # ------------------------------------------------------------------ pool state
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ admission
    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._match_prefix(seq)
        num_revived = sum(self.blocks[b].ref_count == 0 for b in hits)  # leave the free pool
        num_fresh = self.num_blocks_for(seq.num_tokens) - len(hits)
        return num_fresh + num_revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> int:
        """Blocks for every token of `seq`; returns how many leading tokens hit the cache."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        hits = self._match_prefix(seq)
        for block_id in hits:
            self._take(block_id)
            seq.append_block(block_id)
        for _ in range(self.num_blocks_for(seq.num_tokens) - len(hits)):
            seq.append_block(self._take(self._evict_one()))
        self._num_hashed[seq.seq_id] = len(hits)
        num_hit_tokens = len(hits) * self.block_size
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += num_hit_tokens
        return num_hit_tokens

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to `seq`'s leading full blocks, verified token by token.

        NOTE: a block-aligned sequence never hits its last block: at least one token must be
        computed to get logits, and it must not be written into a shared block.
        """
        if not self.enable_prefix_caching:
            return []
        ids, size = seq.token_ids, self.block_size
        hits: list[int] = []
        parent: int | None = None
        for i in range((len(ids) - 1) // size):
            tokens = tuple(ids[i * size:(i + 1) * size])
            block_hash = self.hash_fn(parent, tokens)
            block_id = self._cached.get(block_hash)
            if block_id is None or not self._holds(block_id, parent, tokens):
                break
            hits.append(block_id)
            parent = block_hash
        return hits

    def _holds(self, block_id: int, parent: int | None, tokens: tuple[int, ...]) -> bool:
        block = self.blocks[block_id]
        return block.parent_hash == parent and block.token_ids == tokens

    # ------------------------------------------------------------------ growth
    def can_append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Slots for the next `num_new_tokens` computed tokens of `seq`; returns the
        (source, destination) block copies the runner must make first (copy-on-write)."""
        copies = []
        first = seq.num_computed_tokens // self.block_size  # the first block written
        if first < len(seq.block_table) and self.blocks[seq.block_table[first]].ref_count > 1:
            shared = seq.block_table[first]
            private = self._take(self._evict_one())
            self._release(shared)
            seq.replace_block(first, private)
            copies.append((shared, private))
        end = seq.num_computed_tokens + num_new_tokens
        for _ in range(self.num_blocks_for(end) - len(seq.block_table)):
            seq.append_block(self._take(self._evict_one()))
        return copies

    def _num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        end = seq.num_computed_tokens + num_new_tokens
        num_missing = max(0, self.num_blocks_for(end) - len(seq.block_table))
        first = seq.num_computed_tokens // self.block_size
        is_shared = (first < len(seq.block_table)
                     and self.blocks[seq.block_table[first]].ref_count > 1)
        return num_missing + is_shared

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (n > 1 siblings after the prompt)."""
        assert not child.block_table
        for block_id in parent.block_table:
            self._take(block_id)
            child.append_block(block_id)
        self._num_hashed[child.seq_id] = self._num_hashed[parent.seq_id]

    # ------------------------------------------------------------------ prefix cache
    def cache_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s full blocks whose keys and values are now all computed."""
        if not self.enable_prefix_caching:
            return
        size, table = self.block_size, seq.block_table
        start = self._num_hashed[seq.seq_id]
        num_full = seq.num_computed_tokens // size
        for i in range(start, num_full):
            block = self.blocks[table[i]]
            if block.hash is None:  # a shared block is registered once
                parent = self.blocks[table[i - 1]].hash if i else None
                tokens = tuple(seq.token_ids[i * size:(i + 1) * size])
                block.register(self.hash_fn(parent, tokens), parent, tokens)
                self._cached[block.hash] = block.block_id  # the newest copy wins
        self._num_hashed[seq.seq_id] = max(start, num_full)

    # ------------------------------------------------------------------ release
    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its tail blocks are freed first, so evicted first."""
        for block_id in reversed(seq.clear_blocks()):
            self._release(block_id)
        self._num_hashed.pop(seq.seq_id, None)

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} released more often than taken"
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None  # most recently used: evicted last
            if block.hash is None:
                self._free.move_to_end(block_id, last=False)  # nothing to reuse: first

    def _evict_one(self) -> int:
        """The least recently freed block, unregistered from the prefix cache."""
        assert self._free, "no free block: check with can_allocate / can_append_slots first"
        block_id = next(iter(self._free))
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]
        block.forget()
        return block_id

    # ------------------------------------------------------------------ leak check
    def is_idle_clean(self) -> bool:
        return (self.num_free_blocks == self.num_blocks and not self._num_hashed
                and all(b.ref_count == 0 for b in self.blocks))

    def assert_no_leaks(self) -> None:
        if not self.is_idle_clean():
            held = {b.block_id: b.ref_count for b in self.blocks if b.ref_count}
            raise RuntimeError(
                f"KV block leak: {self.num_blocks - self.num_free_blocks} of "
                f"{self.num_blocks} blocks are not free with no sequence running "
                f"(block id -> ref count: {held}; sequences still tracked: "
                f"{sorted(self._num_hashed)})"
            )

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (first evicted first)."""
        return list(self._free)
