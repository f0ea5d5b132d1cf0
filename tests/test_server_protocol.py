"""Request schemas, their error mapping, and the request -> engine-input translation (no server)."""

from __future__ import annotations

import json

import pydantic
import pytest
from gemma_serve.server.errors import APIError, validation_error
from gemma_serve.server.params import (
    chat_prompt,
    check_model,
    child_seed,
    encode_prompt,
    resolve_max_tokens,
    sampling_params,
)
from gemma_serve.server.protocol import (
    MAX_N,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    parse_request,
)

from tests.fake_engine import BOS, OFFSET, FakeTokenizer


def completion(**fields: object) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({"prompt": "hi", **fields}).encode())


def chat(**fields: object) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode())


def error_of(model: type[pydantic.BaseModel], body: bytes | dict[str, object]) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(pydantic.ValidationError) as info:
        parse_request(model, raw)
    return validation_error(info.value.errors())


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_shapes(prompt: object, expected: list[object]) -> None:
    assert completion(prompt=prompt).prompts() == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),  # strict: no string -> int coercion
        ({"max_tokens": 5.5}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),  # 0 is allowed: echo scores a prompt
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"echo": "yes"}, "echo"),
        ({"stream": 1}, "stream"),
        ({"stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_completion_rejects(fields: dict[str, object], param: str) -> None:
    err = error_of(CompletionRequest, {"prompt": "hi", **fields})
    assert (err.status, err.param, err.type) == (400, param, "BadRequestError")
    assert param in err.message


def test_missing_prompt_and_messages_name_the_field() -> None:
    assert error_of(CompletionRequest, {}).param == "prompt"
    assert error_of(ChatCompletionRequest, {}).param == "messages"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"messages": "hi"}, "messages"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),  # chat logprobs is a bool
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_chat_rejects(fields: dict[str, object], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    err = error_of(ChatCompletionRequest, body)
    assert (err.status, err.param) == (400, param)


def test_invalid_json_and_non_object_bodies() -> None:
    err = error_of(CompletionRequest, b"{not json")
    assert err.status == 400 and err.param is None and "Invalid JSON" in err.message
    err = error_of(CompletionRequest, b"[1, 2]")
    assert err.status == 400 and err.param is None


def test_unknown_fields_are_ignored_and_nulls_mean_default() -> None:
    req = completion(best_of=None, suffix=None, foo="bar", temperature=None, stop=None)
    assert req.temperature is None and not req.stop
    params = sampling_params(
        req, max_tokens=4, logprobs=None, stop_token_ids=frozenset(), seed=None, vocab_size=300
    )
    assert (params.temperature, params.top_p, params.top_k, params.stop) == (1.0, 1.0, 0, ())


def test_chat_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = chat(messages=[{"role": "user", "content": parts}])
    assert req.messages[0].content == "ab"


def test_sampling_params_carry_every_field() -> None:
    req = completion(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        stop=["\n\n", "", "END"],  # the empty string means nothing and is dropped
        ignore_eos=True,
        min_tokens=2,
        logit_bias={"7": -100, "6": 5.5},
    )
    params = sampling_params(
        req, max_tokens=8, logprobs=3, stop_token_ids=frozenset({1}), seed=11, vocab_size=300
    )
    assert params.max_tokens == 8 and params.logprobs == 3 and params.seed == 11
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 40, 0.05)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.repetition_penalty == 1.2
    assert params.stop == ("\n\n", "END") and params.stop_token_ids == frozenset({1})
    assert params.ignore_eos and params.min_tokens == 2
    assert params.logit_bias == ((6, 5.5), (7, -100.0))


def test_sampling_params_errors_name_the_parameter() -> None:
    req = completion(min_tokens=9)
    with pytest.raises(APIError) as info:
        sampling_params(
            req, max_tokens=8, logprobs=None, stop_token_ids=frozenset(), seed=None, vocab_size=9
        )
    assert (info.value.status, info.value.param) == (400, "min_tokens")
    with pytest.raises(APIError) as info:
        sampling_params(
            completion(logit_bias={"9": 1}),
            max_tokens=8,
            logprobs=None,
            stop_token_ids=frozenset(),
            seed=None,
            vocab_size=9,
        )
    assert (info.value.status, info.value.param) == (400, "logit_bias")


def test_resolve_max_tokens() -> None:
    assert resolve_max_tokens(None, 10, 100, default=16, prompt_param="prompt") == 16
    assert resolve_max_tokens(None, 10, 100, default=None, prompt_param="messages") == 90
    assert resolve_max_tokens(90, 10, 100, default=16, prompt_param="prompt") == 90
    with pytest.raises(APIError) as info:
        resolve_max_tokens(91, 10, 100, default=16, prompt_param="prompt")
    err = info.value
    assert (err.status, err.param, err.code) == (400, "max_tokens", "context_length_exceeded")
    assert all(str(n) in err.message for n in (100, 101, 10, 91))
    with pytest.raises(APIError) as info:
        resolve_max_tokens(None, 100, 100, default=None, prompt_param="messages")
    assert info.value.param == "messages"


def test_child_seeds() -> None:
    assert [child_seed(5, i) for i in range(3)] == [5, 6, 7]
    assert child_seed(None, 2) is None
    assert child_seed(2**63 - 1, 1) == -(2**63)  # wraps within int64


def test_check_model() -> None:
    check_model(None, "m")
    check_model("m", "m")
    with pytest.raises(APIError) as info:
        check_model("other", "m")
    assert (info.value.status, info.value.code, info.value.type) == (
        404,
        "model_not_found",
        "NotFoundError",
    )


def test_prompt_encoding_and_chat_template_errors() -> None:
    tok = FakeTokenizer()
    assert encode_prompt(tok, "hi") == [BOS, OFFSET + ord("h"), OFFSET + ord("i")]
    assert encode_prompt(tok, [BOS, 7]) == [BOS, 7]
    with pytest.raises(APIError) as info:
        encode_prompt(tok, [tok.vocab_size])
    assert info.value.param == "prompt"
    with pytest.raises(APIError) as info:
        chat_prompt(tok, chat(messages=[{"role": "assistant", "content": "x"}]).messages)
    assert (info.value.status, info.value.param) == (400, "messages")


def test_error_body_has_exactly_the_openai_fields() -> None:
    body = APIError(429, "busy", code="queue_full").body()
    assert body == {
        "error": {"message": "busy", "type": "RateLimitError", "param": None, "code": "queue_full"}
    }


def test_chat_chunk_delta_has_no_null_fields() -> None:
    chunk = ChatCompletionChunk(
        id="c",
        created=0,
        model="m",
        choices=[ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason="stop")],
    )
    data = json.loads(chunk.model_dump_json())
    assert data["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert data["object"] == "chat.completion.chunk"
