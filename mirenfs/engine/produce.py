"""Producing snapshots (SPEC §2.1): one pass builds an index, and with the index
any byte range of the snapshot is produced by compressing only the chunks it touches.

The pass runs three lanes on trio worker threads: reading, hashing (one
ordered SHA-256 stream) and compression (one frame per chunk, as many at once
as there are cores). zstandard and hashlib release the GIL, so all cores work.
With a frame store (engine.framestore) the compression lane fingerprints each
chunk and compresses only those the store lacks, and the hash lane keeps its
state at every chunk boundary, so the next pass over a changed image hashes
from the first changed chunk on (engine.sha256).

Never: let a snapshot's bytes depend on the store or on a basis (a stored
frame is exactly what compressing its chunk gives, and a resumed hash is the
hash of the same bytes); serve a frame that does not match the index.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

import trio

from mirenfs.engine import sha256
from mirenfs.engine.aio import task_group
from mirenfs.engine.framestore import FrameStore, fingerprint
from mirenfs.engine.image import ChunkSource, Hasher, chunk_count, chunk_length, zeros
from mirenfs.engine.pipeline import BULK_WORK, fast_gil_handoff
from mirenfs.errors import ImageChangedError
from mirenfs.format.frames import (
    MAX_FRAME_CONTENT,
    compress_frame,
    frame_checksum,
    seek_table_len,
    seek_table_of_arrays,
    zero_frame,
    zstd_library_version,
)
from mirenfs.format.header import EARLIEST_HEADER_NS, LATEST_HEADER_NS, Meta, Timestamp

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_LEVEL = 3
HASH_LEAD = 1 << 30  # bytes the hash lane may read ahead of the frames (see _Lead)
PROGRESS_INTERVAL_S = 0.25  # how often a pass tells its progress (what status shows)
LIVE_HASH_BATCH = 16  # chunks of zeros a single-read pass hashes per thread trip (64 MiB: ~40 ms)
PLACEHOLDER_CHECKSUM = "0" * 64
INDEX_FORMAT = 4  # 2: chunk fingerprints for the frame store; 3: BLAKE3 ones; 4: raw arrays, not JSON
_JSON_INDEX_FORMAT = 3  # the last format that was all JSON: still read
FINGERPRINT = 32  # bytes of a chunk fingerprint (BLAKE3)
MIDSTATE = sha256.MIDSTATE


@dataclass(frozen=True)
class Settings:
    """Compression settings; with the image contents they fix a snapshot's bytes."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int = DEFAULT_LEVEL
    workers: int = field(default_factory=lambda: os.cpu_count() or 2, compare=False)

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.chunk_size % 4096 or self.chunk_size > MAX_FRAME_CONTENT:
            raise ValueError("chunk size must be a multiple of 4 KiB, at most 1 GiB")

    def key(self) -> str:
        """Identifies the settings in cache keys, including the zstd library version,
        since another zstd release may compress the same chunk differently."""
        return f"zstd{zstd_library_version()}-l{self.level}-c{self.chunk_size}"


class StaleIndexError(ValueError):
    """A sound index in another format (another mirenfs version wrote it): rebuilt, not an error."""


@dataclass
class SnapshotIndex:
    """What one pass over an image learns: everything but the frames themselves."""

    size_bytes: int
    chunk_size: int
    settings_key: str
    checksum: str
    frame_sizes: array[int]  # compressed size of each chunk's frame
    frame_checksums: array[int]  # XXH64 low 32 bits of each chunk, as in the seek table
    zero_chunks: bytearray  # 1 where the chunk is all zeros (served as the precomputed frame)
    # SHA-256 of each data chunk, 32 bytes each (zeros for a zero chunk), where a frame store
    # was used; empty otherwise. With them a remount finds every frame without reading the image.
    fingerprints: bytes = b""
    # The SHA-256 state before each chunk (engine.sha256), 40 bytes each, where recorded: a later
    # pass whose first chunks have the same fingerprints resumes hashing after them.
    midstates: bytes = b""
    compressed: int = field(default=0, compare=False)  # chunks the pass compressed (not persisted)
    hashed_from: int = field(default=0, compare=False)  # the first chunk the pass hashed (not persisted)
    read_format: int = field(default=INDEX_FORMAT, compare=False)  # the cache format it was read in

    def fingerprint(self, k: int) -> bytes | None:
        """Chunk ``k``'s fingerprint, if the pass recorded them."""
        if not self.fingerprints or self.zero_chunks[k]:
            return None
        return self.fingerprints[k * FINGERPRINT : (k + 1) * FINGERPRINT]

    def same_chunk(self, k: int, zero: int, chunk_fingerprint: bytes | bytearray) -> bool:
        """Whether chunk ``k`` held exactly these bytes (by zero flag and fingerprint)."""
        return self.zero_chunks[k] == zero and self.fingerprints[k * FINGERPRINT : (k + 1) * FINGERPRINT] == (
            chunk_fingerprint
        )

    def midstate(self, k: int) -> bytes:
        return self.midstates[k * MIDSTATE : (k + 1) * MIDSTATE]

    def can_resume(self, size: int, chunk_size: int, settings_key: str) -> bool:
        """Whether a pass over an image of this shape may take up hashing where this one was."""
        count = chunk_count(size, chunk_size)
        return (
            (self.size_bytes, self.chunk_size, self.settings_key) == (size, chunk_size, settings_key)
            and len(self.fingerprints) == FINGERPRINT * count
            and len(self.midstates) == MIDSTATE * count
        )

    @property
    def frame_count(self) -> int:
        return len(self.frame_sizes)

    @property
    def nbytes(self) -> int:
        """Memory the arrays take: 81 bytes a chunk with fingerprints and states, 21 MB a TiB."""
        arrays = (self.frame_sizes, self.frame_checksums, self.zero_chunks, self.fingerprints, self.midstates)
        return sum(memoryview(values).nbytes for values in arrays)

    def encoded(self) -> list[bytes | bytearray | memoryview]:
        """A self-describing, checked encoding for the persistent cache, in pieces: a digest line,
        a JSON line of the scalars, then the arrays as they are in memory. Written piece by piece,
        a 1 TiB disk's index (21 MB) costs no second copy (base64 in JSON took six times its size)."""
        raw: list[bytes | bytearray | memoryview] = [
            memoryview(self.frame_sizes).cast("B"),
            memoryview(self.frame_checksums).cast("B"),
            self.zero_chunks,
            self.fingerprints,
            self.midstates,
        ]
        head = {
            "format": INDEX_FORMAT,
            "byteorder": sys.byteorder,
            "size_bytes": self.size_bytes,
            "chunk_size": self.chunk_size,
            "settings": self.settings_key,
            "checksum": self.checksum,
            "fingerprints": len(self.fingerprints),
            "midstates": len(self.midstates),
        }
        pieces = [json.dumps(head, sort_keys=True).encode() + b"\n", *raw]
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        return [digest.hexdigest().encode() + b"\n", *pieces]

    def to_bytes(self) -> bytes:
        return b"".join(self.encoded())

    @classmethod
    def from_bytes(cls, data: bytes) -> SnapshotIndex:
        """Decode a cache entry; raise ValueError for anything corrupt, so it is rebuilt, and
        StaleIndexError for an entry of a format this mirenfs no longer reads."""
        digest, _, _ = data[:65].partition(b"\n")
        body = memoryview(data)[len(digest) + 1 :]
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise ValueError("index checksum mismatch")
        head_end = data.find(b"\n", len(digest) + 1)
        head = json.loads(data[len(digest) + 1 : head_end if head_end >= 0 else len(data)])
        if not isinstance(head, dict):
            raise ValueError("index head is not an object")
        if head.get("format") == _JSON_INDEX_FORMAT and head_end < 0:
            return cls._from_json(head)
        if head.get("format") != INDEX_FORMAT:
            raise StaleIndexError(f"index format {head.get('format')}, this mirenfs writes {INDEX_FORMAT}")
        if head.get("byteorder") != sys.byteorder:
            raise StaleIndexError(
                f"index of a {head.get('byteorder')}-endian machine, this one is {sys.byteorder}-endian"
            )
        size_bytes, chunk_size = int(head["size_bytes"]), int(head["chunk_size"])
        count = chunk_count(size_bytes, chunk_size)
        lengths = (4 * count, 4 * count, count, int(head["fingerprints"]), int(head["midstates"]))
        if min(lengths) < 0 or len(data) - head_end - 1 != sum(lengths):
            raise ValueError("index arrays do not match the image size")
        parts, at = [], head_end + 1
        for length in lengths:
            parts.append(memoryview(data)[at : at + length])
            at += length
        sizes, checksums = array("I"), array("I")
        sizes.frombytes(parts[0])
        checksums.frombytes(parts[1])
        return cls(
            size_bytes=size_bytes,
            chunk_size=chunk_size,
            settings_key=str(head["settings"]),
            checksum=str(head["checksum"]),
            frame_sizes=sizes,
            frame_checksums=checksums,
            zero_chunks=bytearray(parts[2]),
            fingerprints=bytes(parts[3]),
            midstates=bytes(parts[4]),
        ).checked()

    @classmethod
    def _from_json(cls, body: dict[str, Any]) -> SnapshotIndex:
        """Format 3, all JSON with base64 arrays: still read, so that a new mirenfs does not hash
        every disk again; the index cache writes it back in the current format."""
        sizes, checksums = array("I"), array("I")
        sizes.frombytes(base64.b64decode(body["frame_sizes"]))
        checksums.frombytes(base64.b64decode(body["frame_checksums"]))
        return cls(
            size_bytes=int(body["size_bytes"]),
            chunk_size=int(body["chunk_size"]),
            settings_key=str(body["settings"]),
            checksum=str(body["checksum"]),
            frame_sizes=sizes,
            frame_checksums=checksums,
            zero_chunks=bytearray(base64.b64decode(body["zero_chunks"])),
            fingerprints=base64.b64decode(body["fingerprints"]),
            midstates=base64.b64decode(body["midstates"]),
            read_format=_JSON_INDEX_FORMAT,
        ).checked()

    def checked(self) -> SnapshotIndex:
        """This index, if its arrays have the lengths its image size calls for."""
        count = chunk_count(self.size_bytes, self.chunk_size)
        if not (len(self.frame_sizes) == len(self.frame_checksums) == len(self.zero_chunks) == count):
            raise ValueError("index arrays do not match the image size")
        if len(self.fingerprints) not in (0, FINGERPRINT * count):
            raise ValueError("index fingerprints do not match the image size")
        if len(self.midstates) not in (0, MIDSTATE * count):
            raise ValueError("index hash states do not match the image size")
        return self


class SnapshotLayout:
    """Where each byte of a snapshot comes from: header, frame k, or the seek table."""

    def __init__(self, meta: Meta, index: SnapshotIndex) -> None:
        self.meta = meta
        self.index = index
        self.header = meta.header()
        # Arrays, not lists: 8 bytes a frame instead of a Python int's 36 (a 1 TiB disk: 262 144)
        self.frame_offsets = array("Q", itertools.accumulate(index.frame_sizes, initial=len(self.header)))
        self.data_end = self.frame_offsets[-1]
        size, chunk, count = index.size_bytes, index.chunk_size, index.frame_count
        decompressed = array("I", [chunk]) * count
        if count:
            decompressed[-1] = chunk_length(size, chunk, count - 1)
        self.seek_table = seek_table_of_arrays(index.frame_sizes, decompressed, index.frame_checksums)
        self.total_size = self.data_end + len(self.seek_table)

    def frame_at(self, offset: int) -> int:
        """The frame holding snapshot byte ``offset`` (which must be in the data region)."""
        return bisect_right(self.frame_offsets, offset) - 1


class FrameSpill:
    """The frames an index pass produced, kept in an unlinked file so that the read
    which triggered the pass does not compress everything a second time.

    It holds a prefix of the frames: writing stops once ``limit`` bytes are used.
    """

    def __init__(self, directory: str, limit: int) -> None:
        self.limit = limit
        self.frames = 0
        self.bytes = 0
        self._full = False
        try:
            self.fd = os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        except OSError:  # no O_TMPFILE on this filesystem: an unlinked named file is the same
            fd, path = tempfile.mkstemp(dir=directory, prefix=".spill-")
            os.unlink(path)
            self.fd = fd

    def append(self, k: int, frame: bytes) -> None:
        """Frame sink for :func:`build_index`: keeps frames in order until the limit."""
        if self._full or k != self.frames or self.bytes + len(frame) > self.limit:
            self._full = True
            return
        written = 0
        try:
            while written < len(frame):
                written += os.pwrite(self.fd, memoryview(frame)[written:], self.bytes + written)
        except OSError as exc:
            # A full state directory (ENOSPC) only ends the spilling: it is an optimisation.
            self._full = True
            log.warning(
                "cannot keep more frames of an index pass in the spill file (%s); "
                "reads will compress them again",
                exc.strerror,
            )
            return
        self.bytes += len(frame)
        self.frames += 1

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise ImageChangedError("the spilled frames of this snapshot are incomplete")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def snapshot_meta(name: str, filesystem: str, size: int, mtime_ns: int, checksum: str) -> Meta:
    """The metadata mirenfs writes: timestamp = image mtime, so bytes are reproducible. An mtime
    outside the years 0000 to 9999 (btrfs and tmpfs keep any) is clamped to the nearest one a
    header can hold, with a warning: written as it is, neither Go nor mirenfs would read it."""
    held = min(max(mtime_ns, EARLIEST_HEADER_NS), LATEST_HEADER_NS)
    if held != mtime_ns:
        log.warning(
            "disk %s: its image's modification time (%d ns after 1970) is outside the years 0000 to "
            "9999 a snapshot header can hold; the header says %s, and a disk restored from it gets "
            "that time",
            name,
            mtime_ns,
            Timestamp.from_unix_ns(held).rfc3339(),
        )
    return Meta(
        name=name,
        size_bytes=size,
        filesystem=filesystem,
        timestamp=Timestamp.from_unix_ns(held),
        checksum=checksum,
    )


def snapshot_size(meta: Meta, index: SnapshotIndex) -> int:
    return meta.header_len() + sum(index.frame_sizes) + seek_table_len(index.frame_count)


FrameSink = Callable[[int, bytes], None]
Progress = Callable[[int], None]


async def build_index(
    source: ChunkSource,
    settings: Settings,
    *,
    frame_sink: FrameSink | None = None,
    progress: Progress | None = None,
    single_read: bool = False,
    store: FrameStore | None = None,
    basis: SnapshotIndex | None = None,
) -> SnapshotIndex:
    """One pass over ``source``: SHA-256 of every byte, every frame's size and checksum.

    ``frame_sink(k, frame)`` receives each frame in order on a worker thread,
    so a caller can keep the frames (write a backup file) instead of
    compressing everything a second time.

    By default the hash lane reads the data itself, so that it can hash the
    holes while compression is still busy with the data: two reads (the second
    from the page cache), and the caller must check that the image did not
    change during the pass (see :func:`ensure_unchanged`). With
    ``single_read`` (a live image, expected to change) the hash lane takes the
    bytes the compression lane read, so hash and frames always agree.

    With a ``store``, each data chunk's fingerprint is computed alongside and
    recorded in the index, and only chunks whose frame the store does not hold
    are compressed (and then stored). The hash state before each chunk is
    recorded too, and with a ``basis`` (the index of an earlier version of
    the image) hashing resumes after the chunks that did not change.
    """
    index_pass = _IndexPass(
        source, settings, store, single_read=single_read, need_frames=frame_sink is not None
    )
    index_pass.use_basis(basis)
    return await index_pass.run(frame_sink, progress)


class _IndexPass:
    """The lanes of one :func:`build_index` pass and what they fill in."""

    def __init__(
        self,
        source: ChunkSource,
        settings: Settings,
        store: FrameStore | None,
        *,
        single_read: bool,
        need_frames: bool,
    ) -> None:
        self.source, self.settings, self.single_read = source, settings, single_read
        self.count = count = chunk_count(source.size, source.chunk_size)
        self.sizes, self.checksums = array("I", bytes(4 * count)), array("I", bytes(4 * count))
        self.zero_flags = bytearray(count)
        self.fingerprints = bytearray(FINGERPRINT * count if store is not None else 0)
        # Hash states are kept where a later pass may use them: with a store (the mount), two reads.
        self.resumable = store is not None and not single_read and sha256.AVAILABLE
        self.midstates = bytearray(MIDSTATE * count if self.resumable else 0)
        self.basis: SnapshotIndex | None = None
        self.checksum = ""
        self.compressed = 0
        self.hashed_from = 0
        self.window = 2 * settings.workers + 2  # chunks in flight: bounds memory to ~window x chunk size
        # The hash lane is the one serial lane: it gets a core to itself while it runs (fair
        # sharing with compression threads would stretch it and leave a core idle at the end,
        # hashing alone); compression gets every core once hashing is done.
        self.compress_limit = trio.CapacityLimiter(max(1, settings.workers - 1))
        self.lead = _Lead(HASH_LEAD, source.data_before)
        self.framed = 0  # bytes whose frames are recorded, in order
        self.taken_in = _Count()  # chunks the frame lane has recorded, for a hash lane that resumes
        self.work = _ChunkWork(source, settings.level, store, keep_data=single_read, need_frames=need_frames)

    def use_basis(self, basis: SnapshotIndex | None) -> None:
        """Resume hashing after the chunks ``basis`` shows unchanged (while it looks, every core
        fingerprints)."""
        source = self.source
        if (
            self.resumable
            and basis is not None
            and basis.can_resume(source.size, source.chunk_size, self.settings.key())
        ):
            self.basis = basis
            self.compress_limit.total_tokens = self.settings.workers

    async def run(self, frame_sink: FrameSink | None, progress: Progress | None) -> SnapshotIndex:
        frame_send, frame_recv = trio.open_memory_channel[tuple[int, _Slot[_Chunk]]](self.window)
        shared_send, shared_recv = trio.open_memory_channel[_Slot[_Chunk]](self.window)
        # Its window of chunks counts against what the restores running beside it share.
        ticket: int | None = None
        try:
            ticket = BULK_WORK.join()
            with fast_gil_handoff():  # the hash lane waits for the GIL after each piece
                async with task_group() as nursery:
                    nursery.start_soon(self._hash_lane, shared_recv)
                    nursery.start_soon(self._compress_lane, nursery, frame_send, shared_send)
                    nursery.start_soon(self._frame_lane, frame_recv, frame_sink)
                    if progress is not None:
                        nursery.start_soon(self._progress_lane, progress)
        finally:
            if ticket is not None:
                BULK_WORK.leave(ticket)
        source, settings = self.source, self.settings
        return SnapshotIndex(
            source.size,
            source.chunk_size,
            settings.key(),
            self.checksum,
            self.sizes,
            self.checksums,
            self.zero_flags,
            fingerprints=bytes(self.fingerprints),
            midstates=bytes(self.midstates),
            compressed=self.compressed,
            hashed_from=self.hashed_from,
        )

    async def _hash_lane(self, shared_recv: trio.MemoryReceiveChannel[_Slot[_Chunk]]) -> None:
        if self.single_read:
            self.checksum = await self._hash_as_read(shared_recv)
        else:
            await self._hash_from_the_image()
        self.lead.hashed = self.source.size
        self.compress_limit.total_tokens = self.settings.workers

    async def _hash_as_read(self, shared_recv: trio.MemoryReceiveChannel[_Slot[_Chunk]]) -> str:
        """The hash of the chunks' data as the compress lane read it (a live image is read once).

        A run of hole chunks (one static zero buffer) goes to the worker thread in one trip
        with the data chunk after it: a trip costs ~0.2 ms of CPU, and most chunks of a large
        sparse disk are holes."""
        sha = hashlib.sha256()
        pending: list[bytes | bytearray | memoryview] = []
        async with shared_recv:
            async for slot in shared_recv:
                result = await slot.get()
                pending.append(result.take_data())
                if not result.zero or len(pending) >= LIVE_HASH_BATCH:
                    await trio.to_thread.run_sync(_hash_all, sha, pending)
                    self.lead.hashed += sum(len(piece) for piece in pending)
                    pending = []
        await trio.to_thread.run_sync(_hash_all, sha, pending)
        return sha.hexdigest()

    async def _hash_from_the_image(self) -> None:
        """One worker thread for the whole ordered stream: no per-chunk hand-off, and not held
        back by compression. It reads data a second time (from the page cache: it runs at most
        HASH_LEAD bytes ahead of the frames)."""
        first = self.hashed_from = await self._unchanged_chunks()
        basis = self.basis
        if basis is not None and first == self.count:
            self.checksum, self.midstates[:] = basis.checksum, basis.midstates  # the same bytes
            return
        self.compress_limit.total_tokens = max(1, self.settings.workers - 1)
        if basis is not None and first:
            self.midstates[: first * MIDSTATE] = basis.midstates[: first * MIDSTATE]
        sha = self._hasher_at(first)
        at_chunk = partial(self._keep_midstate, sha) if self.resumable else None
        hash_into = partial(self.source.hash_into, sha, self.lead.wait, first_chunk=first, at_chunk=at_chunk)
        with contextlib.suppress(_Stopped):  # another lane failed: its error is the one to report
            await trio.to_thread.run_sync(hash_into)
        self.checksum = sha.hexdigest()

    def _hasher_at(self, first: int) -> Hasher:
        """A hasher in the state before chunk ``first``: resumable where states are kept."""
        if not self.resumable:
            return hashlib.sha256()
        if first == 0 or self.basis is None:
            return sha256.ResumableSha256()
        return sha256.ResumableSha256(self.basis.midstate(first))

    async def _unchanged_chunks(self) -> int:
        """How many chunks from the start hold what they held in the basis (0 without one)."""
        basis, k = self.basis, 0
        if basis is None:
            return 0
        while k < self.count:
            await self.taken_in.reach(k + 1)
            fingerprint_k = self.fingerprints[k * FINGERPRINT : (k + 1) * FINGERPRINT]
            if not basis.same_chunk(k, self.zero_flags[k], fingerprint_k):
                break
            k += 1
        return k

    def _keep_midstate(self, sha: Hasher, k: int) -> None:
        """Hash thread: the state before chunk ``k``."""
        assert isinstance(sha, sha256.ResumableSha256)
        self.midstates[k * MIDSTATE : (k + 1) * MIDSTATE] = sha.midstate()

    async def _compress_lane(
        self,
        nursery: trio.Nursery,
        frame_send: trio.MemorySendChannel[tuple[int, _Slot[_Chunk]]],
        shared_send: trio.MemorySendChannel[_Slot[_Chunk]],
    ) -> None:
        async with frame_send, shared_send:
            await trio.to_thread.run_sync(self.work.warm_zero_frames)
            for k in range(self.count):
                slot = _Slot[_Chunk]()
                if self.work.is_hole(k):
                    slot.set(self.work.hole(k))  # known unread: no trip to a worker thread (~0.2 ms of CPU)
                else:
                    nursery.start_soon(slot.fill, partial(self.work.run, k), self.compress_limit)
                await frame_send.send((k, slot))
                if self.single_read:
                    await shared_send.send(slot)

    async def _frame_lane(
        self,
        frame_recv: trio.MemoryReceiveChannel[tuple[int, _Slot[_Chunk]]],
        frame_sink: FrameSink | None,
    ) -> None:
        done = 0
        try:
            async with frame_recv:
                async for k, slot in frame_recv:
                    result = await slot.get()
                    self._record(k, result)
                    if frame_sink is not None:
                        assert result.frame is not None
                        await trio.to_thread.run_sync(frame_sink, k, result.frame)
                    done += chunk_length(self.source.size, self.source.chunk_size, k)
                    self.lead.advance(done)
                    self.framed = done
        except BaseException:  # failed or cancelled: the hash thread must not wait for frames
            self.lead.stop()
            raise

    async def _progress_lane(self, progress: Progress) -> None:
        """Tell ``progress`` the bytes both lanes have passed, until the end: the hash of a large
        hole lags its frames by minutes (zeros hash at ~1 GB/s, their frames are precomputed),
        and a status of 100 % for all that time would be wrong."""
        size = self.source.size
        while True:
            done = min(self.framed, self.lead.hashed)
            progress(done)
            if done >= size:
                return
            await trio.sleep(PROGRESS_INTERVAL_S)

    def _record(self, k: int, result: _Chunk) -> None:
        self.zero_flags[k], self.sizes[k], self.checksums[k] = result.zero, result.size, result.checksum
        self.fingerprints[k * FINGERPRINT : (k + 1) * FINGERPRINT] = result.fingerprint
        self.compressed += result.compressed
        self.taken_in.advance()


class _Count:
    """A counter trio tasks can wait on."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = trio.Event()

    def advance(self) -> None:
        self.value += 1
        self._changed.set()
        self._changed = trio.Event()

    async def reach(self, value: int) -> None:
        while self.value < value:
            await self._changed.wait()


class _Lead:
    """How far the hash thread may read ahead of the frames written so far.

    Reading the data a second time is free while it is in the page cache; the
    bound keeps it there on images larger than memory. It counts data bytes
    only: holes are never read, so the hash thread runs through them freely.
    """

    def __init__(self, limit: int, data_before: Callable[[int], int]) -> None:
        self._limit = limit
        self._data_before = data_before
        self._done = 0
        self._stopped = False
        self._cond = threading.Condition()
        self.hashed = 0  # where the hash thread is (for progress: it lags the frames in holes)

    def advance(self, done: int) -> None:
        with self._cond:
            self._done = done
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wait(self, offset: int) -> None:
        """Block until ``offset`` is within the limit of the frames done; raise once stopped."""
        self.hashed = offset
        with self._cond:
            ahead = self._data_before(offset)
            while not self._stopped and ahead - self._data_before(self._done) > self._limit:
                self._cond.wait()
            if self._stopped:
                raise _Stopped


class _Stopped(Exception):
    """The index pass ended (another lane failed) while the hash thread was waiting."""


def frame_of(
    data: bytes | bytearray | memoryview, level: int, store: FrameStore | None, *, missed: bytes | None = None
) -> tuple[bytes, bytes, bool]:
    """The chunk's frame, fingerprint, and whether it had to be compressed: from the store when
    it holds that chunk, else compressed (and stored, under the fingerprint of exactly these bytes).
    ``missed``: a fingerprint the store was just asked for and did not hold (not asked again:
    each miss counted twice in `mirenfs status`, trial S22 S10)."""
    if store is None:
        return compress_frame(data, level), b"", True
    chunk_fingerprint = fingerprint(data)
    frame = store.get(chunk_fingerprint) if chunk_fingerprint != missed else None
    if frame is not None:
        return frame, chunk_fingerprint, False
    frame = compress_frame(data, level)
    store.put(chunk_fingerprint, frame)
    return frame, chunk_fingerprint, True


@dataclass
class _Chunk:
    """What an index pass learns of one chunk (the frame itself only when a sink needs it)."""

    size: int
    checksum: int
    zero: bool
    fingerprint: bytes
    compressed: bool
    frame: bytes | None
    data: bytes | bytearray | memoryview = b""  # for the single-read hash lane

    def take_data(self) -> bytes | bytearray | memoryview:
        data, self.data = self.data, b""
        return data


class _ChunkWork:
    """Reading one chunk and finding or making its frame: one hand-off to a worker thread."""

    def __init__(
        self, source: ChunkSource, level: int, store: FrameStore | None, *, keep_data: bool, need_frames: bool
    ) -> None:
        self.source = source
        self.level = level
        self.store = store
        self.keep_data = keep_data
        self.need_frames = need_frames
        self._no_fingerprint = bytes(FINGERPRINT if store is not None else 0)

    def is_hole(self, k: int) -> bool:
        """Whether chunk ``k`` lies wholly in a hole of the image: zeros, known without a read
        (most chunks of a sparse disk image)."""
        source = self.source
        begin = k * source.chunk_size
        end = begin + chunk_length(source.size, source.chunk_size, k)
        return source.data_before(end) == source.data_before(begin)

    def warm_zero_frames(self) -> None:
        """Compress the zero frames of holes (two lengths at most) before the event loop asks
        :meth:`hole` for them, so that it finds them cached."""
        source = self.source
        last = chunk_count(source.size, source.chunk_size) - 1
        for k in {0, last} if last >= 0 else ():
            zero_frame(chunk_length(source.size, source.chunk_size, k), self.level)

    def hole(self, k: int) -> _Chunk:
        """What :meth:`run` gives for a chunk of zeros."""
        length = chunk_length(self.source.size, self.source.chunk_size, k)
        return self._made(zero_frame(length, self.level), zero=True, data=zeros(length))

    def run(self, k: int) -> _Chunk:
        data = self.source.read_chunk(k)
        if data is None:
            return self.hole(k)
        if self.store is None:
            return self._made(compress_frame(data, self.level), compressed=True, data=data)
        chunk_fingerprint = fingerprint(data)
        found = self._stored(chunk_fingerprint, data)
        if found is not None:
            return found
        frame = compress_frame(data, self.level)
        self.store.put(chunk_fingerprint, frame)
        return self._made(frame, compressed=True, data=data, chunk_fingerprint=chunk_fingerprint)

    def _stored(self, chunk_fingerprint: bytes, data: bytes | bytearray) -> _Chunk | None:
        """The chunk as the store knows it: the whole frame for a sink, else its length and checksum."""
        assert self.store is not None
        if self.need_frames:
            frame = self.store.get(chunk_fingerprint)
            if frame is None:
                return None
            return self._made(frame, data=data, chunk_fingerprint=chunk_fingerprint)
        described = self.store.describe(chunk_fingerprint)
        if described is None:
            return None
        kept = data if self.keep_data else b""
        return _Chunk(*described, False, chunk_fingerprint, False, None, kept)

    def _made(
        self,
        frame: bytes,
        *,
        data: bytes | bytearray | memoryview,
        zero: bool = False,
        compressed: bool = False,
        chunk_fingerprint: bytes | None = None,
    ) -> _Chunk:
        kept = data if self.keep_data else b""
        named = self._no_fingerprint if chunk_fingerprint is None else chunk_fingerprint
        return _Chunk(len(frame), frame_checksum(frame), zero, named, compressed, frame, kept)


def _hash_all(sha: Hasher, pieces: list[bytes | bytearray | memoryview]) -> None:
    for piece in pieces:
        sha.update(piece)


T = TypeVar("T")


class _Slot(Generic[T]):
    """A value that will be ready later (a tiny future for trio tasks)."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: T | None = None
        self._error: Exception | None = None

    async def fill(self, work: Callable[[], T], limiter: trio.CapacityLimiter) -> None:
        """Run ``work`` on a worker thread and keep its result (or its error) for :meth:`get`."""
        try:
            value = await trio.to_thread.run_sync(work, limiter=limiter)
        except Exception as exc:
            self.fail(exc)
            raise
        self.set(value)

    def set(self, value: T) -> None:
        self._value = value
        self._event.set()

    def fail(self, error: Exception) -> None:
        self._error = error
        self._event.set()

    def abandon(self) -> None:
        """Its producer was cancelled: waiters hear :class:`_Abandoned` and produce it themselves."""
        self.fail(_Abandoned())

    async def get(self) -> T:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class _Abandoned(Exception):
    """A value whose producer was cancelled (nothing is wrong with it): ask for it again."""


class FrameCache:
    """Frames produced lately, for every producer that shares it, bounded in bytes (least
    recently used first out).

    A sequential reader finds here the frames read ahead for it. One cache
    serves a whole mount, so memory does not grow with the number of disks
    read (each producer kept its own 16 frames: 64 MiB per disk of
    incompressible data, for the life of the mount). Used from the event loop
    only. Keys are ``(producer token, frame)``; tokens are never reused.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.bytes = 0
        self._frames: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._tokens = itertools.count(1)

    def token(self) -> int:
        """A key prefix for one producer."""
        return next(self._tokens)

    def get(self, key: tuple[int, int]) -> bytes | None:
        frame = self._frames.get(key)
        if frame is not None:
            self._frames.move_to_end(key)
        return frame

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._frames

    def put(self, key: tuple[int, int], frame: bytes) -> None:
        if len(frame) > self.limit:
            return
        self._remove(key)
        self._frames[key] = frame
        self.bytes += len(frame)
        while self.bytes > self.limit:
            _, victim = self._frames.popitem(last=False)
            self.bytes -= len(victim)

    def drop(self, token: int) -> None:
        """Forget one producer's frames (its snapshot version is gone)."""
        for key in [key for key in self._frames if key[0] == token]:
            self._remove(key)

    def _remove(self, key: tuple[int, int]) -> None:
        old = self._frames.pop(key, None)
        if old is not None:
            self.bytes -= len(old)


def frame_cache_for(settings: Settings) -> FrameCache:
    """A cache for three sequential readers, each with the frame it reads and the
    ``workers + 1`` frames read ahead for it."""
    return FrameCache(3 * (settings.workers + 2) * settings.chunk_size)


class SnapshotProducer:
    """Produces any byte range of a snapshot from its index, compressing only what it touches.

    Each recompressed frame is checked against the index (size and content
    checksum): if the image changed since the index pass, the reader gets
    :class:`ImageChangedError` rather than bytes from two versions.
    """

    def __init__(
        self,
        source: ChunkSource,
        settings: Settings,
        meta: Meta,
        index: SnapshotIndex,
        *,
        cache: FrameCache | None = None,
        spill: FrameSpill | None = None,
        store: FrameStore | None = None,
        makers: trio.CapacityLimiter | None = None,
    ) -> None:
        """``cache``: where frames produced are kept for the next reads (a mount shares one
        among all its snapshots); by default one of this producer's own. ``makers``: the
        threads that make frames (a mount shares ``workers`` of them among all its snapshots:
        each snapshot read at once ran its own, and sixteen readers took a mount to 260 MB,
        trial K s19); by default ``workers`` of this producer's own."""
        if index.settings_key != settings.key() or index.chunk_size != source.chunk_size:
            raise ValueError("the index was built with other compression settings")
        self.spill = spill
        self.store = store
        self.source = source
        self.settings = settings
        self.layout = SnapshotLayout(meta, index)
        self._cache = cache if cache is not None else frame_cache_for(settings)
        self._token = self._cache.token()
        self._caching = True
        self._in_flight: dict[int, _Slot[bytes]] = {}
        self._limiter = makers if makers is not None else trio.CapacityLimiter(settings.workers)

    @property
    def size(self) -> int:
        return self.layout.total_size

    def drop_frames(self) -> None:
        """Give back the memory of this producer's cached frames (its last reader went, or its
        version is closed), and cache none of the frames still being made for them (review S5
        F3: a read-ahead landing after the last close stayed) until :meth:`keep_frames`."""
        self._caching = False
        self._cache.drop(self._token)

    def keep_frames(self) -> None:
        """A reader came: frames made from now on are kept for the next reads again."""
        self._caching = True

    async def frame(self, k: int) -> bytes:
        """Frame ``k``, from the cache, from a request already running, or compressed now."""
        index = self.layout.index
        if index.zero_chunks[k]:
            return zero_frame(chunk_length(index.size_bytes, index.chunk_size, k), self.settings.level)
        cached = self._cache.get((self._token, k))
        if cached is not None:
            return cached
        slot = self._in_flight.get(k)
        if slot is not None:
            try:
                return await slot.get()
            except _Abandoned:  # a read-ahead cancelled (a sidecar's copy, the unmount): make it here
                return await self.frame(k)
        slot = self._in_flight[k] = _Slot[bytes]()
        try:
            frame = await trio.to_thread.run_sync(self._make_frame, k, limiter=self._limiter)
        except Exception as exc:
            slot.fail(exc)
            raise
        except BaseException:
            slot.abandon()  # nothing is wrong with the frame: a reader waiting for it makes it
            raise
        finally:
            self._in_flight.pop(k, None)
        if self._caching:
            self._cache.put((self._token, k), frame)
        slot.set(frame)
        return frame

    def _make_frame(self, k: int) -> bytes:
        """Frame ``k`` from the spill, from the store, or compressed from the image, in that
        order; whichever it is, it must be the frame the index describes."""
        kept, asked = self._kept_frame(k)
        if kept is not None and self._matches_index(k, kept):
            return kept
        data = self.source.read_chunk(k)
        index = self.layout.index
        if data is None:
            frame = zero_frame(chunk_length(index.size_bytes, index.chunk_size, k), self.settings.level)
        else:
            missed = asked if kept is None else None
            frame, _, _ = frame_of(data, self.settings.level, self.store, missed=missed)
        if not self._matches_index(k, frame):
            raise ImageChangedError(
                f"the image changed since its snapshot index was built (chunk {k} differs)"
            )
        return frame

    def _kept_frame(self, k: int) -> tuple[bytes | None, bytes | None]:
        """Frame ``k`` if the index pass spilled it or the store holds it (verified there), and
        the fingerprint the store was asked for (None if it was not)."""
        index = self.layout.index
        spill = self.spill
        if spill is not None and k < spill.frames:
            start = self.layout.frame_offsets[k] - len(self.layout.header)
            with contextlib.suppress(OSError):  # let go of meanwhile (drop_spill): as if never spilled
                return spill.read(start, index.frame_sizes[k]), None
        chunk_fingerprint = index.fingerprint(k)
        if self.store is not None and chunk_fingerprint is not None:
            return self.store.get(chunk_fingerprint), chunk_fingerprint
        return None, None

    def drop_spill(self) -> None:
        """Let the index pass's spill file go, and the space it holds on the data path: later
        reads take their frames from the store, or compress them again. A read that had the
        file in hand when it closed reads nothing from it (what it read is checked anyway)."""
        spill, self.spill = self.spill, None
        if spill is not None:
            spill.close()

    def _matches_index(self, k: int, frame: bytes) -> bool:
        index = self.layout.index
        return len(frame) == index.frame_sizes[k] and frame_checksum(frame) == index.frame_checksums[k]

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the snapshot, clipped at its end."""
        layout = self.layout
        end = min(offset + size, layout.total_size)
        if offset >= end:
            return b""
        parts: list[bytes | memoryview] = []
        position = offset
        if position < len(layout.header):
            parts.append(memoryview(layout.header)[position : min(end, len(layout.header))])
            position = min(end, len(layout.header))
        while position < min(end, layout.data_end):
            k = layout.frame_at(position)
            frame = await self.frame(k)
            start = position - layout.frame_offsets[k]
            stop = min(end, layout.frame_offsets[k + 1]) - layout.frame_offsets[k]
            parts.append(memoryview(frame)[start:stop])
            position += stop - start
        if position < end:
            base = position - layout.data_end
            parts.append(memoryview(layout.seek_table)[base : end - layout.data_end])
        return b"".join(parts)

    async def copy_to(
        self, write: Callable[[bytes], Awaitable[object]], *, read_ahead: int | None = None
    ) -> None:
        """Send the whole snapshot to ``write`` in order, compressing frames ahead in parallel."""
        layout = self.layout
        ahead = read_ahead if read_ahead is not None else self.settings.workers + 1
        await write(layout.header)
        async with task_group() as nursery:
            for k in range(layout.index.frame_count):
                self.prefetch_after(k, ahead, nursery)
                await write(await self.frame(k))
        await write(layout.seek_table)

    def prefetch_after(self, k: int, ahead: int, nursery: trio.Nursery) -> None:
        """Start producing the ``ahead`` frames after frame ``k`` that are not at hand yet."""
        for j in range(k + 1, min(k + 1 + ahead, self.layout.index.frame_count)):
            if not self.has_frame(j):
                nursery.start_soon(self.prefetch, j)

    def has_frame(self, k: int) -> bool:
        """Whether frame ``k`` is at hand (cached, spilled, or being produced): a prefetch would be wasted."""
        spilled = self.spill is not None and k < self.spill.frames
        return spilled or (self._token, k) in self._cache or k in self._in_flight

    async def prefetch(self, k: int) -> None:
        """Produce frame ``k`` ahead of its reader. Any failure is the reader's to see when it asks
        for the frame itself (the version may even have been closed meanwhile): it must never
        reach the nursery this runs in, which is the mount's."""
        try:
            await self.frame(k)
        except Exception as exc:
            log.debug("read-ahead of frame %d failed: %s", k, exc)


class SequentialReader:
    """One open handle's reads: a read that continues the previous one starts compressing the
    next frames before they are asked for (the kernel reads ``cat``/``cp`` in 128 KiB pieces,
    far smaller than a frame), on the nursery this reader was given."""

    def __init__(self, producer: SnapshotProducer, nursery: trio.Nursery) -> None:
        self.producer = producer
        self._nursery = nursery
        self._next_offset = 0
        self.bytes_read = 0  # what this handle was given

    @property
    def image_bytes_read(self) -> int:
        """The image bytes behind what this handle was given, for a whole read (a copy of the
        snapshot), else 0: what reading cost in memory is told by the chunks, not the frames
        (a 1 TiB sparse disk's snapshot is 62 MB)."""
        return self.producer.layout.index.size_bytes if self.bytes_read >= self.producer.size else 0

    async def read(self, offset: int, size: int) -> bytes:
        data = await self.producer.read(offset, size)
        self.bytes_read += len(data)
        end = offset + len(data)
        layout = self.producer.layout
        if offset == self._next_offset and len(layout.header) <= end < layout.data_end:
            # From the frame holding ``end`` on: the next request starts there.
            ahead = self.producer.settings.workers + 1
            self.producer.prefetch_after(layout.frame_at(end) - 1, ahead, self._nursery)
        self._next_offset = end
        return data
