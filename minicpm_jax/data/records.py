"""On-disk layout of a prepared dataset: ArrayRecord shards of token ids plus `manifest.json`.

A prepared folder holds `shard-00000-of-0000N.array_record` files and a manifest. Each record is
one document's token ids as little-endian int32 bytes (BOS/EOS included as the manifest says).
When the manifest lists `record_fields` (chat and preference data: ids plus loss masks), a record
holds several int32 arrays instead: their count k, their k lengths, then the arrays one after another.
Shards are written with group_size:1 so Grain can read any record without decoding its neighbours.

The folder may be a local path or a gs:// or s3:// URL. ArrayRecord reads and writes files by name in C++,
local files only: a bucket's shards are written locally and uploaded when they are closed, and read from a
local copy that `storage.stage` makes once per shard content (the manifest records each shard's sha256).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from array_record.python import array_record_module

from minicpm_jax import storage
from minicpm_jax.files import read_json, write_json

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RECORD_DTYPE = np.dtype("<i4")
_WRITER_OPTIONS = "group_size:1"

log = logging.getLogger(__name__)


def encode_record(token_ids) -> bytes:
    return np.asarray(token_ids, dtype=RECORD_DTYPE).tobytes()


def decode_record(record: bytes) -> np.ndarray:
    # astype copies into native-endian memory the pipeline may own (frombuffer is read-only).
    return np.frombuffer(record, dtype=RECORD_DTYPE).astype(np.int32)


def encode_fields(arrays) -> bytes:
    """Several int32 arrays as one record: [k, len_1 .. len_k, array_1 .., array_k ..]."""
    arrays = [np.asarray(a, dtype=RECORD_DTYPE) for a in arrays]
    return encode_record(np.concatenate([[len(arrays)], [len(a) for a in arrays], *arrays]))


def decode_fields(record: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an `encode_fields` record (already decoded to int32), by field name."""
    count = int(record[0]) if len(record) else -1
    if count != len(names) or len(record) < 1 + count:
        raise ValueError(f"record holds {count} fields, expected {len(names)} ({', '.join(names)})")
    lengths = record[1:1 + count]
    if lengths.sum() != len(record) - 1 - count:
        raise ValueError(f"record of {len(record)} int32 values does not match its field lengths {lengths.tolist()}")
    offsets = np.cumsum([1 + count, *lengths])
    return {name: record[start:end] for name, start, end in zip(names, offsets[:-1], offsets[1:])}


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


class ShardWriter:
    """Writes documents round-robin over `num_shards` shards, so shards stay balanced.

    For a gs:// or s3:// `out_dir` the shards are written to a local temporary folder and uploaded by `close`.
    """

    def __init__(self, out_dir: str | os.PathLike, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.out_dir = os.fspath(out_dir)
        self._local_dir = tempfile.mkdtemp(prefix="minicpm-jax-shards-") if storage.is_remote(out_dir) else self.out_dir
        os.makedirs(self._local_dir, exist_ok=True)
        self.names = [shard_name(i, num_shards) for i in range(num_shards)]
        self.documents = [0] * num_shards
        self.tokens = [0] * num_shards
        self._writers = [array_record_module.ArrayRecordWriter(os.path.join(self._local_dir, name), _WRITER_OPTIONS)
                         for name in self.names]
        self._next = 0

    def write(self, token_ids, *fields) -> None:
        """One document; extra arrays (loss masks, a second sequence) make it an `encode_fields` record."""
        self.write_encoded(encode_fields([token_ids, *fields]) if fields else encode_record(token_ids), len(token_ids))

    def write_encoded(self, record: bytes, num_tokens: int) -> None:
        """One document already encoded as a record (a long one's ids, spooled to disk and read back as bytes)."""
        shard = self._next
        self._writers[shard].write(record)
        self.documents[shard] += 1
        self.tokens[shard] += num_tokens
        self._next = (shard + 1) % len(self._writers)

    def close(self) -> list[dict[str, Any]]:
        """Closes (and uploads) every shard; returns each one's counts and sha256 for the manifest."""
        for writer in self._writers:
            writer.close()
        local = [os.path.join(self._local_dir, name) for name in self.names]
        hashes = [storage.sha256(path) for path in local]
        if self._local_dir != self.out_dir:
            for path, name in zip(local, self.names):
                storage.copy_file(path, storage.join(self.out_dir, name))
            shutil.rmtree(self._local_dir)
        return [
            {"file": name, "num_documents": docs, "num_tokens": toks, "sha256": sha}
            for name, docs, toks, sha in zip(self.names, self.documents, self.tokens, hashes)
        ]


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes `manifest` with its format version; returns what was written."""
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    # Atomic: never a half-written manifest that looks valid.
    write_json(storage.join(out_dir, MANIFEST_NAME), manifest, ensure_ascii=False)
    return manifest


def read_manifest(prepared_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder, after checking that it and all its shards exist."""
    path = storage.join(prepared_dir, MANIFEST_NAME)
    if not storage.is_file(path):
        hint = ""
        if storage.is_file(storage.join(prepared_dir, "train", MANIFEST_NAME)):
            hint = f" (it has a train/ split: use {storage.join(prepared_dir, 'train')})"
        raise FileNotFoundError(f"{prepared_dir} is not a prepared dataset: no {MANIFEST_NAME}{hint}")
    manifest = read_json(path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}")
    present = set(storage.listdir(prepared_dir))  # one listing, not a request per shard
    missing = [s["file"] for s in manifest["shards"] if s["file"] not in present]
    if missing:
        raise FileNotFoundError(f"{prepared_dir}: shards listed in {MANIFEST_NAME} are missing: {missing}")
    return manifest


class ShardSource:
    """Random access to one shard's documents; read errors name the shard and the record."""

    def __init__(self, path: str | os.PathLike, expected_documents: int):
        from grain.sources import ArrayRecordDataSource  # grain is heavy; prepare-data does not need it

        self.path = str(path)
        try:
            self._source = ArrayRecordDataSource(self.path)
            length = len(self._source)
        except Exception as e:  # array_record raises bare RuntimeError/ValueError for corrupt files
            raise ValueError(f"cannot open shard {self.path}: {e}") from e
        if length != expected_documents:
            raise ValueError(f"shard {self.path} holds {length} records but the manifest says {expected_documents}")
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            record = self._source[index]
        except Exception as e:
            raise ValueError(f"cannot read record {index} of shard {self.path}: {e}") from e
        if len(record) % RECORD_DTYPE.itemsize:
            raise ValueError(f"record {index} of shard {self.path} has {len(record)} bytes, not a multiple of 4")
        return decode_record(record)

    def __repr__(self) -> str:
        # Grain uses the repr of a source in its checkpoint/debug output; keep it short and stable.
        return f"ShardSource({self.path!r})"


def open_shards(prepared_dir: str | os.PathLike) -> tuple[dict[str, Any], list[ShardSource]]:
    """Manifest and one validated source per shard of a prepared folder (a bucket's shards staged locally)."""
    manifest = read_manifest(prepared_dir)
    started = time.perf_counter()
    local = [storage.stage(storage.join(prepared_dir, s["file"]), s.get("sha256")) for s in manifest["shards"]]
    if storage.is_remote(prepared_dir):
        size = sum(os.path.getsize(path) for path in local)
        seconds = time.perf_counter() - started
        log.info("staged %d shard(s) of %s (%.1f MB) in %.2f s (%.0f MB/s; a cached copy costs nothing)",
                 len(local), prepared_dir, size / 1e6, seconds, size / 1e6 / max(seconds, 1e-9))
    return manifest, [ShardSource(path, s["num_documents"]) for path, s in zip(local, manifest["shards"])]
