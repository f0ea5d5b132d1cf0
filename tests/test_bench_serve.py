"""benchmarks/serve.py: statistics against hand-computed values, the workload, and whole runs
over real HTTP against gemma-serve's app (fake engine), checked against the server's own
records and /metrics counters."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from gemma_serve.server.app import Settings, create_app
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve import BenchConfig, RequestResult, main, run_benchmark, summarize
from benchmarks.serve_runner import sweep_configs
from benchmarks.serve_stats import describe_ms, plot_sweep
from benchmarks.serve_workload import (
    TokenCalibration,
    arrival_times,
    load_prompts_file,
    sample_lengths,
    synthetic_prompts,
)
from tests.fake_engine import FakeEngine
from tests.server_helpers import run_server


def ok(prompt: int, out: int, ttft: float, latency: float, itl: list[float]) -> RequestResult:
    return RequestResult(True, prompt, out, ttft, latency, itl)


# --- statistics --------------------------------------------------------------------------------


def test_describe_ms_matches_hand_computed_percentiles() -> None:
    # ms values 1, 2, 3, 4: linear interpolation at rank p/100 * 3.
    stats = describe_ms([0.001, 0.002, 0.003, 0.004])
    assert stats == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})
    assert describe_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_summarize_counts_throughput_and_latencies() -> None:
    results = [
        ok(10, 5, 0.1, 0.5, [0.1, 0.1, 0.1, 0.1]),  # tpot (0.5 - 0.1) / 4 = 0.1
        ok(20, 3, 0.2, 0.6, [0.2, 0.2]),  # tpot (0.6 - 0.2) / 2 = 0.2
        ok(4, 1, 0.3, 0.3, []),  # one token: no tpot
        RequestResult(False, error="HTTP 429: queue full", latency_s=0.01),
        RequestResult(False, error="HTTP 429: queue full", latency_s=0.01),
    ]
    s = summarize(results, duration_s=2.0)
    assert (s["requests"], s["completed"], s["errors"]) == (5, 3, 2)
    assert s["error_messages"] == {"HTTP 429: queue full": 2}
    assert (s["input_tokens"], s["output_tokens"]) == (34, 9)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx(21.5)
    assert s["ttft_ms"] == pytest.approx({"mean": 200.0, "p50": 200.0, "p90": 280.0, "p99": 298.0})
    assert s["tpot_ms"] == pytest.approx({"mean": 150.0, "p50": 150.0, "p90": 190.0, "p99": 199.0})
    # ITLs 100 x4, 200 x2: rank 0.9 * 5 = 4.5 -> 200.
    assert s["itl_ms"]["mean"] == pytest.approx(800 / 6)
    assert (s["itl_ms"]["p50"], s["itl_ms"]["p90"]) == pytest.approx((100.0, 200.0))
    assert s["e2el_ms"]["mean"] == pytest.approx(1400 / 3)


def test_tpot_is_none_for_failures_and_single_tokens() -> None:
    assert ok(3, 2, 0.5, 1.5, [1.0]).tpot_s == pytest.approx(1.0)
    assert ok(3, 1, 0.5, 0.5, []).tpot_s is None
    assert RequestResult(False, output_tokens=4, ttft_s=0.1, latency_s=1.0).tpot_s is None


def test_plot_sweep_without_matplotlib_writes_nothing(tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401

        pytest.skip("matplotlib installed: the skip path is not reachable")
    except ImportError:
        pass
    summary = summarize([ok(1, 2, 0.1, 0.2, [0.1])], 1.0)
    assert not plot_sweep([1, 2], [summary, summary], "concurrency", str(tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()


# --- workload and configuration --------------------------------------------------------------


def test_lengths_and_prompts_are_seeded_and_bounded() -> None:
    lengths = sample_lengths(1000, 100, 0.5, np.random.default_rng(0))
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 50
    assert sample_lengths(5, 7, 0.0, np.random.default_rng(1)) == [7] * 5
    a = synthetic_prompts(4, 30, 5, 0.0, seed=3, calibration=TokenCalibration(1.0, 2.0))
    assert a == synthetic_prompts(4, 30, 5, 0.0, seed=3, calibration=TokenCalibration(1.0, 2.0))
    assert all(len(p.prompt.split()) == 14 and p.max_tokens == 5 for p in a)  # (30 - 1) / 2
    assert a != synthetic_prompts(4, 30, 5, 0.0, seed=4)


def test_poisson_arrivals() -> None:
    assert arrival_times(3, math.inf, 0) == [0.0, 0.0, 0.0]
    times = arrival_times(4000, 10.0, 0)
    assert times[0] == 0.0 and times == sorted(times)
    assert np.mean(np.diff(times)) == pytest.approx(0.1, rel=0.05)


def test_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b", "max_tokens": 3}\n\n{"prompt": "c", "max_tokens": 1}\n')
    assert [(p.prompt, p.max_tokens) for p in load_prompts_file(path)] == [("a b", 3), ("c", 1)]
    assert [p.prompt for p in load_prompts_file(path, 3)] == ["a b", "c", "a b"]
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        load_prompts_file(path)


def test_config_validation_and_sweeps() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        BenchConfig(endpoint="embeddings")
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(concurrency=0)
    base = BenchConfig()
    assert base.label == "rate=inf" and BenchConfig(request_rate=2, concurrency=4).label == (
        "rate=2/s concurrency=4"
    )
    points = sweep_configs(base, concurrencies=[1, 8], num_prompts=[2, 16])
    assert [(p.concurrency, p.num_prompts, p.label) for p in points] == [
        (1, 2, "concurrency=1"),
        (8, 16, "concurrency=8"),
    ]
    assert [p.num_prompts for p in sweep_configs(base, rates=[1, 2], num_prompts=[5])] == [5, 5]
    with pytest.raises(ValueError, match="one each"):
        sweep_configs(base, rates=[1, 2, 3], num_prompts=[1, 2])
    with pytest.raises(ValueError, match="not both"):
        sweep_configs(base, rates=[1], concurrencies=[1])
    assert json.dumps(BenchConfig(api_key="secret").to_dict()).count("secret") == 0


# --- whole runs over HTTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(max_model_len=256, step_s=0.002)
    with run_server(create_app(lambda: engine, Settings())) as url:
        yield url, engine


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("gemma_serve_prompt_tokens_total", "gemma_serve_generation_tokens_total")
    }


def test_run_matches_usage_engine_and_metrics(served: tuple[str, FakeEngine]) -> None:
    url, engine = served
    # No warm-up: the test's own /metrics reading before the run sees every request.
    config = BenchConfig(
        base_url=url + "/v1",
        num_prompts=6,
        concurrency=3,
        input_len=32,
        output_len=5,
        warmup_requests=0,
    )
    submitted_before, before = set(engine.submitted), counters(url)
    result = asyncio.run(run_benchmark(config))
    after = counters(url)
    s, requests = result.summary, result.requests

    assert result.model == "fake-gemma"
    assert (s["requests"], s["completed"], s["errors"]) == (6, 6, 0)
    assert [r.output_tokens for r in requests] == [5] * 6  # ignore_eos: exactly max_tokens
    assert s["output_tokens"] == 30
    # The fake engine emits one chunk per token: 4 gaps per request.
    assert all(len(r.itl_s) == 4 and 0 < r.ttft_s <= r.latency_s for r in requests)
    # Exact prompt counts (from /tokenize) are what the engine received, and about input_len.
    new = [ids for rid, (ids, _) in engine.submitted.items() if rid not in submitted_before]
    assert s["input_tokens"] == sum(len(ids) for ids in new)
    assert sorted(r.prompt_tokens for r in requests) == sorted(len(ids) for ids in new)
    assert all(abs(r.prompt_tokens - 32) <= 12 for r in requests)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"], key
    # At most `concurrency` requests in flight at any moment.
    for r in requests:
        overlapping = [q for q in requests if q.start_s <= r.start_s < q.start_s + q.latency_s]
        assert len(overlapping) <= 3
    # The server's own counters moved by the benchmark's totals.
    delta = {k: after[k] - before[k] for k in after}
    assert delta["gemma_serve_generation_tokens_total"] == s["output_tokens"]
    assert delta["gemma_serve_prompt_tokens_total"] == s["input_tokens"]
    assert result.server_counters is not None
    assert result.server_counters["gemma_serve_generation_tokens_total"] == 30
    assert result.server_counters["gemma_serve_requests_total"] == 6


def test_chat_endpoint_at_a_poisson_rate(served: tuple[str, FakeEngine]) -> None:
    url, _ = served
    config = BenchConfig(
        base_url=url, endpoint="chat", num_prompts=3, request_rate=50.0, input_len=20, output_len=3
    )
    result = asyncio.run(run_benchmark(config))
    assert (result.summary["completed"], result.summary["output_tokens"]) == (3, 9)
    # Calibrated with the chat template included: about input_len in all.
    assert all(r.prompt_tokens and abs(r.prompt_tokens - 20) <= 10 for r in result.requests)


def test_failed_requests_are_counted_not_raised(served: tuple[str, FakeEngine]) -> None:
    url, _ = served
    too_long = BenchConfig(base_url=url, num_prompts=3, input_len=16, output_len=400)
    s = asyncio.run(run_benchmark(too_long)).summary
    assert (s["completed"], s["errors"], s["output_tokens"]) == (0, 3, 0)
    assert sum(s["error_messages"].values()) == 3
    assert all(m.startswith("HTTP 400: This model's maximum context") for m in s["error_messages"])

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = BenchConfig(base_url=dead, model="m", num_prompts=2, input_len=8, output_len=2)
    s = asyncio.run(run_benchmark(config)).summary
    assert (s["completed"], s["errors"]) == (0, 2)
    assert next(iter(s["error_messages"])).startswith("ConnectError")


def test_cli_sweep_writes_table_and_json(
    served: tuple[str, FakeEngine], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = served
    out = tmp_path / "results.json"
    argv = ["--base-url", url, "--sweep-concurrency", "1,2", "--num-prompts", "2,4"]
    argv += ["--input-len", "16", "--output-len", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "concurrency=1" in printed and "concurrency=2" in printed and "TTFT" in printed
    runs = json.loads(out.read_text())["runs"]
    assert [(r["label"], r["summary"]["completed"]) for r in runs] == [
        ("concurrency=1", 2),
        ("concurrency=2", 4),
    ]
    assert runs[1]["summary"]["output_tokens"] == sum(
        q["output_tokens"] for q in runs[1]["requests"]
    )
