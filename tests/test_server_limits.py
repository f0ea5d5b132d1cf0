"""The input limits of server/limits.py (and the context bound): each one refuses just over the
limit with a clear 400/413 naming the parameter, and accepts exactly at the limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic
import pytest
from gemma_serve.server.app import Settings, create_app
from gemma_serve.server.limits import (
    MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_STOP_LEN,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
)
from gemma_serve.server.protocol import CompletionRequest, parse_request

from tests.fake_engine import FakeEngine
from tests.server_helpers import run_server

CONTEXT = 64
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(max_model_len=CONTEXT)
    with run_server(create_app(lambda: engine, Settings())) as url:  # default body limit
        yield url, engine


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "ab", "max_tokens": 1, **fields}


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


# (name, path, body, status, param); param "-" means "not checked" (whole-body errors).
OVER_THE_LIMIT: list[tuple[str, str, Any, int, str | None]] = [
    ("n", COMPLETIONS, completion(n=MAX_N + 1), 400, "n"),
    ("best_of", COMPLETIONS, completion(n=1, best_of=MAX_N + 1), 400, "best_of"),
    ("chat n", CHAT, {"messages": USER, "n": MAX_N + 1}, 400, "n"),
    ("batched prompts", COMPLETIONS, completion(prompt=["a"] * (MAX_PROMPTS + 1)), 400,
     "prompt"),
    ("batched id prompts", COMPLETIONS, completion(prompt=[[5]] * (MAX_PROMPTS + 1)), 400,
     "prompt"),
    ("prompts x n", COMPLETIONS, completion(prompt=["a"] * (MAX_CHOICES // MAX_N + 1), n=MAX_N),
     400, "n"),
    ("stop strings", COMPLETIONS, completion(stop=["x"] * (MAX_STOP + 1)), 400, "stop"),
    ("stop length", CHAT, {"messages": USER, "stop": "x" * (MAX_STOP_LEN + 1)}, 400, "stop"),
    ("logit_bias entries", COMPLETIONS,
     completion(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), 400, "logit_bias"),
    ("logprobs", COMPLETIONS, completion(logprobs=MAX_LOGPROBS + 1), 400, "logprobs"),
    ("top_logprobs", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1},
     400, "top_logprobs"),
    ("prompt over the context", COMPLETIONS, completion(prompt="x" * CONTEXT), 400, "prompt"),
    ("prompt ids over the context", COMPLETIONS, completion(prompt=[5] * (CONTEXT + 1)), 400,
     "prompt"),
    ("max_tokens over the context", COMPLETIONS, completion(max_tokens=CONTEXT - 2), 400,
     "max_tokens"),
    ("chat max_completion_tokens", CHAT, {"messages": USER, "max_completion_tokens": 10**9}, 400,
     "max_completion_tokens"),
    ("min_tokens over max_tokens", COMPLETIONS, completion(max_tokens=4, min_tokens=5), 400,
     "min_tokens"),
    ("repetition_penalty", COMPLETIONS,
     completion(repetition_penalty=MIN_REPETITION_PENALTY / 2), 400, "repetition_penalty"),
    ("seed over int64", COMPLETIONS, completion(seed=2**63), 400, "seed"),
    ("token id over the vocab", COMPLETIONS, completion(prompt=[10**9]), 400, "prompt"),
    ("JSON nesting", COMPLETIONS, nested(10_000), 400, None),
    ("body size", COMPLETIONS, completion(prompt="x" * MAX_BODY_BYTES), 413, None),
]  # fmt: skip

AT_THE_LIMIT: list[tuple[str, str, dict[str, Any]]] = [
    ("n", COMPLETIONS, completion(n=MAX_N, best_of=MAX_N)),
    ("prompts x n", COMPLETIONS, completion(prompt=["a"] * (MAX_CHOICES // MAX_N), n=MAX_N)),
    ("batched prompts", COMPLETIONS, completion(prompt=["a"] * MAX_PROMPTS)),
    ("stop strings", COMPLETIONS, completion(stop=["x" * MAX_STOP_LEN] * MAX_STOP)),
    ("logprobs", COMPLETIONS, completion(logprobs=MAX_LOGPROBS)),
    ("prompt + max_tokens = the context", COMPLETIONS, completion(max_tokens=CONTEXT - 3)),
    ("repetition_penalty", COMPLETIONS, completion(repetition_penalty=MIN_REPETITION_PENALTY)),
    ("JSON nesting of a real prompt", COMPLETIONS, completion(prompt=[[5, 6]])),
]


def post(url: str, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=30)
    return httpx.post(f"{url}{path}", json=body, timeout=30)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [case[1:] for case in OVER_THE_LIMIT],
    ids=[case[0] for case in OVER_THE_LIMIT],
)
def test_over_the_limit_is_refused(
    served: tuple[str, FakeEngine], path: str, body: Any, status: int, param: str | None
) -> None:
    url, engine = served
    before = len(engine.submitted)
    r = post(url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert len(engine.submitted) == before  # refused before reaching the engine


@pytest.mark.parametrize(
    ("path", "body"), [case[1:] for case in AT_THE_LIMIT], ids=[case[0] for case in AT_THE_LIMIT]
)
def test_at_the_limit_is_served(served: tuple[str, FakeEngine], path: str, body: Any) -> None:
    r = post(served[0], path, body)
    assert r.status_code == 200, r.text


def test_body_just_under_the_default_limit_is_read() -> None:
    # A body of exactly MAX_BODY_BYTES passes the size gate (and is then judged on content).
    assert Settings().max_body_bytes == MAX_BODY_BYTES
    with run_server(create_app(FakeEngine)) as url:
        filler = MAX_BODY_BYTES - len(b'{"prompt": [], "user": ""}')
        body = b'{"prompt": [], "user": "' + b"u" * filler + b'"}'
        assert len(body) == MAX_BODY_BYTES
        r = post(url, COMPLETIONS, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_logit_bias_entries_at_the_limit_parse() -> None:
    # The fake vocabulary is smaller than MAX_LOGIT_BIAS, so this boundary is checked here.
    def parse(entries: int) -> CompletionRequest:
        bias = {str(i): 1.0 for i in range(entries)}
        body = json.dumps({"prompt": "a", "logit_bias": bias}).encode()
        return parse_request(CompletionRequest, body)

    assert len(parse(MAX_LOGIT_BIAS).logit_bias) == MAX_LOGIT_BIAS
    with pytest.raises(pydantic.ValidationError):
        parse(MAX_LOGIT_BIAS + 1)


@pytest.mark.parametrize("temperature", [0.0, 1e-300, MIN_TEMPERATURE / 2])
def test_tiny_temperatures_are_greedy(served: tuple[str, FakeEngine], temperature: float) -> None:
    # float32 logits / 1e-300 overflow to inf and the softmax to NaN: such requests are greedy.
    url, engine = served
    r = post(url, COMPLETIONS, completion(temperature=temperature))
    assert r.status_code == 200
    assert engine.submitted[r.json()["id"] + "-0"][1].temperature == 0.0
    r = post(url, COMPLETIONS, completion(temperature=MIN_TEMPERATURE))
    assert engine.submitted[r.json()["id"] + "-0"][1].temperature == MIN_TEMPERATURE


def test_chat_without_max_tokens_stops_at_the_context(served: tuple[str, FakeEngine]) -> None:
    # No parameter makes a request run forever: the default is what the context leaves.
    url, engine = served
    r = post(url, CHAT, {"messages": USER, "min_tokens": 0, "ignore_eos": True, "n": MAX_N})
    assert r.status_code == 200
    prompt, params = engine.submitted[r.json()["id"] + "-0"]
    assert params.max_tokens == CONTEXT - len(prompt)
    assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
