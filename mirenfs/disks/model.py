"""Disks, volumes and leases as Miren's Go package has them, and the resolver/creator/catalogue protocols.

Pure data and names: nothing here opens a file or a database. A disk name is
validated here and is never turned into a path any other way; a volume's
image path is derived here and nowhere else.

Statuses are parsed here, once, whoever wrote them: Miren's entities say
``status.deleting``, its Go package ``DELETING``, the SQLite store
``deleting``; all three are :attr:`DiskState.DELETING` (likewise for
volumes and leases), and :class:`Disk`, :class:`Volume` and :class:`Lease`
normalise whatever status they are built with, so the rules compare one
spelling whatever resolver answered.
"""

from __future__ import annotations

import enum
import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

from mirenfs.errors import InvalidDiskNameError, InvalidVolumeError, StoreError

IMAGE_FILE_NAME = "disk.img"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)
# A volume id becomes one path component under the data path: the same alphabet, no leading dot.
_VOLUME_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _status_member(enum_type: type[enum.StrEnum], value: object) -> enum.StrEnum | None:
    """The member a status spelled ``status.deleting``, ``DELETING`` or ``deleting`` means, or None."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower().removeprefix("status.")
    for member in enum_type:
        if member.value == text:
            return member
    return None


class DiskState(enum.StrEnum):
    """A disk's status, as Miren records it (any of Miren's spellings parses: see the module doc)."""

    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"
    ATTACHED = "attached"
    DETACHED = "detached"
    DELETING = "deleting"
    ERROR = "error"

    @classmethod
    def _missing_(cls, value: object) -> DiskState | None:
        member = _status_member(cls, value)
        return member if isinstance(member, cls) else None


class VolumeState(enum.StrEnum):
    """A volume's status: ``provisioning`` until its image is in place."""

    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"

    @classmethod
    def _missing_(cls, value: object) -> VolumeState | None:
        member = _status_member(cls, value)
        return member if isinstance(member, cls) else None


class LeaseState(enum.StrEnum):
    """A lease's status; only ``bound`` means someone uses the disk right now."""

    PENDING = "pending"
    BOUND = "bound"
    FAILED = "failed"
    RELEASED = "released"

    @classmethod
    def _missing_(cls, value: object) -> LeaseState | None:
        member = _status_member(cls, value)
        return member if isinstance(member, cls) else None


@dataclass(frozen=True)
class Disk:
    id: str
    name: str
    status: DiskState
    filesystem: str
    size_bytes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", DiskState(self.status))  # any spelling: one member


@dataclass(frozen=True)
class Volume:
    """The storage of a disk; ``image_path`` None means the managed path under the data path.

    ``node`` is the host whose data path holds the image; None in a one-host
    catalogue (the SQLite store), where every volume is on the host itself.
    """

    id: str
    disk_id: str
    image_path: str | None = None
    status: VolumeState = VolumeState.PROVISIONED
    node: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", VolumeState(self.status))


@dataclass(frozen=True)
class Lease:
    id: str
    disk_id: str
    status: LeaseState

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", LeaseState(self.status))


@dataclass(frozen=True)
class DiskRecord:
    """One disk with everything the mount's root listing and ``disk list`` show.

    ``local``: its volume is on the host that asked (always, in a one-host
    catalogue); ``image_path`` is None for a disk whose image is elsewhere.
    """

    disk: Disk
    volume: Volume | None
    image_path: str | None
    leases: tuple[Lease, ...]
    local: bool = True

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.disk.id,
            "name": self.disk.name,
            "status": self.disk.status.value,
            "filesystem": self.disk.filesystem,
            "size_bytes": self.disk.size_bytes,
            "volume_id": self.volume.id if self.volume else None,
            "volume_status": self.volume.status.value if self.volume else None,
            "node": self.volume.node if self.volume else None,
            "image_path": self.image_path,
            "managed_image": bool(self.volume and not self.volume.image_path),
            "leases": [{"id": lease.id, "status": lease.status.value} for lease in self.leases],
        }


# --- names and paths ---


def validate_disk_name(name: str) -> str:
    """Return ``name`` if it is a valid disk name; a name is never turned into a path otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidDiskNameError(
            f"{name!r} is not a valid disk name: use 1-63 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


def validate_node_name(node: str) -> str:
    """Return ``node`` if it can name a host in the catalogue (a disk name's alphabet: hostnames fit)."""
    if not isinstance(node, str) or not _NAME_RE.fullmatch(node):
        raise InvalidDiskNameError(
            f"{node!r} is not a valid node name: use 1-63 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return node


def validate_volume_id(volume_id: str) -> str:
    if not isinstance(volume_id, str) or not _VOLUME_ID_RE.fullmatch(volume_id):
        raise InvalidVolumeError(
            f"volume id {volume_id!r} is not usable as a directory name; fix the disk's record"
        )
    return volume_id


DB_FILE_NAME = "mirenfs.db"  # the SQLite disk store of a data path (with its -wal and -shm beside it)


def volumes_dir(data_path: str) -> str:
    return os.path.join(data_path, "disk-data", "volumes")


STATE_DIRECTORY = "mirenfs"  # under a data path: see state_directory


def state_directory(data_path: str) -> str:
    """mirenfs's own files under the data path: indexes, frames, clones, the mount's log and lock,
    the images this host registered."""
    return os.path.join(data_path, STATE_DIRECTORY)


# Which etcd cluster each catalogue a data path talked to is in (disks.etcd.ClusterPin)
ETCD_CLUSTERS_FILE = "etcd-clusters.json"


def etcd_catalogue_hint(data_path: str) -> str | None:
    """Where this data path's disks are when it has talked to an etcd catalogue (its cluster
    record says so), as the end of a sentence: a command without ``--catalog`` reads the empty
    SQLite store instead (trial T20: a cron job saw no disks, without a word)."""
    try:
        with open(os.path.join(state_directory(data_path), ETCD_CLUSTERS_FILE), "rb") as f:
            recorded = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    for prefix, entry in sorted(recorded.items()):
        endpoints = entry.get("endpoints") if isinstance(entry, dict) else None
        if isinstance(endpoints, list) and all(isinstance(endpoint, str) for endpoint in endpoints):
            where = f"{','.join(endpoints)}/{prefix}"
            return (
                f"the etcd catalogue at {where}: pass --catalog etcd://{where} (etcds:// if it speaks "
                "TLS), or set $MIRENFS_CATALOG"
            )
    return None


def index_directory(data_path: str) -> str:
    """Where a mount saves its disks' indexes, so a remount needs no index pass."""
    return os.path.join(state_directory(data_path), "index")


def frame_store_directory(data_path: str) -> str:
    """Compressed frames by chunk fingerprint, kept across mounts of the data path."""
    return os.path.join(state_directory(data_path), "frames")


def holds_mirenfs_files(directory: str) -> bool:
    """Whether ``directory`` holds a data path's files: a disk store, or mirenfs's state."""
    return os.path.isfile(os.path.join(directory, DB_FILE_NAME)) or os.path.isdir(state_directory(directory))


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

    def create_disk_for_restore(
        self, name: str, *, size_bytes: int, filesystem: str, disk_id: str | None = None
    ) -> CreatedDisk:
        """A new disk (status ``provisioning``, id ``disk_id`` or a fresh one) and its volume;
        raises if the name is taken."""
        ...

    def update_disk(self, disk_id: str, *, size_bytes: int, filesystem: str) -> None:
        """Record the size and filesystem a restore gave an existing disk (``provisioning`` ends too)."""
        ...


class Catalog(DiskResolver, DiskCreator, Protocol):
    """The catalogue of disks of one host: what the CLI, the mount and ``catalog copy`` use.

    The SQLite store (``disks.store.Store``) and the etcd catalogue
    (``disks.etcd.EtcdCatalog``) both implement it. A catalogue that cannot
    be reached raises :class:`~mirenfs.errors.CatalogUnreachableError` from
    every call, never :class:`~mirenfs.errors.DiskNotFoundError`: only a
    lookup that *succeeded* and found nothing may lead to creating a disk.
    """

    @property
    def data_path(self) -> str:
        """This host's data path: managed images live under it."""
        ...

    def check(self) -> None:
        """Refuse, with the reason, a catalogue or data path the mount could not work with."""
        ...

    def list_disks(self) -> list[DiskRecord]:
        """Every disk, by name (``local`` says which are on this host)."""
        ...

    def get_disk(self, name: str) -> DiskRecord: ...

    def add_disk(
        self,
        name: str,
        *,
        size_bytes: int,
        filesystem: str,
        status: DiskState = DiskState.PROVISIONED,
        image_path: str | None = None,
        disk_id: str | None = None,
    ) -> DiskRecord:
        """A new disk on this host (id ``disk_id`` or a fresh one); raises
        :class:`~mirenfs.errors.DiskExistsError` if the name is taken."""
        ...

    def put_record(self, record: DiskRecord) -> str:
        """Write a disk as another catalogue has it (ids kept): ``added``, ``unchanged``, or ``differs``
        (that disk is here already as something else: left alone, since it may hold a newer lease or
        status than the copy); :class:`~mirenfs.errors.DiskExistsError` if the name belongs to
        another disk here."""
        ...

    def set_disk_status(self, name: str, status: DiskState | str) -> tuple[DiskState, DiskState]: ...

    def mark_provisioned(self, disk_id: str) -> bool: ...

    def delete_disk_records(self, disk_id: str) -> bool: ...

    def acquire_lease(self, name: str) -> Lease: ...

    def release_lease(self, lease_id: str) -> tuple[Lease, str, bool]: ...

    def explicit_image_paths(self) -> list[str]:
        """This host's images registered at their own paths (``disk add``)."""
        ...


def new_id(prefix: str) -> str:
    """A fresh id for a disk, volume or lease (``disk-…``): random, so hosts never collide."""
    return f"{prefix}-{secrets.token_hex(8)}"


def new_disk_records(
    name: str,
    *,
    size_bytes: int,
    filesystem: str,
    status: DiskState,
    image_path: str | None,
    node: str | None = None,
    disk_id: str | None = None,
) -> tuple[Disk, Volume]:
    """A new disk and its volume, as every catalogue stores them: the name checked, fresh ids,
    an explicit image made absolute, the volume ``provisioning`` exactly while the disk is."""
    validate_disk_name(name)
    status = DiskState(status)
    if image_path is not None:
        image_path = os.path.abspath(image_path)
    provisioning = status == DiskState.PROVISIONING
    volume_status = VolumeState.PROVISIONING if provisioning else VolumeState.PROVISIONED
    disk = Disk(disk_id or new_id("disk"), name, status, filesystem, size_bytes)
    return disk, Volume(new_id("vol"), disk.id, image_path, volume_status, node)


class CreatedRecords:
    """A catalogue's half of a restore into a new name: finalize it, or remove the records again.

    Shared by every :class:`Catalog`: both steps are catalogue calls.
    """

    def __init__(self, catalog: Catalog, disk: Disk, volume: Volume) -> None:
        self._catalog = catalog
        self._disk = disk
        self._volume = volume

    @property
    def disk(self) -> Disk:
        return self._disk

    @property
    def volume(self) -> Volume:
        return self._volume

    def finalize(self) -> None:
        if not self._catalog.mark_provisioned(self._disk.id):
            raise StoreError(
                f"disk {self._disk.name} vanished from the disk catalogue while it was being restored"
            )

    def cleanup(self) -> None:
        self._catalog.delete_disk_records(self._disk.id)
