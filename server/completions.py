"""POST /v1/completions: prompts (text or token ids, batched), n choices, echo, logprobs.

echo with logprobs scores the prompt too (each prompt token's logprob given what precedes it,
the first token's null), which is how lm-evaluation-harness computes loglikelihoods; with
max_tokens 0 nothing is generated (the engine samples one token, which is dropped).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gemma_serve.server.engine.outputs import RequestOutput, TokenLogprob
from gemma_serve.server.engine.structured_spec import StructuredGrammar
from gemma_serve.server.engine_client import EngineClient, TokenizerLike
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
    COMPLETION_DEFAULT_MAX_TOKENS,
    check_choices,
    check_model,
    check_stream_options,
    child_seed,
    encode_prompt,
    resolve_max_tokens,
    sampling_params,
    truncate_prompt,
)
from gemma_serve.server.prompt_bound import refuse_hopeless_prompt
from gemma_serve.server.prompt_logprobs import prompt_logprobs
from gemma_serve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprobs,
    Usage,
    parse_request,
)
from gemma_serve.server.sse import event
from gemma_serve.server.state import server_state
from gemma_serve.server.structured_request import compile_constraint, structured_spec
from starlette.requests import Request
from starlette.responses import Response


async def create_completion(request: Request) -> Response:
    """OpenAI's /v1/completions; choice i of prompt p has index p * n + i."""
    state = server_state(request)
    engine = state.require_engine()
    req = await state.off_loop(parse_request, CompletionRequest, await request.body())
    check_model(req.model, engine.model_name)
    _reject_unsupported(req)
    structured = await compile_constraint(engine, state.metrics, structured_spec(req))
    prompts = req.prompts()
    check_choices(len(prompts), req.n or 1)
    for prompt in prompts:  # cheap, before any tokenization (truncation may shorten it)
        if isinstance(prompt, str) and req.truncate_prompt_tokens is None:
            refuse_hopeless_prompt(
                len(prompt), state.max_token_bytes, engine.max_model_len, "prompt"
            )
    request_id = f"cmpl-{request_id_of(request)}"
    subs, echo, prompt_ids = await state.off_loop(
        _sub_requests, req, prompts, engine, request_id, structured
    )
    group = GenerationGroup(engine, state.metrics, subs)
    view = _CompletionView(request_id, engine.model_name, engine.tokenizer, echo, prompt_ids, req)
    return await respond(
        request,
        group,
        stream=bool(req.stream),
        events=lambda: stream_events(
            group,
            prelude=view.prelude(),
            chunk=view.chunk,
            usage_chunk=view.usage_chunk if req.include_usage else None,
        ),
        build=lambda results: view.response(results, view.usage(group.usage())),
    )


def _sub_requests(
    req: CompletionRequest,
    prompts: list[str | list[int]],
    engine: EngineClient,
    request_id: str,
    structured: StructuredGrammar | None,
) -> tuple[list[SubRequest], dict[int, str], dict[int, list[int]]]:
    """The engine requests (prompts x n), the echoed text and the prompt ids by choice index.
    Tokenizes: runs on a worker thread."""
    tok = engine.tokenizer
    n = req.n or 1
    subs: list[SubRequest] = []
    echo: dict[int, str] = {}
    prompt_ids: dict[int, list[int]] = {}
    score_prompt = bool(req.echo) and req.logprobs is not None
    # Echo + logprobs and vLLM's prompt_logprobs share one scoring of the prompt.
    scored = [
        k for k in (req.logprobs if score_prompt else None, req.prompt_logprobs) if k is not None
    ]
    for p, prompt in enumerate(prompts):
        ids = encode_prompt(tok, prompt, req.add_special_tokens is not False)
        ids = truncate_prompt(ids, req.truncate_prompt_tokens, engine.max_model_len)
        max_tokens = resolve_max_tokens(
            1 if req.max_tokens == 0 else req.max_tokens,
            len(ids),
            engine.max_model_len,
            default=COMPLETION_DEFAULT_MAX_TOKENS,
            prompt_param="prompt",
        )
        for i in range(n):
            index = p * n + i
            params = sampling_params(
                req,
                max_tokens=max_tokens,
                logprobs=req.logprobs,
                prompt_logprobs=max(scored, default=None),
                stop_token_ids=frozenset(),
                seed=child_seed(req.seed, i),
                vocab_size=tok.vocab_size,
                structured=structured,
            )
            subs.append(SubRequest(index, f"{request_id}-{index}", ids, params, i == 0))
            if req.echo:
                echo[index] = prompt if isinstance(prompt, str) else tok.decode(ids)
            prompt_ids[index] = ids
    return subs, echo, prompt_ids


def _reject_unsupported(req: CompletionRequest) -> None:
    check_stream_options(req)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of must equal n: best-of sampling is not supported", "best_of")
    for name in ("tools", "tool_choice"):
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is a chat feature (POST /v1/chat/completions)", name)


class _CompletionView:
    """Formats outputs as OpenAI completion chunks and responses."""

    def __init__(
        self,
        request_id: str,
        model: str,
        tokenizer: TokenizerLike,
        echo: dict[int, str],
        prompt_ids: dict[int, list[int]],
        req: CompletionRequest,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self._tok = tokenizer
        self._echo = echo
        self._include_usage = req.include_usage
        self._prompt_ids = prompt_ids
        self._want_logprobs = req.logprobs is not None
        self._k = req.logprobs or 0
        self._prompt_k = req.prompt_logprobs
        # echo + logprobs: the echo goes out with the prompt's logprobs, once they are computed
        self._score_prompt = bool(echo) and self._want_logprobs
        self._generate = req.max_tokens != 0  # max_tokens 0: the sampled token is dropped
        self._offsets = {i: len(text) for i, text in echo.items()}  # text_offset, per choice

    def _wrap(
        self, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _dump(self, chunk: CompletionResponse) -> str:
        return chunk.model_dump_json(exclude=None if self._include_usage else {"usage"})

    def prelude(self) -> list[str]:
        """The echoed prompt of each choice, first, as OpenAI streams it."""
        if self._score_prompt:
            return []
        return [
            event(self._dump(self._wrap([CompletionChoice(index=i, text=text)])))
            for i, text in sorted(self._echo.items())
        ]

    def chunk(self, sub: SubRequest, out: RequestOutput) -> str:
        i = sub.index
        text = out.new_text if self._generate else ""
        echoed = self._score_prompt and out.prompt_logprobs is not None
        choice = CompletionChoice(
            index=i,
            text=self._echo[i] + text if echoed else text,
            logprobs=self._choice_logprobs(i, out.new_logprobs or (), out.prompt_logprobs),
            finish_reason=self._finish_reason(out.finish_reason) if out.finished else None,
            prompt_logprobs=self._prompt_logprobs(i, out.prompt_logprobs),
        )
        return self._dump(self._wrap([choice]))

    def _prompt_logprobs(
        self, index: int, scored: Sequence[TokenLogprob | None] | None
    ) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs field, once the prompt is scored and when asked for."""
        if scored is None or self._prompt_k is None:
            return None
        return prompt_logprobs(self._tok, self._prompt_ids[index], scored, self._prompt_k)

    def usage_chunk(self, usage: Usage) -> str:
        return self._wrap([], self.usage(usage)).model_dump_json()

    def usage(self, usage: Usage) -> Usage:
        """The group's usage; with max_tokens 0, the dropped tokens are not counted."""
        if self._generate:
            return usage
        dropped = {"completion_tokens": 0, "total_tokens": usage.prompt_tokens}
        return usage.model_copy(update=dropped)

    def _finish_reason(self, reason: str | None) -> str | None:
        return reason if self._generate or reason not in ("stop", "length") else "length"

    def response(self, results: dict[int, ChoiceResult], usage: Usage) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=i,
                text=self._echo.get(i, "") + ("".join(r.text) if self._generate else ""),
                logprobs=self._choice_logprobs(i, r.logprobs, r.prompt_logprobs),
                finish_reason=self._finish_reason(r.finish_reason),
                prompt_logprobs=self._prompt_logprobs(i, r.prompt_logprobs),
            )
            for i, r in sorted(results.items())
        ]
        return self._wrap(choices, usage)

    def _choice_logprobs(
        self,
        index: int,
        generated: Sequence[TokenLogprob],
        prompt: Sequence[TokenLogprob | None] | None,
    ) -> CompletionLogprobs | None:
        """Choice `index`'s logprobs field: None unless asked for; the prompt's tokens first
        when they are echoed and scored; the generated ones unless max_tokens is 0."""
        if not self._want_logprobs:
            return None
        out = CompletionLogprobs()
        if prompt is not None and self._score_prompt:
            self._add_prompt(out, self._prompt_ids[index], prompt)
        offset = self._offsets.get(index, 0)
        for lp in generated if self._generate else ():
            text = self._tok.token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(self._top(lp, text))
            out.text_offset.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return out

    def _add_prompt(
        self, out: CompletionLogprobs, ids: list[int], scored: Sequence[TokenLogprob | None]
    ) -> None:
        """The prompt's tokens: the first with null logprobs, as OpenAI returns them. BOS is
        listed but takes no room in the echoed text."""
        offset = 0
        for token, lp in zip(ids, scored, strict=True):
            text = self._tok.token_text(token)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += 0 if token == self._tok.bos_id else len(text)
            out.token_logprobs.append(None if lp is None else lp.logprob)
            out.top_logprobs.append(None if lp is None else self._top(lp, text))

    def _top(self, lp: TokenLogprob, text: str) -> dict[str, float]:
        """The alternatives by token text; OpenAI's dict holds the chosen token too."""
        top = {self._tok.token_text(t): v for t, v in lp.top[: self._k]}
        top.setdefault(text, lp.logprob)
        return top
