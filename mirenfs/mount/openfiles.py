"""Whether any process still holds a file of this mount open, seen through ``/proc/*/fd``.

FUSE sends a FLUSH for every close(2) and cannot say whether it was the last
one: a writer that forked (its children inherit the descriptor) closes the
same file many times. By the time FLUSH arrives the closing process's
descriptor is already gone from its table, so if no ``/proc/*/fd`` link
points at the file any more, this close was the last one. After ``umount -l``
the kernel names a descriptor of the detached mount by its path inside it
(``/restore/NAME``); such a candidate counts only when its ``fdinfo`` shows
this mount's id and the entry's inode, so that a file of the same name
elsewhere never does. Only descriptors open for writing count (a reader of
an entry's outcome adds nothing to its stream). It uses ``readlink`` and
``/proc`` reads alone: they never call into any filesystem (nor into this
mount). Blocking: run it in a worker thread. It never raises; a process it
cannot look into counts as not holding the file (it cannot be a writer the
mount's owner started).
"""

from __future__ import annotations

import os

PROC = "/proc"


def held_open(
    path: str, *, inside: str | None = None, identity: tuple[int, int] | None = None, proc: str = PROC
) -> bool:
    """True when some process has a descriptor open for writing on ``path`` (an absolute path in this mount),
    or, with ``inside`` (the path within the mount) and ``identity`` (the mount's id, as in
    mountinfo, and the file's inode), on that file of the mount once ``umount -l`` detached it."""
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
                if target != path and (target != inside or identity is None):
                    continue
                fields = _fdinfo(os.path.join(proc, pid, "fdinfo", descriptor))
                if target != path and _mount_and_inode(fields) != identity:
                    continue  # a file of that name in another mount
                if _open_for_writing(fields):
                    return True
            except OSError:
                continue
    return False


def _fdinfo(path: str) -> dict[str, str]:
    """The fields of ``/proc/PID/fdinfo/FD`` (raises OSError)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return {name: value.strip() for name, _, value in (line.partition(":") for line in f)}


def _mount_and_inode(fields: dict[str, str]) -> tuple[int, int] | None:
    """``(mnt_id, ino)`` of a descriptor, from its fdinfo fields."""
    try:
        return int(fields["mnt_id"]), int(fields["ino"])
    except (KeyError, ValueError):
        return None


def _open_for_writing(fields: dict[str, str]) -> bool:
    """Whether the descriptor can write: one that only reads (``cat restore/NAME`` for its
    outcome) never adds to the stream, so it must not keep a restore waiting. Unknown flags count
    as writing (the caller keeps the restore open rather than ending it early)."""
    try:
        flags = int(fields["flags"], 8)
    except (KeyError, ValueError):
        return True
    return flags & os.O_ACCMODE != os.O_RDONLY
