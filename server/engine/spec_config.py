"""`--speculative-config`: vLLM's JSON object, parsed and checked at start-up (torch-free).

Two methods:
- `{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
  "prompt_lookup_min": m}`: proposals copied from the sequence's own earlier tokens
  (`ngram_proposer.py`). As in vLLM, a missing bound takes the other one's value, both
  missing are 5.
- `{"model": PATH|PRESET, "num_speculative_tokens": k}` (method "draft_model"): a smaller
  Gemma with the same tokenizer drafts the k tokens.
Either takes `disable_by_batch_size`: with more running requests than that, a step does not
speculate (a large batch is compute-bound, where drafts cost more than they save).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

NGRAM = "ngram"
DRAFT_MODEL = "draft_model"
METHODS = (NGRAM, DRAFT_MODEL)
DEFAULT_LOOKUP = 5  # vLLM's n-gram size when neither bound is given
MAX_SPECULATIVE_TOKENS = 32
_KEYS = {
    "method",
    "model",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "disable_by_batch_size",
}


@dataclass(frozen=True)
class SpeculativeConfig:
    """What to speculate with; checked on construction (ValueError naming the field)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = DEFAULT_LOOKUP
    prompt_lookup_min: int = DEFAULT_LOOKUP
    model: str | None = None  # the draft model (method "draft_model")
    disable_by_batch_size: int | None = None  # None: speculate at any batch size

    def __post_init__(self) -> None:
        k, lo, hi = self.num_speculative_tokens, self.prompt_lookup_min, self.prompt_lookup_max
        checks = [
            ("method", self.method in METHODS, f"must be one of {METHODS}"),
            (
                "num_speculative_tokens",
                _is_int(k) and 1 <= k <= MAX_SPECULATIVE_TOKENS,
                f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}]",
            ),
            ("prompt_lookup_min", _is_int(lo) and lo >= 1, "must be an integer >= 1"),
            (
                "prompt_lookup_max",
                _is_int(hi) and _is_int(lo) and hi >= lo,
                "must be an integer >= prompt_lookup_min",
            ),
            (
                "model",
                (self.model is None) == (self.method == NGRAM),
                "is required with a draft model and not allowed with ngram",
            ),
            (
                "disable_by_batch_size",
                self.disable_by_batch_size is None
                or (_is_int(self.disable_by_batch_size) and self.disable_by_batch_size >= 1),
                "must be an integer >= 1",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"--speculative-config: {name} {why}, got {getattr(self, name)!r}")

    def speculates_at(self, num_running: int) -> bool:
        """Whether a step with this many running requests speculates."""
        limit = self.disable_by_batch_size
        return limit is None or num_running <= limit


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """The flag's JSON text -> a SpeculativeConfig; ValueError with a clear message."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--speculative-config is not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--speculative-config must be a JSON object, got {text!r}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"--speculative-config: unknown keys {unknown} (known: {sorted(_KEYS)})")
    method = raw.get("method", DRAFT_MODEL if "model" in raw else None)
    if method is None:
        raise ValueError('--speculative-config needs "method": "ngram" or a draft "model"')
    if "num_speculative_tokens" not in raw:
        raise ValueError("--speculative-config needs num_speculative_tokens")
    hi, lo = raw.get("prompt_lookup_max"), raw.get("prompt_lookup_min")
    hi, lo = (hi if hi is not None else lo), (lo if lo is not None else hi)
    return SpeculativeConfig(
        method=method,
        num_speculative_tokens=raw["num_speculative_tokens"],
        prompt_lookup_max=DEFAULT_LOOKUP if hi is None else hi,
        prompt_lookup_min=DEFAULT_LOOKUP if lo is None else lo,
        model=raw.get("model"),
        disable_by_batch_size=raw.get("disable_by_batch_size"),
    )
