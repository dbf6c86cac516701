"""The training loop's view of the data: the right mixture for each step's phase, resumable exactly.

The stable phase reads `data.mixtures.stable`; from the first decay step on, `data.mixtures.decay`
(docs/recipe.md §5.7: the decay adds high-quality and SFT-style data). Each phase may also have its own sequence
length, `data.seq_lens.<phase>` (a length curriculum, docs/recipe.md §9). When both phases name the same mixture
and length the one iterator simply continues, so a decay branch keeps its parent's data position. When
they differ, the decay phase starts its own iterator with a seed derived from the stable one, so it does
not replay the stable phase's order of a shared source.

The data is read as `data.num_shards` disjoint shards (default: one per process), each a pipeline
that yields its rows of the global batch; a process reads its contiguous range of shards and
concatenates their rows. With a fixed num_shards the global batches are the same whatever the
number of processes, so a run can move between 1 host and several and still see the same data.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import numpy as np

from minicpm_jax import storage
from minicpm_jax.config import DataConfig, Mixture
from minicpm_jax.data import records
from minicpm_jax.data.pipeline import DataIterator, make_pipeline

log = logging.getLogger(__name__)

DECAY_SEED_OFFSET = 1_000_003


def mixture_bytes_per_token(mixture: Mixture) -> float:
    """Token-weighted UTF-8 bytes per token of a mixture, from the prepared folders' manifests."""
    return sum(weight * records.read_manifest(path)["bytes_per_token"] for path, weight in mixture)


class Feed(Protocol):
    """What the training loop (train/loop.py) reads batches from; a Task's `make_feed(plan, workdir)` returns one.

    Implementations: `DataFeed` below (language modelling on data.mixtures) and align/dpo.py's `PairFeed`.
    """

    def restore(self, step: int, saved: dict[str, Any] | None) -> None:
        """Positions the feed so that the next batch is step `step`'s, from a checkpoint's `state()`
        (None: the data starts afresh)."""
        ...

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch that trains step `step` (0-based), keyed as the Task's batch_keys."""
        ...

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable position, saved with each checkpoint and given back to `restore` on resume."""
        ...

    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per token of the current data, to report losses per byte; None where the loss is not
        per token (DPO)."""
        ...

    def close(self) -> None:
        """Releases the readers (worker threads, open files); the loop calls it once, at the end of the run."""
        ...


class DataFeed:
    """The `Feed` of language modelling: `data.mixtures` per phase, read as `data.num_shards` shards."""

    def __init__(self, data_cfg: DataConfig, phase_of_step: Callable[[int], str], seq_len: int,
                 global_batch_size: int, process_index: int | None = None, process_count: int | None = None):
        import jax

        self.data_cfg = data_cfg
        self.phase_of_step = phase_of_step
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        num_shards = data_cfg.num_shards or process_count
        if num_shards % process_count or global_batch_size % num_shards:
            raise ValueError(f"data.num_shards={num_shards} must be a multiple of the {process_count} processes "
                             f"and divide train.global_batch_size={global_batch_size}")
        per_process = num_shards // process_count
        self._shards = range(process_index * per_process, (process_index + 1) * per_process)
        self.default_seq_len = seq_len
        self._pipeline_args = dict(global_batch_size=global_batch_size, process_count=num_shards)
        self.mixture: Mixture | None = None
        self.seq_len: int | None = None
        self.iterators: list[DataIterator] = []
        self._bytes_per_token = float("nan")

    def _open(self, phase: str, state: dict[str, Any] | None) -> None:
        self.close()
        mixture, seq_len = self._stream(phase)
        seed = self.data_cfg.shuffle_seed + (DECAY_SEED_OFFSET if (mixture, seq_len) != self._stream("stable") else 0)
        self.iterators = [make_pipeline(self.data_cfg, phase, seq_len=seq_len, seed=seed, process_index=shard,
                                        **self._pipeline_args) for shard in self._shards]
        for iterator, shard_state in zip(self.iterators, state or [None] * len(self.iterators)):
            if shard_state is not None:
                iterator.set_state(shard_state)
        self.mixture, self.seq_len = mixture, seq_len
        self._bytes_per_token = mixture_bytes_per_token(mixture)

    def restore(self, step: int, saved: dict[str, Any] | None) -> None:
        """Positions the feed for `step` from a checkpoint's data state (None: start of the data)."""
        phase = self.phase_of_step(step)
        same_stream = saved is not None and (
            _mixture_from_json(saved["mixture"]), saved.get("seq_len", self.default_seq_len)
        ) == self._stream(phase)
        self._open(phase, saved["iterators"] if same_stream else None)

    def _stream(self, phase: str) -> tuple[Mixture, int]:
        """What identifies a phase's data stream: its mixture and its sequence length (packing depends on it)."""
        return self.data_cfg.mixture(phase), self.data_cfg.seq_len(phase, self.default_seq_len)

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch that trains step `step` (0-based), switching mixture when the phase changes."""
        if not self.iterators or self._stream(self.phase_of_step(step)) != (self.mixture, self.seq_len):
            log.info("step %d: data phase %s begins", step, self.phase_of_step(step))
            self._open(self.phase_of_step(step), None)
        parts = [next(iterator) for iterator in self.iterators]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def state(self) -> dict[str, Any]:
        return {"mixture": [list(pair) for pair in self.mixture], "seq_len": self.seq_len,
                "iterators": [iterator.get_state() for iterator in self.iterators]}

    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token of the current mixture, to report losses per byte."""
        return self._bytes_per_token

    def close(self) -> None:
        for iterator in self.iterators:
            iterator.close()
        self.iterators = []


def _mixture_from_json(pairs: list[list[Any]]) -> Mixture:
    # Absolute, as config.validate makes the config's: checkpoints saved before that hold relative paths.
    return tuple((storage.absolute(path), float(weight)) for path, weight in pairs)
