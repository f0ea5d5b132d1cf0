"""Tool calling over HTTP: the real engine (tiny random Gemma 2) under uvicorn, driven by the
openai SDK. "required" and named calls validate against their function's parameters (with
jsonschema), streamed calls accumulate in the SDK's stream helper to the same calls, tool turns
render into the prompt as written out here by hand, "auto" parses calls out of text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from pydantic import BaseModel, Field

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.server_helpers import run_server, sse_payloads

ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Adds", "parameters": ADD}},
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
]
SCHEMAS = {"add": ADD, "get_weather": WEATHER}
MESSAGES = [{"role": "user", "content": "Add 2 and 3."}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Lookup(BaseModel):
    """Looks a word up."""

    word: str = Field(max_length=6)
    lang: Literal["en", "fr"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Room for the tools in the prompt: the tiny tokenizer spends a token on every few bytes.
    checkpoint = tiny_checkpoint(
        tmp_path_factory.mktemp("tiny"), seed=17, max_position_embeddings=1024
    )
    engine = tiny_engine(Path(checkpoint), max_num_batched_tokens=512, kv_cache_memory=16 << 20)
    with run_server(create_app(lambda: AsyncEngine(engine))) as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def check_calls(calls: Any, names: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every call names an offered function and its arguments validate; (name, args)."""
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


@pytest.mark.parametrize(
    ("choice", "parallel", "names"),
    [
        ("required", False, {"add", "get_weather"}),
        (NAMED, None, {"get_weather"}),
    ],
    ids=["required", "named"],
)
def test_forced_calls_validate(url: str, choice: Any, parallel: bool | None, names: set) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    for temperature, seed in ((0.0, None), (1.0, 5)):
        out = client(url).chat.completions.create(
            model=None,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=200,
            temperature=temperature,
            seed=seed,
            n=2,
            **extra,
        )
        for c in out.choices:
            assert c.finish_reason == "tool_calls", c
            assert c.message.content is None
            calls = check_calls(c.message.tool_calls, names)
            assert len(calls) == 1 or parallel


def test_parallel_calls_cut_short_finish_with_length(url: str) -> None:
    # The random model keeps adding calls to the array (the default model's test sees one end).
    out = client(url).chat.completions.create(
        model=None, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=120
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    *whole, cut = choice.message.tool_calls
    assert len(whole) >= 1
    check_calls(whole, {"add", "get_weather"})
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.function.arguments)


def test_streamed_calls_accumulate_in_the_sdk(url: str) -> None:
    c = client(url)
    request = dict(
        model=None,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0.0,
    )
    whole = c.chat.completions.create(**request)
    with c.chat.completions.stream(**request) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    streamed = check_calls(choice.message.tool_calls, {"add", "get_weather"})
    assert streamed == check_calls(whole.choices[0].message.tool_calls, {"add", "get_weather"})
    # The raw chunks: index, id, type and name first, then argument pieces only.
    body = {**request, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(p) for p in sse_payloads(r.iter_lines()) if p != "[DONE]"]
    pieces = [t for ch in chunks for t in ch["choices"][0]["delta"].get("tool_calls", [])]
    starts = [p for p in pieces if "id" in p]
    assert [(p["index"], p["type"], p["function"]["name"]) for p in starts] == [
        (i, "function", name) for i, (name, _) in enumerate(streamed)
    ]
    assert len(pieces) > len(starts) + 2  # the arguments came in several pieces
    for i, (_, args) in enumerate(streamed):
        text = "".join(p["function"].get("arguments", "") for p in pieces if p["index"] == i)
        assert json.loads(text) == args
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_sdk_parses_a_strict_pydantic_tool(url: str) -> None:
    tool = openai.pydantic_function_tool(Lookup)
    named = {"type": "function", "function": {"name": "Lookup"}}
    with client(url).chat.completions.stream(
        model=None, messages=MESSAGES, tools=[tool], tool_choice=named, max_tokens=100
    ) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Lookup)
    assert Lookup.model_validate_json(call.function.arguments) == call.function.parsed_arguments


# What the two-turn conversation below must render to, written out by hand.
CONVERSATION_PROMPT = (
    "<bos><start_of_turn>user\n"
    "You can call these functions:\n"
    '{"name": "add", "description": "Adds", "parameters": ' + json.dumps(ADD) + "}\n"
    "\n"
    "To call a function, write a block like this, with arguments that match its parameters:\n"
    "```tool_call\n"
    '{"name": "function_name", "arguments": {"argument": "value"}}\n'
    "```\n"
    "A function's result comes back in a ```tool_response block.\n"
    "Call a function only when it helps; otherwise reply in plain text.\n"
    "\n"
    "Add 2 and 3.<end_of_turn>\n"
    "<start_of_turn>model\n"
    "I will add them.\n"
    "```tool_call\n"
    '{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
    "```<end_of_turn>\n"
    "<start_of_turn>user\n"
    "```tool_response\n"
    '{"name": "add", "content": "5"}\n'
    "```<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_two_turn_conversation_with_a_tool_message(url: str) -> None:
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "I will add them.",
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]  # fmt: skip
    c = client(url)
    out = c.chat.completions.create(
        model=None, messages=messages, tools=TOOLS[:1], max_tokens=5, temperature=0.0
    )
    expected = httpx.post(
        f"{url}/tokenize", json={"prompt": CONVERSATION_PROMPT, "add_special_tokens": False}
    ).json()
    assert out.usage is not None and out.usage.prompt_tokens == expected["count"]
    # The same prompt through /v1/completions gives the same greedy text (so the same ids).
    turn_end = httpx.post(
        f"{url}/tokenize", json={"prompt": "<end_of_turn>", "add_special_tokens": False}
    ).json()["tokens"]
    raw = c.completions.create(
        model=None, prompt=expected["tokens"], max_tokens=5, temperature=0.0,
        extra_body={"stop_token_ids": turn_end},
    )  # fmt: skip
    assert out.choices[0].message.content == raw.choices[0].text


CALL = '{"name": "add", "arguments": {"a": 4, "b": 5}}'
NOT_A_CALL = '```tool_call\n{"name": "mul"}\n```'  # no such function: text
FORCED = {  # the generated text, the content and the calls read out of it
    "calls": ("Let me add.\n```tool_call\n" + CALL + "\n```", "Let me add.",
              [("add", '{"a": 4, "b": 5}')]),
    "not_a_call": (NOT_A_CALL, NOT_A_CALL, []),
}  # fmt: skip


@pytest.mark.parametrize("case", FORCED)
def test_auto_parses_calls_out_of_generated_text(url: str, case: str) -> None:
    # The engine writes the text (forced by a choice constraint); the parser reads it.
    text, content, calls = FORCED[case]
    c = client(url)
    request = dict(
        model=None, messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=100,
        extra_body={"structured_outputs": {"choice": [text]}},
    )  # fmt: skip
    whole = c.chat.completions.create(**request).choices[0]
    with c.chat.completions.stream(**request) as stream:
        streamed = stream.get_final_completion().choices[0]
    for choice in (whole, streamed):
        assert choice.message.content == (content or None)
        got = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]
        assert got == calls
        assert choice.finish_reason == ("tool_calls" if calls else "stop")


def test_streamed_auto_keeps_every_tokens_logprob_and_each_choice_apart(url: str) -> None:
    # Text held back while a block may be a call still sends its tokens' logprobs.
    text, content, calls = FORCED["calls"]
    body = {
        "messages": MESSAGES, "tools": TOOLS, "max_tokens": 100, "n": 2, "logprobs": True,
        "stream": True, "stream_options": {"include_usage": True},
        "structured_outputs": {"choice": [text]},
    }  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(p) for p in sse_payloads(r.iter_lines()) if p != "[DONE]"]
    usage = chunks[-1]["usage"]
    per_choice: dict[int, dict[str, Any]] = {0: {}, 1: {}}
    for ch in chunks[:-1]:
        (choice,) = ch["choices"]
        got = per_choice[choice["index"]]
        got["content"] = got.get("content", "") + (choice["delta"].get("content") or "")
        for piece in choice["delta"].get("tool_calls", []):
            got.setdefault("calls", {}).setdefault(piece["index"], []).append(piece)
        got["tokens"] = got.get("tokens", 0) + len(
            (choice.get("logprobs") or {}).get("content") or []
        )
        got["finish"] = choice["finish_reason"] or got.get("finish")
    for got in per_choice.values():
        assert got["content"] == content and got["finish"] == "tool_calls"
        (pieces,) = got["calls"].values()
        assert pieces[0]["function"]["name"] == "add"
        assert "".join(p["function"]["arguments"] for p in pieces) == calls[0][1]
    assert sum(got["tokens"] for got in per_choice.values()) == usage["completion_tokens"]


def test_tool_choice_none_renders_no_tools(url: str) -> None:
    c = client(url)
    bare = c.chat.completions.create(model=None, messages=MESSAGES, max_tokens=6, temperature=0)
    none = c.chat.completions.create(
        model=None, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=6, temperature=0
    )
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens
    assert none.choices[0].message.content == bare.choices[0].message.content


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "multipleOf": 3}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f(x)"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "5"}]}, "messages[1]"),
    ({"messages": [*MESSAGES, {"role": "assistant", "content": "ok"},
                   {"role": "tool", "tool_call_id": "x", "content": "5"}]},
     "messages[2].tool_call_id"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_tool_requests_are_400_naming_the_field(url: str, extra: dict, param: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("field", ["tools", "tool_choice"])
def test_tools_on_completions_are_400(url: str, field: str) -> None:
    body = {"prompt": "x", "max_tokens": 2, field: TOOLS if field == "tools" else "auto"}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
