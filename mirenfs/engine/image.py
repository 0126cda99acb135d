"""Raw image I/O: reading chunks without touching holes, writing sparsely,
and the staging file that makes a restore all-or-nothing (SPEC §3).

Blocking system calls live here and are called from worker threads.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import BinaryIO, Protocol

from mirenfs.errors import NO_SPACE, ImageChangedError, MirenfsError, TargetError

log = logging.getLogger(__name__)

BLOCK = 4096
STAGING_SUFFIX = ".restore.tmp"
_ZEROS = bytes(16 << 20)
HASH_PIECE = 1 << 20  # the hash lane's read size: stays in L2 between read and hash
# Zeros in a writable buffer, for engine.sha256 and memcmp (ctypes wants writable buffers).
_ZERO_PIECE = memoryview(bytearray(4 << 20))
_ZERO_ADDRESS = ctypes.addressof(ctypes.c_char.from_buffer(_ZERO_PIECE))
_UNLOCKED_COMPARE = 64 << 10  # from this size on, a zero check lets go of the GIL
WRITEBACK_STEP = 16 << 20  # a restore hands its staging file to writeback in steps of this size
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages, do not wait


class ChunkSizing(Protocol):
    """What cutting an image needs of the compression settings (``produce.Settings``)."""

    @property
    def chunk_size(self) -> int: ...


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def zeros(length: int) -> bytes | memoryview:
    """A zero buffer of ``length`` bytes without allocating when it is small enough."""
    if length <= len(_ZEROS):
        return memoryview(_ZEROS)[:length]
    return bytes(length)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zero bytes, at memcmp speed for any buffer.

    ``bytes.startswith`` compares with memcmp whatever the buffer type; a
    ``==`` against a memoryview compares item by item, ~80 times slower.
    A large writable buffer is compared by libc's memcmp through ctypes,
    which lets other threads (the restore's hash stage) take the GIL meanwhile.
    """
    length = len(data)
    if length >= _UNLOCKED_COMPARE and _memcmp is not None:
        view = memoryview(data)
        if not view.readonly and view.contiguous:
            # Zero iff the first block is and every byte equals the one a block before it: one
            # buffer read instead of two, ~45% faster than comparing with a zero buffer.
            address = ctypes.addressof((ctypes.c_char * length).from_buffer(view))
            return (
                _memcmp(address, _ZERO_ADDRESS, BLOCK) == 0
                and _memcmp(address, address + BLOCK, length - BLOCK) == 0
            )
    if length <= len(_ZEROS):
        return _ZEROS.startswith(data)
    view = memoryview(data)
    return all(_ZEROS.startswith(view[i : i + len(_ZEROS)]) for i in range(0, len(view), len(_ZEROS)))


def _load_memcmp() -> Callable[[int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_memcmp = _load_memcmp()


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``fd`` that hold data, found with SEEK_DATA/SEEK_HOLE.

    Filesystems without hole reporting return the whole file as one extent.
    """
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole remains
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)] if size else []
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents


@dataclass(frozen=True)
class ImageIdentity:
    """What must stay the same for a cached index to describe the image."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, info: os.stat_result) -> ImageIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    @classmethod
    def of(cls, path: str) -> ImageIdentity:
        return cls.from_stat(os.stat(path))

    def cache_key(self, settings_key: str) -> str:
        return f"{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}:{self.ctime_ns}:{settings_key}"


def ensure_unchanged(fd: int, before: ImageIdentity, path: str) -> None:
    """Refuse a snapshot whose two reads may have seen two versions of the image.

    An image replaced by a rename (a restore installs so) keeps its bytes: only its link
    count, and with it its ctime, changed. That is no change of what was read."""
    now = os.fstat(fd)
    identity = ImageIdentity.from_stat(now)
    only_unlinked = now.st_nlink == 0 and replace(identity, ctime_ns=before.ctime_ns) == before
    if identity != before and not only_unlinked:
        raise ImageChangedError(
            f"image {path} changed while it was being read, so its snapshot would not verify; "
            "run the backup again (or detach the disk first)"
        )


class ChunkSource(Protocol):
    """Where a snapshot's raw bytes come from, one fixed-size chunk at a time."""

    size: int
    chunk_size: int

    def read_chunk(self, index: int) -> bytearray | None:
        """The chunk's bytes, or None when it is all zeros (a hole is never read)."""
        ...

    def hash_into(
        self,
        sha: Hasher,
        wait: Callable[[int], None],
        *,
        first_chunk: int = 0,
        at_chunk: Callable[[int], None] | None = None,
    ) -> None:
        """Feed every byte from chunk ``first_chunk`` on to ``sha`` in order, calling
        ``at_chunk(k)`` as it reaches the start of chunk ``k`` and ``wait(offset)`` before
        reading at ``offset``; safe to run on one thread while others call :meth:`read_chunk`."""
        ...

    def data_before(self, offset: int) -> int:
        """How many bytes before ``offset`` must be read (are not holes)."""
        ...


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    return min(chunk_size, size - index * chunk_size)


class FdImageSource:
    """Chunks of an image file, reading only the ranges that hold data."""

    def __init__(self, fd: int, size: int, chunk_size: int) -> None:
        self.fd = fd
        self.size = size
        self.chunk_size = chunk_size
        self._extents = data_extents(fd, size)
        self._starts = [start for start, _ in self._extents]
        lengths = (stop - start for start, stop in self._extents)
        self._data_sums = list(itertools.accumulate(lengths, initial=0))

    def data_before(self, offset: int) -> int:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return 0
        start, stop = self._extents[i]
        return self._data_sums[i] + min(offset, stop) - start

    def read_chunk(self, index: int) -> bytearray | None:
        begin = index * self.chunk_size
        length = chunk_length(self.size, self.chunk_size, index)
        end = begin + length
        i = max(bisect.bisect_right(self._starts, begin) - 1, 0)
        buffer: bytearray | None = None
        for start, stop in self._extents[i:]:
            if start >= end:
                break
            lo, hi = max(start, begin), min(stop, end)
            if lo >= hi:
                continue
            if buffer is None:
                buffer = bytearray(length)
            _pread_exact(self.fd, memoryview(buffer)[lo - begin : hi - begin], lo)
        if buffer is None or is_zero(buffer):
            return None
        return buffer

    def hash_into(
        self,
        sha: Hasher,
        wait: Callable[[int], None],
        *,
        first_chunk: int = 0,
        at_chunk: Callable[[int], None] | None = None,
    ) -> None:
        """Data extents are read into one reused buffer; holes come from the zero
        buffer and are never read (the floor's way, and no page faults per chunk)."""
        buffer = memoryview(bytearray(HASH_PIECE))
        for k in range(first_chunk, chunk_count(self.size, self.chunk_size)):
            if at_chunk is not None:
                at_chunk(k)
            begin = k * self.chunk_size
            self._hash_range(sha, wait, buffer, begin, min(self.size, begin + self.chunk_size))

    def _hash_range(
        self, sha: Hasher, wait: Callable[[int], None], buffer: memoryview, begin: int, end: int
    ) -> None:
        position = begin
        for start, stop in self._extents[max(bisect.bisect_right(self._starts, begin) - 1, 0) :]:
            if start >= end:
                break
            lo, hi = max(start, begin), min(stop, end)
            if lo >= hi:
                continue
            _hash_zeros(sha, position, lo, wait)
            while lo < hi:
                wait(lo)
                length = min(len(buffer), hi - lo)
                _pread_exact(self.fd, buffer[:length], lo)
                sha.update(buffer[:length])
                lo += length
            position = hi
        _hash_zeros(sha, position, end, wait)


def _hash_zeros(sha: Hasher, start: int, stop: int, wait: Callable[[int], None]) -> None:
    """Hash the hole ``[start, stop)`` as zeros, asking ``wait`` at each piece so that a
    stopped pass ends within one piece even in a hole of many GiB."""
    position = start
    while position < stop:
        wait(position)
        step = min(stop - position, HASH_PIECE)
        sha.update(_ZERO_PIECE[:step])
        position += step


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ImageChangedError("the image became shorter while it was being read")
        done += got


@dataclass
class OpenImage:
    """An image opened for a backup, with the identity its snapshot depends on."""

    path: str
    fd: int
    identity: ImageIdentity

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def mtime_ns(self) -> int:
        return self.identity.mtime_ns

    @classmethod
    def open(cls, path: str) -> OpenImage:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MirenfsError(f"cannot open image {path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise MirenfsError(f"image {path} is not a regular file")
        return cls(path, fd, ImageIdentity.from_stat(info))

    def source(self, settings: ChunkSizing) -> FdImageSource:
        return FdImageSource(self.fd, self.size, settings.chunk_size)

    def close(self) -> None:
        os.close(self.fd)


class FileObjectSource:
    """Chunks of any seekable binary file object (the Python API's ``src``)."""

    def __init__(self, fileobj: BinaryIO, size: int, chunk_size: int) -> None:
        self._lock = threading.Lock()  # seek + read must not interleave between threads
        self._file = fileobj
        self._origin = fileobj.tell()
        self.size = size
        self.chunk_size = chunk_size

    def read_chunk(self, index: int) -> bytearray | None:
        with self._lock:
            buffer = self._read(index)
        return None if is_zero(buffer) else buffer

    def data_before(self, offset: int) -> int:
        return offset

    def hash_into(
        self,
        sha: Hasher,
        wait: Callable[[int], None],
        *,
        first_chunk: int = 0,
        at_chunk: Callable[[int], None] | None = None,
    ) -> None:
        """A file object has no holes to skip: every chunk is read and hashed."""
        for k in range(first_chunk, chunk_count(self.size, self.chunk_size)):
            if at_chunk is not None:
                at_chunk(k)
            wait(k * self.chunk_size)
            with self._lock:
                buffer = self._read(k)
            sha.update(buffer)

    def _read(self, index: int) -> bytearray:
        length = chunk_length(self.size, self.chunk_size, index)
        self._file.seek(self._origin + index * self.chunk_size)
        buffer = bytearray(length)
        view = memoryview(buffer)
        done = 0
        while done < length:
            got = self._file.readinto(view[done:])  # type: ignore[attr-defined]
            if not got:
                raise ImageChangedError(
                    f"the source ended after {index * self.chunk_size + done} bytes, "
                    f"before size_bytes={self.size}"
                )
            done += got
        return buffer


def nonzero_runs(view: memoryview, base: int) -> list[tuple[int, int]]:
    """The ``(lo, hi)`` ranges of ``view`` (at file offset ``base``) left once the file blocks
    that are all zeros are taken out, each range as long as it goes.

    A block can only be zero if its first eight bytes are, which one strided
    read of the whole view tells; only those blocks are compared in full. (A
    Python loop of comparisons per block would hold the GIL for long stretches,
    and the decompression stage needs it.)
    """
    head = min((-base) % BLOCK, len(view))  # the part before the first whole file block
    end = head + (len(view) - head) // BLOCK * BLOCK
    zero: list[tuple[int, int]] = []
    if head and is_zero(view[:head]):
        zero.append((0, head))
    if end > head:
        firsts = view[head:end].cast("Q")[:: BLOCK // 8].tolist()
        starts = (head + i * BLOCK for i, first in enumerate(firsts) if first == 0)
        zero += [(lo, lo + BLOCK) for lo in starts if is_zero(view[lo : lo + BLOCK])]
    if end < len(view) and is_zero(view[end:]):
        zero.append((end, len(view)))
    runs: list[tuple[int, int]] = []
    position = 0
    for lo, hi in zero:
        if lo > position:
            runs.append((position, lo))
        position = hi
    if position < len(view):
        runs.append((position, len(view)))
    return runs


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Python has no binding), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these dirty pages out now, without waiting for it, so
    that the closing fsync finds little left. Only an optimisation: failures are ignored."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class SparseWriter:
    """Writes a sequential stream into a zero-filled file, skipping zero 4 KiB blocks.

    Skipping is only correct because the target is a fresh sparse file: what
    is not written reads back as zeros. With ``direct_fd`` (the same file
    opened with ``O_DIRECT``), runs whose offset, length and memory are
    block-aligned go straight to the device: no copy into the page cache,
    nothing left for writeback, and a restore does not flush the host's page
    cache. Everything else, and everything once a direct write is refused, is
    written through ``fd``; with ``writeback``, every ``WRITEBACK_STEP`` bytes
    of that are handed to the kernel's writeback as they are written.
    """

    def __init__(
        self,
        fd: int,
        *,
        writeback: bool = False,
        direct_fd: int | None = None,
        make_room: Callable[[int], int] | None = None,
    ) -> None:
        self.fd = fd
        self.direct_fd = direct_fd
        self._make_room = make_room  # asked for N bytes when a write finds no space; answers what it freed
        self.offset = 0
        self.bytes_written = 0
        self.bytes_direct = 0
        self._written_back: int | None = 0 if writeback else None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        base = self.offset
        self.offset += len(view)
        if not is_zero(view):
            self._write_blocks(view, base)
        if self._written_back is not None and self.offset - self._written_back >= WRITEBACK_STEP:
            start_writeback(self.fd, self._written_back, self.offset - self._written_back)
            self._written_back = self.offset

    def skip(self, length: int) -> None:
        """Move on over ``length`` bytes known to be zeros (nothing to check, nothing to write)."""
        self.offset += length

    def _write_blocks(self, view: memoryview, base: int) -> None:
        """Write the non-zero 4 KiB blocks of ``view`` (which starts at file offset ``base``), in runs."""
        for lo, hi in nonzero_runs(view, base):
            self._flush(view, lo, hi, base)

    def _flush(self, view: memoryview, lo: int, hi: int, base: int) -> None:
        if self.direct_fd is not None and _aligned(view, lo, hi, base):
            try:
                self._pwrite_making_room(self.direct_fd, view[lo:hi], base + lo)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.direct_fd = None  # this filesystem or device will not: write through the cache
            else:
                self.bytes_written += hi - lo
                self.bytes_direct += hi - lo
                return
        self._pwrite_making_room(self.fd, view[lo:hi], base + lo)
        self.bytes_written += hi - lo

    def _pwrite_making_room(self, fd: int, view: memoryview, offset: int) -> None:
        """``pwrite`` all of ``view``; on a full filesystem, once more each time ``make_room``
        freed something (the same bytes at the same offset: a repeat is harmless)."""
        while True:
            try:
                _pwrite_all(fd, view, offset)
                return
            except OSError as exc:
                if exc.errno not in NO_SPACE or self._make_room is None or self._make_room(len(view)) <= 0:
                    raise


DIRECT_ALIGN = 4096  # what O_DIRECT needs of offsets, lengths and memory (the largest logical block)


def _aligned(view: memoryview, lo: int, hi: int, base: int) -> bool:
    """Whether ``view[lo:hi]`` may be written with O_DIRECT at ``base + lo``."""
    if (base + lo) % DIRECT_ALIGN or (hi - lo) % DIRECT_ALIGN or view.readonly:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(view, lo))
    return address % DIRECT_ALIGN == 0


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


MakeRoom = Callable[[int, int], int]
"""``make_room(device, needed)``: free about ``needed`` bytes on the filesystem ``device`` (a
cache's), answering the bytes freed; 0 when there is nothing to give there."""


@dataclass
class StagingImage:
    """``<image>.restore.tmp``: the sparse file a restore writes before it replaces the image.

    It is created exclusively and held under an ``flock`` for the restore's
    life, so a second restore of the same image is told it is busy, and a
    leftover from a crash (no lock holder) can be recognised and removed.
    """

    image_path: str
    path: str
    fd: int
    direct_fd: int = -1
    renamed: bool = False  # over the image: the restore is done, whatever interrupts it after
    make_room: MakeRoom | None = None  # what gives back space when a write finds the filesystem full

    @classmethod
    def create(cls, image_path: str, size: int, make_room: MakeRoom | None = None) -> StagingImage:
        """The staging file, locked before it has its name: a restore that finds the name finds
        it held (review: between an ``O_EXCL`` create and its ``flock``, a second restore of the
        image took the file for a leftover, removed it and made its own, and the first renamed
        the second's half-written file over the image)."""
        path = image_path + STAGING_SUFFIX
        for _attempt in range(3):
            try:
                fd = _locked_file_named(path, size)
            except FileExistsError:
                remove_staging_if_unheld(path)
                continue
            except OSError as exc:
                raise cannot_write(image_path, exc, f" (creating its staging file {path})") from None
            return cls(image_path, path, fd, _open_direct(fd), make_room=make_room)
        raise TargetError(
            f"{path} keeps reappearing: another restore of {image_path} is running", errno.EBUSY
        )

    def writer(self) -> SparseWriter:
        """The writer of the restore's bytes: sparse, direct where it can, and a failed write
        (a full filesystem) names the image and its staging file."""
        return _StagingWriter(self)

    def seal(self, mtime_ns: int | None = None, *, new_mode: int = 0o600) -> int:
        """Give the staging file the image's mode, owner and time, and fsync it: after this only
        the rename is left, so whatever must happen before the image changes (the store's
        record of it) comes between the two, when nothing but a rename can still fail.

        The image keeps the replaced image's owner and mode, less what others could read or
        write (review Sec F3: an image left 0644 stayed so on every restore); a new one gets
        ``new_mode``. Returns the modification time the image holds: ``mtime_ns`` unless its
        filesystem cannot store that time (ext4 clamps to years 1901 to 2446, some keep whole
        seconds).
        """
        try:
            existing: os.stat_result | None = os.lstat(self.image_path)  # never where a link leads
        except FileNotFoundError:
            existing = None
        try:  # trial FI F4: a bare "Operation not permitted", naming no file
            if existing is not None and stat.S_ISREG(existing.st_mode):
                os.fchmod(self.fd, stat.S_IMODE(existing.st_mode) & 0o770)
                if os.geteuid() == 0:
                    os.fchown(self.fd, existing.st_uid, existing.st_gid)
            else:
                os.fchmod(self.fd, new_mode)
            if mtime_ns is not None:
                os.utime(self.fd, ns=(mtime_ns, mtime_ns))
            held = os.fstat(self.fd).st_mtime_ns
        except OSError as exc:
            raise cannot_write(
                self.image_path,
                exc,
                f" (giving its staging file {self.path} the image's owner, mode and time)",
            ) from None
        self._close_direct()
        try:
            os.fsync(self.fd)  # the last moment a full filesystem can refuse the data: the image is as it was
        except OSError as exc:
            raise cannot_write(self.image_path, exc, f" (syncing its staging file {self.path})") from None
        return held

    def rename_over_image(self) -> None:
        """Rename over the image and fsync the directory: old image or new, never a mix.

        Once renamed, the image is the new one whatever follows: a directory that will not
        sync (EIO) is said in the log, not raised, or the restore would be reported failed,
        and its disk unchanged, over an image already replaced.
        """
        try:
            os.rename(self.path, self.image_path)
        except OSError as exc:  # trial FI F3: "Input/output error: …restore.tmp", naming no image
            raise cannot_write(
                self.image_path, exc, f" (renaming its staging file {self.path} over it)"
            ) from None
        self.renamed = True
        directory = os.path.dirname(os.path.abspath(self.image_path))
        try:
            fsync_directory(directory)
        except OSError as exc:
            log.warning(
                "restored %s, but its directory %s could not be synced (%s): a crash before the "
                "system writes it back may bring back the old image",
                self.image_path,
                directory,
                exc.strerror,
            )
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        """Remove the staging file; safe to call more than once. A removal that fails is said, not
        raised: it would hide why the restore failed (trial FD F7: a full filesystem, then EIO
        here, told the writer EIO and lost "unchanged"); the sweep removes the file later."""
        self._close_direct()
        if self.fd >= 0:
            try:
                _unlink_quietly(self.path)
            except OSError as exc:
                log.warning(
                    "could not remove %s, the staging file of a failed restore (%s): `mirenfs cleanup` or "
                    "the next mount start removes it",
                    self.path,
                    exc.strerror,
                )
            finally:
                os.close(self.fd)
                self.fd = -1

    def _close_direct(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1


class _StagingWriter(SparseWriter):
    """A :class:`SparseWriter` into a staging image whose failures name the image being restored."""

    def __init__(self, staging: StagingImage) -> None:
        direct = staging.direct_fd
        make_room = staging.make_room
        super().__init__(
            staging.fd,
            writeback=True,
            direct_fd=direct if direct >= 0 else None,
            make_room=None if make_room is None else partial(make_room, os.fstat(staging.fd).st_dev),
        )
        self._staging = staging

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            super().write(data)
        except OSError as exc:
            staging = self._staging
            raise cannot_write(
                staging.image_path, exc, f" (writing its staging file {staging.path})"
            ) from None


def _locked_file_named(path: str, size: int) -> int:
    """A new file of ``size`` (a hole), under an exclusive ``flock``, then given the name ``path``
    (FileExistsError if it is taken): made with no name (``O_TMPFILE``) and linked through
    ``/proc``, so nobody ever finds it there unlocked. Where the filesystem has no ``O_TMPFILE``
    it is created under ``path`` and locked right after; if another restore took it for a
    leftover meanwhile, the name is someone else's now (FileExistsError), never written blind."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = -1
    unnamed = fd >= 0
    if not unnamed:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    named_by_us = not unnamed  # the name to remove if this fails
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, size)
        except OSError as exc:
            raise TargetError(
                f"cannot prepare {path}: {exc.strerror}", exc.errno or errno.EIO, failed_call=True
            ) from None
        if unnamed:
            descriptors = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:  # with a directory descriptor, os.link is linkat(AT_SYMLINK_FOLLOW)
                os.link(str(fd), path, src_dir_fd=descriptors, follow_symlinks=True)
            finally:
                os.close(descriptors)
        elif not _names(path, fd):  # removed as a leftover before the lock: the name is another's
            named_by_us = False
            raise FileExistsError(errno.EEXIST, "taken by another restore", path)
    except BaseException:
        os.close(fd)
        if named_by_us:
            _unlink_quietly(path)
        raise
    return fd


def hold_staging_name(path: str) -> int | None:
    """Hold an image's staging name (an empty file, locked) so that no restore can begin on
    that image meanwhile: a leftover nobody holds is removed first. None if a live restore
    holds the name or takes it first. Let go by closing the descriptor and removing the name."""
    try:
        remove_staging_if_unheld(path)
        return _locked_file_named(path, 0)
    except (TargetError, FileExistsError):
        return None


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` is the open file ``fd`` (not another file given that name since)."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _open_direct(fd: int) -> int:
    """The open file ``fd`` once more, with O_DIRECT (-1 where the filesystem has none: tmpfs)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def cannot_write(path: str, exc: OSError, doing: str = "", *, device: bool | None = None) -> TargetError:
    """``cannot write PATH: …``: a missing directory, a full or read-only filesystem named as such
    (with what to do), anything else as the OS said. Never a raw ``[Errno N]``."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(directory):  # /proc, /sys: there, but taking no new file (review S21 G8)
            why = f"its directory {directory} takes no new file ({exc.strerror})"
        else:
            why = f"there is no directory {directory}"
    elif exc.errno == errno.ENOSPC:
        if is_device(path) if device is None else device:
            why = f"the device has no space left{doing}"
        else:
            why = f"its filesystem is full{doing}; free space there and try again"
    elif exc.errno == errno.EDQUOT:
        why = f"this user's disk quota on its filesystem is used up{doing}; free space there and try again"
    elif exc.errno == errno.EROFS:
        why = f"its filesystem is read-only{doing}; remount it read-write and try again"
    else:
        why = f"{exc.strerror}{doing}"
    return TargetError(f"cannot write {path}: {why}", exc.errno or errno.EIO, failed_call=True)


def is_device(path: str | int) -> bool:
    """A character or block device (``/dev/full``): full is what the device says, not a filesystem."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def staging_is_held(path: str) -> bool:
    """Whether a live restore holds the staging file ``path`` (its ``flock``), touching nothing:
    another mount of the data path or a ``mirenfs restore`` may be writing that image."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # none, or not a file a restore made: remove_staging_if_unheld says which
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_staging_if_unheld(path: str) -> bool:
    """Remove a staging file nobody holds; raise EBUSY if a live restore holds it.

    Only a regular file this user owns is touched: anything else (a FIFO, a
    socket, a device, a directory, a symlink) is refused with a reason and
    never opened or removed. The file is opened without following a symlink
    and without blocking, and checked again once open (it may have been
    swapped meanwhile).
    """
    try:
        planted = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise TargetError(
            f"cannot look at {path}: {exc.strerror}", exc.errno or errno.EIO, failed_call=True
        ) from None
    if stat.S_ISLNK(planted.st_mode):
        raise TargetError(_not_ours(path, "a symbolic link"), errno.EEXIST)
    if not stat.S_ISREG(planted.st_mode):
        raise TargetError(_not_ours(path, "not a regular file"), errno.EEXIST)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TargetError(_not_ours(path, "a symbolic link"), errno.EEXIST) from None
        raise TargetError(
            f"cannot open {path}: {exc.strerror}", exc.errno or errno.EIO, failed_call=True
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TargetError(_not_ours(path, "not a regular file"), errno.EEXIST)
        if info.st_uid != os.geteuid():
            raise TargetError(_not_ours(path, f"owned by uid {info.st_uid}"), errno.EEXIST)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            image = path[: -len(STAGING_SUFFIX)]
            raise TargetError(f"a restore of {image} is already in progress", errno.EBUSY) from None
        if not _names(path, fd):  # another restore's file has taken the name meanwhile
            return False
        _unlink_quietly(path)
        return True
    finally:
        os.close(fd)


def _not_ours(path: str, what: str) -> str:
    return (
        f"{path} is in the way of the restore: it is {what}, not a staging file mirenfs made; "
        "remove it by hand if it is not needed"
    )


def current_umask() -> int:
    """The process umask (read by setting it, so read it before starting threads that create files)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def disk_file_mode() -> int:
    """A new file that holds a whole disk (a backup, a restored image): its owner's only, and
    the umask still honoured (it may take the owner's bits away too, never grant others any)."""
    return 0o600 & ~current_umask()


def make_directories(path: str, mode: int = 0o755, *, leaf_mode: int | None = None) -> list[str]:
    """Create ``path`` and its missing parents, each with ``mode`` (``leaf_mode`` for ``path``
    itself), less the umask; return the directories made, outermost first. ``os.makedirs`` gives
    the parents 0777 less the umask: under umask 000 another user could swap what a restore
    writes into (review Sec F1)."""
    missing = []
    probe = os.path.abspath(path)
    while not os.path.isdir(probe) and probe != os.path.dirname(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    made = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode if directory != missing[0] or leaf_mode is None else leaf_mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by someone else: not ours
        made.append(directory)
    return made


def make_private_directory(path: str) -> None:
    """Create ``path`` (and parents) with mode 0700, and make an existing one 0700: it holds disk data.
    One that is another user's, or a link another user made, is refused (review Sec F7: a link to
    her directory had mirenfs trust her trusted-images.json, and chmod her directory)."""
    make_directories(path, leaf_mode=0o700)
    link, info = os.lstat(path), os.stat(path)
    own = (os.geteuid(), 0) if os.geteuid() == 0 else (os.geteuid(),)
    if (stat.S_ISLNK(link.st_mode) and link.st_uid not in own) or info.st_uid != os.geteuid():
        raise PermissionError(
            errno.EACCES,
            f"{path} is another user's (uid {info.st_uid if info.st_uid != os.geteuid() else link.st_uid}), "
            "and mirenfs keeps disk data and what it trusts there: make it a directory of this user",
            path,
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def written_by_this_user_alone(info: os.stat_result) -> bool:
    """Whether a state file (fstat of it, opened without following a link) is a regular file of
    this user that no other may change: only such a file is trusted for what it says (which
    images may be replaced, which etcd cluster is the catalogue's: review Sec F7)."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def replace_private_file(
    path: str, data: bytes | Sequence[bytes | bytearray | memoryview], *, durable: bool = False
) -> None:
    """Put ``data`` (or its pieces, one after another) at ``path`` (mode 0600) whole or not at
    all: written under a temporary name beside it, then renamed over it, so a reader or a crash
    never finds half of it. ``durable`` also fsyncs the file and its directory, so that the new
    content survives a crash. On any failure the temporary file is removed and the error raised."""
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # two threads may save one path
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            for piece in [data] if isinstance(data, bytes) else data:
                file.write(piece)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        fsync_directory(os.path.dirname(path))


_TEMPORARY_NAME = re.compile(r".+\.(\d+)\.\d+\.tmp")  # what replace_private_file writes first
TEMPORARY_LEFT_AFTER_S = 60.0  # a state file is saved in milliseconds: one this old is no save at work
_PID_MAX = 1 << 22  # the kernel's largest pid_max


def temporary_writer_runs(name: str) -> bool | None:
    """For a temporary file named as :func:`replace_private_file` names them (``NAME.PID.THREAD.tmp``):
    whether the process that wrote it still runs. None for any other name."""
    found = _TEMPORARY_NAME.fullmatch(name)
    if found is None:
        return None
    digits = found.group(1)
    if len(digits) > len(str(_PID_MAX)) or not 0 < int(digits) < _PID_MAX:
        return False  # no process has such a pid (review S4 F3: os.kill raised OverflowError)
    pid = int(digits)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's, running
        return True
    return True


def remove_dead_temporaries(directory: str) -> tuple[list[str], list[str]]:
    """Remove the temporary files :func:`replace_private_file` left in ``directory`` when its
    process was killed before the rename (trial FI2 G6: they stayed for ever): only those of a
    process that is gone, and a minute old (a process of another pid namespace sharing the data
    path is not seen here). The paths removed, and a sentence for each that could not be (a
    read-only data path: review S4 F3), so that the rest of a sweep goes on."""
    removed: list[str] = []
    problems: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed, problems
    except OSError as exc:
        return removed, [f"cannot look for temporary files left in {directory}: {exc.strerror}"]
    for name in names:
        if temporary_writer_runs(name) is not False:
            continue
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < TEMPORARY_LEFT_AFTER_S:
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(
                f"cannot remove {path}, a temporary file of a killed mirenfs process: {exc.strerror}"
            )
            continue
        removed.append(path)
    return removed, problems


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
