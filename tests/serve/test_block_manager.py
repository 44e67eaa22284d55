"""Block manager: ref counts, prefix-cache hits verified token by token, LRU eviction,
copy-on-write, admission checks and the leak check."""

from __future__ import annotations

import pytest

from tessera.serve.block_manager import BlockManager
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.sequence import Sequence

BS = 4


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence("r", token_ids, SamplingParams(max_tokens=8), max_tokens=8,
                    arrival_time=0.0)


def admit(bm: BlockManager, token_ids: list[int]) -> tuple[Sequence, int]:
    """Allocate and pretend the whole sequence was computed (so its blocks register)."""
    seq = make_seq(token_ids)
    assert bm.can_allocate(seq)
    num_cached = bm.allocate(seq)
    seq.start_running(num_cached, 0.0)
    seq.mark_computed(seq.num_tokens - num_cached)
    bm.cache_blocks(seq)
    return seq, num_cached


def refs(bm: BlockManager, seq: Sequence) -> list[int]:
    return [bm.blocks[b].ref_count for b in seq.block_table]


def test_shared_prefix_blocks_are_ref_counted_and_freed():
    bm = BlockManager(16, BS)
    prefix = list(range(10, 18))  # two full blocks
    a, cached_a = admit(bm, prefix + [1, 2, 3])
    b, cached_b = admit(bm, prefix + [4, 5])
    assert (cached_a, cached_b) == (0, 8)
    assert b.block_table[:2] == a.block_table[:2]
    assert refs(bm, a) == [2, 2, 1] and refs(bm, b) == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4
    bm.free(a)
    assert refs(bm, b) == [1, 1, 1]
    assert not bm.is_idle_clean()
    bm.free(b)
    assert bm.is_idle_clean() and bm.num_free_blocks == 16


def test_prefix_hit_stops_at_first_differing_block():
    bm = BlockManager(16, BS)
    a, _ = admit(bm, list(range(20, 32)) + [7])  # three full blocks + 1
    changed = list(range(20, 32))
    changed[5] = 99  # second block differs
    b, cached = admit(bm, changed + [7])
    assert cached == BS
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    for seq in (a, b):
        bm.free(seq)
    assert bm.num_hit_tokens == BS and bm.num_queried_tokens == 26


def test_block_aligned_sequence_recomputes_its_last_block():
    bm = BlockManager(16, BS)
    ids = list(range(30, 38))  # exactly two blocks
    a, _ = admit(bm, ids)
    b, cached = admit(bm, ids)
    assert cached == BS  # the last block is computed again, never written while shared
    assert b.block_table[1] != a.block_table[1]
    bm.free(a)
    bm.free(b)


def test_uncomputed_blocks_are_not_hits():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(40, 52)) + [1])
    bm.allocate(a)
    a.start_running(0, 0.0)
    a.mark_computed(BS)  # a chunk: only the first block is computed
    bm.cache_blocks(a)
    b, cached = admit(bm, list(range(40, 52)) + [2])
    assert cached == BS
    bm.free(a)
    bm.free(b)


def test_hash_collision_is_a_miss_not_a_wrong_hit():
    bm = BlockManager(16, BS, hash_fn=lambda parent, tokens: 42)  # every block collides
    a, _ = admit(bm, [1, 2, 3, 4, 5])
    b, cached = admit(bm, [9, 9, 9, 9, 5])
    assert cached == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    # a's tokens again: the hash now maps to b's block, whose tokens differ: a miss.
    c, cached = admit(bm, [1, 2, 3, 4, 6])
    assert cached == 0
    for seq in (a, b, c):
        bm.free(seq)


def test_collision_on_parent_hash_is_caught():
    # Same tokens in block 1, different block 0: a hash ignoring the parent would hit.
    bm = BlockManager(16, BS, hash_fn=lambda parent, tokens: hash(tokens))
    a, _ = admit(bm, [1, 1, 1, 1, 2, 2, 2, 2, 3])
    b, cached = admit(bm, [7, 7, 7, 7, 2, 2, 2, 2, 3])
    assert cached == 0  # block 0 misses, so block 1 is never looked up
    bm.free(a)
    bm.free(b)


def test_lru_eviction_order():
    bm = BlockManager(8, BS)
    a, _ = admit(bm, list(range(50, 58)) + [1])  # blocks: full, full, partial
    b, _ = admit(bm, list(range(60, 68)) + [2])
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    order = bm.free_block_ids()
    # Partial (unregistered) blocks go first, then a's, tail first, then b's, tail first.
    assert order[:2] == [b_blocks[2], a_blocks[2]]
    assert order[-4:] == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    # Five fresh blocks take the two partials, the two never-used blocks and a's tail.
    c, cached = admit(bm, list(range(100, 120)))
    assert cached == 0
    assert bm.free_block_ids() == [a_blocks[0], b_blocks[1], b_blocks[0]]
    b2, cached_b = admit(bm, list(range(60, 68)) + [2])  # revives b's prefix
    assert cached_b == 8 and b2.block_table[:2] == b_blocks[:2]
    assert b2.block_table[2] == a_blocks[0]  # its fresh block evicts the LRU one
    bm.free(c)
    a2, cached_a = admit(bm, list(range(50, 58)) + [1])
    assert cached_a == 0
    for seq in (b2, a2):
        bm.free(seq)
    assert bm.is_idle_clean()


def test_hit_revives_a_free_cached_block():
    bm = BlockManager(4, BS)
    a, _ = admit(bm, list(range(8)) + [1])
    bm.free(a)
    b = make_seq(list(range(8)) + [2])
    assert bm.can_allocate(b)
    assert bm.allocate(b) == 8
    assert bm.num_free_blocks == 1
    bm.free(b)


def test_copy_on_write_of_a_shared_partial_block():
    bm = BlockManager(8, BS)
    parent, _ = admit(bm, [5, 6, 7, 8, 9, 10])  # one full block, one partial
    child = parent.fork(1)
    bm.fork(parent, child)
    parent.append_token(11, None, 0.0)
    child.append_token(12, None, 0.0)
    assert child.block_table == parent.block_table
    assert refs(bm, parent) == [2, 2]
    shared = parent.block_table[1]
    assert bm.can_append_slots(parent, 1)
    copies = bm.append_slots(parent, 1)
    assert copies == [(shared, parent.block_table[1])] and parent.block_table[1] != shared
    assert refs(bm, parent) == [2, 1] and refs(bm, child) == [2, 1]
    assert bm.append_slots(child, 1) == []  # now the only owner: writes in place
    assert child.block_table[1] == shared
    bm.free(parent)
    bm.free(child)
    assert bm.is_idle_clean()


def test_admission_and_growth_checks():
    bm = BlockManager(3, BS)
    a = make_seq(list(range(9)))  # needs 3 blocks
    assert bm.can_allocate(a)
    bm.allocate(a)
    a.start_running(0, 0.0)
    b = make_seq([1, 2])
    assert not bm.can_allocate(b)
    a.mark_computed(9)
    a.append_token(3, None, 0.0)  # token 10: the third block still has room
    assert bm.can_append_slots(a, 1) and bm.append_slots(a, 1) == []
    assert not bm.can_append_slots(a, 4)  # would need a fourth block
    bm.free(a)
    assert bm.can_allocate(b)


def test_leak_check_names_the_held_blocks():
    bm = BlockManager(4, BS)
    seq, _ = admit(bm, [1, 2, 3])
    with pytest.raises(RuntimeError, match="KV block leak"):
        bm.assert_no_leaks()
    bm.free(seq)
    bm.assert_no_leaks()
