"""Supervised fine-tuning (docs/recipe.md §7.3): language modelling on chat conversations, loss on assistant
tokens only.

SFT is the pre-training task on other data: conversations rendered with the MiniCPM chat template
(data/chat.py) and prepared with `prepare-data --format chat`, whose records carry a loss mask that is
1 on assistant tokens and the EOS after each answer. The pipeline packs conversations into rows with
segment ids, exactly as it packs documents, and the train loop, checkpoints, resume and metrics are
the pre-training ones. What makes it SFT is where it starts (another run's weights, see start.py)
and its schedule (configs/sft.py: the paper's lr 1e-3 → 1e-4 under μP, WSD with exponential decay).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ml_collections

from minicpm_jax.align.start import create_finetune_run
from minicpm_jax.data import records

log = logging.getLogger(__name__)


def _warn_on_plain_text(cfg: ml_collections.ConfigDict) -> None:
    from minicpm_jax.config import DataConfig

    for phase, mixture in DataConfig.from_config(cfg.data).mixtures.items():
        for folder, _ in mixture:
            if records.read_manifest(folder).get("input_format", "text") != "chat":
                log.warning("data.mixtures.%s: %s is not chat data, so every token carries loss there", phase, folder)


def run_sft(source: str, step: int | None, workdir: str, cfg: ml_collections.ConfigDict,
            data_files: Sequence[str] = (), tokenizer: str | None = None, val_fraction: float = 0.0,
            train: bool = True, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Creates (or resumes) the SFT run `workdir` from `source` on the conversations in `data_files`, then trains it.

    `overrides` are the --config.* overrides applied to `cfg` (derive.py).
    """
    from minicpm_jax.train.loop import train as train_run

    cfg = create_finetune_run(source, step, workdir, cfg, input_format="chat", data_files=data_files,
                              tokenizer=tokenizer, val_fraction=val_fraction, overrides=overrides,
                              finalize=_warn_on_plain_text)
    if train:
        train_run(cfg, workdir)
    return cfg
