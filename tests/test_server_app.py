"""End to end over real HTTP (uvicorn on a free port) with the fake engine: the official
openai client for completions and chat, streaming and not, and the server's other routes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from gemma_serve.server.app import Settings, create_app

from tests.fake_engine import BOS, END_TURN, EOS, OFFSET, TOKEN_LOGPROB, FakeEngine
from tests.server_helpers import run_server, sse_payloads

PROMPT = "Hello, world!"  # the fake repeats it, then EOS: 13 tokens + EOS


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine()
    with run_server(create_app(lambda: engine, Settings())) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(served: tuple[str, FakeEngine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    ("max_tokens", "text", "reason"), [(8, PROMPT[:8], "length"), (50, PROMPT, "stop")]
)
def test_completion_stream_equals_non_stream(
    client: openai.OpenAI, max_tokens: int, text: str, reason: str
) -> None:
    full = client.completions.create(model="fake-gemma", prompt=PROMPT, max_tokens=max_tokens)
    assert full.object == "text_completion" and full.model == "fake-gemma"
    assert [(c.index, c.text, c.finish_reason) for c in full.choices] == [(0, text, reason)]
    completion_tokens = len(text) + (reason == "stop")  # EOS is generated and counted
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (14, completion_tokens)
    assert full.usage.total_tokens == 14 + completion_tokens

    chunks = list(
        client.completions.create(
            model="fake-gemma",
            prompt=PROMPT,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len(chunks) == completion_tokens + 1  # one event per engine output, then usage


def test_chat_stream_equals_non_stream(
    served: tuple[str, FakeEngine], client: openai.OpenAI
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é"}]
    expected = "user\nBe brief.\n\nHi é\nmodel\n"  # the fake echoes the template's text
    full = client.chat.completions.create(model="fake-gemma", messages=messages, max_tokens=100)
    choice = full.choices[0]
    assert full.object == "chat.completion"
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        expected,
        "stop",
    )
    prompt_tokens = 4 + len(expected.encode())  # <bos>, 2 <start_of_turn>, 1 <end_of_turn>
    assert full.usage.prompt_tokens == prompt_tokens
    assert full.usage.completion_tokens == len(expected.encode()) + 1
    params = served[1].submitted[f"{full.id}-0"][1]
    assert params.stop_token_ids == frozenset({EOS, END_TURN}) and params.max_tokens == 100
    ignoring = client.chat.completions.create(
        model="fake-gemma", messages=messages, max_tokens=5, extra_body={"ignore_eos": True}
    )
    params = served[1].submitted[f"{ignoring.id}-0"][1]  # <end_of_turn> is ignored like EOS
    assert params.ignore_eos and params.stop_token_ids == frozenset()

    stream = client.chat.completions.create(
        model="fake-gemma",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_max_tokens_defaults_to_the_remaining_context(served: tuple[str, FakeEngine]) -> None:
    url, engine = served
    body = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": None}
    r = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200
    rid = r.json()["id"] + "-0"
    prompt_ids, params = engine.submitted[rid]
    assert params.max_tokens == engine.max_model_len - len(prompt_ids)


def test_n_choices_get_consecutive_seeds(
    served: tuple[str, FakeEngine], client: openai.OpenAI
) -> None:
    full = client.completions.create(
        model="fake-gemma", prompt="abcd", max_tokens=4, n=3, seed=5, temperature=1.0
    )
    # The fake starts at offset seed % 4: seeds 5, 6, 7 -> offsets 1, 2, 3.
    assert [c.text for c in full.choices] == ["bcda", "cdab", "dabc"]
    assert [c.index for c in full.choices] == [0, 1, 2]
    params = [served[1].submitted[f"{full.id}-{i}"][1] for i in range(3)]
    assert [p.seed for p in params] == [5, 6, 7]
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (5, 12)  # prompt once

    stream = client.completions.create(
        model="fake-gemma", prompt="abcd", max_tokens=4, n=3, seed=5, temperature=1.0, stream=True
    )
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == ["bcda", "cdab", "dabc"]


def test_batched_prompts_echo_and_token_ids(client: openai.OpenAI) -> None:
    full = client.completions.create(
        model="fake-gemma", prompt=["ab", "xyz"], max_tokens=2, n=2, echo=True
    )
    assert [(c.index, c.text) for c in full.choices] == [
        (0, "abab"),
        (1, "abab"),
        (2, "xyzxy"),
        (3, "xyzxy"),
    ]
    assert full.usage.prompt_tokens == 3 + 4  # each prompt once, BOS included
    ids = [BOS, OFFSET + ord("o"), OFFSET + ord("k")]
    by_ids = client.completions.create(model="fake-gemma", prompt=ids, max_tokens=3, echo=True)
    assert by_ids.choices[0].text == "ok" + "ok" + ""  # echo, then "ok" and EOS
    assert by_ids.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="fake-gemma", prompt=[ids], max_tokens=3, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == "okok"


def test_stop_strings(client: openai.OpenAI) -> None:
    full = client.completions.create(
        model="fake-gemma", prompt="one, two", max_tokens=20, stop=[", t"]
    )
    assert (full.choices[0].text, full.choices[0].finish_reason) == ("one", "stop")
    chunks = list(
        client.completions.create(
            model="fake-gemma", prompt="one, two", max_tokens=20, stop=", t", stream=True
        )
    )
    # The stop string spans three tokens: its start (", ") is held back, never sent.
    assert [c.choices[0].text for c in chunks if c.choices[0].text] == ["o", "n", "e"]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(client: openai.OpenAI) -> None:
    full = client.completions.create(model="fake-gemma", prompt="ab", max_tokens=2, logprobs=2)
    lp = full.choices[0].logprobs
    assert lp.tokens == ["a", "b"]
    assert lp.token_logprobs == [TOKEN_LOGPROB, TOKEN_LOGPROB]
    assert lp.text_offset == [0, 1]
    # The fake's alternatives: the token itself, then the next byte, 1 nat less likely.
    assert lp.top_logprobs == [{"a": -0.25, "b": -1.25}, {"b": -0.25, "c": -1.25}]
    chunks = list(
        client.completions.create(
            model="fake-gemma", prompt="ab", max_tokens=2, logprobs=2, stream=True
        )
    )
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == ["a", "b"]
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == [0, 1]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model="fake-gemma",
        messages=[{"role": "user", "content": "é"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=1,
    )
    content = full.choices[0].logprobs.content
    assert [(t.token, t.bytes, t.logprob) for t in content] == [
        ("u", [117], TOKEN_LOGPROB),
        ("s", [115], TOKEN_LOGPROB),
        ("e", [101], TOKEN_LOGPROB),
    ]
    assert [[(a.token, a.logprob) for a in t.top_logprobs] for t in content][0] == [("u", -0.25)]
    plain = client.chat.completions.create(
        model="fake-gemma", messages=[{"role": "user", "content": "é"}], max_tokens=3
    )
    assert plain.choices[0].logprobs is None


def test_models_health_tokenize_detokenize(
    served: tuple[str, FakeEngine], client: openai.OpenAI
) -> None:
    url, engine = served
    assert [m.id for m in client.models.list()] == ["fake-gemma"]
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert httpx.get(f"{url}/v1/models/fake-gemma").json()["id"] == "fake-gemma"
    assert httpx.get(f"{url}/health").status_code == 200
    hi = [OFFSET + ord("h"), OFFSET + ord("i")]
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}).json()
    assert r == {"tokens": [BOS, *hi], "count": 3, "max_model_len": engine.max_model_len}
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
    assert r["tokens"] == hi and r["count"] == 2
    r = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["tokens"] == engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )
    assert httpx.post(f"{url}/detokenize", json={"tokens": [BOS, *hi]}).json() == {"prompt": "hi"}


def test_raw_sse_framing(served: tuple[str, FakeEngine]) -> None:
    url, _ = served
    body = {"prompt": "ab", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    payloads = list(sse_payloads(iter(raw.splitlines())))
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c for c in chunks)  # only with include_usage
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]


def test_cors_only_when_origins_are_set() -> None:
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed in [((), False), (("http://ui.example",), True)]:
        app = create_app(FakeEngine, Settings(allowed_origins=origins))
        with run_server(app) as url:
            r = httpx.options(f"{url}/v1/completions", headers=preflight)
            assert ("access-control-allow-origin" in r.headers) is allowed


def test_shutdown_stops_the_engine() -> None:
    engine = FakeEngine()
    with run_server(create_app(lambda: engine)):
        assert engine.is_running
    assert engine.stopped
