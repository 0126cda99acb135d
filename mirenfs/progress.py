"""A one-line progress bar on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Call with the bytes done so far; redraws at most ten times a second."""

    def __init__(self, total: int, label: str, *, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._drawn < 0.1 and done < self.total):
            return
        self._drawn = now
        fraction = min(done / self.total, 1.0)
        rate = done / max(now - self._started, 1e-6) / 1e6
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:6.1%} {rate:8.1f} MB/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
