"""The OpenAI request fields that need their own validation: prompt, stop, logit_bias, content.

Each is an `Annotated[Any, ...]` with a validator (clear messages, OpenAI's accepted shapes)
and the JSON schema it stands for, which GET /openapi.json publishes.
"""

from __future__ import annotations

from typing import Annotated, Any

from gemma_serve.server.limits import MAX_LOGIT_BIAS, MAX_PROMPTS, MAX_STOP, MAX_STOP_LEN
from pydantic import PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_prompt(value: object) -> str | list[str] | list[int] | list[list[int]]:
    """A prompt is a string, a list of strings, a list of token ids or a list of id lists."""
    shape = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):  # "" too, as OpenAI: the prompt is then BOS alone
        return value
    if not isinstance(value, list) or not value:
        raise _invalid(f"prompt must be a non-empty {shape}")
    if all(isinstance(p, str) for p in value):
        _check_batch(value)
        return value
    if all(is_int(t) for t in value):
        _check_ids(value)
        return value
    if all(isinstance(p, list) for p in value):
        _check_batch(value)
        for ids in value:
            if not ids or not all(is_int(t) for t in ids):
                raise _invalid("each token-id list in prompt must be a non-empty list of integers")
            _check_ids(ids)
        return value
    raise _invalid(f"prompt must be {shape}")


def _check_batch(prompts: list[Any]) -> None:
    if len(prompts) > MAX_PROMPTS:
        raise _invalid(f"at most {MAX_PROMPTS} prompts are allowed per request, got {len(prompts)}")


def _check_ids(ids: list[int]) -> None:
    if any(t < 0 for t in ids):
        raise _invalid("token ids must be non-negative")


def _check_stop(value: object) -> list[str]:
    """stop: a string or a list of strings. Empty strings mean nothing and are dropped."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _invalid("stop must be a string or a list of strings")
    items = [s for s in items if s]
    if len(items) > MAX_STOP:
        raise _invalid(f"at most {MAX_STOP} stop strings are allowed, got {len(items)}")
    if any(len(s) > MAX_STOP_LEN for s in items):
        raise _invalid(f"each stop string must be at most {MAX_STOP_LEN} characters")
    return items


def _check_logit_bias(value: object) -> dict[int, float] | None:
    """logit_bias maps token ids (as JSON object keys, so strings) to a bias in [-100, 100]."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("logit_bias must be an object mapping token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise _invalid(f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed, got {len(value)}")
    bias: dict[int, float] = {}
    for key, b in value.items():
        if not (key.isascii() and key.isdigit()):
            raise _invalid(f"logit_bias keys must be token ids, got {key!r}")
        if not (isinstance(b, int | float) and not isinstance(b, bool)) or not -100 <= b <= 100:
            raise _invalid(f"logit_bias values must be numbers in [-100, 100], got {b!r}")
        bias[int(key)] = float(b)
    return bias


def _check_content(value: object) -> str | None:
    """Message content: a string, or a list of text parts (what OpenAI clients send). null
    stays None, so that the message can refuse it where content is required."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid("only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise _invalid("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid("content must be a string or a list of text parts")


# The JSON schemas below document what the validators accept (GET /openapi.json).
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXT = {"type": "string", "minLength": 1}
_BATCH = {"minItems": 1, "maxItems": MAX_PROMPTS}
_STOP = {"type": "string", "maxLength": MAX_STOP_LEN}
_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_BIAS = {
    "type": "object",
    "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    "maxProperties": MAX_LOGIT_BIAS,
}
_NULL = {"type": "null"}
PROMPT_SCHEMA = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, **_BATCH},
        _IDS,
        {"type": "array", "items": _IDS, **_BATCH},
    ]
}
Prompt = Annotated[Any, PlainValidator(_check_prompt), WithJsonSchema(PROMPT_SCHEMA)]
Stop = Annotated[
    Any,
    PlainValidator(_check_stop),
    WithJsonSchema(
        {"anyOf": [_STOP, {"type": "array", "items": _STOP, "maxItems": MAX_STOP}, _NULL]}
    ),
]
LogitBias = Annotated[
    Any, PlainValidator(_check_logit_bias), WithJsonSchema({"anyOf": [_BIAS, _NULL]})
]
Content = Annotated[
    Any,
    PlainValidator(_check_content),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _PART}, _NULL]}),
]
