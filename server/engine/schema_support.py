"""Which JSON Schema features the grammar compiler honours (torch-free).

xgrammar compiles some keywords it does not enforce (multipleOf, uniqueItems, not, if/then,
contains, ...) and only warns on others. A constraint that is not enforced would let invalid
output through with a 200, so every keyword outside the list below is refused up front.
"""

from __future__ import annotations

from typing import Any

from gemma_serve.server.engine.structured_spec import StructuredOutputError

ENFORCED = frozenset(
    {
        "type", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
        "properties", "required", "additionalProperties", "minProperties", "maxProperties",
        "patternProperties",
        "items", "prefixItems", "minItems", "maxItems",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "minLength", "maxLength", "pattern", "format",
    }
)  # fmt: skip
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment",
        "deprecated", "readOnly", "writeOnly", "strict",
    }
)  # fmt: skip
FORMATS = frozenset(
    {"date", "time", "date-time", "duration", "email", "uri", "uuid", "ipv4", "ipv6", "hostname"}
)
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("additionalProperties", "items")
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def check_schema(schema: Any, param: str) -> None:
    """Raise StructuredOutputError (naming `param`) for a schema with a feature not enforced."""
    _check(schema, param, "#")


def rewrite_string_lengths(schema: Any) -> Any:
    """A copy of the schema with minLength/maxLength written as a pattern.

    xgrammar 0.2.9 compiles a length-bounded string to characters [^"\\\r\n], so it admits
    control characters JSON forbids (a random model writes "\x0b"); its patterns are matched as
    JSON string content, which excludes them. The pattern admits no escapes: a subset.
    """
    if isinstance(schema, list):
        return [rewrite_string_lengths(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else rewrite_string_lengths(v) for k, v in schema.items()}
    if "minLength" in out or "maxLength" in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f'^[^"\\\\\\x00-\\x1f]{{{low},{high}}}$'
    return out


def _check(node: Any, param: str, where: str) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise StructuredOutputError(f"{where}: a schema must be an object or a boolean", param)
    for key in node:
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise StructuredOutputError(
                f"{where}: JSON schema keyword {key!r} is not supported for structured outputs",
                param,
            )
    _check_values(node, param, where)
    for key in _SUBSCHEMA_MAPS:
        for name, sub in _mapping(node, key, param, where).items():
            _check(sub, param, f"{where}/{key}/{name}")
    for key in _SUBSCHEMAS:
        if key in node:
            _check(node[key], param, f"{where}/{key}")
    for key in ("anyOf", "prefixItems"):
        for i, sub in enumerate(_list(node, key, param, where)):
            _check(sub, param, f"{where}/{key}/{i}")


def _check_values(node: dict[str, Any], param: str, where: str) -> None:
    types = node.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in TYPES:
            raise StructuredOutputError(f"{where}: unsupported type {t!r}", param)
    if "pattern" in node and ("minLength" in node or "maxLength" in node):
        raise StructuredOutputError(
            f"{where}: 'pattern' together with 'minLength'/'maxLength' is not supported "
            "(put the length into the pattern)",
            param,
        )
    if "format" in node and node["format"] not in FORMATS:
        raise StructuredOutputError(
            f"{where}: string format {node['format']!r} is not supported", param
        )
    if "anyOf" in node and not _list(node, "anyOf", param, where):
        raise StructuredOutputError(f"{where}: 'anyOf' must not be empty", param)


def _mapping(node: dict[str, Any], key: str, param: str, where: str) -> dict[str, Any]:
    value = node.get(key, {})
    if not isinstance(value, dict):
        raise StructuredOutputError(f"{where}/{key} must be an object", param)
    return value


def _list(node: dict[str, Any], key: str, param: str, where: str) -> list[Any]:
    value = node.get(key, [])
    if not isinstance(value, list):
        raise StructuredOutputError(f"{where}/{key} must be an array", param)
    return value
