"""mirenfs: Miren disk snapshots (`.mirn`) as files, for backup and restore with ordinary tools.

The top level mirrors Miren's Go package: the format (:class:`Meta`,
:func:`write_header`, :func:`read_header`) and the operations
(:func:`backup`, :func:`restore_image`).
"""

from mirenfs.api import backup, restore_image
from mirenfs.errors import FormatError, ImageChangedError, MirenfsError, TargetError
from mirenfs.format import FORMAT_VERSION, MAGIC, Meta, Timestamp, read_header, write_header

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "FormatError",
    "ImageChangedError",
    "Meta",
    "MirenfsError",
    "TargetError",
    "Timestamp",
    "backup",
    "read_header",
    "restore_image",
    "write_header",
]
