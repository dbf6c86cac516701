"""SentencePiece tokenizer: load any model (MiniCPM's own included) or train a byte-fallback BPE.

MiniCPM's ids (docs/recipe.md §10): <unk>=0, <s>=1 (BOS, prepended), </s>=2 (EOS). Models trained here use
the same ids and also hold the chat markers `<用户>` and `<AI>` as single tokens.

Text is encoded the way llama.cpp and Hugging Face's Llama tokenizers ("legacy" mode) encode SentencePiece models:
the chat markers that are pieces of the model are split out first, and each stretch of text between them is
encoded on its own. With a dummy prefix (MiniCPM's and LLaMA's models, and the ones trained here) every stretch
therefore starts with "▁": `<用户>Hi<AI>` is `<用户>`, `▁Hi`, `<AI>`. Without one (tokenizers trained here before the
dummy prefix), splitting changes nothing, because SentencePiece never merges across a user-defined piece.

A long document can be encoded in chunks (`encode_stream`) with exactly the ids of encoding it whole, which keeps
memory bounded. That holds for BPE models with the identity normalizer and no whitespace collapsing (MiniCPM's, LLaMA's
and the ones trained here): such a model normalizes one character at a time (a space becomes "▁"), and BPE only merges
neighbours whose concatenation is a piece. A cut between two characters that sit side by side in no piece is therefore
never merged across, so the ids of the whole are the ids of the parts, provided each part after the first is encoded
without the dummy "▁" (a second processor whose model has add_dummy_prefix off) and, without byte fallback, no two
unknown characters meet at the cut (SentencePiece would merge them into one <unk>). Other models are encoded whole.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from minicpm_jax import storage

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_USER = "<用户>"
CHAT_AI = "<AI>"

# Enough for a byte-fallback model: 256 byte pieces, 3 specials, 2 chat markers and a few merges.
MIN_VOCAB_SIZE = 300
# Characters per SentencePiece call when a long text is encoded in chunks. SentencePiece's own memory for a call is
# about 100 bytes per piece (a few MB here), and BPE's cost grows faster than the length of a call: on a 10 MB text,
# 16K to 64K-character chunks encoded about twice as fast as the whole text in one call.
STREAM_CHUNK_CHARS = 1 << 16
_SPACE = "\u2581"  # SentencePiece's "▁": what the normalizer makes of " "

log = logging.getLogger(__name__)


class Tokenizer:
    """A SentencePiece model with MiniCPM conventions (BOS/EOS handling, content hash for manifests)."""

    def __init__(self, model_path: str | os.PathLike):
        """`model_path`: a local path or a gs:// or s3:// URL of a SentencePiece .model file."""
        self.path = storage.as_path(storage.absolute(model_path))
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self._model = self.path.read_bytes()
        self._logged_blocker = False
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

    @functools.cached_property
    def _proto(self) -> sentencepiece_model_pb2.ModelProto:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._model)
        return proto

    @functools.cached_property
    def chunking_blocker(self) -> str | None:
        """None when `encode_stream` can cut a text into chunks exactly (see the module docstring), else why not."""
        proto = self._proto
        norm, trainer = proto.normalizer_spec, proto.trainer_spec
        if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
            return f"model type {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}, not BPE"
        if norm.name != "identity" or norm.precompiled_charsmap:
            return f"normalizer {norm.name!r}, not identity"
        if norm.remove_extra_whitespaces:
            return "remove_extra_whitespaces is on"
        if not norm.escape_whitespaces:
            return "escape_whitespaces is off"
        if trainer.treat_whitespace_as_suffix:
            return "treat_whitespace_as_suffix is on"
        return None

    @functools.cached_property
    def _cut_tables(self) -> tuple[frozenset[str], frozenset[str] | None]:
        """Character pairs that sit side by side inside a piece (never cut between them), and, without byte
        fallback, the characters that are pieces (a cut needs one on either side, so no two <unk>s meet there)."""
        types = sentencepiece_model_pb2.ModelProto.SentencePiece
        mergeable = [p.piece.replace(" ", _SPACE) for p in self._proto.pieces
                     if p.type in (types.NORMAL, types.USER_DEFINED, types.UNUSED)]
        inside = frozenset(piece[i:i + 2] for piece in mergeable for i in range(len(piece) - 1))
        known = None if self._proto.trainer_spec.byte_fallback else frozenset(p for p in mergeable if len(p) == 1)
        return inside, known

    def _find_cut(self, text: str, start: int) -> int:
        """The first i >= start (and >= 1) where text may be cut before text[i] exactly; 0 when there is none."""
        inside, known = self._cut_tables
        for i in range(max(start, 1), len(text)):
            pair = text[i - 1:i + 1].replace(" ", _SPACE)
            if pair not in inside and (known is None or pair[0] in known or pair[1] in known):
                return i
        return 0

    @functools.cached_property
    def _continuation_sp(self) -> spm.SentencePieceProcessor:
        """The model without its dummy prefix: encodes a chunk that continues a stretch of text."""
        if not self._proto.normalizer_spec.add_dummy_prefix:
            return self._sp
        proto = sentencepiece_model_pb2.ModelProto()
        proto.CopyFrom(self._proto)
        proto.normalizer_spec.add_dummy_prefix = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def _encode_chunk(self, chunk: str, continues: bool) -> tuple[np.ndarray, bool]:
        """Ids of one chunk, and whether it ends inside a stretch of text (so the next chunk continues it)."""
        parts = self._segments(chunk)
        ids: list[int] = []
        for k, part in enumerate(parts):
            if part in self.chat_markers:
                ids.append(self.chat_markers[part])
            else:
                ids.extend((self._continuation_sp if k == 0 and continues else self._sp).encode(part))
        return np.asarray(ids, dtype=np.int32), parts[-1] not in self.chat_markers

    def encode_stream(
            self, pieces: Iterable[str], add_bos: bool = False, add_eos: bool = False,
            chunk_chars: int | None = None,
    ) -> Iterator[np.ndarray]:
        """The ids of the text `"".join(pieces)` as int32 arrays, exactly `encode`'s, computed chunk by chunk.

        Chunks hold about `chunk_chars` (default STREAM_CHUNK_CHARS) characters, cut only where the cut provably
        changes no id (see the module docstring), so memory depends on the chunk, not on the text. A model for
        which that cannot be guaranteed (`chunking_blocker`) gets the text joined and encoded whole.
        """
        chunk_chars = chunk_chars or STREAM_CHUNK_CHARS
        if add_bos:
            yield np.array([self.bos_id], dtype=np.int32)
        if self.chunking_blocker is not None:
            if not self._logged_blocker:
                log.info("tokenizer %s: long documents are encoded whole, not in chunks (%s)",
                         self.path, self.chunking_blocker)
                self._logged_blocker = True
            yield np.asarray(self.encode("".join(pieces)), dtype=np.int32)
        else:
            buffer, scan_from, continues = "", 1, False
            for piece in (p[i:i + chunk_chars] for p in pieces for i in range(0, len(p), chunk_chars)):
                buffer += piece  # pieces no longer than a chunk: the buffer stays about two chunks long
                while len(buffer) > chunk_chars:
                    cut = self._find_cut(buffer, max(scan_from, chunk_chars))
                    if not cut:  # no exact cut yet: read on (a text without any is encoded whole)
                        scan_from = len(buffer)
                        break
                    ids, continues = self._encode_chunk(buffer[:cut], continues)
                    yield ids
                    buffer, scan_from = buffer[cut:], 1
            if buffer:
                yield self._encode_chunk(buffer, continues)[0]
        if add_eos:
            yield np.array([self.eos_id], dtype=np.int32)

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
