"""Ring block tables for sliding-window (local) layers, torch-free.

A ring holds block index i at table[i % R], so a request never holds more than R blocks however
long it runs. Rings grow lazily (a short request holds only the blocks it fills); once full,
each new block index takes over the slot of the oldest one. That block is overwritten in place
when it is this request's alone and holds no cached prefix (or the pool has no room to spare:
`Growth.MINIMAL`); otherwise (shared with another request, or a cached prefix worth keeping)
the slot gets a fresh block and the old one is released whole. So that a decode never needs the
block it releases, R = ceil((window - 1 + k) / B) + 1, with k the speculative lookahead (0
without speculation): a speculating step writes up to k positions past the accepted sequence,
and when its draft is rejected the ring has already moved on by up to k positions; k more
slots keep every key inside the accepted sequence's window from being overwritten. A prefill
chunk does read the blocks its growth replaces (its first queries see up to a window before
the chunk): those are kept, with the table as it was before the growth (`context`), until the
step is done (`commit`). Blocks overwritten in place are read before the chunk stores into
them (attention runs before the store in a prefill).

A prefill chunk longer than the ring cannot keep its early positions in the ring; their
local-layer K/V are written only if there is room for transient blocks (prompt blocks, so that
they can be cached for later requests), which go back to the pool when the step is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from gemma_serve.server.engine.block_pool import BlockKey
from gemma_serve.server.engine.block_table import (
    UNBOUNDED,
    Allocation,
    BlockTable,
    Cover,
    Growth,
    cdiv,
)


def ring_size(window: int, block_size: int, lookahead: int = 0) -> int:
    """Blocks in a sliding-window ring (see the module docstring); lookahead: the most
    positions a step writes past the accepted sequence (speculative decoding's k)."""
    return cdiv(window - 1 + lookahead, block_size) + 1


class Replaced(Enum):
    """The fate of the block whose ring slot a new block index takes over."""

    IN_PLACE = "in place"  # overwritten: this request's alone, not kept as a cached prefix
    KEPT = "kept"  # the slot gets a fresh block; the old one is read this step, then released
    FREED = "freed"  # the slot gets a fresh block; the old one is released now


class RingTable(BlockTable):
    """At most ring_blocks blocks per request: the last ones its window can see."""

    def __init__(self, pool_blocks: int, block_size: int, ring_blocks: int) -> None:
        super().__init__(pool_blocks, block_size)
        self.ring_blocks = ring_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return min(cdiv(num_tokens, self.block_size), self.ring_blocks)

    def max_tokens(self) -> int:
        """A pool that holds one whole ring never limits a sequence's length."""
        n = self.pool.num_blocks
        return n * self.block_size if n < self.ring_blocks else UNBOUNDED

    def _new_indices(self, alloc: Allocation, num_tokens: int) -> range:
        """The new block indices that cover num_tokens: at most the last R."""
        n = cdiv(num_tokens, self.block_size)
        return range(max(alloc.extent, n - self.ring_blocks), n)

    def _replacements(
        self, alloc: Allocation, new: range, cover: Cover
    ) -> list[tuple[int, int, Replaced]]:
        """(slot, old block, its fate) for each ring slot a new index takes over."""
        r, b, start = self.ring_blocks, self.block_size, cover.context_from
        first_context = None if start is None else start // b - r + 1
        out = []
        for i in new:
            j = i % r
            if j >= len(alloc.table):
                continue
            old = alloc.table[j]
            shared = self.pool.refcount(old) > 1
            if not shared and (cover.growth is Growth.MINIMAL or not self.pool.is_registered(old)):
                out.append((j, old, Replaced.IN_PLACE))
            elif first_context is not None and i - r >= first_context:
                out.append((j, old, Replaced.KEPT))
            else:
                out.append((j, old, Replaced.FREED))
        return out

    def missing(self, request_id: str, cover: Cover) -> int:
        alloc = self._alloc(request_id)
        new = self._new_indices(alloc, cover.num_tokens)
        fates = self._replacements(alloc, new, cover)
        in_place = sum(f is Replaced.IN_PLACE for _, _, f in fates)
        freed = sum(f is Replaced.FREED and self.pool.refcount(old) == 1 for _, old, f in fates)
        return len(new) - in_place - freed

    def grow(self, request_id: str, cover: Cover) -> None:
        """Blocks kept as context stay held until `commit`. Block indices below
        cover.transient_below that the ring skips get transient blocks for the step, as long
        as the pool keeps room for another ring."""
        self.commit(request_id)
        alloc = self._alloc(request_id)
        new = self._new_indices(alloc, cover.num_tokens)
        if not new:
            return
        self._allocs[request_id] = alloc
        skipped = range(alloc.extent, min(new.start, cover.transient_below))
        fates = self._replacements(alloc, new, cover)
        kept = [old for _, old, f in fates if f is Replaced.KEPT]
        if kept:
            alloc.kept, alloc.context = kept, list(alloc.table)
        self.pool.free([old for _, old, f in fates if f is Replaced.FREED])
        in_place = set()
        for j, old, f in fates:
            if f is Replaced.IN_PLACE:
                self.pool.forget(old)  # its contents are about to change
                in_place.add(j)
        fresh = iter(self.pool.allocate(len(new) - len(in_place)))
        alloc.table.extend([-1] * (len(new) - len(fates)))  # the slots no block held yet
        for i in new:
            if i % self.ring_blocks not in in_place:
                alloc.table[i % self.ring_blocks] = next(fresh)
        alloc.extent = new.stop
        if skipped and self.pool.num_free >= len(skipped) + self.ring_blocks:
            alloc.transient = dict(zip(skipped, self.pool.allocate(len(skipped)), strict=True))

    def _held(self, alloc: Allocation, index: int) -> int | None:
        """The block of a covered block index: the ring's last R, else a transient one."""
        if index >= alloc.extent - self.ring_blocks:
            return alloc.table[index % self.ring_blocks]
        return alloc.transient.get(index)

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """-1 for the early positions of a chunk longer than the ring that got no transient
        block."""
        alloc, b = self._allocs[request_id], self.block_size
        out: list[int] = []
        for index in range(start // b, -(-end // b)):  # one lookup per block, not per position
            lo, hi = max(start, index * b) - index * b, min(end, (index + 1) * b) - index * b
            block = self._held(alloc, index)
            out.extend(
                range(block * b + lo, block * b + hi) if block is not None else [-1] * (hi - lo)
            )
        return out

    def block_at(self, request_id: str, index: int) -> int | None:
        alloc = self._alloc(request_id)
        return self._held(alloc, index) if 0 <= index < alloc.extent else None

    def cached_run(self, keys: Sequence[BlockKey], k: int) -> int:
        """Only the last min(j, R) blocks must be cached: all a query after them can see."""
        found = [self.pool.lookup(key) is not None for key in keys[:k]]
        while k and not all(found[max(0, k - self.ring_blocks) : k]):
            k -= 1
        return k

    def _slot(self, index: int) -> int:
        return index % self.ring_blocks

    def _tail_first(self, alloc: Allocation) -> list[int]:
        r, table = self.ring_blocks, alloc.table
        by_index = sorted(range(len(table)), key=lambda j: (j - alloc.extent) % r)
        return [table[j] for j in reversed(by_index)]
