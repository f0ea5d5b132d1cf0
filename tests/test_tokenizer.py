"""Tokenizer and incremental detokenizer, on a tiny SentencePiece model trained per module.

The reference is plain SentencePiece on the same model file (for text without markers) and
hand-written expected strings.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import sentencepiece as spm
from gemma_serve.model.detokenizer import IncrementalDetokenizer
from gemma_serve.model.tokenizer import Tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tests.tokenizer_helpers import train_tiny_tokenizer

MARKERS = ("<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "<pad>", "<mask>", "<unused0>")
TEXTS = (
    "Hello, world!",
    "café naïve résumé Ångström",  # accents: multi-byte UTF-8 pieces
    "東京は日本の首都です。",  # CJK
    "emoji 😀👍🏽 and ❤️",  # 4-byte characters through byte fallback
    "def f(x):\n\tif x:\n\t\treturn 1\n    return 0\n",  # code: tabs, newlines
    "   leading and   runs  of    spaces   ",
    " ",
    "",
    "digits 1234567890",
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer.from_file(model_path)


@pytest.fixture(scope="module")
def ref(model_path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_path))


def test_helper_model_matches_gemma_layout(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    assert tok.vocab_size == ref.get_piece_size() <= 512
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert [ref.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.start_of_turn_id == ref.piece_to_id("<start_of_turn>") == 6
    assert tok.end_of_turn_id == ref.piece_to_id("<end_of_turn>") == 7
    assert ref.is_control(4) and ref.id_to_piece(4) == "<mask>"
    assert ref.id_to_piece(9) == "<0x00>" and ref.id_to_piece(264) == "<0xFF>"


def test_special_tokens(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    special = [i for i in range(tok.vocab_size) if tok.is_special(i)]
    assert special == [0, 1, 2, 3, 4, 5, 6, 7]  # pad eos bos unk mask unused0 sot eot
    assert not tok.is_special(ref.piece_to_id("<table>"))  # user-defined text, as in Gemma
    assert not tok.is_special(ref.piece_to_id("<0xE2>"))


def test_stop_token_ids(tok: Tokenizer):
    assert tok.stop_token_ids(chat=False) == frozenset({1})
    assert tok.stop_token_ids(chat=True) == frozenset({1, 7})


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece_and_round_trips(
    tok: Tokenizer, ref: spm.SentencePieceProcessor, text: str
):
    ids = tok.encode(text)
    assert ids == [2, *ref.encode(text)]
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == ref.decode(ids[1:]) == text


def test_emoji_goes_through_byte_fallback(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    ids = tok.encode("😀", add_bos=False)
    assert [ref.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert [tok.token_bytes(i) for i in ids] == [b"\xf0", b"\x9f", b"\x98", b"\x80"]
    assert [tok.token_text(i) for i in ids] == ["\\xf0", "\\x9f", "\\x98", "\\x80"]


def test_token_bytes_and_text(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    assert tok.token_bytes(ref.piece_to_id("\u2581")) == b" "
    assert tok.token_bytes(ref.piece_to_id("\u2581\u2581")) == b"  "
    assert tok.token_bytes(ref.piece_to_id("<0x41>")) == b"A"
    assert tok.token_text(ref.piece_to_id("東")) == "東"
    assert tok.token_text(1) == "<eos>"
    assert tok.token_text(6) == "<start_of_turn>"
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(tok.vocab_size)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, -1])


def test_decode_special_tokens(tok: Tokenizer):
    hi = tok.encode("hi", add_bos=False)
    ids = [2, 6, *hi, 7, 3, 0, 1]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<bos><start_of_turn>hi<end_of_turn><unk><pad><eos>"
    )


def test_decode_invalid_utf8_bytes(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    b = [ref.piece_to_id(f"<0x{x:02X}>") for x in (0xE2, 0x82, 0xAC, 0xFF)]
    assert tok.decode(b[:3]) == "€"
    assert tok.decode(b[:2]) == "\ufffd"  # one U+FFFD per truncated sequence (Python's codec)
    assert tok.decode([b[3], *tok.encode("A", add_bos=False)]) == "\ufffdA"
    assert tok.decode([b[0], 1, b[1], b[2]]) == "€"  # a skipped special does not split bytes


@pytest.mark.parametrize("marker", MARKERS)
def test_markers_in_user_text_stay_text(tok: Tokenizer, marker: str):
    text = f"a{marker}b {marker}"
    ids = tok.encode(text, add_bos=False)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == tok.decode(ids, skip_special_tokens=False) == text


def test_user_defined_text_piece_is_kept(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    table = ref.piece_to_id("<table>")
    assert tok.encode("x<table>", add_bos=False)[-1] == table
    assert tok.decode([table]) == "<table>"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*MARKERS, "<table>", "<", ">", "a", " ", "\n", "é", "😀", "_"])))
def test_encode_never_yields_special_ids(tok: Tokenizer, parts: list[str]):
    text = "".join(parts)
    ids = tok.encode(text, add_bos=False)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text


def test_chat_template_exact_ids(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi <end_of_turn>\n"},  # stripped, marker kept as text
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    ids = tok.apply_chat_template(messages)
    sot, eot, nl = 6, 7, ref.encode("\n")
    # Plain SentencePiece would turn the typed "<end_of_turn>" into the marker: use the safe
    # encoder for that segment (tested above), the reference for the others.
    first = tok.encode("user\nBe brief.\n\nHi <end_of_turn>", add_bos=False)
    head = ref.encode("user\nBe brief.\n\nHi")  # ends at a word boundary: same pieces
    assert first[: len(head)] == head
    expected = [
        2,
        *[sot, *first, eot, *nl],
        *[sot, *ref.encode("model\nHello!"), eot, *nl],
        *[sot, *ref.encode("user\nBye"), eot, *nl],
        *[sot, *ref.encode("model\n")],
    ]
    assert ids == expected
    assert ids.count(eot) == 3
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi <end_of_turn><end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_chat_template_without_generation_prompt(tok: Tokenizer, ref: spm.SentencePieceProcessor):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert ids == [2, 6, *ref.encode("user\nHi"), 7, *ref.encode("\n")]


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "must not be empty"),
        ([{"role": "tool", "content": "x"}], "role 'tool' is unknown"),
        ([{"role": "assistant", "content": "x"}], "must alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "only allowed as the first",
        ),
        ([{"role": "system", "content": "s"}], "followed by a user message"),
        ([{"role": "user", "content": None}], "string 'content'"),
        ([{"content": "x"}], "string 'role'"),
    ],
)
def test_chat_template_errors(tok: Tokenizer, messages: list[dict], error: str):
    with pytest.raises(ValueError, match=error):
        tok.apply_chat_template(messages)


def test_from_file_errors(tmp_path: Path, model_path: Path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer.from_file(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"\xff\xfe not a model")
    with pytest.raises(ValueError, match="junk.model: not a"):
        Tokenizer.from_file(tmp_path / "junk.model")
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    with pytest.raises(ValueError, match="add_dummy_prefix"):
        Tokenizer(proto.SerializeToString())
    assert Tokenizer.from_file(model_path.parent).vocab_size == 400


def _stream(tok: Tokenizer, chunks: list[list[int]], skip: bool) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    outputs = [detok.add(chunk) for chunk in chunks] + [detok.flush()]
    assert detok.text == "".join(outputs)
    return outputs, detok.text


def test_detokenizer_holds_back_partial_characters(tok: Tokenizer):
    ids = tok.encode("a😀", add_bos=False)
    outputs, text = _stream(tok, [[i] for i in ids], skip=True)
    assert outputs == ["a", "", "", "", "😀", ""]
    outputs, _ = _stream(tok, [[i] for i in ids[:3]], skip=True)
    assert outputs == ["a", "", "", "\ufffd"]  # unfinished at the end: flushed like decode()


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_every_split(tok: Tokenizer, skip: bool):
    ids = [2, 6, *tok.encode("é 😀東\t", add_bos=False), 7, 1]
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert expected == ("é 😀東\t" if skip else "<bos><start_of_turn>é 😀東\t<end_of_turn><eos>")
    for mask in itertools.product([False, True], repeat=len(ids) - 1):
        cuts = [0, *(i + 1 for i, cut in enumerate(mask) if cut), len(ids)]
        chunks = [ids[a:b] for a, b in itertools.pairwise(cuts)]
        assert _stream(tok, chunks, skip)[1] == expected


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_detokenizer_matches_decode_for_random_ids(tok: Tokenizer, data: st.DataObject):
    byte_ids = st.integers(9, 9 + 255)  # <0x00>..<0xFF> follow the 9 special/user pieces
    any_id = st.integers(0, tok.vocab_size - 1)
    ids = data.draw(st.lists(st.one_of(byte_ids, any_id), max_size=24))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    chunks = [ids[a:b] for a, b in itertools.pairwise([0, *cuts, len(ids)])]
    skip = data.draw(st.booleans())
    assert _stream(tok, chunks, skip)[1] == tok.decode(ids, skip_special_tokens=skip)


def test_encode_with_control_parses_the_markers_a_prompt_writes(
    tok: Tokenizer, ref: spm.SentencePieceProcessor
):
    """A completions prompt is the caller's: each control piece's text becomes its id (the
    reference is SentencePiece's own piece table), the text between is plain text."""
    text = "<bos><start_of_turn>user\nHi<end_of_turn>\n<eos><mask>x<table>"
    expected = [ref.piece_to_id(p) for p in ("<bos>", "<start_of_turn>")]
    expected += ref.encode("user\nHi") + [ref.piece_to_id("<end_of_turn>")] + ref.encode("\n")
    expected += [ref.piece_to_id("<eos>"), ref.piece_to_id("<mask>")] + ref.encode("x<table>")
    assert tok.encode_with_control(text, add_bos=False) == expected
    assert tok.encode_with_control(text)[:2] == [ref.bos_id(), ref.bos_id()]  # as vLLM/HF
    assert tok.encode_with_control("plain text") == tok.encode("plain text")


def test_continue_final_message_leaves_the_last_turn_open(tok: Tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    opened = tok.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    written = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHel"
    assert opened == tok.encode_with_control(written, add_bos=False)
    assert closed == opened + tok.encode_with_control("<end_of_turn>\n", add_bos=False)
    with pytest.raises(ValueError, match="continue_final_message"):
        tok.apply_chat_template(messages, continue_final_message=True)  # generation prompt on
    with pytest.raises(ValueError, match="continue_final_message"):
        tok.apply_chat_template(messages[:1], False, continue_final_message=True)  # user's turn
