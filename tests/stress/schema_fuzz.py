"""Hypothesis strategies and a response check, both read from the app's OpenAPI document.

`request_bodies(doc, path)` draws request bodies for a POST route from its published schema:
conforming ones (values at and near every bound), mutated ones (any field replaced by any JSON
value, required fields dropped, unknown fields added) and arbitrary JSON. `schema_errors`
validates a response against a published schema (the subset of JSON Schema the document uses).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

Schema = dict[str, Any]
MAX_ITEMS = 4  # arrays and objects stay small: examples are many, not large
MAX_TEXT = 40

# Any JSON value, including what strict JSON forbids (NaN, infinities) and out-of-range ints.
ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([-(2**63) - 1, 2**63, 10**30, -1, 0])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=MAX_TEXT),
    lambda inner: (
        st.lists(inner, max_size=MAX_ITEMS)
        | st.dictionaries(st.text(max_size=8), inner, max_size=MAX_ITEMS)
    ),
    max_leaves=10,
)


def resolve(schema: Schema, doc: Schema) -> Schema:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][name]
    return schema


def _integers(schema: Schema) -> st.SearchStrategy[int]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    low = lo if lo is not None else -50
    high = hi if hi is not None else low + 50
    edges = [b + d for b in (lo, hi) if b is not None for d in (0, 1, -1)]
    return st.integers(low, high) | st.sampled_from([e for e in edges if low <= e <= high] or [low])


def _numbers(schema: Schema) -> st.SearchStrategy[float]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    inside = st.floats(
        lo if lo is not None else ex_lo,
        hi if hi is not None else ex_hi,
        exclude_min=ex_lo is not None,
        exclude_max=ex_hi is not None,
        allow_nan=False,
        allow_infinity=False,
    )
    return inside | st.sampled_from([float(b) for b in (lo, hi) if b is not None] or [0.0])


def _objects(
    schema: Schema, doc: Schema, overrides: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Every required property and a few optional ones (so that most draws are valid)."""
    props = schema.get("properties", {})
    if not props:
        names = st.from_regex(r"\A[0-9]{1,3}\Z") if "propertyNames" in schema else st.text()
        values = schema.get("additionalProperties")
        value = conforming(values, doc) if isinstance(values, dict) else ANY_JSON
        return st.dictionaries(names, value, max_size=MAX_ITEMS)
    fields = {k: overrides[k] if k in overrides else conforming(v, doc) for k, v in props.items()}
    required = [k for k in props if k in schema.get("required", ())]
    optional = [k for k in props if k not in required]
    if not optional:
        return st.fixed_dictionaries({k: fields[k] for k in required})
    chosen = st.lists(st.sampled_from(optional), max_size=MAX_ITEMS, unique=True)
    return chosen.flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in required + keys})
    )


def conforming(
    schema: Schema, doc: Schema, overrides: dict[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[Any]:
    """Values the schema accepts, biased to its bounds; `overrides` replaces the strategies of
    some top-level properties."""
    schema = resolve(schema, doc)
    if "anyOf" in schema:
        return st.one_of([conforming(s, doc) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return _integers(schema)
    if kind == "number":
        return _numbers(schema)
    if kind == "string":
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", MAX_TEXT)
        return st.text(min_size=lo, max_size=max(lo, min(hi, MAX_TEXT)))
    if kind == "array":
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", MAX_ITEMS)
        items = conforming(schema.get("items", {}), doc)
        return st.lists(items, min_size=lo, max_size=max(lo, min(hi, MAX_ITEMS)))
    if kind == "object":
        return _objects(schema, doc, overrides or {})
    return ANY_JSON


def _mutated(schema: Schema, doc: Schema) -> st.SearchStrategy[dict[str, Any]]:
    """Each field conforming, out of its bounds or any JSON; any may be missing; extras."""
    props = resolve(schema, doc).get("properties", {})
    fields = st.fixed_dictionaries(
        {}, optional={k: conforming(v, doc) | _hostile(v, doc) for k, v in props.items()}
    )
    extras = st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=2)
    return st.builds(lambda f, e: {**e, **f}, fields, extras)


def _hostile(schema: Schema, doc: Schema) -> st.SearchStrategy[Any]:
    """Just outside the schema's numeric bounds, or any JSON value at all."""
    schema = resolve(schema, doc)
    options = schema.get("anyOf", [schema])
    bounds = [
        b + d
        for o in options
        for key, d in [("minimum", -1), ("maximum", 1), ("exclusiveMinimum", 0)]
        if isinstance(b := resolve(o, doc).get(key), int | float)
    ]
    return st.sampled_from(bounds) | ANY_JSON if bounds else ANY_JSON


def request_bodies(
    doc: Schema, path: str, overrides: dict[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[Any]:
    """Bodies for POST `path`: conforming (with `overrides`), mutated, or arbitrary JSON."""
    op = doc["paths"][path]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    valid = conforming(schema, doc, overrides)
    return st.one_of(valid, valid, _mutated(schema, doc), ANY_JSON)  # half conforming


def _type_ok(kind: str, value: Any) -> bool:
    return {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }[kind]


def schema_errors(value: Any, schema: Schema, doc: Schema, where: str = "$") -> list[str]:
    """Why `value` does not match `schema` (empty when it does)."""
    schema = resolve(schema, doc)
    if "anyOf" in schema:
        options = [schema_errors(value, s, doc, where) for s in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{where}: matches no anyOf option"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} != {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    kind = schema.get("type")
    if kind is not None and not _type_ok(kind, value):
        return [f"{where}: {type(value).__name__} is not {kind}"]
    errors = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where}.{k}: missing" for k in schema.get("required", ()) if k not in value]
        for k, v in value.items():
            sub = props.get(k, schema.get("additionalProperties"))
            if sub is False:
                errors.append(f"{where}.{k}: not allowed")
            elif isinstance(sub, dict):
                errors += schema_errors(v, sub, doc, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], doc, f"{where}[{i}]")
    return errors
