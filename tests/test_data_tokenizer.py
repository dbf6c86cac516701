"""Tokenizer training/loading, chunked encoding of long texts, and the MiniCPM chat template."""

import logging
import random

import numpy as np
import pytest

from minicpm_jax.data import chat
from minicpm_jax.data.tokenizer import BOS_ID, CHAT_AI, CHAT_USER, EOS_ID, UNK_ID, Tokenizer

import data_helpers


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(data_helpers.train_small_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize(
    "text",
    [
        "Hello, World!  Two  spaces,\ttabs\nand\n\nblank lines.",
        "你好世界，今天天气很好。模型在学习数据",
        "emoji 😀🎉 skin tone 👍🏽 flag 🇫🇷 zwj 👩‍💻",
        "  leading and trailing whitespace  ",
        "Ünïcödé ß ﬁ ligature, NFKC would fold this: ①",
    ],
)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_special_ids_and_chat_markers(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.pad_id == EOS_ID  # no pad piece: EOS fills padded positions
    assert tok.encode("x", add_bos=True, add_eos=True)[0] == BOS_ID
    assert tok.encode("x", add_bos=True, add_eos=True)[-1] == EOS_ID
    for marker in (CHAT_USER, CHAT_AI):
        assert tok.encode(marker) == [tok.piece_id(marker)]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.piece_id("<no such piece>")


def test_sha256_is_stable_and_content_based(tok, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(tok.path.read_bytes())
    assert Tokenizer(copy).sha256 == tok.sha256
    assert len(tok.sha256) == 64


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


TWO_TURNS = [
    {"role": "system", "content": " You are a helpful assistant "},
    {"role": "user", "content": " Hello "},
    {"role": "assistant", "content": "Hi there\n"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
]


def test_chat_text_matches_minicpm_template():
    # Same conversation and expected output as the MiniCPM entry of llama.cpp's chat-template tests.
    assert chat.render_chat_text(TWO_TURNS + [{"role": "user", "content": "Another question"}]) == (
        "You are a helpful assistant<用户>Hello<AI>Hi there<用户>Who are you<AI>I am an assistant"
        "<用户>Another question<AI>"
    )


def test_chat_ids_and_loss_mask(tok):
    enc = tok.encode
    user, ai = tok.piece_id(CHAT_USER), tok.piece_id(CHAT_AI)
    system = enc("You are a helpful assistant")
    answer1, answer2 = enc("Hi there"), enc("I am an assistant")
    expected_ids = (
        [BOS_ID] + system + [user] + enc("Hello") + [ai] + answer1 + [EOS_ID]
        + [user] + enc("Who are you") + [ai] + answer2 + [EOS_ID]
    )
    expected_mask = (
        [0] * (1 + len(system) + 1 + len(enc("Hello")) + 1) + [1] * (len(answer1) + 1)
        + [0] * (1 + len(enc("Who are you")) + 1) + [1] * (len(answer2) + 1)
    )
    example = chat.encode_chat(tok, TWO_TURNS)
    assert example.ids == expected_ids
    assert example.loss_mask == expected_mask
    # Decoding only the masked tokens gives back exactly the answers and their EOS.
    trained = [i for i, m in zip(example.ids, example.loss_mask) if m]
    assert trained == answer1 + [EOS_ID] + answer2 + [EOS_ID]


def test_chat_prompt_ends_with_ai_and_prefixes_training_ids(tok):
    prompt = chat.encode_chat_prompt(tok, TWO_TURNS[:2])
    assert prompt[0] == BOS_ID and prompt[-1] == tok.piece_id(CHAT_AI)
    assert prompt == [BOS_ID] + tok.encode(chat.render_chat_text(TWO_TURNS[:2]))
    assert chat.encode_chat(tok, TWO_TURNS).ids[: len(prompt)] == prompt
    with pytest.raises(ValueError, match="must end with a user message"):
        chat.encode_chat_prompt(tok, TWO_TURNS[:3])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "at least one message"),
        ([{"role": "bot", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
         "system message may only come first"),
    ],
)
def test_chat_rejects_malformed_conversations(messages, match):
    with pytest.raises(ValueError, match=match):
        chat.render_chat_text(messages)
    with pytest.raises(TypeError, match="content must be a string"):
        chat.render_chat_text([{"role": "user", "content": None}])


# Chunked encoding (`encode_stream`, for long documents) must give exactly the ids of encoding the text whole.
# Random texts from these pieces put every kind of neighbour on both sides of a cut: runs of spaces, line breaks,
# tabs, a literal "▁", CJK, emoji (with modifiers and ZWJ), combining marks, NFKC-foldable and unseen characters,
# and the chat markers (split out before encoding, each stretch with its own dummy prefix).
_TEXT_PIECES = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "a", "b", "the", "quick", "fox", "dog",
                "tokens", "模型", "学习", "数据", "你好", "😀", "🎉", "👍🏽", "👩‍💻", "e\u0301", "\u0308", "ﬁ", "①",
                "\u2581", "\u3000", "\u00a0", "<AI>", "<用户>", "<", ">", "3", "42", "é", "x", "Ω"]
# Each changes one setting of `train_tokenizer` (the first is its own model): the models trained here before the
# dummy prefix, one without byte fallback (unseen characters become <unk>, and neighbouring ones merge), and two
# that chunking cannot guarantee (their documents are encoded whole).
_VARIANTS = {
    "no_dummy_prefix": dict(add_dummy_prefix=False),
    "no_byte_fallback": dict(byte_fallback=False, vocab_size=150),
    "unigram": dict(model_type="unigram"),
    "nmt_nfkc": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("variants")
    return {"train_tokenizer": tok, **{name: Tokenizer(data_helpers.train_variant_tokenizer(out, name, **settings))
                                       for name, settings in _VARIANTS.items()}}


def _streamed(tok, text, rng, chunk_chars):
    pieces, start = [], 0
    while start < len(text):  # pieces of random sizes, as a reader hands them out
        size = rng.randint(1, 9)
        pieces.append(text[start:start + size])
        start += size
    arrays = list(tok.encode_stream(pieces, add_bos=True, add_eos=True, chunk_chars=chunk_chars))
    assert all(a.dtype == np.int32 for a in arrays)
    return np.concatenate(arrays).tolist(), len(arrays) - 2


@pytest.mark.parametrize("name", ["train_tokenizer", *_VARIANTS])
def test_chunked_encoding_gives_exactly_the_whole_texts_ids(variants, name):
    tok = variants[name]
    assert tok.chunking_blocker is None if name in ("train_tokenizer", "no_dummy_prefix", "no_byte_fallback") else (
        tok.chunking_blocker in ("model type UNIGRAM, not BPE", "normalizer 'nmt_nfkc', not identity"))
    assert tok.dummy_prefix == (name != "no_dummy_prefix")
    rng = random.Random(name)
    texts = ["".join(rng.choice(_TEXT_PIECES) for _ in range(rng.randint(1, 40))) for _ in range(150)]
    texts += ["  leading", "trailing  ", " ", "   ", "a b", "a  b", "<AI> x", "x <AI>", "<AI>  <用户> ", "\u2581 x",
              "①①①", "a①①b", "\n\n", "模型 学习"]
    chunks = 0
    for text in texts:
        whole = tok.encode(text, add_bos=True, add_eos=True)
        for chunk_chars in (1, 2, 7, 64):
            ids, count = _streamed(tok, text, rng, chunk_chars)
            assert ids == whole, (text, chunk_chars)
            chunks += count
    if tok.chunking_blocker is None:  # the cuts really landed all over the texts
        assert chunks > 20 * len(texts)


def test_chunk_cuts_never_meet_two_unknown_characters(variants):
    tok = variants["no_byte_fallback"]
    assert tok.encode("①Ω") == tok.encode("①Ω")[:2] and tok.unk_id in tok.encode("①Ω")
    assert len([i for i in tok.encode("x①Ω①") if i == tok.unk_id]) == 1  # SentencePiece merges the run of <unk>s
    assert tok._find_cut("x①Ω①", 1) == 1  # between x and ①: x is a piece, so the <unk> run stays whole
    assert tok._find_cut("x①Ω①", 2) == 0


def test_unguaranteed_models_are_encoded_whole_with_a_log_line(variants, caplog):
    tok = Tokenizer(variants["unigram"].path)  # a fresh one: it logs once
    with caplog.at_level(logging.INFO, logger="minicpm_jax.data.tokenizer"):
        arrays = list(tok.encode_stream(["a b ", "c d"], chunk_chars=1))
        list(tok.encode_stream(["x"], chunk_chars=1))
    assert len(arrays) == 1 and arrays[0].tolist() == tok.encode("a b c d")
    assert [r.getMessage() for r in caplog.records if "encoded whole" in r.getMessage()] == [
        f"tokenizer {tok.path}: long documents are encoded whole, not in chunks (model type UNIGRAM, not BPE)"]
