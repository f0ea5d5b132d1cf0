"""Constrained decoding in the engine, on a tiny random Gemma 2: every output obeys its
constraint (validated by jsonschema / a regex, not by the grammar itself), constrained rows
leave unconstrained ones untouched, and scheduling (batches, chunked prefill, preemption) does
not change what a constrained request generates."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gemma_serve.server.engine.outputs import FINISH_STOP
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.structured_spec import StructuredOutputError, StructuredSpec

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.model_helpers import hf_model
from tests.structured_helpers import (
    OTHER_CONSTRAINTS,
    SCHEMAS,
    check_json,
    compile_spec,
    json_spec,
)

PROMPTS = ["The quick brown fox", "Hello, world!", "def main():", "Numbers like 12345"]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    return tiny_engine(checkpoint)


def greedy(structured=None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured=structured, **kw)


def sampled(structured=None, seed: int = 7, **kw) -> SamplingParams:
    return SamplingParams(
        max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, structured=structured, **kw
    )


def serve(engine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    """Run (prompt ids, params) together; request id -> (token ids, text, finish reason)."""
    tokens: dict[str, list[int]] = {}
    texts: dict[str, list[str]] = {}
    reasons: dict[str, str | None] = {}
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
        tokens[f"r{i}"], texts[f"r{i}"] = [], []
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            texts[out.request_id].append(out.new_text)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], "".join(texts[rid]), reasons[rid]) for rid in tokens}


def test_every_schema_greedy_and_sampled_validates(engine) -> None:
    tok = engine.tokenizer
    requests = []
    for i, schema in enumerate(SCHEMAS.values()):
        g = compile_spec(engine, json_spec(schema))
        prompt = tok.encode(PROMPTS[i % len(PROMPTS)])
        requests += [(prompt, greedy(g)), (prompt, sampled(g, seed=i))]
    results = serve(engine, requests)
    for (name, schema), k in zip(SCHEMAS.items(), range(0, len(requests), 2), strict=True):
        for rid in (f"r{k}", f"r{k + 1}"):
            _, text, reason = results[rid]
            assert reason == FINISH_STOP, (name, text)
            check_json(text, schema)


@pytest.mark.parametrize("name", sorted(OTHER_CONSTRAINTS))
def test_regex_choice_and_grammar_outputs_match(engine, name: str) -> None:
    kind, source, pattern = OTHER_CONSTRAINTS[name]
    g = compile_spec(engine, StructuredSpec(kind, source, "structured_outputs." + kind))
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    requests = [(p, greedy(g)) for p in prompts] + [
        (p, sampled(g, i)) for i, p in enumerate(prompts)
    ]
    for _, text, reason in serve(engine, requests).values():
        assert reason == FINISH_STOP and re.fullmatch(pattern, text), text


def test_mixed_batch_leaves_unconstrained_rows_exact(checkpoint: Path) -> None:
    """Unconstrained greedy requests batched with constrained ones generate what they generate
    alone; the constrained ones, likewise, what they generate alone."""
    engine = tiny_engine(checkpoint)
    tok = engine.tokenizer
    g = compile_spec(engine, json_spec(SCHEMAS["const"]))
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    requests = []
    for p in PROMPTS[:1]:
        requests += [(tok.encode(p), plain), (tok.encode(p), greedy(g)), (tok.encode(p), plain)]
    crowd = serve(engine, requests)
    single = tiny_engine(checkpoint)
    for i, req in enumerate(requests):
        assert crowd[f"r{i}"] == serve(single, [req])["r0"]
    check_json(crowd["r1"][1], SCHEMAS["const"])


SHORT_OUTPUTS = ["tuple_prefix_items", "const", "int_array_min_max"]


@pytest.fixture(scope="module")
def short_requests(engine) -> list[tuple[list[int], SamplingParams]]:
    """Constrained requests (greedy and seeded) with prompts of 30-50 tokens."""
    requests = []
    for i, name in enumerate(SHORT_OUTPUTS):
        g = compile_spec(engine, json_spec(SCHEMAS[name]))
        prompt = engine.tokenizer.encode(" ".join(PROMPTS[i:] + PROMPTS[:i]))
        requests += [(prompt, replace(greedy(g), max_tokens=64))]
        requests += [(prompt, replace(sampled(g, seed=i), max_tokens=64))]
    return requests


@pytest.fixture(scope="module")
def served_alone(checkpoint: Path, short_requests) -> list[tuple]:
    single = tiny_engine(checkpoint)
    return [serve(single, [req])["r0"] for req in short_requests]


@pytest.mark.parametrize(
    "overrides",
    [{"max_num_batched_tokens": 16}, {"kv_cache_memory": 160 << 10}],
    ids=["chunked-prefill", "preempting"],
)
def test_constrained_requests_under_chunking_and_preemption(
    checkpoint, short_requests, served_alone, overrides
) -> None:
    engine = tiny_engine(checkpoint, **overrides)
    crowd = serve(engine, short_requests)
    if "kv_cache_memory" in overrides:
        assert engine.scheduler.num_preemptions > 0
    for i, alone in enumerate(served_alone):
        assert crowd[f"r{i}"] == alone
        assert alone[2] == FINISH_STOP
        check_json(alone[1], SCHEMAS[SHORT_OUTPUTS[i // 2]])


def test_logprobs_are_those_of_the_masked_distribution(engine, checkpoint: Path) -> None:
    """The first token of a choice: its logprob and top-k renormalised over the tokens the
    choices allow, from transformers' logits."""
    tok = engine.tokenizer
    choices = ["yes", "no"]
    g = compile_spec(engine, StructuredSpec("choice", json.dumps(choices), "guided_choice"))
    prompt = tok.encode("Hello, world!")
    params = replace(greedy(g), max_tokens=1, logprobs=3)
    lp = engine.generate([prompt], params)[0].logprobs[0]
    allowed = [
        t
        for t in range(tok.vocab_size)
        if not tok.is_special(t)
        and tok.token_bytes(t)
        and any(c.encode().startswith(tok.token_bytes(t)) for c in choices)
    ]
    with torch.no_grad():
        logits = hf_model(checkpoint)(torch.tensor([prompt])).logits[0, -1].double()
    masked = logits[allowed] - torch.logsumexp(logits[allowed], 0)
    ref = dict(zip(allowed, masked.tolist(), strict=True))
    assert lp.token_id == max(ref, key=ref.get)
    assert lp.logprob == pytest.approx(ref[lp.token_id], abs=1e-4)
    best = sorted(ref.items(), key=lambda kv: -kv[1])
    for (t, v), (rt, rv) in zip(lp.top, best + [(None, -9999.0)] * 3, strict=False):
        assert v == pytest.approx(rv, abs=1e-4)
        assert rt is None or t == rt


def test_abort_and_finish_release_the_matcher(engine) -> None:
    g = compile_spec(engine, json_spec(SCHEMAS["flat_object"]))
    params = replace(greedy(g), max_tokens=8)
    engine.add_request("a", engine.tokenizer.encode("Hello"), params)
    engine.add_request("b", engine.tokenizer.encode("Hello"), params)
    engine.step()
    assert "a" in engine.structured and "b" in engine.structured
    engine.abort("a")
    assert "a" not in engine.structured
    while engine.has_work:
        engine.step()
    assert "b" not in engine.structured


def test_compile_cache_and_errors(engine) -> None:
    spec = json_spec(SCHEMAS["const"])
    first, again = engine.compile_structured(spec), engine.compile_structured(spec)
    assert again.cache_hit and again.grammar is first.grammar
    bad = [
        StructuredSpec("json", json.dumps({"type": "integer", "multipleOf": 3}), "guided_json"),
        StructuredSpec("json", json.dumps({"$ref": "#/$defs/missing"}), "guided_json"),
        StructuredSpec("grammar", 'root ::= "a" |', "guided_grammar"),
        StructuredSpec("regex", "(unclosed", "guided_regex"),
    ]
    for spec in bad:
        with pytest.raises(StructuredOutputError) as info:
            engine.compile_structured(spec)
        assert info.value.param == spec.param
    with pytest.raises(ValueError, match="min_tokens"):
        replace(greedy(first.grammar), min_tokens=1)


def test_a_shortened_output_replays_the_matcher(engine) -> None:
    """If a request's output ever gets shorter, its matcher is rebuilt over what remains: the
    next mask equals that of a request whose output was that short all along."""
    g = compile_spec(engine, json_spec(SCHEMAS["const"]))
    prompt = engine.tokenizer.encode("Hello")
    engine.add_request("long", prompt, greedy(g))
    engine.add_request("short", prompt, greedy(g))
    for _ in range(6):
        engine.step()
    long, short = engine.scheduler.get("long"), engine.scheduler.get("short")
    assert long.output_ids == short.output_ids and len(long.output_ids) == 6
    long.output_ids = long.output_ids[:2]
    assert engine.structured.accept(long)
    fresh = Request("fresh", prompt, greedy(g), eos_token_ids=engine.eos_token_ids)
    fresh.output_ids = short.output_ids[:2]
    engine.structured.add(fresh)
    assert engine.structured.accept(fresh)
    rows = torch.zeros(2, engine.loaded.config.vocab_size)
    engine.structured.apply(rows, (long, fresh))
    assert torch.equal(rows[0], rows[1]) and torch.isinf(rows[0]).any()
    for rid in ("long", "short"):
        engine.abort(rid)
    engine.structured.release("fresh")


@pytest.mark.parametrize(("vocab", "width"), [(262144, 262144), (1003, 1003), (1003, 1024)])
@pytest.mark.parametrize("sparse", [False, True])
def test_mask_rows_equals_xgrammars_kernel(vocab: int, width: int, sparse: bool) -> None:
    """The vectorised CPU mask sets exactly the -inf entries xgrammar's own kernel sets: random
    bitmasks (dense, sparse, all-blocked and all-allowed rows), a vocabulary that is not a
    multiple of 32, logits wider than the vocabulary (their tail untouched)."""
    import xgrammar as xgr
    from gemma_serve.server.engine.structured import mask_rows

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, width, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (6, (vocab + 31) // 32), generator=g)
    bitmask = bitmask.to(torch.int32)
    bitmask[2] = 0
    bitmask[3] = -1
    bitmask[4] &= 0x01010101
    rows = [0, 2, 3, 4]
    if sparse:  # few 32-token words allow anything (a grammar's usual mask): the other path
        bitmask[[0, 3, 4]] *= (torch.rand(3, bitmask.shape[1], generator=g) < 0.02).int()
        bitmask[4, -1] = -1  # the last word: bits past the vocabulary set
    want, got = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab, indices=rows)
    mask_rows(got, bitmask, rows, vocab)
    assert torch.equal(got, want)
    assert torch.isinf(got[2, :vocab]).all()
    assert sparse or not torch.isinf(got[3]).any()
    assert torch.equal(got[[1, 5]], logits[[1, 5]]) and torch.equal(
        got[:, vocab:], logits[:, vocab:]
    )
