"""Compiles output constraints into xgrammar grammars over the model's vocabulary, with a
bounded cache.

Thread-safe: the HTTP layer calls it on worker threads (never the engine thread), so a slow
compilation delays only its own request. The vocabulary comes from our SentencePiece
tokenizer: each token's raw bytes (byte-fallback pieces <0xNN> are single bytes, "▁" a
space), special tokens empty so that no grammar ever allows them, and ids the model has
beyond the tokenizer's (padding rows of the embedding) empty too.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gemma_serve.model.tokenizer import Tokenizer
from gemma_serve.server.engine.schema_support import check_schema, rewrite_string_lengths
from gemma_serve.server.engine.structured_spec import (
    CompileResult,
    StructuredGrammar,
    StructuredOutputError,
    StructuredSpec,
)

if TYPE_CHECKING:  # imported on first use: a server that never constrains never loads it
    import xgrammar as xgr

# xgrammar's messages start with "[hh:mm:ss] /project/cpp/file.cc:123: "
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
CACHE_SIZE = 256  # compiled grammars kept, least recently used evicted first
COMPILE_THREADS = 2


def tokenizer_info(
    tokenizer: Tokenizer, model_vocab_size: int, stop_ids: Iterable[int]
) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: one entry per row of the model's logits."""
    import xgrammar as xgr

    n = min(tokenizer.vocab_size, model_vocab_size)
    vocab = [b"" if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(n)]
    vocab += [b""] * (model_vocab_size - n)
    return xgr.TokenizerInfo(
        vocab,
        xgr.VocabType.RAW,
        vocab_size=model_vocab_size,
        stop_token_ids=sorted(t for t in stop_ids if t < model_vocab_size),
    )


class StructuredCompiler:
    """StructuredSpec -> StructuredGrammar; the tokenizer info is built on first use."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_vocab_size: int,
        stop_ids: Iterable[int],
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = model_vocab_size
        self._stop_ids = frozenset(stop_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, str], StructuredGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None

    def compile(self, spec: StructuredSpec) -> CompileResult:
        """The grammar for `spec`; raises StructuredOutputError when it cannot be honoured."""
        key = spec.cache_key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return CompileResult(hit, 0.0, cache_hit=True)
            compiler = self._get_compiler()
        start = time.perf_counter()
        grammar = StructuredGrammar(spec, _compile(compiler, spec))
        seconds = time.perf_counter() - start
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return CompileResult(grammar, seconds, cache_hit=False)

    def _get_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            import xgrammar as xgr

            info = tokenizer_info(self._tokenizer, self.vocab_size, self._stop_ids)
            # Our own cache (bounded by entries, and it reports hits) replaces xgrammar's.
            self._compiler = xgr.GrammarCompiler(
                info, max_threads=COMPILE_THREADS, cache_enabled=False
            )
        return self._compiler


def _compile(compiler: xgr.GrammarCompiler, spec: StructuredSpec) -> xgr.CompiledGrammar:
    try:
        if spec.kind == "json":
            schema = json.loads(spec.source)
            check_schema(schema, spec.param)
            source = json.dumps(rewrite_string_lengths(schema), ensure_ascii=False)
            return compiler.compile_json_schema(source, **_json_options(spec))
        if spec.kind == "json_object":
            return compiler.compile_json_schema(
                '{"type": "object"}', **_json_options(spec), strict_mode=False
            )
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            return compiler.compile_grammar(_choice_grammar(json.loads(spec.source)))
        return compiler.compile_grammar(spec.source)
    except StructuredOutputError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        message = _NATIVE_PREFIX.sub("", str(exc).strip()) or type(exc).__name__
        raise StructuredOutputError(
            f"the {spec.kind} constraint does not compile: {message}", spec.param
        ) from exc


def _json_options(spec: StructuredSpec) -> dict[str, Any]:
    if spec.whitespace == "any":
        return {"any_whitespace": True}
    separators = (",", ":") if spec.whitespace == "none" else (", ", ": ")
    return {"any_whitespace": False, "separators": separators}


def _choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of the strings (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
