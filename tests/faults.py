"""Fault injection into a real engine: its sampler or its forward pass raises whenever a predicate
on the batch's requests says so. The forward pass raises after running, so K/V are half written,
as after a real fault. Shared by the engine tests and the stress tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.sampler import Sampler, SamplerOutput

Predicate = Callable[[Sequence[Request]], bool]


@dataclass
class Faults:
    """What was injected: the request ids of each batch that raised, in order."""

    fails: Predicate
    raised: list[set[str]] = field(default_factory=list)

    @property
    def batched(self) -> int:
        """Faults raised with other requests in the same batch (so the isolation path ran)."""
        return sum(len(ids) > 1 for ids in self.raised)

    def maybe_raise(self, requests: Sequence[Request], where: str) -> None:
        if self.fails(requests):
            self.raised.append({r.request_id for r in requests})
            raise RuntimeError(f"injected {where} fault")


class _FaultySampler:
    """Delegates to the real sampler, but raises first when the faults say so."""

    def __init__(self, real: Sampler, faults: Faults) -> None:
        self.real, self.faults = real, faults

    def __call__(self, logits: torch.Tensor, requests: tuple[Request, ...]) -> SamplerOutput:
        self.faults.maybe_raise(requests, "sampling")
        return self.real(logits, requests)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def fail_sampling(engine: LLMEngine, fails: Predicate) -> Faults:
    """From now on the engine's sampler raises on any batch for which fails(requests) holds."""
    faults = Faults(fails)
    engine.sampler = _FaultySampler(engine.sampler, faults)  # type: ignore[assignment]
    return faults


def fail_forward(engine: LLMEngine, fails: Predicate) -> Faults:
    """From now on the forward pass runs, then raises, on any step whose scheduled requests
    satisfy fails(requests)."""
    faults = Faults(fails)
    runner = engine.runner
    build, forward = runner.build, runner.forward
    batch: list[Request] = []

    def build_and_note(sched: Any) -> Any:
        batch[:] = [c.request for c in sched.chunks]
        return build(sched)

    def faulty_forward(model_batch: Any) -> Any:
        out = forward(model_batch)
        faults.maybe_raise(batch, "forward")
        return out

    runner.build, runner.forward = build_and_note, faulty_forward  # type: ignore[method-assign]
    return faults
