"""The mount's ``restore/`` directory (SPEC §5), without FUSE: which disk a file name restores,
who may restore, the §3 refusals at create time, and one streaming restore per entry, fed by
writes in order (bytes a writer seeks over, as ``rsync --sparse`` does, are zeros), installed
by the close that completes it (or ended by the last close).

Requests on one entry are serialized: a close (FLUSH) of a descriptor shared
by a forked child never runs while a write of the same restore is in progress.
Each open handle is bound to the restore it started, so a stale descriptor
of an earlier attempt can never feed, install or fail a newer restore.

Each entry stays listed with its outcome until it is deleted: reading it
gives one line (``installed: …`` or ``failed: …``), which is also its
``user.mirenfs.state``. So whole-mount ``tar``, ``rsync`` and ``restic``
archive small text files there, and extracting such an archive back into
``restore/`` ignores them (the ``restore`` directory and everything below it).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import trio

from mirenfs.disks.manage import remove_interrupted_creation
from mirenfs.disks.model import Catalog, validate_disk_name
from mirenfs.disks.restore import DiskRestore
from mirenfs.disks.rules import (
    UNTIL_THE_CATALOGUE_ANSWERS,
    UNTIL_THE_DATA_PATH_HAS_ROOM,
    RestoreTarget,
    image_not_here,
    prepare_restore,
)
from mirenfs.engine.image import MakeRoom
from mirenfs.engine.memory import give_back_free_memory
from mirenfs.errors import ImageExistsError, ImageNotHereError, MirenfsError, RestoreRefused, printable
from mirenfs.mount.openfiles import held_open

log = logging.getLogger(__name__)

SNAPSHOT_SUFFIX = ".mirn"
SIDECAR_SUFFIX = ".mirn.sha256"
RESTORE_DIRECTORY = "restore"  # its name in the mount's root
NESTED_DIRECTORY = RESTORE_DIRECTORY  # ./restore of a whole-mount archive: accepted, everything in it ignored
IGNORED_BELOW_NESTED_STATE = (
    f"ignored: nothing below {RESTORE_DIRECTORY}/{NESTED_DIRECTORY}/ is restored (a whole-mount archive's "
    f"copy of {RESTORE_DIRECTORY}/); copy a snapshot into {RESTORE_DIRECTORY}/ itself to restore it"
)
# Miren's own backup files: NAME-YYYYMMDD-HHMMSS.miren.zst (and NAME.miren.zst).
_MIREN_BACKUP = re.compile(r"(?P<name>.+?)(?:-\d{8}-\d{6})?\.miren\.zst")
# rsync's temporary file for NAME: .NAME.XXXXXX
_RSYNC_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9]{6}")
_SIDECAR_LIMIT = 4096  # a sidecar is one sha256sum line
REFUSAL_REPEAT_S = 5.0
STRANDED_RETRY_S = 1.0  # how often a disk left provisioning by an outage is tried again
REFUSALS_KEPT = 20
REPLACED_BY_A_RENAME = "replaced by a rename"
# What a stranded disk waited for, once it came (see retry_stranded).
_ONCE = {
    UNTIL_THE_CATALOGUE_ANSWERS: "the catalogue answered",
    UNTIL_THE_DATA_PATH_HAS_ROOM: "the data path had room",
}
CREATED_STATE = "created: the restore starts when it is opened for writing"  # made by mknod
RECEIVING = "receiving"
# A close found it whole while another descriptor may still write (its seek table, say).
VERIFIED_WAITING = f"{RECEIVING}: whole and verified; installed when the last process writing it closes it"


def _ended_restore(writer: RestoreWriter) -> RestoreRefused:
    """A write, truncate or close through a descriptor whose restore is no longer the entry's.

    When that restore failed, the descriptor gets its failure again, with its errno and no
    second log line: a tool's ``write(2)`` the kernel split into several requests learns
    of a full filesystem from the request after the one that failed, and must see "No
    space left on device", not EIO. Otherwise (it installed, or a later restore of the entry
    runs) it is a stale descriptor, refused with EIO and said in the log."""
    entry, session = writer.entry, writer.session
    if session is not None and session.failure is not None:
        failed = RestoreRefused(f"restore/{entry.name} failed: {session.failure}", session.failure_errno)
        failed.reported = True  # its one line was logged when it failed
        return failed
    return RestoreRefused(
        f"restore/{entry.name}: this descriptor belongs to a restore that ended ({entry.state})", errno.EIO
    )


def in_restore(file_name: str) -> str:
    """``restore/NAME`` as a log line or an error shows it: the name is the writer's choice
    (any bytes but ``/``), so one that does not print is quoted and cannot forge a log line."""
    return f"{RESTORE_DIRECTORY}/{printable(file_name)}"


def disk_for_file_name(file_name: str) -> tuple[str, bool]:
    """The disk a file in restore/ restores, and whether it is a sidecar (which restores nothing).

    ``NAME.mirn``, Miren's ``NAME-YYYYMMDD-HHMMSS.miren.zst`` and
    ``NAME.miren.zst``, and rsync's temporary ``.FILE.XXXXXX`` of any of
    them restore disk NAME; ``NAME.mirn.sha256`` sidecars (as in a tar of
    the mount) are accepted but restore nothing.
    """
    match = _RSYNC_TEMPORARY.fullmatch(file_name)
    candidates = [match.group("name"), file_name] if match else [file_name]
    for base in candidates:
        if base.endswith(SIDECAR_SUFFIX):
            return validate_disk_name(base[: -len(SIDECAR_SUFFIX)]), True
        if base.endswith(SNAPSHOT_SUFFIX):
            return validate_disk_name(base[: -len(SNAPSHOT_SUFFIX)]), False
        miren = _MIREN_BACKUP.fullmatch(base)
        if miren:
            return validate_disk_name(miren.group("name")), False
    raise RestoreRefused(
        f"{in_restore(file_name)}: only snapshot files (NAME.mirn, or Miren's NAME.miren.zst and "
        "NAME-DATE-TIME.miren.zst) can be restored",
        errno.EINVAL,
    )


class RequestLock:
    """Serializes the requests on one entry, first come first served.

    Taking it while it is free costs no trip through trio's scheduler, which
    ``trio.Lock`` makes on every acquire: ``tar`` writes a snapshot in 10 KiB
    records, one FUSE request each, and every one of them takes this lock.
    A waiter is handed the lock by the release (it never sees it free and
    retakes it), so a cancelled waiter leaves it neither held nor lost.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiting = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        if self._held:
            await self._waiting.park()  # returns holding the lock, handed over by __aexit__
        else:
            self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        if self._waiting:
            self._waiting.unpark()  # still held: now by the first waiter
        else:
            self._held = False


@dataclass
class Refusal:
    """A refused create or open in restore/ (or in the root), for ``mirenfs status``: it leaves no
    entry behind."""

    name: str  # restore/FILE (or FILE), the latest name one process tried (rsync retries under new ones)
    errno: str  # its symbolic name, as EEXIST
    reason: str
    tries: int = 1


@dataclass(frozen=True)
class EntryChange:
    """What a ``setattr`` of a restore/ entry changes (None: unchanged)."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None


@dataclass(eq=False)
class RestoreEntry:
    """A file in restore/: its attributes, its outcome, and the restore it feeds while receiving."""

    inode: int
    name: str
    disk: str
    sidecar: bool
    mode: int
    uid: int
    gid: int
    state: str = RECEIVING
    detail: str = ""  # what reading the entry adds to its state (size and checksum once installed)
    failed_errno: int = 0  # what the failure answered its writer with, once it failed
    received: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)
    session: DiskRestore | None = None
    lock: RequestLock = field(default_factory=RequestLock)

    def report(self) -> bytes:
        """What reading the entry gives: its state and detail, one line."""
        return f"{self.state}{self.detail}\n".encode(errors="backslashreplace")

    @property
    def size(self) -> int:
        return len(self.report())

    def status(self) -> dict[str, object]:
        shown: dict[str, object] = {
            "name": f"restore/{self.name}",
            "disk": self.disk,
            "state": self.state,
            "bytes": self.received,
        }
        image = self.session.image_progress() if self.session is not None else None
        if image is not None:
            shown["image_done"], shown["image_total"] = image
        return shown


@dataclass(eq=False)
class RestoreWriter:
    """An open handle on an entry, bound to the restore that open started (None for a sidecar)."""

    entry: RestoreEntry
    session: DiskRestore | None

    @property
    def current(self) -> bool:
        """Whether this handle's restore is still the entry's (a stale one must not touch it)."""
        return self.session is not None and self.entry.session is self.session


@dataclass(eq=False)
class IgnoredNode:
    """Something extracted under ``restore/restore`` (a whole-mount archive's own restore/): kept
    only so the extracting tool can finish; its bytes go nowhere."""

    inode: int
    parent: int
    name: str
    is_directory: bool
    mode: int
    mtime_ns: int = field(default_factory=time.time_ns)


async def _give_back_the_memory_of(session: DiskRestore) -> None:
    """A restore's stages ran in threads of their own, and glibc keeps what each freed in that
    thread's arena: without a trim, every night's batch of restores left the daemon larger
    (trial S: 154 MB idle before, 238 to 253 MB after each batch of ten)."""
    await trio.to_thread.run_sync(give_back_free_memory, session.next_offset)


class RestoreDirectory:
    """The entries of restore/ and the restores they run."""

    def __init__(
        self,
        store: Catalog,
        data_path: str,
        *,
        allow_overwrite: bool,
        allocate_inode: Callable[[], int],
        owner_uid: int = -1,
        on_installed: Callable[[str], None] | None = None,
        mountpoint: str | None = None,
        make_room: MakeRoom | None = None,
    ) -> None:
        self.store = store
        self._make_room = make_room  # the frame store, which gives back space to a restore that finds none
        self.data_path = data_path
        self.allow_overwrite = allow_overwrite
        self._allocate_inode = allocate_inode
        self.owner_uid = os.getuid() if owner_uid < 0 else owner_uid
        self._on_installed = on_installed
        self.mountpoint = mountpoint  # where writers' descriptors point (see :meth:`flush`)
        self.mount_id: int | None = None  # the mount's id in mountinfo, once it is up (kept after umount -l)
        self.entries: dict[str, RestoreEntry] = {}
        self.by_inode: dict[int, RestoreEntry] = {}
        self.ignored: dict[int, IgnoredNode] = {}
        self._last_refusal: tuple[tuple[str, int], float] | None = None  # (message, pid), when
        # The latest refusals first, for ``mirenfs status``: what a refused create left no entry for.
        self.refusals: collections.deque[Refusal] = collections.deque(maxlen=REFUSALS_KEPT)
        # Restores that installed and whose file its writer then removed, newest first.
        self.removed_after_install: collections.deque[dict[str, object]] = collections.deque(
            maxlen=REFUSALS_KEPT
        )
        # Files written below restore/restore/, newest first: their copy succeeded, and restored
        # nothing (trial T20: one copied a level too deep showed nowhere but the log).
        self.ignored_files: collections.deque[IgnoredNode] = collections.deque(maxlen=REFUSALS_KEPT)
        self._starting: set[str] = set()  # disks whose restore is being prepared
        # Disks a failed restore created and could not remove (the catalogue did not answer), with
        # the entry whose state says so: removed once the catalogue answers (see retry_stranded).
        self.stranded: list[tuple[RestoreEntry, RestoreTarget]] = []

    # ---- who may restore ----------------------------------------------------

    def owner_or_root(self, uid: int) -> bool:
        """Whether ``uid`` is the mount's owner or root: with -o allow_other, the only ones who
        may restore or read the mount's status."""
        return uid in (0, self.owner_uid)

    def check_writer(self, uid: int, what: str) -> None:
        """Only the mount's owner and root may restore, whatever mode an entry shows (-o allow_other)."""
        if not self.owner_or_root(uid):
            raise RestoreRefused(
                f"{what}: uid {uid} may not restore disks through this mount (only uid {self.owner_uid} "
                "and root may)",
                errno.EACCES,
            )

    # ---- entries --------------------------------------------------------------

    def receiving(self, disk: str) -> RestoreEntry | None:
        for entry in self.entries.values():
            if entry.disk == disk and entry.session is not None:
                return entry
        return None

    async def begin(self, file_name: str, mode: int, uid: int, gid: int, pid: int = 0) -> RestoreWriter:
        """Create the entry, or restart an existing one in place (same inode: it is being
        opened for writing), applying every refusal before a byte is written."""
        try:
            self.check_writer(uid, in_restore(file_name))
            disk, sidecar = disk_for_file_name(file_name)
            if not sidecar and ((holder := self.receiving(disk)) is not None or disk in self._starting):
                through = (
                    "" if holder is None else f"{printable(holder.name)} ({holder.received} bytes received)"
                )
                raise RestoreRefused(
                    f"disk {disk} is already being restored through restore/{through}", errno.EBUSY
                )
        except MirenfsError as refusal:
            self._refused_open(file_name, refusal, pid)
            raise
        if sidecar:
            return await self._start(file_name, disk, True, None, mode, uid, gid)
        self._starting.add(disk)  # claimed before the first await: two opens cannot both pass
        try:
            try:
                target = await trio.to_thread.run_sync(self._prepare, disk)
            except MirenfsError as refusal:
                self._refused_open(file_name, refusal, pid)
                raise
            return await self._start(
                file_name, disk, False, DiskRestore(target, make_room=self._make_room), mode, uid, gid
            )
        finally:
            self._starting.discard(disk)

    def make_node(self, file_name: str, mode: int, uid: int, gid: int, pid: int = 0) -> RestoreEntry:
        """``mknod`` of a regular file (``tar --xattrs`` makes the file first, then opens it for
        writing): an empty entry whose restore starts at that open, where the refusals that
        need the store (an existing disk, a lease) apply. A name that cannot be a disk's, or a
        writer other than the owner, is refused now."""
        try:
            self.check_writer(uid, in_restore(file_name))
            disk, sidecar = disk_for_file_name(file_name)
            if file_name in self.entries:
                raise RestoreRefused(f"{in_restore(file_name)} already exists", errno.EEXIST)
        except MirenfsError as refusal:
            self._refused(file_name, refusal, pid)
            raise
        entry = self._new_entry(file_name, disk, sidecar, mode, uid, gid)
        entry.state = CREATED_STATE
        return entry

    def _new_entry(
        self, file_name: str, disk: str, sidecar: bool, mode: int, uid: int, gid: int
    ) -> RestoreEntry:
        entry = RestoreEntry(self._allocate_inode(), file_name, disk, sidecar, mode & 0o7777, uid, gid)
        self.entries[file_name] = entry
        self.by_inode[entry.inode] = entry
        return entry

    async def _start(
        self,
        file_name: str,
        disk: str,
        sidecar: bool,
        session: DiskRestore | None,
        mode: int,
        uid: int,
        gid: int,
    ) -> RestoreWriter:
        entry = self.entries.get(file_name)
        if entry is None:
            entry = self._new_entry(file_name, disk, sidecar, mode, uid, gid)
        async with entry.lock:
            entry.session, entry.received, entry.mtime_ns, entry.detail = session, 0, time.time_ns(), ""
            entry.uid, entry.gid = uid, gid
            entry.state = RECEIVING if session is not None else "ignored: a sidecar restores nothing"
        return RestoreWriter(entry, session)

    def _refused_open(self, file_name: str, refusal: MirenfsError, pid: int) -> None:
        """A refused open of an entry says so on the entry: one ``mknod`` made (``tar --xattrs``)
        said its restore would start there (review: it kept saying so), and one of an earlier
        restore kept its outcome, "installed", which a script checking the state took for this
        copy's (trial M s18). Not for a refused writer (EACCES): another user's open must not
        change the owner's entries."""
        self._refused(file_name, refusal, pid)
        entry = self.entries.get(file_name)
        if entry is None or entry.session is not None:
            return
        if entry.state == CREATED_STATE or refusal.errno != errno.EACCES:
            entry.state = f"failed: {str(refusal).removeprefix(f'{in_restore(file_name)}: ')}"
            # This attempt received nothing: the earlier one's size and checksum are not its own.
            entry.received, entry.detail, entry.mtime_ns = 0, "", time.time_ns()

    def refuse_in_the_root(self, file_name: str, pid: int) -> MirenfsError:
        """A file made in the mount's root, beside the snapshots (the likeliest first mistake:
        ``cp pg.mirn MNT/``): EROFS, with where a snapshot to restore goes said in the log and in
        ``mirenfs status`` (trial R s18: "Read-only file system" alone, of a mount that says rw)."""
        refusal = MirenfsError(
            f"{printable(file_name)}: the mount's root holds only the disks' snapshots and takes no "
            f"file; copy a snapshot to restore into {RESTORE_DIRECTORY}/ ({RESTORE_DIRECTORY}/NAME.mirn "
            "restores disk NAME)"
        )
        refusal.errno = errno.EROFS
        self._refused(file_name, refusal, pid, where=printable(file_name))
        return refusal

    def refuse_directory(self, directory_name: str, pid: int) -> MirenfsError:
        """A directory made in restore/ (``cp -r backups/ restore/``): EPERM, with what restore/
        takes said in the log and in ``mirenfs status`` (trial R s18: EPERM alone)."""
        refusal = MirenfsError(
            f"{in_restore(directory_name)}: {RESTORE_DIRECTORY}/ takes snapshot files only, not "
            f"directories; copy the snapshots themselves into {RESTORE_DIRECTORY}/ "
            f"({RESTORE_DIRECTORY}/NAME.mirn restores disk NAME)"
        )
        refusal.errno = errno.EPERM
        self._refused(directory_name, refusal, pid)
        return refusal

    def _refused(self, file_name: str, refusal: MirenfsError, pid: int, *, where: str | None = None) -> None:
        """One log line and one status record per refusal. rsync retries a refused temporary
        file under new names (it takes EEXIST for a name clash): the same refusal of the same
        process within a few seconds counts as a retry, recorded under the latest name (the
        one rsync prints). A refused create leaves no entry, so the record is where
        ``mirenfs status`` finds the reason."""
        now, message, where = time.monotonic(), str(refusal), where or in_restore(file_name)
        last = self._last_refusal  # set only once a refusal was recorded: refusals[0] is that one
        if last is not None and last[0] == (message, pid) and now - last[1] <= REFUSAL_REPEAT_S:
            self.refusals[0].name = where
            self.refusals[0].tries += 1
        else:
            log.warning("%s", message if message.startswith(where) else f"{where}: {message}")
            code = errno.errorcode.get(refusal.errno, str(refusal.errno))
            # The record names the file already: its reason does not say it again.
            self.refusals.appendleft(Refusal(where, code, message.removeprefix(f"{where}: ")))
        self._last_refusal = ((message, pid), now)
        refusal.reported = True

    def _prepare(self, disk: str) -> RestoreTarget:
        try:
            target = prepare_restore(
                self.store, disk, data_path=self.data_path, overwrite=self.allow_overwrite, creator=self.store
            )
            target.removal_retried = True  # a disk it creates and cannot remove: see retry_stranded
            return target
        except ImageNotHereError as exc:  # `--force` means nothing to cp: say what does
            raise image_not_here(
                disk,
                exc.node,
                exc.image_path,
                data_path_words="data path",
                consent="restore/ writes its image here only on a mount started with --allow-overwrite",
            ) from None
        except ImageExistsError:  # `mirenfs restore --force` means nothing to cp: say what does
            raise ImageExistsError(
                f"disk {disk} already has an image; restore/ replaces images only on a mount started "
                "with --allow-overwrite (or copy the snapshot to restore/NEWNAME.mirn: a new disk)"
            ) from None

    async def write(self, writer: RestoreWriter, offset: int, data: bytes) -> None:
        entry = writer.entry
        async with entry.lock:
            if writer.session is None:
                if (
                    entry.sidecar
                    and offset == entry.received
                    and entry.received + len(data) <= _SIDECAR_LIMIT
                ):
                    entry.received += len(data)
                    return
                if entry.sidecar and offset == entry.received:
                    raise _oversized_sidecar(entry)
                raise RestoreRefused(f"restore/{entry.name} is not receiving ({entry.state})", errno.EIO)
            if not writer.current:
                raise _ended_restore(writer)
            try:
                await writer.session.write(offset, data)
            except BaseException as exc:
                raise await self._fail(entry, exc) from None
            entry.received = writer.session.next_offset
            entry.mtime_ns = time.time_ns()
            entry.state = RECEIVING  # also after a close found it whole: more of it came

    async def change_attributes(
        self, entry: RestoreEntry, change: EntryChange, writer: RestoreWriter | None = None
    ) -> None:
        """A ``setattr``: tar and rsync set times, mode and owner after writing, and they are kept
        as set; a size is a truncate (see :meth:`resize`, ``writer`` the handle it came through)."""
        if change.size is not None:
            await self.resize(entry, change.size, writer)
        if change.mode is not None:
            entry.mode = change.mode
        if change.uid is not None:
            entry.uid = change.uid
        if change.gid is not None:
            entry.gid = change.gid
        if change.mtime_ns is not None:
            entry.mtime_ns = change.mtime_ns

    async def resize(self, entry: RestoreEntry, size: int, writer: RestoreWriter | None = None) -> None:
        """A truncate (``writer``: the handle of an ``ftruncate``). Extending a receiving entry is
        a hole at its end (rsync -S ends a file whose last bytes are zeros that way): zeros up
        to ``size``. Shrinking one would take back bytes already fed, so it fails the restore.
        An entry that is not receiving keeps its size: a truncate to it, or to what it
        received, changes nothing; any other is refused."""
        async with entry.lock:
            session = entry.session
            if session is None:
                if size not in (entry.size, entry.received):
                    refused = RestoreRefused(
                        f"restore/{entry.name} is not receiving ({entry.state})", errno.EINVAL
                    )
                    refused.reported = True  # it changes nothing: no log line, as for any refused resize
                    raise refused
                return
            if writer is not None and not writer.current:
                raise _ended_restore(writer)  # a stale descriptor never touches a newer restore
            if size < session.next_offset:
                shrink = RestoreRefused(
                    f"restore/ files cannot be shrunk (to {size} bytes, after {session.next_offset} were "
                    "received): write snapshots in order",
                    errno.EINVAL,
                )
                raise await self._fail(entry, shrink)
            try:
                await session.extend(size)
            except BaseException as exc:
                raise await self._fail(entry, exc) from None
            entry.received = session.next_offset
            entry.mtime_ns = time.time_ns()

    async def flush(self, writer: RestoreWriter) -> None:
        """A close of the file: install if the snapshot is whole, else tell that close it is not.

        FUSE cannot tell the writer's last close from another one: a process
        that forks while writing (its child's close-on-exec), or dd, which
        dup2s its output and closes the original. So the mount looks whether
        any process still holds the file open for writing. If none does, this
        was the last close and the restore ends now, so that a short ``cp``
        finds the disk exactly as it was when its close returns. If one does,
        an incomplete (or empty) stream's close gets EIO and the restore stays
        open for more writes, and a whole one is verified but installed only
        by the close that leaves no writer: its seek table may still come.
        Without a mount point to look at, an incomplete close keeps the
        restore open (the release after the last close ends it), and a whole
        one installs.
        """
        entry = writer.entry
        async with entry.lock:
            if not writer.current:
                if writer.session is not None and writer.session.failure is not None:
                    # This descriptor's restore failed (maybe through another descriptor): say so to
                    # this close. The failure has its log line already; a writer that forks closes
                    # the descriptor once per child, and those closes are not logged again.
                    raise _ended_restore(writer)
                return
            session = writer.session
            assert session is not None
            try:
                await session.feed_pending()
            except BaseException as exc:
                raise await self._fail(entry, exc) from None
            whole = session.complete
            if not whole and await self._held_elsewhere(entry, unknown=True):
                what = "empty" if session.next_offset == 0 else f"closed after {session.next_offset} bytes"
                refusal = RestoreRefused(
                    f"restore/{entry.name} was {what} by one of its writers; the restore goes on "
                    "while another process holds it open",
                    errno.EIO,
                )
                log.debug("%s", refusal)  # not a failure yet: the outcome gets its own line
                refusal.reported = True
                raise refusal
            if whole and await self._held_elsewhere(entry, unknown=False):
                # Whole, but a writer still holds it: a seek table may follow (review S21 G1:
                # installed here, the writer's next write failed though the restore stood). Its
                # checksum is compared now, so this close learns of a mismatch; the close that
                # leaves no writer (or the release) installs it.
                try:
                    await session.whole_and_verified()
                except BaseException as exc:
                    raise await self._fail(entry, exc) from None
                entry.state = VERIFIED_WAITING
                log.debug("restore/%s is whole and verified; a writer still holds it open", entry.name)
                return
            await self._finish(entry)  # whole: install; the last close of a partial one: fail it now

    async def _held_elsewhere(self, entry: RestoreEntry, *, unknown: bool) -> bool:
        """Whether a process still holds the entry open for writing; ``unknown`` without a mount
        point to look at."""
        if self.mountpoint is None:
            return unknown
        inside = os.path.join("/", RESTORE_DIRECTORY, entry.name)
        identity = None if self.mount_id is None else (self.mount_id, entry.inode)
        held = partial(held_open, os.path.join(self.mountpoint, inside[1:]), inside=inside, identity=identity)
        return await trio.to_thread.run_sync(held)

    async def release(self, writer: RestoreWriter) -> None:
        """The last close: what arrived is all there is, so the restore ends now, either way."""
        async with writer.entry.lock:
            if writer.current:
                with contextlib.suppress(MirenfsError):
                    await self._finish(
                        writer.entry
                    )  # an incomplete stream fails here with its precise reason

    async def _finish(self, entry: RestoreEntry) -> None:
        """Verify and install, or fail and undo (the caller holds the entry's lock)."""
        session = entry.session
        if session is None:
            return
        try:
            meta = await session.finish()
        except BaseException as exc:
            raise await self._fail(entry, exc) from None
        entry.session = None
        created = session.target.creates_disk
        how = "a new disk, created from the snapshot's header" if created else session.target.installed_as()
        entry.state = f"installed: created disk {entry.disk}" if created else "installed"
        if meta.name != entry.disk:  # the file's name chose the disk: say whose snapshot it was
            whose = f"from a snapshot of disk {printable(meta.name)}"  # the header's, unchecked
            how += f", {whose}"
            if not created:  # another disk's data replaced this one's: the entry says so too
                entry.state += f" {whose}"
        entry.detail = f" ({meta.size_bytes} bytes, checksum {meta.checksum})"
        log.info(
            "restore of disk %s from restore/%s by uid %d installed (%s): %d bytes, checksum %s",
            entry.disk,
            entry.name,
            entry.uid,
            how,
            meta.size_bytes,
            meta.checksum,
        )
        if self._on_installed is not None:
            self._on_installed(entry.disk)
        await _give_back_the_memory_of(session)

    async def abort(self, entry: RestoreEntry, reason: str) -> None:
        async with entry.lock:
            if entry.session is not None:
                await self._fail(entry, MirenfsError(reason))

    async def _fail(self, entry: RestoreEntry, error: BaseException) -> BaseException:
        """End the restore as failed, undo it, log one line; return the error to raise, marked as
        reported so the FUSE boundary does not log it a second time."""
        session, entry.session = entry.session, None
        reason = _reason(error)
        entry.state = f"failed: {reason}"
        code = error.errno if isinstance(error, (MirenfsError, OSError)) and error.errno else errno.EIO
        entry.failed_errno = code
        if session is not None:
            session.failure, session.failure_errno = reason, code
            with trio.CancelScope(shield=True):  # undo even when the request was interrupted
                await session.abort()
                await _give_back_the_memory_of(session)
            if session.target.stranded is not None:
                self.stranded.append((entry, session.target))
            outcome = session.target.outcome()  # the next step depends on it: say it, once
            if outcome not in reason:
                reason = f"{reason}; {outcome}"
                entry.state = f"failed: {reason}"
        log.warning(
            "restore of disk %s from restore/%s by uid %d failed: %s",
            entry.disk,
            entry.name,
            entry.uid,
            reason,
        )
        if not isinstance(error, Exception):
            return error  # a cancellation goes on as it is
        reported = error if isinstance(error, MirenfsError) else RestoreRefused(reason, code)
        reported.reported = True
        return reported

    async def remove(self, file_name: str, *, reason: str = "deleted while receiving") -> None:
        entry = self.entries.pop(file_name, None)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), file_name)
        del self.by_inode[entry.inode]
        await self.abort(entry, reason)
        if entry.state.startswith("failed: "):
            # Trial X: rsync removes its temporary file when its close fails, and the outcome went
            # with it: kept where refusals are, for `mirenfs status`.
            code = errno.errorcode.get(entry.failed_errno or errno.EIO, "EIO")
            said = entry.state.removeprefix("failed: ")
            self.refusals.appendleft(
                Refusal(in_restore(file_name), code, f"{said} (its writer then removed it)")
            )
            self._last_refusal = None
        elif entry.state.startswith("installed") and reason != REPLACED_BY_A_RENAME:
            # Trial R (s18): rsync --delay-updates removes its temporary file once installed (it
            # could not move it into a partial directory): the disk was replaced, and status said
            # "no restores". The outcome stays listed, with the restores, as one that ended (not
            # when a rename replaced it: the entry renamed over it stands for the disk now).
            self.removed_after_install.appendleft(
                {**entry.status(), "state": f"{entry.state} (its file was removed since)"}
            )

    async def rename(self, old: str, new: str, *, replace: bool = True, exchange: bool = False) -> None:
        """``mv restore/OLD restore/NEW`` (rsync's temporary name to its own), over an entry of
        that name unless ``replace`` is False (EEXIST); never an exchange (EINVAL): an entry is a
        restore in progress, not a file to swap."""
        entry = self.entries.get(old)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), old)
        refusal = None
        if exchange:
            refusal = RestoreRefused(f"restore/{old} and restore/{new} cannot be exchanged", errno.EINVAL)
        elif not replace and new in self.entries:
            refusal = RestoreRefused(f"restore/{new} exists", errno.EEXIST)
        if refusal is not None:
            refusal.reported = True  # what a caller asks and takes: no log line (review D22 D9)
            raise refusal
        # Refused with EPERM: mv takes EINVAL for "into a subdirectory of itself" (and retries a
        # renameat2 that fails so), and EXDEV would make it copy the entry's outcome text instead.
        try:
            disk, _sidecar = disk_for_file_name(new)  # the new name must be a valid one too
        except MirenfsError as exc:
            raise RestoreRefused(f"restore/{old} cannot be renamed: {exc}", errno.EPERM) from None
        if disk != entry.disk:
            raise RestoreRefused(
                f"restore/{old} restores disk {entry.disk}; it cannot be renamed to {printable(new)}, a "
                f"name of disk {disk} (copy the snapshot to {in_restore(new)} instead)",
                errno.EPERM,
            )
        if new in self.entries and self.entries[new] is not entry:
            await self.remove(new, reason=REPLACED_BY_A_RENAME)
        del self.entries[old]
        entry.name = new
        self.entries[new] = entry

    # ---- restore/restore: a whole-mount archive's own restore/, ignored --------

    def ignore(self, parent: int, name: str, *, is_directory: bool, mode: int) -> IgnoredNode:
        """Accept ``name`` under ``parent`` (the restore/restore directory or below it) and ignore it."""
        existing = self.ignored_child(parent, name)
        if existing is not None and existing.is_directory == is_directory:
            return existing
        if existing is not None:
            del self.ignored[existing.inode]
        node = IgnoredNode(self._allocate_inode(), parent, name, is_directory, mode & 0o7777)
        self.ignored[node.inode] = node
        if not is_directory:  # a copy into restore/restore/ by mistake succeeds: say it restores nothing
            self.ignored_files.appendleft(node)  # listed under its name then (rsync renames it)
            log.info(
                "%s: ignored, as everything below %s/%s/ is (a whole-mount archive's copy of %s/); "
                "to restore a snapshot, copy it into %s/ itself",
                self._ignored_path(node),
                RESTORE_DIRECTORY,
                NESTED_DIRECTORY,
                RESTORE_DIRECTORY,
                RESTORE_DIRECTORY,
            )
        return node

    def _ignored_path(self, node: IgnoredNode) -> str:
        names = [node.name]
        while node.parent in self.ignored:
            node = self.ignored[node.parent]
            names.append(node.name)
        return "/".join([RESTORE_DIRECTORY, *map(printable, reversed(names))])  # the nested one's too

    def ignored_child(self, parent: int, name: str) -> IgnoredNode | None:
        for node in self.ignored.values():
            if node.parent == parent and node.name == name:
                return node
        return None

    def ignored_children(self, parent: int) -> list[IgnoredNode]:
        return [node for node in self.ignored.values() if node.parent == parent]

    def rename_ignored(self, old_parent: int, old_name: str, new_parent: int, new_name: str) -> None:
        """A rename under restore/restore (rsync's temporary file to its name): the node moves,
        over what had that name (review: refused with EPERM, and rsync -a of a whole-mount copy
        into restore/ exited 23 though every restore went through)."""
        node = self.ignored_child(old_parent, old_name)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), old_name)
        above = new_parent
        while above in self.ignored:  # not into itself
            if above == node.inode:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), new_name)
            above = self.ignored[above].parent
        replaced = self.ignored_child(new_parent, new_name)
        if replaced is not None and replaced is not node:
            if replaced.is_directory != node.is_directory:
                code = errno.EISDIR if replaced.is_directory else errno.ENOTDIR
                raise OSError(code, os.strerror(code), new_name)
            if self.ignored_children(replaced.inode):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), new_name)
            del self.ignored[replaced.inode]
        node.parent, node.name = new_parent, new_name

    def forget_ignored(self, parent: int, name: str) -> None:
        node = self.ignored_child(parent, name)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        if self.ignored_children(node.inode):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), name)
        del self.ignored[node.inode]

    async def retry_stranded(self, *, interval_s: float | None = None) -> None:
        """For the mount's life: remove the disks failed restores left ``provisioning`` because the
        catalogue did not answer, once it does, by the rule the sweep at mount start uses (never a
        disk a live restore, through any mount, is at work on); log and record each outcome."""
        while True:
            await trio.sleep(STRANDED_RETRY_S if interval_s is None else interval_s)
            for item in list(self.stranded):
                entry, target = item
                disk = target.stranded
                assert disk is not None
                if self.receiving(disk.name) is not None or disk.name in self._starting:
                    continue  # restored into through this mount right now: not ours to remove
                try:
                    removed = await trio.to_thread.run_sync(
                        remove_interrupted_creation, self.store, disk.name, disk.id
                    )
                except MirenfsError:
                    continue  # the catalogue still does not answer (or there is no room): next round
                self.stranded.remove(item)
                left = target.outcome()  # what the entry's state says of the disk until now
                once = _ONCE.get(target.stranded_until, target.stranded_until)
                if removed:
                    log.info(
                        "removed disk %s, left provisioning by a failed restore, once %s", disk.name, once
                    )
                    entry.state = entry.state.replace(
                        left, f"disk {disk.name} was left provisioning and was removed once {once}"
                    )
                else:
                    log.info("kept disk %s: a restore is at work on it, or gave it an image", disk.name)
                    entry.state = entry.state.replace(
                        left,
                        f"disk {disk.name} was left provisioning and was kept: a restore since took it over",
                    )

    def status(self) -> list[dict[str, object]]:
        return [
            *(entry.status() for entry in self.entries.values()),
            *self.removed_after_install,
            *map(self._ignored_status, self.ignored_files),
        ]

    def _ignored_status(self, node: IgnoredNode) -> dict[str, object]:
        return {"name": self._ignored_path(node), "state": IGNORED_BELOW_NESTED_STATE}

    def refusal_status(self) -> list[dict[str, object]]:
        return [asdict(refusal) for refusal in self.refusals]

    async def close(self) -> None:
        for entry in list(self.entries.values()):
            await self.abort(entry, "the mount was stopped")


def _oversized_sidecar(entry: RestoreEntry) -> RestoreRefused:
    """A file named ``NAME.mirn.sha256`` that outgrows one checksum line: most likely a snapshot
    copied under the wrong name. "File too large", said once in the log and in its state."""
    refused = f"refused: a checksum file holds at most {_SIDECAR_LIMIT} bytes; copy a snapshot to NAME.mirn"
    too_large = RestoreRefused(
        f"restore/{entry.name} is named as a snapshot's checksum file, which holds one sha256sum "
        f"line (at most {_SIDECAR_LIMIT} bytes), and is ignored; to restore a snapshot, copy it to "
        "restore/NAME.mirn",
        errno.EFBIG,
    )
    if entry.state != refused:
        log.warning("%s", too_large)
        entry.state = refused
    too_large.reported = True
    return too_large


def _reason(error: BaseException) -> str:
    """Why a restore failed, for its state and log line: a MirenfsError's sentence; an OSError as
    the OS words it with its file (never Python's ``[Errno 28] …`` form)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    return str(error) or type(error).__name__
