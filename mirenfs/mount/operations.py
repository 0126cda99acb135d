"""The FUSE operations (SPEC §5): thin handlers that ask the catalog and the
snapshot service, and turn every failure into an errno.

pyfuse3 ends its main loop on any exception that is not a FUSEError, which
leaves a dead mount; :func:`fuse_errors` therefore wraps every handler.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from mirenfs.engine.memory import WORTH_TRIMMING_AFTER_READING, give_back_free_memory
from mirenfs.engine.produce import SequentialReader
from mirenfs.errors import (
    FOLDED_WHEN_REPEATED,
    MirenfsError,
    StoreError,
    out_of_descriptors,
)
from mirenfs.mount.catalog import CatalogEntry, CatalogView, DiskCatalog
from mirenfs.mount.inodes import (
    RESTORE_INODE,
    ROOT_INODE,
    SIDECAR,
    SNAPSHOT,
    HandleTable,
    InodeTable,
    Node,
    OpenSnapshot,
)
from mirenfs.mount.restoredir import (
    NESTED_DIRECTORY,
    SIDECAR_SUFFIX,
    SNAPSHOT_SUFFIX,
    EntryChange,
    IgnoredNode,
    RestoreDirectory,
    RestoreEntry,
    RestoreWriter,
)
from mirenfs.mount.status import (
    CONSISTENCY_XATTR,
    INDEX_PASSES_XATTR,
    SNAPSHOT_XATTRS,
    STATE_XATTR,
    STATUS_XATTR,
    mount_status,
    status_json,
)
from mirenfs.mount.versions import SnapshotService, sidecar_size, sidecar_text

log = logging.getLogger(__name__)

RESTORE_DIR = "restore"
# The mount's status names restores, their writers and every image's checksum: with -o
# allow_other these are its owner's and root's only.
_STATUS_NAMES = (STATUS_XATTR.encode(), INDEX_PASSES_XATTR.encode())
# The preferred I/O size every file reports: cp and cat read and write this much per call, so a
# snapshot crosses FUSE in requests as large as the kernel allows (1 MiB) rather than 128 KiB ones.
IO_SIZE = 1 << 20
# How long the kernel may keep a snapshot's (or sidecar's) attributes: for ever, in effect, since they
# never change for an inode (a changed image is a new inode at the next lookup, and lookups are never
# cached). Without it every read of ``cat`` would first cost a GETATTR round trip.
FIXED_ATTRIBUTES_TIMEOUT = 24 * 3600.0
NAME_MAX = 255  # bytes in a name, as statfs says
RENAME_NOREPLACE = 1  # renameat2(2) flags, as FUSE passes them on
RENAME_EXCHANGE = 2
assert ROOT_INODE == pyfuse3.ROOT_INODE

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
        except MirenfsError as exc:
            if not exc.reported:
                log.warning("%s", exc, extra=FOLDED_WHEN_REPEATED)
            raise pyfuse3.FUSEError(exc.errno) from None
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except OSError as exc:
            log.warning(
                "%s: %s", handler.__name__, out_of_descriptors(exc.errno) or exc, extra=FOLDED_WHEN_REPEATED
            )
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


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
        nursery: trio.Nursery,
        catalog_name: str | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__()
        self.catalog_name, self.node = catalog_name, node  # what status names: which disks these are
        self.service = service
        self.shared = shared
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mounted_ns = time.time_ns()
        self._nursery = nursery  # where sequential readers compress ahead
        self.catalog = CatalogView(catalog, on_gone=service.forget)
        self.inodes = InodeTable()
        # bytes: a sidecar's or a restore/ entry's text; None: a file under restore/restore (ignored)
        self.handles: HandleTable[OpenSnapshot | RestoreWriter | bytes | None] = HandleTable()
        self.restores = restores(self.inodes.allocate)

    # ---- which node an inode or a name is -----------------------------------

    async def _current_node(self, file_name: str) -> Node:
        """The node of the disk's current version, building the version if needed."""
        entry, kind = await self._listed(file_name, building=True)
        version = await self.service.version(
            entry.name, entry.image_path, entry.filesystem, attached=entry.attached
        )
        return self.inodes.node_for(version, kind)

    async def _ready_node(self, file_name: str) -> Node | None:
        """The node of the disk's current version if that is built, else None (no pass starts)."""
        entry, kind = await self._listed(file_name, building=False)
        version = await self.service.ready_version(
            entry.name, entry.image_path, entry.filesystem, attached=entry.attached
        )
        return None if version is None else self.inodes.node_for(version, kind)

    async def _listed(self, file_name: str, *, building: bool) -> tuple[CatalogEntry, str]:
        """The catalogue's entry for a file name of the root, and the file's kind (ENOENT if none).
        ``building``: a version not built yet is about to be (a lookup that only asks whether
        one is ready finds none either way: the listing it has is enough)."""
        parsed = _parse_file_name(file_name)
        entry: CatalogEntry | None = None
        if parsed is not None:
            entry = (await self.catalog.disks()).get(parsed[0])
            if entry is None or (building and self.service.current(parsed[0]) is None):
                # Not listed, or its version is about to be built (a pass costs far more than a
                # listing): ask afresh, so a disk just restored or created shows at once, with the
                # size and filesystem the store has for it now, never those of the image it replaced.
                entry = (await self.catalog.disks(fresh=True)).get(parsed[0])
        if parsed is None or entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry, parsed[1]

    def _root_file_name(self, inode: int) -> str | None:
        """The name of a file in the root (a snapshot or sidecar), without building anything."""
        node = self.inodes.nodes.get(inode)
        if node is None:
            return self.inodes.listed_name(inode)
        return node.name + (SIDECAR_SUFFIX if node.kind == SIDECAR else SNAPSHOT_SUFFIX)

    async def _node(self, inode: int) -> Node:
        node = self.inodes.nodes.get(inode)
        if node is not None:
            return node
        file_name = self.inodes.listed_name(inode)
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
                self.inodes.forget(inode, lambda node: self.service.current(node.name) is node.version)
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
        attrs.st_blksize = IO_SIZE
        attrs.st_blocks = -(-size // 512)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime_ns
        # Exact and fresh: every lookup asks us, so a changed image shows at once (as a new inode).
        attrs.attr_timeout = 0
        attrs.entry_timeout = 0
        return attrs

    def _file_mode(self) -> int:
        return stat.S_IFREG | (0o400 if self.shared else 0o444)

    def _directory_attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        mode = self._root_mode() if inode == ROOT_INODE else self._restore_dir_mode()
        return self._attributes(inode, stat.S_IFDIR | mode, 0, self.mounted_ns)

    def _root_mode(self) -> int:
        """Shared (-o allow_other), only the mount's owner and root may look in: another user could
        read nothing, yet her `stat NAME.mirn` made the mount freeze, copy and index a disk in use
        once a minute, and `ls -l` showed every disk's name, size and last write (review Sec F8)."""
        return 0o700 if self.shared else 0o755

    def _restore_dir_mode(self) -> int:
        return self._root_mode()  # writable by the mount's owner only

    def _restore_attributes(self, entry: RestoreEntry) -> pyfuse3.EntryAttributes:
        attrs = self._attributes(entry.inode, stat.S_IFREG | entry.mode, entry.size, entry.mtime_ns)
        attrs.st_uid, attrs.st_gid = entry.uid, entry.gid
        return attrs

    def _entry_mode(self, mode: int) -> int:
        """A new restore/ entry's mode. Shared (-o allow_other), without group and other bits: its
        outcome (checksums, who restored what) is its writer's and root's, as the mount's status
        is, and the kernel checks the mode (review: `cp` made it 0644). A chmod by its writer
        afterwards is shown as made."""
        return mode & ~0o077 if self.shared else mode

    def _ignored_attributes(self, node: IgnoredNode) -> pyfuse3.EntryAttributes:
        kind = stat.S_IFDIR if node.is_directory else stat.S_IFREG
        return self._attributes(node.inode, kind | node.mode, 0, node.mtime_ns)

    def _restore_entry(self, name: bytes) -> RestoreEntry:
        entry = self.restores.entries.get(os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _in_restore_tree(self, inode: int) -> bool:
        """restore/ itself, or restore/restore and what is under it (ignored)."""
        return inode == RESTORE_INODE or inode in self.restores.ignored

    def _node_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        version = node.version
        size = version.size if node.kind == SNAPSHOT else sidecar_size(node.name)
        attrs = self._attributes(node.inode, self._file_mode(), size, version.identity.mtime_ns)
        attrs.attr_timeout = FIXED_ATTRIBUTES_TIMEOUT
        return attrs

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """An inode's attributes never change: a changed image is a new inode at the next lookup."""
        if inode in (ROOT_INODE, RESTORE_INODE):
            return self._directory_attributes(inode)
        restore = self.restores.by_inode.get(inode)
        if restore is not None:
            return self._restore_attributes(restore)
        ignored = self.restores.ignored.get(inode)
        if ignored is not None:
            return self._ignored_attributes(ignored)
        attrs = self._node_attributes(await self._node(inode))
        if inode not in self.inodes.nodes:
            # A listing inode stands for whichever version is current: never kept. It reports
            # that version's inode number (what stat shows), which the next lookup finds:
            # `cp` compares stat's number with fstat's after its open.
            attrs.attr_timeout = 0
        return attrs

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._in_restore_tree(parent_inode):
            ignored = self.restores.ignored_child(parent_inode, os.fsdecode(name))
            if ignored is not None:
                return self._ignored_attributes(ignored)
            if parent_inode != RESTORE_INODE:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._restore_attributes(self._restore_entry(name))
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        text = os.fsdecode(name)
        if text == RESTORE_DIR:
            return self._directory_attributes(RESTORE_INODE)
        node = await self._ready_node(text)
        if node is None:
            # An index pass takes minutes on a large disk (17 per TiB here), and the kernel holds
            # the directory's lock through a lookup: every `ls` of the mount would wait for it.
            # The listing inode answers now (timeouts 0); its getattr or open waits for the pass.
            return self._attributes(self.inodes.listing_inode(text), self._file_mode(), 0, 0)
        self.inodes.handed_to_kernel(node)
        return self._node_attributes(node)

    # ---- directories --------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ignored = self.restores.ignored.get(inode)
        if inode not in (ROOT_INODE, RESTORE_INODE) and (ignored is None or not ignored.is_directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def _dot_entries(self, inode: int) -> list[tuple[str, pyfuse3.EntryAttributes]]:
        """``.`` and ``..`` first, as every local filesystem lists them (`ls -la` showed neither)."""
        ignored = self.restores.ignored.get(inode)
        if ignored is None:
            parent = ROOT_INODE  # of restore/, and of the root itself (the mountpoint's is not ours)
            here = self._directory_attributes(inode)
        else:
            parent = ignored.parent
            here = self._ignored_attributes(ignored)
        above = self.restores.ignored.get(parent)
        return [
            (".", here),
            ("..", self._directory_attributes(parent) if above is None else self._ignored_attributes(above)),
        ]

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dot_entries(fh)
        if fh == ROOT_INODE:
            entries.append((RESTORE_DIR, self._directory_attributes(RESTORE_INODE)))
            for name in sorted(await self.catalog.disks(fresh=start_id == 0)):
                for suffix in (SNAPSHOT_SUFFIX, SIDECAR_SUFFIX):
                    # Placeholder attributes the kernel does not keep (timeout 0):
                    # the exact size needs the index, which a plain `ls` must not
                    # trigger; a `stat` looks the name up and gets the real inode.
                    inode = self.inodes.listing_inode(name + suffix)
                    entries.append((name + suffix, self._attributes(inode, self._file_mode(), 0, 0)))
        else:
            if fh == RESTORE_INODE:
                entries.extend((e.name, self._restore_attributes(e)) for e in self.restores.entries.values())
            ignored = self.restores.ignored_children(fh)
            entries.extend((node.name, self._ignored_attributes(node)) for node in ignored)
        for position, (name, attrs) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, position):
                break

    # ---- reading ------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        restore = self.restores.by_inode.get(inode)
        if restore is not None:
            if not writing:  # reading an entry gives its outcome, one line
                return pyfuse3.FileInfo(fh=self.handles.add(restore.report()))
            writer = await self.restores.begin(restore.name, restore.mode, ctx.uid, ctx.gid, ctx.pid)
            return pyfuse3.FileInfo(fh=self.handles.add(writer), direct_io=True)
        if inode in self.restores.ignored:
            return pyfuse3.FileInfo(fh=self.handles.add(None if writing else b""), direct_io=True)
        if writing:  # `cp pg.mirn MNT/` over the snapshot of disk pg: said where it goes (review S4 F7)
            name = self._root_file_name(inode)
            if name is None:
                raise pyfuse3.FUSEError(errno.EROFS)
            raise self.restores.refuse_in_the_root(name, ctx.pid)
        node = await self._node(inode)
        version = node.version
        if version.fd < 0:
            raise pyfuse3.FUSEError(errno.ESTALE)  # a version nobody uses any more
        handle: OpenSnapshot | bytes
        if node.kind == SIDECAR:
            handle = sidecar_text(node.name, await self.service.sidecar(version))
        else:
            self.service.acquire(version)
            handle = OpenSnapshot(version, SequentialReader(version.producer, self._nursery))
        fh = self.handles.add(handle)
        if inode in self.inodes.nodes:
            # The page cache stays valid across opens: a version inode's bytes never change.
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        # A listing inode (opened without a stat before, as `cat` or `dd` do, while the disk was
        # not indexed) stands for whichever version is current, and its size with it: once a
        # restore replaced the image, the kernel would cut this handle's reads at the new
        # version's size (a short copy, exit status 0) and could serve it the other version's
        # cached pages. Its reads bypass the page cache and the kernel's idea of the size.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if isinstance(handle, bytes):
            return handle[off : off + size]
        if isinstance(handle, OpenSnapshot):
            return await handle.read(off, size)
        raise pyfuse3.FUSEError(errno.EBADF)  # opened for writing

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if isinstance(handle, OpenSnapshot):
            self.service.release(handle.version)
            if handle.reader.image_bytes_read >= WORTH_TRIMMING_AFTER_READING:  # a disk was copied
                await trio.to_thread.run_sync(give_back_free_memory, handle.reader.image_bytes_read)
        elif isinstance(handle, RestoreWriter):
            await self.restores.release(handle)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """A close of a file in restore/: install now if the snapshot is whole, so errors reach close(2)."""
        handle = self.handles.get(fh)
        if isinstance(handle, RestoreWriter):
            await self.restores.flush(handle)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles.get(fh)
        if handle is None:
            return len(buf)  # a file under restore/restore: accepted and ignored
        if not isinstance(handle, RestoreWriter):
            raise pyfuse3.FUSEError(errno.EROFS)
        await self.restores.write(handle, off, buf)
        return len(buf)

    # ---- extended attributes ------------------------------------------------

    async def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if inode == ROOT_INODE:
            catalog_error = None
            try:
                disks = await self.catalog.disks()  # status reports the disks as the store has them now
            except StoreError as exc:
                # etcd unreachable: status still answers, from what the mount knows, and says why
                disks, catalog_error = self.catalog.last_listing, str(exc)
            status = mount_status(
                disks,
                self.service,
                self.restores.status(),
                self.restores.refusal_status(),
                catalog_error=catalog_error,
                listing_age_s=self.catalog.listing_age_s,
                catalog=self.catalog_name,
                node=self.node,
                without_image_here=getattr(self.catalog.catalog, "without_image_here", []),
            )
            return {
                INDEX_PASSES_XATTR.encode(): str(self.service.index_passes).encode(),
                STATUS_XATTR.encode(): status_json(status),
            }
        if self._in_restore_tree(inode):  # restore/, and what is ignored under restore/restore
            return {}
        restore = self.restores.by_inode.get(inode)
        if restore is not None:
            return {STATE_XATTR.encode(): restore.state.encode()}
        node = await self._node(inode)
        if node.kind != SNAPSHOT:
            return {}
        meta = node.version.meta
        values = (meta.name, str(meta.size_bytes), meta.filesystem, meta.timestamp.rfc3339(), meta.checksum)
        xattrs = {name.encode(): value.encode() for name, value in zip(SNAPSHOT_XATTRS, values, strict=True)}
        xattrs[CONSISTENCY_XATTR.encode()] = str(node.version.consistency).encode()  # how it was taken
        return xattrs

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and not self.restores.owner_or_root(ctx.uid):  # as the snapshots are
            if name in _STATUS_NAMES:
                raise pyfuse3.FUSEError(errno.EACCES)
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = (await self._xattrs(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if inode == ROOT_INODE and not self.restores.owner_or_root(ctx.uid):
            return []
        return list(await self._xattrs(inode))

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(self._xattr_change_errno(inode))

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(self._xattr_change_errno(inode))

    def _xattr_change_errno(self, inode: int) -> int:
        """Files written into restore/ keep no xattrs or ACLs: "not supported", which ``cp -a``,
        ``cp -p`` and ``rsync -aX`` skip (EPERM would fail them after a good restore).
        Snapshots and the root refuse any change."""
        restore_file = inode in self.restores.by_inode or inode in self.restores.ignored
        return errno.EOPNOTSUPP if restore_file else errno.EPERM

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
        if self._in_restore_tree(inode):
            # tar sets the times of `.` and of what it extracts under restore/restore: ignored.
            self.restores.check_writer(ctx.uid, "restore/")
            if inode == RESTORE_INODE:
                return self._directory_attributes(inode)
            return self._ignored_attributes(self.restores.ignored[inode])
        restore = self.restores.by_inode.get(inode)
        if restore is None:
            name = self._root_file_name(inode) if fields.update_size else None
            if name is not None:  # `truncate -s 0 MNT/pg.mirn`, or a copy over it: as a write would be
                raise self.restores.refuse_in_the_root(name, ctx.pid)
            raise pyfuse3.FUSEError(errno.EROFS if fields.update_size else errno.EPERM)
        self.restores.check_writer(ctx.uid, f"restore/{restore.name}")
        handle = self.handles.get(fh) if fh is not None else None
        await self.restores.change_attributes(
            restore,
            EntryChange(
                size=attr.st_size if fields.update_size else None,
                mode=attr.st_mode & 0o7777 if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ),
            handle if isinstance(handle, RestoreWriter) else None,
        )
        return self._restore_attributes(restore)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not self._in_restore_tree(parent_inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        self.restores.check_writer(ctx.uid, "restore/")
        if parent_inode != RESTORE_INODE:
            self.restores.forget_ignored(parent_inode, os.fsdecode(name))
            return
        await self.restores.remove(os.fsdecode(name))

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not self._in_restore_tree(parent_inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        self.restores.check_writer(ctx.uid, "restore/")
        self.restores.forget_ignored(parent_inode, os.fsdecode(name))

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
        _refuse_long_name(name_new)
        ignored = self.restores.ignored
        if all(
            parent in ignored and ignored[parent].is_directory
            for parent in (parent_inode_old, parent_inode_new)
        ):
            self.restores.check_writer(ctx.uid, "restore/")
            if flags & (RENAME_EXCHANGE | RENAME_NOREPLACE):
                raise pyfuse3.FUSEError(errno.EINVAL)  # what rsync and tar never ask of ignored files
            self.restores.rename_ignored(
                parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new)
            )
            return
        if parent_inode_old != RESTORE_INODE or parent_inode_new != RESTORE_INODE:
            raise pyfuse3.FUSEError(
                errno.EPERM if RESTORE_INODE not in (parent_inode_old, parent_inode_new) else errno.EXDEV
            )
        self.restores.check_writer(ctx.uid, "restore/")
        await self.restores.rename(
            os.fsdecode(name_old),
            os.fsdecode(name_new),
            replace=not flags & RENAME_NOREPLACE,
            exchange=bool(flags & RENAME_EXCHANGE),
        )

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """A new file in restore/ starts a restore; the §3 refusals answer here."""
        _refuse_long_name(name)
        self._refuse_outside_restore(parent_inode, name, ctx)
        if parent_inode != RESTORE_INODE:  # under restore/restore: accepted, its bytes go nowhere
            self.restores.check_writer(ctx.uid, "restore/")
            node = self.restores.ignore(parent_inode, os.fsdecode(name), is_directory=False, mode=mode)
            return pyfuse3.FileInfo(fh=self.handles.add(None), direct_io=True), self._ignored_attributes(node)
        writer = await self.restores.begin(
            os.fsdecode(name), self._entry_mode(mode), ctx.uid, ctx.gid, ctx.pid
        )
        info = pyfuse3.FileInfo(fh=self.handles.add(writer), direct_io=True)
        return info, self._restore_attributes(writer.entry)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """A regular file in restore/, made before it is opened (``tar --xattrs``): as create
        does, but the restore starts at the open for writing. Anything else is refused."""
        _refuse_long_name(name)
        self._refuse_outside_restore(parent_inode, name, ctx)
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # no devices, pipes or sockets in restore/
        if parent_inode != RESTORE_INODE:
            self.restores.check_writer(ctx.uid, "restore/")
            node = self.restores.ignore(parent_inode, os.fsdecode(name), is_directory=False, mode=mode)
            return self._ignored_attributes(node)
        entry = self.restores.make_node(os.fsdecode(name), self._entry_mode(mode), ctx.uid, ctx.gid, ctx.pid)
        return self._restore_attributes(entry)

    def _refuse_outside_restore(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Files are made in restore/ only: in the root EROFS (said where they go), elsewhere EPERM."""
        if parent_inode == ROOT_INODE:
            raise self.restores.refuse_in_the_root(os.fsdecode(name), ctx.pid)
        if not self._in_restore_tree(parent_inode):
            raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Directories are refused, but for a whole-mount archive's own ``restore/``: accepted, ignored."""
        text = os.fsdecode(name)
        if parent_inode == ROOT_INODE:  # `cp -r backups/ MNT/`: said where snapshots go (review S20)
            raise self.restores.refuse_in_the_root(text, ctx.pid)
        if not self._in_restore_tree(parent_inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        self.restores.check_writer(ctx.uid, "restore/")
        if parent_inode == RESTORE_INODE and text != NESTED_DIRECTORY:
            raise self.restores.refuse_directory(text, ctx.pid)
        return self._ignored_attributes(
            self.restores.ignore(parent_inode, text, is_directory=True, mode=mode)
        )

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """No links anywhere: snapshots are the disks' own, and restore/ holds only snapshots."""
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = NAME_MAX
        return data


def _refuse_long_name(name: bytes) -> None:
    """A name longer than statfs's ``f_namemax`` is ENAMETOOLONG, as on any filesystem (the
    kernel leaves that check to FUSE filesystems)."""
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)


def _parse_file_name(name: str) -> tuple[str, str] | None:
    if name.endswith(SIDECAR_SUFFIX):
        return name[: -len(SIDECAR_SUFFIX)], SIDECAR
    if name.endswith(SNAPSHOT_SUFFIX):
        return name[: -len(SNAPSHOT_SUFFIX)], SNAPSHOT
    return None
