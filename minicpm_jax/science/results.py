"""What a finished run directory says about itself: model size N, tokens D, final losses, whether it decayed.

Losses per byte are in nats per byte (the token loss divided by the data's bytes per token), the unit of
the paper's scaling fits (docs/recipe.md §6). The held-out (eval) loss is preferred where the run evaluated at its
last step: the training loss of the last log line is a mean over the log window.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from minicpm_jax import optim, storage
from minicpm_jax.model import count_params
from minicpm_jax.run.checkpoint import read_run_config
from minicpm_jax.train.metrics import METRICS_FILE


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = storage.join(workdir, METRICS_FILE)
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class RunResult:
    workdir: str
    n_params: int  # non-embedding parameters (the paper's N)
    tokens: int  # tokens trained on at the last logged step (D)
    step: int
    total_steps: int
    decayed: bool  # the run's schedule had reached the end of a decay (a point on the loss envelope)
    loss: float | None  # nats/token, training (last log window)
    loss_per_byte: float | None
    eval_loss: float | None  # nats/token, held out, at the last evaluated step
    eval_loss_per_byte: float | None
    eval_step: int | None

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps

    def best_loss_per_byte(self) -> float | None:
        """Held-out loss per byte if evaluated at the final step, else the training loss per byte."""
        if self.eval_loss_per_byte is not None and self.eval_step == self.step:
            return self.eval_loss_per_byte
        return self.loss_per_byte

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_run(workdir: str) -> RunResult:
    cfg = read_run_config(workdir)
    records = read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    last = train_records[-1] if train_records else {}
    last_eval = eval_records[-1] if eval_records else {}
    step = max((r["step"] for r in records), default=0)
    total = int(cfg.train.steps)
    decayed = False
    if cfg.schedule.name == "wsd":
        warmup, stable, decay = optim.resolve_phases(cfg.schedule, total)
        decayed = decay > 0 and step >= warmup + stable + decay
    elif cfg.schedule.name == "cosine":
        decayed = step >= optim.cosine_horizon(cfg.schedule, total)
    elif cfg.schedule.name == "cosine_loop":  # at the floor only at the end of a cycle
        warmup, horizon = optim.resolve_phases(cfg.schedule, total)[0], optim.cosine_horizon(cfg.schedule, total)
        decayed = step >= horizon and (step - warmup) % (horizon - warmup) == 0
    eval_per_byte = last_eval.get("eval_bits_per_byte")
    return RunResult(
        workdir=workdir, n_params=count_params(cfg.model),
        tokens=step * int(cfg.train.global_batch_size) * int(cfg.train.seq_len), step=step, total_steps=total,
        decayed=decayed, loss=last.get("loss"), loss_per_byte=last.get("loss_per_byte"),
        eval_loss=last_eval.get("eval_loss"),
        eval_loss_per_byte=None if eval_per_byte is None else eval_per_byte * math.log(2),
        eval_step=last_eval.get("step"))
