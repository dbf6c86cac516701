"""Long-context data (docs/recipe.md §9): the long/short split of a prepared folder, and a per-phase sequence length
curriculum that switches with the data phase and resumes exactly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from minicpm_jax.config import DataConfig
from minicpm_jax.data import records
from minicpm_jax.data.feed import DataFeed

from train_helpers import REPO, write_token_folder


def _documents(folder) -> list[tuple[int, ...]]:
    _, shards = records.open_shards(folder)
    return [tuple(int(t) for t in shard[i]) for shard in shards for i in range(len(shard))]


def test_split_by_length_routes_every_document_by_its_token_count(tmp_path):
    source = write_token_folder(tmp_path / "tokens", num_docs=80)
    out = tmp_path / "by_length"
    result = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "split-by-length", "--input", str(source),
                             "--threshold", "40", "--out", str(out), "--num-shards", "2"],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    long_docs, short_docs = _documents(out / "long"), _documents(out / "short")
    assert long_docs and short_docs
    assert all(len(d) > 40 for d in long_docs) and all(len(d) <= 40 for d in short_docs)
    assert sorted(long_docs + short_docs) == sorted(_documents(source))
    for part, docs in (("long", long_docs), ("short", short_docs)):
        manifest = records.read_manifest(out / part)
        assert manifest["num_documents"] == len(docs) and manifest["num_tokens"] == sum(map(len, docs))
        assert manifest["length_split"]["threshold"] == 40 and manifest["bytes_per_token"] == 3.0
    # A long/short mixture of the two parts is an ordinary data config.
    cfg = DataConfig.from_config({"mixtures": {"stable": f"{out / 'long'}:0.44,{out / 'short'}:0.56"}})
    assert [w for _, w in cfg.mixture("stable")] == pytest.approx([0.44, 0.56])


def _feed(data_cfg: DataConfig) -> DataFeed:
    return DataFeed(data_cfg, lambda step: "decay" if step >= 2 else "stable", seq_len=32, global_batch_size=4,
                    process_index=0, process_count=1)


def test_sequence_length_curriculum_switches_with_the_phase_and_resumes(tmp_path):
    corpus = write_token_folder(tmp_path / "tokens", num_docs=120)
    data_cfg = DataConfig.from_config({"mixtures": {"stable": f"{corpus}:1"}, "seq_lens": {"stable": 0, "decay": 64}})
    feed = _feed(data_cfg)
    feed.restore(0, None)
    shapes = [feed.next_batch(step)["tokens"].shape for step in range(4)]
    assert shapes == [(4, 32), (4, 32), (4, 64), (4, 64)]
    saved = feed.state()
    assert saved["seq_len"] == 64
    expected = [feed.next_batch(step) for step in (4, 5)]
    feed.close()

    resumed = _feed(data_cfg)
    resumed.restore(4, saved)
    for step, batch in zip((4, 5), expected):
        got = resumed.next_batch(step)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key], err_msg=f"step {step} {key}")
    resumed.close()


def test_sequence_lengths_are_validated_by_phase():
    with pytest.raises(KeyError, match=r"data\.seq_lens has unknown phase\(s\) \['long'\]"):
        DataConfig.from_config({"mixtures": {"stable": "x:1"}, "seq_lens": {"long": 4096}})
    with pytest.raises(ValueError, match=r"data\.seq_lens\.decay must be an integer >= 0"):
        DataConfig.from_config({"mixtures": {"stable": "x:1"}, "seq_lens": {"decay": -1}})
