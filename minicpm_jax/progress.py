"""Progress lines for long work (evaluation batches, log-likelihood requests, sweep points): done/total, rate,
elapsed time and ETA, at most every few seconds, through `logging` so they go where the CLI sends its log."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Ticker:
    """'eval: 12/40 batches (30%)  3.1 batches/s  elapsed 0:00:04  ETA 0:00:09', every `every_seconds` and at
    the end. `total` may be None (unknown: no percentage or ETA) or an estimate."""

    def __init__(self, what: str, total: int | None, unit: str, every_seconds: float = 10.0,
                 logger: logging.Logger = log):
        self.what, self.total, self.unit, self.every = what, total, unit, every_seconds
        self.logger = logger
        self.count = 0
        self._started = self._last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.count += count
        now = time.monotonic()
        if now - self._last >= self.every or (self.total is not None and self.count >= self.total):
            self._last = now
            self.logger.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        text = f"{self.what}: {self.count}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * min(self.count / self.total, 1):.0f}%)"
        else:
            text += f" {self.unit}"
        text += f"  {rate:.3g} {self.unit}/s  elapsed {duration(elapsed)}"
        if self.total and rate > 0:
            text += f"  ETA {duration(max(self.total - self.count, 0) / rate)}"
        return text


def duration(seconds: float) -> str:
    """H:MM:SS (days spelled out past 24 hours)."""
    seconds = int(round(max(seconds, 0)))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    text = f"{hours}:{seconds // 60:02d}:{seconds % 60:02d}"
    return f"{days}d {text}" if days else text


def human_count(count: float) -> str:
    """1234 -> '1.23K', 4.2e9 -> '4.2B'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"
