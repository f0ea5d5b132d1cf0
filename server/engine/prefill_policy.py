"""Fair prefill: how one step's token budget is shared between prefills (torch-free).

A long prompt must not take every step's whole budget while new requests wait behind it. Three
limits, vLLM's names (`--long-prefill-token-threshold`, `--max-num-partial-prefills`,
`--max-long-partial-prefills`):

- A request with more than `long_threshold` tokens left to prefill is *long*. While another
  prefill could run beside it, a long prefill gets at most `long_threshold` tokens a step, so
  the rest of the budget admits waiting requests in every step; alone it gets the whole budget
  (nothing waits for the room). 0: no request is long, nothing is capped.
- At most `max_partial` requests are *partially prefilled* at once: prompt started but not
  finished when the step ends. A waiting request that would be left partial while that many
  are is held back for the step; one that finishes its prompt within the step needs no slot.
- At most `max_long` of those partial prefills are long; a waiting long request beyond them
  is held back, so shorter requests behind it go first (vLLM: "shorter prompts jump the
  queue").

A waiting request is judged by its whole length (a cached prefix is found only when it is
admitted), so the judgement errs on the side of holding back. With `long_threshold` 0 the
budget is filled in order as before this policy: such a step leaves at most one request
partial, so the other two limits never bite.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillLimits:
    long_threshold: int = 0  # tokens left to prefill above which a prefill is long; 0: off
    max_partial: int = 1
    max_long: int = 1

    def is_long(self, remaining: int) -> bool:
        return 0 < self.long_threshold < remaining


class PrefillSlots:
    """One step's prefills counted as they are scheduled: the partial ones and the long ones.

    contended: another prefill could run beside a long one this step (the scheduler decides),
    which is when a long prefill is capped.
    """

    def __init__(self, limits: PrefillLimits, contended: bool) -> None:
        self.limits = limits
        self.contended = contended
        self.num_partial = 0
        self.num_long = 0

    def chunk_budget(self, remaining: int, budget: int) -> int:
        """The most tokens a prefill with `remaining` tokens left may take of `budget`."""
        if self.contended and self.limits.is_long(remaining):
            return min(budget, self.limits.long_threshold)
        return budget

    def admits(self, remaining: int, budget: int) -> bool:
        """Whether a waiting request with `remaining` tokens to prefill may start this step:
        one that would be left partial needs a partial slot, and a long one a long slot."""
        if remaining - self.chunk_budget(remaining, budget) <= 1:
            return True  # finishes its prompt this step
        if self.limits.is_long(remaining) and self.num_long >= self.limits.max_long:
            return False
        return self.num_partial < self.limits.max_partial

    def take(self, remaining: int, num_tokens: int) -> None:
        """Count a prefill scheduled for num_tokens of its `remaining` tokens. One token left
        after the step is not partial: it runs as a decode (ScheduledChunk.is_prefill)."""
        if remaining - num_tokens > 1:
            self.num_partial += 1
            self.num_long += self.limits.is_long(remaining)
