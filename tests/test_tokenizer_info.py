"""GET /tokenizer_info (vLLM's, opt-in) and lm-eval's remote tokenizer against a live server.

lm-eval's `local-completions` model with `tokenizer_backend=remote` tokenizes through
/tokenize and /detokenize and reads BOS/EOS from /tokenizer_info; the scores it reports must
equal the ones computed straight from the engine's prompt logprobs. No network: the tasks and
their data are written here, and every connection but loopback is refused.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from gemma_serve.model.tokenizer import Tokenizer
from gemma_serve.server.app import create_app
from gemma_serve.server.cli import parse_args
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.state import Settings

from benchmarks.quant_fidelity import prompt_logprobs
from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.fake_engine import FakeEngine
from tests.server_helpers import run_server

MC_DOCS = [
    {"question": "The quick brown", "choices": ["fox", "dog", "cat"], "answer": 0},
    {"question": "Hello, world! How are", "choices": ["you", "they"], "answer": 1},
    {"question": "The capital of France is", "choices": ["Paris", "the sea", "12345"], "answer": 2},
]
GEN_PROMPTS = ["The quick brown fox", "def main():", "Numbers like 12345"]
ROLLING_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! I am fine."]
GEN_KWARGS = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False, "repetition_penalty": 5.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=17)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[tuple[str, AsyncEngine]]:
    engine = AsyncEngine(tiny_engine(checkpoint))
    settings = Settings(enable_tokenizer_info_endpoint=True)
    with run_server(create_app(lambda: engine, settings)) as url:
        yield url, engine


def test_the_endpoint_is_off_unless_enabled() -> None:
    with run_server(create_app(lambda: FakeEngine())) as url:
        res = httpx.get(f"{url}/tokenizer_info")
    assert res.status_code == 404
    assert res.json()["error"]["code"] == 404
    args = ["--enable-tokenizer-info-endpoint"]
    assert parse_args(args)[1].settings.enable_tokenizer_info_endpoint is True
    assert parse_args([])[1].settings.enable_tokenizer_info_endpoint is False


def test_tokenizer_info_describes_the_served_tokenizer(server, checkpoint: Path) -> None:
    url, engine = server
    info = httpx.get(f"{url}/tokenizer_info").json()
    tok = Tokenizer.from_file(checkpoint)
    pieces = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    for field, token_id in pieces.items():  # each names one control token, as /tokenize reads it
        ids = httpx.post(
            f"{url}/tokenize", json={"prompt": info[field], "add_special_tokens": False}
        )
        assert ids.json()["tokens"] == [token_id], field
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    assert info["tokenizer_class"] == "GemmaTokenizer"
    assert info["model_max_length"] == engine.max_model_len
    assert info["additional_special_tokens"] == ["<start_of_turn>", "<end_of_turn>"]
    assert info["add_bos_token"] is True and info["add_eos_token"] is False


CONVERSATIONS = [
    [{"role": "user", "content": "Hello, world!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there \n"}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan?"},
    ],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_chat_template_renders_what_the_tokenizer_builds(
    server, checkpoint: Path, messages: list[dict[str, str]], generation_prompt: bool
) -> None:
    """A client rendering the served template (as lm-eval does, with jinja2) gets the text of
    the ids the server itself builds for the same messages."""
    url, _ = server
    info = httpx.get(f"{url}/tokenizer_info").json()
    rendered = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(info["chat_template"])
    text = rendered.render(
        messages=messages, add_generation_prompt=generation_prompt, bos_token=info["bos_token"]
    )
    tok = Tokenizer.from_file(checkpoint)
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == tok.decode(ids, skip_special_tokens=False)


# ---- lm-eval --------------------------------------------------------------------------------


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every TCP/UDP connection but to a loopback address fails (and the hubs are offline);
    the addresses refused are listed, so that a test can check nothing even tried."""
    connect = socket.socket.connect
    refused: list[Any] = []

    def guarded(sock: socket.socket, address: Any) -> Any:
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        if inet and not ipaddress.ip_address(address[0]).is_loopback:
            refused.append(address)
            raise OSError(f"network access blocked in tests: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return refused


def write_tasks(root: Path, gen_targets: list[str]) -> Path:
    """Three local tasks (JSONL + YAML): multiple choice, generation, rolling loglikelihood."""
    docs = {
        "mc": MC_DOCS,
        "gen": [{"prompt": p, "target": t} for p, t in zip(GEN_PROMPTS, gen_targets, strict=True)],
        "roll": [{"text": t} for t in ROLLING_TEXTS],
    }
    specific = {
        "mc": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
        },
        "gen": {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": GEN_KWARGS,
            "metric_list": [{"metric": "exact_match"}],
        },
        "roll": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}],
        },
    }
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows in docs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = {
            "task": f"gemma_serve_{name}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "hf")},
            "test_split": "test",
            **specific[name],
        }
        (tasks / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return tasks


def expected_scores(engine: LLMEngine) -> dict[str, Any]:
    """What lm-eval must report, from the engine's own prompt logprobs and greedy outputs.

    lm-eval's remote tokenizer encodes without BOS; a choice is scored after the context and a
    space; a rolling text after BOS (lm-eval's prefix token) in one window."""
    tok = engine.tokenizer
    scored: list[tuple[list[int], int]] = []  # (prompt, where the continuation starts)
    for doc in MC_DOCS:
        context = tok.encode(doc["question"], add_bos=False)
        for choice in doc["choices"]:
            whole = tok.encode(f"{doc['question']} {choice}", add_bos=False)
            assert whole[: len(context)] == context  # lm-eval splits the whole text there
            scored.append((whole, len(context)))
    for text in ROLLING_TEXTS:
        scored.append(([tok.bos_id, *tok.encode(text, add_bos=False)], 1))
    logprobs = prompt_logprobs(engine, [ids for ids, _ in scored])
    sums = [sum(lps[start - 1 :]) for lps, (_, start) in zip(logprobs, scored, strict=True)]
    mc, rolling = sums[: -len(ROLLING_TEXTS)], sums[-len(ROLLING_TEXTS) :]
    per_doc, at = [], 0
    for doc in MC_DOCS:
        per_doc.append(mc[at : at + len(doc["choices"])])
        at += len(doc["choices"])
    params = SamplingParams(
        max_tokens=GEN_KWARGS["max_gen_toks"],
        temperature=0.0,
        repetition_penalty=GEN_KWARGS["repetition_penalty"],
        stop=("\n\n", "<eos>"),  # lm-eval adds the EOS string to `until`
        stop_token_ids=frozenset({tok.eos_id}),
    )
    prompts = [tok.encode(p, add_bos=False) for p in GEN_PROMPTS]
    texts = [r.text for r in engine.generate(prompts, params)]
    return {"mc": per_doc, "rolling": rolling, "generations": texts}


def test_lm_eval_remote_tokenizer_scores_equal_the_engines(
    server, checkpoint: Path, tmp_path: Path, loopback_only: list[Any]
) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    url, engine = server
    want = expected_scores(tiny_engine(checkpoint))
    assert len(set(want["generations"])) == len(GEN_PROMPTS) and all(want["generations"])
    # The first generation task's target is the greedy text: exact_match is then 1/3.
    targets = [want["generations"][0], "not this", "nor this"]
    tasks = write_tasks(tmp_path, targets)
    names = ["gemma_serve_mc", "gemma_serve_gen", "gemma_serve_roll"]
    result = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{url}/v1/completions",
            "tokenizer_backend": "remote",
            "model": engine.model_name,
            "max_length": engine.max_model_len,
            "max_retries": 1,
        },
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = {name: sorted(result["samples"][name], key=lambda s: s["doc_id"]) for name in names}
    for sample, choices in zip(samples["gemma_serve_mc"], want["mc"], strict=True):
        got = [ll for ll, _ in sample["filtered_resps"]]
        assert got == pytest.approx(choices, rel=1e-4, abs=1e-3)
    best = [max(range(len(c)), key=c.__getitem__) for c in want["mc"]]
    accuracy = sum(b == d["answer"] for b, d in zip(best, MC_DOCS, strict=True)) / len(MC_DOCS)
    assert result["results"]["gemma_serve_mc"]["acc,none"] == pytest.approx(accuracy)

    got_texts = [s["filtered_resps"][0] for s in samples["gemma_serve_gen"]]
    assert got_texts == want["generations"]
    assert result["results"]["gemma_serve_gen"]["exact_match,none"] == pytest.approx(1 / 3)

    got_rolling = [s["filtered_resps"][0] for s in samples["gemma_serve_roll"]]
    assert got_rolling == pytest.approx(want["rolling"], rel=1e-4, abs=1e-3)
    words = sum(len(t.split()) for t in ROLLING_TEXTS)
    perplexity = math.exp(-sum(want["rolling"]) / words)
    got_perplexity = result["results"]["gemma_serve_roll"]["word_perplexity,none"]
    assert got_perplexity == pytest.approx(perplexity, rel=1e-3)
    assert loopback_only == []  # lm-eval never tried to reach the network
