"""A request's state as the scheduler sees it (torch-free)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from gemma_serve.server.engine.outputs import TokenLogprob
from gemma_serve.server.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Prompt, generated tokens and progress of one sequence.

    num_computed_tokens counts tokens whose K/V are in the cache; after a preemption it drops to
    0 and the prompt plus the tokens generated so far are prefilled again (recompute).
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    # With params.prompt_logprobs: entry t scores prompt token t (entry 0, the first, is None);
    # filled chunk by chunk as the prompt is prefilled (prompt_logprobs.py), kept across
    # preemptions.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    faults: int = 0  # failed engine steps with this request in the batch, not yet explained
    # The other requests of each failed shared step this request was in: when one of them
    # then fails alone, that step is explained and no longer counts against this one.
    fault_peers: list[list[Request]] = field(default_factory=list, repr=False)
    retry_until: int = 0  # > 0: after a failed step, runs alone until this many are computed
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids of positions start..end-1 over prompt + output."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]
