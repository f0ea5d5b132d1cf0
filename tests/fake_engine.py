"""A deterministic stand-in for AsyncEngine (and its tokenizer), for the HTTP server's tests.

Tokens are bytes (id = 5 + byte). The "model" repeats the prompt's text tokens, one per step,
starting at offset `seed % len` when sampling with a seed (so seeded choices differ), and emits
EOS once it has repeated the whole text (unless ignore_eos): a short max_tokens finishes with
"length", a long one with "stop". Stop conditions, stop strings and incremental UTF-8 decoding
are the real engine's (server/engine/output_processor.py): `new_text` never holds a partial
character or a partial stop string.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from gemma_serve.server.engine.errors import EngineDeadError, QueueFullError, RequestTooLongError
from gemma_serve.server.engine.output_processor import OutputProcessor
from gemma_serve.server.engine.outputs import (
    FINISH_ABORT,
    FINISH_ERROR,
    RequestOutput,
    StepStats,
    TokenLogprob,
)
from gemma_serve.server.engine.request import Request, RequestStatus
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.structured_spec import (
    CompileResult,
    StructuredOutputError,
    StructuredSpec,
)

PAD, EOS, BOS, START_TURN, END_TURN = range(5)
OFFSET = 5
SPECIAL_TEXT = {PAD: "<pad>", EOS: "<eos>", BOS: "<bos>", START_TURN: "<start_of_turn>"}
SPECIAL_TEXT[END_TURN] = "<end_of_turn>"
TOKEN_LOGPROB = -0.25


class FakeTokenizer:
    """Byte-level tokenizer with Gemma's special ids and chat template layout."""

    vocab_size = OFFSET + 256
    bos_id = BOS
    eos_id = EOS
    pad_id: int | None = PAD

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [OFFSET + b for b in text.encode()]
        return [BOS, *ids] if add_bos else ids

    def encode_with_control(self, text: str, add_bos: bool = True) -> list[int]:
        """Control-token strings ("<bos>", "<start_of_turn>"...) become their ids."""
        ids = [BOS] if add_bos else []
        pieces = re.split("(" + "|".join(map(re.escape, SPECIAL_TEXT.values())) + ")", text)
        by_text = {v: k for k, v in SPECIAL_TEXT.items()}
        for piece in pieces:
            ids += [by_text[piece]] if piece in by_text else self.encode(piece, add_bos=False)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.token_bytes(t) for t in ids if t >= OFFSET).decode(errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id < OFFSET

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < OFFSET:
            return SPECIAL_TEXT[token_id].encode()
        return bytes([token_id - OFFSET])

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def stop_token_ids(self, chat: bool) -> frozenset[int]:
        return frozenset({EOS, END_TURN}) if chat else frozenset({EOS})

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """<bos><start_of_turn>user\\n{text}<end_of_turn>\\n ... <start_of_turn>model\\n"""
        prefix, turns = "", list(messages)
        if turns and turns[0]["role"] == "system":
            prefix, turns = turns[0]["content"] + "\n\n", turns[1:]
        if not turns:
            raise ValueError("a conversation needs a user message")
        ids = [BOS]
        for i, m in enumerate(turns):
            role = {"user": "user", "assistant": "model", "model": "model"}.get(m["role"])
            if role != ("user" if i % 2 == 0 else "model"):
                raise ValueError(f"messages[{i}]: roles must alternate user/assistant")
            text = (prefix if i == 0 else "") + m["content"].strip()
            ids += [START_TURN, *self.encode(f"{role}\n{text}", False), END_TURN, OFFSET + 10]
        if continue_final_message:
            return ids[:-2]
        return [*ids, START_TURN, *self.encode("model\n", False)] if add_generation_prompt else ids


class FakeEngine:
    """The AsyncEngine surface the server uses, with knobs and records for tests."""

    def __init__(
        self, *, max_model_len: int = 256, model_name: str = "fake-gemma", step_s: float = 0.0
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_queued_requests = 1024  # the server's default
        self.step_s = step_s  # sleep per generated token
        self.queue_full = False  # raise QueueFullError on the next requests
        self.fail_with: Exception | None = None  # raised by generate before the first output
        self.error_output: str | None = None  # finish every request with this engine error
        self.submitted: dict[str, tuple[list[int], SamplingParams]] = {}
        self.aborted: list[str] = []
        self.active: set[str] = set()
        self.started = False
        self.stopped = False
        self._listeners: list[Callable[[StepStats], None]] = []

    @property
    def is_running(self) -> bool:
        return self.started and not self.stopped

    def start(self) -> None:
        asyncio.get_running_loop()  # as the real one: must be called on the loop
        self.started = True

    async def shutdown(self) -> None:
        for rid in list(self.active):
            self.abort(rid)
        self.stopped = True

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    def add_failure_listener(self, fn: Callable[[BaseException], None]) -> None:
        pass  # the fake never stops by itself

    def compile_structured(self, spec: StructuredSpec) -> CompileResult:
        raise StructuredOutputError("the fake engine has no grammar compiler", spec.param)

    def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.active.discard(request_id)
            self.aborted.append(request_id)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if self.fail_with is not None:
            raise self.fail_with
        if self.queue_full:
            raise QueueFullError("1 requests are waiting (--max-queued-requests 1)")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestTooLongError(f"{len(prompt_ids)} + {params.max_tokens} tokens")
        if request_id in self.submitted:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.submitted[request_id] = (list(prompt_ids), params)
        self.active.add(request_id)
        run = _Run(self.tokenizer, request_id, prompt_ids, params)
        try:
            while request_id in self.active:
                await asyncio.sleep(self.step_s)
                if request_id not in self.active:
                    break
                out = run.step() if self.error_output is None else run.error(self.error_output)
                if out.finished:
                    self.active.discard(request_id)
                self._notify(len(prompt_ids) if run.num_out == 1 else 1)
                yield out
                if out.finished:
                    return
            yield run.final(FINISH_ABORT)  # aborted while the consumer still listens
        finally:
            self.abort(request_id)  # a no-op once finished

    def _notify(self, num_tokens: int) -> None:
        stats = StepStats(
            num_running=len(self.active),
            num_waiting=0,
            kv_usage_global=0.5,
            kv_usage_local=0.25,
            num_batched_tokens=num_tokens,
            num_preemptions=0,
        )
        for fn in self._listeners:
            fn(stats)


class _Run:
    """One request's generation: the fake model picks the tokens; stop conditions, text and
    outputs come from the real engine's OutputProcessor over a real Request."""

    def __init__(
        self, tok: FakeTokenizer, request_id: str, prompt: list[int], params: SamplingParams
    ) -> None:
        self.params = params
        self.source = [t for t in prompt if t >= OFFSET] or [OFFSET + ord("x")]
        seeded = params.seed is not None and params.temperature > 0
        self.start = params.seed % len(self.source) if seeded else 0
        req = Request(request_id, list(prompt), params, eos_token_ids=frozenset({EOS}))
        req.status, req.first_scheduled_time = RequestStatus.RUNNING, req.arrival_time
        if params.prompt_logprobs is not None:  # each prompt token at TOKEN_LOGPROB, no top
            req.prompt_logprobs = [None, *(TokenLogprob(t, TOKEN_LOGPROB, ()) for t in prompt[1:])]
        self.request = req
        self.outputs = OutputProcessor(tok)  # type: ignore[arg-type]
        self.outputs.add(req)

    @property
    def num_out(self) -> int:
        return len(self.request.output_ids)

    def step(self) -> RequestOutput:
        p, req = self.params, self.request
        i = self.num_out
        eos = i >= len(self.source) and i >= p.min_tokens and not p.ignore_eos
        token = EOS if eos else self.source[(self.start + i) % len(self.source)]
        req.output_ids.append(token)
        req.first_token_time = req.first_token_time or time.monotonic()
        reason = self.outputs.finish_reason(req)
        if reason is not None:
            self._end(reason)
        logprobs = None
        if p.logprobs is not None:
            top = tuple(
                (OFFSET + (token - OFFSET + j) % 256, TOKEN_LOGPROB - j) for j in range(p.logprobs)
            )
            logprobs = [TokenLogprob(token, TOKEN_LOGPROB, top)]
        return self.outputs.output(req, [token], logprobs)

    def final(self, reason: str, error: str | None = None) -> RequestOutput:
        self._end(reason, error)
        return self.outputs.output(self.request, [], None)

    def error(self, message: str) -> RequestOutput:
        return self.final(FINISH_ERROR, message)

    def _end(self, reason: str, error: str | None = None) -> None:
        """What Scheduler.finish records (the fake has no KV cache to free)."""
        req = self.request
        req.status, req.finish_reason, req.error = RequestStatus.FINISHED, reason, error
        req.finished_time = time.monotonic()
