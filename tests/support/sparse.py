"""What ``rsync --sparse`` does to the file it writes, and a valid snapshot that ends in zeros.

rsync -S writes the data it copies in 1 KiB pieces and leaves out the zero
bytes at the start and end of each: it seeks over them, and when the file ends
in such zeros it extends it with ``ftruncate``. A snapshot made by mirenfs ends
in its seek table's magic, never in a zero, so :func:`snapshot_ending_in_zeros`
builds one that does (one zstd frame of raw blocks, as Go's files have no seek
table) to reach that ``ftruncate``. Builds bytes only; never restores.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

from mirenfs.format.header import Meta

RSYNC_SPARSE_PIECE = 1024  # rsync's SPARSE_WRITE_SIZE
_ZSTD_MAGIC = 0xFD2FB528
_RAW_BLOCK_MAX = 128 << 10


def raw_frame(content: bytes) -> bytes:
    """One zstd frame holding ``content`` as raw blocks: single segment, 4-byte content size,
    no checksum, so the frame's last bytes are the content's last bytes."""
    assert 0 < len(content) < 1 << 32
    frame = bytearray(struct.pack("<IBI", _ZSTD_MAGIC, 0xA0, len(content)))  # FCS 4 bytes, single segment
    for start in range(0, len(content), _RAW_BLOCK_MAX):
        block = content[start : start + _RAW_BLOCK_MAX]
        last = start + len(block) == len(content)
        frame += (int(last) | len(block) << 3).to_bytes(3, "little") + block  # block type 0: raw
    return bytes(frame)


def snapshot_ending_in_zeros(meta: Meta, content: bytes) -> bytes:
    """A valid snapshot of ``content`` (which ends in zeros) whose last bytes are those zeros."""
    assert content.endswith(b"\0")
    checksum = hashlib.sha256(content).hexdigest()
    return replace(meta, size_bytes=len(content), checksum=checksum).header() + raw_frame(content)


def sparse_writes(data: bytes) -> tuple[list[tuple[int, bytes]], int | None]:
    """The writes ``rsync --sparse`` makes of ``data`` ((offset, bytes), in order), and the size it
    truncates the file to at the end (None when its last byte was written)."""
    writes: list[tuple[int, bytes]] = []
    for start in range(0, len(data), RSYNC_SPARSE_PIECE):
        piece = data[start : start + RSYNC_SPARSE_PIECE]
        body = piece.strip(b"\0")
        if body:
            writes.append((start + len(piece) - len(piece.lstrip(b"\0")), body))
    end = writes[-1][0] + len(writes[-1][1]) if writes else 0
    return writes, (len(data) if end < len(data) else None)


def skipped_by_rsync_sparse(data: bytes) -> int:
    """How many bytes ``rsync --sparse`` would seek over instead of writing."""
    writes, _truncate = sparse_writes(data)
    return len(data) - sum(len(body) for _offset, body in writes)
