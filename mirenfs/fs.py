"""The FUSE operations (SPEC §5): thin handlers that ask the catalog and the
snapshot service, and turn every failure into an errno.

pyfuse3 ends its main loop on any exception that is not a FUSEError, which
leaves a dead mount; :func:`fuse_errors` therefore wraps every handler.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from mirenfs.disks import DiskState
from mirenfs.errors import ImageChangedError, MirenfsError
from mirenfs.restoredir import SIDECAR_SUFFIX, SNAPSHOT_SUFFIX, RestoreDirectory, RestoreEntry
from mirenfs.snapshots import DiskVersion, SnapshotService, sidecar_size, sidecar_text

log = logging.getLogger("mirenfs.fs")

ROOT_INODE = pyfuse3.ROOT_INODE
RESTORE_INODE = ROOT_INODE + 1
RESTORE_DIR = "restore"
CATALOG_TTL_S = 0.5  # how long one store listing serves lookups (bulk `ls -l`, tar, rsync)

P = ParamSpec("P")
R = TypeVar("R")


def fuse_errors(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map every exception to an errno so that no handler can kill the mount."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ImageChangedError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except MirenfsError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except OSError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(frozen=True)
class CatalogEntry:
    """A disk the mount shows: not deleting, and its image exists."""

    name: str
    image_path: str
    filesystem: str
    status: str


class DiskCatalog(Protocol):
    """Where the mount learns which disks exist (the store, or Miren)."""

    def visible_disks(self) -> dict[str, CatalogEntry]: ...


class StoreCatalog:
    """The embedded store as a catalog: disks not in ``deleting`` whose image exists."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def visible_disks(self) -> dict[str, CatalogEntry]:
        visible = {}
        for record in self.store.list_disks():
            disk = record.disk
            if disk.status == DiskState.DELETING or not record.image_path:
                continue
            if os.path.isfile(record.image_path):
                visible[disk.name] = CatalogEntry(
                    disk.name, record.image_path, disk.filesystem, disk.status.value
                )
        return visible


@dataclass
class Node:
    """A file in the root: one version of a disk's snapshot, or of its sidecar.

    Each version has inodes of its own, so the kernel keeps a separate page
    cache and size for it: a handle opened before the image changed goes on
    reading the old snapshot's bytes, never a mix of old and new.
    """

    inode: int
    name: str
    kind: str  # "snapshot" or "sidecar"
    version: DiskVersion


@dataclass
class OpenSnapshot:
    """An open ``NAME.mirn``: bound to the version it was opened on."""

    version: DiskVersion
    next_offset: int = 0


class MirenOperations(pyfuse3.Operations):
    """The mount's root: ``NAME.mirn`` and ``NAME.mirn.sha256`` per disk, plus ``restore/``."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        catalog: DiskCatalog,
        service: SnapshotService,
        *,
        shared: bool,
        restores: Callable[[Callable[[], int]], RestoreDirectory],
    ) -> None:
        super().__init__()
        self.catalog = catalog
        self.service = service
        self.shared = shared
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mounted_ns = time.time_ns()
        self.nursery: trio.Nursery | None = None
        self._nodes: dict[int, Node] = {}
        self._inodes: dict[tuple[str, DiskVersion], int] = {}
        self._listing: dict[int, str] = {}  # stable inodes for readdir entries, by file name
        self._listing_inodes: dict[str, int] = {}
        self._next_inode = RESTORE_INODE + 1
        self._handles: dict[int, OpenSnapshot | RestoreEntry | bytes] = {}
        self._next_handle = 1
        self._catalog: dict[str, CatalogEntry] = {}
        self._catalog_at = -1.0
        self._catalog_lock = trio.Lock()
        self.restores = restores(self._allocate_inode)

    # ---- catalog and inodes -------------------------------------------------

    async def disks(self, *, fresh: bool = False) -> dict[str, CatalogEntry]:
        async with self._catalog_lock:
            now = time.monotonic()
            if fresh or now - self._catalog_at > CATALOG_TTL_S:
                listing = await trio.to_thread.run_sync(self.catalog.visible_disks)
                for gone in set(self._catalog) - set(listing):
                    self.service.forget(gone)
                self._catalog, self._catalog_at = listing, now
            return self._catalog

    def _node_for(self, version: DiskVersion, kind: str) -> Node:
        inode = self._inodes.get((kind, version))
        if inode is None:
            inode = self._inodes[(kind, version)] = self._allocate_inode()
            self._nodes[inode] = Node(inode, version.name, kind, version)
        return self._nodes[inode]

    def _allocate_inode(self) -> int:
        self._next_inode += 1
        return self._next_inode - 1

    def _listing_inode(self, file_name: str) -> int:
        inode = self._listing_inodes.get(file_name)
        if inode is None:
            inode = self._listing_inodes[file_name] = self._allocate_inode()
            self._listing[inode] = file_name
        return inode

    async def _current_node(self, file_name: str) -> Node:
        """The node of the disk's current version, building the version if needed."""
        parsed = _parse_file_name(file_name)
        entry = (await self.disks()).get(parsed[0]) if parsed is not None else None
        if parsed is None or entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        version = await self.service.version(entry.name, entry.image_path, entry.filesystem)
        return self._node_for(version, parsed[1])

    async def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is not None:
            return node
        file_name = self._listing.get(inode)
        if file_name is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # A readdir entry used without a lookup (the kernel revalidates names,
        # so this is rare): it stands for the current version.
        return await self._current_node(file_name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped these inodes: forget the ones of versions no longer current.

        forget cannot answer an error, and an exception would end the session.
        """
        try:
            for inode, _lookups in inode_list:
                node = self._nodes.get(inode)
                if node is not None and self.service.current(node.name) is not node.version:
                    del self._nodes[inode]
                    self._inodes.pop((node.kind, node.version), None)
        except Exception:
            log.exception("unexpected error in forget")

    # ---- attributes ---------------------------------------------------------

    def _attributes(self, inode: int, mode: int, size: int, mtime_ns: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_mode = mode
        attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_size = size
        attrs.st_blksize = 128 * 1024
        attrs.st_blocks = -(-size // 512)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime_ns
        # Exact and fresh: every stat asks us, so a changed image shows at once.
        attrs.attr_timeout = 0
        attrs.entry_timeout = 0
        return attrs

    def _file_mode(self) -> int:
        return stat.S_IFREG | (0o400 if self.shared else 0o444)

    def _directory_attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        mode = 0o755 if inode == ROOT_INODE else self._restore_dir_mode()
        return self._attributes(inode, stat.S_IFDIR | mode, 0, self.mounted_ns)

    def _restore_dir_mode(self) -> int:
        return 0o755  # writable by the mount's owner only

    def _restore_attributes(self, entry: RestoreEntry) -> pyfuse3.EntryAttributes:
        attrs = self._attributes(entry.inode, stat.S_IFREG | entry.mode, entry.size, entry.mtime_ns)
        attrs.st_uid, attrs.st_gid = entry.uid, entry.gid
        return attrs

    def _restore_entry(self, name: bytes) -> RestoreEntry:
        entry = self.restores.entries.get(os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _node_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        version = node.version
        size = version.size if node.kind == "snapshot" else sidecar_size(node.name)
        return self._attributes(node.inode, self._file_mode(), size, version.identity.mtime_ns)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """An inode's attributes never change: a changed image is a new inode at the next lookup."""
        if inode in (ROOT_INODE, RESTORE_INODE):
            return self._directory_attributes(inode)
        restore = self.restores.by_inode.get(inode)
        if restore is not None:
            return self._restore_attributes(restore)
        attrs = self._node_attributes(await self._node(inode))
        attrs.st_ino = inode
        return attrs

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == RESTORE_INODE:
            return self._restore_attributes(self._restore_entry(name))
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        text = os.fsdecode(name)
        if text == RESTORE_DIR:
            return self._directory_attributes(RESTORE_INODE)
        return self._node_attributes(await self._current_node(text))

    # ---- directories --------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in (ROOT_INODE, RESTORE_INODE):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries: list[tuple[str, pyfuse3.EntryAttributes]] = []
        if fh == ROOT_INODE:
            entries.append((RESTORE_DIR, self._directory_attributes(RESTORE_INODE)))
            for name in sorted(await self.disks(fresh=start_id == 0)):
                for suffix in (SNAPSHOT_SUFFIX, SIDECAR_SUFFIX):
                    # Placeholder attributes the kernel does not keep (timeout 0):
                    # the exact size needs the index, which a plain `ls` must not
                    # trigger; a `stat` looks the name up and gets the real inode.
                    inode = self._listing_inode(name + suffix)
                    entries.append((name + suffix, self._attributes(inode, self._file_mode(), 0, 0)))
        else:
            entries.extend((e.name, self._restore_attributes(e)) for e in self.restores.entries.values())
        for position, (name, attrs) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, position):
                break

    # ---- reading ------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        restore = self.restores.by_inode.get(inode)
        if restore is not None:
            if not flags & (os.O_WRONLY | os.O_RDWR):
                raise pyfuse3.FUSEError(errno.EACCES)  # restore/ takes snapshots; it gives none back
            entry = await self.restores.begin(restore.name, restore.mode, ctx.uid, ctx.gid)
            return pyfuse3.FileInfo(fh=self._new_handle(entry), direct_io=True)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = await self._node(inode)
        version = node.version
        if version.fd < 0:
            raise pyfuse3.FUSEError(errno.ESTALE)  # a version nobody uses any more
        handle: OpenSnapshot | bytes
        if node.kind == "sidecar":
            handle = sidecar_text(node.name, await self.service.sidecar(version))
        else:
            self.service.acquire(version)
            handle = OpenSnapshot(version)
        fh = self._new_handle(handle)
        # The page cache stays valid across opens: a version inode's bytes never
        # change. A listing inode stands for whichever version is current.
        return pyfuse3.FileInfo(fh=fh, keep_cache=inode in self._nodes)

    def _new_handle(self, handle: OpenSnapshot | RestoreEntry | bytes) -> int:
        fh = self._next_handle
        self._next_handle += 1
        self._handles[fh] = handle
        return fh

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if isinstance(handle, RestoreEntry):
            raise pyfuse3.FUSEError(errno.EACCES)
        if isinstance(handle, bytes):
            return handle[off : off + size]
        version = handle.version
        data = await version.producer.read(off, size)
        if off == handle.next_offset and self.nursery is not None:
            self._read_ahead(version, off + len(data))
        handle.next_offset = off + len(data)
        return data

    def _read_ahead(self, version: DiskVersion, position: int) -> None:
        """Sequential reader: compress the next frames before they are asked for."""
        producer = version.producer
        layout = producer.layout
        if producer.spill is not None and producer.spill.frames == layout.index.frame_count:
            return  # every frame is already on disk
        if not len(layout.header) <= position < layout.data_end:
            return
        first = layout.frame_at(position)
        for k in range(first, min(first + self.service.settings.workers + 1, layout.index.frame_count)):
            if not producer.has_frame(k):
                assert self.nursery is not None
                self.nursery.start_soon(producer.prefetch, k)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, OpenSnapshot):
            self.service.release(handle.version)
        elif isinstance(handle, RestoreEntry):
            await self.restores.release(handle)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """A close of a file in restore/: install now if the snapshot is whole, so errors reach close(2)."""
        handle = self._handles.get(fh)
        if isinstance(handle, RestoreEntry):
            await self.restores.flush(handle)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles.get(fh)
        if not isinstance(handle, RestoreEntry):
            raise pyfuse3.FUSEError(errno.EROFS)
        await self.restores.write(handle, off, buf)
        return len(buf)

    def status(self) -> dict[str, Any]:
        """What ``mirenfs status`` shows: per disk, index state and progress; restores."""
        disks: dict[str, dict[str, Any]] = {}
        for name in sorted(self._catalog):
            progress = self.service.progress.get(name)
            version = self.service.current(name)
            if progress is not None:
                disks[name] = {"index": "building", "done": progress.done, "total": progress.total}
            elif version is not None:
                disks[name] = {
                    "index": "ready",
                    "snapshot_bytes": version.size,
                    "checksum": version.meta.checksum,
                }
            else:
                disks[name] = {"index": "not built"}
        return {
            "pid": os.getpid(),
            "index_passes": self.service.index_passes,
            "disks": disks,
            "restores": self.restores.status(),
        }

    # ---- extended attributes ------------------------------------------------

    async def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if inode == ROOT_INODE:
            await self.disks()  # status reports the disks as the store has them now
            return {
                b"user.mirenfs.index_passes": str(self.service.index_passes).encode(),
                b"user.mirenfs.status": json.dumps(self.status()).encode(),
            }
        if inode == RESTORE_INODE:
            return {}
        restore = self.restores.by_inode.get(inode)
        if restore is not None:
            return {b"user.mirenfs.state": restore.state.encode()}
        node = await self._node(inode)
        if node.kind != "snapshot":
            return {}
        meta = node.version.meta
        return {
            b"user.mirn.name": meta.name.encode(),
            b"user.mirn.size_bytes": str(meta.size_bytes).encode(),
            b"user.mirn.filesystem": meta.filesystem.encode(),
            b"user.mirn.timestamp": meta.timestamp.rfc3339().encode(),
            b"user.mirn.checksum": meta.checksum.encode(),
        }

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = (await self._xattrs(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(await self._xattrs(inode))

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ---- everything a snapshot refuses -------------------------------------

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        restore = self.restores.by_inode.get(inode)
        if restore is None:
            raise pyfuse3.FUSEError(errno.EROFS if fields.update_size else errno.EPERM)
        # tar and rsync set times, mode and owner after writing: keep them.
        if fields.update_size and attr.st_size != restore.size:
            reason = f"restore/ files cannot be resized (to {attr.st_size} bytes): write snapshots in order"
            await self.restores.abort(restore, reason)
            raise pyfuse3.FUSEError(errno.EINVAL)
        if fields.update_mode:
            restore.mode = attr.st_mode & 0o7777
        if fields.update_uid:
            restore.uid = attr.st_uid
        if fields.update_gid:
            restore.gid = attr.st_gid
        if fields.update_mtime:
            restore.mtime_ns = attr.st_mtime_ns
        return self._restore_attributes(restore)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != RESTORE_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.restores.remove(os.fsdecode(name))

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if parent_inode_old != RESTORE_INODE or parent_inode_new != RESTORE_INODE:
            raise pyfuse3.FUSEError(
                errno.EPERM if RESTORE_INODE not in (parent_inode_old, parent_inode_new) else errno.EXDEV
            )
        self._restore_entry(name_old)
        await self.restores.rename(os.fsdecode(name_old), os.fsdecode(name_new))

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """A new file in restore/ starts a restore; the §3 refusals answer here."""
        if parent_inode != RESTORE_INODE:
            raise pyfuse3.FUSEError(errno.EROFS if parent_inode == ROOT_INODE else errno.EPERM)
        entry = await self.restores.begin(os.fsdecode(name), mode, ctx.uid, ctx.gid)
        info = pyfuse3.FileInfo(fh=self._new_handle(entry), direct_io=True)
        return info, self._restore_attributes(entry)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


def _parse_file_name(name: str) -> tuple[str, str] | None:
    if name.endswith(SIDECAR_SUFFIX):
        return name[: -len(SIDECAR_SUFFIX)], "sidecar"
    if name.endswith(SNAPSHOT_SUFFIX):
        return name[: -len(SNAPSHOT_SUFFIX)], "snapshot"
    return None
