"""Fair prefill in the scheduler, without a model (torch-free): a long prompt leaves room for
the requests waiting beside it, the partial and long prefill limits hold, nothing starves; and
the flags that set the limits."""

from __future__ import annotations

import contextlib

import pytest
from gemma_serve.server.cli import parse_args
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.errors import RequestTooLongError
from gemma_serve.server.engine.kv_manager import KVCacheManager
from gemma_serve.server.engine.prefill_policy import PrefillLimits
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.scheduler import Scheduler, SchedulerOutput
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_scheduler import GLOBAL, LOCAL, abort, add, check_invariants, record, request


def fair(
    budget: int,
    threshold: int,
    partial: int = 2,
    long: int = 1,
    global_blocks: int = 256,
    max_seqs: int = 8,
    prefix_caching: bool = False,
) -> Scheduler:
    kv = KVCacheManager(global_blocks, 64, 4, 8, prefix_caching=prefix_caching)
    return Scheduler(kv, max_seqs, budget, 1024, PrefillLimits(threshold, partial, long))


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


def step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    record(s, out)
    return out


def test_a_long_prompt_alone_takes_the_whole_budget() -> None:
    s = fair(budget=64, threshold=16)
    s.add(request("long", 200, 2))
    assert chunks(step(s)) == [("long", 0, 64)]
    assert chunks(step(s)) == [("long", 64, 64)]


def test_a_short_request_starts_beside_a_long_prefill_in_the_next_step() -> None:
    s = fair(budget=64, threshold=16)
    s.add(request("long", 200, 2))
    step(s)
    s.add(request("short", 12, 3))
    out = step(s)
    # The long prefill is capped at the threshold; the short prompt is prefilled whole and
    # samples its first token in the step right after its arrival.
    assert chunks(out) == [("long", 64, 16), ("short", 0, 12)]
    assert s.get("short").output_ids == [7]
    # Then the short one decodes and, nothing else waiting, the long one takes the rest again.
    assert chunks(step(s)) == [("short", 12, 1), ("long", 80, 63)]


def test_without_a_threshold_the_long_prefill_blocks_as_before() -> None:
    s = fair(budget=64, threshold=0)
    s.add(request("long", 200, 2))
    step(s)
    s.add(request("short", 12, 3))
    assert chunks(step(s)) == [("long", 64, 64)]
    assert chunks(step(s)) == [("long", 128, 64)]
    assert chunks(step(s)) == [("long", 192, 8), ("short", 0, 12)]


def test_a_second_long_prompt_waits_and_shorter_ones_jump_it() -> None:
    s = fair(budget=64, threshold=16, partial=2, long=1)
    s.add(request("long1", 100, 2))
    s.add(request("long2", 100, 2))
    s.add(request("short", 10, 2))
    assert chunks(step(s)) == [("long1", 0, 16), ("short", 0, 10)]  # long2 held back
    assert [r.request_id for r in s.waiting] == ["long2"]
    # long1 alone among prefills, but long2 is held back by the long limit: no contention, so
    # long1 is not capped for a request that could not use the room.
    assert chunks(step(s)) == [("short", 10, 1), ("long1", 16, 63)]
    out = step(s)  # long1's last 21 tokens (no longer long); long2 starts with the rest
    assert chunks(out) == [("long1", 79, 21), ("long2", 0, 43)]


def test_max_num_partial_prefills_holds_back_a_request_left_partial() -> None:
    s = fair(budget=40, threshold=16, partial=1)
    s.add(request("long", 100, 2))
    step(s)  # long: 40 tokens, partial
    for rid, n in (("s1", 15), ("s2", 15), ("s3", 15), ("tiny", 3)):
        s.add(request(rid, n, 2))
    out = step(s)
    # long 16 (partial: the one slot), s1 whole; s2 and s3 would be left partial (9 and 0
    # tokens of room): held back; tiny fits whole and goes ahead of them.
    assert chunks(out) == [("long", 40, 16), ("s1", 0, 15), ("tiny", 0, 3)]
    assert [r.request_id for r in s.waiting] == ["s2", "s3"]
    out = step(s)  # decodes, long capped, s2 whole; s3 would be partial again: held back
    assert chunks(out) == [("s1", 15, 1), ("tiny", 3, 1), ("long", 56, 16), ("s2", 0, 15)]
    s2 = fair(budget=40, threshold=16, partial=2)
    s2.add(request("long", 100, 2))
    step(s2)
    for rid, n in (("s1", 15), ("s2", 15), ("s3", 15), ("tiny", 3)):
        s2.add(request(rid, n, 2))
    # Two slots: s2 may be left partial with the 9 tokens of room.
    assert chunks(step(s2)) == [("long", 40, 16), ("s1", 0, 15), ("s2", 0, 9)]


def partially_prefilled(s: Scheduler) -> list[Request]:
    return [r for r in s.running if r.num_tokens - r.num_computed_tokens > 1]


def long_prefills(s: Scheduler) -> list[Request]:
    return [
        r for r in partially_prefilled(s) if s.prefill.is_long(r.num_tokens - r.num_computed_tokens)
    ]


@pytest.mark.parametrize("budget", [64, 256, 1024])
@pytest.mark.parametrize("threshold_share", [2, 4, 8])
@pytest.mark.parametrize("decodes", [0, 5])
def test_a_short_request_gets_its_first_token_within_two_steps(
    budget: int, threshold_share: int, decodes: int
) -> None:
    """Whatever the long prompt's length relative to the budget, and with decodes running."""
    s = fair(budget=budget, threshold=budget // threshold_share, global_blocks=1024)
    for i in range(decodes):
        s.add(request(f"d{i}", 3, 500))
    step(s)
    s.add(request("long", 8 * budget, 2))
    step(s)
    step(s)
    s.add(request("short", min(20, budget // threshold_share), 2))
    for _ in range(2):
        step(s)
        if s.get("short").output_ids:
            break
    assert s.get("short").output_ids, "no first token within two steps of arrival"


def run_checked(s: Scheduler, limit: int) -> int:
    """Steps until idle, checking every step; returns the steps taken."""
    for n in range(limit):
        if not s.has_work:
            return n
        check_step(s)
    raise AssertionError(f"work left after {limit} steps: starved or stuck")


def check_step(s: Scheduler) -> None:
    """One step: the budget holds, and a step starts no new partial (or long) prefill beyond
    the limits (it may carry on with those already running, e.g. after a failed step)."""
    partial_before = {r.request_id for r in partially_prefilled(s)}
    long_before = {r.request_id for r in long_prefills(s)}
    out = s.schedule()
    assert out.num_batched_tokens <= s.max_num_batched_tokens
    assert len({c.request.request_id for c in out.chunks}) == len(out.chunks)
    for c in out.prefills:  # a running long prefill left partial beside another is capped
        left = c.request.num_tokens - c.start
        running = c.request.request_id in partial_before
        beside = len(out.prefills) > 1
        if running and beside and s.prefill.is_long(left) and left - c.num_tokens > 1:
            assert c.num_tokens <= s.prefill.long_threshold, f"{c} took over the threshold"
    record(s, out)
    check_invariants(s)
    partial = {r.request_id for r in partially_prefilled(s)}
    assert len(partial) <= max(s.prefill.max_partial, len(partial_before & partial))
    new_long = {r.request_id for r in long_prefills(s)} - long_before
    if new_long:
        assert len(long_prefills(s)) <= s.prefill.max_long


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 120), st.integers(1, 8)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 20), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    budget=st.integers(1, 48),
    threshold=st.integers(0, 40),
    partial=st.integers(1, 3),
    long=st.integers(1, 3),
    global_blocks=st.integers(32, 96),
    prefix_caching=st.booleans(),
)
def test_fair_prefill_never_exceeds_the_budget_or_starves(
    ops, budget: int, threshold: int, partial: int, long: int, global_blocks: int, prefix_caching
) -> None:
    """Any mix of prompt lengths, arrivals and aborts, under any limits: every step within the
    budget and the prefill limits, blocks consistent, and everything left runs to the end."""
    s = fair(budget, threshold, partial, min(long, partial), global_blocks, 4, prefix_caching)
    added = 0
    for op, a, b in ops:
        if op == "add":
            with contextlib.suppress(RequestTooLongError):
                add(s, request(f"r{added}", a, b))
            added += 1
        elif op == "step":
            for _ in range(a):
                check_step(s)
        else:
            abort(s, f"r{a}")
    run_checked(s, 3000)
    assert s.kv.pools[GLOBAL].pool.num_used == 0 and s.kv.pools[LOCAL].pool.num_used == 0


def test_a_held_back_long_prompt_is_not_overtaken_forever() -> None:
    """A steady stream of short requests beside a long prompt: the second long prompt starts
    once the first has finished its prefill, however many short ones keep arriving."""
    s = fair(budget=32, threshold=8)
    s.add(request("long1", 80, 1))
    s.add(request("long2", 80, 1))
    started = None
    for n in range(200):
        s.add(request(f"s{n}", 4, 1))
        step(s)
        if started is None and s.get("long2") in s.running:
            started = n
        if not s.get("long1") and not s.get("long2"):
            break
    # long1 gets 8 tokens a step beside the shorts: its last 8 in step 9, where long2 starts.
    assert started == 9
    assert s.get("long2") is None  # finished


def test_the_flags_set_the_limits_and_the_defaults_are_fair() -> None:
    config, _ = parse_args([])
    assert config.prefill_limits() == PrefillLimits(1024 // 2, 2, 1)
    assert parse_args(["--max-num-batched-tokens", "1"])[0].prefill_limits().long_threshold == 1
    argv = "--long-prefill-token-threshold 0 --max-num-partial-prefills 4 "
    config, _ = parse_args((argv + "--max-long-partial-prefills 2").split())
    assert config.prefill_limits() == PrefillLimits(0, 4, 2)
    assert config == EngineConfig(
        long_prefill_token_threshold=0, max_num_partial_prefills=4, max_long_partial_prefills=2
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--long-prefill-token-threshold -1", "--long-prefill-token-threshold must be >= 0"),
        ("--max-num-partial-prefills 0", "--max-num-partial-prefills must be >= 1"),
        ("--max-long-partial-prefills 0", "--max-long-partial-prefills must be >= 1"),
        ("--max-long-partial-prefills 3", "<= --max-num-partial-prefills, got 3"),
    ],
)
def test_bad_limits_exit_with_usage_error(
    argv: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv.split())
    assert info.value.code == 2
    assert message in capsys.readouterr().err
