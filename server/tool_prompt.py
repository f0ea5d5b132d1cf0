"""Tools and tool turns in the Gemma chat template, which has no tool tokens and only user and
model turns (torch-free).

- The offered functions, and how to call them, join the system message (Gemma folds it into
  the first user turn): one JSON line per function, then the ```tool_call block format.
- An assistant message's tool_calls become ```tool_call blocks after its text, exactly as the
  model writes them (tool_parser.py reads them back).
- `tool` messages become ```tool_response blocks in a user turn; consecutive tool messages,
  and a user message right after them, share that turn (the template needs user and model
  turns to alternate).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from gemma_serve.server.errors import bad_request
from gemma_serve.server.tool_protocol import AssistantToolCall
from gemma_serve.server.tools import ToolPlan, parameters_of

CALL_FENCE = "```tool_call"
RESPONSE_FENCE = "```tool_response"
FENCE_END = "```"


class Message(Protocol):
    """What a chat message carries (protocol.ChatMessage)."""

    role: str
    content: str | None
    tool_calls: list[AssistantToolCall] | None
    tool_call_id: str | None


def render_turns(messages: Sequence[Message], plan: ToolPlan | None) -> list[dict[str, str]]:
    """Plain {role, content} turns for Tokenizer.apply_chat_template: tool calls and results
    written as fenced blocks, the tools into the system message."""
    turns: list[dict[str, str]] = []
    from_tools: list[bool] = []  # per turn: made of tool results (a user message may join)
    calls: dict[str, str] = {}  # tool_call_id -> function name
    for i, m in enumerate(messages):
        if m.role == "tool":
            text, role = _tool_response(m, calls, i), "user"
        elif m.role in ("assistant", "model") and m.tool_calls:
            for c in m.tool_calls:
                calls[c.id] = c.function.name
            text, role = _assistant_with_calls(m, i), m.role
        else:
            role = "system" if m.role == "developer" else m.role  # its newer name
            text = m.content or ""
        if turns and from_tools[-1] and role == "user":
            turns[-1]["content"] += "\n\n" + text
            continue
        turns.append({"role": role, "content": text})
        from_tools.append(m.role == "tool")
    if plan is not None:
        _add_tools(turns, plan)
    return turns


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it (and as it is shown the calls it made)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_FENCE}\n{call}\n{FENCE_END}"


def tools_text(plan: ToolPlan) -> str:
    """The system-prompt part that offers the functions."""
    lines = ["You can call these functions:"]
    lines += [
        json.dumps(
            {"name": f.name, "description": f.description or "", "parameters": parameters_of(f)},
            ensure_ascii=False,
        )
        for f in plan.functions
    ]
    lines += [
        "",
        "To call a function, write a block like this, with arguments that match its parameters:",
        call_block("function_name", {"argument": "value"}),
        "A function's result comes back in a ```tool_response block.",
    ]
    if plan.mode == "named":
        lines.append(f"Call the function {plan.called[0].name} now.")
    elif plan.mode == "required":
        lines.append("Reply with function calls only.")
    else:
        lines.append("Call a function only when it helps; otherwise reply in plain text.")
    if not plan.parallel and plan.mode != "named":
        lines.append("Call at most one function.")
    return "\n".join(lines)


def _add_tools(turns: list[dict[str, str]], plan: ToolPlan) -> None:
    text = tools_text(plan)
    if turns and turns[0]["role"] == "system":
        turns[0]["content"] = f"{turns[0]['content']}\n\n{text}"
    else:
        turns.insert(0, {"role": "system", "content": text})


def _assistant_with_calls(m: Message, index: int) -> str:
    blocks = []
    for j, c in enumerate(m.tool_calls or ()):
        try:
            arguments = json.loads(c.function.arguments)
        except ValueError as exc:
            raise bad_request(
                f"tool call arguments must be JSON text: {exc}",
                param=f"messages[{index}].tool_calls[{j}].function.arguments",
            ) from exc
        blocks.append(call_block(c.function.name, arguments))
    text = (m.content or "").strip()
    return "\n".join([text, *blocks] if text else blocks)


def _tool_response(m: Message, calls: dict[str, str], index: int) -> str:
    name = calls.get(m.tool_call_id or "")
    if name is None:
        raise bad_request(
            f"tool_call_id {m.tool_call_id!r} answers no tool call of an earlier assistant message",
            param=f"messages[{index}].tool_call_id",
        )
    result = json.dumps({"name": name, "content": m.content or ""}, ensure_ascii=False)
    return f"{RESPONSE_FENCE}\n{result}\n{FENCE_END}"
