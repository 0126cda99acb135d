"""One line for a storm of one warning.

When the mount runs out of descriptors, or its catalogue stops answering,
every request fails for the same reason and says so: a hundred identical
lines hide the one after them that matters. The lines a request writes are
marked (``errors.FOLDED_WHEN_REPEATED``); such a line repeated word for word
within ``window_s`` of its last written copy is held back and counted, and
the next copy written says how many were held back since when. Events (a
restore that failed, a traceback) are never marked, so never folded. What is
still held back when the mount ends is written then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

FOLD_WINDOW_S = 60.0
_REMEMBERED = 1024  # distinct lines kept; the oldest are forgotten first


def _with_count(message: str, held_back: int, since_wall: float) -> str:
    times = "once" if held_back == 1 else f"{held_back} times"
    return (
        f"{message} (also {times} since {time.strftime('%H:%M:%S', time.localtime(since_wall))}, not logged)"
    )


class FoldRepeats(logging.Filter):
    """Lets the first of a run of identical marked lines through and holds back its repeats."""

    def __init__(self, window_s: float = FOLD_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = window_s, clock
        # line -> (written at, by the clock; written at, wall time; repeats held back since)
        self._written: dict[tuple[str, int, str], tuple[float, float, int]] = {}
        self._lock = threading.Lock()  # worker threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "fold_repeats", False) or record.exc_info:
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
            record.msg, record.args = _with_count(line[2], held_back, written_wall), ()
        return True

    def held_back(self) -> list[tuple[str, int, str]]:
        """(logger, level, line with its count) for each line whose repeats are still held back,
        forgetting them: what to write when the mount ends."""
        with self._lock:
            lines = [
                (name, level, _with_count(message, held_back, wall))
                for (name, level, message), (_, wall, held_back) in self._written.items()
                if held_back
            ]
            self._written.clear()
        return lines


def fold_repeats(handler: logging.Handler) -> None:
    """Give ``handler`` a :class:`FoldRepeats`, once."""
    if not any(isinstance(existing, FoldRepeats) for existing in handler.filters):
        handler.addFilter(FoldRepeats())


def write_held_back(handler: logging.Handler) -> None:
    """At the end of a mount: the repeats ``handler``'s filter still holds back, one line each."""
    for fold in [existing for existing in handler.filters if isinstance(existing, FoldRepeats)]:
        for name, level, line in fold.held_back():
            logging.getLogger(name).log(level, "%s", line)
