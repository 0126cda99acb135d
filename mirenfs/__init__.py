"""mirenfs: Miren disk snapshots (`.mirn`) as files, for backup and restore with ordinary tools.

The top level mirrors Miren's Go package in Python style: the format
(:class:`Meta`, :func:`write_header`, :func:`read_header`), the operations
(:func:`backup`, :func:`restore_image`), and the disk rules
(:func:`prepare_backup`, :func:`prepare_restore` over a :class:`DiskResolver`), and the
catalogues of disks that implement it (:func:`open_catalog`: the SQLite :class:`Store` of a
data path, or a fleet's catalogue on etcd; both are a :class:`Catalog`).
The status constants are the members of :class:`DiskState`,
:class:`VolumeState` and :class:`LeaseState` (``DiskState.DELETING == "deleting"``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mirenfs.api import backup, restore_image
    from mirenfs.disks.catalogs import open_catalog
    from mirenfs.disks.model import (
        Catalog,
        CreatedDisk,
        Disk,
        DiskCreator,
        DiskResolver,
        DiskState,
        Lease,
        LeaseState,
        Volume,
        VolumeState,
        validate_disk_name,
    )
    from mirenfs.disks.rules import BackupTarget, RestoreTarget, prepare_backup, prepare_restore
    from mirenfs.disks.store import Store
    from mirenfs.errors import (
        CatalogUnreachableError,
        DiskNotFoundError,
        FormatError,
        ImageChangedError,
        MirenfsError,
        TargetError,
    )
    from mirenfs.format.header import FORMAT_VERSION, MAGIC, Meta, Timestamp, read_header, write_header

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "BackupTarget",
    "Catalog",
    "CatalogUnreachableError",
    "CreatedDisk",
    "Disk",
    "DiskCreator",
    "DiskNotFoundError",
    "DiskResolver",
    "DiskState",
    "FormatError",
    "ImageChangedError",
    "Lease",
    "LeaseState",
    "Meta",
    "MirenfsError",
    "RestoreTarget",
    "Store",
    "TargetError",
    "Timestamp",
    "Volume",
    "VolumeState",
    "backup",
    "open_catalog",
    "prepare_backup",
    "prepare_restore",
    "read_header",
    "restore_image",
    "validate_disk_name",
    "write_header",
]


# Where each public name lives: loaded at first use, so that `import mirenfs.launch` (the
# command's entry point) loads nothing else, and a Ctrl-C while the command loads is its own.
_HOMES = {
    "backup": "mirenfs.api",
    "restore_image": "mirenfs.api",
    "open_catalog": "mirenfs.disks.catalogs",
    "BackupTarget": "mirenfs.disks.rules",
    "RestoreTarget": "mirenfs.disks.rules",
    "prepare_backup": "mirenfs.disks.rules",
    "prepare_restore": "mirenfs.disks.rules",
    "Store": "mirenfs.disks.store",
    "FORMAT_VERSION": "mirenfs.format.header",
    "MAGIC": "mirenfs.format.header",
    "Meta": "mirenfs.format.header",
    "Timestamp": "mirenfs.format.header",
    "read_header": "mirenfs.format.header",
    "write_header": "mirenfs.format.header",
    **dict.fromkeys(
        [
            "Catalog",
            "CreatedDisk",
            "Disk",
            "DiskCreator",
            "DiskResolver",
            "DiskState",
            "Lease",
            "LeaseState",
            "Volume",
            "VolumeState",
            "validate_disk_name",
        ],
        "mirenfs.disks.model",
    ),
    **dict.fromkeys(
        [
            "CatalogUnreachableError",
            "DiskNotFoundError",
            "FormatError",
            "ImageChangedError",
            "MirenfsError",
            "TargetError",
        ],
        "mirenfs.errors",
    ),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mirenfs' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once: later uses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
