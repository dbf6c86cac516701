"""A checkpoint's `meta` item is a CheckpointMeta: one writer, one mark of "weights only"; old metas still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicpm_jax.config import ModelConfig
from minicpm_jax.run import checkpoint
from minicpm_jax.run.checkpoint import CheckpointMeta

from align_helpers import TINY_MODEL, make_source_run


def _restore(run: Path, step: int = 0) -> checkpoint.Restored:
    _, abstract = checkpoint.abstract_params(ModelConfig(**TINY_MODEL))
    saved = checkpoint.RunCheckpoints(str(run), async_save=False)
    try:
        return saved.restore(step, abstract, None)  # a weights-only step never asks for the opt_state's shapes
    finally:
        saved.close()


def test_a_weights_only_save_has_no_opt_state_and_reads_back_weights_only(tmp_path):
    run = make_source_run(tmp_path / "run")  # checkpoint.save_model, what import-hf writes
    step_dir = run / checkpoint.CHECKPOINT_DIR / "0"
    assert (step_dir / "params").is_dir() and not (step_dir / "opt_state").exists()
    restored = _restore(run)
    assert restored.opt_state is None and restored.data_state is None
    assert restored.meta == CheckpointMeta(0, "stable", weights_only=True)
    assert restored.meta.config is None and restored.meta.parent is None and restored.meta.layout == "stacked-v1"
    assert CheckpointMeta.from_json(json.loads(json.dumps(restored.meta.to_json()))) == restored.meta

    # The meta and the items cannot disagree: a save whose meta contradicts its opt_state is refused, unwritten.
    saved = checkpoint.RunCheckpoints(str(run), async_save=False)
    try:
        with pytest.raises(ValueError, match="does not match its meta"):
            saved.save(4, restored.params, None, None, CheckpointMeta(4, "stable", weights_only=False, config={}))
        with pytest.raises(ValueError, match="does not match its meta"):
            saved.save(4, restored.params, {"count": 0}, None, CheckpointMeta.weights(4))
        with pytest.raises(ValueError, match="does not match its meta"):
            saved.save(4, restored.params, None, None, CheckpointMeta.weights(5))
        assert saved.all_steps() == [0]
    finally:
        saved.close()
    with pytest.raises(ValueError, match="phase 'imported'"):
        CheckpointMeta(0, "imported", weights_only=True)


def test_meta_in_the_old_untyped_form_still_reads(tmp_path):
    config = {"train": {"steps": 12}, "schedule": {"name": "wsd"}}
    parent = {"run": "/runs/dense", "step": 8, "upcycled": True}
    # What save_model wrote before CheckpointMeta: the phase "imported", no config, the parent only when given.
    assert CheckpointMeta.from_json({"phase": "imported", "step": 0, "layout": "stacked-v1"}) == \
        CheckpointMeta(0, "stable", weights_only=True)
    assert CheckpointMeta.from_json({"phase": "imported", "parent": parent, "step": 0, "layout": "stacked-v1"}) == \
        CheckpointMeta(0, "stable", weights_only=True, parent=parent)
    # What the train loop and branch wrote: the data phase, the config, the parent only for a branch's lineage.
    assert CheckpointMeta.from_json({"phase": "decay", "config": config, "step": 12, "layout": "stacked-v1"}) == \
        CheckpointMeta(12, "decay", weights_only=False, config=config)
    assert CheckpointMeta.from_json({"phase": "stable", "config": config, "parent": parent, "step": 8,
                                     "layout": "stacked-v1"}) == \
        CheckpointMeta(8, "stable", weights_only=False, config=config, parent=parent)

    # A run directory whose weights-only checkpoint carries the old meta restores as before: without opt_state.
    run = make_source_run(tmp_path / "run")
    meta_file = run / checkpoint.CHECKPOINT_DIR / "0" / "meta" / "metadata"
    meta_file.write_text(json.dumps({"phase": "imported", "parent": parent, "step": 0, "layout": "stacked-v1"}))
    restored = _restore(run)
    assert restored.opt_state is None
    assert restored.meta == CheckpointMeta(0, "stable", weights_only=True, parent=parent)
    model, _ = checkpoint.restore_model(str(run))
    assert model.config.num_layers == TINY_MODEL["num_layers"]
