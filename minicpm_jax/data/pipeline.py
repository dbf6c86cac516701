"""Grain input pipeline: weighted mixture -> shuffle -> split long documents -> first-fit packing -> batches.

Each row of a batch (numpy int32, shape [global_batch_size // process_count, seq_len]) holds:
    tokens       input ids
    targets      the next token of the same document (never the first token of another one)
    segment_ids  1..k for the k document pieces packed in the row, 0 on padding
    positions    0, 1, ... restarting at each piece
    loss_mask    1 where `targets` is a real next token that counts: 0 on padding, and for chat data
                 (prepare-data --format chat) 1 only where the target is an assistant token or its EOS
Documents (BOS ... EOS) longer than seq_len + 1 are cut into pieces of seq_len + 1 tokens that
overlap by one, so every next-token pair is trained exactly once. Each piece becomes `tokens =
piece[:-1]`, `targets = piece[1:]`: a target never crosses a document (or piece) boundary, so no
boundary position needs masking beyond padding.

Hosts read disjoint documents (each source is sliced by process index before shuffling). Each
source is reshuffled every epoch and repeats forever; weights are token fractions, turned into
document sampling rates with each source's mean document length from its manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from minicpm_jax.config import DataConfig, Mixture
from minicpm_jax.data import records

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
# Shuffling the mixed stream within windows of this many documents breaks Grain's periodic
# mixing pattern, which otherwise lets a worker's strided slice see one source only.
_MIX_WINDOW = 4096
_MAX_FAN_OUT = 1 << 20  # bound required by Grain's FlatMap interface; documents are never that long

log = logging.getLogger(__name__)


class _AsDocument(grain.transforms.Map):
    """A stored record -> {"ids", "mask"}: mask[i] says whether predicting ids[i] counts (all 1 for plain text)."""

    def __init__(self, record_fields: tuple[str, ...] | None):
        self.record_fields = record_fields

    def map(self, record: np.ndarray) -> dict[str, np.ndarray]:
        if self.record_fields is None:
            return {"ids": record, "mask": np.ones_like(record)}
        fields = records.decode_fields(record, self.record_fields)
        return {"ids": fields["ids"], "mask": fields["loss_mask"]}


class _SplitIntoPieces(grain.experimental.FlatMapTransform):
    """Document -> pieces of at most seq_len + 1 tokens overlapping by one, as (tokens, targets, loss_mask)."""

    max_fan_out = _MAX_FAN_OUT

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        ids, mask, pieces = doc["ids"], doc["mask"], []
        for start in range(0, len(ids) - 1, self.seq_len):
            end = min(start + self.seq_len, len(ids) - 1)
            pieces.append({"tokens": ids[start:end], "targets": ids[start + 1:end + 1],
                           "loss_mask": mask[start + 1:end + 1]})
        return pieces


def _finish_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["tokens_segment_ids"].astype(np.int32)
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["tokens_positions"].astype(np.int32),
        "loss_mask": (packed["loss_mask"] * (segment_ids > 0)).astype(np.int32),
    }


def _documents(prepared_dir: str, process_index: int, process_count: int) -> tuple[dict[str, Any], grain.MapDataset]:
    """This host's documents of one prepared folder (every process_count-th one, from process_index)."""
    manifest, shards = records.open_shards(prepared_dir)
    shards = [s for s in shards if len(s)]
    if not shards:
        raise ValueError(f"{prepared_dir} holds no documents")
    fields = manifest.get("record_fields")
    if fields not in (None, ["ids", "loss_mask"]):
        raise ValueError(f"{prepared_dir} holds records of {fields} (input_format {manifest.get('input_format')!r}), "
                         f"not documents for language modelling; preference pairs train with `minicpm-jax dpo`")
    docs = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in shards])
    docs = docs.map(_AsDocument(tuple(fields) if fields else None))
    local = docs[process_index::process_count]
    if len(local) == 0:
        raise ValueError(
            f"{prepared_dir} has {len(docs)} documents, fewer than the {process_count} processes reading it"
        )
    return manifest, local


def _pack_and_batch(pieces: grain.IterDataset, seq_len: int, batch_size: int, num_bins: int, seed: int,
                                        shuffle_bins: bool, drop_remainder: bool) -> grain.IterDataset:
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
    )
    return packed.map(_finish_row).batch(batch_size, drop_remainder=drop_remainder)


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    return global_batch_size // process_count


class DataIterator:
    """Endless iterator over this host's batches, with a JSON-serialisable, exactly restorable state."""

    def __init__(self, dataset: grain.IterDataset):
        self._iterator = iter(dataset)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops worker processes (if any); the iterator cannot be used afterwards."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        # Drop the iterator now: Grain's own finalizer would otherwise run again at interpreter exit.
        self._iterator = None

    def __enter__(self) -> DataIterator:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mixed_documents(mixture: Mixture, process_index: int, process_count: int, seed: int) -> grain.MapDataset:
    """An endless, shuffled stream of this host's documents drawn from `mixture` by token weight."""
    sources, rates = [], []
    for i, (path, weight) in enumerate(mixture):
        manifest, docs = _documents(path, process_index, process_count)
        # repeat() reseeds the shuffle each epoch, so every epoch has a new order.
        sources.append(docs.shuffle(seed=seed + i).repeat())
        rates.append(weight / manifest["mean_document_tokens"])
    if len(sources) == 1:
        return sources[0]
    mixed = grain.MapDataset.mix(sources, [r / sum(rates) for r in rates])
    return grain.experimental.WindowShuffleMapDataset(mixed, window_size=_MIX_WINDOW, seed=seed)


def _enable_grain_workers() -> None:
    # Grain (<= 0.2.18) reads absl flags in its worker code and fails in programs that never parse
    # them (google/grain#1355). Marking them parsed keeps every flag at its default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(
        data_cfg: DataConfig,
        phase: str,
        seq_len: int,
        global_batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
        seed: int | None = None,
) -> DataIterator:
    """Training batches for `phase`: this host's [global_batch_size // process_count, seq_len] slice."""
    process_index, process_count = _resolve_processes(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    seed = data_cfg.shuffle_seed if seed is None else seed
    docs = mixed_documents(data_cfg.mixture(phase), process_index, process_count, seed)
    pieces = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(), _SplitIntoPieces(seq_len))
    num_bins = max(data_cfg.num_packing_bins, local_batch)
    batches = _pack_and_batch(pieces, seq_len, local_batch, num_bins, seed, shuffle_bins=True, drop_remainder=True)
    if data_cfg.num_workers:
        _enable_grain_workers()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.worker_buffer_size
            )
        )
    log.info(
        "data phase %s: %s, batch %d x %d on process %d/%d, %d workers",
        phase, ", ".join(f"{p} ({w:.0%})" for p, w in data_cfg.mixture(phase)), local_batch, seq_len,
        process_index, process_count, data_cfg.num_workers,
    )
    return DataIterator(batches)


def iter_eval_batches(
        prepared_dir: str,
        seq_len: int,
        global_batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this host's documents of `prepared_dir`, in order, packed like training rows.

    The last batch is filled with all-padding rows (loss_mask 0) so every batch has the same shape.
    Hosts may get different numbers of batches; callers that need lockstep must agree on a count.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    _, docs = _documents(prepared_dir, process_index, process_count)
    pieces = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(), _SplitIntoPieces(seq_len))
    batches = _pack_and_batch(pieces, seq_len, local_batch, local_batch, 0, shuffle_bins=False, drop_remainder=False)
    for batch in batches:
        missing = local_batch - len(batch["tokens"])
        if missing:
            batch = {k: np.concatenate([v, np.zeros((missing, seq_len), np.int32)]) for k, v in batch.items()}
        yield batch
