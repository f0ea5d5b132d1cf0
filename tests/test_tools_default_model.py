"""Tool calling on the embedded default model (Gemma 3 270M) over HTTP: "required" and named
calls, greedy and sampled, validate against their function's parameters; the greedy call
answers the question; the SDK's stream helper accumulates the same call as the whole reply."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine

from tests.server_helpers import run_server

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                   "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
    "required": ["a", "b"],
    "additionalProperties": False,
}  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": schema,
                                      "description": f"{name.replace('_', ' ')}"}}
    for name, schema in SCHEMAS.items()
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    config = EngineConfig(
        device="cpu", kv_cache_memory=64 << 20, max_model_len=1024, quantization="none"
    )
    engine = AsyncEngine(LLMEngine(config))
    with run_server(create_app(lambda: engine), timeout_s=120) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def calls_of(choice: Any) -> list[tuple[str, dict[str, Any]]]:
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    out = []
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


@pytest.mark.slow
def test_default_model_required_calls(client: openai.OpenAI) -> None:
    # One call: in a parallel array this small model repeats calls until max_tokens.
    greedy = client.chat.completions.create(
        model=None, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.0,
        max_tokens=100, parallel_tool_calls=False,
    )  # fmt: skip
    assert calls_of(greedy.choices[0]) == [("get_weather", {"city": "Paris"})]
    sampled = client.chat.completions.create(
        model=None, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
        seed=4, n=2, max_tokens=100, parallel_tool_calls=False,
    )  # fmt: skip
    for choice in sampled.choices:
        assert len(calls_of(choice)) == 1


@pytest.mark.slow
def test_default_model_named_call_streams(client: openai.OpenAI) -> None:
    request: dict[str, Any] = dict(
        model=None,
        messages=[{"role": "user", "content": "What is 12 plus 30?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0.0,
        max_tokens=60,
    )
    whole = calls_of(client.chat.completions.create(**request).choices[0])
    with client.chat.completions.stream(**request) as stream:
        streamed = calls_of(stream.get_final_completion().choices[0])
    assert streamed == whole and [name for name, _ in whole] == ["add"]
