"""Test data on disk: images built from segments, their hashes, and what a restore may leave behind.

Plain files only: nothing here runs mirenfs, mounts or needs root.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from pathlib import Path

# Names that are never a disk name, whatever asks (CLI, library, restore/).
BAD_NAMES = ["../x", "a/b", ".hidden", "", "x" * 64, "sp ace"]


def write_image(path: Path, segments: list[tuple[str, int]], seed: int = 0) -> bytes:
    """Build an image from (kind, length) segments: 'hole', 'zero', 'data', 'text'.

    Holes are left unwritten (sparse); zero runs are written as real zeros.
    Returns the image's bytes for comparison.
    """
    rng = random.Random(seed)
    content = bytearray()
    with open(path, "wb") as f:
        for kind, length in segments:
            if kind == "hole":
                f.seek(length, os.SEEK_CUR)
                content += bytes(length)
                continue
            if kind == "zero":
                piece = bytes(length)
            elif kind == "data":
                piece = rng.randbytes(length)
            else:
                piece = (b"mirenfs text %d\n" % rng.randrange(1000) * (length // 16 + 1))[:length]
            f.write(piece)
            content += piece
        f.truncate(len(content))
    return bytes(content)


def write_slow_image(path: Path, size: int) -> None:
    """Data that compresses (slowly: 17 symbols at random) and never repeats within a chunk.

    One 4 MiB block is made and written with a different first line each
    time: zstd's work per chunk is the same as for fully random text.
    """
    table = bytes(b"abcdefghijklmnop "[i % 17] for i in range(256))
    block = bytearray(os.urandom(4 << 20).translate(table))
    with open(path, "wb") as f:
        for n in range(size // len(block)):
            block[:16] = b"%016d" % n
            f.write(block)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_sparse(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file whose holes are hashed as zeros without being read (huge sparse images)."""
    digest = hashlib.sha256()
    zeros = bytes(1 << 20)
    with open(path, "rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, 0
        while offset < size:
            try:
                data_start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                data_start = size
            for start in range(offset, data_start, len(zeros)):
                digest.update(zeros[: min(len(zeros), data_start - start)])
            if data_start >= size:
                break
            data_end = os.lseek(f.fileno(), data_start, os.SEEK_HOLE)
            f.seek(data_start)
            digest.update(f.read(data_end - data_start))
            offset = data_end
    return digest.hexdigest()


def staging_files(directory: str | os.PathLike[str]) -> list[str]:
    """The staging files of restores under ``directory``: a finished or failed restore leaves none."""
    return sorted(str(p) for p in Path(directory).rglob("*.restore.tmp"))


def seek_table_start(snapshot: bytes) -> int:
    """Where a mirenfs snapshot's seek table (its last frame, skippable) begins: every image
    byte is in the stream before it."""
    count = struct.unpack("<I", snapshot[-9:-5])[0]
    start = len(snapshot) - 9 - 12 * count - 8
    assert struct.unpack("<I", snapshot[start : start + 4])[0] == 0x184D2A5E, "no seek table at the end"
    return start
