"""Which disks the mount shows: those on this node, not in ``deleting``, whose image exists (SPEC §5).

A bulk ``ls -l``, ``tar`` or ``rsync`` looks up every name; one listing of
the catalogue serves them all for a short while instead of a query per lookup
(on etcd the listing itself is a local copy kept current by a watch). A
catalogue that cannot be listed makes lookups fail (EIO), never "no such file".
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from mirenfs.disks.catalogs import DiskListing
from mirenfs.disks.model import DiskRecord, DiskState
from mirenfs.errors import MirenfsError

log = logging.getLogger(__name__)

CATALOG_TTL_S = 0.5  # how long one store listing serves lookups


@dataclass(frozen=True)
class CatalogEntry:
    """A disk the mount shows."""

    name: str
    image_path: str
    filesystem: str
    status: str

    @property
    def attached(self) -> bool:
        """The store says an application uses the disk: its snapshot comes from a point-in-time copy."""
        return self.status == DiskState.ATTACHED.value


class DiskCatalog(Protocol):
    """Where the mount learns which disks exist (the store, or Miren)."""

    def visible_disks(self) -> dict[str, CatalogEntry]: ...


class StoreCatalog:
    """A catalogue's listing (the store's, or the etcd catalogue's local copy) as the mount's
    catalog. Blocking: call from a worker thread."""

    def __init__(
        self,
        store: DiskListing,
        mountpoint: str | None = None,
        settle: Callable[[DiskRecord], DiskRecord] | None = None,
    ) -> None:
        self.store = store
        self._settle = settle  # a record a killed restore left describing an image that never came
        self._inside = None if mountpoint is None else os.path.abspath(mountpoint).rstrip("/") + "/"
        self._said_inside: set[str] = set()
        self._looked_inside: dict[str, bool] = {}  # image path -> whether it leads into the mount
        # This node's disks with no image under the data path at the last listing (a wrong data
        # path or node name shows none of them): `status` says so (trial W: "no disks on node X").
        self.without_image_here: list[str] = []

    def visible_disks(self) -> dict[str, CatalogEntry]:
        visible, without_image = {}, []
        for record in self.store.list_disks():
            disk = record.disk
            settled = disk.status not in (DiskState.DELETING, DiskState.PROVISIONING)
            if record.local and settled and not record.image_path:
                without_image.append(disk.name)
            if not record.local or disk.status == DiskState.DELETING or not record.image_path:
                continue
            # Nothing is looked at before this: a path inside the mount would be looked up
            # through the mount from its own request, and wait for good (review S2).
            if self._is_inside_the_mount(disk.name, record.image_path):
                continue
            image_path = record.image_path
            if self._settle is not None:
                try:
                    disk = self._settle(record).disk  # the same image; its size and filesystem set back
                except MirenfsError as exc:
                    log.warning("disk %s: %s", disk.name, exc)
            if os.path.isfile(image_path):
                visible[disk.name] = CatalogEntry(disk.name, image_path, disk.filesystem, disk.status.value)
            elif settled and not os.path.lexists(image_path):
                without_image.append(disk.name)
        self.without_image_here = sorted(without_image)
        return visible

    def _is_inside_the_mount(self, name: str, image_path: str) -> bool:
        """An image path under the mount point is never looked at: the lookup would come back to
        this mount and wait on its own answer, for ever (trial Q: every request hung). Said once."""
        if self._inside is None:
            return False
        inside = self._looked_inside.get(image_path)
        if inside is None:  # once per path: the walk lstats each part (review S: every listing)
            inside = self._looked_inside[image_path] = _leads_inside(image_path, self._inside)
        if not inside:
            return False
        if name not in self._said_inside:
            self._said_inside.add(name)
            log.warning(
                "disk %s is not shown: its image %s lies inside this mount, which cannot read it "
                "through itself; register the image where it is (mirenfs disk remove %s, then mirenfs "
                "disk add %s --image PATH)",
                name,
                image_path,
                name,
                name,
            )
        return True


class CatalogView:
    """The catalog as the mount sees it: one listing reused for ``CATALOG_TTL_S`` seconds.

    ``on_gone`` hears of each disk that left the catalog, so its snapshot
    version can be let go.
    """

    def __init__(self, catalog: DiskCatalog, on_gone: Callable[[str], None]) -> None:
        self.catalog = catalog
        self._on_gone = on_gone
        self._listing: dict[str, CatalogEntry] = {}
        self._listed_at = -1.0
        self._lock = trio.Lock()

    @property
    def last_listing(self) -> dict[str, CatalogEntry]:
        """The most recent listing, without asking the catalog again."""
        return self._listing

    @property
    def listing_age_s(self) -> float | None:
        """How old :attr:`last_listing` is, in seconds; None before the first listing. For a
        catalogue that confirms its copy (etcd's watch), since it last did: the time since the
        last listing was asked for (an `ls`) is not how stale it is (trial W)."""
        if self._listed_at < 0:
            return None
        confirmed = getattr(getattr(self.catalog, "store", None), "confirmed_age_s", None)
        if isinstance(confirmed, float):
            return confirmed
        return time.monotonic() - self._listed_at

    async def disks(self, *, fresh: bool = False) -> dict[str, CatalogEntry]:
        async with self._lock:
            now = time.monotonic()
            if fresh or now - self._listed_at > CATALOG_TTL_S:
                listing = await trio.to_thread.run_sync(self.catalog.visible_disks)
                for gone in set(self._listing) - set(listing):
                    self._on_gone(gone)
                self._listing, self._listed_at = listing, now
            return self._listing


def _leads_inside(path: str, inside: str, *, links_left: int = 40) -> bool:
    """Whether ``path``, its symbolic links followed, lies under ``inside`` (a directory, ending
    in "/"), found without touching anything there: a look inside would wait on this mount
    itself (review C: an image registered through a link into the mount hung it for good)."""
    parts = [part for part in os.path.abspath(path).split("/") if part]
    current = "/"
    for index, part in enumerate(parts):
        candidate = os.path.join(current, part)
        if (candidate + "/").startswith(inside):
            return True
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
            target = os.readlink(candidate) if is_link else ""
        except OSError:
            return False  # not there (yet): nothing to follow
        if is_link:
            if links_left == 0:
                return False
            rest = os.path.join(os.path.join(current, target), *parts[index + 1 :])
            return _leads_inside(os.path.normpath(rest), inside, links_left=links_left - 1)
        current = candidate
    return False
