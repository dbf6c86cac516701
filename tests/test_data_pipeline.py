"""Grain pipeline: packing invariants, mixture weights, host sharding, resumable state."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from minicpm_jax.config import DataConfig
from minicpm_jax.data import pipeline

import data_helpers as dh

SEQ_LEN = 32
# Grain's index shuffle is slow on tiny datasets (~0.5 ms per read below ~100 documents), so the
# sources are a few hundred documents even though the tests read only a few thousand tokens.
SHORT_DOCS, LONG_DOCS = 400, 100


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    # Source 1 has short documents, source 2 long ones (split into pieces at SEQ_LEN + 1).
    return {
        1: dh.write_prepared(root / "short", dh.synthetic_docs(1, SHORT_DOCS, 3, 20), num_shards=3),
        2: dh.write_prepared(root / "long", dh.synthetic_docs(2, LONG_DOCS, 20, 120), num_shards=2),
    }


def _config(mixture: str, **kw) -> DataConfig:
    return DataConfig.from_config({"mixtures": {"stable": mixture}, **kw})


def _check_row(tokens, targets, segment_ids, positions, loss_mask):
    seg_starts = np.flatnonzero(np.diff(segment_ids, prepend=0) != 0)
    assert (loss_mask == (segment_ids > 0)).all()
    assert (tokens[segment_ids == 0] == 0).all() and (targets[segment_ids == 0] == 0).all()
    real = segment_ids > 0
    # Padding only at the end, segment ids 1..k in order.
    assert not real[np.argmin(real):].any() or real.all()
    k = segment_ids.max()
    assert list(np.unique(segment_ids[real])) == list(range(1, k + 1))
    for s in range(1, k + 1):
        where = np.flatnonzero(segment_ids == s)
        assert (np.diff(where) == 1).all()
        assert where[0] in seg_starts
        # Positions restart at 0 and count up inside each segment.
        assert (positions[where] == np.arange(len(where))).all()
        # All tokens of a segment come from one document, consecutive, and each target is the next
        # token of that same document.
        seg_tokens, seg_targets = tokens[where], targets[where]
        assert len(set((seg_tokens // dh.DOC).tolist())) == 1
        assert (np.diff(seg_tokens) == 1).all()
        assert (seg_targets == seg_tokens + 1).all()
        assert (seg_targets // dh.DOC == seg_tokens // dh.DOC).all()


def test_packed_rows_never_cross_documents(sources):
    cfg = _config(f"{sources[1]}:0.5,{sources[2]}:0.5")
    it = pipeline.make_pipeline(cfg, "stable", SEQ_LEN, 8, process_index=0, process_count=1)
    for _ in range(30):
        batch = next(it)
        assert set(batch) == set(pipeline.BATCH_KEYS)
        for v in batch.values():
            assert v.shape == (8, SEQ_LEN) and v.dtype == np.int32
        for row in range(8):
            _check_row(*(batch[k][row] for k in pipeline.BATCH_KEYS))


def test_long_documents_are_split_with_every_pair_trained_once(sources):
    # One source, one epoch's worth of batches and a bit more: every (token -> next token) pair of
    # each long document is a target exactly once per epoch.
    docs = dh.synthetic_docs(2, LONG_DOCS, 20, 120)
    expected = {int(t) for d in docs for t in d[1:]}
    it = pipeline.make_pipeline(_config(str(sources[2])), "stable", SEQ_LEN, 4, 0, 1)
    seen = []
    while len(seen) < len(expected):
        b = next(it)
        seen.extend(b["targets"][b["loss_mask"] > 0].tolist())
    assert set(seen) == expected
    # Packing bins may take a few pieces of the next epoch early, nothing more.
    assert len(set(seen[: len(expected)])) > 0.95 * len(expected)


def test_mixture_token_proportions_follow_weights(sources):
    cfg = _config(f"{sources[1]}:0.7,{sources[2]}:0.3")
    it = pipeline.make_pipeline(cfg, "stable", SEQ_LEN, 16, 0, 1)
    counts = np.zeros(3)
    for _ in range(60):
        b = next(it)
        src = b["tokens"][b["loss_mask"] > 0] // dh.SOURCE
        counts += np.bincount(src, minlength=3)
    share = counts[1] / counts.sum()
    assert share == pytest.approx(0.7, abs=0.03)


def test_phases_use_their_own_mixture_and_fall_back_to_stable(sources):
    cfg = DataConfig.from_config({"mixtures": {"stable": str(sources[1]), "decay": str(sources[2])}})
    b = next(pipeline.make_pipeline(cfg, "decay", SEQ_LEN, 4, 0, 1))
    assert set((b["tokens"][b["loss_mask"] > 0] // dh.SOURCE).tolist()) == {2}
    only_stable = _config(str(sources[1]))
    assert only_stable.mixture("decay") == only_stable.mixture("stable")
    with pytest.raises(KeyError, match="unknown phase 'anneal'"):
        only_stable.mixture("anneal")


def test_two_hosts_read_disjoint_data_covering_everything(sources):
    cfg = _config(str(sources[1]))
    seen = []
    for host in range(2):
        it = pipeline.make_pipeline(cfg, "stable", SEQ_LEN, 8, process_index=host, process_count=2)
        docs = set()
        for _ in range(40):  # > one epoch of this host's 200 short documents
            b = next(it)
            assert b["tokens"].shape == (4, SEQ_LEN)  # each host yields its half of the global batch
            docs |= dh.doc_ids(b["tokens"], b["loss_mask"])
        seen.append(docs)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {1 * dh.SOURCE // dh.DOC + d for d in range(SHORT_DOCS)}


def test_global_batch_must_divide_by_process_count(sources):
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        pipeline.make_pipeline(_config(str(sources[1])), "stable", SEQ_LEN, 8, 0, 3)


_RESTORE_SCRIPT = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        from minicpm_jax.data import pipeline
        from minicpm_jax.config import DataConfig

        if __name__ == "__main__":
            mixture, workers, state_file, out_file = sys.argv[1:]
            cfg = DataConfig.from_config({"mixtures": {"stable": mixture}, "num_workers": int(workers)})
            with pipeline.make_pipeline(cfg, "stable", 32, 4, 0, 1) as it:
                it.set_state(json.load(open(state_file)))
                np.savez(out_file, *[b[k] for _ in range(5) for b in [next(it)] for k in pipeline.BATCH_KEYS])
        """
)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restored_in_new_process_gives_identical_batches(sources, tmp_path, workers):
    mixture = f"{sources[1]}:0.6,{sources[2]}:0.4"
    cfg = _config(mixture, num_workers=workers)
    with pipeline.make_pipeline(cfg, "stable", 32, 4, 0, 1) as it:
        for _ in range(7):
            next(it)
        (tmp_path / "state.json").write_text(json.dumps(it.get_state()))
        expected = [b[k] for _ in range(5) for b in [next(it)] for k in pipeline.BATCH_KEYS]

    repo = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", _RESTORE_SCRIPT, mixture, str(workers), str(tmp_path / "state.json"),
         str(tmp_path / "out.npz")],
        check=True, env=env, timeout=120,
    )
    restored = np.load(tmp_path / "out.npz")
    assert len(restored.files) == len(expected) == 5 * len(pipeline.BATCH_KEYS)
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(restored[f"arr_{i}"], want, err_msg=f"array {i}")


def test_eval_batches_cover_each_document_once_with_padding(sources):
    docs, batches = set(), 0
    for b in pipeline.iter_eval_batches(str(sources[1]), SEQ_LEN, 8, 0, 1):
        assert b["tokens"].shape == (8, SEQ_LEN)
        batch_docs = dh.doc_ids(b["tokens"], b["loss_mask"])
        assert not docs & batch_docs
        docs |= batch_docs
        batches += 1
    assert docs == {1 * dh.SOURCE // dh.DOC + d for d in range(SHORT_DOCS)}
    tokens = sum(len(d) - 1 for d in dh.synthetic_docs(1, SHORT_DOCS, 3, 20))
    assert batches >= tokens / (8 * SEQ_LEN)
