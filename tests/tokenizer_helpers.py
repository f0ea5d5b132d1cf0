"""A tiny Gemma-like SentencePiece model for tests, trained in a few milliseconds."""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

# Markers stored as USER_DEFINED pieces, as Gemma's tokenizer.model may do: SentencePiece would
# match them inside raw text unless the tokenizer guards against it. "<table>" is user-defined
# ordinary text (Gemma's vocabulary has such HTML tags), so it must stay a normal token.
USER_DEFINED_SYMBOLS = ("<start_of_turn>", "<end_of_turn>", "<table>")
CONTROL_SYMBOLS = ("<mask>", "<unused0>")

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def main():\n\treturn 42\n\nif __name__ == '__main__':\n    main()\n",
    "for i in range(10):\n    print(i * 2)  # double it\n",
    "Numbers like 12345 and 67890 are split into digits.",
    "    indented    text   with  runs of spaces",
    "café, naïve, résumé, Ångström, über, señor",
    "東京は日本の首都です。",
    "user\nWhat is the capital of France?\nmodel\nThe capital of France is Paris.",
    "Write a short poem about the sea, the sky and the stars at night.",
)


def train_tiny_tokenizer(path: Path) -> Path:
    """Train a tiny byte-fallback BPE model with Gemma's options and ids; return its file path.

    `path` is the tokenizer.model file to write, or a directory to write "tokenizer.model" into.
    Ids as in Gemma: pad=0, eos=1, bos=2, unk=3; vocab_size <= 512; no dummy prefix, identity
    normalization, whitespace kept, digits split. Deterministic (one training thread).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 8),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        control_symbols=list(CONTROL_SYMBOLS),
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path
