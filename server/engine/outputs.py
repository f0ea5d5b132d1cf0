"""What the engine hands back: per-step request deltas and per-step statistics (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, replace

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of a generated token (of the soft-capped logits) and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), best first


@dataclass(frozen=True)
class RequestTimes:
    """Wall-clock instants (time.monotonic()) in a request's life, for latency metrics."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float | None


@dataclass(frozen=True)
class RequestOutput:
    """The delta a request produced in one engine step (or its final state).

    new_text is detokenized incrementally: concatenating new_text over all outputs of a request
    gives its full text with stop strings removed and never a broken UTF-8 sequence.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    new_logprobs: tuple[TokenLogprob, ...] | None
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    times: RequestTimes | None = None  # set on the final output
    # With prompt_logprobs: once, on the first output; entry 0 (the first token) is None.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache

    @classmethod
    def ended(
        cls,
        request_id: str,
        num_prompt_tokens: int,
        num_output_tokens: int,
        reason: str,
        error: str | None = None,
    ) -> RequestOutput:
        """A final output carrying no new tokens (an error or an abort)."""
        return cls(
            request_id=request_id,
            new_token_ids=(),
            new_text="",
            new_logprobs=None,
            num_prompt_tokens=num_prompt_tokens,
            num_output_tokens=num_output_tokens,
            finished=True,
            finish_reason=reason,
            error=error,
        )


@dataclass(frozen=True)
class StepStats:
    """One engine step, for metrics."""

    num_running: int
    num_waiting: int
    kv_usage_global: float
    kv_usage_local: float
    num_batched_tokens: int
    num_preemptions: int  # preemptions that happened during this step
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache this step
    num_draft_tokens: int = 0  # speculative draft tokens verified this step
    accepted_per_position: tuple[int, ...] = ()  # [j]: draft tokens j accepted this step

    @property
    def num_accepted_tokens(self) -> int:
        """Of the draft tokens, those accepted."""
        return sum(self.accepted_per_position)

    def without_step_counts(self) -> StepStats:
        """The gauges alone: every field that counts one step's events zeroed (what a
        publish without a step reports)."""
        return replace(
            self,
            num_batched_tokens=0,
            num_preemptions=0,
            num_cached_tokens=0,
            num_draft_tokens=0,
            accepted_per_position=(),
        )
