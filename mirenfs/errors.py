"""Every error mirenfs reports, in one table: the class, its errno, and what a copying tool shows.

Each error carries one sentence for a person (naming the disk or file and
what to do) and the errno the FUSE boundary answers with. The CLI turns any
of them into ``mirenfs: error: <sentence>`` and exit status 1; the mount's
``fuse_errors`` turns them into their errno and one log line. This module
imports nothing of mirenfs: every layer may raise these.

=======================  ======  ==============================================
class                    errno   what ``cp`` prints (the log says the sentence)
=======================  ======  ==============================================
MirenfsError             EIO     Input/output error
FormatError              EINVAL  Invalid argument
SnapshotUnreadableError  EIO     Input/output error
ImageChangedError        EIO     Input/output error
TargetError              (set)   the errno it was given (EPERM by default)
RestoreRefused           (set)   the errno it was given (EINVAL, EBUSY, EIO)
OutOfOrderWrite          EINVAL  Invalid argument
DiskNotFoundError        ENOENT  No such file or directory
VolumeNotFoundError      ENOENT  No such file or directory
InvalidDiskNameError     EINVAL  Invalid argument
InvalidVolumeError       EINVAL  Invalid argument
UntrustedImageError      EACCES  Permission denied
DiskDeletingError        EBUSY   Device or resource busy
DiskLeasedError          EBUSY   Device or resource busy
DiskAttachedError        EBUSY   Device or resource busy
ImageLiveError           EBUSY   Device or resource busy
DiskChangedError         EBUSY   Device or resource busy
DiskBusyError            EBUSY   Device or resource busy
PointInTimeError         EBUSY   Device or resource busy
LiveCheckError           EIO     Input/output error
ImageExistsError         EEXIST  File exists
ImageNotHereError        EPERM   Operation not permitted
ImageMissingError        ENOENT  No such file or directory
DiskExistsError          EEXIST  File exists
LeaseNotFoundError       ENOENT  No such file or directory
StoreError               EIO     Input/output error
StoreRefusedError        EIO     Input/output error
OutOfDescriptorsError    EMFILE  Too many open files
CatalogUnreachableError  EIO     Input/output error
DiskElsewhereError       EBUSY   Device or resource busy
MountError               EIO     (the mount command's own failure: no errno is seen)
=======================  ======  ==============================================
"""

from __future__ import annotations

import os
import resource
from errno import EACCES, EBUSY, EDQUOT, EEXIST, EINVAL, EIO, EMFILE, ENFILE, ENOENT, ENOSPC, EPERM

NO_SPACE = (ENOSPC, EDQUOT)  # a write found no room: a full filesystem, or a used-up quota
# A log record's ``extra`` for a line one request writes, which every request may write again
# (out of descriptors, a catalogue that stopped answering): a mount's log folds such repeats.
FOLDED_WHEN_REPEATED = {"fold_repeats": True}


class MirenfsError(Exception):
    """Base of every error mirenfs reports to people; ``errno`` is used at the FUSE boundary.

    ``reported`` is set once the error was logged where it happened (a failed
    restore logs its own line), so the boundary does not log it again.
    """

    errno: int = EIO
    reported: bool = False


# --- the snapshot bytes and the engine ---


class FormatError(MirenfsError):
    """The bytes are not a valid `.mirn` snapshot (header, zstd data, size or checksum)."""

    errno = EINVAL


class SnapshotUnreadableError(MirenfsError):
    """Reading the snapshot failed (an I/O error of the disk it is on, a network filesystem gone)."""

    errno = EIO


class ImageChangedError(MirenfsError):
    """The image changed under a snapshot being produced: its bytes would no longer match."""

    errno = EIO


class TargetError(MirenfsError):
    """A restore target cannot be used (exists without consent, busy, or not writable)."""

    errno = EPERM

    def __init__(self, message: str, code: int = EPERM, *, failed_call: bool = False) -> None:
        super().__init__(message)
        self.errno = code
        self.failed_call = failed_call  # a system call failed (not a refusal, which also says EPERM)


class RestoreRefused(TargetError):
    """A file in restore/ that cannot become, or go on as, a restore (its errno says why)."""


class OutOfOrderWrite(MirenfsError):
    """A snapshot must be written from its first byte to its last, in order (a short hole of skipped
    bytes counts as zeros; going back, or a long hole, is this)."""

    errno = EINVAL


# --- disks and their rules (SPEC §3) ---


class DiskNotFoundError(MirenfsError):
    """There is no disk of that name. The only lookup failure that may lead to creating a disk."""

    errno = ENOENT

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"there is no disk named {name}; see `mirenfs disk list`")
        self.name = name


class VolumeNotFoundError(MirenfsError):
    """A disk without a volume: nobody can tell where its image is."""

    errno = ENOENT


class InvalidDiskNameError(MirenfsError):
    errno = EINVAL


class InvalidVolumeError(MirenfsError):
    """A volume id or image path that would not stay a plain file where it belongs."""

    errno = EINVAL


class UntrustedImageError(MirenfsError):
    """A shared catalogue puts a disk's image on this node outside the data path, and this host
    never registered that path: only this host's operator may point it at a file."""

    errno = EACCES


class DiskDeletingError(MirenfsError):
    errno = EBUSY


class DiskLeasedError(MirenfsError):
    """The disk has a bound lease: an application holds it."""

    errno = EBUSY


class DiskAttachedError(MirenfsError):
    """The disk store says the disk is attached: a machine may be using its image file directly."""

    errno = EBUSY


class ImageLiveError(MirenfsError):
    """A loop device is backed by the disk's image: the kernel may be writing it."""

    errno = EBUSY


class PointInTimeError(MirenfsError):
    """A disk in use whose point-in-time copy could not be taken (no reflink, over the freeze
    budget, no space), and reading the moving image was not allowed: that version is refused.
    ``why`` is the reason alone, for a message that goes on differently (a live read)."""

    errno = EBUSY

    def __init__(self, message: str, why: str | None = None) -> None:
        super().__init__(message)
        self.why = why or message


class LiveCheckError(MirenfsError):
    """Whether an image is live could not be told; restore fails closed on it."""

    errno = EIO


class ImageExistsError(MirenfsError):
    """Restoring would replace an existing image, and nobody consented."""

    errno = EEXIST


class ImageNotHereError(MirenfsError):
    """A disk of a catalogue every host shares whose image is not under this data path: most
    likely another host's disk (a wrong data path, a node name two hosts share), so writing its
    image here, and its size and filesystem into the shared record, needs consent too. EPERM, not
    EEXIST: `cp` said "File exists" of an image that is not there (review D22 D8)."""

    errno = EPERM

    def __init__(self, message: str, *, image_path: str, node: str) -> None:
        super().__init__(message)
        self.image_path = image_path
        self.node = node


class ImageMissingError(MirenfsError):
    errno = ENOENT


class DiskChangedError(MirenfsError):
    """The disk changed between the refusal checks and the start of the restore."""

    errno = EBUSY


# --- the disk store ---


class StoreError(MirenfsError):
    """The store could not be read or written: reported as it is, never taken for "no such disk"."""

    errno = EIO


class StoreRefusedError(StoreError):
    """The data path's SQLite store may not be used without --catalog (its disks were moved to a
    shared catalogue, or it has none and talked to one): nothing was read or written."""


class OutOfDescriptorsError(StoreError):
    """The store could not be opened because this process can open no more files: every request
    then fails, and what a copying tool prints should say why ("Too many open files"), not EIO."""

    errno = EMFILE


class CatalogUnreachableError(StoreError):
    """The disk catalogue (etcd) cannot be reached or has no quorum. Every lookup fails closed with
    this, never with "no such disk", so a failed lookup never leads to creating a disk.

    ``maybe_applied``: a change was sent and no answer came in time: etcd may apply it all the
    same (trial W: a create said "not created" appeared later), so nobody says "unchanged"."""

    errno = EIO
    maybe_applied: bool = False
    said_what_may_be_done: bool = False  # its sentence says it: the CLI adds no general clause

    def add_if_maybe_applied(self, what_may_be_done: str) -> None:
        """Say what may have happened all the same, when the change may have landed."""
        if self.maybe_applied:
            self.args = (f"{self}; {what_may_be_done}",)
            self.said_what_may_be_done = True


class DiskElsewhereError(MirenfsError):
    """The disk's volume is on another node: only that node backs it up, restores or removes it."""

    errno = EBUSY


class DiskExistsError(MirenfsError):
    errno = EEXIST


class LeaseNotFoundError(MirenfsError):
    errno = ENOENT


class DiskBusyError(MirenfsError):
    """The disk is held (a bound lease) or being deleted, so the change is refused."""

    errno = EBUSY


# --- showing values in a sentence: text that came from outside (a snapshot's header), sizes ---

_QUOTED_LIMIT = 80  # characters of a value a sentence repeats; a 1 MiB field is not a log line


def quoted(text: str) -> str:
    """``text`` as a sentence repeats a value it refuses: quoted with Python's escapes, so no
    control character, line break or terminal escape reaches a log or a terminal, and cut short."""
    if len(text) > _QUOTED_LIMIT:
        return repr(text[:_QUOTED_LIMIT]) + f"… ({len(text)} characters)"
    return repr(text)


def printable(text: str) -> str:
    """``text`` as it is when every character prints and it neither starts nor ends with a space,
    else :func:`quoted`: for a name in a line of output, which must stay one line whatever the
    snapshot's header holds and must not pass for another name (``"pg.mirn "``)."""
    return text if text.isprintable() and text == text.strip() and text else quoted(text)


def one_line(text: str) -> str:
    """``text`` with each character that would not print as itself escaped as Python writes it:
    a newline as ``\\n``, a terminal escape as ``\\x1b``, a byte of a path that is not UTF-8 as
    ``\\xff``. For a whole line of output holding a user's path, which
    must stay one line (review C: ``backup -o $'a\\nb'`` split its report in two)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1]


def size_in_words(size: int) -> str:
    """``1.0 PiB (1125899906842624 bytes)``: a size a sentence states, in binary units with the
    exact count, or ``512 bytes``."""
    value, unit = float(size), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({size} bytes)"


# --- the mount itself ---


class MountError(MirenfsError):
    """The mount could not start (FUSE refused it); the sentence says what to do."""

    errno = EIO


_DESCRIPTOR_SLACK = 8  # descriptors a failed open (SQLite's several files) may have given back


def out_of_descriptors(failed_with: int | None = None) -> str | None:
    """The sentence for a process that can open no more files (or nearly: what failed may have
    freed one since), if this one cannot: what fails then (SQLite's "unable to open database
    file", an image's open) says nothing of why. ``failed_with``: the errno of the failure, when
    there is one; any but EMFILE and ENFILE is another cause, and nothing is looked into."""
    if failed_with is not None and failed_with not in (EMFILE, ENFILE):
        return None
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        if exc.errno == ENFILE:
            return "the system's table of open files is full (fs.file-max); close files or raise it"
        if exc.errno != EMFILE:
            return None
        in_use = limit
    if in_use < limit - _DESCRIPTOR_SLACK:
        return None
    return (
        f"mirenfs has {limit} files open, all that its limit allows (ulimit -n): a mount keeps "
        "each disk's image open once it was read; raise the limit (LimitNOFILE= in its "
        "service) and mount again"
    )
