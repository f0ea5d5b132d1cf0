"""The request side of structured outputs: the fields, one StructuredSpec from them, and its
compilation off the event loop and the engine thread, bounded by a timeout (torch-free).

Accepted: OpenAI's `response_format` (text, json_object, json_schema), vLLM's
`structured_outputs` (json, regex, choice, grammar, whitespace_pattern) and its older
`guided_*` aliases. At most one constraint per request; anything that cannot be honoured is a
400 naming the field, never a silently unconstrained 200.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal

from gemma_serve.server.engine.structured_spec import (
    StructuredGrammar,
    StructuredOutputError,
    StructuredSpec,
    Whitespace,
)
from gemma_serve.server.engine_client import EngineClient
from gemma_serve.server.errors import bad_request
from gemma_serve.server.limits import STRUCTURED_COMPILE_TIMEOUT_S
from gemma_serve.server.metrics import Metrics
from pydantic import BaseModel, ConfigDict, Field

# whitespace_pattern values with an exact equivalent in the compiler: no whitespace, or any run
# of spaces, newlines and tabs (in any order inside the class).
_ANY_WHITESPACE = re.compile(r"\[(?=[^\]]*\\n)(?=[^\]]*\\t)(?=[^\]]* )(?: |\\n|\\t){3}\]\*")


class _Fields(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class JsonSchemaFormat(_Fields):
    name: str = Field(min_length=1)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Fields):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Fields):
    """vLLM's structured_outputs; unknown keys are refused (they would be silently ignored)."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    whitespace_pattern: str | None = None


class StructuredOutputFields(BaseModel):
    """The request fields (both endpoints) that constrain the output."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, min_length=1)
    guided_whitespace_pattern: str | None = None


def structured_spec(req: StructuredOutputFields) -> StructuredSpec | None:
    """The request's one output constraint, or None; a 400 naming the field otherwise."""
    so = req.structured_outputs or StructuredOutputsParams()
    pattern, pattern_param = (
        (so.whitespace_pattern, "structured_outputs.whitespace_pattern")
        if so.whitespace_pattern is not None
        else (req.guided_whitespace_pattern, "guided_whitespace_pattern")
    )
    whitespace = _whitespace(pattern, pattern_param)
    found = [
        spec
        for spec in (
            _response_format(req.response_format, whitespace),
            _json(so.json_, "structured_outputs.json", whitespace),
            _json(req.guided_json, "guided_json", whitespace),
            _text("regex", so.regex, "structured_outputs.regex"),
            _text("regex", req.guided_regex, "guided_regex"),
            _choice(so.choice, "structured_outputs.choice"),
            _choice(req.guided_choice, "guided_choice"),
            _text("grammar", so.grammar, "structured_outputs.grammar"),
            _text("grammar", req.guided_grammar, "guided_grammar"),
        )
        if spec is not None
    ]
    if len(found) > 1:
        raise bad_request(
            f"only one output constraint may be given, got {found[0].param} and {found[1].param}",
            param=found[1].param,
        )
    spec = found[0] if found else None
    if pattern is not None and (spec is None or spec.kind not in ("json", "json_object")):
        raise bad_request("whitespace_pattern applies only to a JSON constraint", pattern_param)
    return spec


async def compile_constraint(
    engine: EngineClient, metrics: Metrics, spec: StructuredSpec | None
) -> StructuredGrammar | None:
    """Compile on a worker thread (never the event loop or the engine thread); a constraint
    that fails or takes longer than STRUCTURED_COMPILE_TIMEOUT_S is a 400."""
    if spec is None:
        return None
    try:
        result = await asyncio.wait_for(
            asyncio.to_thread(engine.compile_structured, spec), STRUCTURED_COMPILE_TIMEOUT_S
        )
    except asyncio.TimeoutError as exc:
        raise bad_request(
            f"compiling the {spec.kind} constraint took longer than "
            f"{STRUCTURED_COMPILE_TIMEOUT_S:g} s",
            param=spec.param,
        ) from exc
    except StructuredOutputError as exc:
        raise bad_request(str(exc), param=exc.param) from exc
    metrics.on_structured_compile(result.seconds, result.cache_hit)
    return result.grammar


def _whitespace(pattern: str | None, param: str) -> Whitespace:
    if pattern is None:
        return "single"
    if pattern == "":
        return "none"
    if _ANY_WHITESPACE.fullmatch(pattern):
        return "any"
    raise bad_request(
        f"whitespace_pattern {pattern!r} is not supported: use '' (none) or '[ \\n\\t]*' (any)",
        param,
    )


def _response_format(rf: ResponseFormat | None, whitespace: Whitespace) -> StructuredSpec | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredSpec("json_object", "", "response_format", whitespace)
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise bad_request(
            "response_format of type json_schema needs json_schema.schema",
            "response_format.json_schema",
        )
    return _json(rf.json_schema.schema_, "response_format.json_schema.schema", whitespace)


def _json(schema: str | dict[str, Any] | None, param: str, ws: Whitespace) -> StructuredSpec | None:
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad_request(f"the JSON schema is not valid JSON: {exc}", param) from exc
        if not isinstance(schema, dict):
            raise bad_request("the JSON schema must be a JSON object", param)
    return StructuredSpec("json", json.dumps(schema, ensure_ascii=False), param, ws)


def _text(kind: Literal["regex", "grammar"], text: str | None, param: str) -> StructuredSpec | None:
    return None if text is None else StructuredSpec(kind, text, param)


def _choice(choices: list[str] | None, param: str) -> StructuredSpec | None:
    return None if choices is None else StructuredSpec("choice", json.dumps(choices), param)
