"""Paged block tables for full-attention (global) layers, torch-free.

Block index i sits at table[i]; a table grows with its sequence and never gives a block back
before the request ends, so prefix caching needs nothing more than sharing the first blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from gemma_serve.server.engine.block_pool import BlockKey
from gemma_serve.server.engine.block_table import Allocation, BlockTable, Cover, cdiv


class PagedTable(BlockTable):
    """One block per block_size tokens, for the whole sequence."""

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def max_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def _new_indices(self, alloc: Allocation, num_tokens: int) -> range:
        return range(alloc.extent, cdiv(num_tokens, self.block_size))

    def missing(self, request_id: str, cover: Cover) -> int:
        return len(self._new_indices(self._alloc(request_id), cover.num_tokens))

    def grow(self, request_id: str, cover: Cover) -> None:
        """Append fresh blocks (a paged table holds every index: nothing is transient)."""
        new = self._new_indices(self._alloc(request_id), cover.num_tokens)
        if not new:
            return
        alloc = self._allocs.setdefault(request_id, Allocation())
        alloc.table.extend(self.pool.allocate(len(new)))
        alloc.extent = new.stop

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        table, b = self._allocs[request_id].table, self.block_size
        out: list[int] = []
        for index in range(start // b, -(-end // b)):  # one lookup per block, not per position
            base = table[index] * b
            out.extend(range(base + max(start - index * b, 0), base + min(end - index * b, b)))
        return out

    def block_at(self, request_id: str, index: int) -> int | None:
        alloc = self._alloc(request_id)
        return alloc.table[index] if 0 <= index < alloc.extent else None

    def cached_run(self, keys: Sequence[BlockKey], k: int) -> int:
        """Every block from the first one on must be cached."""
        for j in range(k):
            if self.pool.lookup(keys[j]) is None:
                return j
        return k

    def _slot(self, index: int) -> int:
        return index

    def _tail_first(self, alloc: Allocation) -> list[int]:
        return alloc.table[::-1]
