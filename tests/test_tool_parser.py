"""Tool calling without a model: the call parsers on crafted text (whole and streamed piece by
piece give the same calls), the schema "required"/named constrain to (checked with
jsonschema), request validation, and tools / tool turns rendered into the Gemma turns."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from gemma_serve.server.errors import APIError
from gemma_serve.server.protocol import ChatCompletionRequest
from gemma_serve.server.tool_output import ChoiceTools, stream_delta
from gemma_serve.server.tool_parser import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Event,
    FencedCallParser,
    JsonCallParser,
)
from gemma_serve.server.tool_prompt import render_turns, tools_text
from gemma_serve.server.tools import ToolPlan, call_schema, tool_constraint, tool_plan

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "noop"}},
]


def block(call: dict[str, Any]) -> str:
    return "```tool_call\n" + json.dumps(call) + "\n```"


def run(parser: FencedCallParser | JsonCallParser, text: str, piece: int) -> list[Event]:
    events: list[Event] = []
    for i in range(0, len(text), piece):
        events += parser.feed(text[i : i + piece])
    return events + parser.finish()


def summary(events: list[Event]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) of a choice's events."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: list[list[str]] = []
    for e in events:
        if isinstance(e, CallStart):
            assert e.index == len(calls) and e.id.startswith("call_") and len(e.id) == 29
            calls.append([e.name, ""])
        elif isinstance(e, ArgumentsDelta):
            calls[e.index][1] += e.text
    return content, [(n, a) for n, a in calls]


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_fenced_calls_with_content_before(piece: int) -> None:
    text = (
        "Let me look that up.\n"
        + block({"name": "get_weather", "arguments": {"city": "Paris"}})
        + "\n"
        + block({"name": "noop", "parameters": {}})
        + '\n```tool_call {"name": "noop", "arguments": {"x": 1}}```'
    )
    content, calls = summary(run(FencedCallParser(["get_weather", "noop"]), text, piece))
    assert content == "Let me look that up."
    assert calls == [("get_weather", '{"city": "Paris"}'), ("noop", "{}"), ("noop", '{"x": 1}')]


@pytest.mark.parametrize("piece", [1, 2, 1000])
@pytest.mark.parametrize(
    "text",
    [
        "Plain text, no calls.\n\n",  # trailing whitespace kept when nothing was called
        "A fence of code:\n```python\nprint(1)\n```",
        "```tool_call\n{not json}\n```",
        "```tool_call\n" + json.dumps({"name": "rm_rf", "arguments": {}}) + "\n```",  # unknown
        "```tool_call\n" + json.dumps({"name": "noop", "arguments": [1]}) + "\n```",
        'Unclosed: ```tool_call\n{"name": "noop", "arguments": {}}',
        "ends with a partial fence ``",
    ],
)
def test_text_that_is_not_a_call_stays_content(text: str, piece: int) -> None:
    content, calls = summary(run(FencedCallParser(["get_weather", "noop"]), text, piece))
    assert (content, calls) == (text, [])


def test_text_after_and_between_calls() -> None:
    text = "A\n" + block({"name": "noop", "arguments": {}}) + "\n\nB then\n"
    content, calls = summary(run(FencedCallParser(["noop"]), text, 1))
    assert content == "AB then"  # whitespace next to a call dropped
    assert calls == [("noop", "{}")]


def test_parallel_false_keeps_the_first_call() -> None:
    text = block({"name": "noop", "arguments": {}}) + block({"name": "noop", "arguments": {"x": 1}})
    content, calls = summary(run(FencedCallParser(["noop"], parallel=False), text, 5))
    assert (content, calls) == ("", [("noop", "{}")])


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_json_calls_stream_their_arguments(piece: int) -> None:
    args = {"city": 'Pa"ri}s {[', "unit": "c"}
    text = json.dumps(
        [{"name": "get_weather", "arguments": args}, {"name": "noop", "arguments": {}}]
    )
    parser = JsonCallParser(["get_weather", "noop"])
    events = run(parser, text, piece)
    content, calls = summary(events)
    assert content == ""
    assert calls == [("get_weather", json.dumps(args)), ("noop", "{}")]
    fragments = [e for e in events if isinstance(e, ArgumentsDelta) and e.index == 0]
    if piece == 1:
        assert len(fragments) == len(json.dumps(args))  # one per character fed
    assert parser.calls == 2


def test_json_call_object_and_a_cut_short_call() -> None:
    one = '{"name": "noop", "arguments": {"a": [1, {"b": 2}]}}'
    assert summary(run(JsonCallParser(["noop"]), one, 7))[1] == [("noop", '{"a": [1, {"b": 2}]}')]
    cut = '[{"name": "noop", "arguments": {"a": "xy'
    assert summary(run(JsonCallParser(["noop"]), cut, 3))[1] == [("noop", '{"a": "xy')]


def test_stream_delta_merges_a_call_start_and_its_arguments() -> None:
    delta = stream_delta(
        [ContentDelta("Hi"), CallStart(0, "call_x", "noop"), ArgumentsDelta(0, "{}")]
    )
    assert delta is not None
    assert delta.model_dump(exclude_none=True) == {
        "content": "Hi",
        "tool_calls": [
            {"index": 0, "id": "call_x", "type": "function",
             "function": {"name": "noop", "arguments": "{}"}}
        ],
    }  # fmt: skip
    assert stream_delta([]) is None


def test_whole_message_and_finish_reason() -> None:
    plan = _plan({"tools": TOOLS})
    text = "Sure.\n" + block({"name": "get_weather", "arguments": {"city": "Oslo"}})
    message, reason = ChoiceTools(plan).message(text, "stop")
    assert reason == "tool_calls"
    assert message.content == "Sure."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    assert ChoiceTools(plan).message(text, "length")[1] == "length"
    plain, reason = ChoiceTools(plan).message("No call.", "stop")
    assert (plain.content, plain.tool_calls, reason) == ("No call.", None, "stop")


def _plan(body: dict[str, Any]) -> ToolPlan:
    plan = tool_plan(ChatCompletionRequest.model_validate({"messages": MESSAGES, **body}))
    assert plan is not None
    return plan


MESSAGES = [{"role": "user", "content": "hi"}]
GOOD_WEATHER = {"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}
BAD_CALLS = [
    {"name": "get_weather", "arguments": {"unit": "f"}},  # city is required
    {"name": "get_weather", "arguments": {"city": "Rome", "extra": 1}},
    {"name": "noop", "arguments": {"city": "Rome"}},  # noop takes no arguments
    {"name": "other", "arguments": {}},
]


def test_required_schema_accepts_exactly_valid_calls() -> None:
    parallel = call_schema(_plan({"tools": TOOLS, "tool_choice": "required"}))
    jsonschema.validate([GOOD_WEATHER, {"name": "noop", "arguments": {}}], parallel)
    for bad in [[], *([b] for b in BAD_CALLS)]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, parallel)
    single = call_schema(
        _plan({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    )
    jsonschema.validate(GOOD_WEATHER, single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([GOOD_WEATHER], single)


def test_named_schema_and_hoisted_refs() -> None:
    address = {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Place"}},
        "required": ["home"],
        "$defs": {"Place": {"type": "object", "properties": {"zip": {"type": "integer"}},
                            "required": ["zip"]}},
    }  # fmt: skip
    tools = [*TOOLS, {"type": "function", "function": {"name": "move", "parameters": address}}]
    named = {"type": "function", "function": {"name": "move"}}
    schema = call_schema(_plan({"tools": tools, "tool_choice": named}))
    jsonschema.validate({"name": "move", "arguments": {"home": {"zip": 5}}}, schema)
    for bad in ({"name": "move", "arguments": {"home": {"zip": "5"}}}, GOOD_WEATHER):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [TOOLS[1], TOOLS[1]]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"not": {"type": "null"}}}}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f",
                                                      "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters"),
    ],
)  # fmt: skip
def test_invalid_tools_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        tool_plan(ChatCompletionRequest.model_validate({"messages": MESSAGES, **body}))
    assert (err.value.status, err.value.param) == (400, param)


def test_tool_plans() -> None:
    assert tool_plan(ChatCompletionRequest.model_validate({"messages": MESSAGES})) is None
    assert _plan({"tools": TOOLS}).mode == "auto"  # the default with tools
    none = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"}
    assert tool_plan(ChatCompletionRequest.model_validate(none)) is None
    required = _plan({"tools": TOOLS, "tool_choice": "required"})
    with pytest.raises(APIError) as err:
        tool_constraint(required, tool_constraint(None, None) or _json_spec())
    assert err.value.param == "tool_choice"
    spec = tool_constraint(required, None)
    assert spec is not None and json.loads(spec.source) == call_schema(required)


def _json_spec() -> Any:
    from gemma_serve.server.engine.structured_spec import StructuredSpec

    return StructuredSpec("json_object", "", "response_format")


def test_tool_turns_render_as_fenced_blocks() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                    {"id": "c2", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
                {"role": "tool", "tool_call_id": "c2", "content": "3 C"},
                {"role": "user", "content": "Thanks."},
            ],
            "tools": TOOLS,
        }
    )  # fmt: skip
    plan = tool_plan(req)
    assert plan is not None
    turns = render_turns(req.messages, plan)
    call = '```tool_call\n{{"name": "get_weather", "arguments": {{"city": "{}"}}}}\n```'
    result = '```tool_response\n{{"name": "get_weather", "content": "{}"}}\n```'
    assert turns == [
        {"role": "system", "content": "Be brief.\n\n" + tools_text(plan)},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": call.format("Paris") + "\n" + call.format("Oslo")},
        {"role": "user",
         "content": result.format("21 C") + "\n\n" + result.format("3 C") + "\n\nThanks."},
    ]  # fmt: skip
    assert tools_text(plan).splitlines()[1] == json.dumps(
        {"name": "get_weather", "description": "", "parameters": WEATHER}
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "tool_call_id": "zz", "content": "x"}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "tool_calls": [
              {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
         "messages[1].tool_calls[0].function.arguments"),
    ],
)  # fmt: skip
def test_bad_tool_turns_are_400(messages: list[dict[str, Any]], param: str) -> None:
    req = ChatCompletionRequest.model_validate({"messages": messages})
    with pytest.raises(APIError) as err:
        render_turns(req.messages, None)
    assert (err.value.status, err.value.param) == (400, param)
