"""A storm of one line that every request writes is one line in the mount's log, and the next
says how many it held; events and tracebacks are never folded."""

from __future__ import annotations

import logging

import pytest

from mirenfs.cli.logfold import FoldRepeats, fold_repeats, write_held_back
from mirenfs.errors import FOLDED_WHEN_REPEATED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def written() -> list[str]:
    return []


@pytest.fixture
def logger(written: list[str]) -> logging.Logger:
    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            traceback = " +traceback" if record.exc_info else ""
            written.append(f"{record.levelname}: {record.getMessage()}{traceback}")

    logger = logging.getLogger("t1_logfold")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers = [Collect()]
    return logger


def storm(logger: logging.Logger, times: int = 1, level: int = logging.WARNING) -> None:
    for _ in range(times):
        logger.log(level, "getattr: mirenfs has %d files open", 40, extra=FOLDED_WHEN_REPEATED)


def test_repeats_within_the_window_are_held_back_and_counted(
    logger: logging.Logger, written: list[str]
) -> None:
    clock = Clock()
    logger.handlers[0].addFilter(FoldRepeats(window_s=60, clock=clock))
    storm(logger, 100)
    logger.warning("another disk's problem", extra=FOLDED_WHEN_REPEATED)
    assert written == ["WARNING: getattr: mirenfs has 40 files open", "WARNING: another disk's problem"]
    clock.now += 59.9
    storm(logger)
    assert len(written) == 2
    clock.now += 0.2  # a minute after the line that was written
    storm(logger)
    (line,) = written[2:]
    assert line.startswith("WARNING: getattr: mirenfs has 40 files open (also 100 times since ")
    assert line.endswith(", not logged)")
    clock.now += 61
    storm(logger, level=logging.ERROR)  # another level is another line
    storm(logger)
    assert written[3:] == [
        "ERROR: getattr: mirenfs has 40 files open",
        "WARNING: getattr: mirenfs has 40 files open",
    ]


def test_events_and_tracebacks_are_never_folded(logger: logging.Logger, written: list[str]) -> None:
    """A restore that failed is an event, each one a line (the README says so), and a traceback
    must never be lost to an earlier one with the same words."""
    logger.handlers[0].addFilter(FoldRepeats(window_s=60, clock=Clock()))
    for _ in range(3):
        logger.warning("restore of disk bad from restore/bad.mirn by uid 0 failed: truncated")
    for _ in range(2):
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            logger.exception("unexpected error in read; answering EIO", extra=FOLDED_WHEN_REPEATED)
    assert written == 3 * [
        "WARNING: restore of disk bad from restore/bad.mirn by uid 0 failed: truncated"
    ] + 2 * ["ERROR: unexpected error in read; answering EIO +traceback"]


def test_what_is_held_back_when_the_mount_ends_is_written(logger: logging.Logger, written: list[str]) -> None:
    clock = Clock()
    handler = logger.handlers[0]
    handler.addFilter(FoldRepeats(window_s=10, clock=clock))
    fold_repeats(handler)
    assert len(handler.filters) == 1  # added once
    storm(logger, 2)
    logger.warning("etcd at 127.0.0.1:2379 does not answer", extra=FOLDED_WHEN_REPEATED)  # never repeated
    write_held_back(handler)
    assert len(written) == 3 and written[2].startswith(
        "WARNING: getattr: mirenfs has 40 files open (also once since "
    )
    write_held_back(handler)  # said once
    assert len(written) == 3


def test_it_remembers_a_bounded_number_of_lines(logger: logging.Logger, written: list[str]) -> None:
    fold = FoldRepeats(window_s=60, clock=Clock())
    logger.handlers[0].addFilter(fold)
    for k in range(5000):
        logger.warning("disk d%d is gone", k, extra=FOLDED_WHEN_REPEATED)
    assert len(written) == 5000 and len(fold._written) <= 1024
