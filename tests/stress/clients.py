"""HTTP clients for the stress tests: requests that may walk away, metrics, memory.

Every call is bounded: httpx timeouts on each request, a deadline on every poll.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.stress.workload import Expected, Spec

REQUEST_TIMEOUT_S = 120.0  # no single request of these tests comes near it


@dataclass
class Outcome:
    """What one client saw."""

    spec: Spec
    stream: bool
    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: dict[str, Any] | None = None  # the error body (or the SSE error event)
    disconnected: bool = False  # the client went away before the end
    done: bool = False  # the full JSON body, or the stream up to [DONE]
    events: list[str] = field(default_factory=list)  # SSE payloads, in order
    event_times: list[float] = field(default_factory=list)  # time.monotonic() of each

    def check(self, expected: Expected) -> None:
        """A complete response with exactly the greedy result served alone."""
        what = f"{self.spec} (stream={self.stream})"
        assert self.status == 200 and self.done and self.error is None, (what, self.error)
        assert self.text == expected.text, (what, self.text, expected.text)
        assert self.finish_reason == expected.finish_reason, (what, self.finish_reason)
        if self.completion_tokens is not None:
            assert self.completion_tokens == expected.num_tokens, what


def _absorb(outcome: Outcome, body: dict[str, Any]) -> None:
    """A JSON response or one stream chunk: text, finish reason and usage of choice 0."""
    for choice in body.get("choices", ()):
        piece = choice.get("text")
        if piece is None:
            piece = (choice.get("message") or choice.get("delta") or {}).get("content")
        outcome.text += piece or ""
        outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
    if body.get("usage"):
        outcome.completion_tokens = body["usage"]["completion_tokens"]


async def call(
    client: httpx.AsyncClient,
    spec: Spec,
    *,
    stream: bool,
    leave_after_events: int | None = None,
    give_up_after_s: float | None = None,
    include_usage: bool = False,
    started: asyncio.Event | None = None,
) -> Outcome:
    """One request. A streaming client may close the connection after some events; a
    non-streaming one may give up (cancel) after some seconds. `started` is set once the
    request is in flight: when it is sent (non-streaming) or its first event arrived."""
    outcome = Outcome(spec, stream)
    body = spec.body(stream=stream, include_usage=include_usage)
    started = started or asyncio.Event()
    if not stream:
        started.set()
        try:
            r = await asyncio.wait_for(client.post(spec.path, json=body), give_up_after_s)
        except asyncio.TimeoutError:
            outcome.disconnected = True
            return outcome
        outcome.status = r.status_code
        payload = r.json()
        if r.status_code == 200:
            _absorb(outcome, payload)
            outcome.done = True
        else:
            outcome.error = payload.get("error")
        return outcome
    async with client.stream("POST", spec.path, json=body) as r:
        outcome.status = r.status_code
        if r.status_code != 200:
            outcome.error = json.loads(await r.aread()).get("error")
            return outcome
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            outcome.events.append(data)
            outcome.event_times.append(time.monotonic())
            if data == "[DONE]":
                outcome.done = True
                break
            started.set()
            chunk = json.loads(data)
            if "error" in chunk:
                outcome.error = chunk["error"]
            else:
                _absorb(outcome, chunk)
            if leave_after_events is not None and len(outcome.events) >= leave_after_events:
                outcome.disconnected = True  # leaving the block closes the connection
                break
    return outcome


def async_client(url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S)


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics: 'name' or 'name{label="value"}' -> value."""
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[str, float]:
    """The Prometheus text format as 'name' or 'name{label="value"}' -> value."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


IDLE_GAUGES = (
    "gemma_serve_requests_running",
    "gemma_serve_requests_waiting",
    'gemma_serve_kv_cache_usage_ratio{pool="global"}',
    'gemma_serve_kv_cache_usage_ratio{pool="local"}',
)


def wait_idle(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """Polls /metrics until no request runs or waits and both KV pools are empty."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = scrape(url)
        if all(values[g] == 0 for g in IDLE_GAUGES):
            return values
        if time.monotonic() > deadline:
            raise AssertionError({g: values[g] for g in IDLE_GAUGES})
        time.sleep(0.05)


def finished_requests(values: dict[str, float]) -> dict[str, float]:
    """gemma_serve_requests_total by finished_reason."""
    prefix = 'gemma_serve_requests_total{finished_reason="'
    return {k[len(prefix) : -2]: v for k, v in values.items() if k.startswith(prefix)}


def rss_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def bounded(coro: Any, timeout_s: float) -> Any:
    """Awaits coro, failing the test (not hanging it) after timeout_s."""
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except asyncio.TimeoutError as exc:
        raise AssertionError(f"did not finish within {timeout_s:.0f}s") from exc
