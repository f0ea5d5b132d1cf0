"""The synchronous engine: add requests, step, abort. One step reads:

schedule -> build batch -> forward -> sample -> update -> detokenize / stop strings
"""

from __future__ import annotations

import gc
import logging
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gemma_serve.kernels.dispatch import select_ops
from gemma_serve.model import compiled_layers
from gemma_serve.model.gemma import LayerStep
from gemma_serve.model.gguf_convert import cache_root
from gemma_serve.model.layer_graphs import LoadedLayers
from gemma_serve.server.engine import (
    host_memory,
    kv_budget,
    layer_compiler,
    model_source,
    tp_workers,
)
from gemma_serve.server.engine.block_table import cdiv
from gemma_serve.server.engine.cache_attention import row_caches
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.cuda_graphs import DecodeGraphs
from gemma_serve.server.engine.draft_model import build_speculator
from gemma_serve.server.engine.errors import EngineDeadError
from gemma_serve.server.engine.kv_cache import CacheLayout, KVCache, kv_cache_dtype
from gemma_serve.server.engine.kv_manager import KVCacheManager
from gemma_serve.server.engine.output_processor import OutputProcessor
from gemma_serve.server.engine.outputs import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_STOP,
    RequestOutput,
    StepStats,
    TokenLogprob,
)
from gemma_serve.server.engine.prompt_logprobs import record as record_prompt_logprobs
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.runner import Runner
from gemma_serve.server.engine.sampler import Sampler
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.scheduler import Scheduler
from gemma_serve.server.engine.spec_verify import sample_and_verify
from gemma_serve.server.engine.structured import StructuredDecoding
from gemma_serve.server.engine.structured_compiler import StructuredCompiler
from gemma_serve.server.engine.structured_spec import CompileResult, StructuredSpec

log = logging.getLogger(__name__)


def _load(config: EngineConfig) -> model_source.LoadedModel:
    if config.tensor_parallel_size > 1:
        return tp_workers.launch(config)
    return model_source.load(config)


@dataclass(frozen=True)
class GenerationResult:
    """A finished request from the offline generate() helper."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob]  # one per token when params.logprobs is set, else empty


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: model_source.LoadedModel | None = None):
        self.config = config
        host_memory.bound_onednn_cache()  # before loading: packing creates oneDNN primitives
        loaded = loaded or _load(config)
        self.loaded = loaded
        try:
            self._build(config, loaded)
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, loaded: model_source.LoadedModel) -> None:
        mcfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        limit = mcfg.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's {limit}")
        self.max_model_len = config.max_model_len or limit
        self.ops = select_ops(loaded.device, config.force_reference_kernels)
        # Decode graphs: on CUDA with the Triton ops (the references sync: uncapturable).
        # (Not under tensor parallelism: every rank would have to replay its graphs in step.)
        self.use_graphs = (
            loaded.device.type == "cuda"
            and self.ops.name == "triton"
            and not config.enforce_eager
            and loaded.workers is None
        )
        # The KV cache holds this rank's KV heads: a shard's config has only those.
        shard_cfg = loaded.model.config
        kv_dtype = kv_cache_dtype(
            config.kv_cache_dtype, loaded.dtype, loaded.deployment.quantization
        )
        budget = config.kv_cache_memory or kv_budget.default_budget(
            config, loaded, kv_dtype, self.use_graphs
        )
        self.speculator, budget = build_speculator(
            config, loaded, self.ops, budget, self.max_model_len
        )
        lookahead = self.speculator.lookahead() if self.speculator else 0
        self.layout = CacheLayout.from_budget(
            shard_cfg,
            budget,
            config.block_size,
            config.max_num_seqs,
            kv_dtype,
            self.max_model_len,
            lookahead,
        )
        self.kv = KVCacheManager.for_layout(
            self.layout, mcfg, config.enable_prefix_caching, lookahead=lookahead
        )
        self.max_model_len = self._fit_max_model_len(config.max_model_len is not None)
        if config.max_num_batched_tokens < config.max_num_seqs:
            log.warning(
                "--max-num-batched-tokens %d < --max-num-seqs %d: decodes take the whole step "
                "budget, so waiting requests can wait until running ones finish",
                config.max_num_batched_tokens,
                config.max_num_seqs,
            )
        if loaded.device.type == "cpu":
            host_memory.keep_freed_memory()
            kv_budget.check_host_memory(self.layout.nbytes(shard_cfg))
        cache = KVCache(shard_cfg, self.layout, loaded.device)
        if loaded.workers is not None:
            loaded.workers.start(self.layout)  # the other ranks size their caches the same
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            config.prefill_limits(),
        )
        self.runner = Runner(
            loaded.model, cache, self.kv, self.ops, loaded.device, executor=loaded.workers
        )
        if self.use_graphs:
            self.runner.graphs = self._capture_graphs()
        self.sampler = Sampler(loaded.device, config.seed)
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_ids = frozenset(mcfg.eos_token_ids) | {self.tokenizer.eos_id}
        self.structured = StructuredDecoding(mcfg.vocab_size)
        self.grammar_compiler = StructuredCompiler(
            self.tokenizer, mcfg.vocab_size, self.eos_token_ids
        )
        self._last_preemptions = 0
        self._last_batch_tokens = 0
        self._last_cached_tokens = 0
        self._cached_tokens_seen = 0  # kv.num_cached_tokens at the previous step
        # the last step's draft tokens and accepted ones by position (counts only: no
        # reference to a request outlives its step)
        self._last_spec: tuple[int, tuple[int, ...]] = (0, ())
        log.info(
            "engine: %s, kernels %s, max_model_len %d, KV blocks global %d / local %d "
            "(block %d, ring %d blocks), max_num_seqs %d, max_num_batched_tokens %d, "
            "long prefills above %d tokens (%d partial / %d long at once)",
            self.model_name,
            self.ops.name,
            self.max_model_len,
            self.layout.num_global_blocks,
            self.layout.num_local_blocks,
            config.block_size,
            self.layout.ring_blocks,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.scheduler.prefill.long_threshold,
            config.max_num_partial_prefills,
            config.max_long_partial_prefills,
        )

    def _capture_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs for decode steps; if capture fails the engine runs eagerly."""
        try:
            return DecodeGraphs(
                self.loaded.model,
                self.runner.cache,
                self.ops,
                max_num_seqs=self.config.max_num_seqs,
                global_width=cdiv(self.max_model_len, self.config.block_size),
                ring_blocks=self.layout.ring_blocks,
                block_size=self.config.block_size,
                device=self.loaded.device,
                capture=True,
            )
        except Exception:
            log.exception("CUDA graph capture failed; decode steps run eagerly")
            return None

    # -- requests -------------------------------------------------------------------------

    def _fit_max_model_len(self, explicit: bool) -> int:
        """The context length, bounded by the longest sequence the KV cache can hold.

        A model's own limit larger than the cache is lowered (so a request without max_tokens
        is sized to what can run); a --max-model-len the cache cannot hold is an error.
        """
        if not self.kv.can_ever_fit(1):
            raise ValueError(
                "the KV cache budget holds no block for one sequence (global blocks "
                f"{self.layout.num_global_blocks}, local blocks {self.layout.num_local_blocks}): "
                "give it more memory (--kv-cache-memory, --gpu-memory-utilization)"
            )
        fit = self.kv.max_tokens_that_fit()
        if self.max_model_len <= fit:
            return self.max_model_len
        if explicit:
            raise ValueError(
                f"--max-model-len {self.max_model_len} does not fit in the KV cache, which holds "
                f"at most {fit} tokens of one sequence: lower --max-model-len or give the cache "
                "more memory (--kv-cache-memory, --gpu-memory-utilization)"
            )
        log.warning(
            "max_model_len lowered from the model's %d to %d tokens, what the KV cache holds "
            "(--kv-cache-memory / --gpu-memory-utilization raise it)",
            self.max_model_len,
            fit,
        )
        return fit

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestTooLongError / ValueError for a request that can never be served.

        Reads only fixed sizes (vocabulary, context, pools), so any thread may call it: once on
        the event loop (AsyncEngine.generate, to refuse before streaming), once in add_request.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        # The tokenizer can know more ids than the model (a preset borrows a larger one).
        bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias token ids out of range [0, {vocab}): {bad[:5]}")
        self.scheduler.check(len(prompt_ids), params.max_tokens)

    def compile_structured(self, spec: StructuredSpec) -> CompileResult:
        """Compile an output constraint (thread-safe; call it off the engine thread).
        Raises StructuredOutputError for one that cannot be honoured."""
        return self.grammar_compiler.compile(spec)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams):
        """Queue a request; raises RequestTooLongError / ValueError for one it cannot serve."""
        self.check_request(prompt_ids, params)
        if self.scheduler.get(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in flight")
        req = Request(request_id, list(prompt_ids), params, eos_token_ids=self.eos_token_ids)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs.append(None)  # the first token has nothing before it
        self.scheduler.add(req)
        self.outputs.add(req)
        self.structured.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request in flight (its final output), or None if there is none by that id."""
        req = self.scheduler.get(request_id)
        return None if req is None else self._finish(req, FINISH_ABORT)

    def check_alive(self) -> None:
        """EngineDeadError once a tensor-parallel rank has failed (no-op otherwise)."""
        if self.loaded.workers is not None:
            self.loaded.workers.check()

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in flight with an error (the engine cannot run any more)."""
        return self._fail([*self.scheduler.running, *self.scheduler.waiting], message)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (no-op for one rank); idempotent."""
        if self.loaded.workers is not None:
            self.loaded.workers.stop()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> StepStats:
        usage = self.kv.usage()
        return StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage_global=usage.global_ratio,
            kv_usage_local=usage.local_ratio,
            num_batched_tokens=self._last_batch_tokens,
            num_preemptions=self._last_preemptions,
            num_cached_tokens=self._last_cached_tokens,
            num_draft_tokens=self._last_spec[0],
            accepted_per_position=self._last_spec[1],
        )

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._last_spec = (0, ())
        sched = self.scheduler.schedule(self._drafts())
        self._last_preemptions = len(sched.preempted)
        self._last_batch_tokens = sched.num_batched_tokens
        total = self.kv.num_cached_tokens  # prompt tokens taken from the prefix cache, ever
        self._last_cached_tokens, self._cached_tokens_seen = total - self._cached_tokens_seen, total
        if sched.empty:
            return []
        try:
            batch = self.runner.build(sched)
            forward = self.runner.forward(batch)
            self.structured.apply(forward.logits, batch.sampling_requests)
        except EngineDeadError:  # the tensor-parallel ranks are out of step: nothing runs
            raise
        except Exception as e:  # a fault in the forward pass: isolate it, keep serving
            log.exception("engine step failed; its requests retry alone")
            culprits = self.scheduler.recover(sched)
            return self._fail(culprits, f"internal error in the engine step: {e}")
        record_prompt_logprobs(batch.scoring, forward.prompt_logprobs)
        verified = sample_and_verify(self.sampler, forward.logits, sched.chunks)
        self._last_spec = (verified.num_draft_tokens, tuple(verified.accepted_per_position))
        errors = self._fail(verified.failed, "internal error while sampling")
        runs = {r.request_id: t for r, t in zip(verified.requests, verified.tokens, strict=True)}
        self.scheduler.update(sched, runs)
        return errors + [
            self._postprocess(r, t, lp)
            for r, t, lp in zip(verified.requests, verified.tokens, verified.logprobs, strict=True)
        ]

    def _drafts(self) -> dict[str, list[int]] | None:
        """This step's draft tokens; a drafting fault only turns speculation off for the step
        (the draft model's state is dropped and recomputed later)."""
        if self.speculator is None:
            return None
        try:
            return self.speculator.drafts(self.scheduler.running)
        except Exception:
            log.exception("drafting failed; this step does not speculate")
            self.speculator.reset()
            return None

    def _postprocess(
        self, req: Request, tokens: list[int], lps: list[TokenLogprob | None]
    ) -> RequestOutput:
        """Stop conditions and the output delta; an error here ends only this request.

        The step's tokens (several when a draft was accepted) were appended by the scheduler;
        they are checked one at a time, as if each came from its own step: a stop inside the
        run ends the request there and the tokens after it are dropped.
        """
        del req.output_ids[len(req.output_ids) - len(tokens) :]
        for i, token in enumerate(tokens):
            req.output_ids.append(token)
            reason, error = self._stop_reason(req)
            if error is not None:
                return self._finish(req, FINISH_ERROR, error)
            if reason is not None:
                run = tokens[: i + 1]
                return self._finish(
                    req, reason, new_ids=run, new_logprobs=_all_or_none(lps[: i + 1])
                )
        try:
            return self.outputs.output(req, tokens, _all_or_none(lps))
        except Exception as e:
            log.exception("output processing failed for %s", req.request_id)
            return self._finish(req, FINISH_ERROR, f"internal error: {e}")

    def _stop_reason(self, req: Request) -> tuple[str | None, str | None]:
        """(why the request ends with its last token, or None; an error message, or None)."""
        try:
            if not self.structured.accept(req):
                return None, "the output constraint rejected a token"
            reason = self.outputs.finish_reason(req)
            if reason is None and self.structured.terminated(req.request_id):
                reason = FINISH_STOP  # the grammar took its stop token
            return reason, None
        except Exception as e:
            log.exception("output processing failed for %s", req.request_id)
            return None, f"internal error: {e}"

    def _fail(self, requests: Iterable[Request], message: str) -> list[RequestOutput]:
        """End these requests with an error; every other request keeps running."""
        return [self._finish(r, FINISH_ERROR, message) for r in requests if not r.finished]

    def _finish(
        self,
        req: Request,
        reason: str,
        error: str | None = None,
        *,
        new_ids: list[int] | None = None,
        new_logprobs: list[TokenLogprob] | None = None,
    ) -> RequestOutput:
        """The one way a request ends (stop, length, abort, error); returns its final output.

        The scheduler frees its KV blocks and stamps its finish time (the latency metrics), the
        sampler forgets its generator, the output processor flushes the text and forgets it.
        When a token stop (EOS, a stop token, max_tokens) and a stop string meet in one step,
        the stop string wins: the text ends at it and the reason is "stop"
        (OutputProcessor.finish_reason). If the final output cannot be built, the request ends
        as an error instead.
        """
        self.scheduler.finish(req, reason, error)
        self.sampler.release(req.request_id)
        self.structured.release(req.request_id)
        try:
            return self.outputs.output(req, new_ids or [], new_logprobs)
        except Exception as e:
            log.exception("output processing failed for %s", req.request_id)
            self.outputs.discard(req.request_id)
            req.finish_reason, req.error = FINISH_ERROR, f"internal error: {e}"
            n = len(req.output_ids)
            return RequestOutput.ended(
                req.request_id, req.num_prompt_tokens, n, FINISH_ERROR, req.error
            )

    def compile_layers(self, background: bool = False, in_child: bool = True) -> bool:
        """Compile the decoder layers for one-row steps (model/compiled_layers.py), unless
        --enforce-eager or they cannot be compiled here (logged): in a child process whose
        graphs this process loads without the compiler (server/engine/layer_compiler.py),
        or here if that fails (or not `in_child`). In the background, steps run eagerly
        until the compiled layers are ready, then switch. Returns whether they are compiled
        (or compiling, in the background)."""
        model = self.runner.model
        if self.config.enforce_eager:
            reason: str | None = "--enforce-eager"
        elif self.loaded.workers is not None:
            reason = "not under tensor parallelism"
        else:
            reason = compiled_layers.unavailable_reason(model)
        if reason is not None:
            log.info("decode layers run eagerly: %s", reason)
            return False

        def run() -> bool:
            start = time.monotonic()
            layers: LayerStep | None = None
            if in_child:
                try:
                    layers = self._layers_from_child()
                except Exception as e:  # compiled here instead, at the cost of its memory
                    log.warning("compiling the decode layers in a child process failed: %s", e)
            if layers is None:
                try:  # torch.compile's imports alone take ~1 s: off the caller's thread
                    here = compiled_layers.CompiledLayers(model, cache_root() / "inductor")
                    rows = row_caches(model.config, self.runner.cache.layers)
                    here.compile(rows, max_keys=self.max_model_len)
                    layers = here
                except Exception:  # the eager layers still serve: never take the engine down
                    log.exception("compiling the decode layers failed: they run eagerly")
                    return False
            model.compiled_layers = layers
            where = "here" if isinstance(layers, compiled_layers.CompiledLayers) else "in a child"
            log.info("compiled decode layers ready in %.1fs (%s)", time.monotonic() - start, where)
            gc.collect()  # the compiler's graphs and sympy expressions (~100 MB of objects)
            host_memory.release_free_memory()
            return True

        if not background:
            return run()
        threading.Thread(target=run, name="compile-layers", daemon=True).start()
        return True

    def _layers_from_child(self) -> LoadedLayers:
        """The decode layers compiled by a child process for this engine's caches, loaded."""
        caches = [
            (tuple(k.shape), str(k.dtype).removeprefix("torch."))
            for k, _ in self.runner.cache.layers
        ]
        job = layer_compiler.Job(self.config, caches, self.max_model_len, cache_root() / "inductor")
        with tempfile.TemporaryDirectory(prefix="gemma-serve-layers-") as tmp:
            layer_compiler.compile_in_child(job, Path(tmp))
            return LoadedLayers(self.runner.model, Path(tmp))

    # -- offline helper -------------------------------------------------------------------

    def warm_up(self) -> None:
        """A full-size step before serving: max_num_seqs requests whose prompts fill the token
        budget, then a decode step of as many rows. The runtime's first-use allocations (the
        widest logits, the longest prefill) happen here, not in the first clients' latency;
        the freed pages are then handed back as the engine loop does whenever it goes idle
        (the peak under load: benchmarks/server_memory.py). A prompt and the token computed
        after it fill less than a block, so nothing stays in the prefix cache."""
        cfg = self.config
        n = min(cfg.block_size - 2, cfg.max_num_batched_tokens // cfg.max_num_seqs)
        n = max(1, min(n, self.max_model_len - 2))
        if n + 2 > self.max_model_len:
            return
        prompts = [[self.tokenizer.bos_id] * n] * cfg.max_num_seqs
        self.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        host_memory.release_free_memory()  # idle now, as the engine loop leaves it when idle

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams
    ) -> list[GenerationResult]:
        """Run prompts (text or token ids) to completion; results in prompt order."""
        ids = [f"offline-{i}" for i in range(len(prompts))]
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for rid, p in zip(ids, prompt_ids, strict=True):
            self.add_request(rid, p, params)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[TokenLogprob]] = {rid: [] for rid in ids}
        reasons: dict[str, str | None] = {}
        while self.has_work:
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
                texts[out.request_id].append(out.new_text)
                logprobs[out.request_id].extend(out.new_logprobs or ())
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        return [
            GenerationResult(p, tokens[rid], "".join(texts[rid]), reasons.get(rid), logprobs[rid])
            for rid, p in zip(ids, prompt_ids, strict=True)
        ]


def _all_or_none(lps: list[TokenLogprob | None]) -> list[TokenLogprob] | None:
    """The tokens' logprobs when the request asked for them (then every token has one)."""
    return None if not lps or any(lp is None for lp in lps) else lps  # type: ignore[return-value]
