"""KV block bookkeeping for Gemma's two attention types (torch-free).

Global (full-attention) layers use a paged table that grows with the sequence. Sliding-window
layers use a ring of at most R blocks per request: position p lives in block ring[(p // B) % R],
so a request never holds more than R blocks there however long it runs. Rings grow lazily (a
short request holds only the blocks it fills); once full, each new block index takes over the
slot of the oldest one. That block is overwritten in place when it is this request's alone and
holds no cached prefix (or the pool has no room to spare); otherwise (shared with another
request, or a cached prefix worth keeping) the slot gets a fresh block and the old one is
released whole. So that a decode never needs the block it releases, R = ceil((window - 1) / B)
+ 1. A prefill chunk does read the blocks its growth replaces (its first queries see up to a
window before the chunk): those are kept, with the table as it was before the growth
(`context_table`), until the step is done (`commit`). Blocks overwritten in place are read
before the chunk stores into them (attention runs before the store in a prefill). Each type
has its own BlockPool; a request's allocation succeeds in both pools or in neither.

A prefill chunk longer than the ring cannot keep its early positions in the ring; their
local-layer K/V are written only if there is room for transient blocks (prompt blocks, so that
they can be cached for later requests), which go back to the pool when the step is done.

Prefix caching: every full block of a prompt, once computed, is registered in its pool under a
key that chains the tokens of all blocks before it. A new request starts from the longest run
of cached prompt blocks (global blocks from the first one on; local blocks only for the last R
of them, all a query after the prefix can see), sharing those blocks instead of recomputing.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.block_pool import BlockKey, BlockPool


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
            j = i % self.ring_blocks if self.ring_blocks else i
            if j not in inplace:
                table[j] = next(fresh)
        self._extent[request_id] = new.stop
        if skipped and self.pool.num_free >= len(skipped) + self.ring_blocks:
            self._transient[request_id] = dict(zip(skipped, self.pool.allocate(len(skipped))))

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
            table[i % self.ring_blocks if self.ring_blocks else i] = b
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
        self.pool.free(list(self._transient.pop(request_id, {}).values()))

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


@dataclass
class _PrefixState:
    """A request's full prompt blocks: their keys, and how far they are registered."""

    keys: list[BlockKey]
    reusable: int  # blocks a hit may cover: the last prompt token is always computed
    registered: int = 0  # blocks 0..registered-1 are registered (or were found cached)


@dataclass(frozen=True)
class KVUsage:
    global_ratio: float
    local_ratio: float


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks a new request can start from: its first num_tokens tokens."""

    num_tokens: int
    global_blocks: dict[int, int]  # block index -> block
    local_blocks: dict[int, int]

    @classmethod
    def none(cls) -> PrefixHit:
        return cls(0, {}, {})


class KVCacheManager:
    """Both pools behind one interface: grow a request to n tokens, free it, report usage."""

    def __init__(
        self,
        num_global_blocks: int,
        num_local_blocks: int,
        block_size: int,
        window: int,
        has_global: bool = True,
        has_local: bool = True,
        prefix_caching: bool = False,
    ) -> None:
        self.block_size = block_size
        self.ring_blocks = ring_size(window, block_size)
        self.has_global, self.has_local = has_global, has_local
        self.prefix_caching = prefix_caching
        self.global_tables = BlockTables(num_global_blocks if has_global else 0, block_size, 0)
        self.local_tables = BlockTables(
            num_local_blocks if has_local else 0, block_size, self.ring_blocks
        )
        self._prefix: dict[str, _PrefixState] = {}
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache, in all

    def _pools(self) -> list[BlockTables]:
        pools = []
        if self.has_global:
            pools.append(self.global_tables)
        if self.has_local:
            pools.append(self.local_tables)
        return pools

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens fits in the empty cache at all."""
        return all(t.blocks_for(num_tokens) <= t.pool.num_blocks for t in self._pools())

    def max_tokens_that_fit(self) -> int:
        """The longest sequence the empty cache can hold: the global pool's tokens, and the local
        pool's only when it cannot hold one whole ring (a full ring never limits it)."""
        limits = [self.global_tables.pool.num_blocks * self.block_size] if self.has_global else []
        local = self.local_tables.pool.num_blocks
        if self.has_local and local < self.local_tables.ring_blocks:  # not even one whole ring
            limits.append(local * self.block_size)
        return min(limits) if limits else 1 << 62

    def try_grow(self, request_id: str, num_tokens: int, context_from: int | None = None) -> bool:
        """Make room for the request's first num_tokens tokens in both pools, or change nothing.

        context_from: the first position of a prefill chunk (None for a decode). Ring blocks
        that are cached prefixes are replaced by fresh ones when the pool has room, else
        overwritten in place (only blocks shared with another request must be replaced).
        """
        pools = self._pools()
        for minimal in (False, True):
            if all(
                t.missing(request_id, num_tokens, context_from, minimal) <= t.pool.num_free
                for t in pools
            ):
                state = self._prefix.get(request_id)
                cacheable = len(state.keys) if state is not None else 0  # full prompt blocks
                for t in pools:
                    t.grow(request_id, num_tokens, context_from, minimal, cacheable)
                return True
        return False

    def commit(self, request_id: str) -> None:
        """The request's step is done: release what its prefill kept for reading."""
        for t in self._pools():
            t.commit(request_id)

    def try_admit(
        self, request_id: str, prompt_ids: list[int], num_tokens: int, budget: int, reuse: bool
    ) -> tuple[int, int] | None:
        """Admit a new (or preempted) request of num_tokens known tokens with at most `budget`
        of them this step: (first position to compute, how many), or None if it does not fit.

        With prefix caching (and `reuse`), the longest cached run of its prompt's blocks is
        shared rather than recomputed; at least the last prompt token is always computed.
        """
        if self.prefix_caching:
            b = self.block_size
            keys = BlockKey.chain(prompt_ids, b, len(prompt_ids) // b)
            self._prefix[request_id] = _PrefixState(keys, (len(prompt_ids) - 1) // b)
        hit = self._lookup(request_id) if self.prefix_caching and reuse else PrefixHit.none()
        start = hit.num_tokens
        n = min(num_tokens - start, budget)
        if hit.num_tokens:
            self.global_tables.adopt(request_id, hit.global_blocks)
            if self.has_local:
                self.local_tables.adopt(request_id, hit.local_blocks)
        if not self.try_grow(request_id, start + n, start if n > 1 else None):
            self.free(request_id)  # the shared blocks go back to the cache
            return None
        if hit.num_tokens:
            self._prefix[request_id].registered = hit.num_tokens // self.block_size
            self.num_cached_tokens += hit.num_tokens
        return start, n

    def _lookup(self, request_id: str) -> PrefixHit:
        """The longest run of cached prompt blocks that leaves the last prompt token to compute:
        global blocks 0..k-1 and local blocks k-R..k-1, all cached."""
        state = self._prefix[request_id]
        usable = state.keys[: state.reusable]
        found_global: list[int] = []
        for key in usable if self.has_global else ():
            block = self.global_tables.pool.lookup(key)
            if block is None:
                break
            found_global.append(block)
        k = len(found_global) if self.has_global else len(usable)
        local = [self.local_tables.pool.lookup(key) for key in usable[:k]] if self.has_local else []
        # the longest k whose last min(k, R) local blocks are all cached
        while self.has_local and k and None in local[max(0, k - self.ring_blocks) : k]:
            k -= 1
        if not k:
            return PrefixHit.none()
        start = max(0, k - self.ring_blocks)
        return PrefixHit(
            k * self.block_size,
            {i: found_global[i] for i in range(k)} if self.has_global else {},
            {i: local[i] for i in range(start, k)} if self.has_local else {},  # type: ignore[misc]
        )

    def computed(self, request_id: str, end: int, num_prompt_tokens: int) -> None:
        """Positions up to end-1 now have their K/V: register the prompt blocks completed."""
        state = self._prefix.get(request_id)
        if state is None:
            return
        full = min(end, num_prompt_tokens) // self.block_size
        for i in range(state.registered, full):
            key = state.keys[i]
            if self.has_global:
                self.global_tables.pool.register(self.global_tables.block_at(request_id, i), key)
            # A ring still holds block i only if no write of its positions was skipped (a
            # chunk longer than the ring skips its first positions, whose blocks it released).
            block = self.local_tables.block_at(request_id, i) if self.has_local else None
            if block is not None:
                self.local_tables.pool.register(block, key)
        state.registered = max(state.registered, full)

    def free(self, request_id: str) -> None:
        for t in self._pools():
            t.free(request_id)
        self._prefix.pop(request_id, None)

    def usage(self) -> KVUsage:
        return KVUsage(self.global_tables.pool.usage, self.local_tables.pool.usage)

    def block_table(self, request_id: str) -> list[int]:
        return self.global_tables.table(request_id)

    def ring_table(self, request_id: str) -> list[int]:
        return self.local_tables.table(request_id)
