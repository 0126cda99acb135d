"""A storm of one warning is one line in the mount's log, and the next says how many it held."""

from __future__ import annotations

import logging

import pytest

from mirenfs.cli.logfold import FoldRepeats, fold_repeats


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
            written.append(f"{record.levelname}: {record.getMessage()}")

    logger = logging.getLogger("t1_logfold")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers = [Collect()]
    return logger


def test_repeats_within_the_window_are_held_back_and_counted(
    logger: logging.Logger, written: list[str]
) -> None:
    clock = Clock()
    logger.handlers[0].addFilter(FoldRepeats(window_s=60, clock=clock))
    for _ in range(100):
        logger.warning("getattr: mirenfs has %d files open", 40)
    logger.warning("another disk's problem")
    logger.info("restore of pg installed")
    logger.info("restore of pg installed")  # information is never folded
    assert written == [
        "WARNING: getattr: mirenfs has 40 files open",
        "WARNING: another disk's problem",
        "INFO: restore of pg installed",
        "INFO: restore of pg installed",
    ]
    clock.now += 59.9
    logger.warning("getattr: mirenfs has %d files open", 40)
    assert len(written) == 4
    clock.now += 0.2  # a minute after the line that was written
    logger.warning("getattr: mirenfs has %d files open", 40)
    (line,) = written[4:]
    assert line.startswith("WARNING: getattr: mirenfs has 40 files open (also 100 times since ")
    assert line.endswith(", not logged)")
    clock.now += 61
    logger.error("getattr: mirenfs has %d files open", 40)  # another level is another line
    logger.warning("getattr: mirenfs has %d files open", 40)
    assert written[5:] == [
        "ERROR: getattr: mirenfs has 40 files open",
        "WARNING: getattr: mirenfs has 40 files open",
    ]


def test_one_repeat_says_once_and_the_filter_is_added_once(
    logger: logging.Logger, written: list[str]
) -> None:
    clock = Clock()
    handler = logger.handlers[0]
    handler.addFilter(FoldRepeats(window_s=10, clock=clock))
    fold_repeats(handler)
    assert len(handler.filters) == 1
    logger.warning("etcd at 127.0.0.1:2379 does not answer")
    logger.warning("etcd at 127.0.0.1:2379 does not answer")
    clock.now += 10
    logger.warning("etcd at 127.0.0.1:2379 does not answer")
    assert len(written) == 2 and "(also once since " in written[1]


def test_it_remembers_a_bounded_number_of_lines(logger: logging.Logger, written: list[str]) -> None:
    fold = FoldRepeats(window_s=60, clock=Clock())
    logger.handlers[0].addFilter(fold)
    for k in range(5000):
        logger.warning("disk d%d is gone", k)
    assert len(written) == 5000 and len(fold._written) <= 1024
