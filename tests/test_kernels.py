"""Triton kernels vs the torch references, under Triton's CPU interpreter (see conftest.py).

Sizes are tiny because the interpreter is slow; the interpreter configs use 32x16 tiles, so
lengths up to ~40 still cross several query and key tiles. Caches start as NaN: a kernel that
reads a slot the reference does not read (and fails to mask it) produces NaN.

With GEMMA_SERVE_TEST_GPU=1 (benchmarks/gpu.sh) the same tests run compiled, on CUDA tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gemma_serve.kernels import reference, triton_ops
from gemma_serve.kernels.decode_attention import launch_decode
from gemma_serve.kernels.prefill_attention import launch_prefill

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if os.environ.get("GEMMA_SERVE_TEST_GPU") else "cpu"
SCALE = 0.25  # 1/sqrt(16)
CAP = 50.0


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor a test makes lives on DEVICE (CUDA when the GPU run asks for it)."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("GEMMA_SERVE_TEST_GPU is set but torch sees no CUDA device")
    with torch.device(DEVICE):
        yield


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: atol 1e-4; bf16/fp16: relative 1e-2 of the output's magnitude."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    else:
        tol = 1e-2 * ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=1e-2)


def _qkv(n: int, hq: int, hkv: int, d: int, dtype: torch.dtype, spread: float = 6.0):
    """Random q, k, v; q and k scaled so raw scores (std ~ spread^2 * sqrt(d) * SCALE = 36)
    go well past the soft-cap of 50."""
    q = torch.randn(n, hq, d) * spread
    k = torch.randn(n, hkv, d) * spread
    v = torch.randn(n, hkv, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _cache(lens, hkv, d, block_size, ring_blocks, dtype):
    """Caches holding positions 0..len-1 of each sequence (written in order, so a ring wraps).

    Returns k_cache, v_cache, block_tables (shuffled block ids, padding -1)."""
    per_seq = [
        ring_blocks if ring_blocks else max(1, -(-n // block_size)) for n in lens
    ]  # fmt: skip
    ids = torch.randperm(sum(per_seq), dtype=torch.int32)
    tables = torch.full((len(lens), max(per_seq) + 1), -1, dtype=torch.int32)
    k_cache = torch.full((sum(per_seq) * block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    used = 0
    for s, (n, nb) in enumerate(zip(lens, per_seq, strict=True)):
        tables[s, :nb] = ids[used : used + nb]
        used += nb
        pos = torch.arange(n)
        slots = reference.slots_for_positions(pos, tables[s], block_size, ring_blocks)
        k, v = torch.randn(n, hkv, d) * 6.0, torch.randn(n, hkv, d)
        reference.store_kv(k.to(dtype), v.to(dtype), k_cache, v_cache, slots)
    return k_cache, v_cache, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_negative_slots(dtype):
    hkv, d, t = 3, 24, 9  # non-power-of-two heads and dim exercise the masks
    base = torch.randn(t, 2 * hkv, d).to(dtype)
    k, v = base[:, :hkv], base[:, hkv:]  # non-contiguous views, as sliced from a qkv buffer
    slots = torch.tensor([5, -1, 0, 17, -1, 3, 12, 8, 19], dtype=torch.int64)
    caches = [torch.randn(20, hkv, d).to(dtype) for _ in range(2)]
    expect = [c.clone() for c in caches]
    reference.store_kv(k, v, *expect, slots)
    triton_ops.store_kv(k, v, *caches, slots.to(torch.int32))
    assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 7])
def test_prefill_packed(group, window):
    lens, hkv, d = [1, 17, 40, 9], 2, 16
    q, k, v = _qkv(sum(lens), hkv * group, hkv, d, torch.float32)
    kw = dict(block_size=4, ring_blocks=0, window=window, softcap=CAP, scale=SCALE)
    args = (q, k, v, _cu(lens), None, None, None, None)
    ref = reference.prefill_attention(*args, **kw)
    _close(triton_ops.prefill_attention(*args, **kw), ref)
    # The host-known longest chunk sizes the grid as the device-side lengths do.
    _close(triton_ops.prefill_attention(*args, **kw, max_seqlen=max(lens)), ref)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", [None, 64, 8])
def test_prefill_uncapped_fresh_chunks(group, window):
    """No soft-cap and no cached context (the reference's fused causal path where no window
    cuts the chunk; the explicit one where the window of 8 does)."""
    lens, hkv, d = [1, 17, 40, 9], 2, 16
    q, k, v = _qkv(sum(lens), hkv * group, hkv, d, torch.float32)
    kw = dict(block_size=4, ring_blocks=0, window=window, softcap=None, scale=SCALE)
    args = (q, k, v, _cu(lens), None, None, None, None)
    _close(triton_ops.prefill_attention(*args, **kw), reference.prefill_attention(*args, **kw))


def test_prefill_softcap_matters_and_tile_shapes():
    lens, hkv, d = [33, 5], 2, 32
    q, k, v = _qkv(sum(lens), 4, hkv, d, torch.float32)
    args = (q, k, v, _cu(lens), None, None, None, None)
    kw = dict(block_size=4, ring_blocks=0, window=9, softcap=CAP, scale=SCALE)
    ref = reference.prefill_attention(*args, **kw)
    uncapped = reference.prefill_attention(*args, **{**kw, "softcap": None})
    assert (ref - uncapped).abs().max() > 1e-1  # >> 1e-4: the cap is really active
    for bm, bn in [(16, 16), (64, 16)]:  # square tiles, and BLOCK_M spanning several BLOCK_N
        out = launch_prefill(
            *args, **kw, block_m=bm, block_n=bn, num_warps=4, num_stages=1, upcast=True
        )
        _close(out, ref)
    out = triton_ops.prefill_attention(*args, **{**kw, "softcap": None})
    _close(out, uncapped)


@pytest.mark.parametrize("softcap", [CAP, None])
@pytest.mark.parametrize(
    "ring_blocks,window,group",
    [(0, None, 2), (0, 10, 4), (3, 10, 1), (3, 10, 2)],
)
def test_prefill_chunk_with_cached_context(ring_blocks, window, group, softcap):
    """Chunked prefill: context in the paged cache, or in a ring of 3x4 slots that has wrapped
    (contexts 23 and 30 > 12) while still holding the window's 9 previous positions (the
    uncapped case through the reference's masked SDPA)."""
    ctx, lens, hkv, d, bs = [0, 5, 23, 30], [7, 1, 12, 20], 2, 16, 4
    k_cache, v_cache, tables = _cache(ctx, hkv, d, bs, ring_blocks, torch.float32)
    q, k, v = _qkv(sum(lens), hkv * group, hkv, d, torch.float32)
    args = (q, k, v, _cu(lens), torch.tensor(ctx, dtype=torch.int32), k_cache, v_cache, tables)
    kw = dict(block_size=bs, ring_blocks=ring_blocks, window=window, softcap=softcap, scale=SCALE)
    _close(triton_ops.prefill_attention(*args, **kw), reference.prefill_attention(*args, **kw))


@pytest.mark.parametrize("window", [None, 10])
def test_reference_capped_prefill_in_row_slices(monkeypatch, window):
    """The soft-capped reference takes long chunks in slices of query rows (its scores
    bounded): the same result as in one piece, for fresh chunks and chunks with context."""
    ctx, lens, hkv, d, bs = [0, 23], [40, 30], 2, 16, 4
    k_cache, v_cache, tables = _cache(ctx, hkv, d, bs, 0, torch.float32)
    q, k, v = _qkv(sum(lens), 4, hkv, d, torch.float32)
    args = (q, k, v, _cu(lens), torch.tensor(ctx, dtype=torch.int32), k_cache, v_cache, tables)
    kw = dict(block_size=bs, ring_blocks=0, window=window, softcap=CAP, scale=SCALE)
    whole = reference.prefill_attention(*args, **kw)
    monkeypatch.setattr(reference, "SCORE_ELEMENTS", 4 * 53 * 7)  # 7 rows of 53 keys
    sliced = reference.prefill_attention(*args, **kw)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)
    _close(triton_ops.prefill_attention(*args, **kw), sliced)


@pytest.mark.parametrize(
    "ring_blocks,window", [(0, None), (0, 10), (3, 10), (0, 6)]
)  # fmt: skip
def test_reference_uncapped_prefill_in_query_tiles(monkeypatch, ring_blocks, window):
    """A masked uncapped chunk goes through the fused SDPA in tiles of query rows, each
    against the keys it can see: the same result as in one piece (fresh chunks longer than
    the window, chunks with paged or wrapped-ring context), and as the Triton kernel's."""
    ctx, lens, hkv, d, bs = [0, 5, 23, 30], [40, 1, 12, 33], 2, 16, 4
    k_cache, v_cache, tables = _cache(ctx, hkv, d, bs, ring_blocks, torch.float32)
    q, k, v = _qkv(sum(lens), 4, hkv, d, torch.float32)
    args = (q, k, v, _cu(lens), torch.tensor(ctx, dtype=torch.int32), k_cache, v_cache, tables)
    kw = dict(block_size=bs, ring_blocks=ring_blocks, window=window, softcap=None, scale=SCALE)
    monkeypatch.setattr(reference, "PREFILL_TILE", 1 << 20)
    whole = reference.prefill_attention(*args, **kw)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        reference.F,
        "scaled_dot_product_attention",
        lambda *a, **k: (calls.append(a[1].shape[2]), sdpa(*a, **k))[1],
    )
    monkeypatch.setattr(reference, "PREFILL_TILE", 7)
    tiled = reference.prefill_attention(*args, **kw)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    assert len(calls) > len(lens) + 4  # the 40-, 12- and 33-row chunks took several tiles
    if window is not None:
        assert max(calls) <= window + 7 - 1  # no tile saw more keys than it can use
    _close(triton_ops.prefill_attention(*args, **kw), tiled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_with_context(dtype):
    ctx, lens, hkv, d, bs = [3, 26], [20, 9], 2, 32, 8
    k_cache, v_cache, tables = _cache(ctx, hkv, d, bs, 0, dtype)
    q, k, v = _qkv(sum(lens), 4, hkv, d, dtype)
    args = (q, k, v, _cu(lens), torch.tensor(ctx, dtype=torch.int32), k_cache, v_cache, tables)
    kw = dict(block_size=bs, ring_blocks=0, window=16, softcap=CAP, scale=SCALE)
    _close(triton_ops.prefill_attention(*args, **kw), reference.prefill_attention(*args, **kw))


@pytest.mark.parametrize("softcap", [CAP, None])
def test_float32_queries_over_a_bfloat16_cache(softcap):
    """--kv-cache-dtype bfloat16 under a float32 model (prefill with context, then decode):
    the kernels read the cache's values and compute in fp32, exactly as the reference does
    over the same values in a float32 cache; the reference over the bfloat16 cache computes
    soft-capped attention in fp32 too, and uncapped attention in bfloat16 (compute_dtype),
    off from fp32 by the queries' rounding and within a bound of the rest."""
    ctx, lens, hkv, d, bs = [5, 23], [7, 12], 2, 16, 4
    k_cache, v_cache, tables = _cache(ctx, hkv, d, bs, 0, torch.bfloat16)
    wide = (k_cache.float(), v_cache.float())
    q, k, v = _qkv(sum(lens), 4, hkv, d, torch.float32, spread=2.0)
    k, v = k.bfloat16().float(), v.bfloat16().float()  # fresh K/V as CacheAttention rounds them
    kw = dict(block_size=bs, ring_blocks=0, window=10, softcap=softcap, scale=SCALE)
    head = (q, k, v, _cu(lens), torch.tensor(ctx, dtype=torch.int32))
    exact = reference.prefill_attention(*head, *wide, tables, **kw)
    _close(triton_ops.prefill_attention(*head, k_cache, v_cache, tables, **kw), exact)
    ref = reference.prefill_attention(*head, k_cache, v_cache, tables, **kw)
    qd = torch.randn(len(ctx), 4, d) * 2.0
    dhead = (torch.tensor(ctx, dtype=torch.int32),)
    dexact = reference.decode_attention(qd, *wide, tables, *dhead, **kw)
    out = triton_ops.decode_attention(qd, k_cache, v_cache, tables, *dhead, **kw)
    assert out.dtype == torch.float32
    _close(out, dexact)
    dref = reference.decode_attention(qd, k_cache, v_cache, tables, *dhead, **kw)
    assert ref.dtype == dref.dtype == torch.float32
    if softcap:
        _close(ref, exact)
        _close(dref, dexact)
        return
    # Against fp32 arithmetic over the queries rounded to bfloat16 too, what is left is the
    # rounding of the probabilities and of the output (2^-9 relative each): <= 2^-8 max|v|.
    vmax = max(v_cache.float().nan_to_num().abs().amax().item(), v.abs().amax().item())
    bound = 2**-8 * vmax + 1e-5
    rounded = reference.prefill_attention(q.bfloat16().float(), *head[1:], *wide, tables, **kw)
    drounded = reference.decode_attention(qd.bfloat16().float(), *wide, tables, *dhead, **kw)
    for got, want, close in ((ref, exact, rounded), (dref, dexact, drounded)):
        assert (got - want).abs().max() > 1e-3  # the queries' rounding shows
        assert (got - close).abs().max().item() <= bound


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 8])
def test_decode_paged(group, window):
    """Queries at positions window-2 .. window+1 and beyond, and a length-1 sequence."""
    lens, hkv, d, bs = [1, 7, 8, 9, 10, 30], 2, 16, 4
    k_cache, v_cache, tables = _cache(lens, hkv, d, bs, 0, torch.float32)
    q = torch.randn(len(lens), hkv * group, d) * 6.0
    args = (q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
    kw = dict(block_size=bs, ring_blocks=0, window=window, softcap=CAP, scale=SCALE)
    _close(triton_ops.decode_attention(*args, **kw), reference.decode_attention(*args, **kw))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_ring_wraps(num_splits):
    """Ring of 3 blocks x 4 slots, window 8: lengths up to 37 wrap the ring several times."""
    lens, hkv, d, bs = [1, 8, 9, 13, 25, 37], 2, 16, 4
    k_cache, v_cache, tables = _cache(lens, hkv, d, bs, 3, torch.float32)
    q = torch.randn(len(lens), 2 * hkv, d) * 6.0
    args = (q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
    kw = dict(block_size=bs, ring_blocks=3, window=8, softcap=CAP, scale=SCALE)
    out = triton_ops.decode_attention(*args, **kw, num_splits=num_splits)
    _close(out, reference.decode_attention(*args, **kw))


@pytest.mark.parametrize("ring_blocks,window", [(0, None), (3, 8)])
def test_reference_decode_groups_by_length(ring_blocks, window):
    """More sequences than one decode group: grouped by length, each equals itself alone."""
    lens = torch.randint(1, 40, (2 * reference.DECODE_GROUP + 3,)).tolist()
    k_cache, v_cache, tables = _cache(lens, 2, 16, 4, ring_blocks, torch.float32)
    q = torch.randn(len(lens), 4, 16) * 6.0
    kw = dict(block_size=4, ring_blocks=ring_blocks, window=window, softcap=CAP, scale=SCALE)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    batched = reference.decode_attention(q, k_cache, v_cache, tables, seq_lens, **kw)
    for s in range(len(lens)):
        one = slice(s, s + 1)
        alone = reference.decode_attention(
            q[one], k_cache, v_cache, tables[one], seq_lens[one], **kw
        )
        assert torch.allclose(batched[s], alone[0], atol=1e-5, rtol=1e-5), s
    assert not batched.isnan().any()


def test_decode_split_k_and_softcap_matters():
    """Split-K with more splits than some sequences have tiles (empty partitions)."""
    lens, hkv, d, bs = [1, 5, 40, 33], 2, 32, 8
    k_cache, v_cache, tables = _cache(lens, hkv, d, bs, 0, torch.float32)
    q = torch.randn(len(lens), 8, d) * 6.0
    args = (q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
    kw = dict(block_size=bs, ring_blocks=0, window=None, softcap=CAP, scale=SCALE)
    ref = reference.decode_attention(*args, **kw)
    uncapped = reference.decode_attention(*args, **{**kw, "softcap": None})
    assert (ref - uncapped).abs().max() > 1e-1
    _close(triton_ops.decode_attention(*args, **kw, num_splits=4), ref)
    out = launch_decode(
        *args, **kw, block_n=32, num_splits=2, num_warps=4, num_stages=1, upcast=True
    )  # fmt: skip
    _close(out, ref)
    _close(triton_ops.decode_attention(*args, **{**kw, "softcap": None}), uncapped)


@pytest.mark.parametrize("ring_blocks,window", [(0, None), (0, 7), (3, 8)])
@pytest.mark.parametrize("softcap,dtype", [(CAP, torch.float32), (None, torch.bfloat16)])
def test_row_decode_is_store_and_decode_of_one_sequence(ring_blocks, window, softcap, dtype):
    """row_slots + row_decode (what compiled layers run for a decode row, every shape fixed
    but a global layer's number of keys) store the token's K/V where store_kv does and
    return decode_attention's output, before, at and past the window and a ring's wraps."""
    hkv, d, bs = 2, 16, 4
    for n in (1, 2, 7, 8, 9, 13, 25, 37):
        k_cache, v_cache, tables = _cache([n], hkv, d, bs, ring_blocks, dtype)
        q = (torch.randn(1, 2 * hkv, d) * 6.0).to(dtype)
        k, v = (torch.randn(1, hkv, d) * 6.0).to(dtype), torch.randn(1, hkv, d).to(dtype)
        kw = dict(softcap=softcap, scale=SCALE)
        seq_lens = torch.tensor([n], dtype=torch.int32)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        slot = reference.slots_for_positions(seq_lens.long() - 1, tables[0], bs, ring_blocks)
        reference.store_kv(k, v, ref_k, ref_v, slot)
        ref = reference.decode_attention(
            q, ref_k, ref_v, tables, seq_lens, block_size=bs, ring_blocks=ring_blocks,
            window=window, **kw,
        )  # fmt: skip
        slots, valid = reference.row_slots(
            tables[0], n, block_size=bs, ring_blocks=ring_blocks, window=window
        )
        assert len(slots) == (window or n) and int(valid.sum()) == min(n, window or n)
        out = reference.row_decode(q, k, v, k_cache, v_cache, slots, valid, **kw)
        assert torch.equal(k_cache.nan_to_num(), ref_k.nan_to_num()), n
        assert torch.equal(v_cache.nan_to_num(), ref_v.nan_to_num()), n
        _close(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half_split(dtype):
    lens, hkv, d, bs = [3, 29, 17], 2, 32, 8
    k_cache, v_cache, tables = _cache(lens, hkv, d, bs, 0, dtype)
    q = (torch.randn(len(lens), 4, d) * 6.0).to(dtype)
    args = (q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
    kw = dict(block_size=bs, ring_blocks=0, window=12, softcap=CAP, scale=SCALE)
    ref = reference.decode_attention(*args, **kw)
    _close(triton_ops.decode_attention(*args, **kw, num_splits=2), ref)


def test_split_heuristic():
    # Gemma-2-9B decode: one long sequence splits a lot; a full batch needs no more than 2.
    assert triton_ops.choose_num_splits(1, 8, 8192, 64, 132) == 32
    assert triton_ops.choose_num_splits(64, 8, 4096, 64, 132) == 2
    assert triton_ops.choose_num_splits(256, 16, 4096, 64, 132) == 1
    assert triton_ops.choose_num_splits(1, 8, 40, 64, 132) == 1  # short: one tile, no split


AOT_SCRIPT = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from gemma_serve.kernels.decode_attention import decode_kernel, decode_reduce_kernel
from gemma_serve.kernels.prefill_attention import prefill_kernel
from gemma_serve.kernels.store_kv import store_kv_kernel
from gemma_serve.kernels.triton_ops import decode_block_n, prefill_config

FLOATS = {"qk_scale", "softcap_scale", "cap_log2e"}
INT_PTRS = {"CuSeqlens", "CtxLens", "BlockTables", "SeqLens", "SlotMapping"}
F32_PTRS = {"PartM", "PartL", "PartAcc"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")

def build(fn, consts, opts):
    # Pointers and strides get the 16-divisibility hint a real launch on aligned tensors gets.
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = "*i32" if name in INT_PTRS else "*fp32" if name in F32_PTRS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    res = {"kernel": fn.__name__, "head_dim": consts.get("HEAD_DIM"), "stages": list(k.asm),
           "shared": k.metadata.shared, "wgmma": "wgmma" in k.asm.get("ptx", "")}
    if "cubin" in k.asm and os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        res.update({m[0]: int(m[1]) for m in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)})
    return res

flags = dict(HAS_WINDOW=True, HAS_SOFTCAP=True, UPCAST=False, DOT_PREC="tf32")
jobs = [(store_kv_kernel, dict(NUM_HEADS=8, HEAD_DIM=256, BLOCK_H=8, BLOCK_D=256),
         {"num_warps": 4})]
for d, ring in ((128, False), (256, True)):
    c = prefill_config(d, False)
    jobs.append((prefill_kernel, dict(GROUP=2, HEAD_DIM=d, BLOCK_M=c.block_m,
                 BLOCK_N=c.block_n, BLOCK_SIZE=16, IS_RING=ring, HAS_CTX=True, **flags),
                 {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    jobs.append((decode_kernel, dict(GROUP=2, BLOCK_G=16, HEAD_DIM=d,
                 BLOCK_N=decode_block_n(d, False), BLOCK_SIZE=16, NUM_SPLITS=4 if ring else 1,
                 IS_RING=ring, **flags), {"num_warps": 4, "num_stages": 2 if d >= 256 else 3}))
c = prefill_config(128, False)  # no cached context, no window, no cap (Gemma 3 global layer)
jobs.append((prefill_kernel, dict(GROUP=2, HEAD_DIM=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
             BLOCK_SIZE=16, IS_RING=False, HAS_CTX=False, HAS_WINDOW=False, HAS_SOFTCAP=False,
             UPCAST=False, DOT_PREC="tf32"),
             {"num_warps": c.num_warps, "num_stages": c.num_stages}))
jobs.append((decode_reduce_kernel, dict(HEAD_DIM=256, NUM_SPLITS=4, BLOCK_S=4),
             {"num_warps": 4}))
for fn, consts, opts in jobs:
    print("AOT " + json.dumps(build(fn, consts, opts)), flush=True)
"""


@pytest.mark.slow
def test_aot_compile_sm90(tmp_path):
    """Every kernel compiles to an sm_90 cubin (Triton's bundled ptxas), no GPU needed.

    Runs in a clean subprocess: the interpreter would replace the jit functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("AOT ")]
    assert len(results) == 7
    for r in results:
        assert "cubin" in r["stages"], r
        assert r["shared"] <= 232448, r  # sm_90: 227 KB of shared memory per block
        # No register spills. Triton 3.6 (the GPU image's) gives the D-256 prefill an 8-byte
        # stack frame, one spilled register; real spills of these tiles are 40-256 bytes.
        assert r.get("STACK", 0) <= 8 and r.get("LOCAL", 0) == 0, f"register spills: {r}"
        if r["kernel"] == "prefill_kernel":
            assert r["wgmma"], r  # Hopper tensor-core path
