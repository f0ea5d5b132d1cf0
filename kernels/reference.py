"""Pure-torch reference attention ops: the contract every Triton kernel matches.

These are what the engine runs on CPU, so they are written to be reasonably fast there
(batched decode, no per-token Python loops), but clarity comes first.

KV cache layout (one tensor pair per layer and pool):
    k_cache, v_cache: [num_slots, num_kv_heads, head_dim], num_slots = num_blocks * block_size.
A sequence's token at position p lives in slot
    block_tables[s, b] * block_size + p % block_size,  b = p // block_size            (paged)
    b = (p // block_size) % ring_blocks                                                 (ring)
`ring_blocks == 0` selects the paged layout (global layers); a positive value is the number of
blocks in each request's ring (sliding-window layers).

Attention semantics (Gemma 2, as in the reference implementation):
    s = (q . k) * scale;  s = softcap * tanh(s / softcap) when softcap is set;
    a query at position i sees keys at positions j with 0 <= i - j < window (window None: j <= i);
    softmax in fp32; the result is cast back to q's dtype.

Precision: fp32 throughout, except over a bfloat16 cache without a soft-cap, where q, k and v
are rounded to bfloat16 and torch's fused SDPA runs in it (fp32 softmax and accumulation
inside, probabilities and the output rounded to bfloat16): widening every gathered key and
value to fp32 first is a second pass over them, and on CPUs the gathers are what a large
decode batch spends its attention time on (RESULTS.md). The Triton kernels compute such a
cache in fp32; they match this within bfloat16's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k, v [T, Hkv, D] into the caches at slot_mapping [T]; a negative slot is skipped."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v.to(v_cache.dtype))


def slots_for_positions(
    positions: torch.Tensor, block_table: torch.Tensor, block_size: int, ring_blocks: int
) -> torch.Tensor:
    """Cache slots of `positions` (any shape) for one block table row (or a broadcastable batch)."""
    blk = torch.div(positions, block_size, rounding_mode="floor")
    if ring_blocks > 0:
        blk = blk % ring_blocks
    block_ids = torch.gather(block_table, -1, blk.long())
    return block_ids.long() * block_size + positions % block_size


def compute_dtype(cache_dtype: torch.dtype, softcap: float | None) -> torch.dtype:
    """The dtype attention runs in over a cache of cache_dtype (module docstring)."""
    if cache_dtype == torch.bfloat16 and (softcap is None or softcap <= 0):
        return torch.bfloat16
    return torch.float32


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache rows at slots (any shape); index_select is several times faster than indexing."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None or softcap <= 0:
        return scores
    return torch.tanh(scores / softcap) * softcap


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q [..., Hq, n, D], k/v [..., Hkv, m, D], mask [..., n, m] (True = attend) -> [..., Hq, n, D].

    Query heads are grouped (GQA): head h uses KV head h // (Hq // Hkv). K/V are not copied.
    One query per sequence without a soft-cap (decoding Gemma 3) goes to torch's
    scaled_dot_product_attention in q's dtype (compute_dtype): one fused op on CPUs, half the
    time of the explicit form for one sequence. The explicit form below is the same
    computation spelled out in fp32, and what a soft-cap needs (uncapped prefill chunks go to
    SDPA in prefill_attention).
    """
    *batch, hq, n, d = q.shape
    hkv, m = k.shape[-3], k.shape[-2]
    group = hq // hkv
    qg = q.reshape(*batch, hkv, group * n, d)
    if n == 1 and (softcap is None or softcap <= 0):
        # Rows of qg are the group's query heads, all with the one query's mask row.
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.unsqueeze(-3), scale=scale)
        return out.reshape(*batch, hq, n, d)
    qg = qg.float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale
    scores = _softcap(scores, softcap).reshape(*batch, hkv, group, n, m)
    scores = scores.masked_fill(~mask.unsqueeze(-3).unsqueeze(-4), NEG_INF)
    probs = torch.softmax(scores, dim=-1).reshape(*batch, hkv, group * n, m)
    out = torch.matmul(probs, v.float())
    return out.reshape(*batch, hq, n, d)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor | None,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    *,
    block_size: int,
    ring_blocks: int,
    window: int | None,
    softcap: float | None,
    scale: float,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Causal attention for packed chunks, each also attending to its context in the cache.

    q [T, Hq, D]; k, v [T, Hkv, D]: the chunk's fresh keys/values (not yet in the cache).
    cu_seqlens [S+1]: chunk s holds rows cu_seqlens[s]:cu_seqlens[s+1].
    context_lens [S]: tokens of sequence s before its chunk, already in the cache (None: none);
    chunk row i of sequence s is at position context_lens[s] + i.
    For ring layouts the cache must still hold the window's context: callers store the chunk
    only after this call. max_seqlen, the longest chunk, spares a GPU kernel a device sync;
    this reference reads the lengths on the host anyway and ignores it.
    """
    del max_seqlen
    dtype = compute_dtype(k.dtype if k_cache is None else k_cache.dtype, softcap)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    ctx_list = context_lens.tolist() if context_lens is not None else [0] * (len(bounds) - 1)
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        n, ctx = end - start, ctx_list[s]
        if n == 0:
            continue
        first = 0 if window is None else max(0, ctx - window + 1)
        keys_k, keys_v = k[start:end].to(dtype), v[start:end].to(dtype)
        mask = None  # plainly causal: a fresh chunk that no window cuts
        if ctx > 0 or (window is not None and n > window):
            q_pos = key_pos = torch.arange(ctx, ctx + n, device=q.device)
            if ctx > first:
                assert k_cache is not None and v_cache is not None and block_tables is not None
                cpos = torch.arange(first, ctx, device=q.device)
                slots = slots_for_positions(cpos, block_tables[s], block_size, ring_blocks)
                keys_k = torch.cat([k_cache.index_select(0, slots).to(dtype), keys_k])
                keys_v = torch.cat([v_cache.index_select(0, slots).to(dtype), keys_v])
                key_pos = torch.cat([cpos, key_pos])
            diff = q_pos[:, None] - key_pos[None, :]
            mask = diff >= 0
            if window is not None:
                mask &= diff < window
        qs = q[start:end].transpose(0, 1).to(dtype)  # the keys are in dtype already
        ks, vs = keys_k.transpose(0, 1), keys_v.transpose(0, 1)
        if softcap and softcap > 0:
            o = _attend_capped(qs, ks, vs, mask, scale, softcap)
        else:
            o = _sdpa_tiles(qs, ks, vs, mask, scale, ctx - first, window)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


# Query rows per fused-SDPA call for a masked chunk (a window cuts it, or it has context).
PREFILL_TILE = 256


def _sdpa_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    offset: int,
    window: int | None,
) -> torch.Tensor:
    """torch's fused SDPA for one chunk: q [Hq, n, D]; k, v [Hkv, m, D], the keys of positions
    first .. first + m - 1 where query row i is at first + offset + i; mask [n, m] or None
    (plainly causal). GQA without copying K/V, the mask as booleans: 0.5-0.8x the time of the
    explicit form from 1,000 tokens on, and no [H, n, m] scores in memory (RESULTS.md).

    A masked chunk goes in tiles of PREFILL_TILE query rows, each against only the keys its
    rows can see (from the window's start for the tile's first row to its last row): the
    CPU kernel computes every block an explicit mask covers, so a 1,024-token chunk under a
    512-token window took the whole 1,024 x 1,024 (23.9 -> 15.3 ms in tiles; with 1,024
    tokens of context 36.2 -> 20.6, a global layer's 48.6 -> 43.2: RESULTS.md)."""
    if mask is None:
        return F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True
        )[0]
    n, tiles = q.shape[1], []
    for a in range(0, n, PREFILL_TILE):
        b = min(n, a + PREFILL_TILE)
        lo = 0 if window is None else max(0, offset + a - window + 1)
        hi = offset + b  # the tile's last row sees keys up to its own position
        tiles.append(
            F.scaled_dot_product_attention(
                q[None, :, a:b], k[None, :, lo:hi], v[None, :, lo:hi],
                attn_mask=mask[a:b, lo:hi], scale=scale, enable_gqa=True,
            )[0]
        )  # fmt: skip
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=1)


# The soft-capped form materialises the scores: query rows are taken in slices that keep
# them under this many elements (64 MiB of fp32) for long chunks and contexts.
SCORE_ELEMENTS = 1 << 24


def _attend_capped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """q [Hq, n, D], k/v [Hkv, m, D], mask [n, m] (None: causal, n == m) -> [Hq, n, D],
    explicitly (what a soft-cap needs), SCORE_ELEMENTS scores at a time."""
    hq, n, _ = q.shape
    m = k.shape[1]
    if mask is None:
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril_()
    rows = max(1, SCORE_ELEMENTS // (hq * m))
    if rows >= n:
        return _attend(q, k, v, mask, scale, softcap)
    return torch.cat(
        [
            _attend(q[:, i : i + rows], k, v, mask[i : i + rows], scale, softcap)
            for i in range(0, n, rows)
        ],
        dim=1,
    )


@dataclass(frozen=True)
class DecodeGroup:
    """Sequences of similar lengths attended together: which rows (None: all, in order), the
    cache slot of each key they see [S, M] (padded) and which of those are real [S, M]."""

    rows: torch.Tensor | None
    slots: torch.Tensor
    valid: torch.Tensor


def decode_plan(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    ring_blocks: int,
    window: int | None,
) -> list[DecodeGroup]:
    """Which keys each decoding sequence sees (decode_attention's arguments): the same for
    every layer of a pool, so a forward pass computes it once per pool (CacheAttention)."""
    lens = seq_lens.long()
    first = torch.clamp(lens - window, min=0) if window is not None else torch.zeros_like(lens)
    counts = lens - first
    if counts.numel() <= DECODE_GROUP:
        return [_group(None, block_tables, first, counts, block_size, ring_blocks)]
    return [
        _group(idx, block_tables[idx], first[idx], counts[idx], block_size, ring_blocks)
        for idx in torch.argsort(counts).split(DECODE_GROUP)
    ]


def _group(
    rows: torch.Tensor | None,
    block_tables: torch.Tensor,
    first: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    ring_blocks: int,
) -> DecodeGroup:
    """The keys of sequences seeing positions first .. first + counts - 1."""
    j = torch.arange(int(counts.max()), device=counts.device)
    valid = j[None, :] < counts[:, None]
    pos = torch.where(valid, first[:, None] + j[None, :], torch.zeros_like(j)[None, :])
    return DecodeGroup(rows, slots_for_positions(pos, block_tables, block_size, ring_blocks), valid)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    ring_blocks: int,
    window: int | None,
    softcap: float | None,
    scale: float,
    plan: list[DecodeGroup] | None = None,
) -> torch.Tensor:
    """One query per sequence over its cached keys (its own K/V already stored).

    q [S, Hq, D]; block_tables [S, max_blocks]; seq_lens [S]: the query of sequence s is at
    position seq_lens[s] - 1 and sees cached positions max(0, seq_lens[s] - window) ..
    seq_lens[s] - 1. Batched: sequences of similar lengths go together (a gather and two
    matmuls per group), so that padding to the longest one wastes little copying. `plan`,
    decode_plan of the same arguments, spares recomputing the key slots layer after layer.
    """
    if plan is None:
        plan = decode_plan(
            block_tables, seq_lens, block_size=block_size, ring_blocks=ring_blocks, window=window
        )
    if len(plan) == 1 and plan[0].rows is None:
        return _decode_group(q, k_cache, v_cache, plan[0], softcap, scale)
    out = torch.empty_like(q)
    for group in plan:
        assert group.rows is not None
        o = _decode_group(q[group.rows], k_cache, v_cache, group, softcap, scale)
        out.index_copy_(0, group.rows, o)
    return out


def row_slots(
    table: torch.Tensor,
    seq_len: int,
    *,
    block_size: int,
    ring_blocks: int,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys one decoding sequence sees, as row_decode takes them: (slots [M] int64, valid
    [M] bool), the decode token's own slot last. A window layer: always M = window slots,
    those before position 0 padding (valid False); otherwise M = seq_len, all valid."""
    if window is None:
        pos = torch.arange(seq_len, device=table.device)
    else:
        pos = torch.arange(seq_len - window, seq_len, device=table.device)
    valid = pos >= 0
    return slots_for_positions(pos.clamp_(min=0), table, block_size, ring_blocks), valid


def row_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    *,
    softcap: float | None,
    scale: float,
) -> torch.Tensor:
    """store_kv and decode_attention for one decoding sequence, over the keys of row_slots:
    no data-dependent branch and no host sync, so that compiled decoder layers
    (model/compiled_layers.py) run it inside their graph.

    q [1, Hq, D], k and v [1, Hkv, D] (the decode token's). Stores k and v at the last slot,
    then returns decode_attention's output [1, Hq, D] (the same keys and arithmetic, up to
    a window's padding: exact zeros in the softmax).
    """
    k_cache.index_copy_(0, slots[-1:], k.to(k_cache.dtype))
    v_cache.index_copy_(0, slots[-1:], v.to(v_cache.dtype))
    group = DecodeGroup(None, slots[None], valid[None])
    return _decode_group(q, k_cache, v_cache, group, softcap, scale)


# Sequences per decode group: padding within a group of similar lengths is small, and the
# per-group op overhead stays far below the copying it saves.
DECODE_GROUP = 16


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    softcap: float | None,
    scale: float,
) -> torch.Tensor:
    """decode_attention for one group of the plan."""
    dtype = compute_dtype(k_cache.dtype, softcap)
    keys_k = _gather(k_cache, group.slots).to(dtype).transpose(1, 2)  # [S, Hkv, M, D]
    keys_v = _gather(v_cache, group.slots).to(dtype).transpose(1, 2)
    qd = q.unsqueeze(2).to(dtype)
    o = _attend(qd, keys_k, keys_v, group.valid[:, None, :], scale, softcap)
    return o.squeeze(2).to(q.dtype)
