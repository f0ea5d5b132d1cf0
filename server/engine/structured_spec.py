"""What a request constrains its output to, before and after compilation (torch-free).

The HTTP layer turns `response_format` / `structured_outputs` / `guided_*` into one
`StructuredSpec`; the engine's compiler (structured_compiler.py) turns it into a
`StructuredGrammar`, which rides on SamplingParams into the engine thread. Compilation happens
on the request path, off the engine thread, so a step never waits for a grammar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
# JSON whitespace: "single" one space after ',' and ':' (the default: small models never loop on
# newlines), "none" no whitespace at all, "any" any run of spaces, newlines and tabs.
Whitespace = Literal["single", "none", "any"]


class StructuredOutputError(ValueError):
    """A constraint that cannot be honoured; `param` names the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredSpec:
    """One output constraint.

    source: the schema as canonical JSON text (json), the regex, the EBNF grammar, or the
    choices as a JSON list (choice); empty for json_object. whitespace: between JSON tokens.
    param: the request field it came from, named in errors.
    """

    kind: StructuredKind
    source: str
    param: str
    whitespace: Whitespace = "single"

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return (self.kind, self.source, self.whitespace)


@dataclass(frozen=True)
class StructuredGrammar:
    """A compiled constraint: the spec and the compiler's opaque grammar (an xgrammar
    CompiledGrammar), from which the engine builds one matcher per request."""

    spec: StructuredSpec
    compiled: Any = field(compare=False, repr=False)


@dataclass(frozen=True)
class CompileResult:
    """A compiled grammar and what the metrics want to know about its compilation."""

    grammar: StructuredGrammar
    seconds: float  # 0.0 on a cache hit
    cache_hit: bool
