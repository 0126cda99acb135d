"""Consuming snapshots as a stream: the header, then any valid zstd data,
decompressed, hashed and written sparsely as it arrives, in bounded memory.

Once the header is known, a pipeline of long-lived threads runs for the life
of the restore: decompression, which cuts the input into frames (with the
frame scanner, which refuses a stream cut inside a frame) and decompresses a
large frame or one of unknown size (Go's one frame) as it streams in; frame
stages, which decompress the frames whose header says they hold at most a
piece (mirenfs's own, one per 4 MiB chunk) whole, several at once, each
straight into its piece, handed on in order before it is filled; hashing (one
ordered SHA-256 stream, the stage every other keeps fed); and writing (zero
check, ``pwrite`` and writeback). :meth:`RestoreStream.feed` hands the
compressed bytes to the first stage and returns at once unless its bounded
queue is full (that is the back-pressure a FUSE write feels). Decompressed
pieces and whole frames travel in pools of reusable buffers, so memory stays
bounded even for a frame that inflates 30 000-fold (a 4 MiB hole is a
151-byte frame); restores running at once in one process split one bound
with the index passes running (:data:`~mirenfs.engine.pipeline.BULK_WORK`), so that memory does
not grow with their number. The
frame mirenfs itself writes for an all-zero chunk is recognised and passed on
as zeros without zstd or a zero check. :meth:`RestoreStream.settle` waits until everything fed is
decompressed, so that a close can tell exactly whether the snapshot is whole.

Never: let an error of any stage go unreported (it fails the next feed, the
settle or the finish); write more than ``size_bytes``; let a stage reference
the :class:`RestoreStream` (its finalizer stops an abandoned pipeline, and
zstandard's C objects hide references from the garbage collector).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import logging
import os
import stat
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO, Protocol, Union, cast

import trio
import zstandard

from mirenfs.engine.fstype import SIGNATURES_END, filesystem_in
from mirenfs.engine.image import ImageIdentity, MakeRoom, SparseWriter, StagingImage, disk_file_mode
from mirenfs.engine.pipeline import BULK_WORK, Buffer, BufferPool, Handoff, LoopWaker, Piece, Stages, Stopped
from mirenfs.engine.produce import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from mirenfs.errors import FormatError, MirenfsError, TargetError, size_in_words
from mirenfs.format.frames import FrameScanner, SeekTableCheck, zero_frame
from mirenfs.format.header import (
    MAGIC,
    MAX_METADATA_LEN,
    PREFIX_LEN,
    HeaderParser,
    Meta,
    Timestamp,
    truncated_header,
    validate_restorable,
)

log = logging.getLogger(__name__)

# Decompressed bytes per piece: each piece costs the hash stage one trip for the GIL, which
# another thread may hold; 4 MiB keeps those trips rare (the piece is in L3 either way).
PIECE = 4 << 20
POOL_PIECES = 8  # decompressed pieces in flight between the stages (32 MiB)
INPUT_LIMIT = 8 << 20  # compressed bytes waiting for the decompressor before a feed waits
# What the restores running at once in this process share (a mount serves many) with the index
# passes running: a restore alone, or one of two, has the limits above; more split these evenly, so
# that memory stays bounded however many run (ten took a mount to 340 MB when each had its own:
# trial M, session 18).
POOL_PIECES_TOTAL = 2 * POOL_PIECES
INPUT_TOTAL = 2 * INPUT_LIMIT
_READ_SIZE = 1 << 20  # compressed bytes the decompressor takes at a time
# Frames of at most a piece's content (mirenfs's own, one per 4 MiB chunk) are decompressed by
# these stages, several at once: one zstd stream is the slowest stage where the data is dense.
FRAME_WORKERS = min(4, max(2, os.cpu_count() or 2))
FRAMES_LIMIT = 2 * PIECE  # compressed bytes of whole frames waiting for a frame stage
FRAMES_TOTAL = 2 * FRAMES_LIMIT
# A frame whose content fits a piece is collected whole up to this length (zstd's bound for a
# piece's content plus its headers); a longer one, valid but odd, is decompressed as it streams.
WHOLE_FRAME_LIMIT = PIECE + (PIECE >> 7) + 1024
# A frame of at most this content is decompressed by the first stage itself, into a piece it
# fills with the next such frames: handed to a frame stage, each cost ~60 µs of hand-offs
# between four threads however small it was (100 000 one-byte frames: 6 s a pass).
INLINE_FRAME_LIMIT = 64 << 10
INLINE_FRAME_BYTES = INLINE_FRAME_LIMIT + (INLINE_FRAME_LIMIT >> 7) + 1024  # zstd's bound, as above
INLINE_HAND_ON = 1 << 20  # such a piece goes on once it holds this much
# Whole frames are gathered into reusable buffers of that size: fresh 4 MiB objects, made by one
# thread and freed by another, stayed in the C library's per-thread heaps (16 MB a restore, ten
# restores 300 MB: session 19). A frame stage's own, plus two waiting, per restore.
FRAME_BUFFERS = FRAME_WORKERS + 2
FRAME_BUFFERS_TOTAL = 2 * FRAME_BUFFERS
# The pool bounds the decompressed pieces between the stages; zero frames take no buffer, and
# the first stage passes them on far faster than SHA-256 hashes them: they are bounded here, or a
# sparse 16 TiB disk's zeros queued 4 million items (1.8 GB) ahead of the hash stage (review).
PIECES_AHEAD_LIMIT = 256 * PIECE
ZERO_FRAME_CONTENT = DEFAULT_CHUNK_SIZE
ZERO_FRAME = zero_frame(DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL)  # what mirenfs writes for a zero chunk
_ZEROS = bytes(PIECE)
_NOTHING = memoryview(b"")
# The largest decoding window accepted (zstd's own default limit): a frame asking for more (zstd
# --long=28 and above) is refused rather than let the mount's memory grow by its window.
MAX_WINDOW = 1 << 27


class ImageWriter(Protocol):
    """Receives the restored image in order (a :class:`SparseWriter` or a file).

    As for any Python file, ``write`` must not keep the buffer it is given:
    it is reused once ``write`` returns.
    """

    def write(self, data: bytes) -> object: ...


OpenTarget = Callable[[Meta], Awaitable[ImageWriter]]


@dataclass(eq=False)
class _Settle:
    """A marker in the input: tell the event loop once everything before it is decompressed."""

    event: trio.Event


_InputItem = bytes | _Settle
_Piece = Union[Piece, "_KnownZeros"]


class _FrameInput:
    """The input pieces cut at frame boundaries, each byte shown to the frame scanner as it is
    taken: a frame's header first (:meth:`next_header`), then the rest of that frame, whole
    (:meth:`gather_frame`) or as a file for a zstd reader (:class:`_FrameReader`).

    A settle marker that falls between frames ends :meth:`next_header` (the
    stage then reports everything before it decompressed); one inside a frame
    is answered at once, since nothing more can come out of that frame now.
    """

    def __init__(
        self,
        handoff: Handoff[_InputItem],
        scanner: FrameScanner,
        waker: LoopWaker,
        before_waiting: Callable[[], object] | None = None,
    ) -> None:
        self._handoff = handoff
        self._before_waiting = before_waiting  # what the stage hands on before it waits for input
        self._scanner = scanner
        self._waker = waker
        self._item = b""
        self._offset = 0
        self.ended = False
        self.settling: _Settle | None = None

    def next_header(self) -> bytes | None:
        """At a boundary: the next frame's header, taken; None at the end of the input or at a
        settle between frames (then :attr:`settling` is set)."""
        head = bytearray()
        while True:
            if self._offset == len(self._item) and not self._next_item():
                return None
            view = memoryview(self._item)[self._offset :]
            taken, event = self._scanner.feed_to_event(view)
            head += view[:taken]
            self._offset += taken
            if event:
                return bytes(head)

    def frame_bytes(self, size: int) -> memoryview:
        """The next bytes of the frame being read, at most ``size``: empty at its end (or the input's)."""
        if self._scanner.at_boundary or (self._offset == len(self._item) and not self._next_item()):
            return _NOTHING
        view = memoryview(self._item)[self._offset : self._offset + size]
        taken, _ = self._scanner.feed_to_event(view)
        self._offset += taken
        return view[:taken]

    def gather_frame(self, head: bytes, into: memoryview) -> tuple[int, bool]:
        """Copy the frame being read into ``into`` as it comes (each input piece is let go once
        taken): its length so far, and whether that is all of it. It is not when the input ended
        inside it, or when it did not fit ``into`` (then the rest is still to read)."""
        into[: len(head)] = head
        length = len(head)
        while not self._scanner.at_boundary:
            part = self.frame_bytes(len(into) - length)
            if not part:
                return length, False  # the input ended inside the frame, or it does not fit
            into[length : length + len(part)] = part
            length += len(part)
        return length, True

    def skip_frame(self) -> None:
        """Take the rest of a skippable frame (the scanner checks a seek table in it)."""
        while self.frame_bytes(_READ_SIZE):
            pass

    def _next_item(self) -> bool:
        """Wait for the next input piece; False at the end of input or at a settle between frames."""
        while True:
            item = self._handoff.get(self._before_waiting)
            if item is None:
                self.ended = True
                return False
            if isinstance(item, _Settle):
                if self._scanner.at_boundary:
                    self.settling = item
                    return False
                self._waker.set(item.event)  # inside a frame: nothing more can come out now
                continue
            self._item, self._offset = item, 0
            return True


class _FrameReader:
    """One frame for a zstd reader to pull: ``parts`` already taken, then the rest from the
    input; an empty read at the frame's end, so the reader hands out all of it."""

    def __init__(self, source: _FrameInput, parts: list[bytes | memoryview]) -> None:
        self._source = source
        self._parts = collections.deque(memoryview(part) for part in parts)

    def read(self, size: int) -> bytes | memoryview:
        if not self._parts:
            return self._source.frame_bytes(size)
        part = self._parts.popleft()
        if len(part) > size:
            self._parts.appendleft(part[size:])
        return part[:size]


class _Pipeline:
    """The stages of one restore and what they share. Owned by one :class:`RestoreStream`."""

    def __init__(self, size_bytes: int, writer: ImageWriter, *, check_seek_table: bool = False) -> None:
        self.size_bytes = size_bytes
        self.scanner = FrameScanner(SeekTableCheck() if check_seek_table else None)
        self.sha = hashlib.sha256()
        self.bytes_out = 0  # handed on by the first stage (a whole frame counts before it is filled)
        self.bytes_hashed = 0  # through the hash stage, the slowest: what progress reports
        self._writer = writer
        self._waker = LoopWaker()
        # Shares of what the running restores share, read as they go (one item always fits).
        self.input: Handoff[_InputItem] = Handoff(
            partial(BULK_WORK.share, INPUT_TOTAL, INPUT_LIMIT, 0), self._waker
        )
        self._pool = BufferPool(partial(BULK_WORK.share, POOL_PIECES_TOTAL, POOL_PIECES, 1), PIECE)
        self._frames: Handoff[_FrameJob] = Handoff(partial(BULK_WORK.share, FRAMES_TOTAL, FRAMES_LIMIT, 0))
        self._frame_pool = BufferPool(  # one byte more than a whole frame: a longer one shows
            partial(BULK_WORK.share, FRAME_BUFFERS_TOTAL, FRAME_BUFFERS, 1), WHOLE_FRAME_LIMIT + 1
        )
        self._to_hash: Handoff[_Piece] = Handoff(PIECES_AHEAD_LIMIT)
        self._to_write: Handoff[_Piece] = Handoff(PIECES_AHEAD_LIMIT)
        self._being_filled: collections.deque[Piece] = collections.deque()  # handed on, maybe not filled yet
        self._gathering: Buffer | None = None  # the piece small frames are decompressed into
        self._gathered = 0
        self._settles: list[trio.Event] = []
        # Set once all ``size_bytes`` went through the hash (or the stages stopped): the checksum
        # can be compared before the stream's end (a close while another process holds the file).
        self.all_hashed = trio.Event()
        self._settles.append(self.all_hashed)
        if size_bytes == 0:
            self.all_hashed.set()
        pools = (self._pool, self._frame_pool)
        # Until the stages are stopped (``_stop_all`` leaves); the pools, not this pipeline.
        ticket = BULK_WORK.join(partial(_trim_all, pools))
        stop = partial(
            _stop_all,
            (self.input, self._frames, self._to_hash, self._to_write),
            pools,
            self._settles,
            self._waker,
            ticket,
        )
        self.stages = Stages(stop, self._waker)  # ``stop`` holds the queues, not this pipeline: no cycle
        frame_stages = {f"restore-frame-{n}": self._frame_loop for n in range(1, FRAME_WORKERS + 1)}
        try:
            self.stages.start(
                {
                    "restore-unzstd": self._decompress_loop,
                    **frame_stages,
                    "restore-hash": self._hash_loop,
                    "restore-write": self._write_loop,
                }
            )
        except BaseException:
            self.stages.stop()
            raise

    # ---- the event loop's side --------------------------------------------------

    async def put(self, item: _InputItem, size: int) -> None:
        """Queue input for the decompressor, waiting (cancellably) while its queue is full."""
        while (room := self.input.offer(item, size)) is not None:
            await room.wait()

    async def settle(self) -> None:
        """Wait until everything put so far is decompressed (or the pipeline stopped)."""
        event = trio.Event()
        self._settles.append(event)
        try:
            await self.put(_Settle(event), 0)
            await event.wait()
        finally:
            self._settles.remove(event)

    def drop_buffers(self) -> None:
        """Free the pool's memory now that the stages ended, whoever still holds this pipeline."""
        self._being_filled.clear()
        self._pool.stop()
        self._frame_pool.stop()

    # ---- the stages ---------------------------------------------------------------

    def _decompress_loop(self) -> None:
        """Cut the input into frames: a frame of at most a piece's content goes whole to the frame
        stages (several decompress at once, each into its own piece), one of at most
        ``INLINE_FRAME_LIMIT`` is decompressed here into a piece shared with the next small ones,
        and a larger one or one of unknown size (Go's one frame) is decompressed here as it
        streams in."""
        # Small frames gathered into a piece go on before the input runs dry: what a writer
        # wrote reaches the image (and a failure shows) without waiting for its next write.
        source = _FrameInput(self.input, self.scanner, self._waker, self._hand_on_gathered)
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        small_frame = memoryview(bytearray(INLINE_FRAME_BYTES))  # one, reused: no pool trip per frame
        try:
            while not source.ended:
                head = source.next_header()
                if head is None:
                    if source.settling is not None:
                        self._hand_on_gathered()  # a settle waits for what came to be hashed too
                        self._settle(source.settling.event)
                        source.settling = None
                    continue
                if not self.scanner.in_zstd_frame:
                    source.skip_frame()  # skippable (or ended with its header)
                    continue
                if self.scanner.window_size > MAX_WINDOW:  # refused alike however it would decode
                    raise FormatError(_window_too_large(self.scanner.window_size))
                content = self.scanner.content_size
                taken = head
                if content is not None and content <= INLINE_FRAME_LIMIT:
                    length, whole = source.gather_frame(head, small_frame)
                    if whole:
                        self._decompress_inline(decompressor, small_frame[:length], content)
                        continue
                    taken = bytes(small_frame[:length])
                    if source.ended:
                        break  # cut inside the frame: the finish says so
                elif content is not None and content <= PIECE:
                    buffer = self._frame_pool.acquire()
                    length, whole = source.gather_frame(head, memoryview(buffer))
                    if whole:
                        self._hand_on_frame(buffer, length, content)
                        continue
                    taken = bytes(buffer[:length])  # a copy: the buffer goes back now
                    self._frame_pool.give_back(buffer)
                    if source.ended:
                        break  # cut inside the frame: the finish says so
                self._stream_frame(decompressor, _FrameReader(source, [taken]))
            self._hand_on_gathered()
        except zstandard.ZstdError as exc:
            raise _corrupt(exc) from None
        finally:
            for handoff in (self._frames, self._to_hash, self._to_write):
                handoff.close()
            # Ended by a failure, what it handed on and holds is nobody's now: let it go with the
            # thread, not at the writer's next call (review P22 F3). Ended whole, both are empty.
            self._being_filled.clear()
            self._gathering = None

    def _decompress_inline(
        self, decompressor: zstandard.ZstdDecompressor, frame: memoryview, content: int
    ) -> None:
        """A small whole frame, decompressed here after what the piece being gathered holds."""
        self._check_size(content)
        if self._gathering is not None and self._gathered + content > PIECE:
            self._hand_on_gathered()
        if self._gathering is None:
            self._gathering, self._gathered = self._pool.acquire(), 0
        end = self._gathered + content
        _decompress_whole(decompressor, frame, memoryview(self._gathering)[self._gathered : end])
        self._gathered = end
        self.bytes_out += content
        if end >= INLINE_HAND_ON:  # the stages after work on it meanwhile, and a failure shows soon
            self._hand_on_gathered()

    def _hand_on_gathered(self) -> None:
        """The piece small frames were gathered into, to the hash and write stages: before any
        other output (the stages take pieces in order), at a settle, at the end."""
        buffer, length = self._gathering, self._gathered
        if buffer is None:
            return
        self._gathering, self._gathered = None, 0
        if not length:
            self._pool.give_back(buffer)
            return
        piece = Piece(self._pool, buffer, length, readers=2)
        self._to_hash.put(piece, length)
        self._to_write.put(piece, length)

    def _hand_on_frame(self, buffer: Buffer, length: int, content: int) -> None:
        """A whole frame, the first ``length`` bytes of a frame pool ``buffer``, to a frame stage;
        its piece goes to the hash and write stages now, in order, and they wait for it to be
        filled."""
        self._hand_on_gathered()
        if length == len(ZERO_FRAME) and buffer[:length] == ZERO_FRAME:
            self._frame_pool.give_back(buffer)
            self._pass_on_zeros(ZERO_FRAME_CONTENT)
            return
        frame = Piece(self._frame_pool, buffer, length, readers=1)
        self._check_size(content)
        piece = Piece(self._pool, self._pool.acquire(), content, readers=2, filled=False)
        self.bytes_out += content
        while self._being_filled and self._being_filled[0].filled:
            self._being_filled.popleft()
        self._being_filled.append(piece)
        self._frames.put(_FrameJob(frame, piece), length)
        self._to_hash.put(piece, content)
        self._to_write.put(piece, content)

    def _frame_loop(self) -> None:
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        while (job := self._frames.get()) is not None:
            try:
                _decompress_whole(decompressor, job.frame.view, job.piece.view)
            except zstandard.ZstdError as exc:
                raise _corrupt(exc) from None
            # Not after a failure: the traceback still holds zstd's view of the frame, and the
            # pipeline is stopping (its buffers go with it).
            job.frame.done()
            job.piece.mark_filled()

    def _settle(self, event: trio.Event) -> None:
        """Tell the event loop once the frames handed on are filled: all input is decompressed."""
        while self._being_filled:
            self._being_filled.popleft().wait_filled()
        self._waker.set(event)

    def _stream_frame(self, decompressor: zstandard.ZstdDecompressor, frame: _FrameReader) -> None:
        self._hand_on_gathered()
        start = self.bytes_out
        reader = decompressor.stream_reader(
            cast(IO[bytes], frame), read_size=_READ_SIZE, read_across_frames=False, closefd=False
        )
        while self._decompress_piece(reader):
            pass
        if self.scanner.seek_table is not None:  # verify: a frame of unknown size is counted here
            self.scanner.seek_table.frame_decompressed(self.bytes_out - start)

    def _decompress_piece(self, reader: zstandard.ZstdDecompressionReader) -> bool:
        buffer = self._pool.acquire()
        length = reader.readinto(buffer)
        if not length:
            self._pool.give_back(buffer)
            return False
        if self.bytes_out + length > self.size_bytes:
            self._pool.give_back(buffer)
            self._check_size(length)
        self.bytes_out += length
        piece = Piece(self._pool, buffer, length, readers=2)
        self._to_hash.put(piece, length)
        self._to_write.put(piece, length)
        return True

    def _pass_on_zeros(self, length: int) -> None:
        """A zero frame's content, straight from a static buffer (and known to be zeros)."""
        self._check_size(length)
        self.bytes_out += length
        for start in range(0, length, PIECE):
            piece = _KnownZeros(min(PIECE, length - start))
            self._to_hash.put(piece, len(piece.view))
            self._to_write.put(piece, len(piece.view))

    def _check_size(self, length: int) -> None:
        if self.bytes_out + length > self.size_bytes:
            raise FormatError(
                f"the snapshot data is longer than its header's size_bytes ({self.size_bytes}): refused"
            )

    def _hash_loop(self) -> None:
        while (piece := self._to_hash.get()) is not None:
            piece.wait_filled()
            self.sha.update(piece.view)
            self.bytes_hashed += len(piece.view)
            piece.done()
            if self.bytes_hashed == self.size_bytes:
                self._waker.set(self.all_hashed)

    def _write_loop(self) -> None:
        write = cast(Callable[[memoryview], object], self._writer.write)  # files take any buffer
        sparse = self._writer if isinstance(self._writer, SparseWriter) else None
        while (piece := self._to_write.get()) is not None:
            piece.wait_filled()
            if sparse is not None and isinstance(piece, _KnownZeros):
                sparse.skip(len(piece.view))  # a fresh sparse file already reads as zeros
            else:
                write(piece.view)
            piece.done()


@dataclass(frozen=True)
class _FrameJob:
    """A whole zstd frame (in a buffer of the frame pool) and the piece its content goes into."""

    frame: Piece
    piece: Piece


def _decompress_whole(
    decompressor: zstandard.ZstdDecompressor, frame: bytes | memoryview, into: memoryview
) -> None:
    """Decompress one whole frame into ``into``, which its header's content size fills exactly
    (zstd decodes a whole frame straight into the buffer, with no copy out of its window)."""
    reader = decompressor.stream_reader(frame, read_across_frames=False)
    filled = 0
    try:
        while filled < len(into) and (length := reader.readinto(into[filled:])):
            filled += length
        more = reader.read(1)
    except zstandard.ZstdError as exc:
        if "Destination buffer is too small" not in str(exc):
            raise
        filled, more = len(into), b"more"  # zstd's words for content past the size its header says
    if filled != len(into) or more:
        raise FormatError(
            f"the snapshot data is corrupt: a zstd frame that says it holds {len(into)} bytes "
            f"decompresses to {filled if filled != len(into) else 'more'}"
        )


_RAW_IMAGE = "image, not a snapshot of one"


def as_raw_image(exc: FormatError, start: bytes | bytearray | memoryview) -> FormatError:
    """``exc``, of a file whose first bytes are ``start``, naming it as a disk image itself when it
    is one (the likeliest wrong file: ``cp pg.img restore/pg.mirn``, ``mirenfs restore pg.img``)."""
    if _RAW_IMAGE in str(exc) or start[: len(MAGIC)] == MAGIC:
        return exc
    found = filesystem_in(start)
    if found is None:
        return exc
    make_one = "make one of it with mirenfs backup --image IMAGE -o NAME.mirn"
    return FormatError(f"{exc}: it is a raw {found} {_RAW_IMAGE}; {make_one}")


@contextlib.contextmanager
def _naming_a_raw_image(start: bytes | bytearray | memoryview) -> Iterator[None]:
    try:
        yield
    except FormatError as exc:
        raise as_raw_image(exc, start) from None


def check_snapshot_start(start: bytes | bytearray | memoryview) -> None:
    """Raise what a snapshot beginning with ``start`` fails on (bad magic, version, metadata),
    before the bytes are handed over: the error the mount says when a write after them fails."""
    with _naming_a_raw_image(start):
        HeaderParser().feed(start[: PREFIX_LEN + MAX_METADATA_LEN])


def _corrupt(exc: zstandard.ZstdError) -> FormatError:
    """zstd's refusal of a frame, in the words of a restore (a window over the limit was refused
    at the frame's header, with its own sentence)."""
    return FormatError(f"the snapshot data is corrupt: {exc}")


class _KnownZeros:
    """A piece of a zero frame's content: the stages read it from a static buffer."""

    __slots__ = ("view",)

    def __init__(self, length: int) -> None:
        self.view = memoryview(_ZEROS)[:length]

    def wait_filled(self) -> None:
        return None

    def done(self) -> None:
        return None


def _trim_all(pools: tuple[BufferPool, ...]) -> None:
    for pool in pools:
        pool.trim()


def _stop_all(
    handoffs: tuple[Handoff[_InputItem], Handoff[_FrameJob], Handoff[_Piece], Handoff[_Piece]],
    pools: tuple[BufferPool, ...],
    settles: list[trio.Event],
    waker: LoopWaker,
    ticket: int,
) -> None:
    """Wake every stage and every waiter of a pipeline that stops, and give its share back
    (this runs once per pipeline)."""
    BULK_WORK.leave(ticket)
    for handoff in handoffs:
        handoff.stop()
    for pool in pools:
        pool.stop()
    for event in list(settles):  # a copy: the event loop may remove one meanwhile
        waker.set(event)


class RestoreStream:
    """A restore fed with snapshot bytes in order, in pieces of any size.

    ``open_target`` is awaited once the header is known (its size and name
    may decide where the image goes) and returns the writer for the image.
    After any error the stream stays failed and every later call raises it.
    An error found by a stage after :meth:`feed` returned is raised by the
    next :meth:`feed`, :meth:`settle` or :meth:`finish`.
    """

    def __init__(
        self, open_target: OpenTarget, *, header_read: Meta | None = None, check_seek_table: bool = False
    ) -> None:
        self._open_target = open_target
        self._check_seek_table = check_seek_table
        self._header = HeaderParser()
        self._start = bytearray()  # the first bytes, to name a disk image given for a snapshot
        # Bad magic, held until the bytes that may name the file as a disk image came (a pipe's
        # first read can be a few bytes; btrfs's superblock is 64 KiB in).
        self._bad_start: FormatError | None = None
        if header_read is not None:  # the caller already consumed the header (Go's RestoreImage)
            self._header.meta = validate_restorable(header_read)
        self._pipeline: _Pipeline | None = None
        self._finalizer: weakref.finalize[[], RestoreStream] | None = None
        self._opened = False
        self._failure: BaseException | None = None
        self.bytes_in = 0

    @property
    def meta(self) -> Meta | None:
        return self._header.meta

    @property
    def bytes_out(self) -> int:
        return self._pipeline.bytes_out if self._pipeline is not None else 0

    @property
    def bytes_hashed(self) -> int:
        """Image bytes through every stage but the write (the hash sets the pace): progress."""
        return self._pipeline.bytes_hashed if self._pipeline is not None else 0

    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Hand over the next piece of the snapshot; raise as soon as a problem is known."""
        await self._raise_if_failed()
        try:
            self.bytes_in += len(data)
            rest = memoryview(data)
            if not self._opened:
                if len(self._start) < SIGNATURES_END:  # however the stream came in pieces (review S4 F4)
                    self._start += rest[: SIGNATURES_END - len(self._start)]
                if self._bad_start is None:
                    try:
                        rest = self._header.feed(rest)
                    except FormatError as exc:
                        if self._start[: len(MAGIC)] == MAGIC:
                            raise
                        self._bad_start = exc
                if self._bad_start is not None:
                    if len(self._start) < SIGNATURES_END:
                        return  # what it is may be known by then: the next feed or the end says
                    raise as_raw_image(self._bad_start, self._start)
                if self._header.meta is None:
                    return
                await self._open()
            if len(rest):
                # A copy unless it is a whole bytes object: the caller may reuse its buffer.
                await self._put(data if isinstance(data, bytes) and len(rest) == len(data) else bytes(rest))
        except MirenfsError as exc:
            self._failure = self._failure or exc
        await self._raise_if_failed()  # a stage may have failed meanwhile: say so now

    async def settle(self) -> None:
        """Wait until everything fed so far is decompressed, so :attr:`complete` is exact."""
        self._fail_on_a_bad_start()
        await self._raise_if_failed()
        if self._pipeline is not None:
            with contextlib.suppress(Stopped):  # the failure, if any, is raised next
                await self._pipeline.settle()
            await self._raise_if_failed()

    async def whole_and_verified(self) -> bool:
        """Whether the bytes fed so far form a whole snapshot that matches its checksum, checked
        without ending the stream (skippable frames, such as a seek table, may still follow).
        False while it is not whole; a whole one that does not match fails the stream here."""
        await self.settle()
        if not self.complete:
            return False
        meta = self._header.meta
        assert meta is not None
        try:
            pipeline = await self._open()
            await pipeline.all_hashed.wait()
            await self._raise_if_failed()
            _check_whole(meta, pipeline)
        except MirenfsError as exc:
            self._failure = self._failure or exc
            await self.close()
            raise
        return True

    async def finish(self) -> Meta:
        """Check that the stream is complete, exactly ``size_bytes`` long, and matches its checksum."""
        self._fail_on_a_bad_start()
        await self._raise_if_failed()
        try:
            meta = self._header.meta
            if meta is None:
                raise FormatError(truncated_header(self.bytes_in))
            pipeline = await self._open()  # a header with no data at all opens the target too
            pipeline.input.close()
            await pipeline.stages.done.wait()
            await self._raise_if_failed()
            _check_whole(meta, pipeline)
            return meta
        except MirenfsError as exc:
            self._failure = self._failure or exc
            raise
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the stages and wait for their threads (quick once stopped); safe to repeat.

        Nothing is written to the image after this returns.
        """
        pipeline = self._pipeline
        if pipeline is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.join_stages)
            pipeline.drop_buffers()
        if self._finalizer is not None:
            self._finalizer.detach()  # nothing left to stop

    def join_stages(self) -> None:
        """:meth:`close` without the event loop (stop, then wait for the threads); safe to repeat."""
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.stages.stop()
            pipeline.stages.join()

    @property
    def complete(self) -> bool:
        """Whether the bytes so far form a whole snapshot: all of ``size_bytes`` out, no frame cut.

        Exact after :meth:`settle` (the stages may still be working on the last pieces)."""
        meta = self._header.meta
        pipeline = self._pipeline
        if meta is None or pipeline is None:
            return meta is not None and meta.size_bytes == 0
        return pipeline.bytes_out == meta.size_bytes and pipeline.scanner.at_boundary

    async def _open(self) -> _Pipeline:
        """Open the target and start the stages, once."""
        if self._pipeline is None:
            meta = self._header.meta
            assert meta is not None
            self._opened = True
            validate_restorable(meta)  # before the target is opened: a refused header changes nothing
            writer = await self._open_target(meta)
            pipeline = self._pipeline = _Pipeline(
                meta.size_bytes, writer, check_seek_table=self._check_seek_table
            )
            self._finalizer = weakref.finalize(
                self, pipeline.stages.stop
            )  # an abandoned stream stops its threads
        return self._pipeline

    async def _put(self, data: bytes) -> None:
        assert self._pipeline is not None
        try:
            await self._pipeline.put(data, len(data))
        except Stopped:
            await self._raise_if_failed()
            raise FormatError("the restore was stopped") from None

    def _fail_on_a_bad_start(self) -> None:
        """The stream ended (or is asked whether it is whole) with its bad magic held: fail now,
        naming a disk image if what came shows one."""
        if self._bad_start is not None and self._failure is None:
            self._failure = as_raw_image(self._bad_start, self._start)

    async def _raise_if_failed(self) -> None:
        """Raise the stream's failure, if any, once the stages have stopped: after an error,
        nothing more reaches the image."""
        if self._failure is None and self._pipeline is not None:
            self._failure = self._pipeline.stages.failure
        if self._failure is not None:
            await self.close()
            raise self._failure


def _window_too_large(window: int) -> str:
    return (
        f"the snapshot's zstd data needs a decoding window of {window >> 20} MiB, and mirenfs decodes "
        f"windows up to {MAX_WINDOW >> 20} MiB (was it compressed with zstd --long?); recompress it "
        "without --long, or with --long=27 at most (if it was not, the copy is damaged: a frame "
        "header can ask for any window)"
    )


def _check_whole(meta: Meta, pipeline: _Pipeline) -> None:
    """The end of a stream: no frame cut, exactly ``size_bytes`` out, the checksum matches."""
    cut = "a file cut short, or a copy stopped before its end"  # the stream cannot tell which
    if not pipeline.scanner.at_boundary:
        raise FormatError(f"the snapshot data is truncated: the stream ended inside a zstd frame ({cut})")
    if pipeline.bytes_out != meta.size_bytes:
        raise FormatError(
            f"the snapshot data is short: it decompresses to {pipeline.bytes_out} bytes, "
            f"the header says {meta.size_bytes} ({cut})"
        )
    actual = pipeline.sha.hexdigest()
    if actual != meta.checksum.lower():
        raise FormatError(f"checksum mismatch: the data hashes to {actual}, the header says {meta.checksum}")
    if pipeline.scanner.seek_table is not None:
        pipeline.scanner.seek_table.check(pipeline.bytes_out)


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
        make_room: MakeRoom | None = None,
    ) -> None:
        self._choose_image = choose_image
        self._make_room = make_room  # a cache that gives back space when the staging file finds none
        self._before_install = before_install
        self._new_mode = new_mode  # for an image that did not exist before
        self._staging: StagingImage | None = None
        self.stream = RestoreStream(self._open_target, header_read=header_read)

    async def _open_target(self, meta: Meta) -> ImageWriter:
        image_path = await self._choose_image(meta)
        try:
            self._staging = await trio.to_thread.run_sync(
                StagingImage.create, image_path, meta.size_bytes, self._make_room
            )
        except TargetError as exc:
            if exc.errno != errno.EFBIG:
                raise
            raise TargetError(
                f"the snapshot's header claims a disk of {size_in_words(meta.size_bytes)}, more than the "
                "filesystem it is restored into can hold in one file (File too large); restore it where "
                "a file that large fits, or check the snapshot (a damaged header can claim any size)",
                errno.EFBIG,
            ) from None
        return self._staging.writer()

    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.feed(data)

    async def finish(self) -> Meta:
        """Verify the whole stream, fsync, call ``before_install``, then rename over the image
        and fsync the directory. ``before_install`` comes after the fsync (a full filesystem's
        last chance to refuse the data), so once it returns only the rename can fail."""
        meta = await self.stream.finish()
        assert self._staging is not None
        held = await trio.to_thread.run_sync(
            partial(self._staging.seal, meta.timestamp.unix_ns, new_mode=self._new_mode)
        )
        if self._before_install is not None:
            await self._before_install()  # the last moment a refusal can still keep the old image
        await trio.to_thread.run_sync(self._staging.rename_over_image)
        if held != meta.timestamp.unix_ns:  # the snapshot's bytes no longer come back from a backup
            log.warning(
                "restored %s with the time %s: its filesystem cannot store the header's %s, so a "
                "snapshot of it will differ from the one restored in its timestamp",
                self._staging.image_path,
                Timestamp(held).rfc3339(),
                meta.timestamp.rfc3339(),
            )
        return meta

    @property
    def installed(self) -> bool:
        """Whether the image was replaced: from then on the restore is done, whatever comes."""
        return self._staging is not None and self._staging.renamed

    async def discard(self) -> None:
        """Stop the stages first: no write may reach the descriptor once it is closed. Shielded:
        a cancellation while it runs must not leave the staging file behind, nor a second Ctrl-C
        (review: it came at the next checkpoint, before the file was removed)."""
        try:
            with trio.CancelScope(shield=True):
                await self.stream.close()
        finally:
            self._discard_now()

    @trio.lowlevel.enable_ki_protection
    def _discard_now(self) -> None:
        """The stages' end, then the staging file's removal, with no checkpoint between: an
        interrupt waits for the next one. Quick: the stages were stopped, removal is an unlink."""
        self.stream.join_stages()
        if self._staging is not None:
            self._staging.discard()


class Placed:
    """Whether a restore or a backup has put its file in place: the point of no return, after
    which an interrupt finds the command done (the CLI says it came late, and exits 0) where
    before it the command is undone. Set by the engine, where the rename happens; read by the
    caller once ``trio.run`` has raised ``KeyboardInterrupt``."""

    def __init__(self, when_placed: Callable[[], object] | None = None) -> None:
        self._meta: Meta | None = None
        self._restore: StagedRestore | None = None
        self._when_placed = when_placed  # run with the rename's record, on the event loop's thread

    def watch(self, restore: StagedRestore) -> None:
        """Follow ``restore``: it is in place once its staging file is renamed over the image
        (on a worker thread, which no interrupt stops half way)."""
        self._restore = restore

    def set(self, meta: Meta) -> None:
        """The file of the snapshot or image ``meta`` describes is in place."""
        self._meta = meta
        if self._when_placed is not None:
            self._when_placed()

    @property
    def meta(self) -> Meta | None:
        """The header of what was put in place, or None while nothing was."""
        if self._meta is None and self._restore is not None and self._restore.installed:
            return self._restore.stream.meta
        return self._meta


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def refuse_unusual_target(image_path: str, *, overwrite: bool) -> os.stat_result | None:
    """Only a regular file is ever replaced: the restore renames a new file over the path, which
    would put a file where a device node, a symbolic link or a directory was. Returns what is
    there (None: nothing), for :func:`refuse_a_changed_target` at the end."""
    try:
        found = os.lstat(image_path)
    except FileNotFoundError:
        return None
    mode = found.st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise TargetError(f"{image_path} is {kind}; a restore writes image files only, so name a file")
    if not overwrite:
        raise TargetError(f"{image_path} already exists; pass --force to replace it")
    return found


def refuse_a_changed_target(image_path: str, found: os.stat_result | None) -> None:
    """Replace only what was checked when the restore began (review Sec F3): a file another
    process put at the path meanwhile, maybe another user's in a directory she can write, would
    have given the restored disk its owner and mode, and was never agreed to be replaced."""
    try:
        now: os.stat_result | None = os.lstat(image_path)
    except FileNotFoundError:
        now = None
    if now is None and found is None:
        return
    # The same file, untouched (the change time also tells a new file that took a freed inode number).
    if (
        now is not None
        and found is not None
        and ImageIdentity.from_stat(now) == ImageIdentity.from_stat(found)
    ):
        return
    what = "appeared" if found is None else "was replaced, changed or removed"
    raise TargetError(
        f"{image_path} {what} while the snapshot was restored, by another process, so the restore did not "
        "replace it; check what is there and restore again",
        errno.EEXIST,  # not EBUSY: the caller's "the image is as it was" would not be true
    )


async def restore_to_path(
    image_path: str,
    chunks: ChunkIterable,
    *,
    overwrite: bool,
    on_header: Callable[[Meta], None] | None = None,
    header_read: Meta | None = None,
    check_target: Callable[[], None] | None = None,
    placed: Placed | None = None,
) -> Meta:
    """Restore a snapshot stream into ``image_path`` through its staging file (SPEC §3).

    Nothing changes at ``image_path`` unless the whole stream verified; on
    any failure the staging file is removed. ``check_target`` (blocking) may
    refuse the target: it runs before any input is read, and again right
    before the image is replaced (a loop device may have been attached meanwhile). ``placed``
    learns when the image is replaced, for a caller that an interrupt reaches after that.
    """
    found = refuse_unusual_target(image_path, overwrite=overwrite)
    if check_target is not None:
        await trio.to_thread.run_sync(check_target)

    async def before_install() -> None:
        if check_target is not None:
            await trio.to_thread.run_sync(check_target)
        await trio.to_thread.run_sync(refuse_a_changed_target, image_path, found)

    async def choose_image(meta: Meta) -> str:
        if on_header is not None:
            on_header(meta)
        return image_path

    # A new image file the caller named is its owner's only (the umask may take more away).
    restore = StagedRestore(
        choose_image, header_read=header_read, new_mode=disk_file_mode(), before_install=before_install
    )
    if placed is not None:
        placed.watch(restore)
    try:
        async for chunk in chunks:
            await restore.feed(chunk)
        return await restore.finish()
    finally:
        await restore.discard()
