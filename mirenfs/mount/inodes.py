"""The mount's inode and handle tables: which inode is which snapshot version, which handle is open on what.

Each snapshot version gets inodes of its own, so the kernel keeps a separate
page cache and size for it: a handle opened before the image changed goes
on reading the old snapshot's bytes, never a mix of old and new. Listing
inodes (what ``readdir`` hands out) stay stable per file name and stand for
whichever version is current. No pyfuse3 and no I/O here: plain tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mirenfs.engine.produce import SequentialReader
from mirenfs.mount.versions import DiskVersion

ROOT_INODE = 1  # pyfuse3.ROOT_INODE, as the FUSE protocol fixes it
RESTORE_INODE = ROOT_INODE + 1
SNAPSHOT = "snapshot"
SIDECAR = "sidecar"

Handle = TypeVar("Handle")


@dataclass
class Node:
    """A file in the root: one version of a disk's snapshot (``kind`` snapshot) or of its sidecar."""

    inode: int
    name: str
    kind: str
    version: DiskVersion


@dataclass
class OpenSnapshot:
    """An open ``NAME.mirn``: bound to the version it was opened on, read through one reader."""

    version: DiskVersion
    reader: SequentialReader


class InodeTable:
    """Inodes for snapshot versions and for listing entries, allocated from one counter."""

    def __init__(self) -> None:
        self._next_inode = RESTORE_INODE + 1
        self.nodes: dict[int, Node] = {}
        self._by_version: dict[tuple[str, DiskVersion], int] = {}
        self._listing: dict[int, str] = {}
        self._listing_inodes: dict[str, int] = {}
        self._known_to_kernel: set[int] = set()  # version inodes a lookup answered: FORGET drops them

    def allocate(self) -> int:
        self._next_inode += 1
        return self._next_inode - 1

    def node_for(self, version: DiskVersion, kind: str) -> Node:
        """The node of ``version``'s snapshot or sidecar, the same one every time."""
        inode = self._by_version.get((kind, version))
        if inode is None:
            self._drop_closed_versions_unknown_to_kernel()
            inode = self._by_version[(kind, version)] = self.allocate()
            self.nodes[inode] = Node(inode, version.name, kind, version)
        return self.nodes[inode]

    def handed_to_kernel(self, node: Node) -> None:
        """A lookup answered with ``node``'s inode: the kernel holds it until it sends FORGET."""
        self._known_to_kernel.add(node.inode)

    def _drop_closed_versions_unknown_to_kernel(self) -> None:
        """Nodes made for an open or a getattr of a listing inode (``cat`` of a disk not indexed
        yet) never reach the kernel, so no FORGET ever comes for them: once their version is
        closed they are dropped here, or each night's superseded index stayed for the mount's
        life (review: ~26 MB per TiB of disk per change)."""
        gone = [
            node
            for inode, node in self.nodes.items()
            if node.version.fd < 0 and inode not in self._known_to_kernel
        ]
        for node in gone:
            del self.nodes[node.inode]
            self._by_version.pop((node.kind, node.version), None)

    def listing_inode(self, file_name: str) -> int:
        """A stable inode for a ``readdir`` entry, by file name."""
        inode = self._listing_inodes.get(file_name)
        if inode is None:
            inode = self._listing_inodes[file_name] = self.allocate()
            self._listing[inode] = file_name
        return inode

    def listed_name(self, inode: int) -> str | None:
        return self._listing.get(inode)

    def forget(self, inode: int, is_current: Callable[[Node], bool]) -> None:
        """The kernel dropped ``inode``: forget it unless it is a current version's."""
        self._known_to_kernel.discard(inode)  # a current one's node stays, till its version closes
        node = self.nodes.get(inode)
        if node is not None and not is_current(node):
            del self.nodes[inode]
            self._by_version.pop((node.kind, node.version), None)


class HandleTable(Generic[Handle]):
    """Open file handles, numbered from 1."""

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = 1

    def add(self, handle: Handle) -> int:
        fh = self._next
        self._next += 1
        self._handles[fh] = handle
        return fh

    def get(self, fh: int) -> Handle | None:
        return self._handles.get(fh)

    def pop(self, fh: int) -> Handle | None:
        return self._handles.pop(fh, None)
