"""Whole operations on files and streams, shared by the CLI, the Python API and the mount.

Backup to a seekable file is one pass: frames are written as the index pass
makes them, then the seek table, then the header (whose checksum is known
only at the end but whose length is known from the start). Backup to a pipe
needs the checksum first, so it builds the index and then streams the
snapshot from it, compressing a second time rather than spooling to disk.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import io
import logging
import os
import re
import select
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO

import trio

from mirenfs.engine.consume import ImageWriter, Placed, RestoreStream, restore_to_path
from mirenfs.engine.image import (
    ChunkSource,
    OpenImage,
    cannot_write,
    disk_file_mode,
    ensure_unchanged,
    is_device,
)
from mirenfs.engine.produce import (
    PLACEHOLDER_CHECKSUM,
    FrameSink,
    Progress,
    Settings,
    SnapshotIndex,
    SnapshotProducer,
    build_index,
    snapshot_meta,
)
from mirenfs.errors import NO_SPACE, FormatError, MirenfsError, SnapshotUnreadableError, TargetError
from mirenfs.format.frames import (
    MAX_SEEK_TABLE,
    SEEK_TABLE_FOOTER_LEN,
    seek_table_frame_count,
    seek_table_length,
)
from mirenfs.format.header import Meta, read_header

log = logging.getLogger(__name__)

READ_PIECE = 4 << 20
PIPE_BUFFER = 1 << 20  # what a pipe we read from may hold (the most an unprivileged process may ask)
StreamProgress = Callable[[int], Progress]  # given the snapshot's size, what hears the bytes written
WRITEBACK_STEP = 32 << 20  # a backup file's pages are handed to writeback in steps of this size


@dataclass(frozen=True)
class SnapshotOf:
    """What a snapshot is of, besides the bytes: header fields and how to read the source.

    ``single_read`` and ``check_source`` come from :func:`reading_rules`: a
    pass that reads the data twice must prove the source did not change.
    """

    name: str
    filesystem: str
    mtime_ns: int
    single_read: bool = False
    check_source: Callable[[], None] | None = None


def reading_rules(image: OpenImage, *, live: bool) -> tuple[bool, Callable[[], None] | None]:
    """A live image is read once; any other is read twice and checked unchanged afterwards.

    Whether the image is live (a loop device backs it) is a disk rule the
    caller knows; the engine only decides how to read.
    """
    if live:
        return True, None
    return False, partial(ensure_unchanged, image.fd, image.identity, image.path)


async def _index(
    source: ChunkSource,
    settings: Settings,
    of: SnapshotOf,
    *,
    frame_sink: FrameSink | None = None,
    progress: Progress | None = None,
) -> SnapshotIndex:
    index = await build_index(
        source, settings, frame_sink=frame_sink, progress=progress, single_read=of.single_read
    )
    if of.check_source is not None:
        await trio.to_thread.run_sync(of.check_source)
    return index


async def write_snapshot(
    out: BinaryIO,
    source: ChunkSource,
    settings: Settings,
    of: SnapshotOf,
    *,
    progress: Progress | None = None,
) -> Meta:
    """Write a snapshot to a seekable file object in one pass; return its metadata."""
    base = out.tell()
    placeholder = snapshot_meta(of.name, of.filesystem, source.size, of.mtime_ns, PLACEHOLDER_CHECKSUM)
    out.seek(base + placeholder.header_len())

    fd = _file_descriptor(out)
    written_back = base

    def sink(_k: int, frame: bytes) -> None:
        nonlocal written_back
        out.write(frame)
        position = out.tell()
        if fd is not None and position - written_back >= WRITEBACK_STEP:
            # Start writing back now, asynchronously, so the closing fsync finds little left.
            out.flush()
            os.posix_fadvise(fd, written_back, position - written_back, os.POSIX_FADV_DONTNEED)
            written_back = position

    index = await _index(source, settings, of, frame_sink=sink, progress=progress)
    meta = snapshot_meta(of.name, of.filesystem, source.size, of.mtime_ns, index.checksum)
    producer = SnapshotProducer(source, settings, meta, index)

    def finish() -> None:
        out.write(producer.layout.seek_table)
        end = out.tell()
        out.seek(base)
        out.write(producer.layout.header)
        out.seek(end)
        out.flush()

    await trio.to_thread.run_sync(finish)
    return meta


async def stream_snapshot(
    write: Callable[[bytes], Awaitable[object]],
    source: ChunkSource,
    settings: Settings,
    of: SnapshotOf,
    *,
    progress: Progress | None = None,
    stream_progress: StreamProgress | None = None,
) -> Meta:
    """Send a snapshot to a non-seekable writer: the index pass first, then the stream from it.

    Two passes, so two phases: ``progress`` hears the image bytes of the index
    pass; ``stream_progress(total)`` is called once the snapshot's size is known
    and returns what hears the snapshot bytes written.
    """
    index = await _index(source, settings, of, progress=progress)
    meta = snapshot_meta(of.name, of.filesystem, source.size, of.mtime_ns, index.checksum)
    producer = SnapshotProducer(source, settings, meta, index)
    if stream_progress is not None:
        written, report = 0, stream_progress(producer.size)
        target = write

        async def write(data: bytes) -> None:
            nonlocal written
            await target(data)
            written += len(data)
            report(written)

    await producer.copy_to(write)
    return meta


async def backup_image(
    image_path: str,
    output: str,
    *,
    name: str,
    filesystem: str,
    settings: Settings,
    live: bool = False,
    progress: Progress | None = None,
    stream_progress: StreamProgress | None = None,
    placed: Placed | None = None,
) -> Meta:
    """``mirenfs backup --image``: to a file (atomically, via a temporary name) or to ``-``.

    ``live``: the image may change while it is read (see :func:`reading_rules`). ``placed``
    learns when the file is in place under its name (a stream has no such moment).
    """
    if output != "-":
        output = where_a_link_leads(output)
    if output != "-" and os.path.isdir(output):  # before a whole pass, not at its end
        raise TargetError(f"cannot write {output}: it is a directory; name a file in it, such as {name}.mirn")
    image = await trio.to_thread.run_sync(OpenImage.open, image_path)
    try:
        source = image.source(settings)
        single_read, check_source = reading_rules(image, live=live)
        of = SnapshotOf(name, filesystem, image.mtime_ns, single_read, check_source)
        if output == "-" or _is_special(output):
            shown = "standard output" if output == "-" else output
            target = sys.stdout.buffer if output == "-" else _open_special(output)
            device = is_device(target.fileno()) if output == "-" else None
            try:
                with _naming_a_full_output(shown, device):

                    async def write(data: bytes) -> None:
                        await trio.to_thread.run_sync(target.write, data)

                    meta = await stream_snapshot(
                        write, source, settings, of, progress=progress, stream_progress=stream_progress
                    )
                    await trio.to_thread.run_sync(target.flush)
                    return meta
            finally:
                if target is not sys.stdout.buffer:
                    with _naming_a_full_output(shown, device):
                        target.close()  # flushes what is buffered: it may find the device full too
        return await _backup_to_regular_file(output, source, settings, of, progress, placed)
    finally:
        image.close()


async def _backup_to_regular_file(
    output: str,
    source: ChunkSource,
    settings: Settings,
    of: SnapshotOf,
    progress: Progress | None,
    placed: Placed | None,
) -> Meta:
    """Written into a file with no name (``O_TMPFILE``), named once whole: a backup killed with
    SIGKILL (the OOM killer, ``systemctl kill``) leaves nothing behind. Where the filesystem has
    no ``O_TMPFILE``, under a hidden temporary name, removed on any failure that can be caught.
    The directory is looked up once, so the file is named where it was made, even if a directory
    on the way is swapped for a link meanwhile (review Sec F2)."""
    # Split as written, never normalised: ``a/link/../b`` is the kernel's to resolve, as the checks
    # before resolved it (review S3: abspath's textual ``..`` named another directory than they did).
    directory, base = os.path.split(output)
    directory = directory or "."
    temporary: str | None = None
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise cannot_write(output, exc) from None
    try:
        try:
            fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            temporary = _hidden_name(base)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        os.close(dir_fd)
        raise cannot_write(output, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while it runs: a later backup tells it from a leftover
        _remove_leftovers_of_killed_backups(directory, base, dir_fd)
        with _naming_a_full_output(output), os.fdopen(fd, "wb", closefd=False) as out:
            meta = await write_snapshot(out, source, settings, of, progress=progress)
        # Each step names the file (trial FI F11: "No space left on device: 9", or a hidden name).
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
            os.fchmod(fd, disk_file_mode())  # never readable by others, whatever the umask
            if temporary is None:
                temporary = _name_unnamed(fd, base, dir_fd)
            _rename_into_place(temporary, base, dir_fd, meta, placed)
        except OSError as exc:
            raise cannot_write(output, exc) from None
        # The new name is durable only once its directory is (review: a crash just after the
        # command said "backed up" could lose the file a rotation then counted on). Past the
        # rename the backup is in place: a failure here is said, not a failed backup (trial FI2 G11).
        try:
            await trio.to_thread.run_sync(os.fsync, dir_fd)
        except OSError as exc:
            log.warning(
                "backed up to %s, but its directory %s could not be synced (%s): a crash before the system "
                "writes it back may lose the new file",
                output,
                directory,
                exc.strerror,
            )
        return meta
    except BaseException:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)
        os.close(dir_fd)


@trio.lowlevel.enable_ki_protection
def _rename_into_place(temporary: str, base: str, dir_fd: int, meta: Meta, placed: Placed | None) -> None:
    """The rename and its record as one step: a Ctrl-C (or SIGTERM) waits for the next
    checkpoint, so it never lands between a backup in place and the record that says so."""
    os.rename(temporary, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if placed is not None:
        placed.set(meta)


def _hidden_name(base: str) -> str:
    return f".{base}.{os.urandom(6).hex()}.tmp"


def _remove_leftovers_of_killed_backups(directory: str, base: str, dir_fd: int) -> None:
    """Remove the hidden names that backups to ``base`` killed between naming their file and the
    rename left (trial FI: a whole snapshot's worth, for good): files of this user that no live
    backup holds locked."""
    leftover = re.compile(rf"\.{re.escape(base)}\.[0-9a-f]{{12}}\.tmp")
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return  # only a clean-up: the backup goes on
    for name in names:
        if not leftover.fullmatch(name):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                continue
            if time.time() - info.st_mtime < LEFTOVER_AFTER_S:
                continue  # maybe one made a moment ago, not yet locked (review S3)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a backup at work
            still = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (still.st_dev, still.st_ino) == (info.st_dev, info.st_ino):
                os.unlink(name, dir_fd=dir_fd)
                log.warning("removed %s, left by a backup that was killed", os.path.join(directory, name))
        except OSError:
            continue
        finally:
            os.close(fd)


def _name_unnamed(fd: int, base: str, dir_fd: int) -> str:
    """Give the ``O_TMPFILE`` file a hidden name beside ``base`` in ``dir_fd`` (the rename over
    ``base`` then replaces it atomically): through ``/proc``, which needs no privilege, unlike
    ``AT_EMPTY_PATH``."""
    descriptors = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            name = _hidden_name(base)
            try:  # with a directory descriptor, os.link is linkat(AT_SYMLINK_FOLLOW), not link(2)
                os.link(str(fd), name, src_dir_fd=descriptors, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:
                continue
            return name
    finally:
        os.close(descriptors)


MAX_LINKS = 40  # as the kernel's path walk allows
LEFTOVER_AFTER_S = 60.0  # a hidden file of a backup unchanged this long, and unlocked, is a leftover


def where_a_link_leads(path: str) -> str:
    """Where ``backup -o PATH`` writes when PATH is a symbolic link: the file it leads to, through
    each link on the way, every one made by this user or root (review Sec F2: a link another
    user planted in /tmp chose which file a root backup replaced, or streamed the snapshot into
    her named pipe; the kernel's ``fs.protected_symlinks`` would have stopped ``cp`` there, but
    hosts may have it off). A link to nothing is refused, as ``cp`` refuses it."""
    followed = None
    for _ in range(MAX_LINKS):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            descriptor = own_descriptor(path)
            if descriptor is not None:
                raise TargetError(
                    f"cannot write {followed or path}: this command has no descriptor {descriptor} open; "
                    f"give a file, - for standard output, or a descriptor the shell opened (-o >(COMMAND))",
                    errno.EBADF,
                ) from None
            if followed is not None:
                raise TargetError(
                    f"{followed} is a symbolic link to {path}, which does not exist; a backup is not written "
                    "through a dangling link (nor does cp write through one): give the path to write",
                    errno.ENOENT,
                ) from None
            return path
        if not stat.S_ISLNK(info.st_mode):
            return path
        if _a_pipe_handed_to_this_command(path):
            return path  # ``-o >(ssh …)``: it has no path to follow
        if info.st_uid not in (os.geteuid(), 0):
            raise TargetError(
                f"{path} is a symbolic link that another user (uid {info.st_uid}) made; a backup is written "
                "only through links of its own user or root: give the path to write, or remove the link",
                errno.EACCES,
            )
        followed = followed or path
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    raise TargetError(f"{followed}: too many levels of symbolic links", errno.ELOOP)


_DESCRIPTOR_DIRECTORY = re.compile(r"/proc/(\d+)(?:/task/\d+)?/fd")


def own_descriptor(path: str) -> int | None:
    """The descriptor ``path`` names when it is one of this process's own (``/dev/fd/N``,
    ``/proc/self/fd/N``), else None: what the shell's ``>(…)`` hands a command."""
    directory, name = os.path.split(path)
    if not name.isdigit():
        return None
    found = _DESCRIPTOR_DIRECTORY.fullmatch(os.path.realpath(directory))
    return int(name) if found is not None and int(found.group(1)) == os.getpid() else None


def _a_pipe_handed_to_this_command(path: str) -> bool:
    """``path`` names an open descriptor of this process that leads to no path (a pipe, a socket)."""
    if own_descriptor(path) is None:
        return False
    try:
        return not os.readlink(path).startswith("/")
    except OSError:  # not open
        return False


def _open_special(output: str) -> BinaryIO:
    """A device or named pipe to stream the snapshot into, opened without creating or truncating
    anything: only one of this user or root (a named pipe another user made would hand her the
    disk, review Sec F2), looked at before the open (which waits for a pipe's reader) and again
    on what was opened."""
    descriptor = own_descriptor(output)
    try:
        if descriptor is not None:  # handed to this command: written into as it is, never reopened
            fd = os.dup(descriptor)
            return _checked_special(output, fd)
        _refuse_a_special_file_of_another_user(output, os.lstat(output))
        fd = os.open(output, os.O_WRONLY | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise cannot_write(output, exc) from None
    return _checked_special(output, fd)


def _checked_special(output: str, fd: int) -> BinaryIO:
    try:
        _refuse_a_special_file_of_another_user(output, os.fstat(fd))
        _refuse_what_takes_no_snapshot(output, fd)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def refuse_a_descriptor_that_takes_no_snapshot(output: str) -> None:
    """Before anything is frozen or read: ``-o /dev/fd/N`` naming a pipe of this command that
    cannot take the snapshot (see :func:`_refuse_what_takes_no_snapshot`)."""
    descriptor = own_descriptor(output)
    if descriptor is not None and _a_pipe_handed_to_this_command(output):
        _refuse_what_takes_no_snapshot(output, descriptor)


def _refuse_what_takes_no_snapshot(output: str, fd: int) -> None:
    """A descriptor open for reading only (``-o <(ssh …)``, the typo of ``>(ssh …)``: it failed with
    "Bad file descriptor" after the whole pass, review S4 F1), or a terminal (a snapshot is
    binary, and ``-o /dev/fd/2`` wrote it onto one, review S4 F2)."""
    try:
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        terminal = os.isatty(fd)
    except OSError as exc:
        raise cannot_write(output, exc) from None
    if read_only:
        raise TargetError(
            f"cannot write {output}: it is open for reading only (the shell's <(COMMAND) hands a "
            "command its output to read; -o >(COMMAND) hands it a pipe to write)",
            errno.EBADF,
        )
    if terminal:
        raise TargetError(
            f"cannot write {output}: it is a terminal, and a snapshot is binary: send it to a file or a pipe",
            errno.ENOTTY,
        )


def _refuse_a_special_file_of_another_user(output: str, info: os.stat_result) -> None:
    problem = None
    if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode) or stat.S_ISLNK(info.st_mode):
        problem = "it was replaced by a file meanwhile; run the backup again"
    elif info.st_uid not in (os.geteuid(), 0):
        problem = (
            f"it is a device or named pipe that another user (uid {info.st_uid}) made, and the snapshot "
            "holds a whole disk; write to a file or a pipe of your own"
        )
    if problem is not None:
        raise TargetError(f"cannot write {output}: {problem}", errno.EACCES)


@contextlib.contextmanager
def _naming_a_full_output(output: str, device: bool | None = None) -> Iterator[None]:
    """A write that found no space names the snapshot file and its full filesystem (or device),
    not just "No space left on device"; other errors (a read of the image) pass as they are."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise cannot_write(output, exc, device=device) from None


def _file_descriptor(fileobj: BinaryIO) -> int | None:
    """The descriptor of a real file, or None for in-memory objects (the API accepts those)."""
    try:
        return fileobj.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _is_special(path: str) -> bool:
    """A device or named pipe at ``path`` itself: a link found here now was put there after
    :func:`where_a_link_leads` looked, and the rename of a regular backup replaces it (review S3)."""
    if _a_pipe_handed_to_this_command(path):
        return True
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISLNK(mode)


async def read_pieces(
    fileobj: BinaryIO, piece: int = READ_PIECE, *, progress: Progress | None = None
) -> AsyncIterator[bytes]:
    """Read a file or pipe in pieces; ``progress`` hears the bytes read so far.

    A regular file is read on a worker thread. A pipe or terminal that
    :func:`open_input` opened (unbuffered) is waited on in the event loop
    instead, so a cancel (Ctrl-C, SIGTERM) ends a restore whose writer
    stalled rather than wait for a read that never returns.
    """
    done = 0
    fd = _pollable(fileobj)
    while True:
        try:
            if fd is not None:
                await trio.lowlevel.wait_readable(fd)
                data = _read_available(fd, piece)
            else:
                data = await trio.to_thread.run_sync(fileobj.read, piece)
        except OSError as exc:  # trial FI F2: a bare "Input/output error", naming no file
            raise SnapshotUnreadableError(f"cannot read it: {exc.strerror}") from None
        if not data:
            return
        done += len(data)
        if progress is not None:
            progress(done)
        yield data


def _read_available(fd: int, limit: int) -> bytes:
    """What a readable pipe holds, up to ``limit`` bytes, without waiting for more: pieces of
    one pipe buffer each would cost the pipeline a hand-off per 64 KiB."""
    parts = [os.read(fd, limit)]
    size = len(parts[0])
    while parts[-1] and size < limit and select.select([fd], [], [], 0)[0]:
        parts.append(os.read(fd, limit - size))  # b"" at the end: the next read says so again
        size += len(parts[-1])
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _pollable(fileobj: BinaryIO) -> int | None:
    """The descriptor to wait on: an unbuffered pipe, socket or terminal (a buffered one may hold
    bytes already read, and regular files cannot be polled)."""
    if not isinstance(fileobj, io.FileIO):
        return None
    fd = fileobj.fileno()
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        return None
    try:  # epoll refuses some character devices (/dev/zero): those are read on a thread
        with select.epoll() as probe:
            probe.register(fd, select.EPOLLIN)
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        with contextlib.suppress(OSError):  # a larger pipe: fewer, larger pieces (1 MiB is allowed to all)
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BUFFER)
    return fd


async def restore_file(
    snapshot: str,
    image_path: str,
    *,
    overwrite: bool,
    on_header: Callable[[Meta], None] | None = None,
    progress: Progress | None = None,
    check_target: Callable[[], None] | None = None,
    placed: Placed | None = None,
) -> Meta:
    """``mirenfs restore FILE --image PATH``; ``FILE`` may be ``-`` for standard input.
    ``progress`` hears the snapshot bytes read so far; ``placed``, when the image is replaced."""
    with open_input(snapshot) as source:
        return await restore_to_path(
            image_path,
            read_pieces(source, progress=progress),
            overwrite=overwrite,
            on_header=on_header,
            check_target=check_target,
            placed=placed,
        )


class _NullWriter:
    """Counts nothing and keeps nothing: verification only needs the hash and the size."""

    def write(self, data: bytes) -> None:
        return None


async def verify_file(
    snapshot: str,
    on_header: Callable[[Meta], None] | None = None,
    *,
    progress: Progress | None = None,
) -> Meta:
    """``mirenfs verify``: decompress everything, check size, checksum and a seek table, write nothing.
    ``progress`` hears the snapshot bytes read so far."""

    async def open_target(meta: Meta) -> ImageWriter:
        if on_header is not None:
            on_header(meta)
        return _NullWriter()

    # A restore ignores the seek table, as SPEC §2 has readers ignore skippable frames; verify checks it.
    stream = RestoreStream(open_target, check_seek_table=True)
    with open_input(snapshot) as source:
        async for piece in read_pieces(source, progress=progress):
            await stream.feed(piece)
    return await stream.finish()


def open_input(path: str) -> BinaryIO:
    """A snapshot to read: a file, or ``-`` for standard input."""
    if path == "-":  # unbuffered: read_pieces waits on a pipe in the event loop, where a cancel reaches it
        if os.isatty(sys.stdin.fileno()):  # it would wait, silent, for a snapshot typed in (trial T20)
            raise MirenfsError(
                "standard input is a terminal, not a snapshot; pipe one in (… | mirenfs verify -) or "
                "name its file"
            )
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0)
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise MirenfsError(f"cannot open snapshot {path}: {exc.strerror}") from None


INSPECT_READ = 1 << 20  # bytes inspect reads from a pipe at a time, on its way to the seek table


@dataclass(frozen=True)
class Inspected:
    """What ``mirenfs inspect`` shows of a snapshot: its header, the lengths, the seek table's
    frame count (None without a seek table at the end: Go's snapshots, a file cut short)."""

    meta: Meta
    header_bytes: int
    data_bytes: int
    seekable_frames: int | None


def inspect_snapshot(snapshot: BinaryIO) -> Inspected:
    """Read a snapshot's header and find the seek table at its end, checking no data: from a
    file by seeking, from a pipe by reading to its end (SPEC §4: FILE may be ``-``). Blocking."""
    counted = _Counted(snapshot)
    meta = read_header(counted)
    if snapshot.seekable():  # from where the header ended: stdin may start inside a file
        data_len = os.fstat(snapshot.fileno()).st_size - snapshot.tell()
        table = _seek_table_at_the_end(snapshot, data_len)
    else:
        data_len, table = _read_to_the_end(snapshot)
    return Inspected(meta, counted.taken, data_len, _seek_table_frames(table))


class _Counted:
    """A reader that counts what was read through it: a pipe cannot tell where the header ended."""

    def __init__(self, source: BinaryIO) -> None:
        self._source, self.taken = source, 0

    def read(self, size: int) -> bytes:
        piece = self._source.read(size)
        self.taken += len(piece)
        return piece


def _seek_table_at_the_end(snapshot: BinaryIO, data_len: int) -> bytes:
    """The bytes a seek table at the end of a file would take, as its footer says (12 bytes a
    frame: 3 MiB for a 1 TiB disk), up to the limit ``verify`` keeps, not a fixed tail."""
    if data_len < SEEK_TABLE_FOOTER_LEN:
        return b""
    snapshot.seek(-SEEK_TABLE_FOOTER_LEN, os.SEEK_END)
    tail_len = min(data_len, seek_table_length(snapshot.read(SEEK_TABLE_FOOTER_LEN)), MAX_SEEK_TABLE)
    snapshot.seek(-tail_len, os.SEEK_END)
    return snapshot.read(tail_len)


def _read_to_the_end(stream: BinaryIO) -> tuple[int, bytes]:
    """The length of what is left of ``stream``, and the bytes its footer says a seek table
    takes at its end (at most what ``verify`` keeps). The last pieces read are kept as they are
    and only the table is joined: a tail cut at each read would copy 64 MiB per piece, and
    joining all that is kept doubled the memory (review S20: 170 MB for any stream)."""
    length, kept, kept_len = 0, collections.deque[bytes](), 0
    while piece := stream.read(INSPECT_READ):
        length += len(piece)
        kept.append(piece)
        kept_len += len(piece)
        while kept_len - len(kept[0]) >= MAX_SEEK_TABLE:
            kept_len -= len(kept.popleft())
    footer = _last_bytes(kept, SEEK_TABLE_FOOTER_LEN)
    if len(footer) < SEEK_TABLE_FOOTER_LEN:
        return length, footer
    return length, _last_bytes(kept, min(seek_table_length(footer), MAX_SEEK_TABLE))


def _last_bytes(pieces: collections.deque[bytes], count: int) -> bytes:
    """The last ``count`` bytes of ``pieces`` (fewer if they hold fewer), joined."""
    taken: list[bytes] = []
    needed = count
    for piece in reversed(pieces):
        if needed <= 0:
            break
        taken.append(piece[-needed:] if len(piece) > needed else piece)
        needed -= len(taken[-1])
    return b"".join(reversed(taken))


def _seek_table_frames(table: bytes) -> int | None:
    """The frame count of the seekable-format seek table ``table`` (the bytes its footer says it
    takes), or None for other layouts (Go's) and a table cut short."""
    if len(table) < SEEK_TABLE_FOOTER_LEN:
        return None
    try:
        return seek_table_frame_count(table)
    except FormatError:
        return None
