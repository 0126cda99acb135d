"""Whether any process still holds a file of this mount open, seen through ``/proc/*/fd``.

FUSE sends a FLUSH for every close(2) and cannot say whether it was the last
one: a writer that forked (its children inherit the descriptor) closes the
same file many times. By the time FLUSH arrives the closing process's
descriptor is already gone from its table, so if no ``/proc/*/fd`` link
points at the file any more, this close was the last one. ``readlink``
finds the candidates: it never calls into any filesystem. After ``umount -l``
the kernel names a descriptor of the detached mount by its path inside it
(``/restore/NAME``); such a candidate is confirmed by ``stat``ing it (this
mount answers) and comparing the device and inode, so that a file of the
same name elsewhere never counts. Blocking: run it in a worker thread. It
never raises; a process it cannot look into counts as not holding the file
(it cannot be a writer the mount's owner started).
"""

from __future__ import annotations

import os

PROC = "/proc"


def held_open(
    path: str, *, inside: str | None = None, identity: tuple[int, int] | None = None, proc: str = PROC
) -> bool:
    """True when some process has a descriptor open on ``path`` (an absolute path in this mount),
    or, with ``inside`` (the path within the mount) and ``identity`` (the mount's device and the
    file's inode), on that file of the mount once ``umount -l`` detached it."""
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return True  # cannot tell: the caller keeps the file open rather than ending it early
    for pid in pids:
        fd_directory = os.path.join(proc, pid, "fd")
        try:
            descriptors = os.listdir(fd_directory)
        except OSError:
            continue  # gone meanwhile, or not ours to look into
        for descriptor in descriptors:
            link = os.path.join(fd_directory, descriptor)
            try:
                target = os.readlink(link)
                if target == path:
                    return True
                if target == inside and identity is not None:
                    found = os.stat(link)
                    if (found.st_dev, found.st_ino) == identity:
                        return True
            except OSError:
                continue
    return False
