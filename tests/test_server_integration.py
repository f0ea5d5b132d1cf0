"""The real engine behind the real app under uvicorn, driven by the official openai client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_helpers import hf_greedy, tiny_checkpoint, tiny_engine
from tests.model_helpers import hf_model
from tests.server_helpers import run_server

PROMPTS = [
    "The quick brown fox",
    "def main():",
    "Hello, world! How are",
    "café, naïve",
    "Numbers like 12345",
    "for i in range(10):",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=31)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[tuple[str, AsyncEngine]]:
    engine = AsyncEngine(tiny_engine(checkpoint, max_num_batched_tokens=48))
    with run_server(create_app(lambda: engine)) as url:
        yield url, engine


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """Flattened samples: name{label=value,...} -> value."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_greedy_http_equals_transformers(server, checkpoint: Path) -> None:
    url, engine = server
    tok = engine.tokenizer
    ref = hf_model(checkpoint)
    c = client(url)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        expected = tok.decode(hf_greedy(ref, ids, 12))
        res = c.completions.create(
            model=engine.model_name,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert res.choices[0].text == expected
        assert res.choices[0].finish_reason == "length"
        assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == 12


def test_echo_logprobs_score_the_prompt_like_transformers(server, checkpoint: Path) -> None:
    """lm-evaluation-harness's loglikelihood request (token-id prompts, echo, logprobs,
    max_tokens 1 or 0): every prompt token's logprob is transformers' log_softmax at the
    position before it; the first is null; with max_tokens 0 nothing is generated."""
    import torch

    url, engine = server
    ref, tok, c = hf_model(checkpoint), engine.tokenizer, client(url)
    prompts = [tok.encode(p) for p in PROMPTS[:3]] + [tok.encode(PROMPTS[3] * 12)]  # > a chunk
    for max_tokens in (1, 0):
        res = c.completions.create(
            model=engine.model_name,
            prompt=prompts,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=2,
            echo=True,
        )
        for ids, choice in zip(prompts, res.choices, strict=True):
            with torch.no_grad():
                lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
            got = choice.logprobs
            assert got.tokens[: len(ids)] == [tok.token_text(t) for t in ids]
            assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
            want = [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]
            assert got.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
            for t in range(1, len(ids)):  # the top 2 alternatives, plus the prompt token itself
                best = lp[t - 1].topk(2)
                top = {
                    tok.token_text(i): v
                    for i, v in zip(best.indices.tolist(), best.values, strict=True)
                }
                assert set(got.top_logprobs[t]) == set(top) | {tok.token_text(ids[t])}
            prompt_text = tok.decode(ids)
            assert len(got.tokens) == len(ids) + max_tokens
            assert choice.text.startswith(prompt_text) and choice.finish_reason == "length"
            if max_tokens == 0:
                assert choice.text == prompt_text
        generated = res.usage.completion_tokens
        assert generated == max_tokens * len(prompts)
    greedy = dict(model=engine.model_name, prompt=prompts[0], max_tokens=3, temperature=0)
    stream = c.completions.create(**greedy, logprobs=0, echo=True, stream=True)
    chunks = list(stream)
    streamed = [lp for ch in chunks for lp in ch.choices[0].logprobs.token_logprobs]
    whole = c.completions.create(**greedy, logprobs=0, echo=True)
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert streamed[0] is None and streamed[1:] == whole.choices[0].logprobs.token_logprobs[1:]


def test_a_repeated_prefix_is_served_from_the_cache(server) -> None:
    """A long system prompt, asked twice and then a different question: later requests reuse
    the cached blocks of the prompt they share (usage.prompt_tokens_details.cached_tokens, the
    metric) and the repeated answer is unchanged."""
    url, engine = server
    c = client(url)
    block = engine.engine.config.block_size
    system = {"role": "system", "content": " ".join(PROMPTS) * 2}
    conversations = [[system, {"role": "user", "content": q}] for q in ("Why?", "Why?", "How?")]
    ids = [
        httpx.post(f"{url}/tokenize", json={"messages": m}).json()["tokens"] for m in conversations
    ]
    # strict=False: the two prompts may differ in length; only where they first differ counts.
    shared = next(i for i, (a, b) in enumerate(zip(ids[1], ids[2], strict=False)) if a != b)
    before = metrics(url)["gemma_serve_prefix_cache_hit_tokens_total"]
    answers = [
        c.chat.completions.create(model=engine.model_name, messages=m, max_tokens=6, temperature=0)
        for m in conversations
    ]
    cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]
    assert answers[1].choices[0].message.content == answers[0].choices[0].message.content
    assert cached[0] <= block  # at most the chat template's first block, from earlier tests
    assert cached[1] == (len(ids[1]) - 1) // block * block  # all but the last token's block
    assert cached[2] == shared // block * block
    gained = metrics(url)["gemma_serve_prefix_cache_hit_tokens_total"] - before
    assert gained == sum(cached)


def test_streamed_text_equals_non_streamed(server) -> None:
    url, engine = server
    c = client(url)
    for prompt in PROMPTS[:3]:
        full = c.completions.create(
            model=engine.model_name,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        stream = c.completions.create(
            model=engine.model_name,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == full.choices[0].text
        assert chunks[-1].usage.completion_tokens == 10
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = c.chat.completions.create(
        model=engine.model_name, messages=messages, max_tokens=8, temperature=0
    )
    streamed = c.chat.completions.create(
        model=engine.model_name, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_32_concurrent_streams_and_exact_metrics(server) -> None:
    url, engine = server
    before = metrics(url)
    c = client(url)
    expected = {
        p: c.completions.create(
            model=engine.model_name,
            prompt=p,
            max_tokens=9,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for p in PROMPTS
    }
    mid = metrics(url)
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[str, str, int, int]:
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await aclient.completions.create(
            model=engine.model_name,
            prompt=prompt,
            max_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage = [], None
        async for ch in stream:
            if ch.choices:
                text.append(ch.choices[0].text)
            if ch.usage:
                usage = ch.usage
        return prompt, "".join(text), usage.prompt_tokens, usage.completion_tokens

    async def all32():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(all32())
    assert all(text == expected[p] for p, text, _, _ in results)
    after = metrics(url)
    served_prompt = sum(r[2] for r in results)
    served_gen = sum(r[3] for r in results)
    assert served_gen == 32 * 9
    key_p, key_g = "gemma_serve_prompt_tokens_total", "gemma_serve_generation_tokens_total"
    assert after[key_g] - mid[key_g] == served_gen
    assert after[key_p] - mid[key_p] == served_prompt
    assert mid[key_g] - before[key_g] == 9 * len(PROMPTS)
    assert (
        after["gemma_serve_requests_total{finished_reason=length}"]
        - mid["gemma_serve_requests_total{finished_reason=length}"]
        == 32
    )
    assert after["gemma_serve_time_to_first_token_seconds_count"] >= 32


def test_dropped_streams_free_everything(server) -> None:
    url, engine = server

    async def drop(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as h:
            body = {
                "prompt": PROMPTS[i % 6],
                "max_tokens": 200,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            async with h.stream("POST", "/v1/completions", json=body) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n >= 2 + i % 3:
                        break  # leave mid-stream: the connection is closed

    async def main() -> None:
        await asyncio.gather(*(drop(i) for i in range(8)))
        for _ in range(200):
            await asyncio.sleep(0.05)
            m = metrics(url)
            if m["gemma_serve_requests_running"] == 0 and not engine.engine.has_work:
                break

    asyncio.run(main())
    m = metrics(url)
    assert m["gemma_serve_requests_running"] == 0
    assert m["gemma_serve_requests_waiting"] == 0
    assert m["gemma_serve_kv_cache_usage_ratio{pool=global}"] == 0.0
    assert m["gemma_serve_kv_cache_usage_ratio{pool=local}"] == 0.0
    assert m["gemma_serve_requests_total{finished_reason=abort}"] >= 8


def test_grafana_dashboard_queries_series_the_live_server_exports(server) -> None:
    from tests.test_docker import dashboard_queries, promql_names

    url, engine = server
    client(url).completions.create(model=engine.model_name, prompt="Hi", max_tokens=2)
    live = {
        s.name
        for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in fam.samples
    }
    for title, expr, _ in dashboard_queries():
        names, _ = promql_names(expr)
        assert names and names <= live, f"{title}: {sorted(names - live)} not on /metrics"
