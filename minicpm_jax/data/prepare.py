"""prepare-data: tokenize text/JSONL/Parquet inputs into ArrayRecord shards with a manifest.

Every document is stored as BOS + tokens + EOS. Besides plain text (`input_format="text"`), JSONL
conversations are prepared for fine-tuning:
  chat   `{"messages": [{"role": ..., "content": ...}, ...]}` rendered with the MiniCPM chat template
         (data/chat.py); each record holds the ids and a loss mask that is 1 on assistant tokens only
  pairs  `{"prompt": ..., "chosen": ..., "rejected": ...}` preference pairs for DPO; each record holds
         both sequences and masks that cover only the response
With `val_fraction > 0` the output folder gets two
prepared folders, `train/` and `val/`; a document goes to val when a seeded hash of its text falls
below the fraction, so the split is deterministic and does not change when inputs are reordered or
more files are added. Without a split the output folder itself is the prepared folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from minicpm_jax import storage
from minicpm_jax.data import chat, readers, records
from minicpm_jax.data.tokenizer import Tokenizer

INPUT_FORMATS = ("text", "chat", "pairs")
# The arrays of one record, by input format (None: the record is the bare token ids).
RECORD_FIELDS = {"text": None, "chat": ("ids", "loss_mask"),
                 "pairs": ("chosen", "chosen_mask", "rejected", "rejected_mask")}

_ENCODE_BATCH = 256  # documents per SentencePiece call: amortises the call, bounds memory
# Longer documents held as one string (a JSONL field) are encoded in chunks too, not in a batch.
_LONG_DOCUMENT_CHARS = readers.READ_BLOCK_BYTES
_LOG_EVERY_SECONDS = 10.0

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _SplitStats:
    """Running totals for one output folder."""

    writer: records.ShardWriter
    documents: int = 0
    tokens: int = 0
    text_tokens: int = 0
    bytes: int = 0

    def add(self, example: _Example) -> None:
        if example.record is not None:
            self.writer.write_encoded(example.record, example.num_tokens)
        else:
            self.writer.write(*example.arrays)
        self.documents += 1
        self.tokens += example.num_tokens
        self.text_tokens += example.text_tokens
        self.bytes += example.num_bytes


@dataclasses.dataclass(frozen=True)
class _Example:
    """One tokenized record: its arrays (ids first), the text that decides its split, its size.

    A long document comes already encoded instead: `record` holds its ids as record bytes (no arrays), and
    `split_key` the split digest of its text (`_split_hash`), computed as the text was read."""

    arrays: tuple
    split_key: str | bytes
    num_bytes: int
    text_tokens: int  # tokens of text, not BOS/EOS: the denominator of bytes per token
    record: bytes | None = None

    @property
    def num_tokens(self) -> int:
        if self.record is not None:
            return len(self.record) // records.RECORD_DTYPE.itemsize
        return len(self.arrays[0])


def _split_hash(seed: int):
    return hashlib.blake2b(digest_size=8, key=str(seed).encode())


def in_val_split(text: str | bytes, val_fraction: float, seed: int) -> bool:
    """Deterministic, content-keyed split: the same text always lands on the same side.

    `text` may also be the digest of the text's UTF-8 bytes that `_split_hash(seed)` makes (for streamed text)."""
    if val_fraction <= 0:
        return False
    digest = text if isinstance(text, bytes) else _split_hash(seed)
    if not isinstance(text, bytes):
        digest.update(text.encode("utf-8"))
        digest = digest.digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _text_examples(files: Sequence[Path], tokenizer: Tokenizer, text_field: str, text_mode: str,
                   skips: readers.SkipCounter, seed: int) -> Iterator[_Example]:
    """Short documents are encoded in batches; a long one is streamed (`_streamed_example`), in input order."""
    batch: list[str] = []
    for path in files:
        log.debug("reading %s", path)
        for doc in readers.iter_texts(path, text_field=text_field, text_mode=text_mode, skips=skips):
            if doc.text is not None and len(doc.text) <= _LONG_DOCUMENT_CHARS:
                batch.append(doc.text)
                if len(batch) == _ENCODE_BATCH:
                    yield from _encoded(batch, tokenizer)
                    batch = []
                continue
            yield from _encoded(batch, tokenizer)
            batch = []
            example = _streamed_example(doc, tokenizer, seed)
            if example is not None:
                yield example
    yield from _encoded(batch, tokenizer)


def _encoded(batch: list[str], tokenizer: Tokenizer) -> Iterator[_Example]:
    for text, ids in zip(batch, tokenizer.encode_batch(batch, add_bos=True, add_eos=True) if batch else []):
        yield _Example((ids,), text, len(text.encode("utf-8")), len(ids) - 2)


def _streamed_example(doc: readers.Document, tokenizer: Tokenizer, seed: int) -> _Example | None:
    """A long document, encoded chunk by chunk with its ids spooled to a temporary file, so memory holds one
    copy of its ids (the record bytes) and never a Python list of them; None when it turned out bad."""
    split_hash, num_bytes = _split_hash(seed), 0

    def pieces() -> Iterator[str]:
        nonlocal num_bytes
        for piece in doc:
            raw = piece.encode("utf-8")
            split_hash.update(raw)
            num_bytes += len(raw)
            yield piece

    with tempfile.TemporaryFile(prefix="minicpm-jax-ids-") as spool:
        for ids in tokenizer.encode_stream(pieces(), add_bos=True, add_eos=True):
            spool.write(ids.astype(records.RECORD_DTYPE, copy=False))
        if not doc.ok:
            return None
        spool.seek(0)
        record = spool.read()
    num_tokens = len(record) // records.RECORD_DTYPE.itemsize
    log.debug("%s: %d bytes, %d tokens, streamed", doc.where, num_bytes, num_tokens)
    return _Example((), split_hash.digest(), num_bytes, num_tokens - 2, record=record)


def _chat_examples(files: Sequence[Path], tokenizer: Tokenizer, input_format: str,
                   skips: readers.SkipCounter) -> Iterator[_Example]:
    specials = {tokenizer.bos_id, tokenizer.eos_id}
    for path in files:
        for where, obj in readers.iter_json_objects(path, skips):
            try:
                if input_format == "chat":
                    messages = chat.conversation_from_json(obj)
                    encoded = chat.encode_chat(tokenizer, messages)
                    arrays, ids = (encoded.ids, encoded.loss_mask), encoded.ids
                else:
                    prompt, chosen, rejected = chat.preference_from_json(obj)
                    messages = [*prompt, *chosen]
                    pair = (chat.encode_response(tokenizer, prompt, chosen),
                            chat.encode_response(tokenizer, prompt, rejected))
                    arrays, ids = (*pair[0], *pair[1]), pair[0].ids
            except (ValueError, TypeError) as err:
                skips.skip("bad_conversation", f"{where} ({err})")
                continue
            text = chat.render_chat_text(messages)
            yield _Example(arrays, text, len(text.encode("utf-8")), sum(i not in specials for i in ids))


def _manifest(stats: _SplitStats, shards: list[dict[str, Any]], tokenizer: Tokenizer, common: dict[str, Any]):
    # BOS and EOS are not text: leave them out of the compression ratio (bytes of text per text token).
    text_tokens = stats.text_tokens
    return {
        **common,
        "num_documents": stats.documents,
        "num_tokens": stats.tokens,
        "num_bytes": stats.bytes,
        "bytes_per_token": stats.bytes / text_tokens if text_tokens else None,
        "mean_document_tokens": stats.tokens / stats.documents if stats.documents else None,
        "shards": shards,
        "tokenizer": {
            "path": os.fspath(tokenizer.path),
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
        },
    }


def prepare_data(
        inputs: Sequence[str | os.PathLike],
        tokenizer_path: str | os.PathLike,
        out_dir: str | os.PathLike,
        *,
        text_field: str = "text",
        text_mode: str = "file",
        input_format: str = "text",
        num_shards: int = 1,
        val_fraction: float = 0.0,
        seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Tokenizes `inputs` into `out_dir`; returns the manifest of each written folder by split name."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    files = readers.expand_inputs(inputs)
    tokenizer = Tokenizer(tokenizer_path)
    out_dir = storage.absolute(out_dir)
    split_dirs = ({"train": storage.join(out_dir, "train"), "val": storage.join(out_dir, "val")} if val_fraction > 0
                  else {"all": out_dir})
    for split_dir in split_dirs.values():
        if storage.exists(storage.join(split_dir, records.MANIFEST_NAME)):
            raise FileExistsError(f"{split_dir} already holds a prepared dataset; choose another --out")
    # The val split is small and evaluation reads it whole, so one shard is enough.
    splits = {
        name: _SplitStats(records.ShardWriter(path, num_shards if name != "val" else 1))
        for name, path in split_dirs.items()
    }
    skips = readers.SkipCounter()
    started = last_log = time.monotonic()
    docs_seen = 0
    examples = (_text_examples(files, tokenizer, text_field, text_mode, skips, seed) if input_format == "text" else
                _chat_examples(files, tokenizer, input_format, skips))
    for example in examples:
        in_val = val_fraction > 0 and in_val_split(example.split_key, val_fraction, seed)
        splits["all" if val_fraction <= 0 else ("val" if in_val else "train")].add(example)
        docs_seen += 1
        now = time.monotonic()
        if now - last_log >= _LOG_EVERY_SECONDS:
            tokens = sum(s.tokens for s in splits.values())
            log.info(
                "%d documents, %d tokens (%.0f tokens/s), skipped %s",
                docs_seen, tokens, tokens / (now - started), skips.as_dict() or "none",
            )
            last_log = now

    shards = {name: stats.writer.close() for name, stats in splits.items()}
    if docs_seen == 0:
        hint = f"is --text-field {text_field!r} right?" if input_format == "text" else f"is it {input_format} JSONL?"
        raise ValueError(f"no documents found in {[str(f) for f in files]}; skipped by reason: {skips.as_dict()} "
                         f"({hint})")
    common = {
        "inputs": [storage.absolute(f) for f in files],
        "input_format": input_format,
        **({"record_fields": list(RECORD_FIELDS[input_format])} if RECORD_FIELDS[input_format] else {}),
        "text_field": text_field,
        "text_mode": text_mode,
        "add_bos": True,
        "add_eos": True,
        "val_fraction": val_fraction,
        "seed": seed,
        # Skips are counted over the whole input, before the split, so both halves report them.
        "skipped": skips.as_dict(),
    }
    manifests = {}
    for name, stats in splits.items():
        manifest = _manifest(stats, shards[name], tokenizer, {**common, "split": name})
        manifests[name] = records.write_manifest(split_dirs[name], manifest)
        log.info("wrote %s: %d documents, %d tokens", split_dirs[name], stats.documents, stats.tokens)
    if val_fraction > 0 and (splits["val"].documents == 0 or splits["train"].documents == 0):
        log.warning(
            "val_fraction %.3g over %d documents left a split empty (train %d, val %d)",
            val_fraction, docs_seen, splits["train"].documents, splits["val"].documents,
        )
    if skips.as_dict():
        log.warning("skipped input by reason: %s", skips.as_dict())
    return manifests
