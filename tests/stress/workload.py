"""Request specs for the stress tests and their expected greedy results, served alone offline.

A `Spec` is one request (completion or chat, prompt text, max_tokens), always greedy with
ignore_eos so that its output is fully determined. `Oracle` runs each distinct spec by
itself through the offline engine: the reference every served result must equal, whatever the
batch it was served in.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine_client import TokenizerLike

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# Words the tiny test tokenizer was trained on, so prompts are a few tokens per word.
TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, "
    "thank you. Numbers like 12345 and 67890 are split into digits. Write a short poem about "
    "the sea, the sky and the stars at night. What is the capital of France? Paris."
)
WORDS = tuple(TEXT.split(" "))


@dataclass(frozen=True)
class Spec:
    """One greedy request: a completion of `text`, or a chat with `text` as the user turn."""

    chat: bool
    text: str
    max_tokens: int

    @property
    def path(self) -> str:
        return CHAT if self.chat else COMPLETIONS

    def body(self, *, stream: bool, include_usage: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": stream,
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.text}]
        else:
            body["prompt"] = self.text
        if stream and include_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def engine_input(self, tokenizer: TokenizerLike) -> tuple[list[int], SamplingParams]:
        """What the server should hand the engine: the prompt ids and the sampling params."""
        if self.chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": self.text}])
            stops = tokenizer.stop_token_ids(chat=True)  # <end_of_turn> and <eos> end a turn
        else:
            ids, stops = tokenizer.encode(self.text, add_bos=True), frozenset()
        params = SamplingParams(
            max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=stops
        )
        return ids, params


@dataclass(frozen=True)
class Expected:
    text: str
    finish_reason: str | None
    num_tokens: int


def make_specs(
    rng: random.Random, count: int, *, max_words: int = 30, max_tokens: tuple[int, int] = (2, 16)
) -> list[Spec]:
    """`count` distinct-ish specs: half chats, prompts of 1..max_words words, mixed max_tokens."""
    specs = []
    for i in range(count):
        start = rng.randrange(len(WORDS))
        words = [WORDS[(start + k) % len(WORDS)] for k in range(rng.randint(1, max_words))]
        specs.append(Spec(i % 2 == 1, " ".join(words), rng.randint(*max_tokens)))
    return specs


class Oracle:
    """Expected results: each distinct spec served alone by the offline engine
    (LLMEngine.generate), computed once per test session."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cache: dict[Spec, Expected] = {}

    def expected(self, specs: Iterable[Spec]) -> dict[Spec, Expected]:
        for spec in dict.fromkeys(specs):
            if spec not in self._cache:
                ids, params = spec.engine_input(self.engine.tokenizer)
                (result,) = self.engine.generate([ids], params)
                self._cache[spec] = Expected(
                    result.text, result.finish_reason, len(result.token_ids)
                )
        return dict(self._cache)
