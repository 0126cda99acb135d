"""Consuming snapshots as a stream: the header, then any valid zstd data,
decompressed, hashed and written sparsely as it arrives, in bounded memory.

Each :meth:`RestoreStream.feed` runs two trio worker threads side by side:
one scans frame structure, decompresses and writes; the other hashes the
decompressed bytes in order. A bounded queue between them caps memory even
for a frame that inflates 30 000-fold (a 4 MiB hole is a 151-byte frame).
"""

from __future__ import annotations

import hashlib
import os
import queue
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable
from functools import partial
from typing import IO, Protocol, cast

import trio
import zstandard

from mirenfs.engine.aio import task_group
from mirenfs.engine.image import SparseWriter, StagingImage, new_file_mode
from mirenfs.errors import FormatError, MirenfsError, TargetError
from mirenfs.format.frames import FrameScanner
from mirenfs.format.header import HeaderParser, Meta, validate_meta

_PIECE = 1 << 20  # decompressed bytes per hand-over to the hashing thread
_QUEUE_PIECES = 16  # at most this many pieces wait for the hasher
_END = None


class ImageWriter(Protocol):
    """Receives the restored image in order (a :class:`SparseWriter` or a file)."""

    def write(self, data: bytes) -> object: ...


OpenTarget = Callable[[Meta], Awaitable[ImageWriter]]


class RestoreStream:
    """A restore fed with snapshot bytes in order, in pieces of any size.

    ``open_target`` is awaited once the header is known (its size and name
    may decide where the image goes) and returns the writer for the image.
    After any error the stream stays failed and every later call raises it.
    """

    def __init__(self, open_target: OpenTarget, *, header_read: Meta | None = None) -> None:
        self._open_target = open_target
        self._header = HeaderParser()
        if header_read is not None:  # the caller already consumed the header (Go's RestoreImage)
            self._header.meta = validate_meta(header_read)
        self._scanner = FrameScanner()
        self._sha = hashlib.sha256()
        self._hash_queue: queue.Queue[bytes | None] = queue.Queue(_QUEUE_PIECES)
        self._writer: ImageWriter | None = None
        self._decompressor: zstandard.ZstdDecompressionWriter | None = None
        self._failure: MirenfsError | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def meta(self) -> Meta | None:
        return self._header.meta

    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next piece of the snapshot; raise as soon as it shows a problem."""
        self._check_failed()
        try:
            self.bytes_in += len(data)
            rest = memoryview(data)
            if self._writer is None:
                rest = self._header.feed(rest)
                if self._header.meta is None:
                    return
                self._writer = await self._open_target(self._header.meta)
                self._decompressor = zstandard.ZstdDecompressor().stream_writer(
                    cast(IO[bytes], _Sink(self)), write_size=_PIECE, closefd=False
                )
            if len(rest):
                await self._decompress(bytes(rest))
        except MirenfsError as exc:
            self._failure = exc
            raise

    async def finish(self) -> Meta:
        """Check that the stream is complete, exactly ``size_bytes`` long, and matches its checksum."""
        self._check_failed()
        try:
            meta = self._header.meta
            if meta is not None and self._writer is None:
                self._writer = await self._open_target(meta)  # a header with no data at all
            if meta is None:
                raise FormatError(
                    f"the snapshot header is truncated: the stream ended after {self.bytes_in} bytes"
                )
            if not self._scanner.at_boundary:
                raise FormatError("the snapshot data is truncated: the stream ended inside a zstd frame")
            if self.bytes_out != meta.size_bytes:
                raise FormatError(
                    f"the snapshot data is short: it decompresses to {self.bytes_out} bytes, "
                    f"the header says {meta.size_bytes}"
                )
            actual = self._sha.hexdigest()
            if actual != meta.checksum.lower():
                raise FormatError(
                    f"checksum mismatch: the data hashes to {actual}, the header says {meta.checksum}"
                )
            return meta
        except MirenfsError as exc:
            self._failure = exc
            raise
        finally:
            self._decompressor = None  # its context may hold a large window: free it now

    @property
    def complete(self) -> bool:
        """Whether the bytes so far form a whole snapshot: all of ``size_bytes`` out, no frame cut."""
        meta = self._header.meta
        return meta is not None and self.bytes_out == meta.size_bytes and self._scanner.at_boundary

    def _check_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _decompress(self, data: bytes) -> None:
        async with task_group() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, self._hash_until_end)
            await trio.to_thread.run_sync(self._decompress_sync, data)

    def _decompress_sync(self, data: bytes) -> None:
        assert self._decompressor is not None
        try:
            self._scanner.feed(data)
            self._decompressor.write(data)
        except zstandard.ZstdError as exc:
            raise FormatError(f"the snapshot data is corrupt: {exc}") from None
        finally:
            self._hash_queue.put(_END)  # from this thread: the hasher is draining, so it cannot deadlock

    def _hash_until_end(self) -> None:
        while (piece := self._hash_queue.get()) is not _END:
            self._sha.update(piece)

    def _take_output(self, piece: bytes) -> None:
        """Called by the decompressor with each decompressed piece (worker thread)."""
        meta = self._header.meta
        assert meta is not None and self._writer is not None
        if self.bytes_out + len(piece) > meta.size_bytes:
            raise FormatError(
                f"the snapshot data is longer than its header's size_bytes ({meta.size_bytes}): refused"
            )
        self.bytes_out += len(piece)
        self._hash_queue.put(piece)
        self._writer.write(piece)


class _Sink:
    """The file-like object zstandard's stream writer pushes output into.

    It holds its stream weakly: the stream holds the writer, which holds this
    sink, and the garbage collector cannot see the reference inside
    zstandard's C object, so a strong one here would keep every stream and
    its decompression context (up to 128 MiB for a large window) alive forever.
    """

    def __init__(self, stream: RestoreStream) -> None:
        self._stream = weakref.ref(stream)

    def write(self, data: bytes) -> int:
        stream = self._stream()
        if stream is None:
            raise FormatError("the restore this data belongs to has ended")
        stream._take_output(data)
        return len(data)


ChunkIterable = AsyncIterable[bytes]
ChooseImage = Callable[[Meta], Awaitable[str]]


class StagedRestore:
    """A restore pushed piece by piece into ``<image>.restore.tmp`` and installed at the end.

    ``choose_image`` learns the header and answers the image path (a disk
    restore creates its disk there). The image is replaced only by
    :meth:`finish` after everything verified; :meth:`discard` removes the
    staging file and is safe to call at any point, any number of times.
    """

    def __init__(
        self,
        choose_image: ChooseImage,
        *,
        header_read: Meta | None = None,
        before_install: Callable[[], Awaitable[None]] | None = None,
        new_mode: int = 0o600,
    ) -> None:
        self._choose_image = choose_image
        self._before_install = before_install
        self._new_mode = new_mode  # for an image that did not exist before
        self._staging: StagingImage | None = None
        self.stream = RestoreStream(self._open_target, header_read=header_read)

    async def _open_target(self, meta: Meta) -> ImageWriter:
        image_path = await self._choose_image(meta)
        self._staging = await trio.to_thread.run_sync(StagingImage.create, image_path, meta.size_bytes)
        return SparseWriter(self._staging.fd)

    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.feed(data)

    async def finish(self) -> Meta:
        """Verify the whole stream, then fsync, rename over the image and fsync the directory."""
        meta = await self.stream.finish()
        assert self._staging is not None
        if self._before_install is not None:
            await self._before_install()  # the last moment a refusal can still keep the old image
        await trio.to_thread.run_sync(
            partial(self._staging.install, meta.timestamp.unix_ns, new_mode=self._new_mode)
        )
        return meta

    async def discard(self) -> None:
        if self._staging is not None:
            await trio.to_thread.run_sync(self._staging.discard)


async def restore_to_path(
    image_path: str,
    chunks: ChunkIterable,
    *,
    overwrite: bool,
    on_header: Callable[[Meta], None] | None = None,
    header_read: Meta | None = None,
) -> Meta:
    """Restore a snapshot stream into ``image_path`` through its staging file (SPEC §3).

    Nothing changes at ``image_path`` unless the whole stream verified; on
    any failure the staging file is removed.
    """
    if not overwrite and os.path.exists(image_path):
        raise TargetError(f"{image_path} already exists; pass --force to replace it")

    async def choose_image(meta: Meta) -> str:
        if on_header is not None:
            on_header(meta)
        return image_path

    # A new image file the caller named gets the mode `cp` would give it.
    restore = StagedRestore(choose_image, header_read=header_read, new_mode=new_file_mode())
    try:
        async for chunk in chunks:
            await restore.feed(chunk)
        return await restore.finish()
    finally:
        await restore.discard()
