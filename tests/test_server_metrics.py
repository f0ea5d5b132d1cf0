"""Metrics: the contract's names and types, and what each event moves (no server)."""

from __future__ import annotations

from gemma_serve.server.engine.outputs import RequestOutput, RequestTimes, StepStats
from gemma_serve.server.metrics import Metrics
from prometheus_client.parser import text_string_to_metric_families

CONTRACT = {
    "gemma_serve_requests_running": "gauge",
    "gemma_serve_requests_waiting": "gauge",
    "gemma_serve_kv_cache_usage_ratio": "gauge",
    # The parser names counter families without the _total suffix of their samples.
    "gemma_serve_prompt_tokens": "counter",
    "gemma_serve_generation_tokens": "counter",
    "gemma_serve_preemptions": "counter",
    "gemma_serve_requests": "counter",
    "gemma_serve_time_to_first_token_seconds": "histogram",
    "gemma_serve_inter_token_latency_seconds": "histogram",
    "gemma_serve_e2e_request_latency_seconds": "histogram",
    "gemma_serve_queue_time_seconds": "histogram",
    "gemma_serve_batch_tokens": "histogram",
}


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def output(rid: str, ids: tuple[int, ...], n_out: int, reason: str | None = None) -> RequestOutput:
    times = RequestTimes(arrival=10.0, first_scheduled=10.5, first_token=11.0, finished=14.0)
    return RequestOutput(
        request_id=rid,
        new_token_ids=ids,
        new_text="x" * len(ids),
        new_logprobs=None,
        num_prompt_tokens=7,
        num_output_tokens=n_out,
        finished=reason is not None,
        finish_reason=reason,
        times=times if reason else None,
    )


def test_contract_names_and_types() -> None:
    text = Metrics().render().decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in CONTRACT.items():
        assert types.get(name) == kind, name
    for name in ("prompt_tokens", "generation_tokens", "preemptions", "requests"):
        assert f"gemma_serve_{name}_total" in text
    s = samples(Metrics())
    for pool in ("global", "local"):
        assert s[("gemma_serve_kv_cache_usage_ratio", (("pool", pool),))] == 0.0
    for reason in ("stop", "length", "abort", "error"):
        assert s[("gemma_serve_requests_total", (("finished_reason", reason),))] == 0.0


def test_two_instances_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.on_output(output("r", (5,), 1, "stop"))
    assert samples(a)[("gemma_serve_generation_tokens_total", ())] == 1.0
    assert samples(b)[("gemma_serve_generation_tokens_total", ())] == 0.0


def test_request_outputs_move_counters_and_histograms() -> None:
    m = Metrics()
    m.on_output(output("a", (5,), 1), now=100.0)
    m.on_output(output("a", (6, 7), 3), now=100.5)  # two tokens in 0.5 s: two gaps of 0.25
    m.on_output(output("a", (), 3, "length"), now=101.0)
    m.on_output(output("b", (5,), 1), count_prompt=False, now=100.0)  # 2nd choice of a prompt
    m.on_output(output("b", (), 1, "stop"), now=100.1)
    m.on_output(output("c", (5,), 1), now=100.0)
    m.on_abort("c")
    s = samples(m)
    assert s[("gemma_serve_prompt_tokens_total", ())] == 14.0  # a and c; b shares a's prompt
    assert s[("gemma_serve_generation_tokens_total", ())] == 5.0
    for reason, count in [("length", 1), ("stop", 1), ("abort", 1), ("error", 0)]:
        assert s[("gemma_serve_requests_total", (("finished_reason", reason),))] == count
    assert s[("gemma_serve_inter_token_latency_seconds_count", ())] == 2.0
    assert s[("gemma_serve_inter_token_latency_seconds_sum", ())] == 0.5
    ttft = "gemma_serve_time_to_first_token_seconds"
    assert s[(f"{ttft}_count", ())] == 2.0 and s[(f"{ttft}_sum", ())] == 2.0
    assert s[("gemma_serve_queue_time_seconds_sum", ())] == 1.0
    assert s[("gemma_serve_e2e_request_latency_seconds_sum", ())] == 8.0


def test_step_stats() -> None:
    m = Metrics()
    m.on_step(StepStats(3, 2, 0.5, 0.25, 300, 1))
    m.on_step(StepStats(1, 0, 0.75, 0.5, 1, 2))
    s = samples(m)
    assert s[("gemma_serve_requests_running", ())] == 1.0
    assert s[("gemma_serve_requests_waiting", ())] == 0.0
    assert s[("gemma_serve_kv_cache_usage_ratio", (("pool", "global"),))] == 0.75
    assert s[("gemma_serve_kv_cache_usage_ratio", (("pool", "local"),))] == 0.5
    assert s[("gemma_serve_preemptions_total", ())] == 3.0
    assert s[("gemma_serve_batch_tokens_count", ())] == 2.0
    assert s[("gemma_serve_batch_tokens_bucket", (("le", "256.0"),))] == 1.0
    assert s[("gemma_serve_batch_tokens_bucket", (("le", "512.0"),))] == 2.0
    assert s[("gemma_serve_batch_tokens_bucket", (("le", "8192.0"),))] == 2.0
