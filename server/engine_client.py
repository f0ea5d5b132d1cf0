"""What the HTTP layer needs from the engine and its tokenizer (structural types).

server.engine.async_engine.AsyncEngine is the real implementation; tests use a fake with the
same surface. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from gemma_serve.server.engine.outputs import RequestOutput, StepStats
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.structured_spec import CompileResult, StructuredSpec


class TokenizerLike(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def encode_with_control(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]: ...

    def stop_token_ids(self, chat: bool) -> frozenset[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class EngineClient(Protocol):
    tokenizer: TokenizerLike
    model_name: str
    max_model_len: int
    max_queued_requests: int

    def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def compile_structured(self, spec: StructuredSpec) -> CompileResult: ...

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None: ...

    def add_failure_listener(self, fn: Callable[[BaseException], None]) -> None: ...

    @property
    def is_running(self) -> bool: ...


# Builds the engine; slow (loads weights), so the app calls it on a background thread.
EngineProvider = Callable[[], EngineClient]
