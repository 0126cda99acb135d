"""Point-in-time copies of disks in use (issue 12): what a snapshot of a disk reads, and how
consistent that is.

A disk not in use is read from its image (``offline``). A disk in use (a loop
device backs its image, or the store says ``attached``) is read from a copy
taken at one instant:

- ``frozen``: the filesystems mounted from its loop devices, in any mount
  namespace, are frozen (``FIFREEZE``), the image is cloned into the clone
  directory (``FICLONE``: milliseconds, extents are shared) or, where the data
  path cannot reflink, copied sparsely if that fits the freeze budget; then
  they are thawed (``FITHAW``). The copy holds a clean filesystem.
- ``crash-consistent``: no mounted filesystem was found (the device is used
  raw, or by a VM) or it could not be frozen: the image is cloned without a
  freeze, like pulling the power.
- ``live``: no copy could be made and the operator allowed reading the
  moving image (``CopyPolicy.live_reads``); otherwise :class:`PointInTimeError`.

Copies are anonymous files (``O_TMPFILE``) in the clone directory, so their
space returns when the last descriptor closes, also when the process is
killed; where ``O_TMPFILE`` is missing a named ``*.clone`` file is unlinked as
soon as the copy is made, and :func:`sweep_leftovers` removes any left by a
crash in between.

This module must never leave a filesystem frozen. Every freeze is thawed in a
``finally``; a watchdog process (armed before the freeze, holding its own
descriptors on the frozen filesystems, deaf to SIGTERM/SIGINT/SIGHUP) thaws
them when the freeze outlives the budget or when this process dies (its pipe
reaches EOF); and a freeze record in the clone directory lets the next start
thaw what a kill of both processes left (:func:`sweep_leftovers`). Nothing is
written to a frozen filesystem, and nothing but the copy runs while frozen.

Blocking code (ioctls, copies, a child process): call it from worker threads;
it never imports trio or pyfuse3. (The tests hold a freeze open, to test the
watchdog and kills mid-copy, from outside: ``tests/support/daemon_hooks``.)
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import logging
import os
import secrets
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from mirenfs.disks.live import MountedFilesystem, filesystems_on, loop_devices_backing, open_mount
from mirenfs.engine.image import ImageIdentity, OpenImage, data_extents, make_private_directory
from mirenfs.errors import LiveCheckError, MirenfsError, PointInTimeError

log = logging.getLogger(__name__)

# ioctl numbers (linux/fs.h): _IOWR('X', 119/120, int), _IOW(0x94, 9, int), _IOW(0x94, 13, struct
# file_clone_range), _IOR/_IOW('f', 1/2, long).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FICLONE = 0x40049409
FICLONERANGE = 0x4020940D
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000

DEFAULT_FREEZE_BUDGET_S = 3.0
WATCHDOG_START_S = 10.0  # a Python interpreter starts in ~20 ms here; nothing is frozen yet
WATCHDOG_GRACE_S = 0.5  # the watchdog thaws this long after the budget: the copy stops at the budget
FREEZE_BUSY_WAIT_S = 1.0  # another freezer's freeze (a backup of the same disk) lasts milliseconds
CALIBRATION_BYTES = 32 << 20  # copied before a freeze to measure how fast a copy goes
ESTIMATE_MARGIN = 1.25  # a copy under freeze must be estimated this much inside the budget
FREEZE_OVERHEAD_S = 0.1  # what freezing and thawing add to a copy (a journal flush: ~40 ms seen here)
COPY_PIECE = 8 << 20  # the budget is checked after each piece of a copy under freeze
SPACE_MARGIN = 64 << 20  # free space a copy must leave in the clone directory
PROBE_BYTES = 64 << 10  # a reflink is tried on this much before anything is frozen
CLONE_SUFFIX = ".clone"
RECORD_PREFIX = "freeze-"
RECORD_SUFFIX = ".record"
REFLINK_HINT = "keep the data path on XFS or btrfs (reflinks)"
LIVE_HINT = "or allow reading the moving image (mount -o live_reads, backup --live)"
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}

# One freeze at a time in this process: two snapshots of one disk would otherwise collide (EBUSY).
_FREEZE_LOCK = threading.Lock()
_record_counter = iter(range(1, 1 << 62))


class Consistency(enum.StrEnum):
    """How a snapshot's bytes were taken; ``user.mirenfs.consistency`` on ``NAME.mirn``."""

    OFFLINE = "offline"  # the disk was not in use: its image itself
    FROZEN = "frozen"  # copied under a filesystem freeze: the filesystem is clean
    CRASH_CONSISTENT = "crash-consistent"  # copied at one instant without a freeze
    LIVE = "live"  # read from the moving image, because the operator allowed it


@dataclass(frozen=True)
class CopyPolicy:
    """What a mount (or ``mirenfs backup``) may do to copy a disk in use.

    ``freeze_budget_s`` bounds how long a filesystem may stay frozen (0: never
    freeze); ``live_reads`` allows reading the moving image when no copy can be made.
    """

    freeze_budget_s: float = DEFAULT_FREEZE_BUDGET_S
    live_reads: bool = False


@dataclass
class PointInTime:
    """What a snapshot of one disk reads, and how it was taken. Owns ``image.fd``: :meth:`close` it."""

    name: str
    image: OpenImage  # the image itself (offline, live) or the copy, whose identity is its own
    identity: ImageIdentity  # the disk image's identity at that instant: its mtime is the header's
    consistency: Consistency
    method: str  # "image", "reflink", "sparse copy"
    frozen_s: float | None = None  # how long writers to the disk's filesystem were held
    detail: str = ""  # which filesystem, or why no freeze
    warning: str | None = None  # something the operator should hear about this copy

    @property
    def is_copy(self) -> bool:
        return self.method != "image"

    def describe(self) -> str:
        """One clause for the log and the CLI: ``frozen (reflink under freeze of …; frozen 31.0 ms)``."""
        parts = [self.detail] if self.detail else []
        if self.frozen_s is not None:
            parts.append(f"frozen {self.frozen_s * 1000:.1f} ms")
        return f"{self.consistency} ({'; '.join(parts)})" if parts else str(self.consistency)

    def close(self) -> None:
        if self.image.fd >= 0:
            os.close(self.image.fd)
            self.image.fd = -1


def take_point_in_time(
    name: str, image_path: str, *, attached: bool, clone_directory: str, policy: CopyPolicy
) -> PointInTime:
    """Open what a snapshot of disk ``name`` must read: its image, or a point-in-time copy of it.

    Raises :class:`PointInTimeError` (EBUSY) when the disk is in use, no copy
    can be made and ``policy.live_reads`` is off.
    """
    warning = None
    try:
        loops = loop_devices_backing(image_path)
    except LiveCheckError as exc:
        loops = []
        warning = f"cannot tell whether disk {name} is in use ({exc})"
    if not loops and not attached:
        image = OpenImage.open(image_path)
        if warning:  # read anyway, as before: the pass checks the image did not change under it
            warning += "; its image is read as it is and checked unchanged afterwards"
        return PointInTime(name, image, image.identity, Consistency.OFFLINE, "image", warning=warning)
    in_use = f"/dev/{loops[0]} is backed by its image" if loops else "its record says it is attached"
    try:
        return _copy(name, image_path, loops, in_use, clone_directory, policy)
    except PointInTimeError as exc:
        if not policy.live_reads:
            raise
        image = OpenImage.open(image_path)
        return PointInTime(
            name,
            image,
            image.identity,
            Consistency.LIVE,
            "image",
            detail=f"read from the moving image, as allowed; {in_use}",
            warning=(
                f"disk {name} is in use ({in_use}) and is read from its moving image, as live reads are "
                f"allowed: no point-in-time copy of it can be taken ({exc.why})"
            ),
        )


def _copy(
    name: str, image_path: str, loops: list[str], in_use: str, clone_directory: str, policy: CopyPolicy
) -> PointInTime:
    try:
        filesystems = filesystems_on(loops) if loops else []
    except LiveCheckError as exc:
        log.warning("disk %s: cannot look for filesystems mounted from its loop devices (%s)", name, exc)
        filesystems = []
    make_private_directory(clone_directory)
    source = OpenImage.open(image_path)
    try:
        copy_fd, taken = _copy_into(name, source, loops, filesystems, clone_directory, policy, in_use)
    except OSError as exc:
        why = f"its copy in {clone_directory} failed ({exc.strerror})"
        raise _refused(name, why, f"check {clone_directory}") from None
    finally:
        source.close()
    copy = OpenImage(image_path, copy_fd, ImageIdentity.from_stat(os.fstat(copy_fd)))
    if copy.size != taken.identity.size:  # review: its header would claim another size than its data
        copy.close()
        why = f"its image changed size while its copy was made ({taken.identity.size} to {copy.size} bytes)"
        raise _refused(name, why, "try again")
    return PointInTime(
        name, copy, taken.identity, taken.consistency, taken.method, taken.frozen_s, taken.detail
    )


def _copy_into(
    name: str,
    source: OpenImage,
    loops: list[str],
    filesystems: list[MountedFilesystem],
    clone_directory: str,
    policy: CopyPolicy,
    in_use: str,
) -> tuple[int, _Taken]:
    with _CopyFile(clone_directory, name) as target:
        reflink_problem = _reflink_problem(source.fd, target.fd, source.size)
        why_no_freeze = _why_no_freeze(loops, filesystems, policy)
        if why_no_freeze is None:
            if reflink_problem is None:
                taken = _frozen_reflink(name, source, target, filesystems, policy)
            else:
                taken = _frozen_sparse_copy(
                    name, source, target, filesystems, policy, reflink_problem, clone_directory
                )
        elif reflink_problem is None:
            identity = ImageIdentity.from_stat(os.fstat(source.fd))
            _reflink(source.fd, target.fd, name)
            taken = _Taken(
                identity, Consistency.CRASH_CONSISTENT, "reflink", None, f"reflink; {why_no_freeze}"
            )
        else:
            why = f"{in_use}, {why_no_freeze}, and {reflink_problem}"
            raise _refused(name, why, f"{_freeze_hint(why_no_freeze)}, {REFLINK_HINT}")
        return target.keep(taken.identity), taken


@dataclass(frozen=True)
class _Taken:
    identity: ImageIdentity
    consistency: Consistency
    method: str
    frozen_s: float | None
    detail: str


_FREEZE_OFF = "freezing is off (freeze budget 0)"
_FREEZE_NEEDS_ROOT = "freezing a filesystem needs root"


def _why_no_freeze(loops: list[str], filesystems: list[MountedFilesystem], policy: CopyPolicy) -> str | None:
    if not loops:
        return "no loop device backs its image, so there is no filesystem mirenfs can freeze"
    if not filesystems:
        return "no mounted filesystem was found on its loop devices (used raw, or by a VM)"
    if policy.freeze_budget_s <= 0:
        return _FREEZE_OFF
    if os.geteuid() != 0:
        return _FREEZE_NEEDS_ROOT
    return None


def _freeze_hint(why_no_freeze: str) -> str:
    """What would let the copy be frozen: the fix for the reason it was not."""
    if why_no_freeze == _FREEZE_OFF:
        return "allow a freeze (-o freeze_budget=SECONDS, backup --freeze-budget SECONDS)"
    if why_no_freeze == _FREEZE_NEEDS_ROOT:
        return "run it as root"
    return "mount the disk's filesystem where mirenfs can freeze it"


def _frozen_reflink(
    name: str, source: OpenImage, target: _CopyFile, filesystems: list[MountedFilesystem], policy: CopyPolicy
) -> _Taken:
    where = "; ".join(fs.describe() for fs in filesystems)
    try:
        with _Freeze(filesystems, policy.freeze_budget_s, target.directory) as freeze:
            identity = ImageIdentity.from_stat(os.fstat(source.fd))
            _reflink(source.fd, target.fd, name)
    except _CannotFreeze as exc:
        identity = ImageIdentity.from_stat(os.fstat(source.fd))
        _reflink(source.fd, target.fd, name)
        log.warning("disk %s: %s; its copy is crash-consistent", name, exc)
        return _Taken(
            identity, Consistency.CRASH_CONSISTENT, "reflink", None, f"reflink without freeze: {exc}"
        )
    if not freeze.held_throughout:
        log.warning(
            "disk %s: the freeze of %s was lifted before the reflink finished (after %.0f ms, by the "
            "watchdog or an administrator); the copy is crash-consistent",
            name,
            where,
            freeze.duration_s * 1000,
        )
        return _Taken(
            identity,
            Consistency.CRASH_CONSISTENT,
            "reflink",
            freeze.duration_s,
            "reflink; freeze lifted early",
        )
    return _Taken(
        identity, Consistency.FROZEN, "reflink", freeze.duration_s, f"reflink under freeze of {where}"
    )


def _frozen_sparse_copy(
    name: str,
    source: OpenImage,
    target: _CopyFile,
    filesystems: list[MountedFilesystem],
    policy: CopyPolicy,
    reflink_problem: str,
    clone_directory: str,
) -> _Taken:
    """Copy the image's data under freeze if the measured copy speed says it fits the budget."""
    budget = policy.freeze_budget_s
    extents = data_extents(source.fd, source.size)
    data = sum(end - start for start, end in extents)
    copying = f"{reflink_problem}, and copying its {data / (1 << 20):.1f} MiB of data"
    budget_hint = f"raise the budget (-o freeze_budget=SECONDS, backup --freeze-budget), {REFLINK_HINT}"
    free = _free_bytes(clone_directory)
    if free is not None and free < data + SPACE_MARGIN:
        needed = (data + SPACE_MARGIN) / (1 << 20)
        why = (
            f"{copying} needs {needed:.0f} MiB free in {clone_directory} (its data and "
            f"{SPACE_MARGIN >> 20} MiB to spare), and {free >> 20} MiB are"
        )
        raise _refused(name, why, f"free space there, {REFLINK_HINT}")
    copy_s = _estimate_copy_seconds(source.fd, target.fd, extents, data)
    if (copy_s + FREEZE_OVERHEAD_S) * ESTIMATE_MARGIN > budget:
        # Measured once more, on the next data, and the faster taken: one stall of a busy host
        # during the sample is not the copy's speed (trial T21 F4: 20 to 60 times the copies that
        # followed, and a nightly tar lost the disk to EBUSY). A slow disk is slow both times.
        again = _estimate_copy_seconds(source.fd, target.fd, extents, data, skip=CALIBRATION_BYTES)
        copy_s = min(copy_s, again)
    estimate = (copy_s + FREEZE_OVERHEAD_S) * ESTIMATE_MARGIN
    if estimate > budget:
        why = (
            f"{copying} under freeze would take about {estimate:.1f} s, over the freeze budget of "
            f"{budget:g} s"
        )
        raise _refused(name, why, budget_hint)
    where = "; ".join(fs.describe() for fs in filesystems)
    try:
        with _Freeze(filesystems, budget, target.directory) as freeze:
            identity = ImageIdentity.from_stat(os.fstat(source.fd))
            extents = data_extents(source.fd, source.size)  # the freeze wrote the filesystem's last changes
            complete = _copy_extents(
                source.fd, target.fd, extents, source.size, deadline=freeze.started + budget
            )
    except _CannotFreeze as exc:
        raise _refused(name, f"{reflink_problem}, and {exc}", REFLINK_HINT) from None
    except OSError as exc:
        why = f"its copy under freeze failed ({exc.strerror})"
        raise _refused(name, why, f"free space in {clone_directory}") from None
    if not complete:
        why = (
            f"{copying} under freeze took longer than the freeze budget of {budget:g} s (stopped and "
            f"thawed after {freeze.duration_s:.1f} s)"
        )
        raise _refused(name, why, budget_hint)
    if not freeze.held_throughout:
        lifted = freeze.duration_s
        why = f"the freeze of its filesystem was lifted before its copy was made (after {lifted:.1f} s)"
        raise _refused(name, why, "try again")
    return _Taken(
        identity, Consistency.FROZEN, "sparse copy", freeze.duration_s, f"sparse copy under freeze of {where}"
    )


# --- the copy file ---


class _CopyFile:
    """Where a copy goes: an anonymous file in the clone directory (a named one, unlinked once made,
    where ``O_TMPFILE`` is missing). Discarded on any failure."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.path: str | None = None
        try:
            self.fd = os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise _space_error(name, directory, exc) from None
            self.path = os.path.join(directory, f"{name}.{os.getpid()}.{secrets.token_hex(4)}{CLONE_SUFFIX}")
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc2:
                raise _space_error(name, directory, exc2) from None

    def __enter__(self) -> _CopyFile:
        return self

    def keep(self, identity: ImageIdentity) -> int:
        """The copy is whole: give it the image's mtime (the header's timestamp) and hand it over."""
        os.utime(self.fd, ns=(identity.mtime_ns, identity.mtime_ns))
        self._unlink()
        fd, self.fd = self.fd, -1
        return fd

    def __exit__(self, *exc_info: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._unlink()

    def _unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


def _space_error(name: str, directory: str, exc: OSError) -> PointInTimeError:
    return _refused(name, f"a copy cannot be created in {directory} ({exc.strerror})", "check that directory")


def _refused(name: str, why: str, what_to_do: str) -> PointInTimeError:
    """The one sentence of a refusal: the disk, why, what to do (and that live reads are the way out)."""
    return PointInTimeError(
        f"disk {name} is in use and no point-in-time copy of it can be taken: {why}; {what_to_do}, "
        f"{LIVE_HINT}",
        why,
    )


def _free_bytes(directory: str) -> int | None:
    try:
        info = os.statvfs(directory)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


# --- reflinks ---


def _reflink_problem(source_fd: int, target_fd: int, size: int) -> str | None:
    """Why the image cannot be reflinked into the copy file, or None: tried on its first bytes,
    before anything is frozen."""
    _match_nocow(source_fd, target_fd)
    try:
        if size <= PROBE_BYTES:
            fcntl.ioctl(target_fd, FICLONE, source_fd)
        else:
            fcntl.ioctl(target_fd, FICLONERANGE, struct.pack("qQQQ", source_fd, 0, PROBE_BYTES, 0))
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            reason = "across filesystems" if exc.errno == errno.EXDEV else exc.strerror
            return f"the data path cannot reflink the image into the clone directory ({reason})"
        raise
    finally:
        os.ftruncate(target_fd, 0)
    return None


def _match_nocow(source_fd: int, target_fd: int) -> None:
    """btrfs refuses to clone a no-CoW file (``chattr +C``) into a CoW one: match the flag."""
    with contextlib.suppress(OSError):
        flags = struct.unpack("l", fcntl.ioctl(source_fd, FS_IOC_GETFLAGS, bytes(8)))[0]
        if flags & FS_NOCOW_FL:
            fcntl.ioctl(target_fd, FS_IOC_SETFLAGS, struct.pack("l", FS_NOCOW_FL))


def _reflink(source_fd: int, target_fd: int, name: str) -> None:
    try:
        fcntl.ioctl(target_fd, FICLONE, source_fd)
    except OSError as exc:
        raise _refused(name, f"its reflink failed ({exc.strerror})", "free space on the data path") from None


# --- sparse copies ---


def _estimate_copy_seconds(
    source_fd: int, target_fd: int, extents: list[tuple[int, int]], data: int, *, skip: int = 0
) -> float:
    """How long copying ``data`` bytes takes, measured on up to CALIBRATION_BYTES of them, after
    the first ``skip`` bytes of data (from the start again when there are fewer)."""
    if data == 0:
        return 0.0
    if skip >= data:
        skip = 0
    sample: list[tuple[int, int]] = []
    left = min(data - skip, CALIBRATION_BYTES)
    for start, end in extents:
        if left <= 0:
            break
        if skip >= end - start:
            skip -= end - start
            continue
        start, skip = start + skip, 0
        stop = min(end, start + left)
        sample.append((start, stop))
        left -= stop - start
    began = time.monotonic()
    _copy_extents(source_fd, target_fd, sample, 0, deadline=None)
    elapsed = time.monotonic() - began
    os.ftruncate(target_fd, 0)
    copied = sum(end - start for start, end in sample)
    return data * max(elapsed, 1e-6) / copied


def _copy_extents(
    source_fd: int, target_fd: int, extents: list[tuple[int, int]], size: int, *, deadline: float | None
) -> bool:
    """Copy the data extents into a file of ``size`` bytes (holes stay holes); False when the
    deadline passed first."""
    os.ftruncate(target_fd, size)
    in_kernel = True
    for start, end in extents:
        position = start
        while position < end:
            length = min(COPY_PIECE, end - position)
            if in_kernel:
                try:
                    copied = os.copy_file_range(source_fd, target_fd, length, position, position)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                    in_kernel = False
                    continue
            else:
                data = os.pread(source_fd, length, position)
                copied = len(data)
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(target_fd, view, position + copied - len(view)) :]
            if copied == 0:
                raise OSError(errno.EIO, "the image became shorter while it was copied")
            position += copied
            if deadline is not None and time.monotonic() > deadline:
                return False
    return True


# --- freezing ---


class _CannotFreeze(Exception):
    """No filesystem was frozen (busy, refused): the caller decides what to do without a freeze."""


# The watchdog, a separate interpreter that outlives this process. It hears "F<i>" before filesystem
# i is frozen, "U<i>" when that freeze failed, "done" once all are thawed. It thaws the ones it was
# told of when the pipe ends (this process died) or LIMIT seconds after the last "F" (it stalled),
# and never touches a filesystem it was not told of: that may be someone else's freeze. Once all
# it was told of are thawed it removes the freeze record: a next start must not thaw a freeze
# made since by someone else on the strength of a record whose freeze is over.
_WATCHDOG = r"""
import errno, fcntl, os, select, signal, sys, time
for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
    signal.signal(number, signal.SIG_IGN)
limit, record, fds = float(sys.argv[1]), sys.argv[3], [int(fd) for fd in sys.argv[4:]]
os.write(1, b"armed\n")
frozen, deadline, pending, why = set(), None, b"", None
while why is None:
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
        why = "the freeze outlived its limit of %.1f s" % limit
    elif select.select([0], [], [], left)[0]:
        data = os.read(0, 256)
        if not data:
            why = "mirenfs (pid %s) ended while the filesystem was frozen" % sys.argv[2]
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line == b"done":
                sys.exit(0)
            if line[:1] == b"F":
                frozen.add(int(line[1:]))
                deadline = time.monotonic() + limit
            elif line[:1] == b"U":
                frozen.discard(int(line[1:]))
                deadline = deadline if frozen else None
thawed, stuck = [], 0
for index in sorted(frozen):
    try:
        fcntl.ioctl(fds[index], 0xC0045878, 0)
        try:
            thawed.append(os.readlink("/proc/self/fd/%d" % fds[index]))
        except OSError:
            thawed.append("(a filesystem it was told of)")
    except OSError as exc:
        stuck += exc.errno != errno.EINVAL  # EINVAL: not frozen (any more)
if not stuck:
    try:
        os.unlink(record)
    except OSError:
        pass
if thawed:  # as the mount's log lines are (trial X: no time, no level, no filesystem named)
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + ",%03d" % (int(now * 1000) % 1000)
    sys.stderr.write(
        "%s mirenfs[%d]: WARNING: mirenfs thaw watchdog: %s; thawed the filesystem mounted at %s\n"
        % (stamp, os.getpid(), why, ", ".join(thawed))
    )
sys.exit(3 if thawed else 2)
"""


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is over, then arrive as they would have.

    Python raises a signal's exception in the main thread between any two bytecodes: one
    right after ``FIFREEZE`` returned, before the filesystem was noted as frozen, left it
    frozen for good (the thaw, and the watchdog told "done", knew of no freeze). Other
    threads are never interrupted so, and need nothing held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous: dict[int, signal.Handlers | signal._HANDLER] = {}
    try:
        for held in _HELD_SIGNALS:
            if signal.getsignal(held) is not None:  # None: set from C, could not be put back: left be
                previous[held] = signal.signal(held, lambda received, _frame: arrived.append(received))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for received in arrived:
            os.kill(os.getpid(), received)  # delivered now, to the handler it was meant for


class _Freeze:
    """The filesystems of one disk frozen for one copy, and thawed on every path.

    Entering arms the watchdog and writes the freeze record, then freezes;
    leaving thaws, stands the watchdog down and removes the record.
    ``held_throughout`` is False when the freeze was lifted before this
    process thawed it (the watchdog's limit, or an administrator).
    """

    def __init__(self, filesystems: list[MountedFilesystem], budget_s: float, record_directory: str) -> None:
        self.filesystems = filesystems
        self.limit_s = budget_s + WATCHDOG_GRACE_S
        self.record_directory = record_directory
        self.started = 0.0
        self.duration_s = 0.0
        self.held_throughout = False
        self._fds: list[int] = []
        self._frozen: list[int] = []
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._record: str | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Freeze:
        _FREEZE_LOCK.acquire()
        try:
            self._open()
            for fd in self._fds:
                _syncfs(fd)  # written now, while writers run, rather than by the freeze while they wait
            # Named first (the watchdog removes it once all is thawed), written once a watchdog
            # stands by: a SIGKILL while the watchdog starts must leave no record of a freeze
            # that never was, which a later `cleanup` would honour by thawing someone else's.
            self._record = self._record_path()
            self._arm_watchdog()
            self._write_record(self._record)
            self._freeze_all()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release()

    def _open(self) -> None:
        for filesystem in self.filesystems:
            try:
                self._fds.append(open_mount(filesystem))
            except OSError as exc:
                raise _CannotFreeze(f"cannot reach {filesystem.describe()}: {exc}") from None

    def _record_path(self) -> str:
        return os.path.join(
            self.record_directory, f"{RECORD_PREFIX}{os.getpid()}-{next(_record_counter)}{RECORD_SUFFIX}"
        )

    def _write_record(self, path: str) -> None:
        """Which filesystems this process may leave frozen, for the next start to thaw if it is killed."""
        text = "".join(f"{fs.device}\n" for fs in self.filesystems)
        try:
            # Private, as everything under <data-path>/mirenfs.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as record:
                record.write(text)
        except OSError as exc:
            raise _CannotFreeze(f"cannot write the freeze record {path}: {exc.strerror}") from None

    def _arm_watchdog(self) -> None:
        try:
            watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _WATCHDOG,
                    f"{self.limit_s}",
                    str(os.getpid()),
                    self._record or "",
                    *map(str, self._fds),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=self._fds,
                start_new_session=True,  # a Ctrl-C to the terminal's process group must not reach it
            )
        except OSError as exc:
            raise _CannotFreeze(f"cannot start the thaw watchdog: {exc.strerror}") from None
        self._watchdog = watchdog
        assert watchdog.stdout is not None
        ready = select.select([watchdog.stdout], [], [], WATCHDOG_START_S)[0]
        if not ready or watchdog.stdout.readline() != b"armed\n":
            raise _CannotFreeze(f"the thaw watchdog did not start within {WATCHDOG_START_S:g} s")

    def _freeze_all(self) -> None:
        for index, (fd, filesystem) in enumerate(zip(self._fds, self.filesystems, strict=True)):
            give_up = time.monotonic() + FREEZE_BUSY_WAIT_S
            while True:
                if not self._frozen:
                    self.started = time.monotonic()
                self._tell(b"F%d\n" % index)  # before: a kill right after the freeze is covered too
                with _signals_held():  # a Ctrl-C between the freeze and its note would keep it frozen
                    try:
                        fcntl.ioctl(fd, FIFREEZE, 0)
                    except OSError as exc:
                        failure: OSError | None = exc
                    else:
                        failure = None
                        self._frozen.append(fd)
                if failure is None:
                    break
                self._tell(b"U%d\n" % index)  # not ours: the watchdog must leave it alone
                if failure.errno == errno.EBUSY and time.monotonic() < give_up:
                    time.sleep(0.01)  # someone else's freeze (another backup): milliseconds
                    continue
                busy = failure.errno == errno.EBUSY
                why = "it is already frozen by someone else" if busy else failure.strerror
                raise _CannotFreeze(f"cannot freeze {filesystem.describe()}: {why}") from None

    def _release(self) -> None:
        with _signals_held():  # a second Ctrl-C must not stop the thaw half-way
            self._thaw_and_stand_down()

    def _thaw_and_stand_down(self) -> None:
        try:
            thaw_failed = False
            self.held_throughout = bool(self._frozen)
            for fd in self._frozen:
                try:
                    fcntl.ioctl(fd, FITHAW, 0)
                except OSError as exc:
                    self.held_throughout = False
                    if exc.errno != errno.EINVAL:  # EINVAL: not frozen any more (thawed by someone else)
                        thaw_failed = True
                        log.error("cannot thaw a filesystem (%s); the watchdog tries again", exc.strerror)
            if self._frozen:
                self.duration_s = time.monotonic() - self.started
            self._frozen.clear()
            self._stand_down(thaw_failed)
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            if self._record is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._record)
                self._record = None
            _FREEZE_LOCK.release()

    def _tell(self, message: bytes) -> None:
        """A line to the watchdog; one that died meanwhile only means this process thaws alone."""
        if self._watchdog is not None and self._watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                os.write(self._watchdog.stdin.fileno(), message)

    def _stand_down(self, thaw_failed: bool) -> None:
        """Tell the watchdog it is not needed (or, when a thaw failed, close its pipe: it thaws now)."""
        watchdog = self._watchdog
        if watchdog is None:
            return
        if not thaw_failed:
            self._tell(b"done\n")
        self._watchdog = None
        assert watchdog.stdin is not None and watchdog.stdout is not None
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
        try:
            code = watchdog.wait(timeout=5 + self.limit_s)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            code = watchdog.wait()
        watchdog.stdout.close()
        if code == 3:
            self.held_throughout = False


_LIBC = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    """syncfs(2), which the os module lacks; a failure only makes the freeze do the work."""
    _LIBC.syncfs(fd)


# --- leftovers ---


@dataclass
class Leftovers:
    """What :func:`sweep_leftovers` did: copies removed (paths), filesystems thawed and not
    thawed (descriptions, the latter with why), freeze records of running processes left alone
    (their pids)."""

    removed: list[str] = field(default_factory=list)
    thawed: list[str] = field(default_factory=list)
    not_thawed: list[str] = field(default_factory=list)
    live_freezes: list[int] = field(default_factory=list)


def sweep_leftovers(clone_directory: str) -> Leftovers:
    """At start: remove named copies a crash left, and thaw what a killed process left frozen.

    A freeze record of a process still running (another mount of the same
    data path, a ``mirenfs backup``) is left alone. A record is removed only
    once every filesystem it names is thawed (or was not frozen): one that
    could not be thawed (no ``CAP_SYS_ADMIN``, its mount out of reach) keeps
    its record for the next try.
    """
    done = Leftovers()
    try:
        entries = sorted(os.listdir(clone_directory))
    except FileNotFoundError:
        return done
    for entry in entries:
        path = os.path.join(clone_directory, entry)
        if entry.endswith(CLONE_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                done.removed.append(path)
        elif entry.startswith(RECORD_PREFIX) and entry.endswith(RECORD_SUFFIX):
            pid = entry[len(RECORD_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _running_mirenfs(int(pid)):
                done.live_freezes.append(int(pid))
                continue
            thawed, not_thawed = _thaw_recorded(path)
            done.thawed.extend(thawed)
            done.not_thawed.extend(not_thawed)
            if not not_thawed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return done


def _loop_of(device: str) -> str:
    """``loop3`` for ``loop3`` and for its partition ``loop3p1``."""
    number = device.removeprefix("loop")
    return "loop" + number.split("p", 1)[0]


def _running_mirenfs(pid: int) -> bool:
    """Whether ``pid`` is a running mirenfs process: a pid reused since by another program
    does not hold a freeze. When that cannot be told, it is assumed to."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"mirenfs" in cmdline.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _thaw_recorded(record: str) -> tuple[list[str], list[str]]:
    """Thaw the filesystems a freeze record names: (thawed, not thawed with why). A filesystem
    that is not frozen (FITHAW's EINVAL) was thawed by the watchdog, or never frozen: done."""
    thawed: list[str] = []
    not_thawed: list[str] = []
    try:
        with open(record, encoding="ascii") as text:
            devices = [line.strip() for line in text if line.strip()]
    except (OSError, UnicodeDecodeError):
        return thawed, not_thawed  # half written when it was killed: nothing was frozen yet
    loops = sorted({_loop_of(device) for device in devices})
    try:
        filesystems = filesystems_on(loops)
    except MirenfsError as exc:
        return thawed, [f"the filesystems on {', '.join(devices)} ({exc})"]
    for filesystem in filesystems:
        if filesystem.device not in devices:
            continue
        try:
            fd = open_mount(filesystem)
        except OSError as exc:
            not_thawed.append(f"{filesystem.describe()} (cannot open it: {exc.strerror})")
            continue
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not frozen, the watchdog did its job
                not_thawed.append(f"{filesystem.describe()} ({exc.strerror})")
            continue
        finally:
            os.close(fd)
        thawed.append(filesystem.describe())
    return thawed, not_thawed
