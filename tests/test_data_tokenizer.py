"""Tokenizer training/loading and the MiniCPM chat template."""

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
