"""Third-party clients against a live server (tiny random Gemma 2 under uvicorn): litellm and
langchain-openai stream a chat and read a completion's logprobs (equal to what the openai SDK
gets from the same server, greedy), and langchain's with_structured_output / bind_tools
return objects that validate (issues 15 and 16)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from pydantic import BaseModel, Field

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.server_helpers import run_server

# litellm fetches a model price list over the network on import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAI  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say hello."}]


class Pet(BaseModel):
    """A pet."""

    name: str = Field(max_length=6)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)


@tool
def get_weather(city: str, unit: Literal["c", "f"]) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, served model name)."""
    checkpoint = tiny_checkpoint(
        tmp_path_factory.mktemp("tiny"), seed=17, max_position_embeddings=1024
    )
    engine = tiny_engine(Path(checkpoint), max_num_batched_tokens=512, kv_cache_memory=16 << 20)
    with run_server(create_app(lambda: AsyncEngine(engine))) as base:
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        yield base, model


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def sdk_chat_text(url: str) -> str:
    out = sdk(url).chat.completions.create(
        model=None, messages=MESSAGES, max_tokens=8, temperature=0.0
    )
    return out.choices[0].message.content or ""


def sdk_completion_logprobs(url: str) -> openai.types.completion_choice.Logprobs:
    out = sdk(url).completions.create(
        model=None, prompt="Hello", max_tokens=4, temperature=0.0, logprobs=2
    )
    assert out.choices[0].logprobs is not None
    return out.choices[0].logprobs


def test_litellm_streamed_chat(server: tuple[str, str]) -> None:
    url, model = server
    stream = litellm.completion(
        model=f"openai/{model}",
        api_base=f"{url}/v1",
        api_key="unused",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0.0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text and text == sdk_chat_text(url)


def test_litellm_completion_with_logprobs(server: tuple[str, str]) -> None:
    url, model = server
    out = litellm.text_completion(
        model=f"openai/{model}",
        api_base=f"{url}/v1",
        api_key="unused",
        prompt="Hello",
        max_tokens=4,
        temperature=0.0,
        logprobs=2,
    )
    got, want = out.choices[0].logprobs, sdk_completion_logprobs(url)
    assert got.tokens == want.tokens and len(want.tokens or []) == 4
    assert got.token_logprobs == pytest.approx(want.token_logprobs)
    assert [sorted(t) for t in got.top_logprobs] == [sorted(t) for t in want.top_logprobs or []]


def test_langchain_streamed_chat(server: tuple[str, str]) -> None:
    url, model = server
    chat = ChatOpenAI(
        model=model, base_url=f"{url}/v1", api_key="unused", max_tokens=8, temperature=0.0
    )
    text = "".join(str(chunk.content) for chunk in chat.stream("Say hello."))
    assert text and text == sdk_chat_text(url)


def test_langchain_completion_with_logprobs(server: tuple[str, str]) -> None:
    url, model = server
    llm = OpenAI(
        model=model,
        base_url=f"{url}/v1",
        api_key="unused",
        max_tokens=4,
        temperature=0.0,
        logprobs=2,
    )
    info = llm.generate(["Hello"]).generations[0][0].generation_info or {}
    want = sdk_completion_logprobs(url)
    assert info["logprobs"]["tokens"] == want.tokens
    assert info["logprobs"]["token_logprobs"] == pytest.approx(want.token_logprobs)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server: tuple[str, str], method: str) -> None:
    url, model = server
    chat = ChatOpenAI(model=model, base_url=f"{url}/v1", api_key="unused", max_tokens=100)
    structured = chat.with_structured_output(Pet, method=method)  # type: ignore[arg-type]
    for seed in (1, 2):
        pet = structured.invoke("Describe a pet.", seed=seed)
        assert isinstance(pet, Pet)  # parsed and validated by pydantic


def test_langchain_bind_tools_makes_a_valid_call(server: tuple[str, str]) -> None:
    url, model = server
    chat = ChatOpenAI(model=model, base_url=f"{url}/v1", api_key="unused", max_tokens=100)
    schema = get_weather.tool_call_schema.model_json_schema()
    for choice in ("get_weather", "any"):
        # One call: the random model would fill a parallel array until max_tokens.
        bound = chat.bind_tools([get_weather], tool_choice=choice, parallel_tool_calls=False)
        reply = bound.invoke("Weather in Oslo?")
        assert reply.response_metadata["finish_reason"] == "tool_calls"
        (call,) = reply.tool_calls
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(call["args"], schema)
