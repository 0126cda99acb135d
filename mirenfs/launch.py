"""The commands' entry points (``mirenfs``, ``mount.mirenfs``): they load the command inside a
guard, so a Ctrl-C in the first 0.2 s, while Python is still importing it, ends the command
with the same one line as a Ctrl-C at any later moment, not with a traceback.

Nothing is imported here at module level but ``sys`` and ``os``, which Python has loaded
already: ``mirenfs/__init__`` loads its public names lazily for this reason.
"""

from __future__ import annotations

import os
import sys

INTERRUPTED = 130  # 128 + SIGINT, as the commands exit when interrupted later on


CLOSED_AT_START = "closed_at_start"  # set on a stream whose descriptor was closed: /dev/null stands in


def _standard_descriptors_open() -> None:
    """A command started with descriptor 0, 1 or 2 closed (``>&-``, some job runners) gets
    /dev/null there (review C): Python left that stream None, so a restore that had completed
    exited 1 on its report; and the next file opened took the number, where anything written
    to that stream would have landed in it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        stream = open(fd, mode, closefd=False, errors="backslashreplace")  # noqa: SIM115
        setattr(stream, CLOSED_AT_START, True)  # a snapshot is never written to the stand-in
        setattr(sys, name, stream)


def mirenfs() -> int:
    _standard_descriptors_open()
    try:
        from mirenfs.cli import main

        return main(process_ends=True)
    except KeyboardInterrupt:  # before the command's own handling begins (or after it ends)
        return _interrupted("mirenfs")


def mount_mirenfs() -> int:
    _standard_descriptors_open()
    try:
        from mirenfs.cli.mount_helper import main

        return main()
    except KeyboardInterrupt:
        return _interrupted("mount.mirenfs")


def _interrupted(program: str) -> int:
    sys.stderr.write(f"{program}: interrupted\n")
    return INTERRUPTED
