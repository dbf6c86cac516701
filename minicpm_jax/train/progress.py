"""What the training loop reports between log lines: averaged metrics, throughput, tokens seen, elapsed time, ETA.

The numbers a log line is made of (the window's sums and step count, the tokens seen, the training time so
far) are saved in every checkpoint's meta (`RunProgress.state`), so a run resumed from any step logs the same
averages, line for line, as one that was never interrupted, and its token count and elapsed time continue.
Only the clock-based fields (time, tokens/s, step time, elapsed) differ between the two.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.progress import duration, human_count

# The metrics.jsonl fields that depend on the wall clock: everything else of a resumed run's lines equals
# the uninterrupted run's.
CLOCK_FIELDS = ("time", "elapsed_s", "step_time_s", "tokens_per_sec", "mfu")


class LogWindow:
    """Training metrics summed on the device between log lines (no host sync per step), then averaged.

    Logged values (loss, grad norm, router statistics, ...) are means over the steps since the previous
    log line, which is far less noisy than one step's value.
    """

    def __init__(self, sums: dict[str, Any] | None = None, steps: int = 0):
        self._sums: dict[str, jax.Array] = sums or {}
        self._steps = steps
        self.restart_clock()

    def restart_clock(self) -> None:
        """Throughput counts from here (evaluations and saves in between are not training time)."""
        self._start = time.perf_counter()
        self._timed_steps = 0
        self._timed_tokens = 0

    def add(self, step_metrics: dict[str, jax.Array], tokens: int) -> None:
        averaged = {name: value for name, value in step_metrics.items() if name != "count"}
        self._sums = jax.tree.map(jnp.add, self._sums, averaged) if self._sums else averaged
        self._steps += 1
        self._timed_steps += 1
        self._timed_tokens += tokens

    def flush(self) -> tuple[dict[str, float], float, float]:
        """(mean of each metric, tokens per second, seconds per step) of the window, then starts a new one.

        A vector metric (one value per expert) becomes one scalar per index: name_0, name_1, ...
        """
        means: dict[str, float] = {}
        for name, total in jax.device_get(self._sums).items():
            mean = np.asarray(total, np.float64) / self._steps
            means.update({name: float(mean)} if mean.ndim == 0 else
                         {f"{name}_{i}": float(value) for i, value in enumerate(mean.ravel())})
        seconds = time.perf_counter() - self._start
        tokens_per_sec = self._timed_tokens / seconds
        seconds_per_step = seconds / max(self._timed_steps, 1)
        self.__init__()
        return means, tokens_per_sec, seconds_per_step

    def state(self) -> dict[str, Any]:
        """The sums so far, exactly (float32 values survive JSON's doubles bit for bit)."""
        sums = {name: {"value": np.asarray(value).tolist(), "dtype": str(np.asarray(value).dtype)}
                for name, value in jax.device_get(self._sums).items()}
        return {"sums": sums, "steps": self._steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LogWindow:
        sums = {name: jnp.asarray(np.asarray(entry["value"], entry["dtype"])) for name, entry in state["sums"].items()}
        return cls(sums, int(state["steps"]))


class RunProgress:
    """Tokens seen, training time and the log window of one run, continued across resumes and branches."""

    def __init__(self, total_steps: int, saved: dict[str, Any] | None = None):
        saved = saved or {}
        self.total_steps = total_steps
        self.tokens_seen = int(saved.get("tokens_seen", 0))
        self._earlier_seconds = float(saved.get("train_seconds", 0.0))
        self._started = time.monotonic()
        self.window = LogWindow.from_state(saved["window"]) if "window" in saved else LogWindow()

    def add(self, step_metrics: dict[str, jax.Array], tokens: int) -> None:
        self.window.add(step_metrics, tokens)
        self.tokens_seen += tokens

    @property
    def elapsed(self) -> float:
        """Wall seconds this run has trained, over all its processes' lifetimes (evaluations included)."""
        return self._earlier_seconds + time.monotonic() - self._started

    def fields(self, seconds_per_step: float) -> dict[str, Any]:
        """The progress fields of a metrics.jsonl line."""
        return {"tokens_seen": self.tokens_seen, "step_time_s": seconds_per_step, "elapsed_s": round(self.elapsed, 3)}

    def describe(self, step: int, seconds_per_step: float) -> str:
        """'0.212 s/step  61.4K tokens  elapsed 0:00:25  ETA 0:01:00' for the progress line at `step`."""
        eta = (self.total_steps - step) * seconds_per_step
        return (f"{seconds_per_step:.3g} s/step  {human_count(self.tokens_seen)} tokens  "
                f"elapsed {duration(self.elapsed)}  ETA {duration(eta)}")

    def state(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "train_seconds": self.elapsed, "window": self.window.state()}
