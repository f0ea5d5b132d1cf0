"""Bad input, refusals and failures over real HTTP: each gets its status and the OpenAI error
body, and the server keeps serving. Also: API keys, loading, disconnects, metrics end to end."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from gemma_serve.server.app import Settings, create_app
from gemma_serve.server.engine.errors import QueueFullError
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_engine import FakeEngine
from tests.server_helpers import run_server, sse_payloads

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(max_model_len=64)
    with run_server(create_app(lambda: engine, Settings(max_body_bytes=4096))) as url:
        yield url, engine


def assert_error(r: httpx.Response, status: int, param: str | None = "?") -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["code"] is None or isinstance(error["code"], int | str)
    if param != "?":
        assert error["param"] == param
    assert "Traceback" not in error["message"]
    return error


def assert_still_serving(url: str, headers: dict[str, str] | None = None) -> None:
    r = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "ok", "max_tokens": 2}, headers=headers)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"


BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    # (name, path, json body or raw bytes, status, param)
    ("max_tokens string", COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens negative", COMPLETIONS, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", COMPLETIONS, {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("temperature < 0", COMPLETIONS, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("temperature > 2", CHAT, {"messages": USER, "temperature": 3}, 400, "temperature"),
    ("top_p > 1", COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("n = 0", CHAT, {"messages": USER, "n": 0}, 400, "n"),
    ("n too large", COMPLETIONS, {"prompt": "x", "n": 1000}, 400, "n"),
    ("logprobs 50", COMPLETIONS, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("top_logprobs 50", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("top_logprobs alone", CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("user message without content", CHAT, {"messages": [{"role": "user"}]}, 400,
     "messages[0]"),
    ("empty prompt list", COMPLETIONS, {"prompt": []}, 400, "prompt"),
    ("missing prompt", COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
    ("token id out of vocab", COMPLETIONS, {"prompt": [10**6]}, 400, "prompt"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ("roles not alternating", CHAT, {"messages": USER * 2}, 400, "messages"),
    ("penalty out of range", CHAT, {"messages": USER, "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("too many stops", COMPLETIONS, {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("bad logit_bias", COMPLETIONS, {"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("logit_bias id", COMPLETIONS, {"prompt": "x", "logit_bias": {"9999": 1}}, 400, "logit_bias"),
    ("min_tokens > max", COMPLETIONS, {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400,
     "min_tokens"),
    ("max_tokens negative with echo", COMPLETIONS, {"prompt": "x", "echo": True, "max_tokens": -1},
     400, "max_tokens"),
    ("suffix", COMPLETIONS, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("stream_options w/o stream", CHAT, {"messages": USER, "stream_options": {}}, 400,
     "stream_options"),
    ("stream not bool", CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
    ("invalid JSON", COMPLETIONS, b'{"prompt": "x",', 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("array body", CHAT, b"[]", 400, None),
    ("unknown model", COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("unknown model chat", CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
    ("prompt too long", COMPLETIONS, {"prompt": "x" * 80}, 400, "prompt"),
    ("prompt + max_tokens too long", CHAT, {"messages": USER, "max_tokens": 60}, 400,
     "max_tokens"),
    ("prompt + max_completion_tokens too long", CHAT,
     {"messages": USER, "max_completion_tokens": 60}, 400, "max_completion_tokens"),
    ("top_k past int64", COMPLETIONS, {"prompt": "x", "top_k": 2**63}, 400, "top_k"),
    ("body too large", COMPLETIONS, {"prompt": "x" * 5000}, 413, None),
    ("tokenize without prompt", "/tokenize", {}, 400, "prompt"),
    ("detokenize bad ids", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("unknown route", "/v1/nothing", {}, 404, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests(
    served: tuple[str, FakeEngine], path: str, body: Any, status: int, param: str | None
) -> None:
    url, _ = served
    if isinstance(body, bytes):
        r = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{url}{path}", json=body)
    error = assert_error(r, status, param)
    if status == 404 and param == "model":
        assert (error["type"], error["code"]) == ("NotFoundError", "model_not_found")
    assert_still_serving(url)


def test_context_error_gives_the_numbers(served: tuple[str, FakeEngine]) -> None:
    url, _ = served
    r = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "abc", "max_tokens": 70})
    error = assert_error(r, 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    for number in ("64", "74", "4", "70"):  # limit, total, prompt (with BOS), max_tokens
        assert number in error["message"]


def test_streamed_body_over_the_limit_is_413(served: tuple[str, FakeEngine]) -> None:
    url, _ = served

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(f"{url}{COMPLETIONS}", content=chunks())
    assert_error(r, 413)
    assert_still_serving(url)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", COMPLETIONS, 405), ("GET", "/nope", 404), ("DELETE", "/health", 405)],
)
def test_wrong_routes_and_methods(
    served: tuple[str, FakeEngine], method: str, path: str, status: int
) -> None:
    assert_error(httpx.request(method, f"{served[0]}{path}"), status)


def test_engine_errors(served: tuple[str, FakeEngine]) -> None:
    url, engine = served
    body = {"prompt": "abc", "max_tokens": 3}
    try:
        engine.queue_full = True
        error = assert_error(httpx.post(f"{url}{COMPLETIONS}", json=body), 429)
        assert error["type"] == "RateLimitError"
        assert_error(httpx.post(f"{url}{CHAT}", json={"messages": USER, "stream": True}), 429)
        engine.queue_full = False
        engine.fail_with = ValueError("unsupported thing")
        error = assert_error(httpx.post(f"{url}{COMPLETIONS}", json=body), 400)
        assert "unsupported thing" in error["message"]
        engine.fail_with = None
        engine.error_output = "device on fire"
        error = assert_error(httpx.post(f"{url}{COMPLETIONS}", json=body), 500)
        assert "device on fire" in error["message"]
        r = httpx.post(f"{url}{COMPLETIONS}", json={**body, "stream": True})
        payloads = list(sse_payloads(iter(r.text.splitlines())))
        assert r.status_code == 200 and payloads[-1] == "[DONE]"
        assert "device on fire" in payloads[-2] and '"error"' in payloads[-2]
        assert json.loads(payloads[-2])["error"]["code"] == 500  # as without streaming
    finally:
        engine.queue_full, engine.fail_with, engine.error_output = False, None, None
    assert_still_serving(url)


def test_queue_full_after_the_first_choice_aborts_the_others(
    served: tuple[str, FakeEngine],
) -> None:
    url, engine = served
    original = engine.generate
    calls = []

    def second_fails(request_id: str, prompt_ids: list[int], params: Any) -> Any:
        calls.append(request_id)
        if len(calls) == 2:
            raise QueueFullError("full")
        return original(request_id, prompt_ids, params)

    engine.generate = second_fails  # type: ignore[method-assign]
    try:
        body = {"prompt": "abc", "max_tokens": 50, "n": 2, "ignore_eos": True}
        assert_error(httpx.post(f"{url}{COMPLETIONS}", json=body), 429)
    finally:
        engine.generate = original  # type: ignore[method-assign]
    assert not engine.active


def test_what_openai_accepts_is_accepted(served: tuple[str, FakeEngine]) -> None:
    """An empty prompt (BOS alone), a prefilled assistant turn without content, HEAD /health."""
    url, engine = served
    r = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": ["", "a"], "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert [ids for ids, _ in engine.submitted.values()][-2] == [engine.tokenizer.bos_id]
    messages = [*USER, {"role": "assistant"}, {"role": "user", "content": "more"}]
    assert httpx.post(f"{url}{CHAT}", json={"messages": messages}).status_code == 200
    head = httpx.head(f"{url}/health")
    assert head.status_code == 200 and head.content == b""


def test_more_choices_than_the_queue_holds_is_a_400(served: tuple[str, FakeEngine]) -> None:
    """prompts x n over --max-queued-requests could never be queued: 400, not a 429 forever."""
    url, engine = served
    saved, engine.max_queued_requests = engine.max_queued_requests, 4
    try:
        body = {"prompt": ["a", "b"], "max_tokens": 2, "n": 3}
        error = assert_error(httpx.post(f"{url}{COMPLETIONS}", json=body), 400, "n")
        assert "makes 6 completions" in error["message"] and not engine.active
        r = httpx.post(f"{url}{COMPLETIONS}", json={**body, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
    finally:
        engine.max_queued_requests = saved


def test_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for settings, env in [(Settings(api_key="s3cret"), None), (Settings(), "s3cret")]:
        if env:
            monkeypatch.setenv("GEMMA_SERVE_API_KEY", env)
        with run_server(create_app(FakeEngine, settings)) as url:
            body = {"prompt": "ok", "max_tokens": 2}
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
                r = httpx.post(f"{url}{COMPLETIONS}", json=body, headers=headers)
                assert assert_error(r, 401)["type"] == "AuthenticationError"
            assert_error(httpx.get(f"{url}/v1/models"), 401)
            assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "a"}), 401)
            assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [5]}), 401)
            assert httpx.get(f"{url}/health").status_code == 200
            assert httpx.get(f"{url}/metrics").status_code == 200
            assert_still_serving(url, {"Authorization": "Bearer s3cret"})
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
            assert client.completions.create(model="fake-gemma", prompt="ab").choices[0].text
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_health_is_503_until_the_engine_has_loaded() -> None:
    loaded = threading.Event()
    engine = FakeEngine()

    def slow_provider() -> FakeEngine:
        loaded.wait(10)
        return engine

    with run_server(create_app(slow_provider), wait_ready=False) as url:
        error = assert_error(httpx.get(f"{url}/health"), 503)
        assert error["code"] == "model_loading"
        assert_error(httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "x"}), 503)
        assert httpx.get(f"{url}/metrics").status_code == 200
        loaded.set()
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert_still_serving(url)


def test_failed_load_is_reported() -> None:
    failures: list[BaseException] = []

    def broken() -> FakeEngine:
        raise FileNotFoundError("no such checkpoint")

    app = create_app(broken, on_fatal_error=failures.append)
    with run_server(app, wait_ready=False) as url:
        deadline = time.monotonic() + 5
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        error = assert_error(httpx.get(f"{url}/health"), 503)
        assert "no such checkpoint" in error["message"]
    assert isinstance(failures[0], FileNotFoundError)


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_client_dropping_a_stream_aborts_the_request(path: str) -> None:
    engine = FakeEngine(step_s=0.02, max_model_len=1024)
    body = {"max_tokens": 500, "ignore_eos": True, "stream": True, "n": 2}
    body |= {"prompt": "abc"} if path == COMPLETIONS else {"messages": USER}
    with run_server(create_app(lambda: engine)) as url:
        with httpx.stream("POST", f"{url}{path}", json=body) as r:
            events = sse_payloads(r.iter_lines())
            for _ in range(6):
                next(events)
        # Leaving the block closes the connection mid-stream.
        wait_for(lambda: len(engine.aborted) == 2)
        assert sorted(engine.aborted) == sorted(engine.submitted)
        assert not engine.active
        metrics = httpx.get(f"{url}/metrics").text
        assert 'gemma_serve_requests_total{finished_reason="abort"} 2.0' in metrics
        assert_still_serving(url)


def test_client_giving_up_on_a_non_streaming_request_aborts_it() -> None:
    engine = FakeEngine(step_s=0.02, max_model_len=1024)
    with run_server(create_app(lambda: engine)) as url:
        body = {"prompt": "abc", "max_tokens": 500, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{COMPLETIONS}", json=body, timeout=0.3)
        wait_for(lambda: len(engine.aborted) == 1)
        assert engine.aborted == list(engine.submitted)


def scrape(url: str) -> dict[str, Any]:
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {}
    for family in families.values():
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            values[key] = s.value
    return {"types": {n: f.type for n, f in families.items()}, "values": values}


def test_metrics_count_exactly_what_was_served(served: tuple[str, FakeEngine]) -> None:
    url, _ = served
    before = scrape(url)
    types = before["types"]
    for name in ("requests_running", "requests_waiting", "kv_cache_usage_ratio"):
        assert types[f"gemma_serve_{name}"] == "gauge"
    for name in ("prompt_tokens", "generation_tokens", "preemptions", "requests"):
        assert types[f"gemma_serve_{name}"] == "counter"
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "queue_time_seconds",
        "batch_tokens",
    ):
        assert types[f"gemma_serve_{name}"] == "histogram"

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    prompt_tokens = completion_tokens = 0
    for i in range(3):
        r = client.completions.create(model="fake-gemma", prompt="hello"[: i + 2], max_tokens=4)
        prompt_tokens += r.usage.prompt_tokens
        completion_tokens += r.usage.completion_tokens
    r = client.chat.completions.create(model="fake-gemma", messages=USER, n=2, max_tokens=30)
    prompt_tokens += r.usage.prompt_tokens
    completion_tokens += r.usage.completion_tokens
    stream = client.completions.create(
        model="fake-gemma", prompt="ab", stream=True, stream_options={"include_usage": True}
    )
    usage = list(stream)[-1].usage
    prompt_tokens += usage.prompt_tokens
    completion_tokens += usage.completion_tokens

    after = scrape(url)

    def delta(key: str) -> float:
        return after["values"][key] - before["values"].get(key, 0.0)

    assert delta("gemma_serve_prompt_tokens_total") == prompt_tokens
    assert delta("gemma_serve_generation_tokens_total") == completion_tokens
    # Only "hell" runs into max_tokens=4 before the fake's EOS; the other five stop.
    assert delta("gemma_serve_requests_total,finished_reason=length") == 1
    assert delta("gemma_serve_requests_total,finished_reason=stop") == 5
    assert delta("gemma_serve_time_to_first_token_seconds_count") == 6
    assert delta("gemma_serve_e2e_request_latency_seconds_count") == 6
    assert delta("gemma_serve_batch_tokens_count") > 0
