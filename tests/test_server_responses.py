"""POST /v1/responses through the openai SDK against the real engine (tiny random Gemma 2).

The reference is the chat endpoint: the same messages, greedy, must give the same text and
token counts; streamed events must parse as the SDK's strict types.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.response_store import ResponseStore, StoredResponse
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.server_helpers import run_server, sse_payloads

EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, AsyncEngine]]:
    engine = AsyncEngine(tiny_engine(tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)))
    with run_server(create_app(lambda: engine)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def chat(url: str, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
    res = httpx.post(
        f"{url}/v1/chat/completions", json={"messages": messages, "temperature": 0, **body}
    )
    assert res.status_code == 200, res.text
    return res.json()


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/responses", json=body, timeout=60)


def test_plain_response_equals_the_chat_completion(server, client: openai.OpenAI) -> None:
    url, engine = server
    got = client.responses.create(
        model=engine.model_name,
        instructions="Be brief.",
        input="Hello, world!",
        max_output_tokens=9,
        temperature=0,
        metadata={"k": "v"},
    )
    want = chat(
        url,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}],
        max_tokens=9,
    )
    assert got.output_text == want["choices"][0]["message"]["content"] != ""
    usage = want["usage"]
    assert (got.usage.input_tokens, got.usage.output_tokens, got.usage.total_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )
    finish = want["choices"][0]["finish_reason"]
    assert got.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert got.incomplete_details.reason == "max_output_tokens"
    assert (got.instructions, got.max_output_tokens, got.metadata) == ("Be brief.", 9, {"k": "v"})
    assert got.id.startswith("resp_") and got.output[0].id.startswith("msg_")
    raw = post(url, input="Hello, world!", max_output_tokens=9, temperature=0)
    Response.model_validate_json(raw.text, strict=True)  # the SDK's type, strictly


def test_message_list_with_text_parts_equals_chat(server, client: openai.OpenAI) -> None:
    url, _ = server
    given = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "What is the capital"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "?"}]},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Of France, "},
                {"type": "input_text", "text": "I mean."},
            ],
        },
    ]
    got = client.responses.create(input=given, max_output_tokens=7, temperature=0)
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is the capital"},
        {"role": "assistant", "content": "?"},
        {"role": "user", "content": "Of France, I mean."},
    ]
    want = chat(url, messages, max_tokens=7)
    assert got.output_text == want["choices"][0]["message"]["content"]
    assert got.usage.input_tokens == want["usage"]["prompt_tokens"]


def test_top_p_is_honoured(server, client: openai.OpenAI) -> None:
    """top_p that keeps only the most likely token is greedy at any temperature."""
    url, _ = server
    got = client.responses.create(input="The quick brown", max_output_tokens=8, top_p=1e-9)
    want = chat(url, [{"role": "user", "content": "The quick brown"}], max_tokens=8)
    assert got.output_text == want["choices"][0]["message"]["content"]
    assert (got.temperature, got.top_p) == (1.0, 1e-9)


STREAM_TYPES_BEFORE = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
STREAM_TYPES_AFTER = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def test_stream_events_parse_and_add_up(server, client: openai.OpenAI) -> None:
    url, _ = server
    plain = client.responses.create(input="Hello", max_output_tokens=12, temperature=0)
    events = list(
        client.responses.create(input="Hello", max_output_tokens=12, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    last = "response.incomplete" if plain.status == "incomplete" else "response.completed"
    assert kinds == [*STREAM_TYPES_BEFORE, *["response.output_text.delta"] * len(deltas)] + [
        *STREAM_TYPES_AFTER,
        last,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == plain.output_text != ""
    assert events[-4].text == plain.output_text  # output_text.done
    final = events[-1].response
    assert final.output_text == plain.output_text and final.status == plain.status
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()  # stored too
    # The raw frames: `event:` names the type, and each payload is a valid SDK event, strictly.
    with httpx.stream(
        "POST",
        f"{url}/v1/responses",
        json={"input": "Hello", "max_output_tokens": 3, "stream": True},
    ) as res:
        lines = list(res.iter_lines())
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    payloads = list(sse_payloads(iter(lines)))
    assert [EVENTS.validate_json(p, strict=True).type for p in payloads] == names
    assert "[DONE]" not in payloads


def test_store_previous_response_id_and_retrieve(server, client: openai.OpenAI) -> None:
    url, _ = server
    first = client.responses.create(input="Hello", max_output_tokens=5, temperature=0)
    second = client.responses.create(
        input="And then?",
        previous_response_id=first.id,
        instructions="Be brief.",
        max_output_tokens=6,
        temperature=0,
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    want = chat(url, messages, max_tokens=6)
    assert second.output_text == want["choices"][0]["message"]["content"]
    assert second.usage.input_tokens == want["usage"]["prompt_tokens"]
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()

    unstored = client.responses.create(input="Hello", max_output_tokens=2, store=False)
    assert unstored.store is False
    for missing in (unstored.id, "resp_nope"):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(missing)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(input="Hi", previous_response_id="resp_nope")
    assert err.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"seed": 1}, "seed"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"input": [{"type": "function_call_output", "output": "1"}]}, "input[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "input"),
    ],
)
def test_what_is_not_supported_is_a_400_naming_it(server, body: dict[str, Any], param: str) -> None:
    res = post(server[0], **{"input": "Hi", **body})
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == param


def test_unknown_model_is_a_404(server) -> None:
    res = post(server[0], model="gpt-4o", input="Hi")
    assert res.status_code == 404 and res.json()["error"]["param"] == "model"


def test_the_store_is_bounded_and_least_recently_used_goes_first() -> None:
    def entry(chars: int) -> StoredResponse:
        return StoredResponse("x" * chars, ({"role": "user", "content": ""},))

    store = ResponseStore(max_entries=2, max_chars=100)
    store.put("a", entry(10))
    store.put("b", entry(10))
    assert store.get("a") is not None  # now "b" is the least recently used
    store.put("c", entry(10))
    assert (store.get("a"), store.get("b"), store.get("c")) == (entry(10), None, entry(10))
    store.put("d", entry(95))  # over the character budget: everything older goes
    assert len(store) == 1 and store.get("d") is not None
    store.put("e", entry(101))  # larger than the whole budget: not kept
    assert len(store) == 0


def test_openapi_documents_the_route(server) -> None:
    doc = httpx.get(f"{server[0]}/openapi.json").json()
    post_op = doc["paths"]["/v1/responses"]["post"]
    body = post_op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ResponsesRequest"}
    ok = post_op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ResponseObject"}
    assert "input" in doc["components"]["schemas"]["ResponsesRequest"]["required"]
    assert "get" in doc["paths"]["/v1/responses/{response_id}"]
