"""Exported tokenizers tokenize exactly as we do in transformers (and, by their metadata, in llama.cpp).

Both layouts carry the same tokenizer files; each is exported and loaded with AutoTokenizer, fast and "slow"
(transformers 5 serves both from tokenizer.json), on text with chat markers, leading and trailing spaces, newlines,
CJK and characters that only byte fallback covers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from minicpm_jax import cli
from minicpm_jax.data import tokenizer as tokenizer_lib
from minicpm_jax.data.tokenizer import CHAT_AI, CHAT_USER, Tokenizer
from minicpm_jax.hf import gguf_check
from minicpm_jax.hf.tokenizer import check_hf_tokenizer, save_hf_tokenizer

from align_helpers import make_source_run
from data_helpers import sample_texts, train_small_tokenizer

TEXTS = [
    "Hello world",
    " Hello",
    "  two leading spaces",
    "trailing space ",
    "a\nb\n\nc",
    "\nstarts with a newline",
    "你好 世界，模型在学习数据",
    "emoji 😀🎉 and bytes Ωß€ ①",
    f"{CHAT_USER}Hello{CHAT_AI}",
    f"{CHAT_USER} 你好, who are you? {CHAT_AI} I am\n a model",
    f"system text{CHAT_USER}2 + 2?{CHAT_AI}4 😀{CHAT_USER}and  3 + 3?\n{CHAT_AI}",
    f"{CHAT_AI}{CHAT_AI}  x{CHAT_USER}\n",
]
# Special pieces written out as text: we (like SentencePiece) encode them as text, transformers as the special
# tokens unless split_special_tokens=True (llama.cpp likewise, when asked to parse special tokens).
SPECIALS_AS_TEXT = "<s> and </s> and <unk> as plain text"


@pytest.fixture(scope="module", params=["minicpm", "granite"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    tok_path = train_small_tokenizer(root)
    out = root / "hf"
    assert cli.main(["export-hf", "--workdir", str(make_source_run(root / "run")), "--out", str(out), "--arch",
                     request.param, "--tokenizer", str(tok_path)]) == 0
    return out, Tokenizer(tok_path)


def test_trained_tokenizers_have_the_dummy_prefix(exported):
    _, tok = exported
    assert tok.dummy_prefix
    user, ai = tok.piece_id(CHAT_USER), tok.piece_id(CHAT_AI)
    hello = tok.encode("Hello")
    assert tok.id_to_piece(hello[0]).startswith("\u2581")
    # Every stretch of text between chat markers starts with the prefix, as in llama.cpp.
    assert tok.encode(f"{CHAT_USER}Hello{CHAT_AI}") == [user, *hello, ai]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_config_declares_the_added_tokens(exported):
    out, tok = exported
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_prefix_space"] is True and config["legacy"] is True and config["add_bos_token"] is True
    decoder = config["added_tokens_decoder"]
    assert {k: (v["content"], v["special"]) for k, v in decoder.items()} == {
        "0": ("<unk>", True), "1": ("<s>", True), "2": ("</s>", True),
        str(tok.piece_id(CHAT_USER)): (CHAT_USER, False), str(tok.piece_id(CHAT_AI)): (CHAT_AI, False)}
    assert not any(v["lstrip"] or v["rstrip"] or v["normalized"] for v in decoder.values())


@pytest.mark.parametrize("use_fast", [True, False])
def test_transformers_gives_our_ids(exported, use_fast):
    from transformers import AutoTokenizer

    out, tok = exported
    hf = AutoTokenizer.from_pretrained(out, use_fast=use_fast)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True), text
    batch = hf(TEXTS, add_special_tokens=False)["input_ids"]
    assert batch == tok.encode_batch(TEXTS)
    assert hf.decode(tok.encode("Hello world\n你好")) == "Hello world\n你好"
    assert hf.encode(SPECIALS_AS_TEXT, add_special_tokens=False)[0] == tok.bos_id
    literal = AutoTokenizer.from_pretrained(out, use_fast=use_fast, split_special_tokens=True)
    assert literal.encode(SPECIALS_AS_TEXT, add_special_tokens=False) == tok.encode(SPECIALS_AS_TEXT)


def test_tokenizer_json_merges_give_sentencepiece_pieces_on_unseen_text(exported):
    """On sentences the tokenizer was not trained on, tokenizer.json's BPE merges give SentencePiece's pieces."""
    from transformers import AutoTokenizer

    out, tok = exported
    hf = AutoTokenizer.from_pretrained(out)
    texts = [" ".join(reversed(t.split())) + "\n" + t[::-1] for t in sample_texts(200, seed=7)]
    assert hf(texts, add_special_tokens=False)["input_ids"] == tok.encode_batch(texts)


def _train_without_dummy_prefix(out_dir):
    """A tokenizer as `train-tokenizer` made them before the dummy prefix (add_dummy_prefix=False)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts(300)), model_prefix=str(out_dir / "old"), vocab_size=400,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[CHAT_USER, CHAT_AI], normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    return out_dir / "old.model"


def test_tokenizers_without_the_dummy_prefix_still_export_exactly(tmp_path, caplog):
    from transformers import AutoTokenizer

    path = _train_without_dummy_prefix(tmp_path)
    tok = check_hf_tokenizer(path, 400)
    assert not tok.dummy_prefix
    raw = spm.SentencePieceProcessor(model_file=str(path))
    for text in TEXTS:  # splitting out the chat markers changes nothing without the prefix
        assert tok.encode(text) == raw.encode(text), text
    with caplog.at_level("WARNING"):
        save_hf_tokenizer(tok, tmp_path / "hf", arch="minicpm")
    assert "llama.cpp's MiniCPM converter adds one regardless" in caplog.text
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_prefix_space"] is False
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf(TEXTS, add_special_tokens=False)["input_ids"] == tok.encode_batch(TEXTS)


def test_train_tokenizer_sets_the_dummy_prefix(tmp_path):
    tok = Tokenizer(tokenizer_lib.train_tokenizer(sample_texts(100), 350, tmp_path / "t"))
    assert tok.dummy_prefix and set(tok.chat_markers) == {CHAT_USER, CHAT_AI}


def _vocab_of(tok: Tokenizer) -> dict:
    """The GGUF tokenizer metadata that llama.cpp's converter writes for `tok`'s export (see hf/gguf_check.py)."""
    raw = spm.SentencePieceProcessor(model_file=str(tok.path))
    types = [gguf_check.CONTROL if raw.is_control(i) else gguf_check.UNKNOWN if raw.is_unknown(i)
             else gguf_check.BYTE if raw.is_byte(i) else gguf_check.NORMAL for i in range(tok.vocab_size)]
    for token_id in tok.chat_markers.values():
        types[token_id] = gguf_check.USER_DEFINED
    return {"tokens": [tok.id_to_piece(i) for i in range(tok.vocab_size)], "types": types,
            "scores": [raw.get_score(i) for i in range(tok.vocab_size)], "add_space_prefix": tok.dummy_prefix}


def test_llama_cpp_spm_tokenization_of_the_export_metadata_gives_our_ids(exported):
    _, tok = exported
    vocab = _vocab_of(tok)
    for text in [*TEXTS, *sample_texts(50, seed=3)]:
        assert gguf_check.llama_cpp_spm_tokenize(vocab, text) == tok.encode(text), text
    # The reason the MiniCPM converter needs the dummy prefix: it always sets llama.cpp's add_space_prefix.
    assert gguf_check.llama_cpp_spm_tokenize({**vocab, "add_space_prefix": False}, "Hello") != tok.encode("Hello")


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_DIR"), reason="LLAMA_CPP_DIR (a llama.cpp source tree) not set")
def test_llama_cpp_converter_writes_metadata_that_implies_our_ids(exported, tmp_path):
    """Runs llama.cpp's own convert_hf_to_gguf.py (e.g. from the llama-cpp-python sdist's vendor/llama.cpp)."""
    out, _ = exported
    root = Path(os.environ["LLAMA_CPP_DIR"])
    gguf_path = tmp_path / "model.gguf"
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(out), "--outfile", str(gguf_path),
                    "--outtype", "f32"], check=True, capture_output=True)
    sys.path.insert(0, str(root / "gguf-py"))
    assert gguf_check.check(out, gguf_path, TEXTS) == []
