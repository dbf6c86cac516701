"""HF export of a fine-tuned run: tokenizer files whose chat_template renders exactly our chat format."""

from __future__ import annotations

import json

import pytest

from minicpm_jax import cli
from minicpm_jax.data.chat import encode_chat_prompt, render_chat_text
from minicpm_jax.data.tokenizer import Tokenizer

from align_helpers import make_source_run
from data_helpers import train_small_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " 你好, who are you? "}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": " 4 😀 "},
     {"role": "user", "content": "and  3 + 3?\n"}],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok_path = train_small_tokenizer(root)
    run = make_source_run(root / "run")
    out = root / "hf"
    assert cli.main(["export-hf", "--workdir", str(run), "--out", str(out), "--arch", "granite",
                     "--tokenizer", str(tok_path)]) == 0
    return out, Tokenizer(tok_path)


def test_export_writes_tokenizer_and_generation_config(exported):
    out, _ = exported
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{{ bos_token }}")
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["add_prefix_space"] is True
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert (out / "tokenizer.model").is_file()


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_transformers_apply_chat_template_reproduces_our_format(exported, messages):
    from transformers import AutoTokenizer

    out, tok = exported
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == "<s>" + render_chat_text(messages)
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(ids) == encode_chat_prompt(tok, messages)
