"""SentencePiece tokenizer: load any model (MiniCPM's own included) or train a byte-fallback BPE.

MiniCPM's ids (docs/recipe.md §10): <unk>=0, <s>=1 (BOS, prepended), </s>=2 (EOS). Models trained here use
the same ids and also hold the chat markers `<用户>` and `<AI>` as single tokens.

Text is encoded the way llama.cpp and Hugging Face's Llama tokenizers ("legacy" mode) encode SentencePiece models:
the chat markers that are pieces of the model are split out first, and each stretch of text between them is
encoded on its own. With a dummy prefix (MiniCPM's and LLaMA's models, and the ones trained here) every stretch
therefore starts with "▁": `<用户>Hi<AI>` is `<用户>`, `▁Hi`, `<AI>`. Without one (tokenizers trained here before the
dummy prefix), splitting changes nothing, because SentencePiece never merges across a user-defined piece.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
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

    @functools.cached_property
    def chat_markers(self) -> dict[str, int]:
        """The chat markers that are single pieces of this model, with their ids (none for some models)."""
        markers = {}
        for marker in (CHAT_USER, CHAT_AI):
            try:
                markers[marker] = self.piece_id(marker)
            except KeyError:
                pass
        return markers

    @functools.cached_property
    def dummy_prefix(self) -> bool:
        """Whether the model puts "▁" before the text it encodes (SentencePiece's add_dummy_prefix)."""
        return self._sp.encode("a", out_type=str)[0].startswith("\u2581")

    @functools.cached_property
    def _marker_pattern(self) -> re.Pattern | None:
        return re.compile("(" + "|".join(map(re.escape, self.chat_markers)) + ")") if self.chat_markers else None

    def _segments(self, text: str) -> list[str]:
        """`text` cut into chat markers and the non-empty stretches between them."""
        if self._marker_pattern is None:
            return [text] if text else []
        return [part for part in self._marker_pattern.split(text) if part]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos, num_threads=1)[0]

    def encode_batch(
            self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encodes many texts at once on SentencePiece's own threads (much faster than a Python loop)."""
        texts = list(texts)
        if self._marker_pattern is None or not any(m in t for t in texts for m in self.chat_markers):
            return self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
        segmented = [self._segments(t) for t in texts]
        stretches = [part for parts in segmented for part in parts if part not in self.chat_markers]
        encoded = iter(self._sp.encode(stretches, num_threads=num_threads))
        out = []
        for parts in segmented:
            ids = [self.bos_id] if add_bos else []
            for part in parts:
                ids.extend([self.chat_markers[part]] if part in self.chat_markers else next(encoded))
            out.append(ids + [self.eos_id] if add_eos else ids)
        return out

    def encode_with_offsets(self, text: str) -> list[tuple[int, int]]:
        """(id, start byte of the piece in `text` as UTF-8) for each piece, to map tokens back to spans."""
        out, start = [], 0
        for part in self._segments(text):
            if part in self.chat_markers:
                out.append((self.chat_markers[part], start))
            else:
                if hasattr(self._sp, "encode_as_immutable_proto"):  # sentencepiece before 0.2.1
                    proto = self._sp.encode_as_immutable_proto(part)
                else:
                    proto = self._sp.encode(part, return_type="proto")
                out.extend((p.id, start + p.begin) for p in proto.pieces)
            start += len(part.encode("utf-8"))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; the inverse of `encode`: each stretch between chat markers loses its dummy "▁"."""
        ids = [int(i) for i in ids]
        markers = {token_id: marker for marker, token_id in self.chat_markers.items()}
        if not markers.keys() & set(ids):
            return self._sp.decode(ids)
        parts, stretch = [], []
        for token_id in ids:
            if token_id in markers:
                parts += [self._sp.decode(stretch), markers[token_id]]
                stretch = []
            else:
                stretch.append(token_id)
        return "".join(parts) + self._sp.decode(stretch)

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
    byte_fallback for unseen characters, the identity normalizer (no NFKC folding), and no whitespace
    collapsing. Like MiniCPM's and LLaMA's tokenizers it has SentencePiece's dummy "▁" prefix, the one convention
    that llama.cpp's converters for both export layouts reproduce (its MiniCPM one adds "▁" before every stretch
    of text whatever the tokenizer_config says; see `Tokenizer.encode`).
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
            add_dummy_prefix=True,
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
