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
