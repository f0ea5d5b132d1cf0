"""What real clients send: vLLM's request extras, control tokens in completions prompts, headers.

The real engine (tiny random Gemma 2) behind the real app under uvicorn; each extra is checked
for its effect against transformers' greedy continuation or a plain run of the same server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import hf_greedy, tiny_checkpoint, tiny_engine
from tests.model_helpers import hf_model
from tests.server_helpers import run_server

PROMPT = "The quick brown fox"
CHAT_PROMPT = "<start_of_turn>user\nHello, world!<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=31)


@pytest.fixture(scope="module")
def ref(checkpoint: Path) -> torch.nn.Module:
    return hf_model(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[tuple[str, AsyncEngine]]:
    # A queue of one: requests that start at once (free sequence slots) are not "waiting".
    engine = AsyncEngine(tiny_engine(checkpoint, max_queued_requests=1))
    with run_server(create_app(lambda: engine)) as url:
        yield url, engine


def post(url: str, path: str, **body: Any) -> dict[str, Any]:
    res = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert res.status_code == 200, res.text
    return res.json()


def complete(url: str, **body: Any) -> dict[str, Any]:
    return post(url, "/v1/completions", **{"temperature": 0, **body})


def chat(url: str, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
    return post(url, "/v1/chat/completions", messages=messages, temperature=0, **body)


@pytest.fixture(scope="module")
def sampled(checkpoint: Path) -> Any:
    """Greedy runs on an engine of its own, token ids included: what the server returns. The
    random model's greedy output repeats one token; a strong repetition penalty varies it."""
    engine = tiny_engine(checkpoint)
    tok = engine.tokenizer
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    params = SamplingParams(
        max_tokens=12, temperature=0.0, repetition_penalty=10.0, ignore_eos=True
    )
    return [r.token_ids for r in engine.generate([PROMPT, chat_ids], params)]


def first_new(ids: list[int]) -> int:
    """The index of a token that does not occur before it, at least the third."""
    return next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])


def test_stop_token_ids_stop_at_the_id_and_include_stop_str_keeps_it(server, sampled) -> None:
    url, engine = server
    tok = engine.tokenizer
    plain, in_chat = sampled
    k = first_new(plain)
    body = dict(
        prompt=PROMPT,
        max_tokens=12,
        ignore_eos=True,
        temperature=0,
        repetition_penalty=10.0,
        stop_token_ids=[plain[k]],
    )
    res = post(url, "/v1/completions", **body)
    assert res["choices"][0]["finish_reason"] == "stop"
    assert res["choices"][0]["text"] == tok.decode(plain[:k])
    assert res["usage"]["completion_tokens"] == k + 1
    kept = post(url, "/v1/completions", **body, include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == tok.decode(plain[: k + 1])
    # chat too: the same id ends the reply
    j = first_new(in_chat)
    messages = [{"role": "user", "content": "Hello"}]
    res = post(
        url,
        "/v1/chat/completions",
        messages=messages,
        max_tokens=12,
        ignore_eos=True,
        temperature=0,
        repetition_penalty=10.0,
        stop_token_ids=[in_chat[j]],
    )
    assert res["choices"][0]["finish_reason"] == "stop"
    assert res["choices"][0]["message"]["content"] == tok.decode(in_chat[:j])


def test_include_stop_str_in_output_returns_the_stop_string(server) -> None:
    url, _ = server
    body = dict(
        prompt=PROMPT, max_tokens=12, ignore_eos=True, temperature=0, repetition_penalty=10.0
    )
    plain = post(url, "/v1/completions", **body)["choices"][0]["text"]
    stop = plain[4:6]
    cut = plain.index(stop)
    res = post(url, "/v1/completions", **body, stop=[stop])
    assert res["choices"][0]["text"] == plain[:cut]
    res = post(url, "/v1/completions", **body, stop=[stop], include_stop_str_in_output=True)
    assert res["choices"][0]["text"] == plain[: cut + len(stop)]
    assert res["choices"][0]["finish_reason"] == "stop"


def test_skip_special_tokens_false_shows_the_control_tokens(server) -> None:
    url, engine = server
    eos = engine.tokenizer.eos_id
    body = dict(prompt=PROMPT, max_tokens=3, ignore_eos=True, logit_bias={str(eos): 100})
    assert complete(url, **body)["choices"][0]["text"] == ""
    shown = complete(url, **body, skip_special_tokens=False, spaces_between_special_tokens=True)
    assert shown["choices"][0]["text"] == "<eos><eos><eos>"


def test_add_special_tokens_false_sends_no_bos(server, ref) -> None:
    url, engine = server
    tok = engine.tokenizer
    ids = tok.encode(PROMPT, add_bos=False)
    res = complete(url, prompt=PROMPT, max_tokens=6, ignore_eos=True, add_special_tokens=False)
    assert res["usage"]["prompt_tokens"] == len(ids)
    assert res["choices"][0]["text"] == tok.decode(hf_greedy(ref, ids, 6))
    # chat: false by default (the template has its BOS); true adds a second one, as vLLM
    messages = [{"role": "user", "content": "Hello"}]
    plain = chat(url, messages, max_tokens=1)["usage"]["prompt_tokens"]
    assert chat(url, messages, max_tokens=1, add_special_tokens=True)["usage"]["prompt_tokens"] == (
        plain + 1
    )


def test_a_hand_formatted_chat_prompt_on_completions_equals_the_chat_endpoint(server, ref) -> None:
    url, engine = server
    tok = engine.tokenizer
    c = complete(url, prompt=CHAT_PROMPT, max_tokens=8, ignore_eos=True, add_special_tokens=True)
    messages = [{"role": "user", "content": "Hello, world!"}]
    h = chat(url, messages, max_tokens=8, ignore_eos=True)
    assert c["usage"]["prompt_tokens"] == h["usage"]["prompt_tokens"]
    # the reference: the Gemma prompt written out id by id
    start, end, nl = tok.start_of_turn_id, tok.end_of_turn_id, tok.encode("\n", add_bos=False)
    ids = [tok.bos_id, start, *tok.encode("user\nHello, world!", add_bos=False), end, *nl]
    ids += [start, *tok.encode("model\n", add_bos=False)]
    assert c["usage"]["prompt_tokens"] == len(ids)
    expected = tok.decode(hf_greedy(ref, ids, 8))
    assert c["choices"][0]["text"] == h["choices"][0]["message"]["content"] == expected


def test_tokenize_parses_control_tokens_in_prompts_never_in_messages(server) -> None:
    url, engine = server
    tok = engine.tokenizer
    got = post(url, "/tokenize", prompt="<bos>Hi<eos>", add_special_tokens=False)
    hi = tok.encode("Hi", add_bos=False)
    assert got["tokens"] == [tok.bos_id, *hi, tok.eos_id]
    assert got["count"] == len(hi) + 2 and got["max_model_len"] == engine.max_model_len
    got = post(url, "/tokenize", prompt="Hi", return_token_strs=True)
    assert got["tokens"] == [tok.bos_id, *hi] and got["token_strs"][0] == "<bos>"
    chat_ids = post(url, "/tokenize", messages=[{"role": "user", "content": "<eos>"}])["tokens"]
    assert tok.eos_id not in chat_ids  # message content is text: no template injection
    text = post(url, "/detokenize", tokens=got["tokens"])["prompt"]
    assert text == "Hi"


def test_chat_template_flags_match_the_hand_formatted_template(server) -> None:
    url, _ = server

    def ids(**body: Any) -> list[int]:
        return post(url, "/tokenize", **body)["tokens"]

    user = {"role": "user", "content": "Hi"}
    turn = "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    assert ids(messages=[user], add_generation_prompt=False) == ids(
        prompt=turn, add_special_tokens=False
    )
    assert ids(messages=[user], chat_template_kwargs={"add_generation_prompt": False}) == ids(
        prompt=turn, add_special_tokens=False
    )
    started = [user, {"role": "assistant", "content": "Hello"}]
    opened = ids(prompt=turn + "<start_of_turn>model\nHello", add_special_tokens=False)
    flags = dict(add_generation_prompt=False, continue_final_message=True)
    assert ids(messages=started, **flags) == opened
    res = chat(url, started, max_tokens=1, **flags)
    assert res["usage"]["prompt_tokens"] == len(opened)
    bad = httpx.post(
        f"{url}/v1/chat/completions", json={"messages": started, "continue_final_message": True}
    )
    assert bad.status_code == 400 and "continue_final_message" in bad.json()["error"]["message"]


def test_chat_echo_returns_the_final_assistant_message_first(server) -> None:
    url, _ = server
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    flags = dict(add_generation_prompt=False, continue_final_message=True, max_tokens=6)
    plain = chat(url, messages, ignore_eos=True, **flags)["choices"][0]["message"]["content"]
    echoed = chat(url, messages, ignore_eos=True, echo=True, **flags)
    assert echoed["choices"][0]["message"]["content"] == "Hello" + plain
    body = {
        "messages": messages,
        "temperature": 0,
        "ignore_eos": True,
        "echo": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, **flags}) as res:
        lines = [line for line in res.iter_lines() if line.startswith("data: {")]
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines]
    assert deltas[1] == "Hello" and "".join(deltas) == "Hello" + plain
    # the last message is the user's: nothing to echo
    user_only = [{"role": "user", "content": "Hi"}]
    a = chat(url, user_only, max_tokens=4, ignore_eos=True, echo=True)
    b = chat(url, user_only, max_tokens=4, ignore_eos=True)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_prompt_logprobs_score_the_prompt_like_transformers(server, ref) -> None:
    url, engine = server
    tok = engine.tokenizer
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        expected = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    res = complete(url, prompt=PROMPT, max_tokens=1, prompt_logprobs=2)
    got = res["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for pos, entry in enumerate(got[1:], start=1):
        row = expected[pos - 1]
        actual = entry[str(ids[pos])]
        assert actual["logprob"] == pytest.approx(row[ids[pos]].item(), abs=1e-4)
        assert actual["decoded_token"] == tok.token_text(ids[pos])
        best = row.topk(2).indices.tolist()
        ranked = {int(t): v["rank"] for t, v in entry.items() if v["rank"] is not None}
        assert {t for t, r in ranked.items() if r <= 2} == set(best)
    res = chat(url, [{"role": "user", "content": "Hi"}], max_tokens=1, prompt_logprobs=0)
    assert res["prompt_logprobs"][0] is None
    assert len(res["prompt_logprobs"]) == res["usage"]["prompt_tokens"]
    streamed = httpx.post(
        f"{url}/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, ref) -> None:
    url, engine = server
    tok = engine.tokenizer
    ids = tok.encode(PROMPT)[-3:]
    res = complete(url, prompt=PROMPT, max_tokens=5, ignore_eos=True, truncate_prompt_tokens=3)
    assert res["usage"]["prompt_tokens"] == 3
    assert res["choices"][0]["text"] == tok.decode(hf_greedy(ref, ids, 5))
    too_many = {"prompt": PROMPT, "truncate_prompt_tokens": engine.max_model_len + 1}
    bad = httpx.post(f"{url}/v1/completions", json=too_many)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"


def test_headers_request_id_head_and_trailing_slash(server) -> None:
    url, _ = server
    body = {"prompt": PROMPT, "max_tokens": 1}
    res = httpx.post(f"{url}/v1/completions/", json=body, headers={"x-request-id": "abc-123"})
    assert res.status_code == 200  # served, not redirected
    assert res.headers["x-request-id"] == "abc-123" and res.json()["id"] == "cmpl-abc-123"
    res = httpx.post(f"{url}/v1/completions", json=body)
    generated = res.headers["x-request-id"]
    assert len(generated) == 32 and res.json()["id"] == f"cmpl-{generated}"
    assert httpx.head(f"{url}/v1/models").status_code == 200
    # lenient numbers stay a clear 400 (docs/RELIABILITY.md)
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2.0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_requests_that_start_at_once_are_not_waiting(server) -> None:
    """A queue of one takes four requests sent together: free sequence slots run them."""
    url, _ = server

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": PROMPT, "max_tokens": 4}
            sent = [client.post(f"{url}/v1/completions", json=body) for _ in range(4)]
            return [r.status_code for r in await asyncio.gather(*sent)]

    assert asyncio.run(main()) == [200] * 4


@pytest.fixture(scope="module")
def one_seq(checkpoint: Path) -> Iterator[tuple[str, AsyncEngine]]:
    engine = AsyncEngine(tiny_engine(checkpoint, max_num_seqs=1, max_queued_requests=2))
    with run_server(create_app(lambda: engine)) as url:
        yield url, engine


def test_priority_reorders_a_full_queue_and_429_says_when_to_retry(one_seq) -> None:
    url, engine = one_seq
    scheduler = engine.engine.scheduler
    long = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    short = {"prompt": PROMPT, "max_tokens": 2}
    done: list[str] = []

    async def send(client: httpx.AsyncClient, name: str, body: dict[str, Any]) -> int:
        res = await client.post(f"{url}/v1/completions", json=body)
        done.append(name)
        return res.status_code

    async def until(condition: Any) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.002)

    async def main() -> tuple[int, ...]:
        async with httpx.AsyncClient(timeout=60) as client:
            a = asyncio.create_task(send(client, "a", long))
            await until(lambda: scheduler.running)
            b = asyncio.create_task(send(client, "b", {**short, "priority": 5}))
            await until(lambda: len(scheduler.waiting) == 1)
            c = asyncio.create_task(send(client, "c", {**short, "priority": -1}))
            await until(lambda: len(scheduler.waiting) == 2)
            full = await client.post(f"{url}/v1/completions", json=short)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert "a" not in done  # the queue really was full behind a
            return tuple(await asyncio.gather(a, b, c))

    assert asyncio.run(main()) == (200, 200, 200)
    assert done == ["a", "c", "b"]


def test_fields_outside_the_api_are_ignored_with_a_warning(server, caplog) -> None:
    url, _ = server
    with caplog.at_level(logging.WARNING, logger="gemma_serve.server.protocol"):
        complete(url, prompt=PROMPT, max_tokens=1, made_up_field=1)
    assert any("made_up_field" in r.getMessage() for r in caplog.records)
    bad = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "chat_template_kwargs": {"add_generation_prompt": "no"},
        },
    )
    assert bad.status_code == 400 and "add_generation_prompt" in bad.json()["error"]["message"]
