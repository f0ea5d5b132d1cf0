"""--speculative-config parsing and errors, the n-gram proposer, who speculates, the metrics
(torch-free parts of speculative decoding)."""

from __future__ import annotations

import pytest
from gemma_serve.server.cli import parse_args
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.ngram_proposer import propose
from gemma_serve.server.engine.outputs import StepStats
from gemma_serve.server.engine.request import Request, RequestStatus
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.spec_config import SpeculativeConfig, parse_speculative_config
from gemma_serve.server.engine.speculator import NgramSpeculator, usable_draft_len
from gemma_serve.server.metrics import Metrics


def test_ngram_config_and_vllm_defaults() -> None:
    text = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    assert parse_speculative_config(text) == SpeculativeConfig("ngram", 4, 3, 3)
    text = '{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 8}'
    assert parse_speculative_config(text) == SpeculativeConfig(
        "ngram", 2, 5, 5, disable_by_batch_size=8
    )
    text = '{"model": "gemma-2-2b", "num_speculative_tokens": 3}'
    assert parse_speculative_config(text) == SpeculativeConfig("draft_model", 3, model="gemma-2-2b")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{bad", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be one of"),
        ('{"method": "ngram"}', "needs num_speculative_tokens"),
        ('{"num_speculative_tokens": 2}', 'needs "method"'),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must"),
        ('{"method": "ngram", "num_speculative_tokens": true}', "num_speculative_tokens must"),
        (
            '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
            '"prompt_lookup_max": 2}',
            "prompt_lookup_max must",
        ),
        ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "model is"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "k": 1}', "unknown keys ['k']"),
        (
            '{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}',
            "disable_by_batch_size must",
        ),
    ],
)
def test_bad_configs_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="--speculative-config") as info:
        parse_speculative_config(text)
    assert message in str(info.value)


def test_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = parse_args(
        ["--speculative-config", '{"method":"ngram","num_speculative_tokens":3}']
    )
    assert config.speculative_config == SpeculativeConfig("ngram", 3)
    assert parse_args([])[0].speculative_config is None
    with pytest.raises(SystemExit) as info:
        parse_args(["--speculative-config", '{"method": "medusa", "num_speculative_tokens": 3}'])
    assert info.value.code == 2
    assert "argument --speculative-config: --speculative-config: method" in capsys.readouterr().err


def test_tensor_parallel_speculates_with_ngram_only() -> None:
    ngram = SpeculativeConfig("ngram", 2, 3, 3)
    assert EngineConfig(tensor_parallel_size=2, speculative_config=ngram).speculative_config
    draft = SpeculativeConfig("draft_model", 3, model="gemma-2-2b")
    with pytest.raises(ValueError, match="--speculative-config with a draft model needs"):
        EngineConfig(tensor_parallel_size=2, speculative_config=draft)


def test_ngram_proposals() -> None:
    seq = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    # the suffix [2, 3] was seen twice; the most recent match wins
    assert propose(seq, 3, 1, 2) == [5, 6, 2]
    # a longer match beats a more recent shorter one: [4, 9, 2, 3] -> ... not here; [9, 2, 3]
    seq = [7, 9, 2, 3, 8, 8, 1, 2, 3, 4, 4, 9, 2, 3]
    assert propose(seq, 2, 1, 3) == [8, 8]
    assert propose(seq, 2, 1, 1) == [4, 4]  # only the last token: the most recent 3
    assert propose(seq, 2, 4, 5) == []  # no match of 4 tokens
    assert propose([5, 6, 7], 2, 1, 3) == []  # the last token is new
    assert propose([5, 5], 3, 1, 3) == [5]  # what follows the match, however short
    assert propose([1, 2, 1, 2, 1, 2], 0, 1, 3) == []


def request(n_out: int, computed_all: bool = True, max_tokens: int = 20) -> Request:
    req = Request("r", [2, 5, 6, 7, 5, 6], SamplingParams(max_tokens=max_tokens))
    req.output_ids = [7, 5][:n_out] + [9] * max(0, n_out - 2)
    req.status = RequestStatus.RUNNING
    req.num_computed_tokens = req.num_tokens - (1 if computed_all else 3)
    return req


def test_who_speculates_and_how_far() -> None:
    assert usable_draft_len(request(2), 4, 100) == 4
    assert usable_draft_len(request(2, computed_all=False), 4, 100) == 0  # prefilling
    assert usable_draft_len(request(2, max_tokens=4), 4, 100) == 1  # 2 more tokens at most
    assert usable_draft_len(request(2, max_tokens=3), 4, 100) == 0
    assert usable_draft_len(request(2), 4, 10) == 2  # positions 8, 9 left in the context
    spec = NgramSpeculator(SpeculativeConfig("ngram", 3, 2, 1, disable_by_batch_size=1), 100)
    req = request(2)  # ... 5, 6, 7, 5, 6, 7, 5 -> 6, 7, 5
    assert spec.drafts([req]) == {"r": [6, 7, 5]}
    assert spec.drafts([req, request(2)]) == {}  # above disable_by_batch_size


def test_metrics() -> None:
    m = Metrics()
    m.on_step(StepStats(1, 0, 0.1, 0.1, 4, 0, 0, 6, (3, 1)))
    m.on_step(StepStats(1, 0, 0.1, 0.1, 4, 0, 0, 3, (1, 1)))
    text = m.render().decode()
    assert "gemma_serve_spec_decode_draft_tokens_total 9.0" in text
    assert "gemma_serve_spec_decode_accepted_tokens_total 6.0" in text
    assert 'gemma_serve_spec_decode_accepted_tokens_per_pos_total{position="0"} 4.0' in text
    assert 'gemma_serve_spec_decode_accepted_tokens_per_pos_total{position="1"} 2.0' in text
