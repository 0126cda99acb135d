"""One line for a storm of one warning.

When the mount runs out of descriptors, or its catalogue stops answering,
every request fails for the same reason and says so: a hundred identical
lines hide the one after them that matters. A warning or error repeated
within ``window_s`` of the line that was written is held back and counted;
the next time it is written, it says how many were held back since when.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

FOLD_WINDOW_S = 60.0
_REMEMBERED = 1024  # distinct lines kept; the oldest are forgotten first


class FoldRepeats(logging.Filter):
    """Lets the first of a run of identical warnings through and holds back its repeats."""

    def __init__(self, window_s: float = FOLD_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = window_s, clock
        # line -> (written at, by the clock; written at, wall time; repeats held back since)
        self._written: dict[tuple[str, int, str], tuple[float, float, int]] = {}
        self._lock = threading.Lock()  # worker threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        line = (record.name, record.levelno, record.getMessage())
        now = self.clock()
        with self._lock:
            written_at, written_wall, held_back = self._written.pop(line, (None, 0.0, 0))
            if written_at is not None and now - written_at < self.window_s:
                self._written[line] = (written_at, written_wall, held_back + 1)
                return False
            self._written[line] = (now, record.created, 0)
            if len(self._written) > _REMEMBERED:
                del self._written[next(iter(self._written))]
        if held_back:
            times = "once" if held_back == 1 else f"{held_back} times"
            since = time.strftime("%H:%M:%S", time.localtime(written_wall))
            record.msg, record.args = f"{line[2]} (also {times} since {since}, not logged)", ()
        return True


def fold_repeats(handler: logging.Handler) -> None:
    """Give ``handler`` a :class:`FoldRepeats`, once."""
    if not any(isinstance(existing, FoldRepeats) for existing in handler.filters):
        handler.addFilter(FoldRepeats())
