"""The mount's ``restore/`` directory (SPEC §5), without FUSE: which disk a file
name restores, the §3 refusals at create time, and one streaming restore per
entry, fed by writes in order, installed by the close that completes it (or
ended by the last close).

Each entry stays listed with its outcome (``user.mirenfs.state``) until it is
deleted, so an operator can see what became of a copy.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from mirenfs.disks.model import validate_disk_name
from mirenfs.disks.restore import DiskRestore
from mirenfs.disks.rules import RestoreTarget, prepare_restore
from mirenfs.disks.store import Store
from mirenfs.errors import MirenfsError, RestoreRefused

log = logging.getLogger("mirenfs.restore")

SNAPSHOT_SUFFIX = ".mirn"
SIDECAR_SUFFIX = ".mirn.sha256"
_RSYNC_TEMPORARY = re.compile(r"\.(.+\.mirn(?:\.sha256)?)\.[A-Za-z0-9]{6}")


def disk_for_file_name(file_name: str) -> tuple[str, bool]:
    """The disk a file in restore/ restores, and whether it is a sidecar.

    ``NAME.mirn`` and rsync's temporary ``.NAME.mirn.XXXXXX`` restore disk
    NAME; ``NAME.mirn.sha256`` sidecars (as in a tar of the mount) are kept
    but restore nothing.
    """
    match = _RSYNC_TEMPORARY.fullmatch(file_name)
    base = match.group(1) if match else file_name
    if base.endswith(SIDECAR_SUFFIX):
        return validate_disk_name(base[: -len(SIDECAR_SUFFIX)]), True
    if not base.endswith(SNAPSHOT_SUFFIX):
        raise RestoreRefused(
            f"restore/{file_name}: only NAME.mirn snapshot files can be restored", errno.EINVAL
        )
    return validate_disk_name(base[: -len(SNAPSHOT_SUFFIX)]), False


@dataclass(eq=False)
class RestoreEntry:
    """A file in restore/: its attributes, and the restore it feeds while receiving."""

    inode: int
    name: str
    disk: str
    sidecar: bool
    mode: int
    uid: int
    gid: int
    state: str = "receiving"
    size: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)
    session: DiskRestore | None = None

    def status(self) -> dict[str, object]:
        return {"name": f"restore/{self.name}", "disk": self.disk, "state": self.state, "bytes": self.size}


class RestoreDirectory:
    """The entries of restore/ and the restores they run."""

    def __init__(
        self, store: Store, data_path: str, *, allow_overwrite: bool, allocate_inode: Callable[[], int]
    ) -> None:
        self.store = store
        self.data_path = data_path
        self.allow_overwrite = allow_overwrite
        self._allocate_inode = allocate_inode
        self.entries: dict[str, RestoreEntry] = {}
        self.by_inode: dict[int, RestoreEntry] = {}

    def receiving(self, disk: str) -> RestoreEntry | None:
        for entry in self.entries.values():
            if entry.disk == disk and entry.session is not None:
                return entry
        return None

    async def begin(self, file_name: str, mode: int, uid: int, gid: int) -> RestoreEntry:
        """Create the entry, or restart an existing one in place (same inode: it is being
        opened for writing), applying every refusal before a byte is written."""
        disk, sidecar = disk_for_file_name(file_name)
        session: DiskRestore | None = None
        if not sidecar:
            if self.receiving(disk) is not None:
                raise RestoreRefused(f"disk {disk} is already being restored through restore/", errno.EBUSY)
            target = await trio.to_thread.run_sync(self._prepare, disk)
            session = DiskRestore(target)
        entry = self.entries.get(file_name)
        if entry is None:
            entry = RestoreEntry(self._allocate_inode(), file_name, disk, sidecar, mode & 0o7777, uid, gid)
            self.entries[file_name] = entry
            self.by_inode[entry.inode] = entry
        entry.session, entry.size, entry.mtime_ns = session, 0, time.time_ns()
        entry.state = "receiving" if session is not None else "ignored: a sidecar restores nothing"
        return entry

    def _prepare(self, disk: str) -> RestoreTarget:
        return prepare_restore(
            self.store, disk, data_path=self.data_path, overwrite=self.allow_overwrite, creator=self.store
        )

    async def write(self, entry: RestoreEntry, offset: int, data: bytes) -> None:
        if entry.session is None:
            if entry.sidecar and offset == entry.size and entry.size + len(data) <= 4096:
                entry.size += len(data)
                return
            raise RestoreRefused(f"restore/{entry.name} is not receiving ({entry.state})", errno.EIO)
        try:
            await entry.session.write(offset, data)
        except BaseException as exc:
            await self._fail(entry, exc)
            raise
        entry.size = entry.session.next_offset
        entry.mtime_ns = time.time_ns()

    async def flush(self, entry: RestoreEntry) -> None:
        """A close of the file: install if the snapshot is whole, else tell that close it is not.

        FUSE cannot tell the writer's last close from another one: a process
        that forks while writing (its child's close-on-exec), or dd, which
        dup2s its output and closes the original. So an incomplete stream
        answers EIO to the close in hand — a short ``cp`` exits non-zero —
        and stays open for more writes; the release after the last close ends it.
        """
        session = entry.session
        if session is None or session.next_offset == 0:
            return
        try:
            await session.feed_pending()
        except BaseException as exc:
            await self._fail(entry, exc)
            raise
        if not session.complete:
            raise RestoreRefused(
                f"restore/{entry.name} was closed after {entry.size} bytes, before the snapshot was whole",
                errno.EIO,
            )
        await self.finish(entry)

    async def release(self, entry: RestoreEntry) -> None:
        """The last close: what arrived is all there is, so the restore ends now, either way."""
        if entry.session is not None:
            with contextlib.suppress(MirenfsError):
                await self.finish(entry)  # an incomplete stream fails here with its precise reason

    async def finish(self, entry: RestoreEntry) -> None:
        """Verify and install, or fail and undo."""
        session = entry.session
        if session is None:
            return
        try:
            meta = await session.finish()
        except BaseException as exc:
            await self._fail(entry, exc)
            raise
        entry.session = None
        entry.state = "installed"
        log.info(
            "restore of disk %s from restore/%s installed: %d bytes, checksum %s",
            entry.disk,
            entry.name,
            meta.size_bytes,
            meta.checksum,
        )

    async def abort(self, entry: RestoreEntry, reason: str) -> None:
        if entry.session is not None:
            await self._fail(entry, MirenfsError(reason))

    async def _fail(self, entry: RestoreEntry, error: BaseException) -> None:
        session, entry.session = entry.session, None
        reason = str(error) or type(error).__name__
        entry.state = f"failed: {reason}"
        if session is not None:
            with trio.CancelScope(shield=True):  # undo even when the request was interrupted
                await session.abort()
        log.warning("restore of disk %s from restore/%s failed: %s", entry.disk, entry.name, reason)

    async def remove(self, file_name: str, *, reason: str = "deleted while receiving") -> None:
        entry = self.entries.pop(file_name, None)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), file_name)
        del self.by_inode[entry.inode]
        await self.abort(entry, reason)

    async def rename(self, old: str, new: str) -> None:
        entry = self.entries.get(old)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), old)
        disk_for_file_name(new)  # the new name must be a valid one too
        if new in self.entries and self.entries[new] is not entry:
            await self.remove(new, reason="replaced by a rename")
        del self.entries[old]
        entry.name = new
        self.entries[new] = entry

    def status(self) -> list[dict[str, object]]:
        return [entry.status() for entry in self.entries.values()]

    async def close(self) -> None:
        for entry in list(self.entries.values()):
            await self.abort(entry, "the mount was stopped")
