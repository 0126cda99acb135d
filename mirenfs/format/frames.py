"""zstd frame-level pieces: per-chunk frames, the seekable-format seek table,
and a structural scanner that knows where frames end.

python-zstandard decompresses a stream but does not say whether the stream
stopped in the middle of a frame; :class:`FrameScanner` walks frame and block
headers (never the payload) so that a truncated snapshot is refused.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import sys
import threading
from array import array

import zstandard

from mirenfs.errors import FormatError

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC_MIN = 0x184D2A50
SKIPPABLE_MAGIC_MAX = 0x184D2A5F
SEEK_TABLE_SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
SEEK_TABLE_FOOTER_LEN = 9
MAX_FRAME_CONTENT = 1 << 30  # the seekable format's limit on one frame's content
_CHECKSUM_FLAG = 0x80
_RESERVED_DESCRIPTOR_BITS = 0x7C  # bits 2-6 of the seek table descriptor: zero, or the table is refused

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level: ZstdCompressor is not thread-safe."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def compress_frame(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """One independent frame with content size and checksum (SPEC §2.1).

    python-zstandard returns a bytes object that still holds ``ZSTD_compressBound`` bytes (it
    only sets the length): a 300-byte frame of a 4 MiB chunk kept 4 MiB. A frame that came out
    much smaller than its chunk is copied to its own size, so what caches hold is what they count.
    """
    frame = _compressor(level).compress(data)
    return memoryview(frame).tobytes() if len(frame) < len(data) * 3 // 4 else frame


@functools.lru_cache(maxsize=16)
def zero_frame(length: int, level: int) -> bytes:
    """The precomputed frame for ``length`` zero bytes, so holes are never compressed."""
    return compress_frame(bytes(length), level)


def frame_checksum(frame: bytes) -> int:
    """The frame's content checksum (low 32 bits of XXH64), stored in its last 4 bytes."""
    return int.from_bytes(frame[-4:], "little")


def seek_table(entries: list[tuple[int, int, int]]) -> bytes:
    """The seekable format's seek table for (compressed, decompressed, checksum) entries."""
    columns = [array("I", column) for column in zip(*entries, strict=True)] if entries else [array("I")] * 3
    return seek_table_of_arrays(*columns)


def seek_table_of_arrays(compressed: array[int], decompressed: array[int], checksums: array[int]) -> bytes:
    """:func:`seek_table` for entries held in three ``array("I")`` columns, built without a
    Python object per entry: a 1 TiB disk has 262 144 frames, whose list of tuples took 40 MB."""
    if not len(compressed) == len(decompressed) == len(checksums):
        raise ValueError("the seek table's columns differ in length")
    entries = array("I", bytes(12 * len(compressed)))
    for column, values in enumerate((compressed, decompressed, checksums)):
        entries[column::3] = values
    if sys.byteorder != "little":
        entries.byteswap()
    footer = struct.pack("<IBI", len(compressed), _CHECKSUM_FLAG, SEEKABLE_MAGIC)
    content_length = 12 * len(compressed) + len(footer)
    return b"".join([struct.pack("<II", SEEK_TABLE_SKIPPABLE_MAGIC, content_length), entries, footer])


def seek_table_len(frame_count: int) -> int:
    return 8 + 12 * frame_count + SEEK_TABLE_FOOTER_LEN


def seek_table_length(footer: bytes) -> int:
    """The bytes a seek table takes at the end of a stream, its skippable frame's header
    included, by its footer (the stream's last SEEK_TABLE_FOOTER_LEN bytes)."""
    count, descriptor = struct.unpack_from("<IB", footer)
    entry_len = 12 if descriptor & _CHECKSUM_FLAG else 8
    return 8 + entry_len * int(count) + SEEK_TABLE_FOOTER_LEN


def seek_table_frame_count(tail: bytes) -> int:
    """The frame count of the seek table at the end of ``tail``, checked whole (footer, length,
    and the skippable frame that holds it) without a Python object per entry: ``inspect`` of a
    crafted 64 MiB table took 700 MB as tuples (review F)."""
    if len(tail) < SEEK_TABLE_FOOTER_LEN:
        raise FormatError("no seek table: the data is shorter than its footer")
    count, descriptor, magic = struct.unpack("<IBI", tail[-SEEK_TABLE_FOOTER_LEN:])
    if magic != SEEKABLE_MAGIC:
        raise FormatError("no seek table at the end of the zstd data")
    entry_len = 12 if descriptor & _CHECKSUM_FLAG else 8
    start = len(tail) - SEEK_TABLE_FOOTER_LEN - entry_len * count
    if start < 8:
        raise FormatError("the seek table is truncated")
    frame_magic, content_length = struct.unpack_from("<II", tail, start - 8)
    if (
        frame_magic != SEEK_TABLE_SKIPPABLE_MAGIC
        or content_length != entry_len * count + SEEK_TABLE_FOOTER_LEN
    ):
        raise FormatError("the seek table's skippable frame does not hold it")
    return int(count)


def parse_seek_table(tail: bytes) -> list[tuple[int, int, int]]:
    """Read a seek table from the end of a stream (used by tests)."""
    count = seek_table_frame_count(tail)
    entry_len = 12 if tail[-SEEK_TABLE_FOOTER_LEN + 4] & _CHECKSUM_FLAG else 8
    start = len(tail) - SEEK_TABLE_FOOTER_LEN - entry_len * count
    entries = []
    for i in range(count):
        raw = tail[start + i * entry_len : start + (i + 1) * entry_len]
        c, d = struct.unpack_from("<II", raw)
        x = struct.unpack_from("<I", raw, 8)[0] if entry_len == 12 else 0
        entries.append((c, d, x))
    return entries


def _frame_header_rest(descriptor: int) -> int:
    """Bytes of a frame header after its magic and descriptor: window, dictionary id, content size."""
    single_segment = bool(descriptor & 0x20)
    fcs_len = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    return (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03] + fcs_len


def frame_content_size(header: bytes) -> int | None:
    """The content size a whole frame header (magic included) declares, or None when it has none."""
    descriptor = header[4]
    fcs_len = (1 if descriptor & 0x20 else 0, 2, 4, 8)[descriptor >> 6]
    if not fcs_len:
        return None
    content = int.from_bytes(header[len(header) - fcs_len :], "little")
    return content + 256 if fcs_len == 2 else content


def frame_window_size(header: bytes) -> int:
    """The decoding window a whole frame header (magic included) asks for (RFC 8878 3.1.1.1.2);
    a single-segment frame's window is its content."""
    descriptor = header[4]
    if not descriptor & 0x20:
        exponent, mantissa = header[5] >> 3, header[5] & 7
        base = 1 << (10 + exponent)
        return base + (base >> 3) * mantissa
    return frame_content_size(header) or 0


MAX_SEEK_TABLE = 64 << 20  # a seek table verify reads (5.5 million frames: 21 TiB of 4 MiB chunks)


class SeekTableCheck:
    """Whether a seek table at the end of the zstd data lists the frames before it (SPEC §2.1).

    The seek table is the data's last frame when that is a skippable frame with
    the seekable format's magic (0x184D2A5E); data without one (Go's) has
    nothing to check. Frames are compared by count, compressed size and
    decompressed size (the content size in the frame's header, which zstd holds
    the frame to; for frames without one, what the decompression stage counted,
    told through :meth:`frame_decompressed`). Memory stays constant: the frames
    are summed and hashed as they pass, only the table is kept.
    """

    def __init__(self) -> None:
        self.frames = 0
        self._compressed = 0
        self._sizes = hashlib.blake2b(digest_size=16)  # (compressed, decompressed) of each frame
        self._compressed_sizes = hashlib.blake2b(digest_size=16)
        self._all_sizes_known = True
        self._uncounted: int | None = None  # a frame without a content size, until it is counted
        self._table: bytearray | None = None  # the content of a seek-table frame, while it is the last
        self._table_len = 0

    def data_frame(self, compressed: int, content_size: int | None) -> None:
        self._table = None  # a table followed by frames is not the seek table
        self.frames += 1
        self._compressed += compressed
        self._compressed_sizes.update(compressed.to_bytes(8, "little"))
        if self._uncounted is not None:  # the one before was never counted: totals only
            self._all_sizes_known = False
            self._uncounted = None
        if content_size is None:
            self._uncounted = compressed  # its size comes with frame_decompressed
        else:
            self._sizes.update(compressed.to_bytes(8, "little") + content_size.to_bytes(8, "little"))

    def frame_decompressed(self, size: int) -> None:
        """What the latest frame decompressed to, when its header did not say (review P22 F1:
        such frames were held to the total only, so a table sending a seekable reader to the
        wrong offsets passed)."""
        if self._uncounted is not None:
            self._sizes.update(self._uncounted.to_bytes(8, "little") + size.to_bytes(8, "little"))
            self._uncounted = None

    def skippable_frame(self, magic: int, length: int) -> None:
        self._table = bytearray() if magic == SEEK_TABLE_SKIPPABLE_MAGIC else None
        self._table_len = length

    def skippable_bytes(self, data: memoryview) -> None:
        if self._table is not None and len(self._table) + len(data) <= MAX_SEEK_TABLE:
            self._table += data

    def check(self, decompressed: int) -> None:
        """Raise :class:`FormatError` unless the data ends without a seek table or with one that
        lists exactly the frames read (``decompressed`` bytes in all)."""
        table = self._table
        if table is None:
            return  # no seek table at the end
        if self._uncounted is not None:
            self._all_sizes_known = False
        where = "the seek table at the end of the zstd data"
        meaning = (
            "; the image data itself verified, so a restore works, but seekable-zstd tools cannot use the "
            "file: back the disk up again for a sound one"
        )
        if len(table) != self._table_len:  # too large to keep (over MAX_SEEK_TABLE): its length is known
            if self._table_len - SEEK_TABLE_FOOTER_LEN not in (8 * self.frames, 12 * self.frames):
                raise FormatError(
                    f"{where} does not match the frames: its {self._table_len} bytes cannot list the "
                    f"data's {self.frames} frames" + meaning
                )
            return  # the right length for them (a disk of over 21 TiB): its entries are not read
        if len(table) < SEEK_TABLE_FOOTER_LEN or table[-4:] != SEEKABLE_MAGIC.to_bytes(4, "little"):
            raise FormatError(
                f"{where} is damaged: it does not end in the seekable format's magic 0x{SEEKABLE_MAGIC:08X}"
                + meaning
            )
        count, descriptor = struct.unpack_from("<IB", table, len(table) - SEEK_TABLE_FOOTER_LEN)
        if descriptor & _RESERVED_DESCRIPTOR_BITS:  # the format says a reader must refuse them
            raise FormatError(
                f"{where} is damaged: its descriptor 0x{descriptor:02X} sets reserved bits" + meaning
            )
        entry_len = 12 if descriptor & _CHECKSUM_FLAG else 8
        if len(table) != SEEK_TABLE_FOOTER_LEN + entry_len * count:
            raise FormatError(
                f"{where} does not match the frames: its footer counts {count} frames, which do not "
                f"fit its {len(table)} bytes, and the data has {self.frames}" + meaning
            )
        sizes, compressed_sizes = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        listed_compressed = listed_decompressed = 0
        for n in range(count):
            c, d = struct.unpack_from("<II", table, n * entry_len)
            listed_compressed, listed_decompressed = listed_compressed + c, listed_decompressed + d
            compressed_sizes.update(c.to_bytes(8, "little"))
            sizes.update(c.to_bytes(8, "little") + d.to_bytes(8, "little"))
        listed = (count, listed_compressed, listed_decompressed)
        read = (self.frames, self._compressed, decompressed)
        if listed != read:
            raise FormatError(
                f"{where} does not match the frames: it lists {count} frames of {listed_decompressed} "
                f"bytes in {listed_compressed} compressed, the data has {self.frames} frames of "
                f"{decompressed} bytes in {self._compressed}" + meaning
            )
        same = sizes.digest() == self._sizes.digest() if self._all_sizes_known else True
        if not same or compressed_sizes.digest() != self._compressed_sizes.digest():
            raise FormatError(
                f"{where} does not match the frames: the sizes it lists for the {count} frames differ "
                "from theirs (the same totals, other frames or another order)" + meaning
            )


class FrameScanner:
    """Tracks zstd frame boundaries over a stream fed in pieces of any size.

    It reads only frame headers, block headers and skippable-frame sizes, and
    skips payloads by count, so it costs little next to decompression.
    """

    def __init__(self, seek_table: SeekTableCheck | None = None) -> None:
        self._pending = bytearray()  # bytes of a header not yet complete
        self._skip = 0  # payload bytes to pass over before the next header
        self._state = "frame"  # the header being read: frame, skiplen, fheader, fparams or block
        self._need = 4
        self._checksum_len = 0
        self._consumed = 0  # bytes fed so far, to the end of the header being read
        self._frame_start = 0
        self._content_size: int | None = None
        self._in_skippable = False
        self._event = False  # whether the last feed_to_event stopped at an event
        self.frames = 0
        self.window_size = 0  # the decoding window the latest zstd frame's header asks for
        self.seek_table = seek_table  # told of every frame, when given

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly between frames."""
        return self._state == "frame" and self._skip == 0 and not self._pending

    @property
    def in_zstd_frame(self) -> bool:
        """True between the end of a zstd frame's header and the end of that frame."""
        return self._state == "block" or (self._skip > 0 and not self._in_skippable)

    @property
    def content_size(self) -> int | None:
        """The content size the latest zstd frame's header declares (None: not declared)."""
        return self._content_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._feed(memoryview(data), stop=False)

    def feed_to_event(self, data: bytes | bytearray | memoryview) -> tuple[int, bool]:
        """Feed ``data`` up to the next event, the end of a frame's header or the end of a frame:
        (bytes taken, whether an event ended them). A reader cuts the stream into frames so."""
        view = memoryview(data)
        taken = self._feed(view, stop=True)
        return taken, self._event

    def _feed(self, view: memoryview, *, stop: bool) -> int:
        pos = 0
        self._event = False
        while pos < len(view):
            if self._skip:
                step = min(self._skip, len(view) - pos)
                if self._in_skippable and self.seek_table is not None:
                    self.seek_table.skippable_bytes(view[pos : pos + step])
                self._skip -= step
                self._consumed += step
                pos += step
                if stop and self.at_boundary:
                    self._event = True  # the frame's last payload bytes
                    return pos
                continue
            take = min(self._need - len(self._pending), len(view) - pos)
            self._pending += view[pos : pos + take]
            self._consumed += take
            pos += take
            if len(self._pending) == self._need:
                state = self._state
                self._advance(bytes(self._pending))
                if stop and (state in ("fparams", "skiplen") or self.at_boundary):
                    self._event = True  # a header complete, or a frame that ended with its last header
                    return pos
        return pos

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == "frame":
            self._in_skippable = False
            (magic,) = struct.unpack("<I", header)
            if SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX:
                self._set("skiplen", 8, keep=True)  # magic + 4-byte length
            elif magic == ZSTD_MAGIC:
                self._set("fheader", 5, keep=True)  # magic + descriptor byte
            elif header == b"MIRN":
                raise FormatError(
                    "the zstd data is corrupt: a snapshot header (MIRN) follows the data, as where two "
                    "snapshot files were joined (cat a.mirn b.mirn); restore each file on its own"
                )
            else:
                raise FormatError(f"the zstd data is corrupt: no frame starts here (magic {magic:#010x})")
        elif state == "skiplen":
            magic, self._skip = struct.unpack_from("<II", header)
            self.frames += 1
            self._in_skippable = True
            if self.seek_table is not None:
                self.seek_table.skippable_frame(magic, self._skip)
            self._set("frame", 4)
        elif state == "fheader":
            descriptor = header[4]
            if descriptor & 0x08:
                raise FormatError("the zstd data is corrupt: reserved frame header bit set")
            self._checksum_len = 4 if descriptor & 0x04 else 0
            self._set("fparams", 5 + _frame_header_rest(descriptor), keep=True)
        elif state == "fparams":
            self.window_size = frame_window_size(header)
            self._content_size = frame_content_size(header)
            self._frame_start = self._consumed - len(header)
            self._set("block", 3)
        elif state == "block":
            value = int.from_bytes(header, "little")
            last, block_type, size = value & 1, (value >> 1) & 3, value >> 3
            if block_type == 3:
                raise FormatError("the zstd data is corrupt: reserved block type")
            self._skip = 1 if block_type == 1 else size
            if last:
                self._skip += self._checksum_len
                self.frames += 1
                if self.seek_table is not None:
                    frame_end = self._consumed + self._skip
                    self.seek_table.data_frame(frame_end - self._frame_start, self._content_size)
                self._set("frame", 4)
            else:
                self._set("block", 3)

    def _set(self, state: str, need: int, *, keep: bool = False) -> None:
        """Move to the next header; ``keep`` extends the current one (magic + rest)."""
        self._state, self._need = state, need
        if not keep:
            self._pending = bytearray()


def zstd_library_version() -> str:
    """The zstd library version, part of the cache key: frames depend on it."""
    return ".".join(str(part) for part in zstandard.ZSTD_VERSION)
