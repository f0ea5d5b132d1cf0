"""One pool's per-request block tables: the interface the KV manager drives, and what its two
kinds (`paged_table.PagedTable`, `ring_table.RingTable`) share. Torch-free.

A table maps a request's block indices (position p is in block index p // block_size) to
blocks of its pool. The KV manager sees only this interface: `missing` / `grow` to cover more
tokens, `slots` and `batch_inputs` for a step, `commit` when the step is done, `free`, and for
prefix caching `cached_run` / `adopt` / `register`; it never asks which kind a table is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from gemma_serve.server.engine.block_pool import BlockKey, BlockPool

UNBOUNDED = 1 << 62  # a token count no pool limits


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PoolKind(Enum):
    """The attention type a pool serves (also its metrics label)."""

    GLOBAL = "global"  # full-attention layers: paged tables
    LOCAL = "local"  # sliding-window layers: rings


class Growth(Enum):
    """How a table makes room for new block indices, in the order the KV manager tries them.

    Only a ring tells them apart: when a new index takes over the slot of an old block that is
    the request's alone, KEEP_CACHED still copies it on write if it is a cached prefix (so that
    it stays findable), MINIMAL overwrites it in place (the fewest fresh blocks, for when the
    pool has no room for the copies).
    """

    KEEP_CACHED = "keep cached"
    MINIMAL = "minimal"


@dataclass(frozen=True)
class Cover:
    """What a step asks of a request's table: hold its first num_tokens tokens."""

    num_tokens: int
    context_from: int | None = None  # the first position of the prefill chunk (None: a decode)
    growth: Growth = Growth.KEEP_CACHED
    # Block indices below this that the table cannot hold may get transient blocks for the step
    # (prompt blocks, so that they can be cached).
    transient_below: int = 0


@dataclass
class Allocation:
    """A request's blocks in one pool."""

    table: list[int] = field(default_factory=list)  # the block of each table slot
    extent: int = 0  # block indices covered so far (the highest + 1)
    # Blocks this step's growth replaced but its prefill still reads, with the table as it was
    # before the growth (the one the prefill reads through); released by `commit`.
    kept: list[int] = field(default_factory=list)
    context: list[int] | None = None
    # block index -> block written this step outside the ring (prompt blocks worth caching)
    transient: dict[int, int] = field(default_factory=dict)

    def held(self) -> list[int]:
        return self.table + self.kept + list(self.transient.values())


@dataclass(frozen=True)
class PoolInputs:
    """One pool's addressing for a step, host-side (the runner makes the tensors)."""

    slots: list[int]  # the cache slot of each token of the step; -1 = do not store
    rows: list[list[int]]  # each chunk's block table, unpadded, in the step's chunk order
    block_size: int
    ring_blocks: int  # the kernels' layout argument: 0 = paged


class BlockTable(ABC):
    """Per-request block tables over one BlockPool."""

    ring_blocks = 0  # the kernels' layout argument (a ring overrides it)

    def __init__(self, pool_blocks: int, block_size: int) -> None:
        self.pool = BlockPool(pool_blocks)
        self.block_size = block_size
        self._allocs: dict[str, Allocation] = {}

    @abstractmethod
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens tokens holds in this pool."""

    @abstractmethod
    def max_tokens(self) -> int:
        """The longest sequence the empty pool can hold (UNBOUNDED: any)."""

    @abstractmethod
    def missing(self, request_id: str, cover: Cover) -> int:
        """Free blocks the pool needs to grow the request's table to `cover`."""

    @abstractmethod
    def grow(self, request_id: str, cover: Cover) -> None:
        """Grow the request's table to `cover` (the caller checked `missing` first)."""

    @abstractmethod
    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 (-1: not kept)."""

    @abstractmethod
    def block_at(self, request_id: str, index: int) -> int | None:
        """The block holding block index `index`, if the table still holds it."""

    @abstractmethod
    def cached_run(self, keys: Sequence[BlockKey], k: int) -> int:
        """The largest j <= k such that a request whose first j prompt blocks are cached
        (keys[:j]) can start from this pool's cache."""

    @abstractmethod
    def _slot(self, index: int) -> int:
        """Where block index `index` sits in a table."""

    @abstractmethod
    def _tail_first(self, alloc: Allocation) -> list[int]:
        """The table's blocks, the last block index first."""

    def _alloc(self, request_id: str) -> Allocation:
        """The request's allocation, or an empty one (not stored)."""
        return self._allocs.get(request_id) or Allocation()

    def adopt(self, request_id: str, keys: Sequence[BlockKey], k: int) -> None:
        """Start the request's table from the cached blocks of its first k prompt blocks (the
        ones this pool holds for k blocks: see `blocks_for`); each gets one more holder."""
        held = self.blocks_for(k * self.block_size)
        table = [-1] * held
        for i in range(k - held, k):
            block = self.pool.lookup(keys[i])
            assert block is not None, "cached_run vouched for every block adopted"
            self.pool.share(block)
            table[self._slot(i)] = block
        self._allocs[request_id] = Allocation(table, k)

    def register(self, request_id: str, index: int, key: BlockKey) -> None:
        """Make block index `index` findable under `key`, if the table still holds it."""
        block = self.block_at(request_id, index)
        if block is not None:
            self.pool.register(block, key)

    def commit(self, request_id: str) -> None:
        """The step is done: release the blocks its growth replaced and its transient ones."""
        alloc = self._allocs.get(request_id)
        if alloc is None:
            return
        if alloc.kept:
            self.pool.free(alloc.kept)
            alloc.kept, alloc.context = [], None
        if alloc.transient:
            self.pool.free(list(alloc.transient.values()))
            alloc.transient = {}

    def free(self, request_id: str) -> None:
        """Release the request's blocks, its last block index first: freed blocks are reused
        least recently freed first, so a cached prefix loses its tail before its head."""
        self.commit(request_id)
        alloc = self._allocs.pop(request_id, None)
        if alloc is not None:
            self.pool.free(self._tail_first(alloc))

    def table(self, request_id: str) -> list[int]:
        return self._alloc(request_id).table

    def context(self, request_id: str) -> list[int]:
        """The table this step reads its cached context through: as it was before the step's
        growth while the blocks that growth replaced are kept (a prefill), else the table."""
        alloc = self._alloc(request_id)
        return alloc.context if alloc.context is not None else alloc.table

    def owners(self) -> dict[str, list[int]]:
        """Blocks each request holds (its table, and blocks kept for the step)."""
        return {rid: alloc.held() for rid, alloc in self._allocs.items()}

    def batch_inputs(self, spans: Sequence[tuple[str, int, int]]) -> PoolInputs:
        """Slots and block-table rows for a step's chunks, (request id, start, end) each."""
        slots: list[int] = []
        rows: list[list[int]] = []
        for rid, start, end in spans:
            rows.append(self.context(rid))
            slots.extend(self.slots(rid, start, end))
        return PoolInputs(slots, rows, self.block_size, self.ring_blocks)
