"""Per-request text and stop conditions: incremental detokenization, stop tokens, stop strings,
max_tokens (torch-free).

Stop strings are matched on text, so they are found even when split across tokens. While a
request has stop strings, the last (longest stop - 1) characters are held back: they might be
the start of a stop string, which must not reach the client. As in vLLM, stop strings (like
EOS and stop tokens) do not end a request before min_tokens tokens: text completed earlier is
not searched again.
"""

from __future__ import annotations

from gemma_serve.model.detokenizer import IncrementalDetokenizer
from gemma_serve.model.tokenizer import Tokenizer
from gemma_serve.server.engine.outputs import (
    FINISH_LENGTH,
    FINISH_STOP,
    RequestOutput,
    RequestTimes,
    TokenLogprob,
)
from gemma_serve.server.engine.request import Request


class TextState:
    """Detokenized text of one request and how much of it has been emitted."""

    def __init__(self, tokenizer: Tokenizer, request: Request) -> None:
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer, request.params.skip_special_tokens)
        self.text = ""
        self.emitted = 0
        self.num_ids_seen = 0
        self.stops = request.params.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.stopped = False  # by a stop string: the text is final, nothing more to flush
        self.searched = 0  # a stop string ending within text[:searched] no longer counts
        self.prompt_logprobs_sent = False

    def add_tokens(self, token_ids: list[int]) -> bool:
        """Detokenize new tokens; True if a stop string now appears (text is cut there)."""
        self.text += self.detok.add(token_ids)
        searched, self.searched = self.searched, len(self.text)
        if not self.stops or len(self.request.output_ids) < self.request.params.min_tokens:
            return False
        found = ((self.text.find(s, max(0, searched - len(s) + 1)), s) for s in self.stops)
        hits = [(i, s) for i, s in found if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        keep = self.request.params.include_stop_str_in_output
        self.text = self.text[: index + len(stop)] if keep else self.text[:index]
        self.stopped = True
        return True

    def take(self, final: bool) -> str:
        """Text not yet emitted; all of it when final, else minus the holdback."""
        if final:
            self.text += "" if self.stopped else self.detok.flush()
            end = len(self.text)
        else:
            end = max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out


class OutputProcessor:
    """Builds RequestOutput deltas; decides when a request stops."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, TextState] = {}

    def add(self, request: Request) -> None:
        self._states[request.request_id] = TextState(self.tokenizer, request)

    def finish_reason(self, request: Request) -> str | None:
        """Feed the request's new tokens to its detokenizer; why it ends now, or None.

        A stop string wins over the token-level reason of the same step: the text ends at the
        stop string and the reason is "stop", even when the token also reached max_tokens. As
        in vLLM, the text of the stop token (EOS or a stop_token_ids id) is left out unless
        include_stop_str_in_output.
        """
        st = self._states[request.request_id]
        new = request.output_ids[st.num_ids_seen :]
        st.num_ids_seen = len(request.output_ids)
        token_reason = token_stop_reason(request)
        if token_reason == FINISH_STOP and not request.params.include_stop_str_in_output:
            new = new[:-1]
        return FINISH_STOP if st.add_tokens(new) else token_reason

    def output(
        self,
        request: Request,
        new_ids: list[int],
        new_logprobs: list[TokenLogprob] | None,
    ) -> RequestOutput:
        st = self._states[request.request_id]
        final = request.finished
        text = st.take(final)
        prompt_lps = None
        scored = request.prompt_logprobs
        if scored and not st.prompt_logprobs_sent and len(scored) == request.num_prompt_tokens:
            prompt_lps, st.prompt_logprobs_sent = tuple(scored), True
        if final:
            del self._states[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=tuple(new_ids),
            new_text=text,
            new_logprobs=tuple(new_logprobs) if new_logprobs is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_ids),
            finished=final,
            finish_reason=request.finish_reason if final else None,
            error=request.error,
            times=_times(request) if final else None,
            prompt_logprobs=prompt_lps,
            num_cached_tokens=request.num_cached_tokens,
        )

    def discard(self, request_id: str) -> None:
        self._states.pop(request_id, None)


def token_stop_reason(req: Request) -> str | None:
    """The stop conditions on the last token: EOS or a stop token (from min_tokens on), then
    max_tokens."""
    p = req.params
    n = len(req.output_ids)
    token = req.output_ids[-1]
    if n >= p.min_tokens and (
        token in p.stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids)
    ):
        return FINISH_STOP
    if n >= p.max_tokens:
        return FINISH_LENGTH
    return None


def _times(r: Request) -> RequestTimes:
    return RequestTimes(r.arrival_time, r.first_scheduled_time, r.first_token_time, r.finished_time)
