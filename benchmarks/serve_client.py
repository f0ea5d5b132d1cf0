"""The serving benchmark's HTTP side: one timed streaming request, and the server's helper routes
(/v1/models, /tokenize, /metrics, /health).

A request never raises: whatever goes wrong (HTTP status, connection, malformed stream) becomes
a `RequestResult` with ok=False and the reason in `error`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.serve_workload import WORDS, PromptSpec, TokenCalibration

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
CALIBRATION_WORDS = 200


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    ok: bool
    prompt_tokens: int | None = None  # /tokenize count if known, else the usage's prompt_tokens
    output_tokens: int = 0  # usage.completion_tokens (content chunks when usage is missing)
    ttft_s: float | None = None  # to the first chunk with non-empty content
    latency_s: float = 0.0  # end to end, up to data: [DONE]
    itl_s: list[float] = field(default_factory=list)  # between consecutive content chunks
    start_s: float = 0.0  # when it was sent, from the start of the run
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send the benchmark's requests."""

    base_url: str
    model: str
    kind: str = "completions"  # or "chat"
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: tuple[tuple[str, Any], ...] = ()  # merged into every request (e.g. logit_bias)

    def body(self, spec: PromptSpec) -> dict[str, Any]:
        """The streaming request body for one prompt."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": spec.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": self.ignore_eos,  # gemma-serve / vLLM extension: exact output lengths
        }
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        body.update(dict(self.extra_body))
        return body


def normalize_base_url(url: str) -> str:
    """'http://host:8000/v1/' -> 'http://host:8000' (routes are appended here)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def send_request(
    client: httpx.AsyncClient, endpoint: Endpoint, spec: PromptSpec, run_start: float
) -> RequestResult:
    """Sends one streaming request and times its chunks; never raises (except cancellation)."""
    sent = time.perf_counter()
    start_s = sent - run_start
    url = endpoint.base_url + ENDPOINTS[endpoint.kind]
    try:
        async with client.stream("POST", url, json=endpoint.body(spec)) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {_error_message(text)}"
                return RequestResult(False, latency_s=time.perf_counter() - sent, error=error)
            result = await _read_stream(response, endpoint.kind, spec, sent)
    except Exception as exc:  # a benchmark counts failures, it does not stop on them
        result = RequestResult(False, latency_s=time.perf_counter() - sent, error=_describe(exc))
    result.start_s = start_s
    return result


async def _read_stream(
    response: httpx.Response, kind: str, spec: PromptSpec, sent: float
) -> RequestResult:
    ttft: float | None = None
    last = sent
    itl: list[float] = []
    usage: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        payload = line[len("data:") :].strip()
        now = time.perf_counter()
        if payload == "[DONE]":
            prompt_tokens = spec.prompt_tokens or usage.get("prompt_tokens")
            output_tokens = usage.get("completion_tokens", len(itl) + (ttft is not None))
            return RequestResult(True, prompt_tokens, output_tokens, ttft, now - sent, itl)
        event = json.loads(payload)
        if "error" in event:
            message = event["error"].get("message") if isinstance(event["error"], dict) else None
            error = f"error in stream: {message or event['error']}"
            return RequestResult(False, latency_s=now - sent, error=error)
        usage = event.get("usage") or usage
        if _has_content(event, kind):
            if ttft is None:
                ttft = now - sent
            else:
                itl.append(now - last)
            last = now
    return RequestResult(False, latency_s=time.perf_counter() - sent, error="stream ended early")


def _has_content(event: dict[str, Any], kind: str) -> bool:
    for choice in event.get("choices") or ():
        text = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
        if text:
            return True
    return False


def _error_message(text: str) -> str:
    """The message of an OpenAI-shaped error body, else the body's start."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200] or "(empty body)"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id that GET /v1/models lists."""
    response = await client.get(base_url + "/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return str(models[0]["id"])


async def count_tokens(client: httpx.AsyncClient, endpoint: Endpoint, text: str) -> int | None:
    """The prompt's token count from POST /tokenize (chat: with the template), or None when the
    server has no such route or it fails."""
    body: dict[str, Any] = {"model": endpoint.model}
    if endpoint.kind == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    try:
        response = await client.post(endpoint.base_url + "/tokenize", json=body)
        if response.status_code != 200:
            return None
        data = response.json()
        return int(data["count"]) if "count" in data else len(data["tokens"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


async def calibrate(client: httpx.AsyncClient, endpoint: Endpoint) -> TokenCalibration | None:
    """Tokens per word of WORDS and the fixed overhead (BOS, chat template), via /tokenize."""
    sample = " ".join(WORDS[i % len(WORDS)] for i in range(CALIBRATION_WORDS))
    empty, full = await asyncio.gather(
        count_tokens(client, endpoint, ""), count_tokens(client, endpoint, sample)
    )
    if empty is None or full is None or full <= empty:
        return None
    return TokenCalibration(overhead=empty, per_word=(full - empty) / CALIBRATION_WORDS)


async def scrape_counters(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    """Counter values from GET /metrics (Prometheus text), summed over labels and keyed by
    sample name (e.g. gemma_serve_generation_tokens_total); None if unavailable."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return None
    try:
        response = await client.get(base_url + "/metrics")
        if response.status_code != 200:
            return None
        counters: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            if family.type != "counter":
                continue
            for s in family.samples:
                if s.name.endswith("_total"):
                    counters[s.name] = counters.get(s.name, 0.0) + s.value
        return counters
    except (httpx.HTTPError, ValueError):
        return None


async def wait_ready(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> None:
    """Polls GET /health until it answers 200; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    status: int | str = "no answer"
    while time.monotonic() < deadline:
        try:
            status = (await client.get(base_url + "/health")).status_code
            if status == 200:
                return
        except httpx.HTTPError as exc:
            status = _describe(exc)
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{base_url}/health not ready after {timeout_s:.0f}s (last: {status})")
