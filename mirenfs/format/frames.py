"""zstd frame-level pieces: per-chunk frames, the seekable-format seek table,
and a structural scanner that knows where frames end.

python-zstandard decompresses a stream but does not say whether the stream
stopped in the middle of a frame; :class:`FrameScanner` walks frame and block
headers (never the payload) so that a truncated snapshot is refused.
"""

from __future__ import annotations

import functools
import struct
import threading

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
    """One independent frame with content size and checksum (SPEC §2.1)."""
    return _compressor(level).compress(data)


@functools.lru_cache(maxsize=16)
def zero_frame(length: int, level: int) -> bytes:
    """The precomputed frame for ``length`` zero bytes, so holes are never compressed."""
    return compress_frame(bytes(length), level)


def frame_checksum(frame: bytes) -> int:
    """The frame's content checksum (low 32 bits of XXH64), stored in its last 4 bytes."""
    return int.from_bytes(frame[-4:], "little")


def seek_table(entries: list[tuple[int, int, int]]) -> bytes:
    """The seekable format's seek table for (compressed, decompressed, checksum) entries."""
    body = b"".join(struct.pack("<III", c, d, x) for c, d, x in entries)
    footer = struct.pack("<IBI", len(entries), _CHECKSUM_FLAG, SEEKABLE_MAGIC)
    content = body + footer
    return struct.pack("<II", SEEK_TABLE_SKIPPABLE_MAGIC, len(content)) + content


def seek_table_len(frame_count: int) -> int:
    return 8 + 12 * frame_count + SEEK_TABLE_FOOTER_LEN


def parse_seek_table(tail: bytes) -> list[tuple[int, int, int]]:
    """Read a seek table from the end of a stream (used by tests and `inspect`)."""
    if len(tail) < SEEK_TABLE_FOOTER_LEN:
        raise FormatError("no seek table: the data is shorter than its footer")
    count, descriptor, magic = struct.unpack("<IBI", tail[-SEEK_TABLE_FOOTER_LEN:])
    if magic != SEEKABLE_MAGIC:
        raise FormatError("no seek table at the end of the zstd data")
    entry_len = 12 if descriptor & _CHECKSUM_FLAG else 8
    start = len(tail) - SEEK_TABLE_FOOTER_LEN - entry_len * count
    if start < 8:
        raise FormatError("the seek table is truncated")
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


def frame_window_size(header: bytes) -> int:
    """The decoding window a whole frame header (magic included) asks for (RFC 8878 3.1.1.1.2);
    a single-segment frame's window is its content."""
    descriptor = header[4]
    if not descriptor & 0x20:
        exponent, mantissa = header[5] >> 3, header[5] & 7
        base = 1 << (10 + exponent)
        return base + (base >> 3) * mantissa
    fcs_len = (1, 2, 4, 8)[descriptor >> 6]
    content = int.from_bytes(header[len(header) - fcs_len :], "little")
    return content + 256 if fcs_len == 2 else content


class FrameScanner:
    """Tracks zstd frame boundaries over a stream fed in pieces of any size.

    It reads only frame headers, block headers and skippable-frame sizes, and
    skips payloads by count, so it costs little next to decompression.
    """

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes of a header not yet complete
        self._skip = 0  # payload bytes to pass over before the next header
        self._state = "frame"  # the header being read: frame, skiplen, fheader or block
        self._need = 4
        self._checksum_len = 0
        self.frames = 0
        self.window_size = 0  # the decoding window the latest zstd frame's header asks for

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly between frames."""
        return self._state == "frame" and self._skip == 0 and not self._pending

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._skip:
                step = min(self._skip, len(view) - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._pending), len(view) - pos)
            self._pending += view[pos : pos + take]
            pos += take
            if len(self._pending) == self._need:
                self._advance(bytes(self._pending))

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == "frame":
            (magic,) = struct.unpack("<I", header)
            if SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX:
                self._set("skiplen", 8, keep=True)  # magic + 4-byte length
            elif magic == ZSTD_MAGIC:
                self._set("fheader", 5, keep=True)  # magic + descriptor byte
            else:
                raise FormatError(f"the zstd data is corrupt: no frame starts here (magic {magic:#010x})")
        elif state == "skiplen":
            self._skip = struct.unpack_from("<I", header, 4)[0]
            self.frames += 1
            self._set("frame", 4)
        elif state == "fheader":
            descriptor = header[4]
            if descriptor & 0x08:
                raise FormatError("the zstd data is corrupt: reserved frame header bit set")
            self._checksum_len = 4 if descriptor & 0x04 else 0
            self._set("fparams", 5 + _frame_header_rest(descriptor), keep=True)
        elif state == "fparams":
            self.window_size = frame_window_size(header)
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
