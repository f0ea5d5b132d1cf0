"""Which requests speculate in a step, and their draft tokens (torch-free).

A request speculates when its only token left to compute is its last one (it decodes), it has
no output constraint (structured outputs never speculate: their grammar would have to be
advanced and rolled back over the draft), it is not retrying alone after a failed step, and
at least one draft token can still be used (max_tokens, the context). No request speculates
in a step with more running requests than disable_by_batch_size.
"""

from __future__ import annotations

from collections.abc import Sequence

from gemma_serve.server.engine import ngram_proposer
from gemma_serve.server.engine.request import Request, RequestStatus
from gemma_serve.server.engine.spec_config import NGRAM, SpeculativeConfig


class NgramSpeculator:
    """Drafts from the sequence's own tokens (`ngram_proposer.propose`)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        if config.method != NGRAM:
            raise ValueError(f"NgramSpeculator serves method {NGRAM!r}, got {config.method!r}")
        self.config = config
        self.max_model_len = max_model_len

    def lookahead(self) -> int:
        """The most positions past the accepted sequence a step writes (ring sizing)."""
        return self.config.num_speculative_tokens

    def reset(self) -> None:
        """After a failed drafting: nothing to drop (n-gram drafts keep no state)."""

    def drafts(self, running: Sequence[Request]) -> dict[str, list[int]]:
        """Draft tokens for this step, by request id (only requests with some)."""
        cfg = self.config
        if not cfg.speculates_at(len(running)):
            return {}
        out: dict[str, list[int]] = {}
        for req in running:
            k = usable_draft_len(req, cfg.num_speculative_tokens, self.max_model_len)
            if k == 0:
                continue
            draft = ngram_proposer.propose(
                req.prompt_ids + req.output_ids, k, cfg.prompt_lookup_min, cfg.prompt_lookup_max
            )
            if draft:
                out[req.request_id] = draft
        return out


def usable_draft_len(req: Request, k: int, max_model_len: int) -> int:
    """How many draft tokens the request can use this step (0: it does not speculate)."""
    p = req.params
    if (
        req.status != RequestStatus.RUNNING
        or req.num_tokens - req.num_computed_tokens != 1
        or p.structured is not None
        or req.retry_until
    ):
        return 0
    # A step yields at most draft + 1 tokens; the draft's positions stay inside the context.
    left = p.max_tokens - len(req.output_ids) - 1
    return max(0, min(k, left, max_model_len - req.num_tokens))
