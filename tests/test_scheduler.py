"""Scheduler and KV block bookkeeping without a model (torch-free, fast)."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import replace

import pytest
from gemma_serve.server.engine.block_pool import BlockKey, BlockPool
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.errors import RequestTooLongError
from gemma_serve.server.engine.kv_manager import KVCacheManager, KVUsage
from gemma_serve.server.engine.output_processor import token_stop_reason
from gemma_serve.server.engine.outputs import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH
from gemma_serve.server.engine.request import Request, RequestStatus
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.scheduler import MAX_FAULTS, Scheduler, SchedulerOutput
from hypothesis import given, settings
from hypothesis import strategies as st

EOS = 1
GLOBAL, LOCAL = PoolKind.GLOBAL, PoolKind.LOCAL


def make_scheduler(
    global_blocks: int = 64,
    local_blocks: int = 32,
    block_size: int = 4,
    window: int = 8,
    max_seqs: int = 8,
    budget: int = 16,
    max_len: int = 256,
    prefix_caching: bool = False,
) -> Scheduler:
    kv = KVCacheManager(
        global_blocks, local_blocks, block_size, window, prefix_caching=prefix_caching
    )
    return Scheduler(kv, max_seqs, budget, max_len)


def request(rid: str, prompt_len: int, max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(rid, list(range(3, 3 + prompt_len)), params, eos_token_ids=frozenset({EOS}))


def fake_step(s: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    """One step with a 'model' that always samples token 7; returns the requests it finished."""
    out = s.schedule()
    return out, record(s, out)


def record(s: Scheduler, out: SchedulerOutput) -> list[Request]:
    """Token 7 for each sampling chunk; then, as the engine does, end those that stop."""
    sampled = {c.request.request_id: [7] for c in out.chunks if c.samples}
    s.update(out, sampled)
    finished = []
    for c in out.chunks:
        req = c.request
        reason = token_stop_reason(req) if req.request_id in sampled else None
        if reason is not None and not req.finished:
            s.finish(req, reason)
            finished.append(req)
    return finished


def add(s: Scheduler, req: Request) -> None:
    """Check, then queue, as LLMEngine.add_request does."""
    s.check(req.num_prompt_tokens, req.params.max_tokens)
    s.add(req)


def abort(s: Scheduler, request_id: str) -> Request | None:
    """End a request in flight, as LLMEngine.abort does."""
    req = s.get(request_id)
    if req is not None:
        s.finish(req, FINISH_ABORT)
    return req


def check_invariants(s: Scheduler) -> None:
    kv = s.kv
    for tables in (kv.pools[GLOBAL], kv.pools[LOCAL]):
        holders = Counter(b for blocks in tables.owners().values() for b in blocks)
        for rid, blocks in tables.owners().items():
            assert len(blocks) == len(set(blocks)), f"{rid} holds a block twice"
        assert len(holders) == tables.pool.num_used  # shared blocks counted once
        assert all(tables.pool.refcount(b) == n for b, n in holders.items())
    for req in s.running:
        assert len(kv.pools[LOCAL].table(req.request_id)) <= kv.pools[LOCAL].ring_blocks
    owners = set(kv.pools[GLOBAL].owners()) | set(kv.pools[LOCAL].owners())
    assert owners <= {r.request_id for r in s.running}


def test_decodes_first_then_chunked_prefill_within_budget() -> None:
    s = make_scheduler(budget=10)
    s.add(request("a", 3, 4))
    s.add(request("b", 25, 4))
    out, _ = fake_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 0, 3),
        ("b", 0, 7),
    ]
    out, _ = fake_step(s)  # a decodes (1 token) first, b gets the remaining 9 of the budget
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.decodes] == [("a", 3, 1)]
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.prefills] == [("b", 7, 9)]
    assert not out.prefills[0].samples


def test_finishes_by_length_and_frees_blocks() -> None:
    s = make_scheduler()
    s.add(request("a", 5, 3))
    finished: list[Request] = []
    while s.has_work:
        finished += fake_step(s)[1]
    assert [r.request_id for r in finished] == ["a"]
    assert finished[0].output_ids == [7, 7, 7] and finished[0].finish_reason == FINISH_LENGTH
    assert s.kv.pools[GLOBAL].pool.num_used == 0 and s.kv.pools[LOCAL].pool.num_used == 0


def test_ring_stays_within_window_while_global_grows() -> None:
    s = make_scheduler(block_size=4, window=8, budget=64)
    s.add(request("a", 2, 60))
    while s.has_work:
        out, _ = fake_step(s)
        req = out.chunks[0].request
        if req.finished:
            break
        n = req.num_computed_tokens
        assert len(s.kv.pools[GLOBAL].table("a")) == -(-n // 4)  # one global block per 4 tokens
        # ring: ceil((8 - 1) / 4) + 1 = 3 blocks, the oldest replaced (and freed) on each wrap
        assert len(s.kv.pools[LOCAL].table("a")) == min(3, -(-n // 4))
        assert s.kv.pools[LOCAL].pool.num_used == len(s.kv.pools[LOCAL].table("a"))


def test_preemption_by_recompute_of_the_latest_request() -> None:
    # 6 global blocks of 4 tokens: two requests growing to 16 tokens each cannot coexist.
    s = make_scheduler(global_blocks=6, local_blocks=8, budget=32)
    s.add(request("old", 4, 12))
    s.add(request("new", 4, 12))
    finished: list[Request] = []
    while s.has_work:
        finished += fake_step(s)[1]
        check_invariants(s)
    assert s.num_preemptions > 0
    assert [r.request_id for r in finished] == ["old", "new"]  # FCFS completion
    assert all(r.output_ids == [7] * 12 for r in finished)


def test_too_long_requests_are_rejected_not_hung() -> None:
    s = make_scheduler(global_blocks=4, max_len=64)
    with pytest.raises(RequestTooLongError, match="exceeds the maximum context length of 64"):
        add(s, request("a", 60, 10))
    with pytest.raises(RequestTooLongError, match="cannot fit in the KV cache"):
        add(s, request("b", 10, 10))  # 20 tokens > 4 blocks of 4
    assert not s.has_work


def test_the_longest_sequence_that_fits_counts_a_short_local_pool() -> None:
    """A local pool smaller than one ring (window 16, blocks of 4: 5 per ring) limits too."""
    kv = KVCacheManager(10, 4, 4, 16, has_global=True, has_local=True)
    assert kv.pools[LOCAL].ring_blocks == 5 and kv.max_tokens_that_fit() == 16
    assert kv.can_ever_fit(16) and not kv.can_ever_fit(17)
    whole_ring = KVCacheManager(10, 5, 4, 16, has_global=True, has_local=True)
    assert whole_ring.max_tokens_that_fit() == 40 and whole_ring.can_ever_fit(40)


def test_abort_anywhere_frees_everything() -> None:
    s = make_scheduler()
    s.add(request("a", 9, 20))
    s.add(request("b", 3, 20))
    fake_step(s)
    assert abort(s, "a").finish_reason == FINISH_ABORT
    assert abort(s, "zzz") is None
    abort(s, "b")
    assert not s.has_work
    assert s.kv.pools[GLOBAL].pool.num_used == 0 and s.kv.pools[LOCAL].pool.num_used == 0


def failed_step(s: Scheduler) -> list[Request]:
    """One step whose forward pass raised: recover, and end the culprits as the engine does."""
    culprits = s.recover(s.schedule())
    for r in culprits:
        s.finish(r, FINISH_ERROR, "injected")
    return culprits


def test_a_failed_step_retries_each_request_alone() -> None:
    s = make_scheduler(budget=64)
    reqs = [request(f"r{i}", 5 + i, 4) for i in range(3)]
    for r in reqs:
        s.add(r)
    fake_step(s)  # all three prefill and sample one token
    assert [len(r.output_ids) for r in reqs] == [1, 1, 1]
    assert failed_step(s) == []  # a batch of three: nobody is blamed yet
    check_invariants(s)
    assert not s.running and [r.request_id for r in s.waiting] == ["r0", "r1", "r2"]
    assert [r.retry_until for r in reqs] == [6, 7, 8]  # where the failed decodes ended
    # Each retries alone, recomputing prompt + its one output token, then samples.
    for r in reqs:
        out, _ = fake_step(s)
        chunks = [(c.request, c.start, c.num_tokens) for c in out.chunks]
        assert chunks == [(r, 0, r.num_tokens - 1)]
        assert r.retry_until == 0 and len(r.output_ids) == 2
        check_invariants(s)
    out, _ = fake_step(s)  # batched again
    assert {c.request.request_id for c in out.decodes} == {"r0", "r1", "r2"}
    # From now on every step with r1 in it fails: r1 alone is blamed, the others finish.
    batches, culprits = [], []
    while s.has_work:
        out = s.schedule()
        batch = {c.request.request_id for c in out.chunks}
        batches.append(batch)
        if "r1" in batch:
            culprits += s.recover(out)
            for r in culprits:
                s.finish(r, FINISH_ERROR, "injected")
        else:
            record(s, out)
        check_invariants(s)
    assert culprits == [reqs[1]] and reqs[1].faults == 3  # batched once more, then alone
    assert batches[0] == {"r0", "r1", "r2"} and batches.count({"r1"}) == 1  # blamed alone
    assert [len(r.output_ids) for r in (reqs[0], reqs[2])] == [4, 4]
    assert s.kv.pools[GLOBAL].pool.num_used == 0 and s.kv.pools[LOCAL].pool.num_used == 0


def test_a_request_in_too_many_failed_steps_is_failed() -> None:
    s = make_scheduler(budget=64)
    a, b = request("a", 6, 8), request("b", 6, 8)
    s.add(a)
    s.add(b)
    for fault in range(1, MAX_FAULTS):
        assert failed_step(s) == []  # both in the batch: both retry alone and pass
        fake_step(s)
        fake_step(s)
        assert (a.faults, b.faults, a.retry_until, b.retry_until) == (fault, fault, 0, 0)
    assert failed_step(s) == [a, b]
    assert not s.has_work and s.kv.pools[GLOBAL].pool.num_used == 0


def test_failed_steps_explained_by_a_culprit_do_not_count_against_the_others() -> None:
    """Culprits arriving one by one, each failing a step shared with `x` and then failing
    alone: x's faults are explained each time, so x is never failed (it would be by the
    third shared failure if every failed step counted)."""
    s = make_scheduler(budget=64)
    x = request("x", 6, 40)
    s.add(x)
    fake_step(s)  # x prefilled, now decoding
    for i in range(MAX_FAULTS + 1):
        culprit = request(f"c{i}", 4, 4)
        s.add(culprit)
        assert failed_step(s) == []  # shared: both restart, neither blamed yet
        blamed = []
        while not blamed:
            out = s.schedule()
            assert len(out.chunks) == 1
            if out.chunks[0].request is culprit:  # the culprit's retry fails alone
                blamed = s.recover(out)
                for r in blamed:
                    s.finish(r, FINISH_ERROR, "injected")
            else:
                record(s, out)
        assert blamed == [culprit] and x.faults == 0
        while x.retry_until:
            fake_step(s)
    assert not x.finished and x.status == RequestStatus.RUNNING


def test_block_pool_refcounts() -> None:
    pool = BlockPool(3)
    a = pool.allocate(2)
    pool.share(a[0])
    pool.free(a)
    assert pool.num_free == 2 and pool.refcount(a[0]) == 1
    pool.free([a[0]])
    assert pool.num_free == 3
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([a[0]])
    with pytest.raises(MemoryError):
        pool.allocate(4)


def test_prefix_cache_keys_lookup_and_eviction_order() -> None:
    pool = BlockPool(4)
    keys = BlockKey.chain([2, 5, 6, 7, 8, 9, 10, 11], 4, 2)
    assert keys[1].parent == keys[0].hash and keys[1].tokens == (8, 9, 10, 11)
    other = BlockKey.chain([2, 5, 6, 1, 8, 9, 10, 11], 4, 2)  # same 2nd block, other 1st
    assert other[1].tokens == keys[1].tokens and other[1] != keys[1]
    a, b = pool.allocate(2)
    pool.register(a, keys[0])
    pool.register(b, keys[1])
    assert pool.lookup(keys[1]) == b and pool.lookup(other[1]) is None
    pool.free([b, a])  # the tail first, as BlockTable.free does
    assert pool.num_free == 4 and pool.lookup(keys[0]) == a  # free, still findable
    pool.share(a)  # taken back from the cache
    assert pool.refcount(a) == 1 and pool.num_free == 3
    pool.allocate(2)  # the never-used blocks go first, then the least recently freed: b
    assert pool.lookup(keys[1]) == b
    pool.allocate(1)
    assert pool.lookup(keys[1]) is None and pool.lookup(keys[0]) == a
    pool.forget(a)
    assert pool.lookup(keys[0]) is None
    with pytest.raises(ValueError, match="holds no cached prefix"):
        pool.free([a])
        pool.share(a)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_prefix_hits_in_a_model_with_one_kind_of_layer(kind: str) -> None:
    """All-global or all-local models share cached blocks from the one pool they have."""
    kv = KVCacheManager(
        20, 20, 4, 8, has_global=kind == "global", has_local=kind == "local", prefix_caching=True
    )
    prompt = list(range(3, 23))  # 20 tokens: 5 full blocks, 4 reusable
    assert kv.try_admit("a", prompt, 20, 64, True) == (0, 20)
    kv.computed("a", 20, 20)
    kv.free("a")
    assert kv.try_admit("b", prompt, 20, 64, True) == (16, 4)
    assert kv.num_cached_tokens == 16
    kv.free("b")
    assert kv.usage() == KVUsage(0.0, 0.0)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12)),
        st.tuples(st.just("step"), st.integers(1, 3), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 20), st.just(0)),
        st.tuples(st.just("fail"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    budget=st.integers(1, 24),
    global_blocks=st.integers(12, 40),
    prefix_caching=st.booleans(),
)
def test_any_interleaving_keeps_blocks_consistent(
    ops, budget: int, global_blocks: int, prefix_caching: bool
) -> None:
    """Requests share prompt prefixes (every prompt is 3, 4, 5, ...), so with prefix caching
    they share cached blocks too."""
    s = make_scheduler(
        global_blocks=global_blocks,
        local_blocks=10,
        budget=budget,
        max_seqs=4,
        prefix_caching=prefix_caching,
    )
    added = 0
    for op, a, b in ops:
        if op == "add":
            with contextlib.suppress(RequestTooLongError):
                add(s, request(f"r{added}", a, b))
            added += 1
        elif op == "step":
            for _ in range(a):
                fake_step(s)
                check_invariants(s)
        elif op == "fail":
            failed_step(s)
            check_invariants(s)
        else:
            abort(s, f"r{a}")
            check_invariants(s)
    steps = 0
    while s.has_work:  # everything left runs to completion: nothing is starved or stuck
        fake_step(s)
        check_invariants(s)
        steps += 1
        assert steps < 2000
    assert s.kv.pools[GLOBAL].pool.num_used == 0
    assert s.kv.pools[LOCAL].pool.num_used == 0


def test_waiting_queue_orders_by_priority_then_arrival() -> None:
    """vLLM's priority: lower first, first-come first-served within a priority; a preempted
    request goes back to the head whatever its priority (it already holds its place)."""
    s = make_scheduler(max_seqs=1)
    reqs = {}
    for rid, priority in [("a", 0), ("b", 5), ("c", -1), ("d", 5), ("e", 0)]:
        r = request(rid, 2, 4)
        reqs[rid] = Request(rid, r.prompt_ids, replace(r.params, priority=priority))
        s.add(reqs[rid])
    assert [r.request_id for r in s.waiting] == ["c", "a", "e", "b", "d"]
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["c"]
    s._preempt(reqs["c"])
    s.add(Request("f", [3, 4], SamplingParams(max_tokens=4, priority=-9)))
    assert [r.request_id for r in s.waiting] == ["f", "c", "a", "e", "b", "d"]
