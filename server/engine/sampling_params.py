"""Per-request generation settings, validated once when the request is created."""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma_serve.server.engine.structured_spec import StructuredGrammar

MAX_LOGPROBS = 20
# Below these, float32 sampling overflows (logits / T or logits / penalty become inf and the
# softmax NaN): temperatures under MIN_TEMPERATURE are served greedily (vLLM does the same), and
# smaller repetition penalties are refused. server/limits.py re-exports them for the HTTP side.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy.

    Validation raises ValueError naming the parameter; the HTTP layer validates first and maps
    its own errors, this is the engine's last line of defence.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: the sampled token plus the top-k alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token (after the first)
    logit_bias: tuple[tuple[int, float], ...] = ()
    include_stop_str_in_output: bool = False  # keep the stop string / stop token's text
    skip_special_tokens: bool = True  # drop control tokens (<eos>, <end_of_turn>...) from text
    # Lower is served first from the waiting queue, FCFS within a priority (vLLM's `priority`;
    # kept here so that it travels with the request through every engine interface).
    priority: int = 0
    structured: StructuredGrammar | None = None  # the output constraint, compiled (structured.py)

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (disabled) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            (
                "repetition_penalty",
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
                f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}]",
            ),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"must be in [0, {MAX_LOGPROBS}]",
            ),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"must be in [0, {MAX_LOGPROBS}]",
            ),
            ("stop", all(self.stop), "stop strings must be non-empty"),
            # A finished grammar allows only its stop tokens, which min_tokens would ban.
            (
                "min_tokens",
                self.structured is None or self.min_tokens == 0,
                "must be 0 with structured outputs",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE the division by the temperature overflows fp32: greedy anyway.
        return self.temperature < MIN_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
