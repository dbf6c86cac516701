"""A fine-tuning run (SFT, DPO) that starts from the weights of another run.

The new run's step 0 is a weights-only checkpoint of the source run's step N (a pre-training or SFT run,
or a model imported with `import-hf`), so the train loop starts it with a fresh optimizer and its own
schedule, exactly as it starts an imported model. Its config is the fine-tuning config with the model
section derive.py's rule gives: the source's shape and μP scalars, the config's compute settings, and
`init.parametrization` where set. `init.run` and `init.step` record the source, which is also DPO's
reference model. JSONL given with `data_files` is prepared into `RUN/data` (with `RUN/data/val` held out
when val_fraction > 0) with the tokenizer the source was trained with. Created once: from then on the
directory is an ordinary run, and creating it again resumes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import ml_collections

from minicpm_jax import storage
from minicpm_jax.config import ConfigError
from minicpm_jax.run import checkpoint, inputs
from minicpm_jax.run.derive import FINETUNE_START, derive_config
from minicpm_jax.run.plan import plan_run

log = logging.getLogger(__name__)

DATA_DIR = "data"


def _source_tokenizer(source_cfg: ml_collections.ConfigDict, source: str) -> str:
    tokenizer = inputs.run_tokenizer(source, source_cfg)
    if not tokenizer:
        raise ConfigError(f"{source} holds no {inputs.TOKENIZER_FILE} and records no data.tokenizer: pass --tokenizer")
    return tokenizer


def _prepare(data_files: Sequence[str], tokenizer: str, input_format: str, out: str,
             val_fraction: float) -> tuple[str, str]:
    """(train folder, val folder or "") of `data_files` prepared in `input_format` under `out`."""
    from minicpm_jax.data.prepare import prepare_data

    manifests = prepare_data(data_files, tokenizer, out, input_format=input_format, val_fraction=val_fraction)
    if "all" in manifests:
        return out, ""
    return storage.join(out, "train"), storage.join(out, "val")


def create_finetune_run(source: str, step: int | None, workdir: str, cfg: ml_collections.ConfigDict, *,
                        input_format: str, data_files: Sequence[str] = (), tokenizer: str | None = None,
                        val_fraction: float = 0.0, overrides: Sequence[str] = (),
                        finalize: Callable[[ml_collections.ConfigDict], None] | None = None
                        ) -> ml_collections.ConfigDict:
    """Creates the run `workdir` from `source` at `step` (default: its latest); returns its config.

    `overrides` are the --config.* overrides applied to `cfg` (derive.py). `finalize(cfg)` may set what
    follows from the prepared data (DPO: train.steps from the epochs).
    """
    if checkpoint.is_run(workdir):
        log.info("%s already holds a run; resuming it with its own config", workdir)
        return checkpoint.read_run_config(workdir)
    if "init" not in cfg:
        raise ConfigError("a fine-tuning config needs an `init` section (run, step, parametrization): "
                          "start from configs/sft.py or configs/dpo.py")
    source_cfg = checkpoint.read_run_config(source)
    cfg = derive_config(source_cfg, cfg, FINETUNE_START, overrides)
    saved = checkpoint.RunCheckpoints(source, async_save=False)
    try:
        step = saved.latest_step() if step is None else step
    finally:
        saved.close()
    if step is None:
        raise checkpoint.RunDirError(f"{source} has no committed checkpoint to start from")

    if cfg.init.parametrization:  # e.g. DPO without the μP lr split (docs/recipe.md §7.4)
        cfg.model.parametrization = cfg.init.parametrization
    cfg.init.run, cfg.init.step = storage.absolute(source), step
    if data_files:
        tokenizer = tokenizer or _source_tokenizer(source_cfg, source)
        train_dir, val_dir = _prepare(data_files, tokenizer, input_format, storage.join(workdir, DATA_DIR),
                                      val_fraction)
        cfg.data.mixtures = ml_collections.ConfigDict({"stable": f"{train_dir}:1", "decay": ""})
        cfg.data.val_dir, cfg.data.tokenizer = val_dir, tokenizer
    if finalize:
        finalize(cfg)
    plan_run(cfg)  # a bad config fails before the weights are copied

    model, _ = checkpoint.restore_model(source, step)
    # Weights before config.json: a crash in between leaves no run that looks complete.
    checkpoint.save_model(workdir, 0, model, parent={"run": storage.absolute(source), "step": step})
    checkpoint.write_run_config(workdir, cfg, inputs.run_tokenizer(source, source_cfg))
    log.info("created %s from %s step %d", workdir, source, step)
    return cfg
