"""Whether any process still holds a file of this mount open, seen through ``/proc/*/fd``.

FUSE sends a FLUSH for every close(2) and cannot say whether it was the last
one: a writer that forked (its children inherit the descriptor) closes the
same file many times. By the time FLUSH arrives the closing process's
descriptor is already gone from its table, so if no ``/proc/*/fd`` link
points at the file any more, this close was the last one. Only ``readlink``
is used: it never calls back into this mount. Blocking: run it in a worker
thread. It never raises; a process it cannot look into counts as not
holding the file (it cannot be a writer the mount's owner started).
"""

from __future__ import annotations

import os

PROC = "/proc"


def held_open(path: str, *, proc: str = PROC) -> bool:
    """True when some process has a descriptor open on ``path`` (an absolute path in this mount)."""
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
            try:
                if os.readlink(os.path.join(fd_directory, descriptor)) == path:
                    return True
            except OSError:
                continue
    return False
