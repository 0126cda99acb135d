"""Disks, volumes and leases as Miren's Go package has them, and the resolver/creator protocols.

Pure data and names: nothing here opens a file or a database. A disk name is
validated here and is never turned into a path any other way; a volume's
image path is derived here and nowhere else.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from typing import Protocol

from mirenfs.errors import InvalidDiskNameError, InvalidVolumeError

IMAGE_FILE_NAME = "disk.img"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)
# A volume id becomes one path component under the data path: the same alphabet, no leading dot.
_VOLUME_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class DiskState(enum.StrEnum):
    """A disk's status, as Miren records it."""

    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"
    ATTACHED = "attached"
    DETACHED = "detached"
    DELETING = "deleting"
    ERROR = "error"


class VolumeState(enum.StrEnum):
    """A volume's status: ``provisioning`` until its image is in place."""

    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"


class LeaseState(enum.StrEnum):
    """A lease's status; only ``bound`` means someone uses the disk right now."""

    PENDING = "pending"
    BOUND = "bound"
    FAILED = "failed"
    RELEASED = "released"


@dataclass(frozen=True)
class Disk:
    id: str
    name: str
    status: DiskState
    filesystem: str
    size_bytes: int


@dataclass(frozen=True)
class Volume:
    """The storage of a disk; ``image_path`` None means the managed path under the data path."""

    id: str
    disk_id: str
    image_path: str | None = None
    status: VolumeState = VolumeState.PROVISIONED


@dataclass(frozen=True)
class Lease:
    id: str
    disk_id: str
    status: LeaseState


# --- names and paths ---


def validate_disk_name(name: str) -> str:
    """Return ``name`` if it is a valid disk name; a name is never turned into a path otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidDiskNameError(
            f"{name!r} is not a valid disk name: use 1-63 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


def validate_volume_id(volume_id: str) -> str:
    if not isinstance(volume_id, str) or not _VOLUME_ID_RE.fullmatch(volume_id):
        raise InvalidVolumeError(
            f"volume id {volume_id!r} is not usable as a directory name; fix the volume in the disk store"
        )
    return volume_id


def volumes_dir(data_path: str) -> str:
    return os.path.join(data_path, "disk-data", "volumes")


def image_path_for(data_path: str, volume: Volume) -> str:
    """``<data-path>/disk-data/volumes/<volume-id>/disk.img``, unless the volume names its own image."""
    if volume.image_path:
        if not os.path.isabs(volume.image_path):
            raise InvalidVolumeError(
                f"volume {volume.id} names the relative image path {volume.image_path!r}; "
                "register the image with an absolute path"
            )
        return os.path.normpath(volume.image_path)
    return os.path.join(volumes_dir(data_path), validate_volume_id(volume.id), IMAGE_FILE_NAME)


# --- resolver and creator ---


class DiskResolver(Protocol):
    """Where disks, volumes and leases come from (the store, or Miren)."""

    def find_disk_by_name(self, name: str) -> Disk:
        """The disk; raises :class:`DiskNotFoundError` only when there is no such disk."""
        ...

    def find_volume_by_disk_id(self, disk_id: str) -> Volume: ...

    def find_leases_by_disk_id(self, disk_id: str) -> list[Lease]: ...


class CreatedDisk(Protocol):
    """A disk and volume a creator made for a restore, not yet usable."""

    @property
    def disk(self) -> Disk: ...

    @property
    def volume(self) -> Volume: ...

    def finalize(self) -> None:
        """The image is in place: the disk becomes ``provisioned``."""
        ...

    def cleanup(self) -> None:
        """The restore failed: remove the disk and volume records again."""
        ...


class DiskCreator(Protocol):
    """Creates disks for restores into a new name, and records what a restore changed."""

    def create_disk_for_restore(self, name: str, *, size_bytes: int, filesystem: str) -> CreatedDisk:
        """A new disk (status ``provisioning``) and its volume; raises if the name is taken."""
        ...

    def update_disk(self, disk_id: str, *, size_bytes: int, filesystem: str) -> None:
        """Record the size and filesystem a restore gave an existing disk (``provisioning`` ends too)."""
        ...
