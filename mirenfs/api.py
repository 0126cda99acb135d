"""The Python API, mirroring Miren's Go package (``Backup``, ``RestoreImage``, …).

These are blocking functions; each runs the shared trio engine to completion,
so they must not be called from inside a running trio loop.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import stat
import time
from functools import partial
from typing import BinaryIO

import trio

from mirenfs.disks.live import image_in_use
from mirenfs.disks.rules import refuse_if_image_in_use
from mirenfs.engine.consume import ImageWriter, RestoreStream, restore_to_path
from mirenfs.engine.files import (
    SnapshotOf,
    read_pieces,
    reading_rules,
    stream_snapshot,
    write_snapshot,
)
from mirenfs.engine.image import ChunkSource, FdImageSource, FileObjectSource, ImageIdentity, OpenImage
from mirenfs.engine.produce import Settings
from mirenfs.errors import MirenfsError
from mirenfs.format.header import Meta, Timestamp


def backup(
    dst: BinaryIO,
    src: BinaryIO,
    name: str,
    size_bytes: int,
    filesystem: str,
    *,
    timestamp: Timestamp | _dt.datetime | None = None,
    settings: Settings | None = None,
) -> str:
    """Write a snapshot of the first ``size_bytes`` bytes of ``src`` to ``dst``; return the checksum.

    ``src`` must be seekable. A real file is read with hole detection. The
    timestamp defaults to the source file's mtime (or now for other objects).
    A seekable ``dst`` is written in one pass; any other in two.
    """
    settings = settings or Settings()
    source, of = _backup_source(src, size_bytes, settings, name, filesystem)
    if isinstance(timestamp, _dt.datetime):
        timestamp = Timestamp.from_datetime(timestamp)
    if timestamp is not None:
        of = dataclasses.replace(of, mtime_ns=timestamp.unix_ns)

    async def run() -> Meta:
        if _seekable(dst):
            return await write_snapshot(dst, source, settings, of)

        async def write(data: bytes) -> None:
            await trio.to_thread.run_sync(dst.write, data)

        return await stream_snapshot(write, source, settings, of)

    return trio.run(run).checksum


def restore_image(dst: str | os.PathLike[str] | BinaryIO, src: BinaryIO, meta: Meta) -> None:
    """Restore the image from ``src``, positioned after the header (as :func:`read_header` leaves it).

    A path is restored atomically through ``<path>.restore.tmp`` and replaced
    only when size and checksum verified; a file object just receives the bytes.
    """
    if isinstance(dst, (str, os.PathLike)):
        path = os.fspath(dst)
        in_use = partial(refuse_if_image_in_use, path, action="restoring over it")  # as the CLI does
        trio.run(
            partial(
                restore_to_path, path, read_pieces(src), overwrite=True, header_read=meta, check_target=in_use
            )
        )
        return

    async def open_target(_meta: Meta) -> ImageWriter:
        return dst

    async def run_object() -> None:
        stream = RestoreStream(open_target, header_read=meta)
        async for piece in read_pieces(src):
            await stream.feed(piece)
        await stream.finish()

    trio.run(run_object)


def _seekable(fileobj: BinaryIO) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, ValueError):
        return False


def _backup_source(
    src: BinaryIO, size_bytes: int, settings: Settings, name: str, filesystem: str
) -> tuple[ChunkSource, SnapshotOf]:
    """A real file is read like the CLI reads an image (holes skipped, two reads when it is
    not live); any other seekable object is read once, chunk by chunk."""
    if not _seekable(src):
        raise MirenfsError("backup needs a seekable source: the checksum in the header covers every byte")
    try:
        fd = src.fileno()
        info = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return FileObjectSource(src, size_bytes, settings.chunk_size), SnapshotOf(
            name, filesystem, time.time_ns(), single_read=True
        )
    if stat.S_ISREG(info.st_mode) and src.tell() == 0 and info.st_size == size_bytes:
        image = OpenImage(os.readlink(f"/proc/self/fd/{fd}"), fd, ImageIdentity.from_stat(info))
        single_read, check_source = reading_rules(image, live=image_in_use(image.path))
        of = SnapshotOf(name, filesystem, info.st_mtime_ns, single_read, check_source)
        return FdImageSource(fd, size_bytes, settings.chunk_size), of
    of = SnapshotOf(name, filesystem, info.st_mtime_ns, single_read=True)
    return FileObjectSource(src, size_bytes, settings.chunk_size), of
