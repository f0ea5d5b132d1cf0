"""JSON schemas (and other constraints) for the structured-output tests, with the checks their
outputs must pass. Every string and number is bounded, so that even a random model finishes."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.structured_spec import StructuredGrammar, StructuredSpec

SHORT = {"type": "string", "maxLength": 6}
SMALL_INT = {"type": "integer", "minimum": -20, "maximum": 20}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {"id": SMALL_INT, "name": SHORT, "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"name": SHORT, "age": AGE},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["person", "tags"],
        "additionalProperties": False,
    },
    "int_array_min_max": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 2,
        "maxItems": 4,
    },
    "string_enum": {"enum": ["red", "green", "blue"]},
    "mixed_enum": {"enum": [1, "two", None, True]},
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "x": SMALL_INT, "y": SMALL_INT},
        "required": ["kind", "x", "y"],
        "additionalProperties": False,
    },
    "number_bounds": {"type": "number", "minimum": -1.5, "maximum": 2.5},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9},
    "string_pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "string_lengths": {"type": "string", "minLength": 2, "maxLength": 4},
    "any_of": {"anyOf": [SMALL_INT, {"type": "string", "maxLength": 3}, {"type": "null"}]},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"enum": ["x", "y"]}, "v": SMALL_INT},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 5},
                  "maxItems": 2},
        "minItems": 1,
        "maxItems": 2,
    },
    "optional_property": {
        "type": "object",
        "properties": {"a": SMALL_INT, "b": {"enum": ["u", "v"]}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "defs_and_ref": {
        "$defs": {"pt": {"type": "object", "properties": {"x": SMALL_INT}, "required": ["x"],
                         "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "date_format": {"type": "string", "format": "date"},
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"enum": ["add", "sub"]}, SMALL_INT, SMALL_INT],
        "items": False,
        "minItems": 3,
    },
    "nullable_type_list": {"type": ["integer", "null"], "minimum": 0, "maximum": 99},
    "pattern_items": {
        "type": "array",
        "items": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
        "minItems": 1,
        "maxItems": 3,
    },
    "three_levels": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {"type": "object", "properties": {"c": {"type": "boolean"}},
                          "required": ["c"], "additionalProperties": False}
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
}  # fmt: skip


def json_spec(schema: dict[str, Any], param: str = "structured_outputs.json") -> StructuredSpec:
    return StructuredSpec("json", json.dumps(schema), param)


def compile_spec(engine: LLMEngine, spec: StructuredSpec) -> StructuredGrammar:
    return engine.compile_structured(spec).grammar


def check_json(text: str, schema: dict[str, Any]) -> None:
    """The text parses as JSON and validates against the schema (formats checked too)."""
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


CHOICES = ["yes", "no", 'say "maybe"']
GRAMMAR = 'root ::= pair ("," pair){0,3}\npair ::= [a-z] "=" [0-9]'
# name -> (kind, source, a regex the whole output must match)
OTHER_CONSTRAINTS: dict[str, tuple[str, str, str]] = {
    "regex": ("regex", r"[a-c]{2,5}-\d{1,3}", r"[a-c]{2,5}-\d{1,3}"),
    "choice": ("choice", json.dumps(CHOICES), "|".join(re.escape(c) for c in CHOICES)),
    "grammar": ("grammar", GRAMMAR, r"[a-z]=[0-9](,[a-z]=[0-9]){0,3}"),
}
