"""POST /v1/chat/completions: the Gemma chat template, n choices, logprobs + top_logprobs."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gemma_serve.server.engine.outputs import RequestOutput, TokenLogprob
from gemma_serve.server.engine_client import TokenizerLike
from gemma_serve.server.errors import bad_request
from gemma_serve.server.generation import (
    ChoiceResult,
    GenerationGroup,
    SubRequest,
    respond,
    stream_events,
)
from gemma_serve.server.middleware import request_id_of
from gemma_serve.server.params import (
    chat_prompt,
    check_model,
    check_stream_options,
    child_seed,
    resolve_max_tokens,
    sampling_params,
    truncate_prompt,
)
from gemma_serve.server.prompt_bound import refuse_hopeless_prompt
from gemma_serve.server.prompt_logprobs import prompt_logprobs
from gemma_serve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
    parse_request,
)
from gemma_serve.server.sse import event
from gemma_serve.server.state import server_state
from gemma_serve.server.structured_request import compile_constraint, structured_spec
from gemma_serve.server.tool_output import ChoiceTools
from gemma_serve.server.tools import ToolPlan, tool_constraint, tool_plan
from starlette.requests import Request
from starlette.responses import Response


async def create_chat_completion(request: Request) -> Response:
    """OpenAI's /v1/chat/completions. max_tokens defaults to whatever context remains."""
    state = server_state(request)
    engine = state.require_engine()
    req = await state.off_loop(parse_request, ChatCompletionRequest, await request.body())
    check_model(req.model, engine.model_name)
    check_stream_options(req)
    tools = tool_plan(req)
    constraint = tool_constraint(tools, structured_spec(req))
    structured = await compile_constraint(engine, state.metrics, constraint)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    tok = engine.tokenizer
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    # the template, tools and tool calls only add tokens: content alone is a lower bound
    chars = sum(len(m.content or "") for m in req.messages)
    if req.truncate_prompt_tokens is None:  # truncation may shorten it
        refuse_hopeless_prompt(chars, state.max_token_bytes, engine.max_model_len, "messages")
    ids = await state.off_loop(
        chat_prompt, tok, req.messages, req, bool(req.add_special_tokens), tools
    )
    ids = truncate_prompt(ids, req.truncate_prompt_tokens, engine.max_model_len)
    max_tokens = resolve_max_tokens(
        requested,
        len(ids),
        engine.max_model_len,
        default=None,
        prompt_param="messages",
        tokens_param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    # <end_of_turn> ends the model's turn; like EOS, it no longer does under ignore_eos
    stop_ids = frozenset() if req.ignore_eos else tok.stop_token_ids(chat=True)
    request_id = f"chatcmpl-{request_id_of(request)}"
    subs = [
        SubRequest(
            i,
            f"{request_id}-{i}",
            ids,
            sampling_params(
                req,
                max_tokens=max_tokens,
                logprobs=logprobs,
                stop_token_ids=stop_ids,
                seed=child_seed(req.seed, i),
                vocab_size=tok.vocab_size,
                prompt_logprobs=req.prompt_logprobs if i == 0 else None,  # one scoring
                structured=structured,
            ),
            counts_prompt=i == 0,
        )
        for i in range(req.n or 1)
    ]
    group = GenerationGroup(engine, state.metrics, subs)
    view = _ChatView(request_id, engine.model_name, tok, req, ids, tools)
    return await respond(
        request,
        group,
        stream=bool(req.stream),
        events=lambda: stream_events(
            group,
            prelude=view.prelude(len(subs)),
            chunk=view.chunk,
            usage_chunk=view.usage_chunk if req.include_usage else None,
        ),
        build=lambda results: view.response(results, group.usage()),
    )


class _ChatView:
    """Formats outputs as OpenAI chat completion chunks and responses."""

    def __init__(
        self,
        request_id: str,
        model: str,
        tokenizer: TokenizerLike,
        req: ChatCompletionRequest,
        prompt_ids: list[int],
        tools: ToolPlan | None,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self._tok = tokenizer
        self._include_usage = req.include_usage
        self._want_logprobs = bool(req.logprobs)
        self._prompt_ids = prompt_ids
        self._prompt_k = req.prompt_logprobs
        self._tools = ChoiceTools(tools) if tools is not None else None
        # vLLM's echo: the reply starts with the last message when it is the assistant's
        last = req.messages[-1]
        self._echo = (
            (last.content or "") if req.echo and last.role in ("assistant", "model") else ""
        )

    def _dump(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return chunk.model_dump_json(exclude=None if self._include_usage else {"usage"})

    def prelude(self, n: int) -> list[str]:
        """The role of each choice first, as OpenAI streams it; then the echo (vLLM). A reply
        that can only be tool calls starts with no content (null, as OpenAI's)."""
        content = None if self._tools is not None and self._tools.calls_only else ""
        role = [
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=content))
            for i in range(n)
        ]
        echo = [ChatChunkChoice(index=i, delta=ChatDelta(content=self._echo)) for i in range(n)]
        return [event(self._dump([c])) for c in role + (echo if self._echo else [])]

    def chunk(self, sub: SubRequest, out: RequestOutput) -> str | None:
        # The finishing chunk carries an empty delta unless the last step produced text.
        delta = ChatDelta(content=out.new_text) if out.new_text or not out.finished else ChatDelta()
        reason = out.finish_reason if out.finished else None
        if self._tools is not None:  # text held back (a call may be starting) sends nothing
            delta = self._tools.delta(sub.index, out.new_text, out.finished) or ChatDelta()
            reason = self._tools.finish_reason(sub.index, reason)
            if delta == ChatDelta() and not (out.finished or self._want_logprobs):
                return None
        choice = ChatChunkChoice(
            index=sub.index,
            delta=delta,
            logprobs=self._logprobs(out.new_logprobs or ()) if self._want_logprobs else None,
            finish_reason=reason,
        )
        return self._dump([choice])

    def usage_chunk(self, usage: Usage) -> str:
        return self._dump([], usage)

    def response(self, results: dict[int, ChoiceResult], usage: Usage) -> ChatCompletionResponse:
        choices = []
        for i, r in sorted(results.items()):
            message, reason = self._message(r)
            logprobs = self._logprobs(r.logprobs) if self._want_logprobs else None
            choices.append(
                ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason)
            )
        scored = results[0].prompt_logprobs  # only choice 0 scores the prompt
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            prompt_logprobs=None
            if scored is None or self._prompt_k is None
            else prompt_logprobs(self._tok, self._prompt_ids, scored, self._prompt_k),
        )

    def _message(self, r: ChoiceResult) -> tuple[ChatMessageOut, str | None]:
        """A choice's message (tool calls read out of its text) and finish reason."""
        text = "".join(r.text)
        if self._tools is None:
            return ChatMessageOut(content=self._echo + text), r.finish_reason
        message, reason = self._tools.message(text, r.finish_reason)
        if self._echo:
            message.content = self._echo + (message.content or "")
        return message, reason

    def _logprobs(self, logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            tok = self._tok
            return TopLogprob(
                token=tok.token_text(token_id),
                logprob=logprob,
                bytes=list(tok.token_bytes(token_id)),
            )

        content = [
            ChatTokenLogprob(
                **top(lp.token_id, lp.logprob).model_dump(),
                top_logprobs=[top(t, v) for t, v in lp.top],
            )
            for lp in logprobs
        ]
        return ChatLogprobs(content=content)
