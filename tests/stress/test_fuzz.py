"""Property-based fuzzing of the HTTP API from its own OpenAPI document.

Bodies for /v1/completions, /v1/chat/completions, /tokenize and /detokenize are drawn from the
schemas GET /openapi.json publishes (conforming, mutated, arbitrary JSON) and sent to the real
tiny engine behind the real app. Whatever the input: never a 5xx, only statuses the document
declares, every error exactly {"error": {"message", "type", "param", "code"}}, every success
(and every streamed chunk) valid against the published response schema, and every stream
ending with [DONE]. Bounded: a fixed number of derandomized examples, a small context.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine_helpers import tiny_engine
from tests.server_helpers import run_server, sse_payloads
from tests.stress.schema_fuzz import (
    Schema,
    conforming,
    request_bodies,
    resolve,
    schema_errors,
)
from tests.stress.workload import CHAT, COMPLETIONS

PATHS = (COMPLETIONS, CHAT, "/tokenize", "/detokenize")
JSON_EXAMPLES = 160
RAW_EXAMPLES = 40
ERROR_FIELDS = {"message", "type", "param", "code"}
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_response(doc: Schema, path: str, r: httpx.Response, tally: Counter[str]) -> None:
    """The response's status is declared, and its body matches the declared schema."""
    tally[f"{r.status_code}"] += 1
    assert r.status_code < 500, r.text
    responses = doc["paths"][path]["post"]["responses"]
    assert str(r.status_code) in responses, (r.status_code, r.text)
    content_type = r.headers["content-type"].split(";")[0]
    schema = responses[str(r.status_code)]["content"][content_type]["schema"]
    if content_type == "text/event-stream":
        event_schema = responses["200"]["content"][content_type]["x-event-data"]
        check_stream(doc, event_schema, r.text)
        return
    body = r.json()
    assert not schema_errors(body, schema, doc), (schema_errors(body, schema, doc), body)
    if r.status_code != 200:
        assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
        assert body["error"]["message"], body


def check_stream(doc: Schema, chunk_schema: Schema, text: str) -> None:
    payloads = list(sse_payloads(iter(text.splitlines())))
    assert payloads and payloads[-1] == "[DONE]", text[-500:]
    error_schema = {"$ref": "#/components/schemas/ErrorResponse"}
    for payload in payloads[:-1]:
        chunk = json.loads(payload)
        schema = error_schema if "error" in chunk else chunk_schema
        assert not schema_errors(chunk, schema, doc), (schema_errors(chunk, schema, doc), chunk)
        assert "error" not in chunk, chunk  # a valid request's stream never fails here


def conversations() -> st.SearchStrategy[list[dict[str, Any]]]:
    """Chats the Gemma template accepts: [system], user, assistant, user, ..."""
    text = st.text(max_size=30)
    turns = st.integers(0, 2).flatmap(
        lambda k: st.lists(text, min_size=2 * k + 1, max_size=2 * k + 1)
    )
    system = st.lists(text, max_size=1)
    return st.builds(
        lambda sys, ts: (
            [{"role": "system", "content": c} for c in sys]
            + [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(ts)]
        ),
        system,
        turns,
    )


def post(url: str, path: str, content: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60
    )


def test_fuzzed_requests_never_break_the_server(checkpoint: Path) -> None:
    engine = AsyncEngine(tiny_engine(checkpoint, max_model_len=48))
    tally: Counter[str] = Counter()
    with run_server(create_app(lambda: engine)) as url:
        doc: dict[str, Any] = httpx.get(f"{url}/openapi.json", timeout=10).json()
        for path in PATHS:  # the document describes every fuzzed route's body
            body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
            assert resolve(body["schema"], doc).get("properties"), path
        # Conforming bodies name the served model (or none; any other name is a plain 404) and
        # often hold a well-formed conversation (random roles rarely alternate as they must).
        chat_schema = resolve(doc["components"]["schemas"]["ChatCompletionRequest"], doc)
        served = {
            "model": st.sampled_from([None, engine.model_name]),
            "messages": conversations() | conforming(chat_schema["properties"]["messages"], doc),
        }
        bodies = st.sampled_from(PATHS).flatmap(
            lambda p: st.tuples(st.just(p), request_bodies(doc, p, served))
        )

        @settings(FUZZ_SETTINGS, max_examples=JSON_EXAMPLES)
        @given(bodies)
        def json_bodies(case: tuple[str, Any]) -> None:
            path, body = case
            check_response(doc, path, post(url, path, json.dumps(body).encode()), tally)

        @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
        @given(st.sampled_from(PATHS), st.binary(max_size=200))
        def raw_bodies(path: str, content: bytes) -> None:
            check_response(doc, path, post(url, path, content), tally)

        json_bodies()
        raw_bodies()
        r = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200  # still serving
    examples = sum(tally.values())
    server_errors = sum(n for status, n in tally.items() if status.startswith("5"))
    print(
        f"\nfuzz: {examples} examples, statuses {dict(sorted(tally.items()))}, 5xx={server_errors}"
    )
    assert server_errors == 0 and examples >= JSON_EXAMPLES + RAW_EXAMPLES
