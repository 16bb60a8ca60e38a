"""Progress of long phases: a tqdm bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class _LogProgress:
    """Logs ``phase: done/total (pct), rate/s, ETA`` at most every ``LOG_EVERY_S`` seconds."""

    def __init__(self, phase: str, total: int, unit: str) -> None:
        self.phase, self.total, self.unit = phase, total, unit
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info(
                "%s: %d/%d %s (%.0f%%), %.0f %s/s, ETA %.0fs",
                self.phase,
                self.done,
                self.total,
                self.unit,
                100.0 * self.done / max(self.total, 1),
                rate,
                self.unit,
                eta,
            )


@contextmanager
def progress(phase: str, total: int, unit: str = "rows", enabled: bool | None = None) -> Iterator:
    """Yield ``update(n)`` for a phase of ``total`` units; a bar on a TTY, else log lines."""
    tty = sys.stderr.isatty() if enabled is None else enabled
    if tty:
        with tqdm(total=total, desc=phase, unit=unit, unit_scale=True, file=sys.stderr) as bar:
            yield bar.update
    else:
        yield _LogProgress(phase, total, unit)
