"""Chat tool calling, the request side: the `tools` / `tool_choice` / `parallel_tool_calls`
fields, their validation (a 400 naming the field), and the JSON schema that "required" and a
named function constrain the output to (compiled by the structured-output path). Torch-free.

The format the model writes (docs in README, "Tool calling"):
- tool_choice "auto": free text in which each call is a fenced block
  ```tool_call
  {"name": "get_weather", "arguments": {"city": "Paris"}}
  ```
  parsed out of the output by server/tool_parser.py;
- "required" / a named function: the output is constrained to bare JSON, a call object as
  above (a named function, or parallel_tool_calls false) or a non-empty array of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from gemma_serve.server.engine.schema_support import check_schema
from gemma_serve.server.engine.structured_spec import StructuredOutputError, StructuredSpec
from gemma_serve.server.errors import bad_request
from gemma_serve.server.tool_protocol import FunctionDef, ToolDef, ToolFields

ToolMode = Literal["auto", "required", "named"]
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_EMPTY_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values, not schemas


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its generation. `functions` are those rendered into
    the prompt (all offered ones); `called` those the output may call."""

    mode: ToolMode
    functions: tuple[FunctionDef, ...]
    called: tuple[FunctionDef, ...]
    parallel: bool

    @property
    def constrained(self) -> bool:
        return self.mode != "auto"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.called)


def tool_plan(req: ToolFields) -> ToolPlan | None:
    """The request's tool plan, or None when the output is plain text (no tools, or "none")."""
    tools = req.tools or []
    _check_functions(tools)
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    functions = tuple(t.function for t in tools)
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, got "
                f"{choice!r}",
                param="tool_choice",
            )
        if choice == "required" and not tools:
            raise bad_request("tool_choice 'required' needs tools", param="tool_choice")
        if choice == "none" or not tools:
            return None
        mode: ToolMode = "auto" if choice == "auto" else "required"
        return ToolPlan(mode, functions, functions, req.parallel_tool_calls is not False)
    named = _named_function(choice, functions)
    return ToolPlan("named", functions, (named,), parallel=False)


def tool_constraint(plan: ToolPlan | None, other: StructuredSpec | None) -> StructuredSpec | None:
    """The one output constraint of the request: the tool calls' ("required" or named), or
    the structured-output field's; both at once is a 400."""
    if plan is None or not plan.constrained:
        return other
    if other is not None:
        raise bad_request(
            f"tool_choice {plan.mode!r} constrains the output to tool calls; it cannot be "
            f"combined with {other.param}",
            param="tool_choice",
        )
    return StructuredSpec("json", json.dumps(call_schema(plan), ensure_ascii=False), "tools")


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON schema of the constrained output: one call object, or (parallel "required")
    a non-empty array of them. Each function's parameters live under $defs (their own $refs
    rewritten to point there), so that tools' $defs never collide."""
    defs = {f"tool_{i}": _hoisted(f, i) for i, f in enumerate(plan.called)}
    cases = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": {"$ref": f"#/$defs/tool_{i}"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for i, f in enumerate(plan.called)
    ]
    call = cases[0] if len(cases) == 1 else {"anyOf": cases}
    if plan.parallel:
        return {"$defs": defs, "type": "array", "items": call, "minItems": 1}
    return {"$defs": defs, **call}


def parameters_of(function: FunctionDef) -> dict[str, Any]:
    """A function's parameters schema; none given means no arguments (OpenAI's default)."""
    return function.parameters if function.parameters is not None else _EMPTY_PARAMETERS


def _check_functions(tools: list[ToolDef]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not _NAME.fullmatch(name):
            raise bad_request(
                f"function names must be 1-64 letters, digits, '_' or '-', got {name!r}",
                param=f"tools[{i}].function.name",
            )
        if name in seen:
            raise bad_request(f"two tools are named {name!r}", param=f"tools[{i}].function.name")
        seen.add(name)
        param = f"tools[{i}].function.parameters"
        schema = parameters_of(tool.function)
        if schema.get("type", "object") != "object":
            raise bad_request("function parameters must be a JSON schema of type object", param)
        try:
            check_schema(schema, param)
        except StructuredOutputError as exc:
            raise bad_request(str(exc), param=exc.param) from exc


def _named_function(choice: dict[str, Any], functions: tuple[FunctionDef, ...]) -> FunctionDef:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request(
            'a named tool_choice is {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    found = next((f for f in functions if f.name == name), None)
    if found is None:
        raise bad_request(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return found


def _hoisted(function: FunctionDef, i: int) -> Any:
    base = f"#/$defs/tool_{i}"

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: v if k in _DATA_KEYWORDS else rewrite(v) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = base + ref[1:]
        return out

    return rewrite(parameters_of(function))
