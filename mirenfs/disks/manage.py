"""Creating and removing disk images, and sweeping what a crashed restore left behind.

Images of ``disk create`` (and of restores into a new name) are *managed*:
they live at ``<data-path>/disk-data/volumes/<volume-id>/disk.img`` and
removing the disk deletes them with their volume directory. An image
registered with ``disk add`` stays where it is: removing the disk only
forgets it. Everything here blocks (mkfs runs for seconds): call it from a
worker thread in trio.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from mirenfs.disks.creations import (
    creation_noted_before,
    forget_removal_note,
    hold_disk_create_note,
    hold_removal_note,
    made_by_disk_create,
    marked_creating,
    removals_left,
    unmark_creating,
)
from mirenfs.disks.model import (
    Catalog,
    DiskRecord,
    DiskState,
    index_directory,
    new_id,
    state_directory,
    validate_disk_name,
    volumes_dir,
)
from mirenfs.disks.pointintime import sweep_leftovers
from mirenfs.disks.rules import managed_path_problem, refuse_if_in_use
from mirenfs.disks.store import Store
from mirenfs.disks.trust import disk_key
from mirenfs.engine.fstype import detect_filesystem
from mirenfs.engine.image import (
    STAGING_SUFFIX,
    hold_staging_name,
    make_directories,
    remove_dead_temporaries,
    remove_staging_if_unheld,
    staging_is_held,
)
from mirenfs.errors import (
    CatalogUnreachableError,
    DiskBusyError,
    DiskElsewhereError,
    DiskNotFoundError,
    InvalidVolumeError,
    MirenfsError,
    StoreError,
    StoreRefusedError,
    TargetError,
)

log = logging.getLogger(__name__)

# mkfs per filesystem: the command, the option that fills it from a directory, the package to install.
_MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], "-d", "e2fsprogs"),
    "xfs": (["mkfs.xfs", "-q", "-f"], None, "xfsprogs"),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], "--rootdir", "btrfs-progs"),
}
MKFS_TIMEOUT_S = 600
FINISHED_CREATION_S = 600.0  # a journal entry this old, of a disk no longer waiting for its image, is stale


def mkfs_program(filesystem: str) -> str | None:
    """The mkfs for ``filesystem`` if it is installed."""
    return shutil.which(_MKFS[filesystem][0][0])


@dataclass(frozen=True)
class CreatedImage:
    record: DiskRecord
    image_path: str
    formatted: bool
    mkfs_missing: str | None  # the package to install when mkfs was not found


def create_disk(
    store: Catalog, name: str, *, size_bytes: int, filesystem: str, content: str | None = None
) -> CreatedImage:
    """A new disk with a managed sparse image, formatted when the right mkfs is installed
    (and filled from the directory ``content`` when given: the demo's disks).

    The disk is ``provisioning`` until its image is ready; on any failure the
    records, the image and its volume directory are removed again.
    """
    validate_disk_name(name)
    disk_id = new_id("disk")
    unsaid: list[str] = []
    note = hold_disk_create_note(store.data_path, disk_id, unsaid)  # a killed run's disk is the sweep's
    try:
        created = _create_disk(
            store, name, disk_id, size_bytes=size_bytes, filesystem=filesystem, content=content, unsaid=unsaid
        )
    except CatalogUnreachableError as exc:
        if not exc.maybe_applied:
            unmark_creating(store.data_path, disk_id)
        raise  # (else kept: the sweep removes the disk if it was made, once the catalogue answers)
    except BaseException:
        if not _still_there(store, disk_id):
            unmark_creating(store.data_path, disk_id)
        raise
    finally:
        if note is not None:
            os.close(note)
    unmark_creating(store.data_path, disk_id)
    return created


def _still_there(store: Catalog, disk_id: str) -> bool:
    """Whether a disk of that id is left (its undo failed): then its note stays, for the sweep."""
    try:
        return any(record.disk.id == disk_id for record in store.list_disks())
    except StoreRefusedError:
        return False  # a store that may not be used made nothing
    except MirenfsError:
        return True


def _create_disk(
    store: Catalog,
    name: str,
    disk_id: str,
    *,
    size_bytes: int,
    filesystem: str,
    content: str | None,
    unsaid: list[str],
) -> CreatedImage:
    try:
        record = store.add_disk(
            name, size_bytes=size_bytes, filesystem=filesystem, status=DiskState.PROVISIONING, disk_id=disk_id
        )
    except CatalogUnreachableError as exc:  # trial W: said "not created", and it was there later
        exc.add_if_maybe_applied(
            f"disk {name} may have been created all the same, with no image: once the catalogue "
            f"answers, see `mirenfs disk list`, and remove it (`mirenfs disk remove {name}`) if it is "
            "provisioning"
        )
        raise
    for sentence in unsaid:
        log.warning("%s", sentence)
    assert record.image_path is not None
    image_path = record.image_path
    volume_dir = os.path.dirname(image_path)
    try:
        make_directories(os.path.dirname(volume_dir))
        os.mkdir(volume_dir, 0o700)
        fd = os.open(image_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
        except OSError as exc:  # review C: "File too large", naming nothing
            limit = "; try a smaller --size" if exc.errno == errno.EFBIG else ""
            raise MirenfsError(
                f"cannot make the image of disk {name} ({size_bytes} bytes) at {image_path}: "
                f"{exc.strerror}{limit}; nothing was created"
            ) from None
        finally:
            os.close(fd)
        formatted, missing = make_filesystem(name, image_path, filesystem, content=content)
        store.mark_provisioned(record.disk.id)
    except CatalogUnreachableError as exc:
        if not exc.maybe_applied:
            _undo_creation(store, record, volume_dir, exc)
            raise
        # Trial W2: the mark may have landed, and the undo then deleted the image of a disk
        # etcd calls provisioned. The disk and its image stay; the record is for a person to check
        # (so no sweep may remove it).
        unmark_creating(store.data_path, disk_id)
        raise MirenfsError(
            f"{exc}; disk {name} was created with its image {image_path}, but the catalogue may not have "
            f"recorded it provisioned: once it answers, run `mirenfs disk set-status {name} provisioned` "
            "if `mirenfs disk list` says provisioning"
        ) from None
    except BaseException as exc:
        _undo_creation(store, record, volume_dir, exc)
        raise
    try:
        now = store.get_disk(name)
    except MirenfsError:  # trial FI2 G8: a failed read here called a disk that was made "not created"
        now = replace(record, disk=replace(record.disk, status=DiskState.PROVISIONED))
    return CreatedImage(now, image_path, formatted, missing)


def _undo_creation(store: Catalog, record: DiskRecord, volume_dir: str, failure: BaseException) -> None:
    """Remove what `disk create` made; if that fails too, say so with the first failure (trial FI2
    G12: the disk was left provisioning without a word). Its creation note stays: the sweep
    (cleanup, a mount's start) removes the disk once the store can be written."""
    shutil.rmtree(volume_dir, ignore_errors=True)
    try:
        store.delete_disk_records(record.disk.id)
    except MirenfsError as exc:
        name = record.disk.name
        raise MirenfsError(
            f"{failure}; disk {name} could not be removed again ({exc}): `mirenfs cleanup` or the next "
            f"mount start removes it once the store can be written (or `mirenfs disk remove {name}`)"
        ) from None


def make_filesystem(
    name: str, image_path: str, filesystem: str, *, content: str | None = None
) -> tuple[bool, str | None]:
    """Run mkfs on the image; ``(False, package)`` when that mkfs is not installed."""
    command, fill_option, package = _MKFS[filesystem]
    program = mkfs_program(filesystem)
    if program is None:
        return False, package
    arguments = [program, *command[1:]]
    if content is not None:
        if fill_option is None:
            raise MirenfsError(f"{command[0]} cannot fill a new filesystem from a directory")
        arguments += [fill_option, content]
    try:
        done = subprocess.run(
            [*arguments, image_path], capture_output=True, text=True, timeout=MKFS_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MirenfsError(f"could not run {command[0]} on the image of disk {name}: {exc}") from None
    if done.returncode != 0:
        detail = mkfs_reason(done.stderr or done.stdout) or f"exit status {done.returncode}"
        remedy = "try a larger --size or another --filesystem"
        if "Permission denied" in detail and os.geteuid() != 0:  # mkfs.btrfs looks at the loop devices
            remedy = "run it as root (sudo), or pick another --filesystem"
        raise MirenfsError(
            f"{command[0]} failed on the image of disk {name} ({detail}); nothing was created, {remedy}"
        )
    return True, None


@dataclass(frozen=True)
class RemovedDisk:
    record: DiskRecord
    image_removed: bool


def remove_disk(store: Catalog, name: str, *, force: bool = False) -> RemovedDisk:
    """Remove a disk: refused while it is attached, leased or its image is live.

    The disk goes to ``deleting`` first (the mount stops showing it), then a
    managed image is deleted with its volume directory, then the records.
    If deleting the files fails the disk stays in ``deleting``, and running
    the command again finishes the job. On a shared catalogue, a disk whose
    image is not under this data path (another node's, or this node's seen
    through a wrong data path) loses only its records, and only with ``force``.
    """
    validate_disk_name(name)
    record = store.get_disk(name)
    # A disk whose volume names no node (or that has no volume) has its image on no host the
    # catalogue knows of: nobody could ever remove it if this host refused. Only its records go.
    node = record.volume.node if record.volume is not None else None
    if not record.local and node is not None and not force:
        raise DiskElsewhereError(
            f"disk {name} is on node {node}, whose data path holds its image; remove it there (if that "
            f"node is gone for good, `mirenfs disk remove {name} --force` removes its record from the "
            "catalogue; its image stays where it was)"
        )
    managed = record.local and record.volume is not None and not record.volume.image_path
    image_path = record.image_path if managed else None
    # A disk of this node whose image this host does not have: its managed image is not under this
    # data path, or its registered one is not here or not registered by this host (review D22 D4).
    registered = record.volume.image_path if record.local and record.volume is not None else None
    not_here = (image_path is not None and not os.path.lexists(image_path)) or (
        registered is not None and (record.image_path is None or not os.path.lexists(registered))
    )
    if node is not None and not_here:
        # A removal or creation killed here is finished as it was begun (no image yet, or none left).
        ours = record.disk.status == DiskState.DELETING or record.disk.id in marked_creating(store.data_path)
        if not force and not ours:  # trial E22 E3: the fleet's record of a disk in use elsewhere went
            where = image_path or registered
            raise DiskElsewhereError(
                f"disk {name} of node {node} has no image at {where} on this host: if it lives on "
                "another host (a wrong --data-path, or two hosts sharing one node name), remove it "
                "there; to remove its record for every host anyway, pass --force"
            )
        image_path = None  # nothing of it is here to remove
    problem = managed_path_problem(store.data_path, image_path) if image_path is not None else None
    if problem is not None:
        raise InvalidVolumeError(f"disk {name} is not removed: {problem}")
    refuse_if_in_use(store, record.disk, image_path, action="removing the disk")
    if image_path is not None:
        try:
            remove_staging_if_unheld(image_path + STAGING_SUFFIX)
        except TargetError as exc:
            if exc.errno != errno.EBUSY:
                raise
            raise DiskBusyError(
                f"disk {name} is being restored right now; let the restore finish (or stop it) before "
                "removing the disk"
            ) from None
    note = hold_removal_note(store.data_path, record.disk.id)  # a killed run is finished by the sweep
    try:
        return _remove(store, record, image_path)
    finally:
        if note is not None:
            os.close(note)


def _remove(store: Catalog, record: DiskRecord, image_path: str | None) -> RemovedDisk:
    """:func:`remove_disk` once its refusals passed: `deleting`, the files, the records. The
    removal note goes once the disk is gone, or back as it was."""
    name = record.disk.name
    try:
        was, _ = store.set_disk_status(name, DiskState.DELETING)
    except CatalogUnreachableError as exc:  # trial W: left `deleting` (hidden everywhere), unsaid
        if not exc.maybe_applied:
            forget_removal_note(store.data_path, record.disk.id)
        exc.add_if_maybe_applied(
            f"disk {name} may be `deleting` now all the same (no mount shows it then): run "
            f"`mirenfs disk remove {name}` again once the catalogue answers"
        )
        raise
    except BaseException:
        forget_removal_note(store.data_path, record.disk.id)
        raise
    # Once deleting, no lease binds (acquiring one is refused); one bound since the check above
    # is found now, and the disk goes back as it was (review: it was removed with the lease).
    try:  # as it was just before it became deleting (attached then counts too)
        as_it_was = replace(store.get_disk(name).disk, status=was)
        refuse_if_in_use(store, as_it_was, image_path, action="removing the disk")
    except MirenfsError:
        with contextlib.suppress(MirenfsError):
            store.set_disk_status(name, was)
            forget_removal_note(store.data_path, record.disk.id)
        raise
    image_removed = False  # trial W: "and its image" was said of an image that was never there
    if image_path is not None and record.volume is not None:
        volume_dir = os.path.dirname(image_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image_path)
            image_removed = True
        try:
            shutil.rmtree(volume_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MirenfsError(
                f"disk {name} is marked deleting but its volume directory {volume_dir} could not be removed "
                f"({exc.strerror or exc}); fix that and run `mirenfs disk remove {name}` again"
            ) from None
    try:
        store.delete_disk_records(record.disk.id)
        forget_removal_note(store.data_path, record.disk.id)
    except StoreError as exc:  # trial FI2 G7: said only "cannot write the disk store"
        if isinstance(exc, CatalogUnreachableError):
            raise
        gone = f"its image {image_path} is removed, but " if image_removed else ""
        failed = StoreError(
            f"{exc}; disk {name} is left deleting ({gone}its records remain): run `mirenfs disk remove "
            f"{name}` again once the store can be written"
        )
        failed.errno = exc.errno
        raise failed from None
    registered = record.volume.image_path if record.local and record.volume is not None else None
    forget = getattr(store, "forget_registered_image", None)  # a fleet catalogue's registrations
    if registered and forget is not None:
        try:
            forget(registered, disk_key(record.disk.id, record.disk.name))
        except (MirenfsError, OSError) as exc:
            log.warning("disk %s was removed, but its image's registration on this host stays: %s", name, exc)
    return RemovedDisk(record, image_removed)


def sweep_what_killed_runs_left(
    data_path: str, clone_directory: str, store: Catalog | None
) -> Iterator[tuple[int, str]]:
    """What a mount's start and ``mirenfs cleanup`` do after a killed run, as it is done: one
    (logging level, sentence) per filesystem thawed, copy or staging file removed, half-created
    disk removed. Thawing comes first, as it needs no catalogue. Whatever a live run holds
    (another mount's restore, a running backup's freeze) is left alone. Without ``store`` (a
    data path whose catalogue is not known here), only files: the notes of killed creations and
    removals stay for a cleanup that reads the catalogue they belong to (review D22 D5)."""
    leftovers = sweep_leftovers(clone_directory)
    for filesystem in leftovers.thawed:
        yield logging.WARNING, f"thawed {filesystem}, left frozen by a mirenfs process that was killed"
    for filesystem in leftovers.not_thawed:
        yield (
            logging.ERROR,
            (
                f"cannot thaw {filesystem}, left frozen by a mirenfs process that was killed: writers to it "
                "wait until it is thawed; run mirenfs cleanup as root (CAP_SYS_ADMIN), or fsfreeze -u on "
                "its mount point (its freeze record is kept for the next try)"
            ),
        )
    for pid in leftovers.live_freezes:
        yield (
            logging.INFO,
            f"left alone a freeze held by running mirenfs process {pid} (a mount or backup at work)",
        )
    for path in leftovers.removed:
        yield logging.INFO, f"removed {path}, a point-in-time copy left over from an earlier run"
    for directory in (state_directory(data_path), index_directory(data_path)):
        removed, problems = remove_dead_temporaries(directory)
        for path in removed:
            yield logging.INFO, f"removed {path}, a temporary file of a mirenfs process that was killed"
        for sentence in problems:
            yield logging.WARNING, sentence
    unremoved: list[str] = []
    staging = sweep_stale_staging(data_path, catalog=store, unremoved=unremoved, registered=store is not None)
    for path in staging:
        yield logging.INFO, f"removed {path}, left over from an interrupted restore"
    for sentence in unremoved:
        yield logging.ERROR, sentence
    if store is None:
        return
    yield from _set_back_records_of_killed_restores(store, staging)
    try:
        creations = sweep_interrupted_creations(store)
    except MirenfsError as exc:  # trial W2: cleanup stopped here, and left a dead mount mounted
        yield logging.ERROR, f"cannot remove the disks killed restores were creating: {exc}"
        return
    for name in creations.removed:
        yield logging.WARNING, f"removed disk {name}: a restore that was creating it was interrupted"
    yield from _finish_killed_removals(store)
    for name in creations.removed_by_create:
        yield logging.WARNING, f"removed disk {name}: a `mirenfs disk create` of it was interrupted"
    for name in creations.completed:
        yield (
            logging.WARNING,
            f"disk {name} is provisioned now: the restore that created it was interrupted after its verified "
            "image was in place, before its record said so",
        )
    for sentence in creations.unchecked:  # review S2: said as an error, so cleanup exits 1
        yield logging.ERROR, sentence


def _set_back_records_of_killed_restores(store: Catalog, staging: list[str]) -> Iterator[tuple[int, str]]:
    """A restore records the new image's size and filesystem just before it renames the image
    into place; one killed between the two left the record describing an image that never came
    (trial S: the store said xfs and 304 MiB over an ext4 image of 32 MiB, and every later
    snapshot's header said xfs). Its staging file names the image: that disk's record is set
    back to what the image holds."""
    images = {os.path.abspath(path[: -len(STAGING_SUFFIX)]) for path in staging}
    if not images:
        return
    try:
        records = [r for r in store.list_disks() if r.image_path and os.path.abspath(r.image_path) in images]
        for record in records:
            said = _set_back_holding_the_staging_name(store, record)
            if said is not None:
                yield logging.WARNING, said
    except MirenfsError as exc:
        yield (
            logging.WARNING,
            f"cannot check the records of the disks an interrupted restore was replacing: {exc}",
        )


def settle_a_killed_restore(store: Catalog, record: DiskRecord) -> DiskRecord:
    """Before a snapshot of a disk is made: a restore of its image killed between recording the new
    image's size and filesystem and its rename left its staging file, and a record describing an
    image that never came (trial FI F5: `backup` wrote a header saying xfs of an ext4 image, until
    a cleanup or a mount's start set it back). Its staging file goes and the record is set back;
    returns the record as it is now. A staging file a live restore holds is left alone."""
    image = record.image_path
    if image is None or not record.local or not os.path.lexists(image + STAGING_SUFFIX):
        return record
    said = _set_back_holding_the_staging_name(store, record)
    if said is None:
        return record
    log.warning("%s", said)
    return store.get_disk(record.disk.name)


def _set_back_holding_the_staging_name(store: Catalog, record: DiskRecord) -> str | None:
    """:func:`_set_back_to_the_image` while this process holds the image's staging name (a leftover
    nobody holds is removed first), so that no restore begins meanwhile: one that recorded its new
    image between the look and the set-back lost its record for good (review S3 F3). The record
    is read again under the hold. None when a live restore holds the name, or nothing was set back."""
    assert record.image_path is not None
    staging = record.image_path + STAGING_SUFFIX
    held = hold_staging_name(staging)
    if held is None:
        return None  # a restore at work: its own record is what counts
    try:
        return _set_back_to_the_image(store, store.get_disk(record.disk.name))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        os.close(held)


def _set_back_to_the_image(store: Catalog, record: DiskRecord) -> str | None:
    disk, image = record.disk, record.image_path
    assert image is not None
    try:
        size = os.stat(image).st_size
    except OSError:
        return None  # no image: a disk being created, which sweep_interrupted_creations looks at
    filesystem = detect_filesystem(image) or disk.filesystem
    if (size, filesystem) == (disk.size_bytes, disk.filesystem):
        return None
    store.update_disk(disk.id, size_bytes=size, filesystem=filesystem)
    return (
        f"disk {disk.name}: its record said {disk.filesystem} and {disk.size_bytes} bytes, recorded by a "
        f"restore that was interrupted before it replaced the image; set back to what the image holds "
        f"({filesystem}, {size} bytes)"
    )


def sweep_stale_staging(
    data_path: str,
    *,
    on_busy: Callable[[str], None] | None = None,
    catalog: Catalog | None = None,
    unremoved: list[str] | None = None,
    registered: bool = True,
) -> list[str]:
    """Remove ``*.restore.tmp`` files a crashed restore left behind; return their paths.

    Looks in every managed volume directory and, with ``registered``, next to
    every image registered at its own path (in ``catalog``, by default the data
    path's SQLite store). A staging file a live restore holds (its ``flock``)
    is kept and reported to ``on_busy``.
    """
    candidates: list[str] = []
    with (
        contextlib.suppress(FileNotFoundError, NotADirectoryError),
        os.scandir(volumes_dir(os.path.abspath(data_path))) as volumes,
    ):
        for volume in volumes:
            if not volume.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError), os.scandir(volume.path) as files:
                candidates.extend(
                    entry.path
                    for entry in files
                    if entry.name.endswith(STAGING_SUFFIX) and entry.is_file(follow_symlinks=False)
                )
    try:
        explicit = (
            (catalog if catalog is not None else Store(data_path)).explicit_image_paths()
            if registered
            else []
        )
    except StoreError as exc:
        try:  # review S: a store refused as moved still names where its images were
            explicit = Store(data_path).explicit_image_paths() if catalog is not None else []
        except StoreError:
            explicit = []
        if not explicit:
            log.warning("cannot look for staging files next to registered images: %s", exc)
    candidates.extend(path + STAGING_SUFFIX for path in explicit)
    removed = []
    for path in sorted(set(candidates)):
        try:
            if remove_staging_if_unheld(path):
                removed.append(path)  # the caller logs what was removed
        except TargetError as exc:
            if on_busy is not None:
                on_busy(path)
            log.info("kept %s: %s", path, exc)
        except OSError as exc:
            said = (
                f"cannot remove {path}, left over from an interrupted restore ({exc.strerror}); run "
                "mirenfs cleanup again once its filesystem lets it, or remove it by hand"
            )
            if unremoved is None:
                log.warning("%s", said)
            else:
                unremoved.append(said)  # said by the caller (trial FI F7: cleanup then said "nothing")
    return removed


@dataclass(frozen=True)
class SweptCreations:
    """What the sweep of interrupted creations did: the disks removed, and one sentence per disk
    it could not check yet (a full or read-only data path), which stays for a later sweep."""

    removed: list[str]
    unchecked: list[str]
    completed: list[str] = field(default_factory=list)
    removed_by_create: list[str] = field(default_factory=list)  # left by a killed `disk create`


def sweep_interrupted_creations(store: Catalog) -> SweptCreations:
    """Remove the disks that a killed restore left ``provisioning``.

    Such a disk was created by a restore on this host (the journal of
    :mod:`mirenfs.disks.creations` names it: Miren's own provisioning looks the
    same in the catalogue, trial W), is on this host, has a managed volume, no
    image, and no live restore holding its staging file. (``disk create`` makes
    the image right after the records, so a disk it is still formatting is not
    taken for one.)
    """
    ours = marked_creating(store.data_path)
    if not ours:
        return SweptCreations([], [])
    records = store.list_disks()
    swept = SweptCreations([], [])
    for record in records:
        if record.disk.id not in ours:
            continue
        made_by = made_by_disk_create(store.data_path, record.disk.id)
        if made_by is None:
            continue  # a `disk create` at work on it (formatting, maybe for minutes)
        try:
            if made_by:
                if _remove_interrupted_disk_create(store, record):
                    swept.removed_by_create.append(record.disk.name)
            elif _complete_if_installed(store, record):
                swept.completed.append(record.disk.name)
                unmark_creating(store.data_path, record.disk.id)
            elif _remove_if_interrupted(store, record):
                swept.removed.append(record.disk.name)
        except StoreError as exc:
            if isinstance(exc, CatalogUnreachableError):
                raise
            swept.unchecked.append(str(exc))  # kept for a later start (or cleanup)
    _forget_finished_creations(store.data_path, ours, records)
    return swept


def _finish_killed_removals(store: Catalog) -> Iterator[tuple[int, str]]:
    """Finish what a killed `disk remove` left `deleting` (trial FI2 G2: for good, and cleanup said
    nothing): the same removal again, refusals and all. A note whose disk is gone, or no longer
    `deleting`, is dropped."""
    left = removals_left(store.data_path)
    if not left:
        return
    try:
        records = {record.disk.id: record for record in store.list_disks()}
    except MirenfsError as exc:
        yield logging.ERROR, f"cannot finish the removals killed `mirenfs disk remove` runs left: {exc}"
        return
    for disk_id in sorted(left):
        record = records.get(disk_id)
        if record is None or record.disk.status != DiskState.DELETING or not record.local:
            forget_removal_note(store.data_path, disk_id)
            continue
        try:
            remove_disk(store, record.disk.name)
        except MirenfsError as exc:
            yield logging.ERROR, f"cannot finish the removal of disk {record.disk.name}, left deleting: {exc}"
            continue
        yield (
            logging.WARNING,
            f"removed disk {record.disk.name}: a `mirenfs disk remove` of it was interrupted",
        )


def _remove_interrupted_disk_create(store: Catalog, record: DiskRecord) -> bool:
    """Remove a disk a killed `disk create` left ``provisioning`` (its image half made, or not at
    all: trial FI2 G1, it stayed so for good, and the same command again was told to pick another
    name). Only a managed image of this host is deleted. True once it is gone."""
    volume, image_path = record.volume, record.image_path
    if not record.local or record.disk.status != DiskState.PROVISIONING or volume is None:
        unmark_creating(store.data_path, record.disk.id)  # it went on without the note: not ours now
        return False
    if image_path is not None and not volume.image_path:
        if managed_path_problem(store.data_path, image_path) is not None:
            return False
        shutil.rmtree(os.path.dirname(image_path), ignore_errors=True)
    store.delete_disk_records(record.disk.id)
    unmark_creating(store.data_path, record.disk.id)
    return True


def _complete_if_installed(store: Catalog, record: DiskRecord) -> bool:
    """A disk a restore here created, still ``provisioning`` though its image is in place: the
    restore was killed after it renamed the verified image into place, before the record said
    so (trial FI F9: it stayed so for good, and the same restore again was told the disk had an
    image). Its record is brought to ``provisioned``; True if it was."""
    image_path = record.image_path
    if not record.local or record.disk.status != DiskState.PROVISIONING or image_path is None:
        return False
    try:
        if not stat.S_ISREG(os.lstat(image_path).st_mode):
            return False
    except FileNotFoundError:
        return False
    if staging_is_held(image_path + STAGING_SUFFIX):
        return False  # a restore at work on it (over a file that was there first, with --force)
    store.update_disk(record.disk.id, size_bytes=record.disk.size_bytes, filesystem=record.disk.filesystem)
    return True


def _forget_finished_creations(data_path: str, ours: set[str], records: list[DiskRecord]) -> None:
    """Journal entries of disks that are gone or have an image now: a restore's end (or a
    process killed between its end and the entry's removal). Only entries some minutes old, so
    that a restore which has just created its disk keeps its entry."""
    waiting = {r.disk.id for r in records if r.disk.status == DiskState.PROVISIONING and not _has_image(r)}
    for disk_id in ours - waiting:
        if made_by_disk_create(data_path, disk_id) is None:
            continue  # a `disk create` still formatting it
        if creation_noted_before(data_path, disk_id, seconds_ago=FINISHED_CREATION_S):
            unmark_creating(data_path, disk_id)


def _has_image(record: DiskRecord) -> bool:
    return record.image_path is not None and os.path.lexists(record.image_path)


def remove_interrupted_creation(store: Catalog, name: str, disk_id: str) -> bool:
    """Remove disk ``name`` (id ``disk_id``) if it is still what a failed restore left ``provisioning``
    (see :func:`sweep_interrupted_creations`); True once it is gone, by this call or before it.
    False: it is no longer that (a restore is at work on it, or gave it an image), so it stays.
    Raises the catalogue's error when the catalogue still does not answer."""
    try:
        record = store.get_disk(name)
    except DiskNotFoundError:
        return True
    if record.disk.id != disk_id:
        return True  # that disk is gone; the name belongs to another one now
    return _remove_if_interrupted(store, record)


def _remove_if_interrupted(store: Catalog, record: DiskRecord) -> bool:
    """Remove a disk an interrupted restore left ``provisioning`` (on this host, a managed volume, no
    image, no live restore holding its staging file); False for any other disk, which is kept."""
    volume, image_path = record.volume, record.image_path
    if not record.local or record.disk.status != DiskState.PROVISIONING or volume is None:
        return False
    if volume.image_path:
        return False
    if image_path is None or os.path.lexists(image_path) or managed_path_problem(store.data_path, image_path):
        return False
    # The staging name is held while the image is looked at again and the disk removed: a
    # restore (maybe through another mount) that installed the image just after the look above
    # lost the disk it had been told was created (review).
    staging, directory = image_path + STAGING_SUFFIX, os.path.dirname(image_path)
    try:
        make_directories(os.path.dirname(directory))  # a failed restore's undo
        with contextlib.suppress(FileExistsError):  # removed them
            os.mkdir(directory, 0o700)
        held = hold_staging_name(staging)
    except OSError as exc:  # a full or read-only data path: "cannot tell yet", not "kept" (review S)
        error = StoreError(
            f"cannot remove disk {record.disk.name} yet, which an interrupted restore left provisioning: "
            f"whether a restore is at work on it cannot be told ({exc.filename}: {exc.strerror}); once "
            f"{store.data_path} has room (or is writable), run mirenfs cleanup again (a mount's start "
            "does it too)"
        )
        error.errno = exc.errno or errno.EIO
        raise error from None
    if held is None:
        return False  # a restore is at work on it right now
    try:
        if os.path.lexists(image_path):
            os.unlink(staging)
            return False
        # The records go while the name is still held (review S: a restore could begin on the
        # disk between the hold's end and their removal), then the directory.
        store.delete_disk_records(record.disk.id)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    finally:
        os.close(held)
    shutil.rmtree(directory, ignore_errors=True)
    unmark_creating(store.data_path, record.disk.id)
    return True


def mkfs_reason(output: str) -> str:
    """The line of a failed mkfs's output that says why: the last one before any usage text
    (mkfs.xfs prints its reason, then its whole usage)."""
    lines: list[str] = []
    for raw in output.splitlines():
        if raw.strip() and raw[:1].isspace() and lines:  # a wrapped sentence goes on (mke2fs indents)
            lines[-1] += " " + raw.strip()
        elif raw.strip():
            lines.append(raw.strip())
    before_usage = next((i for i, line in enumerate(lines) if line.lower().startswith("usage:")), len(lines))
    said = lines[:before_usage] or lines
    return said[-1] if said else ""
