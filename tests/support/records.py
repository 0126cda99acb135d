"""A writer of fixed-size checksummed records, as an application keeps writing to a disk in use.

Run as a process (``python records.py FILE SUMMARY``, stdlib only, so it can
run inside another mount namespace through ``nsenter``): it appends one
record after another to FILE with an ``fsync`` after each, until SIGTERM,
then writes a JSON summary (records written, the longest append+fsync, which
is how long a freeze held it) to SUMMARY. :func:`check_records` tells whether
a copy of FILE holds an unbroken prefix of those records.

Nothing here mounts or needs mirenfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECORD = 4096
_HEAD = struct.Struct(">Qd")  # sequence number, wall time
_DIGEST = 32
PACE_S = 0.002  # between appends: a busy application, without starving two cores


def record(sequence: int) -> bytes:
    """Record ``sequence``: its number, a time, filler that depends on the number, and a SHA-256."""
    head = _HEAD.pack(sequence, time.time())
    filler = (b"%016d" % sequence) * ((RECORD - _DIGEST - len(head)) // 16 + 1)
    body = (head + filler)[: RECORD - _DIGEST]
    return body + hashlib.sha256(body).digest()


def record_sequence(data: bytes) -> int | None:
    """The sequence number of a whole, intact record, or None."""
    if len(data) != RECORD:
        return None
    body, digest = data[: RECORD - _DIGEST], data[RECORD - _DIGEST :]
    if hashlib.sha256(body).digest() != digest:
        return None
    sequence: int = _HEAD.unpack_from(body)[0]
    return sequence


@dataclass(frozen=True)
class RecordCheck:
    records: int  # the unbroken prefix: records 0 .. records-1, each intact and in place
    problem: str | None  # what follows the prefix when it is not allowed (None: nothing wrong)


def check_records(data: bytes, *, torn_tail_allowed: bool = False) -> RecordCheck:
    """Whether ``data`` (the records file as a copy holds it) is an unbroken prefix of records.

    After a frozen copy the file ends on a whole record. A crash-consistent
    copy may end in a torn or zeroed last record (``torn_tail_allowed``);
    anything after the prefix that is not that is a problem.
    """
    count = 0
    while (count + 1) * RECORD <= len(data) and record_sequence(
        data[count * RECORD : (count + 1) * RECORD]
    ) == count:
        count += 1
    rest = data[count * RECORD :]
    if not rest:
        return RecordCheck(count, None)
    if torn_tail_allowed and len(rest) <= RECORD:
        return RecordCheck(count, None)
    return RecordCheck(count, f"{len(rest)} bytes after record {count - 1} are not the next record")


def main() -> None:
    target, summary = sys.argv[1], sys.argv[2]
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sequence, longest, started = 0, 0.0, time.monotonic()
    while not stopping:
        began = time.monotonic()
        os.write(fd, record(sequence))
        os.fsync(fd)
        longest = max(longest, time.monotonic() - began)
        sequence += 1
        time.sleep(PACE_S)
    os.close(fd)
    report = {"records": sequence, "longest_stall_s": longest, "seconds": time.monotonic() - started}
    Path(summary).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
