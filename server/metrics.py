"""Prometheus metrics (the DESIGN.md contract), each app owning its own registry.

Engine-side numbers (gauges, preemptions, batch sizes) arrive through `on_step` from the engine
thread; request-side numbers (tokens, latencies, finish reasons) through `on_output` as the
HTTP layer consumes each request's outputs. prometheus_client metrics are thread-safe; the small
per-request table here is guarded by a lock.
"""

from __future__ import annotations

import threading
import time

from gemma_serve.server.engine.outputs import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    RequestOutput,
    StepStats,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "gemma_serve_"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR)
# 1 ms .. 5 min: decode steps take milliseconds, long generations minutes.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0,
)  # fmt: skip
BATCH_TOKEN_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 .. 8192
COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's metrics and the registry they are exposed from."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge(
            PREFIX + "requests_running", "Requests in the running batch.", registry=r
        )
        self.requests_waiting = Gauge(
            PREFIX + "requests_waiting", "Requests waiting to be scheduled.", registry=r
        )
        self.kv_cache_usage = Gauge(
            PREFIX + "kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use, per pool (global: paged; local: rings).",
            ["pool"],
            registry=r,
        )
        # prometheus_client appends _total to counter names.
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of the requests served.", registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated and served.", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            PREFIX + "prefix_cache_hit_tokens",
            "Prompt tokens taken from the prefix cache instead of computed.",
            registry=r,
        )
        self.preemptions = Counter(
            PREFIX + "preemptions", "Requests preempted (to be recomputed).", registry=r
        )
        self.requests = Counter(
            PREFIX + "requests", "Finished requests by reason.", ["finished_reason"], registry=r
        )
        self.ttft = self._latency("time_to_first_token_seconds", "Arrival to first token.")
        self.itl = self._latency("inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = self._latency("e2e_request_latency_seconds", "Arrival to finish.")
        self.queue_time = self._latency("queue_time_seconds", "Arrival to first scheduled.")
        self.batch_tokens = Histogram(
            PREFIX + "batch_tokens",
            "Tokens per engine step.",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.structured_compile = Histogram(
            PREFIX + "structured_output_compile_seconds",
            "Time to compile an output constraint (cache misses only).",
            buckets=COMPILE_BUCKETS,
            registry=r,
        )
        self.structured_cache_hits = Counter(
            PREFIX + "structured_output_compile_cache_hits",
            "Output constraints served from the compiled-grammar cache.",
            registry=r,
        )
        self.spec_draft_tokens = Counter(
            PREFIX + "spec_decode_draft_tokens",
            "Speculative draft tokens verified by the target model.",
            registry=r,
        )
        self.spec_accepted_tokens = Counter(
            PREFIX + "spec_decode_accepted_tokens",
            "Speculative draft tokens accepted (each one a target forward saved).",
            registry=r,
        )
        self.spec_accepted_per_pos = Counter(
            PREFIX + "spec_decode_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0: the first draft token).",
            ["position"],
            registry=r,
        )
        # Expose every label value from the start, so dashboards see zeros, not gaps.
        for pool in ("global", "local"):
            self.kv_cache_usage.labels(pool=pool)
        for reason in FINISH_REASONS:
            self.requests.labels(finished_reason=reason)
        self.spec_accepted_per_pos.labels(position="0")  # the others appear with their k
        self._lock = threading.Lock()
        self._last_token_at: dict[str, float | None] = {}  # request id -> time of last token

    def _latency(self, name: str, doc: str) -> Histogram:
        return Histogram(PREFIX + name, doc, buckets=LATENCY_BUCKETS, registry=self.registry)

    def on_structured_compile(self, seconds: float, cache_hit: bool) -> None:
        """After an output constraint is compiled or found in the cache."""
        if cache_hit:
            self.structured_cache_hits.inc()
        else:
            self.structured_compile.observe(seconds)

    def on_step(self, stats: StepStats) -> None:
        """After every engine step (called from the engine thread)."""
        self.requests_running.set(stats.num_running)
        self.requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.labels(pool="global").set(stats.kv_usage_global)
        self.kv_cache_usage.labels(pool="local").set(stats.kv_usage_local)
        if stats.num_preemptions:
            self.preemptions.inc(stats.num_preemptions)
        if stats.num_cached_tokens:
            self.prefix_cache_hit_tokens.inc(stats.num_cached_tokens)
        if stats.num_batched_tokens:
            self.batch_tokens.observe(stats.num_batched_tokens)
        if stats.num_draft_tokens:
            self.spec_draft_tokens.inc(stats.num_draft_tokens)
            self.spec_accepted_tokens.inc(stats.num_accepted_tokens)
            for position, n in enumerate(stats.accepted_per_position):
                self.spec_accepted_per_pos.labels(position=str(position)).inc(n)

    def on_output(
        self, out: RequestOutput, *, count_prompt: bool = True, now: float | None = None
    ) -> None:
        """Every output of a request, in order. count_prompt=False for the 2nd..nth choice of
        one prompt, so prompt tokens are counted once per prompt, as in the usage field."""
        now = time.monotonic() if now is None else now
        with self._lock:
            first = out.request_id not in self._last_token_at
            last = self._last_token_at.get(out.request_id)
            if out.finished:
                self._last_token_at.pop(out.request_id, None)
            else:
                self._last_token_at[out.request_id] = now if out.new_token_ids else last
        if first and count_prompt:
            self.prompt_tokens.inc(out.num_prompt_tokens)
        if out.new_token_ids:
            self.generation_tokens.inc(len(out.new_token_ids))
            if last is not None:
                gap = (now - last) / len(out.new_token_ids)
                for _ in out.new_token_ids:
                    self.itl.observe(gap)
        if out.finished:
            self._on_finished(out)

    def _on_finished(self, out: RequestOutput) -> None:
        reason = out.finish_reason if out.finish_reason in FINISH_REASONS else FINISH_ERROR
        self.requests.labels(finished_reason=reason).inc()
        t = out.times
        if t is None:
            return
        if t.first_token is not None:
            self.ttft.observe(max(0.0, t.first_token - t.arrival))
        if t.first_scheduled is not None:
            self.queue_time.observe(max(0.0, t.first_scheduled - t.arrival))
        if t.finished is not None:
            self.e2e.observe(max(0.0, t.finished - t.arrival))

    def on_abort(self, request_id: str) -> None:
        """A request that ended without a final output (its client went away)."""
        with self._lock:
            self._last_token_at.pop(request_id, None)
        self.requests.labels(finished_reason=FINISH_ABORT).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
