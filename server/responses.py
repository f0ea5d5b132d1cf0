"""POST /v1/responses (OpenAI's Responses API, text only) and GET /v1/responses/{id}.

A response is a chat completion underneath: `instructions` become the system message, `input`
(and the stored conversation of `previous_response_id`) the turns, and the chat path's
template, sampling parameters and engine requests do the rest (server/params.py,
server/generation.py), so the same messages give the chat endpoint's text. Only the framing
differs: a response object, or the Responses API's typed events
(`event: <type>` + `data: {json}` with a sequence_number each, no [DONE]).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from gemma_serve.server.engine.outputs import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH
from gemma_serve.server.engine_client import EngineClient
from gemma_serve.server.errors import APIError
from gemma_serve.server.generation import ChoiceResult, GenerationGroup, SubRequest, respond
from gemma_serve.server.middleware import request_id_of
from gemma_serve.server.params import chat_prompt, check_model, resolve_max_tokens, sampling_params
from gemma_serve.server.prompt_bound import refuse_hopeless_prompt
from gemma_serve.server.protocol import ChatCompletionRequest, Usage
from gemma_serve.server.response_store import StoredResponse
from gemma_serve.server.responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    input_messages,
)
from gemma_serve.server.state import ServerState, server_state
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)


async def create_response(request: Request) -> Response:
    """POST /v1/responses."""
    state = server_state(request)
    engine = state.require_engine()
    req = await state.off_loop(_parse, await request.body())
    check_model(req.model, engine.model_name)
    history: tuple[dict[str, str], ...] = ()
    if req.previous_response_id is not None:
        previous = state.responses.get(req.previous_response_id)
        if previous is None:
            raise _not_found(req.previous_response_id, param="previous_response_id")
        history = previous.messages
    conversation = [*history, *input_messages(req.input)]
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages = [*system, *conversation]
    chat = _as_chat_request(req, messages)
    chars = sum(len(m["content"]) for m in messages)
    refuse_hopeless_prompt(chars, state.max_token_bytes, engine.max_model_len, "input")
    ids = await state.off_loop(_prompt_ids, engine, chat)
    sub = _engine_request(engine, chat, ids, f"resp-{request_id_of(request)}-0")
    group = GenerationGroup(engine, state.metrics, [sub])
    view = _ResponseView(state, engine, req, tuple(conversation))
    return await respond(
        request,
        group,
        stream=bool(req.stream),
        events=lambda: view.events(group),
        build=lambda results: view.finish(results[0], group.usage()),
    )


async def get_response(request: Request, response_id: str) -> Response:
    """GET /v1/responses/{id}: a stored response, as it was returned."""
    stored = server_state(request).responses.get(response_id)
    if stored is None:
        raise _not_found(response_id, param="response_id")
    return Response(stored.body, media_type="application/json")


def _not_found(response_id: str, param: str) -> APIError:
    message = f"Response with id '{response_id}' not found (never stored, or evicted)"
    return APIError(404, message, param=param, code="response_not_found")


def _parse(body: bytes) -> ResponsesRequest:
    req = ResponsesRequest.model_validate_json(body)
    req.refuse_unsupported()
    return req


def _as_chat_request(
    req: ResponsesRequest, messages: list[dict[str, str]]
) -> ChatCompletionRequest:
    """The chat request the response is made of (sampling fields under their chat names)."""
    return ChatCompletionRequest.model_validate(
        {
            "messages": messages,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_completion_tokens": req.max_output_tokens,
            "user": req.user,
        }
    )


def _engine_request(
    engine: EngineClient, chat: ChatCompletionRequest, ids: list[int], request_id: str
) -> SubRequest:
    """The one engine request, with the chat endpoint's parameters and stop tokens."""
    max_tokens = resolve_max_tokens(
        chat.max_completion_tokens,
        len(ids),
        engine.max_model_len,
        default=None,
        prompt_param="input",
        tokens_param="max_output_tokens",
    )
    tok = engine.tokenizer
    params = sampling_params(
        chat,
        max_tokens=max_tokens,
        logprobs=None,
        stop_token_ids=tok.stop_token_ids(chat=True),
        seed=None,
        vocab_size=tok.vocab_size,
    )
    return SubRequest(0, request_id, ids, params)


def _prompt_ids(engine: EngineClient, chat: ChatCompletionRequest) -> list[int]:
    try:
        return chat_prompt(engine.tokenizer, chat.messages, chat)
    except APIError as exc:  # the template's complaint is about this endpoint's `input`
        exc.param = "input"
        raise


class _ResponseView:
    """Formats one generation as a response object, or as the Responses API's events."""

    def __init__(
        self,
        state: ServerState,
        engine: EngineClient,
        req: ResponsesRequest,
        conversation: tuple[dict[str, str], ...],
    ) -> None:
        self._state = state
        self._req = req
        self._model = engine.model_name
        self._conversation = conversation
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    def _object(self, status: str, text: str | None, usage: Usage | None = None) -> ResponseObject:
        req = self._req
        output = []
        if text is not None:
            content = [OutputText(text=text)]
            output = [OutputMessage(id=self.item_id, status=status, content=content)]
        incomplete = (
            IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
        )
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            incomplete_details=incomplete,
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            metadata=req.metadata,
            model=self._model,
            output=output,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id,
            store=req.store is not False,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            tool_choice=req.tool_choice or "auto",
            usage=None if usage is None else _usage(usage),
            user=req.user,
        )

    def finish(self, result: ChoiceResult, usage: Usage) -> ResponseObject:
        """The final response object (stored unless store is false)."""
        text = "".join(result.text)
        status = "incomplete" if result.finish_reason == FINISH_LENGTH else "completed"
        response = self._object(status, text, usage)
        if self._req.store is not False:
            turn = {"role": "assistant", "content": text}
            stored = StoredResponse(response.model_dump_json(), (*self._conversation, turn))
            self._state.responses.put(self.id, stored)
        return response

    async def events(self, group: GenerationGroup) -> AsyncIterator[str]:
        """The event stream; a failure after the 200 is an `error` event."""
        seq = itertools.count()
        for payload in self._opening():
            yield _frame(payload, seq)
        result = ChoiceResult()
        try:
            async for _, out in group.outputs():
                result.add(out)
                if out.finish_reason in (FINISH_ERROR, FINISH_ABORT):
                    reason = out.error or ("aborted" if out.finish_reason == FINISH_ABORT else "")
                    yield _frame(_error(f"Generation failed: {reason or 'engine error'}"), seq)
                    return
                if out.new_text:
                    yield _frame(
                        self._part_event(
                            "response.output_text.delta", delta=out.new_text, logprobs=[]
                        ),
                        seq,
                    )
        except Exception as exc:
            logger.error("response stream failed", exc_info=exc)
            yield _frame(
                _error(f"Generation failed ({type(exc).__name__}); see the server log"), seq
            )
            return
        response = self.finish(result, group.usage())
        for payload in self._closing(response):
            yield _frame(payload, seq)

    def _opening(self) -> Iterator[dict[str, Any]]:
        started = self._object("in_progress", None).model_dump(mode="json")
        yield {"type": "response.created", "response": started}
        yield {"type": "response.in_progress", "response": started}
        item = OutputMessage(id=self.item_id, status="in_progress", content=[])
        yield {"type": "response.output_item.added", "output_index": 0, "item": item.model_dump()}
        yield self._part_event("response.content_part.added", part=OutputText(text="").model_dump())

    def _closing(self, response: ResponseObject) -> Iterator[dict[str, Any]]:
        message = response.output[0]
        text = message.content[0]
        yield self._part_event("response.output_text.done", text=text.text, logprobs=[])
        yield self._part_event("response.content_part.done", part=text.model_dump())
        yield {"type": "response.output_item.done", "output_index": 0, "item": message.model_dump()}
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        yield {"type": kind, "response": response.model_dump(mode="json")}

    def _part_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return {"type": kind, **where, **fields}


def _usage(usage: Usage) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _error(message: str) -> dict[str, Any]:
    return {"type": "error", "code": "generation_failed", "message": message, "param": None}


def _frame(payload: dict[str, Any], seq: Iterator[int]) -> str:
    payload["sequence_number"] = next(seq)
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"
