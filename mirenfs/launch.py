"""The commands' entry points (``mirenfs``, ``mount.mirenfs``): they load the command inside a
guard, so a Ctrl-C in the first 0.2 s, while Python is still importing it, ends the command
with the same one line as a Ctrl-C at any later moment, not with a traceback.

Nothing is imported here at module level but ``sys``: ``mirenfs/__init__`` loads its public
names lazily for this reason.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, as the commands exit when interrupted later on


def mirenfs() -> int:
    try:
        from mirenfs.cli import main

        return main(process_ends=True)
    except KeyboardInterrupt:  # before the command's own handling begins (or after it ends)
        return _interrupted("mirenfs")


def mount_mirenfs() -> int:
    try:
        from mirenfs.cli.mount_helper import main

        return main()
    except KeyboardInterrupt:
        return _interrupted("mount.mirenfs")


def _interrupted(program: str) -> int:
    sys.stderr.write(f"{program}: interrupted\n")
    return INTERRUPTED
