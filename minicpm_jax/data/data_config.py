"""DataConfig: the typed, validated view of the `data` section of a run config.

Mixtures are given per training phase as a string `"DIR:WEIGHT,DIR:WEIGHT"` (a bare `DIR` has
weight 1), because prepared folders are paths and ConfigDict keys cannot hold dots; the string
form also works as a command-line override:
        --config.data.mixtures.decay=data/demo/shakespeare/train:0.5,data/demo/bible/train:0.5
Weights are fractions of *tokens* (normalised to sum 1). A phase without its own mixture uses the
`stable` one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from minicpm_jax.data import records

PHASES = ("stable", "decay")
DEFAULT_PHASE = "stable"


Mixture = tuple[tuple[str, float], ...]  # (prepared dir, normalised token weight) per source


def parse_mixture(spec: str | Mapping[str, float], key: str) -> Mixture:
    """`"a:0.7,b:0.3"` (or `{"a": 0.7, "b": 0.3}`) -> normalised ((dir, weight), ...)."""
    if isinstance(spec, str):
        pairs = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            path, sep, weight = item.rpartition(":")
            if not sep or not path:  # no weight given, e.g. "data/x"
                path, weight = item, "1"
            try:
                pairs.append((path, float(weight)))
            except ValueError:
                raise ValueError(f"{key}: weight of {path!r} must be a number, got {weight!r}") from None
    else:
        pairs = [(str(path), float(weight)) for path, weight in dict(spec).items()]
    if not pairs:
        raise ValueError(f"{key} names no prepared dataset; expected 'DIR:WEIGHT,DIR:WEIGHT'")
    for path, weight in pairs:
        if not weight > 0:
            raise ValueError(f"{key}: weight of {path!r} must be > 0, got {weight}")
    paths = [p for p, _ in pairs]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise ValueError(f"{key} lists {duplicates} more than once")
    total = sum(w for _, w in pairs)
    return tuple((path, weight / total) for path, weight in pairs)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: per-phase mixtures of prepared folders and the loader's knobs."""

    mixtures: Mapping[str, Mixture]
    seq_lens: Mapping[str, int] = dataclasses.field(default_factory=dict)  # per phase; 0 or absent = train.seq_len
    shuffle_seed: int = 0
    num_workers: int = 0
    worker_buffer_size: int = 2
    num_packing_bins: int = 0
    num_shards: int = 0  # data shards; 0 = one per process (see data/feed.py)
    val_dir: str = ""
    tokenizer: str = ""

    @classmethod
    def from_config(cls, cfg_data: Any, check_paths: bool = True) -> DataConfig:
        """Reads a ConfigDict (or dict) `data` section; fails with the offending key before any compute.

        check_paths=False reads the section without requiring or opening any prepared folder (what an
        ahead-of-time compile needs: the phases' sequence lengths, not the data).
        """
        values = dict(cfg_data.to_dict() if hasattr(cfg_data, "to_dict") else cfg_data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown key(s) data.{', data.'.join(unknown)}; known: {sorted(known)}")
        raw_mixtures = dict(values.pop("mixtures", None) or {})
        bad_phases = sorted(set(raw_mixtures) - set(PHASES))
        if bad_phases:
            raise KeyError(f"data.mixtures has unknown phase(s) {bad_phases}; phases are {list(PHASES)}")
        if check_paths and not raw_mixtures.get(DEFAULT_PHASE):
            raise ValueError(f"data.mixtures.{DEFAULT_PHASE} is required: 'DIR:WEIGHT,DIR:WEIGHT' of prepared folders")
        mixtures = {
                phase: parse_mixture(spec, f"data.mixtures.{phase}") for phase, spec in raw_mixtures.items() if spec
        }
        seq_lens = dict(values.pop("seq_lens", None) or {})
        bad_phases = sorted(set(seq_lens) - set(PHASES))
        if bad_phases:
            raise KeyError(f"data.seq_lens has unknown phase(s) {bad_phases}; phases are {list(PHASES)}")
        for phase, length in seq_lens.items():
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"data.seq_lens.{phase} must be an integer >= 0 (0 = train.seq_len), got {length!r}")
        config = cls(mixtures=mixtures, seq_lens={p: n for p, n in seq_lens.items() if n}, **values)
        config.validate(check_paths)
        return config

    def validate(self, check_paths: bool = True) -> None:
        for name in ("num_workers", "num_packing_bins", "num_shards"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.worker_buffer_size < 1:
            raise ValueError(f"data.worker_buffer_size must be >= 1, got {self.worker_buffer_size}")
        if not check_paths:
            return
        hashes = {}
        for phase, mixture in self.mixtures.items():
            for path, _ in mixture:
                try:
                    hashes[path] = records.read_manifest(path)["tokenizer"]["sha256"]
                except (FileNotFoundError, ValueError) as e:
                    raise ValueError(f"data.mixtures.{phase}: {e}") from e
        if self.val_dir:
            try:
                hashes[self.val_dir] = records.read_manifest(self.val_dir)["tokenizer"]["sha256"]
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"data.val_dir: {e}") from e
        if len(set(hashes.values())) > 1:
            raise ValueError(f"prepared folders were tokenized with different tokenizers (sha256 by folder): {hashes}")
        if self.tokenizer:
            from minicpm_jax.data.tokenizer import file_sha256

            if not Path(self.tokenizer).is_file():
                raise FileNotFoundError(f"data.tokenizer: {self.tokenizer} not found")
            sha = file_sha256(self.tokenizer)
            if hashes and sha not in hashes.values():
                raise ValueError(
                        f"data.tokenizer {self.tokenizer} (sha256 {sha[:12]}…) is not the tokenizer the data was "
                        f"prepared with ({next(iter(hashes.values()))[:12]}…)"
                )

    def seq_len(self, phase: str, default: int) -> int:
        """The sequence length of `phase`: a length curriculum raises it from stable to decay (facts §7.3)."""
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; phases are {list(PHASES)}")
        return self.seq_lens.get(phase, default)

    def mixture(self, phase: str) -> Mixture:
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; phases are {list(PHASES)}")
        # A phase without its own mixture reads the stable one (the pipeline logs which mixture it opens).
        return self.mixtures.get(phase, self.mixtures[DEFAULT_PHASE])
