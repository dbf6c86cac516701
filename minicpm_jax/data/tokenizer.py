"""SentencePiece tokenizer: load any model (MiniCPM's own included) or train a byte-fallback BPE.

MiniCPM's ids (docs/recipe.md §10): <unk>=0, <s>=1 (BOS, prepended), </s>=2 (EOS). Models trained here use
the same ids and also hold the chat markers `<用户>` and `<AI>` as single tokens.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from minicpm_jax import storage

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_USER = "<用户>"
CHAT_AI = "<AI>"

# Enough for a byte-fallback model: 256 byte pieces, 3 specials, 2 chat markers and a few merges.
MIN_VOCAB_SIZE = 300

log = logging.getLogger(__name__)


class Tokenizer:
    """A SentencePiece model with MiniCPM conventions (BOS/EOS handling, content hash for manifests)."""

    def __init__(self, model_path: str | os.PathLike):
        """`model_path`: a local path or a gs:// or s3:// URL of a SentencePiece .model file."""
        self.path = storage.as_path(storage.absolute(model_path))
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self._model = self.path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model)
        except RuntimeError as error:  # sentencepiece's parse failure names no file
            raise ValueError(f"{self.path} is not a SentencePiece model: {error}") from error
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(
                f"tokenizer {self.path} defines no BOS/EOS piece (bos_id={self._sp.bos_id()}, "
                f"eos_id={self._sp.eos_id()}); MiniCPM needs both"
            )

    @functools.cached_property
    def sha256(self) -> str:
        """Content hash of the model file: prepared data records it so a run can refuse mismatched data."""
        return hashlib.sha256(self._model).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        # MiniCPM defines no pad piece; EOS is a safe filler because padded positions are masked anyway.
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
            self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encodes many texts at once on SentencePiece's own threads (much faster than a Python loop)."""
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)

    def encode_with_offsets(self, text: str) -> list[tuple[int, int]]:
        """(id, start byte of the piece in `text` as UTF-8) for each piece, to map tokens back to spans."""
        if hasattr(self._sp, "encode_as_immutable_proto"):  # sentencepiece before 0.2.1
            proto = self._sp.encode_as_immutable_proto(text)
        else:
            proto = self._sp.encode(text, return_type="proto")
        return [(p.id, p.begin) for p in proto.pieces]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def piece_id(self, piece: str) -> int:
        """Id of an exact piece; raises instead of silently returning <unk> for a piece the model lacks."""
        token_id = self._sp.piece_to_id(piece)
        if token_id == self.unk_id and piece != self.id_to_piece(self.unk_id):
            raise KeyError(f"piece {piece!r} is not in the vocabulary of {self.path}")
        return token_id


def _training_lines(documents: Iterable[str]) -> Iterator[str]:
    # SentencePiece learns from "sentences" (it drops lines over max_sentence_length); lines of each
    # document are the natural unit. Blank lines carry nothing to learn.
    for doc in documents:
        for line in doc.splitlines():
            if line.strip():
                yield line


def train_tokenizer(
        documents: Iterable[str],
        vocab_size: int,
        out_prefix: str | os.PathLike,
        *,
        model_type: str = "bpe",
        character_coverage: float = 0.9995,
        input_sentence_size: int = 2_000_000,
        num_threads: int | None = None,
) -> Path:
    """Trains a byte-fallback SentencePiece model and returns the path of `<out_prefix>.model`.

    Settings chosen so that any UTF-8 text (Chinese, emoji, odd whitespace) round-trips exactly:
    byte_fallback for unseen characters, the identity normalizer (no NFKC folding), no whitespace
    collapsing, and no dummy "▁" prefix (so chat-template pieces concatenate without stray tokens).
    `input_sentence_size` caps how many lines are sampled, which keeps training fast on big inputs.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} for a byte-fallback model, got {vocab_size}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            user_defined_symbols=[CHAT_USER, CHAT_AI],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,  # SentencePiece's own INFO logging is thousands of lines
        )
    except RuntimeError as e:
        raise RuntimeError(f"SentencePiece training for {out_prefix} failed: {e}") from e
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    log.info("trained tokenizer %s (vocab %d)", model_path, vocab_size)
    return model_path
