"""From a validated OpenAI request to engine inputs: prompt ids, max_tokens, SamplingParams.

Every check that needs the tokenizer or the context length lives here; each failure is a 400
naming its parameter.
"""

from __future__ import annotations

from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.structured_spec import StructuredGrammar
from gemma_serve.server.engine_client import TokenizerLike
from gemma_serve.server.errors import APIError, bad_request
from gemma_serve.server.limits import MAX_CHOICES, MIN_TEMPERATURE
from gemma_serve.server.protocol import (
    INT64_MIN,
    ChatMessage,
    SamplingRequest,
    VllmTemplateExtras,
)
from gemma_serve.server.tool_prompt import render_turns
from gemma_serve.server.tools import ToolPlan

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def check_model(requested: str | None, served: str) -> None:
    """404 unless the request names the served model (or names none)."""
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


def check_stream_options(req: SamplingRequest) -> None:
    """stream_options only makes sense with stream: true (OpenAI rejects it otherwise)."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if req.prompt_logprobs is not None and req.stream:  # vLLM's rule too
        raise bad_request(
            "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
        )


def check_choices(num_prompts: int, n: int) -> None:
    """Bounds the engine requests one HTTP request starts (prompts x n)."""
    if num_prompts * n > MAX_CHOICES:
        raise bad_request(
            f"{num_prompts} prompts x n={n} = {num_prompts * n} choices; at most {MAX_CHOICES} "
            "are allowed per request",
            param="n",
        )


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"Token id {bad[0]} is out of range [0, {vocab_size})", param=param)
    return ids


def resolve_max_tokens(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    *,
    default: int | None,
    prompt_param: str,
    tokens_param: str = "max_tokens",
) -> int:
    """max_tokens as given, else `default`, else whatever context the prompt leaves (chat).

    Raises a 400 with the numbers when the prompt plus max_tokens does not fit the context.
    """
    max_tokens = requested if requested is not None else default
    if max_tokens is None:
        max_tokens = max(1, max_model_len - prompt_len)
    total = prompt_len + max_tokens
    if total > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {total} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the length of the prompt or max_tokens.",
            param=prompt_param if prompt_len >= max_model_len else tokens_param,
            code="context_length_exceeded",
        )
    return max_tokens


def child_seed(seed: int | None, i: int) -> int | None:
    """The seed of the i-th choice: seed + i, wrapped into int64."""
    if seed is None:
        return None
    return (seed + i - INT64_MIN) % 2**64 + INT64_MIN


def sampling_params(
    req: SamplingRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    stop_token_ids: frozenset[int],
    seed: int | None,
    vocab_size: int,
    prompt_logprobs: int | None = None,
    structured: StructuredGrammar | None = None,
) -> SamplingParams:
    """The engine's SamplingParams for one choice; unset fields take OpenAI's defaults."""
    bias = req.logit_bias or {}
    check_token_ids(sorted(bias), vocab_size, "logit_bias")
    extra_stops = frozenset(check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids"))

    def given(value: float | int | None, default: float | int) -> float | int:
        return default if value is None else value

    temperature = given(req.temperature, 1.0)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            # A tiny temperature would overflow float32 logits: it means greedy anyway.
            temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
            top_p=given(req.top_p, 1.0),
            top_k=int(given(req.top_k, 0)),
            min_p=given(req.min_p, 0.0),
            seed=seed,
            presence_penalty=given(req.presence_penalty, 0.0),
            frequency_penalty=given(req.frequency_penalty, 0.0),
            repetition_penalty=given(req.repetition_penalty, 1.0),
            stop=tuple(req.stop or ()),
            stop_token_ids=stop_token_ids | extra_stops,
            ignore_eos=bool(req.ignore_eos),
            min_tokens=int(given(req.min_tokens, 0)),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=tuple(sorted(bias.items())),
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            skip_special_tokens=req.skip_special_tokens is not False,
            priority=req.priority or 0,
            structured=structured,
        )
    except ValueError as exc:
        # SamplingParams names the parameter first: "min_tokens must be in [0, max_tokens]..."
        message = str(exc)
        raise bad_request(message, param=message.split(" ", 1)[0]) from exc


def encode_prompt(
    tokenizer: TokenizerLike, prompt: str | list[int], add_special_tokens: bool = True
) -> list[int]:
    """A completion prompt as ids. The caller owns the whole text: control-token strings
    ("<start_of_turn>", "<bos>") become their ids, as in vLLM, and BOS comes first unless
    add_special_tokens is false. Token ids are checked against the vocab."""
    if isinstance(prompt, str):
        return tokenizer.encode_with_control(prompt, add_bos=add_special_tokens)
    return check_token_ids(list(prompt), tokenizer.vocab_size, "prompt")


def chat_prompt(
    tokenizer: TokenizerLike,
    messages: list[ChatMessage],
    options: VllmTemplateExtras | None = None,
    add_special_tokens: bool = False,
    tools: ToolPlan | None = None,
) -> list[int]:
    """The Gemma chat template applied to the messages (the tokenizer rejects bad turns).
    Message content is text, never control tokens. add_special_tokens puts a BOS before the
    template's own one (as vLLM does when asked). Tools, tool calls and tool results are
    written into the turns as tool_prompt.py says."""
    turns = render_turns(messages, tools)
    generation_prompt, continue_final = (
        options.template_flags() if options is not None else (True, False)
    )
    try:
        ids = tokenizer.apply_chat_template(
            turns,
            add_generation_prompt=generation_prompt,
            continue_final_message=continue_final,
        )
    except ValueError as exc:
        raise bad_request(f"Invalid messages: {exc}", param="messages") from exc
    return [tokenizer.bos_id, *ids] if add_special_tokens else ids


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last `keep` tokens (-1: max_model_len of them)."""
    if keep is None:
        return ids
    if keep == -1:
        keep = max_model_len
    if keep == 0 or keep > max_model_len:
        raise bad_request(
            f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}] (the maximum "
            f"context length), got {keep}",
            param="truncate_prompt_tokens",
        )
    return ids[-keep:]
