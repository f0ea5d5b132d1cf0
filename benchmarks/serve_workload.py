"""The serving benchmark's workload: prompts of controlled length and their arrival times.

Synthetic prompts are random common English words (about one SentencePiece token each), so a
prompt of k words is about k tokens; `TokenCalibration`, measured with the server's /tokenize,
corrects that for the tokenizer actually served. All randomness comes from seeded generators.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Frequent words that SentencePiece vocabularies hold as single pieces (with a leading space).
_WORD_TEXT = """
    the of and to in is was for on as with by at from that this which be are or an it not
    but have has had were they their one all more new other time year first two also after
    most many some would only these over such into people work world state city made part
    like well used each between system game high long life small name where number during
    day under water back since school group house found before second three being same
    while area still family point right place public music river south north east
    west early large power local best white black light green heavy short final open
"""
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class PromptSpec:
    """One request of the workload."""

    prompt: str
    max_tokens: int
    prompt_tokens: int | None = None  # exact count from the server's /tokenize, when known


@dataclass(frozen=True)
class TokenCalibration:
    """Prompt tokens ~= overhead + per_word * words, for the served tokenizer and template."""

    overhead: float = 0.0
    per_word: float = 1.0

    def words_for(self, tokens: int) -> int:
        """How many words make a prompt of about `tokens` tokens (at least one)."""
        return max(1, round((tokens - self.overhead) / self.per_word))


def sample_lengths(n: int, mean: int, range_ratio: float, rng: np.random.Generator) -> list[int]:
    """n lengths drawn uniformly from [mean * (1 - r), mean * (1 + r)], each at least 1."""
    lo = max(1, math.floor(mean * (1 - range_ratio)))
    hi = max(lo, math.ceil(mean * (1 + range_ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def random_text(num_words: int, rng: np.random.Generator) -> str:
    """`num_words` words drawn uniformly (with replacement) from WORDS."""
    picks = rng.integers(0, len(WORDS), size=num_words)
    return " ".join(WORDS[i] for i in picks)


def synthetic_prompts(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    calibration: TokenCalibration | None = None,
) -> list[PromptSpec]:
    """n prompts of about input_len tokens and exactly output_len generated tokens (each spread
    by range_ratio); the same seed gives the same prompts."""
    calibration = calibration or TokenCalibration()
    rng = np.random.default_rng(seed)
    inputs = sample_lengths(n, input_len, range_ratio, rng)
    outputs = sample_lengths(n, output_len, range_ratio, rng)
    return [
        PromptSpec(random_text(calibration.words_for(i), rng), o)
        for i, o in zip(inputs, outputs, strict=True)
    ]


def load_prompts_file(path: str | Path, n: int | None = None) -> list[PromptSpec]:
    """Prompts from a JSONL file of {"prompt": str, "max_tokens": int} lines; with n, the first
    n requests, cycling through the file when it holds fewer."""
    specs: list[PromptSpec] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
        prompt, max_tokens = item.get("prompt"), item.get("max_tokens")
        if not isinstance(prompt, str) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(
                f"{path}:{number}: expected {{'prompt': str, 'max_tokens': int >= 1}}, got {line!r}"
            )
        specs.append(PromptSpec(prompt, max_tokens))
    if not specs:
        raise ValueError(f"{path}: no prompts")
    if n is None:
        return specs
    return [specs[i % len(specs)] for i in range(n)]


def arrival_times(n: int, request_rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process at request_rate (the first at 0),
    or all at 0 when the rate is infinite."""
    if math.isinf(request_rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=n)
    return [0.0, *(float(t) for t in np.cumsum(gaps)[:-1])][:n]
