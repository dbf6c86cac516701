"""Decisions the train loop takes between steps that every process must take alike: stop, and save on a timer.

A checkpoint save is collective (every process writes its shards of the same step), so in a
multi-process run a decision that one process takes alone hangs the others. Both decisions here are
therefore agreed on:

- **Stop** (SIGTERM, SIGINT, or a preemption notice). `jax.distributed.initialize` starts JAX's
  preemption service, whose notifier catches SIGTERM in every process (and, on Cloud TPU, the
  maintenance notice). When any one process is notified, the coordination service picks the first step
  that no process has finished yet, and `reached_preemption_sync_point(step)` is true at that step on
  every process: they all save it and exit. SIGINT (Ctrl-C) is re-raised as SIGTERM to take the same
  path. A single process has no coordination service and acts on its own signal handlers.
- **Timed save** (`checkpoint.every_minutes`). Process 0's clock decides, and its answer is broadcast to
  the others at the same (log) steps.

A process that is gone (kill -9, a lost host) cannot be agreed with: the coordination service notices its
missing heartbeats within the heartbeat timeout (`--heartbeat-timeout`, distributed.py) and ends every
other process with an error naming it, instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


class TrainingStopped(Exception):
    """The run stopped early on request after saving `step`; `resume` (a minicpm-jax command) continues it."""

    def __init__(self, workdir: str, step: int, reason: str, resume: str | None = None):
        self.workdir, self.step, self.reason = workdir, step, reason
        self.resume = resume or f"train --workdir {workdir}"
        super().__init__(f"{reason}: saved step {step} and stopped; run `{self.resume}` to resume")


class StopRequests:
    """Turns SIGTERM/SIGINT/preemption notices into one step, the same on every process, at which to stop."""

    def __init__(self):
        self.reason: str | None = None  # the signal this process received, if any
        self._agreed = jax.process_count() > 1
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        # SIGTERM belongs to JAX's preemption notifier when there are peers to agree with.
        signals = (signal.SIGINT,) if self._agreed else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        self.reason = signal.Signals(signum).name
        if self._agreed:
            os.kill(os.getpid(), signal.SIGTERM)  # notify the preemption service like any SIGTERM

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_after(self, step: int) -> str | None:
        """Why to stop after `step` (None: go on). Call after every step, on every process, in step order."""
        if not self._agreed:
            return self.reason and f"{self.reason} received"
        if multihost_utils.reached_preemption_sync_point(step):
            return f"{self.reason} received" if self.reason else "stop requested (SIGTERM, SIGINT or preemption)"
        return None


class SaveTimer:
    """`checkpoint.every_minutes`: whether that long has passed since the last save, by process 0's clock."""

    def __init__(self, every_minutes: float):
        self.interval_seconds = every_minutes * 60
        self.saved()

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def due(self) -> bool:
        """Collective in a multi-process run: call at the same steps on every process."""
        if not self.interval_seconds:
            return False
        due = np.asarray(time.monotonic() - self._last_save >= self.interval_seconds)
        return bool(multihost_utils.broadcast_one_to_all(due) if jax.process_count() > 1 else due)
