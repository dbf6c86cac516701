"""The tokenizer half of an HF export: tokenizer.model, tokenizer.json, tokenizer_config.json (with the chat
template and `added_tokens_decoder`), special_tokens_map.json.

Every client tokenizes the export exactly as `Tokenizer.encode` does (tests/test_hf_tokenizer.py):
- transformers 4.x and 5.x load tokenizer.json (class PreTrainedTokenizerFast), written here from the SentencePiece
  model: BPE vocab and merges, the chat markers and special pieces as added tokens, and a normalizer that puts "▁"
  before every stretch of text between them, as SentencePiece's dummy prefix does. (transformers 5's own
  LlamaTokenizer would not do that for a stretch that starts with a space.)
- llama.cpp's converters read tokenizer.model for the pieces and scores and `added_tokens_decoder` for the pieces
  to split out first: the chat markers become USER_DEFINED tokens, `<unk>`, `<s>`, `</s>` CONTROL (or UNKNOWN).
  Its MiniCPM converter always adds the "▁" prefix; its Llama/Granite one reads `add_prefix_space`, written here
  from the model. So a tokenizer without a dummy prefix (trained here before it was the default) is tokenized
  differently by llama.cpp in the `minicpm` layout; `save_hf_tokenizer` warns about that.
`apply_chat_template` reproduces the MiniCPM chat format that SFT and DPO trained on (data/chat.py), ids included.
"""

from __future__ import annotations

import logging
import os

from sentencepiece import sentencepiece_model_pb2

from minicpm_jax import storage
from minicpm_jax.data.chat import CHAT_TEMPLATE
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.files import write_json

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
HF_TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_JSON = "tokenizer.json"
_SPACE = "\u2581"
_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece

log = logging.getLogger(__name__)


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


def _proto(tokenizer: Tokenizer) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.path.read_bytes())
    return proto


def added_tokens(tokenizer: Tokenizer) -> dict[int, dict]:
    """HF's added tokens: the special pieces (special) and the chat markers (not special, so that llama.cpp makes
    them USER_DEFINED and splits them out of any text, as we and transformers do)."""
    entries = {tokenizer.unk_id: True, tokenizer.bos_id: True, tokenizer.eos_id: True}
    entries.update((token_id, False) for token_id in tokenizer.chat_markers.values())
    return {token_id: {"content": tokenizer.id_to_piece(token_id), "lstrip": False, "normalized": False,
                       "rstrip": False, "single_word": False, "special": special}
            for token_id, special in sorted(entries.items())}


def _merges(vocab: dict[str, int], scores: dict[str, float]) -> list[list[str]]:
    """BPE merges that rebuild SentencePiece's BPE: every way to cut a piece into two pieces, the merge of a
    higher-scoring piece first (SentencePiece merges the adjacent pair whose union scores highest)."""
    merges = []
    for piece in vocab:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[piece], vocab[left], vocab[right], left, right))
    return [[left, right] for *_, left, right in sorted(merges)]


def tokenizer_json(tokenizer: Tokenizer) -> dict | None:
    """tokenizer.json for the `tokenizers` library, or None for a model it cannot reproduce here (not BPE, or
    a normalizer other than identity, or whitespace collapsing)."""
    proto = _proto(tokenizer)
    spec = proto.normalizer_spec
    if (proto.trainer_spec.model_type != proto.trainer_spec.BPE or spec.name not in ("identity", "")
            or spec.precompiled_charsmap or spec.remove_extra_whitespaces):
        return None
    normal = [(i, p) for i, p in enumerate(proto.pieces) if p.type == _PIECE.NORMAL]
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = _merges({p.piece: i for i, p in normal}, {p.piece: p.score for _, p in normal})
    added = [{"id": i, **entry} for i, entry in added_tokens(tokenizer).items()]
    bos = SPECIAL_TOKENS["bos_token"]
    replace_space = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
    prefix = [{"type": "Prepend", "prepend": _SPACE}] if tokenizer.dummy_prefix else []
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if tokenizer.dummy_prefix else []
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        # The normalizer runs on each stretch between added tokens, so each gets the dummy prefix, as in llama.cpp.
        "normalizer": {"type": "Sequence", "normalizers": [*prefix, replace_space]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, *strip]},
        "model": {"type": "BPE", "dropout": None, "unk_token": SPECIAL_TOKENS["unk_token"],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def save_hf_tokenizer(tokenizer: Tokenizer, out: str | os.PathLike, model_max_length: int | None = None,
                      arch: str | None = None) -> list[str]:
    """Writes the tokenizer files of a `check_hf_tokenizer`-checked tokenizer into the HF folder `out` (a local
    folder or a URL); returns their names."""
    storage.copy_file(tokenizer.path, storage.join(out, HF_TOKENIZER_FILE))
    files = [HF_TOKENIZER_FILE]
    fast = tokenizer_json(tokenizer)
    if fast is not None:
        write_json(storage.join(out, HF_TOKENIZER_JSON), fast, ensure_ascii=False)
        files.append(HF_TOKENIZER_JSON)
    else:
        log.warning("%s is not a BPE model with the identity normalizer: exported without %s, so transformers "
                    "builds its own tokenizer from %s (transformers 5 may then differ from us on text that "
                    "follows a chat marker with a space)", tokenizer.path, HF_TOKENIZER_JSON, HF_TOKENIZER_FILE)
    if arch == "minicpm" and not tokenizer.dummy_prefix:
        log.warning("%s has no dummy prefix: llama.cpp's MiniCPM converter adds one regardless, so a GGUF made "
                    "from this export would tokenize text differently; export with --arch granite (its "
                    "converter reads add_prefix_space: false) or retrain the tokenizer", tokenizer.path)
    config = {
        # PreTrainedTokenizerFast reads tokenizer.json as written; LlamaTokenizer (the fallback) builds its own.
        "tokenizer_class": "PreTrainedTokenizerFast" if fast is not None else "LlamaTokenizer",
        **SPECIAL_TOKENS, "add_bos_token": True, "add_eos_token": False,
        # legacy: the dummy prefix before every stretch of text, as SentencePiece, llama.cpp and tokenizer.json do.
        "legacy": True, "add_prefix_space": tokenizer.dummy_prefix, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): entry for i, entry in added_tokens(tokenizer).items()},
        "chat_template": CHAT_TEMPLATE, **({"model_max_length": model_max_length} if model_max_length else {})}
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", SPECIAL_TOKENS)):
        write_json(storage.join(out, name), payload, ensure_ascii=False, sort_keys=True)
    return [*files, "tokenizer_config.json", "special_tokens_map.json"]
