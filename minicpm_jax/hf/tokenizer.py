"""The tokenizer half of an HF export: tokenizer.model, tokenizer_config.json (with the chat template), special tokens.

transformers loads the folder as a `LlamaTokenizer` built from our SentencePiece model (docs/recipe.md §10: MiniCPM
ships its tokenizer the same way), and `apply_chat_template` reproduces the MiniCPM chat format that
SFT and DPO trained on (data/chat.py), ids included.
"""

from __future__ import annotations

import os

from minicpm_jax import storage
from minicpm_jax.data.chat import CHAT_TEMPLATE
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.files import write_json

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
HF_TOKENIZER_FILE = "tokenizer.model"


def check_hf_tokenizer(tokenizer_path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """The tokenizer at `tokenizer_path`, once it is known to fit an export of a model with `vocab_size` entries:
    it loads, has MiniCPM's special pieces and no more pieces than the model has rows. Writes nothing."""
    tokenizer = Tokenizer(tokenizer_path)
    pieces = {name: tokenizer.id_to_piece(i) for name, i in
              (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("unk_token", tokenizer.unk_id))}
    if pieces != SPECIAL_TOKENS:
        raise ValueError(f"{tokenizer_path}: special pieces {pieces} are not MiniCPM's {SPECIAL_TOKENS}")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces but the model has only "
                         f"vocab_size={vocab_size}")
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, out: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
    """Writes the tokenizer files of a `check_hf_tokenizer`-checked tokenizer into the HF folder `out` (a local
    folder or a URL); returns their names."""
    storage.copy_file(tokenizer.path, storage.join(out, HF_TOKENIZER_FILE))
    # Models trained here add no dummy "▁" before the text; MiniCPM's own (like Llama's) do. HF must do the same.
    dummy_prefix = tokenizer.id_to_piece(tokenizer.encode("a")[0]).startswith("\u2581")
    config = {"tokenizer_class": "LlamaTokenizer", **SPECIAL_TOKENS, "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "add_prefix_space": dummy_prefix, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE, **({"model_max_length": model_max_length} if model_max_length else {})}
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", SPECIAL_TOKENS)):
        write_json(storage.join(out, name), payload, ensure_ascii=False, sort_keys=True)
    return [HF_TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"]
