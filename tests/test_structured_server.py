"""Structured outputs over HTTP: the real engine (tiny random Gemma 2) under uvicorn, driven by
the openai client; every accepted form constrains the output, every one that cannot be
honoured is a 400 naming its field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from pydantic import BaseModel, Field

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.server_helpers import run_server
from tests.structured_helpers import CHOICES, GRAMMAR, SCHEMAS, check_json
from tests.test_server_integration import metrics

MODEL = None  # the served model
MESSAGES = [{"role": "user", "content": "Give me JSON."}]


class Point(BaseModel):
    label: Literal["a", "b"]
    x: int = Field(ge=-5, le=5)
    tags: list[Literal["u", "v"]] = Field(max_length=2)
    note: str = Field(max_length=4)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=17)
    engine = AsyncEngine(tiny_engine(Path(checkpoint)))
    with run_server(create_app(lambda: engine)) as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_parse_with_a_pydantic_model(url: str) -> None:
    for temperature in (0.0, 1.0):
        done = client(url).chat.completions.parse(
            model=MODEL,
            messages=MESSAGES,
            response_format=Point,
            max_tokens=80,
            temperature=temperature,
            seed=1,
            n=2,
        )
        for choice in done.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Point)
            assert Point.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "s", "schema": SCHEMAS["nested_object"]}}},
        {"structured_outputs": {"json": SCHEMAS["nested_object"]}},
        {"guided_json": json.dumps(SCHEMAS["nested_object"])},
    ],
    ids=["response_format", "structured_outputs", "guided_json"],
)  # fmt: skip
def test_json_schema_forms_on_both_endpoints(url: str, extra: dict) -> None:
    c = client(url)
    chat = c.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=100, n=2, temperature=1.0, extra_body=extra
    )
    texts = [ch.message.content for ch in chat.choices]
    done = c.completions.create(model=MODEL, prompt="JSON:", max_tokens=100, extra_body=extra)
    texts.append(done.choices[0].text)
    for text in texts:
        check_json(text, SCHEMAS["nested_object"])


def test_whitespace_pattern_none_writes_compact_json(url: str) -> None:
    extra = {"structured_outputs": {"json": SCHEMAS["const"], "whitespace_pattern": ""}}
    out = client(url).completions.create(model=MODEL, prompt="a", max_tokens=60, extra_body=extra)
    text = out.choices[0].text
    check_json(text, SCHEMAS["const"])
    assert text == json.dumps(json.loads(text), separators=(",", ":"))


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"structured_outputs": {"regex": r"[a-c]{2,5}-\d{1,3}"}}, r"[a-c]{2,5}-\d{1,3}"),
        ({"guided_regex": r"[xyz]{3}"}, r"[xyz]{3}"),
        ({"structured_outputs": {"choice": CHOICES}}, "|".join(map(re.escape, CHOICES))),
        ({"guided_choice": CHOICES}, "|".join(map(re.escape, CHOICES))),
        ({"structured_outputs": {"grammar": GRAMMAR}}, r"[a-z]=[0-9](,[a-z]=[0-9]){0,3}"),
        ({"guided_grammar": GRAMMAR}, r"[a-z]=[0-9](,[a-z]=[0-9]){0,3}"),
    ],
)
def test_regex_choice_grammar_forms(url: str, extra: dict, pattern: str) -> None:
    out = client(url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=1.0, n=3, extra_body=extra
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        assert re.fullmatch(pattern, choice.message.content), choice.message.content


def test_json_object_and_text(url: str) -> None:
    out = client(url).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        response_format={"type": "json_object"},
    )
    text = out.choices[0].message.content  # a random model rarely closes it in 8 tokens
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    text_mode = client(url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, response_format={"type": "text"}, seed=3
    )
    plain = client(url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, seed=3
    )
    assert text_mode.choices[0].message.content == plain.choices[0].message.content


BAD = [
    ({"guided_json": {"type": "integer", "multipleOf": 2}}, "guided_json"),
    ({"structured_outputs": {"json": {"$ref": "#/$defs/none"}}}, "structured_outputs.json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"grammar": 'root ::= "a" |'}}, "structured_outputs.grammar"),
    ({"guided_regex": "(open"}, "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": {}, "whitespace_pattern": "[ ]+"}},
     "structured_outputs.whitespace_pattern"),
    ({"guided_regex": "a", "guided_whitespace_pattern": ""}, "guided_whitespace_pattern"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "guided_regex": "a"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), BAD, ids=[p for _, p in BAD])
def test_constraints_that_cannot_be_honoured_are_400(url: str, extra: dict, param: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    if "tools" in extra or "tool_choice" in extra:
        return
    del body["messages"]
    r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_compile_metrics_count_compiles_and_cache_hits(url: str) -> None:
    schema = {"type": "object", "properties": {"only_here": {"type": "boolean"}},
              "required": ["only_here"], "additionalProperties": False}  # fmt: skip
    before = metrics(url)
    for _ in range(3):
        out = client(url).completions.create(
            model=MODEL, prompt="x", max_tokens=30, extra_body={"guided_json": schema}
        )
        check_json(out.choices[0].text, schema)
    after = metrics(url)
    name = "gemma_serve_structured_output_compile_seconds_count"
    assert after[name] - before.get(name, 0) == 1
    hits = "gemma_serve_structured_output_compile_cache_hits_total"
    assert after[hits] - before.get(hits, 0) == 2
