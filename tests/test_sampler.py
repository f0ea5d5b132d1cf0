"""Sampler transforms on synthetic logits, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.sampler import Sampler, _row_edit, row_argmax
from gemma_serve.server.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def req(rid: str = "r", prompt=(5,), output=(), **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), eos_token_ids=frozenset({1}))
    r.output_ids = list(output)
    return r


def edited(base: torch.Tensor, r: Request) -> torch.Tensor:
    """Row 0 of base with r's bias, min_tokens ban and penalties applied."""
    edit = _row_edit(base[0], r)
    assert edit is not None
    row = base[0].clone()
    ids, values = edit
    row[ids] = values
    return row


def probs_logits(p: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor([p]))


def sample_many(logits: torch.Tensor, n: int = 300, **params) -> set[int]:
    sampler = Sampler(CPU, seed=0)
    seen = set()
    for i in range(n):
        seen.add(sampler(logits, (req(f"r{i}", **params),)).token_ids[0])
    return seen


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]])
    out = Sampler(CPU)(logits, (req("a", temperature=0.0), req("b", temperature=0.0)))
    assert out.token_ids == [1, 0]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert sample_many(logits, temperature=1.0, top_p=0.6) == {0, 1}
    assert sample_many(logits, temperature=1.0, top_p=0.5) == {0}
    assert sample_many(logits, temperature=1.0, top_p=1.0) == {0, 1, 2, 3}


def test_top_k_and_min_p() -> None:
    logits = probs_logits([0.4, 0.3, 0.2, 0.1])
    assert sample_many(logits, temperature=1.0, top_k=2) == {0, 1}
    # min_p 0.4: keep tokens with p >= 0.4 * 0.4 = 0.16
    assert sample_many(logits, temperature=1.0, min_p=0.4) == {0, 1, 2}
    # k at or past the vocabulary keeps everything, however large (no int64 overflow)
    for k in (4, 5, 2**63 - 1, 2**70):
        assert sample_many(logits, temperature=1.0, top_k=k) == {0, 1, 2, 3}, k


def test_a_zero_noise_draw_never_picks_a_filtered_token() -> None:
    """Exp(1) can draw 0: a filtered token's 0 / 0 must not become a NaN that argmax picks."""

    class ZeroNoise(Sampler):
        def _noise(self, probs, requests, greedy):
            return torch.zeros_like(probs)

    logits = probs_logits([0.1, 0.2, 0.6, 0.1])
    assert ZeroNoise(CPU)(logits, (req(temperature=1.0, top_k=1),)).token_ids == [2]
    assert ZeroNoise(CPU)(logits, (req(temperature=1.0, top_p=0.5),)).token_ids == [2]


def test_a_failed_call_leaves_seeded_generators_as_they_were() -> None:
    """After a raising call, a retry draws the same noise: same tokens as a clean sampler."""
    logits = torch.randn(2, 50)
    seeded = (req("a", temperature=1.0, seed=7), req("b", temperature=1.0, seed=8))
    clean = Sampler(CPU)
    expected = [clean(logits, seeded).token_ids for _ in range(3)]

    class FailsOnce(Sampler):
        failed = False

        def _noise(self, probs, requests, greedy):
            noise = super()._noise(probs, requests, greedy)  # drawn, then the call fails
            if not self.failed:
                self.failed = True
                raise RuntimeError("injected")
            return noise

    faulty = FailsOnce(CPU)
    with pytest.raises(RuntimeError):
        faulty(logits, seeded)
    assert [faulty(logits, seeded).token_ids for _ in range(3)] == expected
    with pytest.raises(RuntimeError):  # a generator that already existed is rewound too
        FailsOnce(CPU)(logits, seeded)
    warm = FailsOnce(CPU)
    warm.failed = True
    assert warm(logits, seeded).token_ids == expected[0]
    warm.failed = False
    with pytest.raises(RuntimeError):
        warm(logits, seeded)
    assert [warm(logits, seeded).token_ids for _ in range(2)] == expected[1:]


def test_sampling_frequencies_follow_probabilities() -> None:
    logits = probs_logits([0.7, 0.2, 0.1])
    sampler = Sampler(CPU, seed=3)
    counts = [0, 0, 0]
    reqs = tuple(req(f"r{i}", temperature=1.0) for i in range(2000))
    tokens = sampler(logits.expand(2000, 3).contiguous(), reqs).token_ids
    for t in tokens:
        counts[t] += 1
    assert [c / 2000 for c in counts] == pytest.approx([0.7, 0.2, 0.1], abs=0.04)


def test_penalties_match_their_definitions() -> None:
    base = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0, 0.3]])
    r = req(
        prompt=(0, 1),
        output=(3, 3, 2),
        temperature=0.0,
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    adjusted = edited(base, r).tolist()
    # repetition on prompt+output {0,1,2,3}: positive / 2, negative * 2
    # frequency/presence on output only: token 3 twice, token 2 once
    expected = [1.0, -2.0, 0.25 - 0.5 - 0.25, 0.5 - 1.0 - 0.25, 0.0, 0.3]
    assert adjusted == pytest.approx(expected)
    assert base[0, 0].item() == 2.0  # the caller's logits are not modified


def test_logit_bias_and_min_tokens_ban_eos() -> None:
    base = torch.zeros(1, 4)
    r = req(temperature=0.0, logit_bias=((2, 5.0),), min_tokens=2, output=(3,))
    adjusted = edited(base, r)
    assert adjusted.tolist() == [0.0, -math.inf, 5.0, 0.0]


def test_edits_steer_the_batch_and_leave_the_logits_as_they_came() -> None:
    """In a batch, each row gets only its own edits; the caller's logits are restored."""
    base = torch.tensor([[3.0, 0.0, 1.0, 2.0], [3.0, 0.0, 1.0, 2.0], [3.0, 0.0, 1.0, 2.0]])
    before = base.clone()
    reqs = (
        req("a", temperature=0.0, logit_bias=((0, -10.0),)),  # 3.0 -> -7.0: token 3 wins
        req("b", temperature=0.0),
        req("c", prompt=(0, 3), temperature=0.0, repetition_penalty=4.0),  # 0.75, 0.5: token 2
    )
    assert Sampler(CPU)(base, reqs).token_ids == [3, 0, 2]
    assert torch.equal(base, before)


def test_logprobs_of_unmodified_distribution() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    r = req(prompt=(2,), temperature=0.0, logprobs=2, repetition_penalty=3.0)
    out = Sampler(CPU)(logits, (r,))
    ref = torch.log_softmax(logits[0], -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0]
    assert lp.logprob == pytest.approx(ref[lp.token_id].item())
    assert [t for t, _ in lp.top] == [2, 1]
    assert lp.top[0][1] == pytest.approx(ref[2].item())


def test_logprobs_in_a_mixed_batch() -> None:
    """Rows asking for 3, none, 0 and 1 alternatives, read back together, each its own."""
    logits = torch.randn(4, 50) * 3
    reqs = (
        req("a", temperature=0.0, logprobs=3),
        req("b", temperature=0.0),
        req("c", temperature=0.0, logprobs=0),
        req("d", temperature=0.0, logprobs=1, logit_bias=((7, 100.0),)),
    )
    out = Sampler(CPU)(logits, reqs)
    ref = torch.log_softmax(logits, -1)
    assert out.token_ids[3] == 7 and out.logprobs[1] is None
    for row, n in ((0, 3), (2, 0), (3, 1)):
        lp = out.logprobs[row]
        assert lp.token_id == out.token_ids[row]
        assert lp.token_id == (7 if row == 3 else int(logits[row].argmax()))
        assert lp.logprob == pytest.approx(ref[row, lp.token_id].item())  # unbiased
        want = ref[row].topk(n) if n else None
        assert [t for t, _ in lp.top] == (want.indices.tolist() if n else [])
        assert [v for _, v in lp.top] == pytest.approx(want.values.tolist() if n else [])


def test_invalid_params_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="logprobs must be in"):
        SamplingParams(logprobs=50)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)


def test_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0]])
    out = Sampler(CPU)(logits, (req(temperature=1e-300),))
    assert out.token_ids == [1]
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-300)


@pytest.mark.parametrize("vocab", [262144, 8192, 6000, 100])
def test_row_argmax_is_argmax(vocab: int) -> None:
    """The two-pass argmax gives argmax's indices: the first of tied maxima (inside a block
    and across blocks), a NaN as the maximum, all -inf rows; other widths fall back."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, vocab, generator=g)
    x[1, [3, vocab // 2, vocab - 1]] = 50.0  # tied across blocks: the first wins
    x[2, [vocab - 5, vocab - 3]] = 50.0  # tied inside the last block
    x[3, vocab // 3] = float("nan")
    x[3, 0] = 1e9
    x[4] = float("-inf")
    x[5, -1] = 99.0
    x[6] = 0.0  # all tied
    want = x.argmax(dim=-1)
    assert torch.equal(row_argmax(x), want)
    assert want.tolist()[1:6] == [3, vocab - 5, vocab // 3, 0, vocab - 1]
    assert torch.equal(row_argmax(x[2:3]), want[2:3])
