"""Paged and ring block tables, and the per-pool prefix lookup, without a model (torch-free)."""

from __future__ import annotations

from gemma_serve.server.engine.block_pool import BlockKey
from gemma_serve.server.engine.block_table import Cover, Growth, PoolKind
from gemma_serve.server.engine.kv_manager import KVCacheManager
from gemma_serve.server.engine.paged_table import PagedTable
from gemma_serve.server.engine.ring_table import RingTable

B, R = 4, 3  # block size; a ring of ceil((window 8 - 1) / 4) + 1 = 3 blocks


def decode_to(table: RingTable | PagedTable, rid: str, first: int, last: int) -> None:
    """Grow one token at a time from first to last tokens, as decodes do."""
    for n in range(first, last + 1):
        assert table.missing(rid, Cover(n)) <= table.pool.num_free
        table.grow(rid, Cover(n))


def test_paged_slots_address_every_position() -> None:
    table = PagedTable(8, B)
    decode_to(table, "a", 1, 10)
    blocks = table.table("a")
    assert len(blocks) == 3 and table.pool.num_used == 3
    want = [blocks[p // B] * B + p % B for p in range(10)]
    assert table.slots("a", 0, 10) == want
    assert table.batch_inputs([("a", 9, 10)]).slots == [want[9]]
    assert table.block_at("a", 2) == blocks[2] and table.block_at("a", 3) is None


def test_a_ring_wraps_in_place_when_its_blocks_are_its_own() -> None:
    ring = RingTable(8, B, R)
    decode_to(ring, "a", 1, 12)
    before = list(ring.table("a"))
    decode_to(ring, "a", 13, 40)  # seven more blocks: the ring wraps twice
    assert ring.table("a") == before and ring.pool.num_used == R
    # position p at ring[(p // B) % R] * B + p % B
    assert ring.slots("a", 37, 40) == [before[(p // B) % R] * B + p % B for p in range(37, 40)]
    assert ring.block_at("a", 9) == before[0] and ring.block_at("a", 6) is None


def test_a_ring_copies_a_cached_block_on_write_unless_minimal() -> None:
    key = BlockKey.chain(list(range(B)), B, 1)[0]
    for growth, copied in ((Growth.KEEP_CACHED, True), (Growth.MINIMAL, False)):
        ring = RingTable(8, B, R)
        decode_to(ring, "a", 1, 12)
        first = ring.table("a")[0]
        ring.pool.register(first, key)
        # a copy needs a fresh block but releases the old one (no other holder): net 0
        assert ring.missing("a", Cover(13, growth=growth)) == 0
        ring.grow("a", Cover(13, growth=growth))  # block index 3 takes block 0's slot
        assert (ring.table("a")[0] != first) is copied
        assert ring.pool.lookup(key) == (first if copied else None)  # still findable if copied
        assert ring.pool.num_used == R


def test_a_prefill_reads_the_replaced_blocks_until_commit() -> None:
    ring = RingTable(8, B, R)
    ring.grow("a", Cover(12))  # blocks 0, 1, 2
    before = list(ring.table("a"))
    ring.pool.register(before[1], BlockKey.chain(list(range(2 * B)), B, 2)[1])
    # A chunk at 12..19: index 3 replaces block 0 (out of the window: freed), index 4 replaces
    # block 1, which holds positions 4..7 that the chunk's first query (12, window 8) sees.
    ring.grow("a", Cover(20, context_from=12))
    assert ring.context("a") == before and ring.table("a")[2] == before[2]
    assert before[1] in ring.owners()["a"] and ring.pool.num_used == R + 1
    assert ring.batch_inputs([("a", 12, 20)]).rows == [before]
    ring.commit("a")
    assert ring.context("a") == ring.table("a") and ring.pool.num_used == R
    ring.free("a")
    assert ring.pool.num_used == 0


def test_a_chunk_longer_than_the_ring_writes_its_early_blocks_to_transient_ones() -> None:
    ring = RingTable(10, B, R)
    ring.grow("a", Cover(20, context_from=0, transient_below=5))  # 5 blocks, a ring holds 3
    held = ring.table("a")
    transient = [b for b in ring.owners()["a"] if b not in held]
    assert len(transient) == 2 and ring.pool.num_used == 5
    assert ring.slots("a", 0, 1) == [transient[0] * B]
    ring.commit("a")
    assert ring.pool.num_used == R and ring.slots("a", 0, 1) == [-1]


def test_the_prefix_hit_is_the_longest_run_every_pool_serves() -> None:
    kv = KVCacheManager(20, 20, B, 8, prefix_caching=True)
    prompt = list(range(3, 27))  # 24 tokens: 6 full blocks, 5 reusable
    assert kv.try_admit("a", prompt, 24, 64, True) == (0, 24)
    kv.computed("a", 24, 24)
    kv.free("a")
    keys = BlockKey.chain(prompt, B, 6)
    local = kv.pools[PoolKind.LOCAL].pool
    local.forget(local.lookup(keys[3]))  # the ring can no longer serve k = 5 or 4
    # k = 5 needs local blocks 2..4, k = 4 needs 1..3, k = 3 needs 0..2: all cached
    assert kv.try_admit("b", prompt, 24, 64, True) == (12, 12)
    assert kv.num_cached_tokens == 12
    assert kv.pools[PoolKind.GLOBAL].table("b")[:3] == [
        kv.pools[PoolKind.GLOBAL].pool.lookup(k) for k in keys[:3]
    ]
