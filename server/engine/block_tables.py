"""Per-request block tables over one pool: paged (global layers) or rings (sliding-window
layers), torch-free.

A paged table holds block index i at table[i] and grows with the sequence. A ring holds it at
table[i % R], so a request never holds more than R blocks however long it runs. Rings grow
lazily (a short request holds only the blocks it fills); once full, each new block index takes
over the slot of the oldest one. That block is overwritten in place when it is this request's
alone and holds no cached prefix (or the pool has no room to spare); otherwise (shared with
another request, or a cached prefix worth keeping) the slot gets a fresh block and the old one
is released whole. So that a decode never needs the block it releases, R = ceil((window - 1) /
B) + 1. A prefill chunk does read the blocks its growth replaces (its first queries see up to a
window before the chunk): those are kept, with the table as it was before the growth
(`context_table`), until the step is done (`commit`). Blocks overwritten in place are read
before the chunk stores into them (attention runs before the store in a prefill).

A prefill chunk longer than the ring cannot keep its early positions in the ring; their
local-layer K/V are written only if there is room for transient blocks (prompt blocks, so that
they can be cached for later requests), which go back to the pool when the step is done.
"""

from __future__ import annotations

from gemma_serve.server.engine.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ring_size(window: int, block_size: int) -> int:
    """Blocks in a sliding-window ring (see the module docstring)."""
    return cdiv(window - 1, block_size) + 1


class BlockTables:
    """Per-request block lists over one pool; ring_blocks 0 means unbounded (paged).

    A paged table holds block index i at table[i]; a ring holds it at table[i % ring_blocks].
    """

    def __init__(self, pool_blocks: int, block_size: int, ring_blocks: int) -> None:
        self.pool = BlockPool(pool_blocks)
        self.block_size = block_size
        self.ring_blocks = ring_blocks
        self._tables: dict[str, list[int]] = {}
        self._extent: dict[str, int] = {}  # block indices covered so far (the highest + 1)
        # request -> (its table before this step's growth, the blocks that growth replaced)
        self._pending: dict[str, tuple[list[int], list[int]]] = {}
        # request -> {block index: block} written this step but outside the ring
        self._transient: dict[str, dict[int, int]] = {}

    def _slot(self, index: int) -> int:
        """Where block index `index` sits in a table."""
        return index % self.ring_blocks if self.ring_blocks else index

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens tokens holds in this pool."""
        n = cdiv(num_tokens, self.block_size)
        return min(n, self.ring_blocks) if self.ring_blocks else n

    def _plan(self, request_id: str, num_tokens: int) -> range:
        """The new block indices that cover num_tokens (a ring: at most its last R)."""
        n, extent = cdiv(num_tokens, self.block_size), self._extent.get(request_id, 0)
        if n <= extent:
            return range(0)
        return range(max(extent, n - self.ring_blocks) if self.ring_blocks else extent, n)

    def _replacements(
        self, request_id: str, new: range, context_from: int | None, minimal: bool
    ) -> list[tuple[int, int, str]]:
        """(slot, old block, fate) for each ring slot a new index takes over. The fate of the
        old block: "inplace" (overwritten: it is this request's alone; minimal, or not a
        cached prefix), else it is copied on write and "keep" (read as context this step) or
        "free" (released now)."""
        if not self.ring_blocks:
            return []
        table, r, b = self._tables.get(request_id, []), self.ring_blocks, self.block_size
        first_context = None if context_from is None else context_from // b - r + 1
        out = []
        for i in new:
            j = i % r
            if j >= len(table):
                continue
            old = table[j]
            shared = self.pool.refcount(old) > 1
            if not shared and (minimal or not self.pool.is_registered(old)):
                out.append((j, old, "inplace"))
            elif first_context is not None and i - r >= first_context:
                out.append((j, old, "keep"))
            else:
                out.append((j, old, "free"))
        return out

    def missing(
        self,
        request_id: str,
        num_tokens: int,
        context_from: int | None = None,
        minimal: bool = False,
    ) -> int:
        """Free blocks needed to cover num_tokens. context_from: the first position of the
        prefill chunk that runs (None for a decode); minimal: overwrite every block that is
        this request's alone instead of keeping cached prefixes (needs the fewest blocks)."""
        new = self._plan(request_id, num_tokens)
        fates = self._replacements(request_id, new, context_from, minimal)
        inplace = sum(f == "inplace" for _, _, f in fates)
        freed = sum(f == "free" and self.pool.refcount(old) == 1 for _, old, f in fates)
        return len(new) - inplace - freed

    def grow(
        self,
        request_id: str,
        num_tokens: int,
        context_from: int | None = None,
        minimal: bool = False,
        transient_below: int = 0,
    ) -> None:
        """Cover num_tokens (see `missing` for the arguments). Blocks kept as context stay
        held until `commit`. Block indices below transient_below that a ring skips get
        transient blocks for the step, as long as the pool keeps room for another ring."""
        self.commit(request_id)
        new = self._plan(request_id, num_tokens)
        if not new:
            return
        skipped = range(self._extent.get(request_id, 0), min(new.start, transient_below))
        fates = self._replacements(request_id, new, context_from, minimal)
        table = self._tables.setdefault(request_id, [])
        kept = [old for _, old, f in fates if f == "keep"]
        if kept:
            self._pending[request_id] = (list(table), kept)
        self.pool.free([old for _, old, f in fates if f == "free"])
        for _, old, f in fates:
            if f == "inplace":
                self.pool.forget(old)  # its contents are about to change
        inplace = {j for j, _, f in fates if f == "inplace"}
        fresh = iter(self.pool.allocate(len(new) - len(inplace)))
        table.extend([-1] * (len(new) - len(fates)))  # the slots no block held yet
        for i in new:
            if self._slot(i) not in inplace:
                table[self._slot(i)] = next(fresh)
        self._extent[request_id] = new.stop
        if skipped and self.pool.num_free >= len(skipped) + self.ring_blocks:
            self._transient[request_id] = dict(
                zip(skipped, self.pool.allocate(len(skipped)), strict=True)
            )

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 (-1: not kept, e.g. early positions of a
        chunk longer than the ring, or a pool that the model does not use)."""
        b, r = self.block_size, self.ring_blocks
        if not self.pool.num_blocks:
            return [-1] * (end - start)
        table = self._tables[request_id]
        if not r:
            return [table[p // b] * b + p % b for p in range(start, end)]
        held_from = self._extent[request_id] - r  # the first block index the ring holds
        transient = self._transient.get(request_id, {})
        out = []
        for p in range(start, end):
            i = p // b
            block = table[i % r] if i >= held_from else transient.get(i, -1)
            out.append(block * b + p % b if block >= 0 else -1)
        return out

    def adopt(self, request_id: str, blocks: dict[int, int]) -> None:
        """Start a request's table from cached blocks {block index: block}, the indices
        0..k-1 (paged) or the last min(k, R) of them (ring); each gets one more holder."""
        k = max(blocks) + 1
        table = [-1] * (min(k, self.ring_blocks) if self.ring_blocks else k)
        for i, b in blocks.items():
            self.pool.share(b)
            table[self._slot(i)] = b
        self._tables[request_id] = table
        self._extent[request_id] = k

    def block_at(self, request_id: str, index: int) -> int | None:
        """The block holding block index `index`, if the table still holds it."""
        table, extent = self._tables.get(request_id, []), self._extent.get(request_id, 0)
        if not 0 <= index < extent:
            return None
        if not self.ring_blocks:
            return table[index]
        if index >= extent - self.ring_blocks:
            return table[index % self.ring_blocks]
        return self._transient.get(request_id, {}).get(index)

    def commit(self, request_id: str) -> None:
        """The step is done: release the blocks its growth replaced."""
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self.pool.free(pending[1])
        transient = self._transient.pop(request_id, None)
        if transient:
            self.pool.free(list(transient.values()))

    def free(self, request_id: str) -> None:
        """Release the request's blocks, its last block index first: freed blocks are reused
        least recently freed first, so a cached prefix loses its tail before its head."""
        self.commit(request_id)
        table, extent = self._tables.pop(request_id, []), self._extent.pop(request_id, 0)
        r = self.ring_blocks
        by_index = sorted(range(len(table)), key=lambda j: (j - extent) % r if r else j)
        self.pool.free([table[j] for j in reversed(by_index)])

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def context_table(self, request_id: str) -> list[int]:
        """The table through which this step's prefill reads its cached context."""
        pending = self._pending.get(request_id)
        return pending[0] if pending is not None else self.table(request_id)

    def owners(self) -> dict[str, list[int]]:
        """Blocks each request holds (its table, and blocks kept for the step)."""
        return {
            k: v + self._pending.get(k, ((), []))[1] + list(self._transient.get(k, {}).values())
            for k, v in self._tables.items()
        }
