"""Error types: each carries one sentence for a person and the errno for FUSE."""

from __future__ import annotations

from errno import EINVAL, EIO, EPERM


class MirenfsError(Exception):
    """Base of every error mirenfs reports to people; ``errno`` is used at the FUSE boundary."""

    errno: int = EIO


class FormatError(MirenfsError):
    """The bytes are not a valid `.mirn` snapshot (header, zstd data, size or checksum)."""

    errno = EINVAL


class ImageChangedError(MirenfsError):
    """The image changed under a snapshot being produced: its bytes would no longer match."""

    errno = EIO


class TargetError(MirenfsError):
    """A restore target cannot be used (exists without consent, busy, or not writable)."""

    errno = EPERM

    def __init__(self, message: str, code: int = EPERM) -> None:
        super().__init__(message)
        self.errno = code
