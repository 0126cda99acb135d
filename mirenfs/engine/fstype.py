"""Recognise the filesystem inside an image from its superblock magic."""

from __future__ import annotations

import os

# (offset, magic, name): ext2/3/4 share one magic; mirenfs disks are ext4 there.
_SIGNATURES = (
    (1024 + 56, b"\x53\xef", "ext4"),
    (0, b"XFSB", "xfs"),
    (65536 + 64, b"_BHRfS_M", "btrfs"),
)


SIGNATURES_END = max(offset + len(magic) for offset, magic, _ in _SIGNATURES)  # the bytes filesystem_in needs


def filesystem_in(start: bytes | bytearray | memoryview) -> str | None:
    """``ext4``, ``xfs`` or ``btrfs`` when ``start``, the first bytes of a file, show one's superblock."""
    for offset, magic, name in _SIGNATURES:
        if start[offset : offset + len(magic)] == magic:
            return name
    return None


def detect_filesystem(image_path: str) -> str | None:
    """``ext4``, ``xfs`` or ``btrfs`` when the image holds one, else None."""
    try:
        with open(image_path, "rb") as image:
            for offset, magic, name in _SIGNATURES:
                if os.pread(image.fileno(), len(magic), offset) == magic:
                    return name
    except OSError:
        return None
    return None
