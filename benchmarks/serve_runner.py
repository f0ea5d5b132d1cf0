"""The serving benchmark's core: one configuration (`BenchConfig`) run against a server
(`run_benchmark`), giving every request's timings and a summary (`BenchResult`).

Load: requests arrive as a Poisson process at `request_rate` (inf: all at once) and at most
`concurrency` are in flight (with an infinite rate: that many clients sending back to back).
The server's /metrics counters are read before and after the measured requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx

from benchmarks.serve_client import (
    ENDPOINTS,
    Endpoint,
    RequestResult,
    auth_headers,
    calibrate,
    count_tokens,
    first_model,
    normalize_base_url,
    scrape_counters,
    send_request,
)
from benchmarks.serve_stats import summarize
from benchmarks.serve_workload import (
    PromptSpec,
    arrival_times,
    load_prompts_file,
    synthetic_prompts,
)

logger = logging.getLogger(__name__)
DEFAULT_NUM_PROMPTS = 200
WARMUP_MAX_TOKENS = 16  # enough to compile and run prefill and decode once
TOKENIZE_PARALLEL = 16
Progress = Callable[[int, int], None]  # (requests done, requests in the run)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the target, the workload and the load."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    endpoint: str = "completions"  # or "chat"
    num_prompts: int | None = None  # None: DEFAULT_NUM_PROMPTS, or every line of prompts_file
    input_len: int = 512  # synthetic prompts: mean prompt tokens
    output_len: int = 128  # synthetic prompts: max_tokens (exact with ignore_eos)
    range_ratio: float = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]
    prompts_file: str | None = None  # JSONL {"prompt": str, "max_tokens": int}
    seed: int = 0
    request_rate: float = math.inf  # Poisson arrivals (req/s); inf: all at once
    concurrency: int | None = None  # most requests in flight; None: no limit
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: tuple[tuple[str, Any], ...] = ()  # JSON fields merged into every request
    warmup_requests: int = 1  # sent (short) before measuring, not counted
    timeout_s: float = 600.0  # httpx timeout: connecting, and each wait for the next bytes

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}: {self.endpoint!r}")
        positive = {"input_len": self.input_len, "output_len": self.output_len}
        positive |= {"num_prompts": self.num_prompts, "concurrency": self.concurrency}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (or inf), got {self.request_rate}")
        if self.warmup_requests < 0 or self.timeout_s <= 0 or self.temperature < 0:
            raise ValueError("warmup_requests, temperature must be >= 0 and timeout_s > 0")

    @property
    def label(self) -> str:
        """The load, e.g. 'concurrency=8', 'rate=2/s', 'rate=2/s concurrency=8', 'rate=inf'."""
        parts = [] if math.isinf(self.request_rate) else [f"rate={self.request_rate:g}/s"]
        parts += [f"concurrency={self.concurrency}"] if self.concurrency else []
        return " ".join(parts) or "rate=inf"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings: the API key is left out, an infinite rate is "inf"."""
        d = asdict(self)
        d["api_key"] = "<set>" if self.api_key else None
        d["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return d


@dataclass
class BenchResult:
    """One run: its settings, the summary, each request, and the server's counter deltas."""

    config: BenchConfig
    model: str
    summary: dict[str, Any]
    requests: list[RequestResult]
    server_counters: dict[str, float] | None  # /metrics counters' increase over the run

    def to_dict(self, detailed: bool = False) -> dict[str, Any]:
        """JSON-safe; each request's inter-token latencies only when detailed."""
        requests = []
        for r in self.requests:
            item = asdict(r)
            item["tpot_s"] = r.tpot_s
            if not detailed:
                del item["itl_s"]
            requests.append(item)
        return {
            "label": self.config.label,
            "config": self.config.to_dict(),
            "model": self.model,
            "summary": self.summary,
            "server_counters": self.server_counters,
            "requests": requests,
        }


async def run_benchmark(config: BenchConfig, on_progress: Progress | None = None) -> BenchResult:
    """Runs one configuration against the server. Failed requests are counted, not raised;
    raises only when the benchmark cannot start (no model listed, unreadable prompts file)."""
    base_url = normalize_base_url(config.base_url)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        headers=auth_headers(config.api_key), timeout=config.timeout_s, limits=limits
    ) as client:
        model = config.model or await first_model(client, base_url)
        endpoint = Endpoint(
            base_url,
            model,
            config.endpoint,
            config.temperature,
            config.ignore_eos,
            config.extra_body,
        )
        prompts = await _prepare_prompts(client, endpoint, config)
        await _warm_up(client, endpoint, prompts, config)
        before = await scrape_counters(client, base_url)
        results, duration = await _run_requests(client, endpoint, prompts, config, on_progress)
        after = await scrape_counters(client, base_url)
    deltas = None
    if before is not None and after is not None:
        deltas = {k: v - before.get(k, 0.0) for k, v in sorted(after.items())}
    return BenchResult(config, model, summarize(results, duration), results, deltas)


async def _prepare_prompts(
    client: httpx.AsyncClient, endpoint: Endpoint, config: BenchConfig
) -> list[PromptSpec]:
    """The run's prompts, with exact token counts when the server has /tokenize."""
    if config.prompts_file:
        specs = load_prompts_file(config.prompts_file, config.num_prompts)
    else:
        specs = synthetic_prompts(
            config.num_prompts or DEFAULT_NUM_PROMPTS,
            config.input_len,
            config.output_len,
            config.range_ratio,
            config.seed,
            await calibrate(client, endpoint),
        )
    texts = list(dict.fromkeys(s.prompt for s in specs))
    if await count_tokens(client, endpoint, texts[0]) is None:
        return specs  # no /tokenize: prompt counts come from the responses' usage
    gate = asyncio.Semaphore(TOKENIZE_PARALLEL)

    async def count(text: str) -> int | None:
        async with gate:
            return await count_tokens(client, endpoint, text)

    counts = dict(zip(texts, await asyncio.gather(*(count(t) for t in texts)), strict=True))
    return [replace(s, prompt_tokens=counts[s.prompt]) for s in specs]


async def _warm_up(
    client: httpx.AsyncClient, endpoint: Endpoint, prompts: list[PromptSpec], config: BenchConfig
) -> None:
    """A few short requests first (kernel compilation, lazy allocations); not measured."""
    n = config.warmup_requests
    specs = [prompts[i % len(prompts)] for i in range(n)]
    specs = [replace(s, max_tokens=min(s.max_tokens, WARMUP_MAX_TOKENS)) for s in specs]
    start = time.perf_counter()
    results = await asyncio.gather(*(send_request(client, endpoint, s, start) for s in specs))
    for r in results:
        if not r.ok:
            logger.warning("warm-up request failed: %s", r.error)


async def _run_requests(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    prompts: list[PromptSpec],
    config: BenchConfig,
    on_progress: Progress | None,
) -> tuple[list[RequestResult], float]:
    """Sends every prompt at its arrival time, at most `concurrency` at once (a request waits
    for a free slot after it arrives); returns the results and the run's wall time."""
    arrivals = arrival_times(len(prompts), config.request_rate, config.seed + 1)
    gate: contextlib.AbstractAsyncContextManager[Any] = (
        asyncio.Semaphore(config.concurrency) if config.concurrency else contextlib.nullcontext()
    )
    done = 0
    start = time.perf_counter()

    async def one(spec: PromptSpec, at: float) -> RequestResult:
        nonlocal done
        delay = at - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            result = await send_request(client, endpoint, spec, start)
        done += 1
        if on_progress is not None:
            on_progress(done, len(prompts))
        return result

    results = await asyncio.gather(*(one(s, t) for s, t in zip(prompts, arrivals, strict=True)))
    return list(results), time.perf_counter() - start


def sweep_configs(
    base: BenchConfig,
    *,
    concurrencies: Sequence[int] = (),
    rates: Sequence[float] = (),
    num_prompts: Sequence[int] = (),
) -> list[BenchConfig]:
    """One config per swept concurrency or rate (not both); num_prompts gives one count for all
    points or one per point."""
    if concurrencies and rates:
        raise ValueError("sweep either concurrency or request rate, not both")
    points = [replace(base, concurrency=c) for c in concurrencies]
    points += [replace(base, request_rate=r) for r in rates]
    points = points or [base]
    if len(num_prompts) > 1 and len(num_prompts) != len(points):
        raise ValueError(
            f"{len(num_prompts)} values of num_prompts for {len(points)} runs: give one or one each"
        )
    counts = list(num_prompts) * len(points) if len(num_prompts) == 1 else list(num_prompts)
    return (
        [replace(p, num_prompts=n) for p, n in zip(points, counts, strict=True)]
        if counts
        else points
    )
