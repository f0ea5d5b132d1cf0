"""Iteration-level scheduling: which requests run this step, and how many tokens each (torch-free).

Each step: running decodes first, then running prefills (chunked to the token budget), then
waiting requests in queue order (priority, then arrival) while both KV pools and max_num_seqs
allow. How prefills share the budget (a long prompt capped so that waiting requests start
beside it; the partial and long prefill limits, which may skip a waiting request for a step)
is decided by `prefill_policy.py`. When the cache cannot grow a running request, the most
recently admitted request is preempted by recompute: its blocks are freed and it re-enters
the front of the waiting queue.

When a step fails (the forward pass raised), `recover` restarts the batch's requests by
recompute and each then runs alone up to the point that failed: a request that breaks the
forward pass fails by itself, and every other one goes on with its output intact.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from gemma_serve.server.engine.errors import RequestTooLongError
from gemma_serve.server.engine.kv_manager import KVCacheManager
from gemma_serve.server.engine.prefill_policy import PrefillLimits, PrefillSlots
from gemma_serve.server.engine.request import Request, RequestStatus

# Unexplained failed steps a request may be part of before it is failed itself (a fault that
# needs several requests together, none failing alone, ends after this many tries).
MAX_FAULTS = 3


@dataclass(frozen=True)
class ScheduledChunk:
    """num_tokens tokens of `request` starting at position `start` run this step.

    A speculating decode (`draft` non-empty) runs the request's last token followed by its
    draft tokens, 1 + len(draft) in all, and samples at every one of them (verification).
    """

    request: Request
    start: int
    num_tokens: int
    draft: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token: attends to its own fresh K/V plus the cached context. A
        one-token chunk runs as a decode (everything before it is cached), even in a prompt."""
        return self.num_tokens > 1

    @property
    def known_end(self) -> int:
        """The end of the chunk's known tokens (the draft tokens come after)."""
        return self.end - len(self.draft)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a token is sampled."""
        return self.known_end == self.request.num_tokens

    @property
    def num_sample_rows(self) -> int:
        """Rows whose logits are sampled: the last known token's, then each draft token's."""
        return 1 + len(self.draft) if self.samples else 0

    def token_ids(self) -> list[int]:
        return self.request.tokens(self.start, self.known_end) + list(self.draft)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's work. Decodes (one token, context all cached) come first in the batch."""

    decodes: tuple[ScheduledChunk, ...]
    prefills: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]

    @classmethod
    def of(cls, chunks: list[ScheduledChunk], preempted: list[str]) -> SchedulerOutput:
        """Chunks split into decodes and prefills, each kept in scheduling order."""
        decodes = tuple(c for c in chunks if not c.is_prefill)
        prefills = tuple(c for c in chunks if c.is_prefill)
        return cls(decodes, prefills, tuple(preempted))

    @property
    def chunks(self) -> tuple[ScheduledChunk, ...]:
        return self.decodes + self.prefills

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        prefill: PrefillLimits | None = None,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.prefill = prefill or PrefillLimits()  # none given: the budget filled in order
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.retrying: deque[Request] = deque()  # after a failed step; finished ones linger
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queue a request that `check` accepted (the engine checks before it adds): behind
        every waiting request of the same or a lower `priority` value (lower runs first, FCFS
        within a priority)."""
        priority = request.params.priority
        index = len(self.waiting)
        while index and self.waiting[index - 1].params.priority > priority:
            index -= 1
        self.waiting.insert(index, request)

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestTooLongError if such a request could never be served. Reads only fixed
        sizes (the context, the pools), so any thread may call it."""
        total = num_prompt_tokens + max_tokens
        asked = f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total}"
        if total > self.max_model_len:
            raise RequestTooLongError(
                f"{asked} exceeds the maximum context length of {self.max_model_len} tokens"
            )
        if not self.kv.can_ever_fit(total):
            raise RequestTooLongError(
                f"{asked} tokens cannot fit in the KV cache "
                f"(at most {self.kv.max_tokens_that_fit()} tokens)"
            )

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None

    def schedule(self, drafts: Mapping[str, Sequence[int]] | None = None) -> SchedulerOutput:
        """This step's chunks. drafts: proposed tokens per running request; a request whose
        only token to compute is its last one verifies them in its chunk (budget allowing)."""
        drafts = drafts or {}
        while self.retrying and (self.retrying[0].finished or not self.retrying[0].retry_until):
            self.retrying.popleft()  # retried past the failure, or ended (aborted, failed)
        if self.retrying:
            return self._schedule_alone(self.retrying[0])
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        # Decodes first: one token each, cheap and latency-critical; then running prefills.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        slots = PrefillSlots(self.prefill, self._contended(order))
        for req in order:
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            remaining = req.num_tokens - req.num_computed_tokens
            n = min(remaining, slots.chunk_budget(remaining, budget))
            draft = tuple(drafts.get(req.request_id, ())[: budget - 1]) if remaining == 1 else ()
            chunk = ScheduledChunk(req, req.num_computed_tokens, n + len(draft), draft)
            grown = self._grow_or_preempt(chunk, preempted)
            if grown is not None:
                chunks.append(grown)
                budget -= grown.num_tokens
                slots.take(remaining, n)
        if preempted:  # a victim may have been scheduled before the request that evicted it
            chunks = [c for c in chunks if c.request.status == RequestStatus.RUNNING]
        # New requests only when nothing had to be preempted (no thrashing), in queue order.
        if not preempted:
            chunks += self._admit(budget, slots)
        return SchedulerOutput.of(chunks, preempted)

    def _contended(self, running: list[Request]) -> bool:
        """Whether another prefill could run beside a long one this step (then a long prefill
        is capped): two or more prefills among the running ones and the waiting ones that a
        free seat and the long-prefill limit would let start."""
        limits = self.prefill
        if not limits.long_threshold:
            return False
        prefills = [n for r in running if (n := r.num_tokens - r.num_computed_tokens) > 1]
        longs = sum(limits.is_long(n) for n in prefills)
        if len(self.running) < self.max_num_seqs:
            for req in self.waiting:
                if len(prefills) > 1:
                    break
                if not limits.is_long(req.num_tokens) or longs < limits.max_long:
                    prefills.append(req.num_tokens)
                    longs += limits.is_long(req.num_tokens)
        return len(prefills) > 1

    def _admit(self, budget: int, slots: PrefillSlots) -> list[ScheduledChunk]:
        """Start waiting requests in queue order with what is left of the budget. One the
        prefill limits hold back is skipped for this step (those behind it may start); one
        the KV cache cannot take stops admission (no overtaking for memory)."""
        chunks: list[ScheduledChunk] = []
        if budget == 0 or len(self.running) >= self.max_num_seqs:
            return chunks  # nothing can start: no copy of the queue
        for req in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if not slots.admits(req.num_tokens, budget):
                continue
            # Prompt logprobs need every prompt position computed: no cached prefix for them.
            reuse = req.params.prompt_logprobs is None
            cap = slots.chunk_budget(req.num_tokens, budget)
            admitted = self.kv.try_admit(req.request_id, req.prompt_ids, req.num_tokens, cap, reuse)
            if admitted is None:
                break
            start, n = admitted
            self.waiting.remove(req)
            req.num_computed_tokens = start
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = start
            self.running.append(req)
            chunks.append(ScheduledChunk(req, start, n))
            budget -= n
            slots.take(req.num_tokens - start, n)
        return chunks

    def _schedule_alone(self, req: Request) -> SchedulerOutput:
        """A step with `req` only (a request retrying after a failed step)."""
        preempted: list[str] = []
        if req.status == RequestStatus.WAITING:
            while len(self.running) >= self.max_num_seqs:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.insert(0, req)  # first in admission order: never its own victim
        n = min(req.num_tokens - req.num_computed_tokens, self.max_num_batched_tokens)
        chunk = ScheduledChunk(req, req.num_computed_tokens, n)
        if self._grow_or_preempt(chunk, preempted) is None:
            return SchedulerOutput.of([], preempted)  # cannot happen: it fit before
        return SchedulerOutput.of([chunk], preempted)

    def recover(self, output: SchedulerOutput) -> list[Request]:
        """The step `output` failed. Returns the requests to fail: one that ran alone, or that
        has been in MAX_FAULTS failed steps not explained by a culprit (a request of the step
        that then failed alone). The others restart by recompute and retry alone."""
        chunks = [c for c in output.chunks if c.request.status == RequestStatus.RUNNING]
        if len(chunks) == 1:  # failed alone: the shared failures it was in are explained
            for peers in chunks[0].request.fault_peers:
                for peer in peers:
                    peer.faults = max(0, peer.faults - 1)
        members = [c.request for c in chunks]
        culprits = []
        for chunk in reversed(chunks):  # reversed: appendleft keeps their order at the head
            req = chunk.request
            req.faults += 1
            if len(chunks) == 1 or req.faults >= MAX_FAULTS:
                culprits.append(req)
                continue
            req.fault_peers.append([r for r in members if r is not req])
            req.retry_until = max(req.retry_until, chunk.known_end)
            self._restart(req)
            if req not in self.retrying:
                self.retrying.appendleft(req)
        return culprits[::-1]

    def _grow_or_preempt(
        self, chunk: ScheduledChunk, preempted: list[str]
    ) -> ScheduledChunk | None:
        """Grow the chunk's request's blocks to hold it, preempting the latest admitted requests
        as needed; a speculating chunk that does not fit drops its draft first (speculation
        never preempts). Returns the chunk that fits, None if its request was preempted.
        """
        req = chunk.request
        if chunk.draft:
            if self.kv.try_grow(req.request_id, chunk.end, chunk.start):
                return chunk
            chunk = replace(chunk, num_tokens=chunk.num_tokens - len(chunk.draft), draft=())
        context_from = chunk.start if chunk.is_prefill else None  # keeps the context's table
        while not self.kv.try_grow(req.request_id, chunk.end, context_from):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return None
        return chunk

    def _preempt(self, req: Request) -> None:
        self._restart(req)
        req.num_preemptions += 1
        self.num_preemptions += 1

    def _restart(self, req: Request) -> None:
        """Free a running request's blocks; it waits at the head of the queue to recompute."""
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)

    def update(self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]]) -> None:
        """Record computed tokens and append the sampled ones (one, or for a speculating chunk
        the accepted draft tokens and the one after them). Positions of rejected draft tokens
        are rolled back: not counted as computed, their slots are rewritten before anything
        reads them. Whether a request stops is the engine's call (LLMEngine._finish), which
        ends it through `finish`."""
        now = time.monotonic()
        for chunk in output.chunks:
            req = chunk.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            tokens = sampled.get(req.request_id)
            accepted = len(tokens) - 1 if tokens else 0  # draft tokens kept
            req.num_computed_tokens = chunk.known_end + accepted
            self.kv.computed(req.request_id, req.num_computed_tokens, req.num_prompt_tokens)
            self.kv.commit(req.request_id)
            if req.num_computed_tokens >= req.retry_until:
                req.retry_until = 0  # past the point that failed: batched again
            if not tokens:
                continue
            req.output_ids.extend(tokens)
            if req.first_token_time is None:
                req.first_token_time = now

    def finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End a request (stop, length, abort, error) and free its blocks. The engine ends
        requests through LLMEngine._finish, which calls this."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        else:
            return
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.error = error
        req.finished_time = time.monotonic()
