"""Stopping a run that trains nothing: a dead run detector, checked at every log line.

A run can fail without a NaN: a gradient norm of exactly 0 (every update is zero), or a loss that sits at
ln V, the loss of uniform predictions over the vocabulary (e.g. `model.scale_emb=1e30` saturates every
layer). Either, in `train.dead_run_windows` consecutive log windows, stops the run with the step named;
the first such window warns. Its checkpoints stay as they were: none of the dead steps is saved by the stop.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

# How close to ln V a window's mean loss must be to count as "at ln V". A model at init sits near ln V too,
# but its mean loss moves by far more than this from one window to the next.
_UNIFORM_TOLERANCE = 1e-5


class DeadRunError(FloatingPointError):
    """The run stopped itself because it trains nothing (the CLI reports it like a non-finite loss)."""


class DeadRunDetector:
    def __init__(self, vocab_size: int, windows: int):
        self.uniform_loss = math.log(vocab_size)
        self.windows = windows
        self._dead_windows = 0

    def check(self, step: int, loss: float, grad_norm: float, last_good: str) -> None:
        """Counts the log window ending at `step`; warns on the first dead one, raises DeadRunError on the
        `windows`-th in a row. `last_good` describes the checkpoint a user would go back to."""
        if not self.windows:
            return
        symptom = ("the gradient norm is exactly 0" if grad_norm == 0 else
                   f"the loss is ln V = {self.uniform_loss:.4f} (uniform predictions)"
                   if abs(loss - self.uniform_loss) < _UNIFORM_TOLERANCE else None)
        if symptom is None:
            self._dead_windows = 0
            return
        self._dead_windows += 1
        if self._dead_windows == 1:
            log.warning("step %d: %s; the run stops if this lasts %d log windows (train.dead_run_windows)",
                        step, symptom, self.windows)
        if self._dead_windows >= self.windows:
            raise DeadRunError(f"step {step}: {symptom} for {self.windows} log windows in a row: the run trains "
                               f"nothing, so it stops (check model.scale_emb, the lr and the data). {last_good}")
