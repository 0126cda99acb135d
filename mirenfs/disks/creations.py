"""The disks a restore on this host created and has not finished: one empty file per disk id,
``<data-path>/mirenfs/creating.DISK-ID``.

A disk left ``provisioning`` with no image looks the same whoever is creating it. On a fleet
catalogue Miren writes such records too, while it provisions a disk, so the start-up sweep and
``mirenfs cleanup`` remove only the ones this journal names (trial W: they removed Miren's).
An entry is made right after the restore created the record and dropped once the disk is
provisioned or removed; a killed restore leaves it, and so does an undo the catalogue refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time

from mirenfs.disks.model import state_directory
from mirenfs.engine.image import fsync_directory, make_private_directory

log = logging.getLogger(__name__)

ENTRY_PREFIX = "creating."  # files beside the mount's own: no directory left behind when none is
_DISK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # an id never becomes another path


def _entry(data_path: str, disk_id: str, prefix: str = ENTRY_PREFIX) -> str | None:
    if not _DISK_ID.fullmatch(disk_id):
        return None
    return os.path.join(state_directory(data_path), prefix + disk_id)


def _noted(data_path: str, prefix: str) -> dict[str, str]:
    """Disk id to the path of each note of ``prefix`` in the state directory."""
    directory = state_directory(data_path)
    with contextlib.suppress(OSError):
        return {
            name.removeprefix(prefix): os.path.join(directory, name)
            for name in os.listdir(directory)
            if name.startswith(prefix) and _DISK_ID.fullmatch(name.removeprefix(prefix))
        }
    return {}


def _forget(entry: str | None) -> None:
    if entry is not None:
        with contextlib.suppress(OSError):
            os.unlink(entry)


def mark_creating(data_path: str, disk_id: str, *, unsaid: list[str] | None = None) -> bool:
    """Note that a restore created disk ``disk_id`` here; a failure only costs the sweep's help
    (the disk is then left for `disk remove`), so it is logged, not raised (or kept in ``unsaid``,
    for a caller that says it only if the disk is made after all). True if mirenfs's state
    directory was made for it (a failed restore removes it again, with its disk)."""
    entry = _entry(data_path, disk_id)
    if entry is None:
        log.warning("disk id %r cannot be noted as being created by a restore here", disk_id)
        return False
    directory = state_directory(data_path)
    made = not os.path.isdir(directory)
    try:
        make_private_directory(directory)
        os.close(os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        fsync_directory(directory)
    except OSError as exc:
        said = (
            f"cannot note that a restore is creating disk id {disk_id} in {directory} ({exc.strerror}): if "
            "the restore is killed, its disk is left for `mirenfs disk remove`"
        )
        if unsaid is None:
            log.warning("%s", said)
        else:
            unsaid.append(said)
    return made


DISK_CREATE = b"disk create\n"  # what an entry of `disk create` holds (a restore's is empty)


def hold_disk_create_note(data_path: str, disk_id: str, unsaid: list[str]) -> int | None:
    """Note that `disk create` is making disk ``disk_id`` here, and hold the note (its ``flock``)
    while it runs: a killed one left a ``provisioning`` disk no sweep removed (trial FI2 G1), and
    the sweep must tell a live one (formatting for minutes) from a dead one. The descriptor to
    close when done; None when the note cannot be made (then only the sweep's help is lost)."""
    entry = _entry(data_path, disk_id)
    if entry is None:
        return None
    try:
        return _held_note(data_path, entry, DISK_CREATE)
    except OSError as exc:
        # Said only if the disk is made after all: a read-only data path refuses both.
        unsaid.append(
            f"cannot note that disk id {disk_id} is being created in {state_directory(data_path)} "
            f"({exc.strerror}): if this command is killed, its disk is left for `mirenfs disk remove`"
        )
        return None


def _held_note(data_path: str, entry: str, content: bytes) -> int:
    """Make the note ``entry`` holding ``content``, locked (``flock``) until its descriptor closes."""
    make_private_directory(state_directory(data_path))
    fd = os.open(entry, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with contextlib.suppress(OSError):  # noted all the same: an empty entry is judged as a restore's
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, content)
    return fd


def _held_by_a_live_run(path: str, content: bytes) -> bool | None:
    """Whether the note at ``path`` holding ``content`` is held by a run at work; None when there is
    no such note (none, or another content)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.read(fd, len(content)) != content:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


def made_by_disk_create(data_path: str, disk_id: str) -> bool | None:
    """For a noted disk: True if `disk create` noted it and is gone, False if a restore noted it,
    None if a `disk create` still runs (holds the note)."""
    entry = _entry(data_path, disk_id)
    held = None if entry is None else _held_by_a_live_run(entry, DISK_CREATE)
    return None if held else held is not None


DISK_REMOVE = b"disk remove\n"
REMOVAL_PREFIX = "removing."  # `disk remove` at work: its disk is `deleting` until the records go


def hold_removal_note(data_path: str, disk_id: str) -> int | None:
    """Note that `disk remove` is removing disk ``disk_id``, held (``flock``) while it runs: a
    killed one left the disk `deleting` for good, and cleanup said nothing (trial FI2 G2). The
    descriptor to close when done; None if the note cannot be made (only the sweep's help is lost)."""
    entry = _entry(data_path, disk_id, REMOVAL_PREFIX)
    if entry is None:
        return None
    try:
        return _held_note(data_path, entry, DISK_REMOVE)
    except OSError:
        return None


def forget_removal_note(data_path: str, disk_id: str) -> None:
    _forget(_entry(data_path, disk_id, REMOVAL_PREFIX))


def removals_left(data_path: str) -> set[str]:
    """The disk ids whose `disk remove` was killed: noted, and nobody holds the note."""
    noted = _noted(data_path, REMOVAL_PREFIX)
    return {disk_id for disk_id, path in noted.items() if _held_by_a_live_run(path, DISK_REMOVE) is False}


def unmark_creating(data_path: str, disk_id: str) -> None:
    """The restore of ``disk_id`` is over: its disk is provisioned, or removed."""
    _forget(_entry(data_path, disk_id))


def creation_noted_before(data_path: str, disk_id: str, *, seconds_ago: float) -> bool:
    """Whether the entry of ``disk_id`` was made more than ``seconds_ago`` (False if none)."""
    entry = _entry(data_path, disk_id)
    try:
        return entry is not None and os.stat(entry).st_mtime < time.time() - seconds_ago
    except OSError:
        return False


def marked_creating(data_path: str) -> set[str]:
    """The disk ids restores (and `disk create` runs) on this host created and did not finish."""
    return set(_noted(data_path, ENTRY_PREFIX))
