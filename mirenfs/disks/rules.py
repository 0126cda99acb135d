"""The rules of backup and restore (SPEC §3): every refusal, in one copy.

Who decides which disks
exist is left to a :class:`DiskResolver` (and, for restores into a new name,
a :class:`DiskCreator`): the embedded SQLite store and the etcd catalogue
implement both, and Miren itself can stand behind the same interfaces.
Statuses are read through :class:`DiskState`/:class:`LeaseState` here too, so
Miren's ``status.deleting`` and ``DELETING`` refuse exactly as ``deleting``
does, whatever object a resolver answers with.

Restore is split in two because the mount must refuse at FUSE ``create``/
``open`` time, before the snapshot header (with its size and filesystem)
has arrived: :func:`prepare_restore` applies every refusal and creates
nothing; :meth:`RestoreTarget.open` creates the disk only once the header is
known. Every call here may block (store queries, ``/sys`` reads, ``stat``):
run them in worker threads from trio.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from mirenfs.disks.creations import mark_creating, marked_creating, unmark_creating
from mirenfs.disks.live import filesystems_on, loop_devices_backing
from mirenfs.disks.model import (
    DB_FILE_NAME,
    CreatedDisk,
    Disk,
    DiskCreator,
    DiskRecord,
    DiskResolver,
    DiskState,
    LeaseState,
    Volume,
    holds_mirenfs_files,
    image_path_for,
    new_id,
    state_directory,
    validate_disk_name,
    volumes_dir,
)
from mirenfs.engine.fstype import detect_filesystem
from mirenfs.engine.image import STAGING_SUFFIX, make_directories, staging_is_held
from mirenfs.errors import (
    NO_SPACE,
    CatalogUnreachableError,
    DiskAttachedError,
    DiskBusyError,
    DiskChangedError,
    DiskDeletingError,
    DiskExistsError,
    DiskLeasedError,
    DiskNotFoundError,
    ImageExistsError,
    ImageLiveError,
    ImageMissingError,
    ImageNotHereError,
    InvalidVolumeError,
    LiveCheckError,
    MirenfsError,
    StoreError,
    TargetError,
)

log = logging.getLogger(__name__)


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
    reading ``image_path`` itself is not a point-in-time copy (the CLI and
    the mount read one taken by ``disks.pointintime`` instead).
    """
    validate_disk_name(name)
    disk = resolver.find_disk_by_name(name)
    if DiskState(disk.status) is DiskState.DELETING:
        raise DiskDeletingError(f"disk {name} is being deleted and cannot be backed up")
    image_path = image_path_of(resolver, disk, data_path)
    if not os.path.isfile(image_path):
        raise ImageMissingError(
            f"disk {name} has no image at {image_path}; restore it from a snapshot or fix its volume"
        )
    warnings = []
    if DiskState(disk.status) is DiskState.ATTACHED:
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


# --- files the data path keeps ---


@dataclass(frozen=True)
class KeptFile:
    """What a path is to a data path: ``said`` in a few words; ``disk``, the disk whose image it
    is (``by_link``: under another name for the same file), when it is one's."""

    said: str
    disk: str | None = None
    by_link: bool = False


def what_the_data_path_keeps_at(path: str, data_path: str, disks: Iterable[DiskRecord]) -> KeptFile | None:
    """What ``path`` is to the data path when it is one of the files mirenfs or a disk owns
    there (its disk store, mirenfs's state, a managed volume, any disk's image); None when it
    is none of them. A backup written there, or an image registered there, would destroy it
    (trial V: `backup pg -o` its own image replaced the disk's data)."""
    real = os.path.realpath(path)
    root = os.path.realpath(data_path)
    store = os.path.join(root, DB_FILE_NAME)
    if real == store or real.startswith(f"{store}-"):
        return KeptFile(f"the disk store of the data path {data_path}")
    state = os.path.realpath(state_directory(data_path))
    if real == state or real.startswith(state + os.sep):
        return KeptFile(f"mirenfs's own state under {state_directory(data_path)}")
    try:
        found = os.stat(real)
    except OSError:
        found = None
    for record in disks:
        image, name = record.image_path, record.disk.name
        if image is None:
            continue
        if os.path.realpath(image) == real:
            return KeptFile(f"the image of disk {name}", name)
        with contextlib.suppress(OSError):
            other = os.stat(image)
            if found is not None and (other.st_dev, other.st_ino) == (found.st_dev, found.st_ino):
                return KeptFile(f"the image of disk {name} (another name for it)", name, by_link=True)
    volumes = os.path.realpath(volumes_dir(data_path))
    if real == volumes or real.startswith(volumes + os.sep):
        return KeptFile(f"inside the managed volumes of the data path ({volumes_dir(data_path)})")
    return None


def data_paths_around(path: str, default: str) -> list[str]:
    """The data paths a file at ``path`` may belong to: ``default`` (the one commands use without
    ``--data-path``) and the nearest directory above ``path``, each when it holds mirenfs's files
    (a disk store, or mirenfs's state). A command given a file directly (``restore --image``,
    ``backup --image -o``) takes no ``--data-path``, yet must not write over what a data path
    keeps (trial Q: ``restore --image DATA/mirenfs.db --force`` replaced the disk store)."""
    found = [default] if holds_mirenfs_files(default) else []
    directory = os.path.dirname(os.path.realpath(path))
    while True:
        if holds_mirenfs_files(directory):
            if os.path.realpath(directory) not in map(os.path.realpath, found):
                found.append(directory)
            return found
        parent = os.path.dirname(directory)
        if parent == directory:
            return found
        directory = parent


def refuse_output_over_an_image(output: str, *, source: str, action: str) -> None:
    """A file written whole (``backup -o``) must not be the image it is made from, nor one a loop
    device uses: either would lose a disk's data under a snapshot of it."""
    if output == "-" or not os.path.exists(output):  # nothing, or a link to nothing: refused later
        return
    with contextlib.suppress(OSError):
        if os.path.samefile(output, source):
            raise TargetError(f"{output} is the image being backed up; {action} would replace it")
    if stat.S_ISREG(os.stat(output).st_mode):
        _refuse_if_backing_a_loop_device(output, output, f"{output} is in use: it", action)


# --- restore ---


def managed_path_problem(data_path: str, image_path: str) -> str | None:
    """Why a managed image path must not be used, or None: a symbolic link among the volume
    directory or the image would send restore writes, or a removal, outside the data path."""
    volume_dir = os.path.dirname(image_path)
    expected = os.path.join(os.path.realpath(volumes_dir(data_path)), os.path.basename(volume_dir))
    if os.path.realpath(volume_dir) != expected or os.path.islink(image_path):
        return (
            f"{image_path} leads outside the data path through a symbolic link; mirenfs does not write or "
            "remove there: replace the link with a plain directory or file"
        )
    return None


def checked_image_path(data_path: str, volume: Volume, name: str) -> str:
    """The image path of disk ``name``'s volume, refused when a managed one leads outside the data path."""
    image_path = image_path_for(data_path, volume)
    problem = None if volume.image_path else managed_path_problem(data_path, image_path)
    if problem is not None:
        raise InvalidVolumeError(f"disk {name}: {problem}")
    return image_path


def image_path_of(resolver: DiskResolver, disk: Disk, data_path: str) -> str:
    return checked_image_path(data_path, resolver.find_volume_by_disk_id(disk.id), disk.name)


def refuse_if_in_use(resolver: DiskResolver, disk: Disk, image_path: str | None, *, action: str) -> None:
    """The refusals shared by every change to a disk's image: a bound lease, the store saying
    ``attached`` (a machine may use the file itself: it would go on writing the old, unlinked
    one), or a loop device backing the image (fails closed when that cannot be told).
    ``action`` completes "before …" in the message, e.g. ``restoring``."""
    name = disk.name
    if DiskState(disk.status) is DiskState.ATTACHED:
        raise DiskAttachedError(
            f"disk {name} is in use (its record says it is attached); once its machine has let it "
            f"go, detach it (`mirenfs disk set-status {name} detached`) before {action}"
        )
    leases = resolver.find_leases_by_disk_id(disk.id)
    bound = [lease for lease in leases if LeaseState(lease.status) is LeaseState.BOUND]
    if bound:
        raise DiskLeasedError(
            f"disk {name} is in use (lease {bound[0].id} is bound); stop its application or release "
            f"the lease (`mirenfs lease release {bound[0].id}`) before {action}"
        )
    if image_path is not None:
        _refuse_if_backing_a_loop_device(
            image_path, f"the image of disk {name}", f"disk {name} is in use: its image {image_path}", action
        )


def refuse_if_image_in_use(image_path: str, *, action: str) -> None:
    """An image file named directly (``restore --image PATH``) that backs a loop device: replacing
    it would leave the device on the old, unlinked file, whose writes are then lost."""
    if os.path.lexists(image_path):
        _refuse_if_backing_a_loop_device(image_path, image_path, f"{image_path} is in use: it", action)


def _refuse_if_backing_a_loop_device(image_path: str, what: str, in_use: str, action: str) -> None:
    """Fails closed: when it cannot be told whether a loop device uses the image, it is refused.
    ``in_use`` starts the refusal ("… backs /dev/loopN")."""
    try:
        devices = loop_devices_backing(image_path)
    except LiveCheckError as exc:
        raise LiveCheckError(
            f"cannot tell whether {what} is in use ({exc}), so {action} is refused"
        ) from None
    if devices:
        detach = f"detach it (`losetup -d /dev/{devices[0]}`)"
        with contextlib.suppress(LiveCheckError):  # what is mounted from it only words the advice
            mounted = filesystems_on(devices[:1])
            if mounted:  # losetup -d would only mark the device to go once that is unmounted
                detach = f"unmount {mounted[0].describe()}, then {detach}"
        raise ImageLiveError(f"{in_use} backs /dev/{devices[0]}; {detach} before {action}")


def _check_restorable(
    resolver: DiskResolver, disk: Disk, *, data_path: str, overwrite: bool, created: bool = False
) -> str:
    """Apply the refusals of §3 to an existing disk; return its image path. ``created``: this
    restore created the disk, whose image is not in place before the install."""
    name = disk.name
    # Its node first: the advice for a disk being deleted (`disk remove` it) is for that node's
    # host (trial E22 E9: on another host, that command is refused).
    volume = resolver.find_volume_by_disk_id(disk.id)
    if DiskState(disk.status) is DiskState.DELETING:
        raise DiskDeletingError(
            f"disk {name} is being deleted; wait for that to finish (if no `mirenfs disk remove` of it is "
            f"running, a killed one left it so: finish it with `mirenfs disk remove {name}`), or restore "
            "under another name"
        )
    image_path = checked_image_path(data_path, volume, name)
    refuse_if_in_use(resolver, disk, image_path, action="restoring")
    if overwrite:
        return image_path
    if os.path.lexists(image_path):
        raise ImageExistsError(
            f"disk {name} already has an image at {image_path}; pass --force to replace it"
        )
    # A record every host shares (trial E22 E2), unless a restore here created it: this one, or
    # one killed before its image was in place (its creation note is here).
    if volume.node is not None and not created and disk.id not in marked_creating(data_path):
        raise image_not_here(name, volume.node, image_path)
    return image_path


def image_not_here(
    name: str,
    node: str,
    image_path: str,
    *,
    data_path_words: str = "--data-path",
    consent: str = "to write its image here, and its size and filesystem into the record every host "
    "reads, pass --force",
) -> ImageNotHereError:
    """The refusal of a restore onto disk ``name`` of a shared catalogue whose image is not under
    this data path, ending in the consent it takes (the CLI's ``--force``, or a mount's)."""
    return ImageNotHereError(
        f"disk {name} of node {node} has no image at {image_path}: if it lives on another host (a wrong "
        f"{data_path_words}, or two hosts sharing one node name), restore it there; {consent}",
        image_path=image_path,
        node=node,
    )


# What a disk a failed restore created and could not remove waits for (the mount retries then).
UNTIL_THE_CATALOGUE_ANSWERS = "the catalogue answers"
UNTIL_THE_DATA_PATH_HAS_ROOM = "the data path has room"


@dataclass
class RestoreTarget:
    """A restore that passed every refusal; created by :func:`prepare_restore`.

    Call :meth:`open` when the header is known, restore into the path it
    returns, :meth:`before_install` right before the image is replaced (and
    :meth:`undo_record` if it is not replaced after all), then :meth:`finalize`
    on success or :meth:`cleanup` on failure.
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
    replaces_image: bool = False  # an existing disk whose image file existed (set by open)
    _created: CreatedDisk | None = field(default=None, repr=False)
    _created_dirs: list[str] = field(default_factory=list, repr=False)
    _finished: bool = field(default=False, repr=False)
    _left_behind: bool = field(default=False, repr=False)  # a created disk cleanup could not remove
    # ... because the catalogue did not answer; with ``removal_retried`` (a mount, which lives on)
    # the caller removes it once the catalogue answers again
    stranded: Disk | None = field(default=None, repr=False)
    removal_retried: bool = field(default=False, repr=False)
    stranded_until: str = field(default=UNTIL_THE_CATALOGUE_ANSWERS, repr=False)  # what it waits for
    # What the store said of an existing disk before before_install recorded the new image:
    # put back if the image is not replaced after all.
    _recorded_over: Disk | None = field(default=None, repr=False)
    _record_not_undone: str | None = field(default=None, repr=False)  # why putting it back failed
    _created_by_another: bool = field(default=False, repr=False)  # between the checks and the creation
    _made_state_directory: bool = field(default=False, repr=False)  # for the journal of creations
    _change_unknown: bool = field(default=False, repr=False)  # a create or record etcd may have applied
    _not_marked: str | None = field(default=None, repr=False)  # why a created disk is still provisioning
    _image_held: str | None = field(default=None, repr=False)  # the replaced image's filesystem, if known

    @property
    def creates_disk(self) -> bool:
        return self.existing is None

    def installed_as(self) -> str:
        """What an installed restore did to the disk, in a few words (for its one line)."""
        if self.creates_disk:
            return "new disk"
        said = "image replaced" if self.replaces_image else "image written: the disk had none"
        before = self._recorded_over or self.existing
        recorded = before.filesystem if before is not None else None
        # What the image held, read from it: its record may say otherwise (trial E22 E2: a restore
        # through a wrong data path had rewritten it, and the mend said the image held xfs).
        held = self._image_held or recorded
        if held is not None and self.filesystem is not None and held != self.filesystem:
            said += f"; it held {held}, now {self.filesystem}"  # said, not silent (trial T21 F6)
        if recorded is not None and held != recorded:
            said += f"; its record said {recorded}"
        return said

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
            self.image_path, self.replaces_image = image_path, os.path.lexists(image_path)
            self._image_held = detect_filesystem(image_path) if self.replaces_image else None
            return image_path
        if self.creator is None:  # prepare_restore refuses this; kept for a target built by hand
            raise DiskNotFoundError(self.name)
        # The sweep's proof that the disk is ours, should this restore be killed: noted before the
        # record exists (trial FI: a kill between the two left a disk no sweep would remove).
        disk_id = new_id("disk")
        unsaid: list[str] = []  # said once the disk is made: a read-only data path refuses both
        self._made_state_directory = mark_creating(self.data_path, disk_id, unsaid=unsaid)
        try:
            self._created = self.creator.create_disk_for_restore(
                self.name, size_bytes=size_bytes, filesystem=filesystem, disk_id=disk_id
            )
            for sentence in unsaid:
                log.warning("%s", sentence)
        except CatalogUnreachableError as exc:
            self._change_unknown = exc.maybe_applied  # the record may be there all the same
            if not exc.maybe_applied:
                self._forget_creation_note(disk_id)
            raise  # (else the note stays: a later sweep removes the disk if it was made)
        except BaseException as exc:
            self._forget_creation_note(disk_id)
            if not isinstance(exc, DiskExistsError):
                raise
            # trial T: said "pick another name" to the loser of a race
            self._created_by_another = True
            node = self._node_of_the_winner()
            where, then = (
                (f" on node {node}", f"restore it through node {node}") if node else ("", "restore again")
            )
            raise DiskExistsError(
                f"disk {self.name} was created{where} while this restore began (by another restore of it, "
                "through another mount or `mirenfs restore`, or by `disk create`); to replace its image, "
                f"{then}"
            ) from None
        try:
            image_path = image_path_for(self.data_path, self._created.volume)
            problem = (
                None if self._created.volume.image_path else managed_path_problem(self.data_path, image_path)
            )
            if problem is not None:
                raise InvalidVolumeError(f"disk {self.name}: {problem}")
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

    def _node_of_the_winner(self) -> str | None:
        """The other node a disk created meanwhile is on (trial W: "restore again" was refused
        there), or None: on this node, or not known."""
        get_disk = getattr(self.creator, "get_disk", None)
        try:
            record = get_disk(self.name) if get_disk is not None else None
        except MirenfsError:
            return None
        if record is None or record.local or record.volume is None:
            return None
        node: str | None = record.volume.node  # (get_disk found by name: typed here)
        return node

    def _recheck(self, expected: Disk) -> tuple[Disk, str]:
        """The disk may have changed since it was checked (a lease bound meanwhile): check again."""
        try:
            disk = self.resolver.find_disk_by_name(self.name)
        except DiskNotFoundError:
            raise DiskChangedError(f"disk {self.name} was removed while it was being restored") from None
        if disk.id != expected.id:
            raise DiskChangedError(f"disk {self.name} was replaced while it was being restored")
        image_path = _check_restorable(
            self.resolver,
            disk,
            data_path=self.data_path,
            overwrite=self.overwrite,
            created=self._created is not None,
        )
        return disk, image_path

    def before_install(self) -> None:
        """Right before the image is replaced (its data verified and synced): apply the
        refusals again, then record the new image. A lease bound or a loop device attached
        while the stream arrived stops the restore, not the application; and a store that
        cannot take the record (full, its catalogue gone) refuses the restore while the old
        image is still in place, so that "unchanged" stays true (:meth:`undo_record` if the
        rename fails after all)."""
        disk = self.disk
        if disk is None:
            return
        # Compared with the record as it is now, not as it was read at the start: a set-back of
        # a killed restore's record meanwhile left the new image described as the old (review S3).
        current, _ = self._recheck(disk)
        existing = current if self.existing is not None else None
        if existing is None or self.creator is None or self._created is not None:
            return
        assert self.size_bytes is not None and self.filesystem is not None
        changed = (existing.size_bytes, existing.filesystem) != (self.size_bytes, self.filesystem)
        # A disk left `provisioning` by an interrupted restore gets its image now: provisioned.
        if changed or DiskState(existing.status) is DiskState.PROVISIONING:
            try:
                self.creator.update_disk(existing.id, size_bytes=self.size_bytes, filesystem=self.filesystem)
            except CatalogUnreachableError as exc:
                self._change_unknown = exc.maybe_applied  # the new record may have landed all the same
                raise
            self._recorded_over = existing

    def undo_record(self) -> None:
        """The image was not replaced after :meth:`before_install` recorded it: the store
        describes the old image again (what :meth:`outcome` says if it cannot)."""
        old, self._recorded_over = self._recorded_over, None
        if old is None or self.creator is None:
            return
        try:
            self.creator.update_disk(old.id, size_bytes=old.size_bytes, filesystem=old.filesystem)
        except MirenfsError as exc:
            self._record_not_undone = (
                f"its image is unchanged ({old.size_bytes} bytes with {old.filesystem}), but the store "
                f"could not be set back and says {self.size_bytes} bytes with {self.filesystem} ({exc}); "
                "restore it again"
            )
            log.error("disk %s: %s", self.name, self._record_not_undone)

    def _make_parent_dirs(self, directory: str) -> None:
        self._created_dirs.extend(make_directories(directory, leaf_mode=0o700))

    def finalize(self) -> None:
        """The image is installed: a created disk becomes ``provisioned``; an existing one is updated."""
        if self.image_path is None:
            raise RuntimeError(f"the restore of disk {self.name} was never opened")
        if self._finished:
            return
        if self._created is not None:
            try:
                self._created.finalize()
            except MirenfsError as exc:
                self._not_marked = str(exc)
                raise
            self._not_marked = None
            unmark_creating(self.data_path, self._created.disk.id)
        old = self._recorded_over  # the store took the new image's record before it was installed
        if old is not None and (old.size_bytes, old.filesystem) != (self.size_bytes, self.filesystem):
            log.info(
                "disk %s now holds an image of %d bytes with %s (was %d bytes with %s); "
                "the store says so too",
                self.name,
                self.size_bytes,
                self.filesystem,
                old.size_bytes,
                old.filesystem,
            )
        self._finished = True

    def outcome(self) -> str:
        """What a failed restore left of the disk, after :meth:`cleanup`: said only when true."""
        if self._change_unknown:  # trial W: "unchanged" and "not created" were said, and untrue
            if not self.creates_disk:
                return (
                    f"the image of disk {self.name} is unchanged, but its record may have been changed "
                    "all the same (etcd received the change and did not answer in time): once the catalogue "
                    "answers, compare `mirenfs disk list` with the image, and restore again if they differ"
                )
            return (
                f"disk {self.name} may have been created all the same (etcd received the request and did "
                "not answer in time): once the catalogue answers, see `mirenfs disk list`, and remove it "
                f"(`mirenfs disk remove {self.name}`) if it is provisioning with no image"
            )
        if not self.creates_disk:
            if self._record_not_undone is not None:
                return f"disk {self.name}: {self._record_not_undone}"
            return f"disk {self.name} is unchanged"  # only its staging file was written, and removed
        if self.stranded is not None and self.removal_retried:
            return f"disk {self.name} was left provisioning and will be removed when {self.stranded_until}"
        if self._left_behind:
            return (
                f"disk {self.name} was created and could not be removed; "
                f"remove it with `mirenfs disk remove {self.name}`"
            )
        if self._created_by_another:
            return "this restore changed nothing"
        if self._finished and self._created is not None:  # recorded after all (trial FD F4)
            return f"disk {self.name} was created and its image restored"
        if self._not_marked is not None:
            return (
                f"disk {self.name} was created and its image restored, but the catalogue could not "
                f"mark it provisioned ({self._not_marked}); once it answers, run `mirenfs disk "
                f"set-status {self.name} provisioned`"
            )
        return f"disk {self.name} was not created"

    def _forget_creation_note(self, disk_id: str) -> None:
        """No disk was created after all: its note (and the state directory, if made for it) goes."""
        unmark_creating(self.data_path, disk_id)
        if self._made_state_directory:  # only if nothing else moved in
            with contextlib.suppress(OSError):
                os.rmdir(state_directory(self.data_path))

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
            self._forget_creation_note(created.disk.id)
        except Exception as exc:
            self._left_behind = True
            if isinstance(exc, CatalogUnreachableError):
                self.stranded = created.disk  # nothing of it is on disk any more: only its records
            elif isinstance(exc, StoreError) and exc.errno in NO_SPACE:
                # Trial X: the data path was full a moment longer than the staging file (XFS frees
                # removed files' blocks in the background): the record goes once there is room.
                self.stranded, self.stranded_until = created.disk, UNTIL_THE_DATA_PATH_HAS_ROOM
            if self.stranded is not None and self.removal_retried:
                log.error(
                    "could not remove disk %s, created for a restore that failed (%s); it is left "
                    "provisioning and will be removed when %s",
                    self.name,
                    exc,
                    self.stranded_until,
                )
                return
            log.error(
                "could not remove disk %s, created for a restore that failed (%s); remove it with "
                "`mirenfs disk remove %s`",
                self.name,
                exc,
                self.name,
            )


TRY_AGAIN_LATER = "try again when the catalogue answers"


def catalogue_gone(error: CatalogUnreachableError, outcome: str) -> CatalogUnreachableError:
    """A restore failed closed: the sentence ends with what became of its disk (``outcome``, as
    :meth:`RestoreTarget.outcome` says it) and what to do, as every failed restore's does."""
    failed = CatalogUnreachableError(f"{error}; {outcome}; {TRY_AGAIN_LATER}")
    failed.reported, failed.maybe_applied = error.reported, error.maybe_applied
    return failed


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
    except CatalogUnreachableError as exc:  # nothing was created or written yet, and it may not exist
        raise catalogue_gone(exc, f"no disk {name} was created or changed") from None
    if disk is None:
        if creator is None:
            raise DiskNotFoundError(
                name, f"there is no disk named {name}, and this restore may not create one"
            )
        return RestoreTarget(resolver, name, data_path, overwrite, creator, None)
    try:
        image_path = _check_restorable(resolver, disk, data_path=data_path, overwrite=overwrite)
    except CatalogUnreachableError as exc:
        raise catalogue_gone(exc, f"disk {name} is unchanged") from None
    # Only here, before this restore has a staging file of its own (the later checks would see it).
    if staging_is_held(image_path + STAGING_SUFFIX):
        raise DiskBusyError(
            f"disk {name} is already being restored (through another mount of this data path, "
            "or by mirenfs restore); try again once that is done"
        )
    return RestoreTarget(resolver, name, data_path, overwrite, creator, disk)
