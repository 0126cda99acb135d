"""Disks, volumes and leases, and the rules of backup and restore (SPEC §3).

The names follow Miren's Go package in Python style. Who decides which disks
exist is left to a :class:`DiskResolver` (and, for restores into a new name,
a :class:`DiskCreator`): the embedded SQLite store implements both, and Miren
itself can stand behind the same interfaces.

Restore is split in two because the mount must refuse at FUSE ``create``/
``open`` time, before the snapshot header (with its size and filesystem)
has arrived: :func:`prepare_restore` applies every refusal and creates
nothing; :meth:`RestoreTarget.open` creates the disk only once the header is
known. Every call here may block (store queries, ``/sys`` reads, ``stat``):
run them in worker threads from trio.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Protocol

from mirenfs.errors import MirenfsError
from mirenfs.image import STAGING_SUFFIX

log = logging.getLogger("mirenfs")

SYS_BLOCK = "/sys/block"  # where loop devices tell their backing files; tests point it elsewhere
IMAGE_FILE_NAME = "disk.img"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)
# A volume id becomes one path component under the data path: the same alphabet, no leading dot.
_VOLUME_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DELETED_SUFFIX = " (deleted)"


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


# --- errors: one sentence naming the disk and what to do, and the errno the mount returns ---


class DiskNotFoundError(MirenfsError):
    """There is no disk of that name. The only lookup failure that may lead to creating a disk."""

    errno = errno.ENOENT

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"there is no disk named {name}; see `mirenfs disk list`")
        self.name = name


class VolumeNotFoundError(MirenfsError):
    """A disk without a volume: nobody can tell where its image is."""

    errno = errno.ENOENT


class InvalidDiskNameError(MirenfsError):
    errno = errno.EINVAL


class InvalidVolumeError(MirenfsError):
    """A volume id or image path that would not stay a plain file where it belongs."""

    errno = errno.EINVAL


class DiskDeletingError(MirenfsError):
    errno = errno.EBUSY


class DiskLeasedError(MirenfsError):
    """The disk has a bound lease: an application holds it."""

    errno = errno.EBUSY


class ImageLiveError(MirenfsError):
    """A loop device is backed by the disk's image: the kernel may be writing it."""

    errno = errno.EBUSY


class LiveCheckError(MirenfsError):
    """Whether an image is live could not be told; restore fails closed on it."""

    errno = errno.EIO


class ImageExistsError(MirenfsError):
    """Restoring would replace an existing image, and nobody consented."""

    errno = errno.EEXIST


class ImageMissingError(MirenfsError):
    errno = errno.ENOENT


class DiskChangedError(MirenfsError):
    """The disk changed between the refusal checks and the start of the restore."""

    errno = errno.EBUSY


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


# --- live images ---


def loop_devices_backing(image_path: str, *, sys_block: str | None = None) -> list[str]:
    """The loop devices (``loop3``, …) whose backing file is ``image_path``.

    Compared by device and inode where the backing file can be stat'ed (so a
    different spelling of the path still matches) and by path otherwise (a
    deleted backing file). Raises :class:`LiveCheckError` when it cannot tell.
    """
    sys_block = SYS_BLOCK if sys_block is None else sys_block
    try:
        image_stat: os.stat_result | None = os.stat(image_path)
    except FileNotFoundError:
        image_stat = None
    except OSError as exc:
        raise LiveCheckError(f"cannot stat {image_path}: {exc.strerror}") from None
    wanted = os.path.realpath(image_path)
    try:
        entries = sorted(name for name in os.listdir(sys_block) if name.startswith("loop"))
    except OSError as exc:
        raise LiveCheckError(f"cannot list loop devices in {sys_block}: {exc.strerror}") from None
    found = []
    for device in entries:
        try:
            with open(os.path.join(sys_block, device, "loop", "backing_file"), encoding="utf-8") as text:
                backing = text.read().rstrip("\n")
        except FileNotFoundError:
            continue  # a loop device with nothing attached (or detached meanwhile)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise LiveCheckError(f"cannot read the backing file of {device}: {reason}") from None
        if _same_file(backing, wanted, image_stat):
            found.append(device)
    return found


def _same_file(backing: str, wanted: str, image_stat: os.stat_result | None) -> bool:
    candidates = [backing]
    if backing.endswith(_DELETED_SUFFIX):
        candidates.append(backing.removesuffix(_DELETED_SUFFIX))
    for candidate in candidates:
        if os.path.realpath(candidate) == wanted:
            return True
    if image_stat is None:
        return False
    try:
        backing_stat = os.stat(backing)
    except OSError:
        return False
    return (backing_stat.st_dev, backing_stat.st_ino) == (image_stat.st_dev, image_stat.st_ino)


def image_is_live(image_path: str, *, sys_block: str | None = None) -> bool:
    """True when a loop device is backed by the image; raises :class:`LiveCheckError` if unsure."""
    return bool(loop_devices_backing(image_path, sys_block=sys_block))


def may_change_while_read(image_path: str) -> bool:
    """Whether an index pass must read each byte once (``build_index(single_read=...)``).

    A live image is expected to change under the pass: reading once keeps
    hash and frames in agreement (a torn but valid snapshot). When liveness
    cannot be told, the answer is yes too.
    """
    try:
        return image_is_live(image_path)
    except LiveCheckError:
        return True


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
        """Record the size and filesystem a restore gave an existing disk."""
        ...


# --- backup ---


@dataclass(frozen=True)
class BackupTarget:
    """What a backup of a disk reads, and what it should tell the operator."""

    disk: Disk
    image_path: str
    warning: str | None = None

    @property
    def name(self) -> str:
        return self.disk.name

    @property
    def filesystem(self) -> str:
        return self.disk.filesystem


def prepare_backup(resolver: DiskResolver, name: str, *, data_path: str) -> BackupTarget:
    """Find the disk's image; refuse a ``deleting`` disk or a missing image.

    An ``attached`` disk or a live image is backed up anyway, with a warning:
    such a read is not a point-in-time copy.
    """
    validate_disk_name(name)
    disk = resolver.find_disk_by_name(name)
    if disk.status == DiskState.DELETING:
        raise DiskDeletingError(f"disk {name} is being deleted and cannot be backed up")
    image_path = image_path_for(data_path, resolver.find_volume_by_disk_id(disk.id))
    if not os.path.isfile(image_path):
        raise ImageMissingError(
            f"disk {name} has no image at {image_path}; restore it from a snapshot or fix its volume"
        )
    warnings = []
    if disk.status == DiskState.ATTACHED:
        warnings.append(f"disk {name} is attached, so this backup is not a point-in-time copy")
    try:
        devices = loop_devices_backing(image_path)
    except LiveCheckError as exc:
        warnings.append(f"cannot tell whether disk {name} is in use ({exc}); the copy may be inconsistent")
    else:
        if devices:
            warnings.append(
                f"the image of disk {name} backs /dev/{devices[0]}, "
                "so this backup is not a point-in-time copy"
            )
    return BackupTarget(disk, image_path, "; ".join(warnings) or None)


# --- restore ---


def _check_restorable(resolver: DiskResolver, disk: Disk, *, data_path: str, overwrite: bool) -> str:
    """Apply the refusals of §3 to an existing disk; return its image path."""
    name = disk.name
    if disk.status == DiskState.DELETING:
        raise DiskDeletingError(
            f"disk {name} is being deleted; wait for that to finish or restore under another name"
        )
    bound = [lease for lease in resolver.find_leases_by_disk_id(disk.id) if lease.status == LeaseState.BOUND]
    if bound:
        raise DiskLeasedError(
            f"disk {name} is in use (lease {bound[0].id} is bound); stop its application or release "
            f"the lease (`mirenfs lease release {bound[0].id}`) before restoring"
        )
    image_path = image_path_for(data_path, resolver.find_volume_by_disk_id(disk.id))
    try:
        devices = loop_devices_backing(image_path)
    except LiveCheckError as exc:
        raise LiveCheckError(
            f"cannot tell whether the image of disk {name} is in use ({exc}), so the restore is refused"
        ) from None
    if devices:
        raise ImageLiveError(
            f"disk {name} is in use: its image {image_path} backs /dev/{devices[0]}; detach it "
            f"(`losetup -d /dev/{devices[0]}`) before restoring"
        )
    if not overwrite and os.path.lexists(image_path):
        raise ImageExistsError(
            f"disk {name} already has an image at {image_path}; restore with --force "
            "(or mount with --allow-overwrite) to replace it"
        )
    return image_path


@dataclass
class RestoreTarget:
    """A restore that passed every refusal; created by :func:`prepare_restore`.

    Call :meth:`open` when the header is known, restore into the path it
    returns, then :meth:`finalize` on success or :meth:`cleanup` on failure.
    """

    resolver: DiskResolver
    name: str
    data_path: str
    overwrite: bool
    creator: DiskCreator | None
    existing: Disk | None
    image_path: str | None = None
    size_bytes: int | None = None
    filesystem: str | None = None
    _created: CreatedDisk | None = field(default=None, repr=False)
    _created_dirs: list[str] = field(default_factory=list, repr=False)
    _finished: bool = field(default=False, repr=False)

    @property
    def creates_disk(self) -> bool:
        return self.existing is None

    @property
    def disk(self) -> Disk | None:
        if self._created is not None:
            return self._created.disk
        return self.existing

    def open(self, size_bytes: int, filesystem: str) -> str:
        """Return the image path to restore into, creating the disk now if it did not exist."""
        if self.image_path is not None or self._finished:
            raise RuntimeError(f"the restore of disk {self.name} was already opened")
        self.size_bytes, self.filesystem = size_bytes, filesystem
        if self.existing is not None:
            self.existing, image_path = self._recheck(self.existing)
            if not self.resolver.find_volume_by_disk_id(self.existing.id).image_path:
                self._make_parent_dirs(os.path.dirname(image_path))  # a managed volume's directory
            self.image_path = image_path
            return image_path
        if self.creator is None:  # prepare_restore refuses this; kept for a target built by hand
            raise DiskNotFoundError(self.name)
        self._created = self.creator.create_disk_for_restore(
            self.name, size_bytes=size_bytes, filesystem=filesystem
        )
        try:
            image_path = image_path_for(self.data_path, self._created.volume)
            self._make_parent_dirs(os.path.dirname(image_path))
            if not self.overwrite and os.path.lexists(image_path):
                raise ImageExistsError(
                    f"an image already exists at {image_path}, where the new disk {self.name} would go; "
                    "remove it or restore with --force"
                )
        except BaseException:
            self.cleanup()
            raise
        self.image_path = image_path
        return image_path

    def _recheck(self, expected: Disk) -> tuple[Disk, str]:
        """The disk may have changed since it was checked (a lease bound meanwhile): check again."""
        try:
            disk = self.resolver.find_disk_by_name(self.name)
        except DiskNotFoundError:
            raise DiskChangedError(f"disk {self.name} was removed while it was being restored") from None
        if disk.id != expected.id:
            raise DiskChangedError(f"disk {self.name} was replaced while it was being restored")
        image_path = _check_restorable(
            self.resolver, disk, data_path=self.data_path, overwrite=self.overwrite
        )
        return disk, image_path

    def check_still_restorable(self) -> None:
        """Right before the image is replaced, apply the refusals again: a lease bound or a
        loop device attached while the stream arrived stops the restore, not the application."""
        disk = self.disk
        if disk is not None:
            self._recheck(disk)

    def _make_parent_dirs(self, directory: str) -> None:
        missing = []
        probe = directory
        while not os.path.isdir(probe) and probe != os.path.dirname(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o700 if path == directory else 0o755)
            except FileExistsError:
                continue  # another restore made it: not ours to remove
            self._created_dirs.append(path)

    def finalize(self) -> None:
        """The image is installed: a created disk becomes ``provisioned``; an existing one is updated."""
        if self.image_path is None:
            raise RuntimeError(f"the restore of disk {self.name} was never opened")
        if self._finished:
            return
        if self._created is not None:
            self._created.finalize()
        elif self.existing is not None and self.creator is not None:
            assert self.size_bytes is not None and self.filesystem is not None
            if (self.existing.size_bytes, self.existing.filesystem) != (self.size_bytes, self.filesystem):
                self.creator.update_disk(
                    self.existing.id, size_bytes=self.size_bytes, filesystem=self.filesystem
                )
        self._finished = True

    def cleanup(self) -> None:
        """After a failure: remove a disk this restore created, with its files. Safe to call twice.

        For an existing disk only the directories :meth:`open` made are
        removed (the restore engine already left its image untouched); after
        :meth:`finalize` nothing happens. Problems are logged, not raised: the
        caller is already handling the failure that matters.
        """
        if self._finished:
            return
        self._finished = True
        created, self._created = self._created, None
        volume_dir: str | None = None
        if created is not None and not created.volume.image_path:  # only managed files are ours to delete
            with contextlib.suppress(MirenfsError):
                image_path = image_path_for(self.data_path, created.volume)
                volume_dir = os.path.dirname(image_path)
                for leftover in (image_path + STAGING_SUFFIX, image_path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
        for directory in reversed(self._created_dirs):
            if directory == volume_dir:
                shutil.rmtree(directory, ignore_errors=True)  # the new volume's own directory
            else:
                with contextlib.suppress(OSError):
                    os.rmdir(directory)  # only if nothing else moved in
        self._created_dirs.clear()
        if created is None:
            return
        try:
            created.cleanup()
        except Exception as exc:
            log.error(
                "could not remove disk %s, created for a restore that failed (%s); remove it with "
                "`mirenfs disk remove %s`",
                self.name,
                exc,
                self.name,
            )


def prepare_restore(
    resolver: DiskResolver,
    name: str,
    *,
    data_path: str,
    overwrite: bool,
    creator: DiskCreator | None,
) -> RestoreTarget:
    """Apply every refusal of §3 for a restore into disk ``name``; create nothing yet.

    Only :class:`DiskNotFoundError` may lead to creating a disk (later, in
    :meth:`RestoreTarget.open`, and only with a ``creator``); any other
    lookup failure is raised as it is.
    """
    validate_disk_name(name)
    try:
        disk: Disk | None = resolver.find_disk_by_name(name)
    except DiskNotFoundError:
        disk = None
    if disk is None:
        if creator is None:
            raise DiskNotFoundError(
                name, f"there is no disk named {name}, and this restore may not create one"
            )
        return RestoreTarget(resolver, name, data_path, overwrite, creator, None)
    _check_restorable(resolver, disk, data_path=data_path, overwrite=overwrite)
    return RestoreTarget(resolver, name, data_path, overwrite, creator, disk)
