"""The snapshots a mount serves, one *version* per image identity (SPEC §5).

A version is built once — its index comes from the persistent cache or from
one index pass, however many requests ask at the same time — and never
changes: when the image changes, the next request builds a new version and
the old one serves only the handles already open on it. Nothing here knows
about FUSE; the filesystem layer calls it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import trio

from mirenfs.disks.live import LoopBacking, devices_backing, loop_backings
from mirenfs.disks.pointintime import Consistency, CopyPolicy, PointInTime, take_point_in_time
from mirenfs.engine.framestore import FrameStore, room_above_kept
from mirenfs.engine.image import (
    FdImageSource,
    ImageIdentity,
    ensure_unchanged,
    make_directories,
    replace_private_file,
)
from mirenfs.engine.memory import give_back_free_memory
from mirenfs.engine.produce import (
    INDEX_FORMAT,
    FrameSpill,
    Settings,
    SnapshotIndex,
    SnapshotProducer,
    StaleIndexError,
    build_index,
    frame_cache_for,
    snapshot_meta,
)
from mirenfs.errors import ImageChangedError, LiveCheckError, MirenfsError, PointInTimeError, size_in_words
from mirenfs.format.header import Meta

log = logging.getLogger("mirenfs.snapshots")

POINT_IN_TIME_REUSE_S = 60.0  # a copy of a disk in use stands for it this long after its last read
INDEX_KEPT_UNUSED_S = 7 * 86400.0  # an index no disk's image has is removed at a start after this
IDLE_VERSION_SWEEP_S = 15.0  # how often versions holding space for nothing are looked for
LOOP_SCAN_REUSE_S = 1.0  # one look at the host's loop devices serves the lookups of this long
REFUSAL_MEMORY_S = 5.0  # a refused copy is not tried again for this long (one log line, one calibration)


def _still_its_image(version: DiskVersion) -> bool:
    """Whether the version's image is still the file at its path (not replaced, not removed)."""
    try:
        now = os.stat(version.image_path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (version.identity.dev, version.identity.ino)


def _not_their_images(versions: list[DiskVersion]) -> set[DiskVersion]:
    """Of ``versions``, those whose image is no longer the file at its path (one thread trip)."""
    return {version for version in versions if not _still_its_image(version)}


class IndexCache:
    """Persisted indexes, one file per image path, each holding the identity it describes.

    A file whose key does not match is stale and one that does not decode is
    corrupt: both are rebuilt, never trusted.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._save_failed = False
        make_directories(directory, 0o700)

    def path_for(self, image_path: str) -> str:
        digest = hashlib.sha256(os.path.abspath(image_path).encode()).hexdigest()[:32]
        return os.path.join(self.directory, f"{digest}.idx")

    def load(self, image_path: str, key: str, header: str = "") -> tuple[SnapshotIndex, str | None] | None:
        """(index, the snapshot's SHA-256 or None) kept for ``image_path`` in state ``key``. The
        SHA-256 is of a whole snapshot file, whose header also names the disk and its filesystem
        (``header``, from :func:`header_names`): one kept for other names is not given (trial:
        ``disk remove pg`` then ``disk add pg2`` over the same image served pg's checksum)."""
        path = self.path_for(image_path)
        try:
            entry = self._read(path, key)
        except StaleIndexError as exc:
            log.info(
                "index cache %s for %s is from another version (%s); rebuilding it", path, image_path, exc
            )
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("index cache %s for %s is corrupt (%s); rebuilding it", path, image_path, exc)
            return None
        if entry is None:
            return None
        sidecar, index = entry
        # "DIGEST CHECK NAMES"; "DIGEST CHECK" and "DIGEST" from older versions; "-": none kept
        written, _, rest = sidecar.partition(" ")
        check, _, names = rest.partition(" ")
        digest = None if written == "-" else written
        if digest is not None and len(digest) != 64:
            log.warning("index cache %s has a bad sidecar line; rebuilding it", path)
            return None
        if digest is not None and check and check != _sidecar_check(key, digest, names):
            # The index verified, but not the snapshot's SHA-256 kept beside it: computed again when
            # NAME.mirn.sha256 is next read, never served (trial N: `sha256sum -c` said FAILED).
            log.warning("index cache %s has a corrupt sidecar line; its checksum is computed again", path)
            digest = None
            self.save(image_path, key, index, None)
        elif digest is not None and names and names != header:
            digest = None  # the snapshot of the same image under another name: computed again
        elif digest is not None and not names:
            # An older mirenfs kept it without the names it stands for: maybe of the same image
            # under another disk's name (trial UP: pg2.mirn.sha256 said pg's checksum for good).
            # Computed again when NAME.mirn.sha256 is next read; the index is kept.
            digest = None
            self.save(image_path, key, index, None)
        elif index.read_format != INDEX_FORMAT:
            self.save(image_path, key, index, digest, header)  # an older mirenfs's: now cheaper to read
        return index, digest

    def load_basis(self, image_path: str) -> SnapshotIndex | None:
        """The last index kept for ``image_path``, whatever image state it describes: a pass
        resumes hashing only after chunks whose fingerprints it finds unchanged, so a stale
        index is a sound basis (and a damaged one is simply not used)."""
        try:
            entry = self._read(self.path_for(image_path), None)
        except (ValueError, KeyError, TypeError):
            return None
        return None if entry is None else entry[1]

    @staticmethod
    def _read(path: str, key: str | None) -> tuple[str, SnapshotIndex] | None:
        """(sidecar line, index) of a cache file; None when there is none, it is unreadable, or
        it holds another key than ``key`` (None takes any). Decoding errors are raised. The
        file's bytes are freed, and given back to the system, before this returns."""
        try:
            with open(path, "rb") as f:
                stored_key = f.readline().decode().rstrip("\n")
                if not stored_key:
                    raise ValueError("it is empty")
                if key is not None and stored_key != key:
                    return None
                sidecar = f.readline().decode().rstrip("\n")
                body = f.read()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise ValueError("its first lines are not text") from None
        except OSError as exc:
            log.warning("index cache %s is unreadable (%s); rebuilding it", path, exc.strerror or exc)
            return None
        size = len(body)
        try:
            return sidecar, SnapshotIndex.from_bytes(body)
        finally:
            del body
            give_back_free_memory(size)

    def prune(self, image_paths: Iterable[str], *, unused_for_s: float = INDEX_KEPT_UNUSED_S) -> list[str]:
        """Remove the indexes of images that are no disk's (``image_paths`` are the disks'), once
        unused for ``unused_for_s``: a disk removed, or restored under a new name, left its index
        for ever (trial S: 200 restores and removals, 200 files; a 1 TiB disk's is ~19 MB). The
        wait keeps those of a disk another catalogue or a short outage hides. Returns them."""
        keep = {os.path.basename(self.path_for(path)) for path in image_paths}
        removed = []
        now = time.time()
        with contextlib.suppress(OSError), os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name in keep or not entry.name.endswith(".idx"):
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > unused_for_s:
                        os.unlink(entry.path)
                        removed.append(entry.path)
        return removed

    def save(
        self, image_path: str, key: str, index: SnapshotIndex, sidecar: str | None, header: str = ""
    ) -> None:
        """Persist an index, and the SHA-256 of the snapshot whose header has the names
        ``header``; a failure (a full or read-only state directory) is logged once and
        otherwise ignored: the cache only saves a later index pass. The pass that built the
        index is over by now, so the memory it used is given back."""
        path = self.path_for(image_path)
        try:
            line = "-" if sidecar is None else f"{sidecar} {_sidecar_check(key, sidecar, header)} {header}"
            replace_private_file(path, [f"{key}\n{line}\n".encode(), *index.encoded()])
        except OSError as exc:
            if not self._save_failed:
                log.warning(
                    "cannot save snapshot indexes in %s (%s); snapshots are still served, but each "
                    "remount indexes them again",
                    self.directory,
                    exc.strerror,
                )
            self._save_failed = True
        else:
            self._save_failed = False
        finally:
            give_back_free_memory(index.nbytes)


def _what_is_read(taken: PointInTime) -> str:
    """The file a snapshot reads, as a failure names it: the image, or its point-in-time copy."""
    return f"point-in-time copy {taken.image.path}" if taken.is_copy else f"image {taken.image.path}"


@contextlib.contextmanager
def _reading_the_image(name: str, what: str, step: str) -> Iterator[None]:
    """An image that fails to read (EIO) is said with its disk, file and step (trial FD F3: the log
    said "open: [Errno 5] Input/output error"). A missing image (ENOENT) and a process out of
    descriptors (said where it is caught) go on as they are."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or exc.errno in (errno.EMFILE, errno.ENFILE):
            raise
        failed = MirenfsError(
            f"disk {name}: reading its {what} failed ({step}: {exc.strerror}), so its "
            "snapshot cannot be served now; check the disk that file is on"
        )
        failed.errno = exc.errno or errno.EIO
        raise failed from None


def _sidecar_check(key: str, digest: str, header: str) -> str:
    """What the sidecar line of an index cache file carries after the digest: the index has its
    own checksum, and a flipped digest would be served as NAME.mirn.sha256 on every remount."""
    text = f"{key}\n{digest}" if not header else f"{key}\n{digest}\n{header}"  # older lines: no names
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def header_names(name: str, filesystem: str) -> str:
    """What a snapshot's header says beyond its image's state, as one word for the index cache:
    the same image under another disk name or filesystem is another snapshot file."""
    return hashlib.sha256(f"{name}\0{filesystem}".encode()).hexdigest()[:16]


@dataclass(eq=False)
class DiskVersion:
    """One immutable snapshot of one disk: what ``NAME.mirn`` shows until the image changes.

    ``fd`` reads the image itself, or, for a disk in use, its point-in-time
    copy (``consistency`` says which): an anonymous file whose space returns
    when :meth:`close` closes it, once the version is superseded and unused.
    ``identity`` is the image's as of the snapshot's instant.
    """

    name: str
    filesystem: str
    image_path: str
    identity: ImageIdentity
    producer: SnapshotProducer
    cache_key: str
    fd: int
    sidecar: str | None = None
    handles: int = 0
    superseded: bool = False
    _sidecar_lock: trio.Lock = field(default_factory=trio.Lock)
    consistency: Consistency = Consistency.OFFLINE
    is_copy: bool = False  # fd is a point-in-time copy, not the image
    frozen_s: float | None = None  # how long the disk's filesystem stayed frozen for the copy
    # Its instant, then when its last handle closed (time.monotonic()): see _copy_still_current.
    last_used: float = field(default_factory=time.monotonic)

    @property
    def meta(self) -> Meta:
        return self.producer.layout.meta

    @property
    def size(self) -> int:
        return self.producer.size

    @property
    def spill_bytes(self) -> int:
        return self.producer.spill.bytes if self.producer.spill is not None else 0

    def close(self) -> None:
        self.producer.drop_frames()
        if self.producer.spill is not None:
            self.producer.spill.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LoopDevices:
    """The host's loop devices, looked at once for the lookups of a moment: every lookup of a
    disk asks whether a loop device backs its image, and one look costs a read (and an ioctl)
    per attached device, so `ls -l` of many disks beside many loop devices took seconds of
    worker time (review D22 D3). A device attached within ``LOOP_SCAN_REUSE_S`` of a look is
    seen at the next; a read of the image it changes meanwhile fails (EIO), as it would have."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # looked at from worker threads
        self._looked_at = -LOOP_SCAN_REUSE_S
        self._backings: list[LoopBacking] | None = None  # None: /sys could not be read

    def backing(self, image_path: str) -> bool | None:
        """Whether a loop device backs ``image_path`` (None: it cannot be told)."""
        with self._lock:
            now = time.monotonic()
            if now - self._looked_at >= LOOP_SCAN_REUSE_S:
                try:
                    self._backings = loop_backings()
                except LiveCheckError:
                    self._backings = None
                self._looked_at = now
            backings = self._backings
        if backings is None:
            return None
        try:
            return bool(devices_backing(image_path, backings))
        except LiveCheckError:
            return None


@dataclass
class IndexProgress:
    """An index pass in progress, for ``mirenfs status``."""

    done: int
    total: int


def sidecar_text(name: str, digest: str) -> bytes:
    """``NAME.mirn.sha256``: the ``sha256sum`` line for the snapshot file."""
    return f"{digest}  {name}.mirn\n".encode()


def sidecar_size(name: str) -> int:
    return len(sidecar_text(name, "0" * 64))


@dataclass
class _Build:
    """A version being built: later requests for the disk wait here and share its outcome."""

    identity: ImageIdentity  # the image's when the build began
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


class SnapshotService:
    """Builds and hands out disk versions; at most two index passes run at once."""

    def __init__(
        self,
        cache: IndexCache,
        settings: Settings,
        *,
        spill_directory: str,
        spill_limit: int,
        clone_directory: str | None = None,
        copy_policy: CopyPolicy | None = None,
        frame_store: FrameStore | None = None,
    ) -> None:
        self.cache = cache
        self.settings = settings
        # Frames by chunk fingerprint, kept across mounts; with it, a pass needs no spill file.
        self.frame_store = frame_store
        # Frames produced lately, for every disk's snapshot: bounded whatever the number of disks.
        self.frames = frame_cache_for(settings)
        self.frame_makers = trio.CapacityLimiter(settings.workers)  # for every snapshot read at once
        self.spill_directory = spill_directory
        self.spill_limit = spill_limit
        # Point-in-time copies of disks in use live here (same filesystem as the images, for reflinks).
        self.clone_directory = clone_directory or os.path.join(os.path.dirname(spill_directory), "clones")
        self.copy_policy = copy_policy or CopyPolicy()
        self.refused: dict[str, tuple[float, PointInTimeError]] = {}  # name: (when, why), for a while
        self.index_passes = 0
        self._spill_failed = False  # the last spill file could not be made (said once)
        self.progress: dict[str, IndexProgress] = {}
        self.queued: set[str] = set()  # passes started at mount (--index-at-mount) not yet running
        self._current: dict[str, DiskVersion] = {}
        self._building: dict[tuple[str, str], _Build] = {}  # (name, filesystem)
        # Two passes at a time: each keeps every core busy, and a second slot
        # keeps a huge disk's first pass from holding up every other new disk.
        self._pass_limit = trio.CapacityLimiter(2)
        self._loop_devices = LoopDevices()
        make_directories(spill_directory, 0o700)

    def current(self, name: str) -> DiskVersion | None:
        return self._current.get(name)

    async def version(
        self, name: str, image_path: str, filesystem: str, *, attached: bool = False
    ) -> DiskVersion:
        """The version matching the image as it is now, building it if needed.

        A disk in use changes all the time (a freeze alone writes to it): its
        point-in-time version stays current while the disk stays in use, as long as
        a handle reads it and ``POINT_IN_TIME_REUSE_S`` after (see _copy_still_current),
        instead of a freeze and an index pass per lookup.
        ``attached``: the store says the disk is in use, whatever the loop devices say.
        """
        identity = await trio.to_thread.run_sync(ImageIdentity.of, image_path)
        key = (name, filesystem)
        while True:
            existing = await self._matching(name, identity, filesystem, attached)
            if existing is not None:
                return existing
            building = self._building.get(key)
            if building is None:
                break
            # Another request builds this disk's version: share it. Also when the image changed
            # since that build began, as a disk in use does all the time (its freeze alone writes
            # to it): a lookup meanwhile (`ls -l` beside a `cat`) then gets that point-in-time
            # copy, not a second freeze and a second snapshot with another sidecar.
            await building.done.wait()
            if building.error is not None and building.identity == identity:
                raise building.error
        refused = self.refused.get(name)
        if refused is not None and time.monotonic() - refused[0] < REFUSAL_MEMORY_S:
            again = PointInTimeError(str(refused[1]), refused[1].why)
            again.reported = True  # logged once: no second freeze attempt or log line for a while
            raise again
        building = self._building[key] = _Build(identity)
        try:
            version = await self._build(name, image_path, filesystem, attached=attached)
            self._install(version)
        except Exception as exc:
            building.error = exc
            raise
        finally:
            self.progress.pop(name, None)  # building ends: ready (installed above) or failed
            building.done.set()
            del self._building[key]
        return version

    async def ready_version(
        self, name: str, image_path: str, filesystem: str, *, attached: bool = False
    ) -> DiskVersion | None:
        """The version matching the image as it is now if it is built, else None (without
        starting a pass): for answers that must not wait minutes for one."""
        identity = await trio.to_thread.run_sync(ImageIdentity.of, image_path)
        return await self._matching(name, identity, filesystem, attached)

    async def _matching(
        self, name: str, identity: ImageIdentity, filesystem: str, attached: bool
    ) -> DiskVersion | None:
        existing = self._current.get(name)
        if existing is None or existing.filesystem != filesystem:
            return None
        if existing.identity != identity:
            return existing if await self._copy_still_current(existing, attached) else None
        # A disk read offline may be put in use with its image unchanged (a loop device attached,
        # nothing written yet), but the next write may come at any moment and fail every read
        # of the image after it: a disk in use is read from a point-in-time copy (`losetup` of an
        # indexed disk still said ``offline``: trial T21 F8).
        # When it cannot be told, as the point-in-time rule has it: not known to be in use (review
        # D22 D2: taken for in use, the version was built again at every lookup).
        if existing.consistency is Consistency.OFFLINE and await self._in_use(
            existing, attached, unknown=False
        ):
            return None
        return existing

    async def _in_use(self, version: DiskVersion, attached: bool, *, unknown: bool) -> bool:
        """Whether the version's disk is in use now: the store says it is attached, or a loop
        device backs its image (``unknown`` when that cannot be told)."""
        if attached:
            return True
        backed = await trio.to_thread.run_sync(self._loop_devices.backing, version.image_path)
        return unknown if backed is None else backed

    async def _copy_still_current(self, version: DiskVersion, attached: bool) -> bool:
        """Whether a point-in-time version of a disk still in use may stand for it now."""
        if not version.is_copy:
            return False
        # While a handle reads it, and for a while after the last one closed: `rsync NAME.mirn
        # NAME.mirn.sha256` of a large disk must get the sidecar of the snapshot it just copied.
        if version.handles == 0 and time.monotonic() - version.last_used > POINT_IN_TIME_REUSE_S:
            return False
        return await self._in_use(version, attached, unknown=True)

    def _install(self, version: DiskVersion) -> None:
        self.refused.pop(version.name, None)
        old = self._current.get(version.name)
        self._current[version.name] = version
        if old is not None:
            if old.handles:  # a restore renamed a new image in while a backup copied the old one
                log.info(
                    "disk %s: a new snapshot replaces the one %d open handle(s) still read; they go on "
                    "with the one they began (whole after a restore, EIO if its image was written in "
                    "place), and %s.mirn.sha256 now holds the new one's checksum, so a backup copying "
                    "the pair must copy it again",
                    version.name,
                    old.handles,
                    version.name,
                )
            old.superseded = True
            self._close_if_unused(old)

    def forget(self, name: str) -> None:
        """The disk left the catalog: drop its version once no handle uses it."""
        old = self._current.pop(name, None)
        if old is not None:
            old.superseded = True
            self._close_if_unused(old)

    def acquire(self, version: DiskVersion) -> None:
        version.handles += 1
        version.producer.keep_frames()

    def release(self, version: DiskVersion) -> None:
        version.handles -= 1
        version.last_used = time.monotonic()
        if version.handles == 0:
            # Its frames were read ahead for readers that are gone: a copy that ended kept up to
            # 48 MiB until other reads evicted them (session 19). A later read takes them from
            # the frame store, or makes them again.
            version.producer.drop_frames()
        self._close_if_unused(version)

    def _close_if_unused(self, version: DiskVersion) -> None:
        if version.superseded and version.handles == 0:
            version.close()

    def close(self) -> None:
        for version in self._current.values():
            version.close()
        self._current.clear()

    async def let_go_of_idle_versions(self) -> None:
        """Drop the current versions that hold space for nothing, every ``IDLE_VERSION_SWEEP_S``:
        a point-in-time copy unread for ``POINT_IN_TIME_REUSE_S`` (it no longer stands for its
        disk: see _copy_still_current), and a version unread as long whose image was replaced
        or removed (its descriptor keeps the old file's blocks). Their disks' next request builds
        a version anew, as it would have. Without this, a nightly backup's copy of a disk in use
        kept its space, a whole disk's data on a data path without reflinks, until the next night."""
        while True:
            await trio.sleep(IDLE_VERSION_SWEEP_S)
            for version in await self._holding_space_for_nothing():
                # Still so after the look, which awaited a thread (a request may have come meanwhile):
                if self._current.get(version.name) is version and not version.handles:
                    self._let_go(version)
            self._let_go_of_idle_spills()

    def _let_go_of_idle_spills(self) -> None:
        """The spill file of a version unread for ``POINT_IN_TIME_REUSE_S``: it serves the read
        that follows an index pass, and held its data's compressed size on the data path, unseen
        by `du`, until the image changed or the mount stopped (trial S22 S1: one took a full data
        path's last space, and a restore there failed)."""
        now = time.monotonic()
        for version in self._current.values():
            if version.handles or not version.spill_bytes or now - version.last_used <= POINT_IN_TIME_REUSE_S:
                continue
            log.info(
                "disk %s: let go of the %s its index pass kept for the read after it (unread for %g s); "
                "later reads take frames from the frame store or compress them again",
                version.name,
                size_in_words(version.spill_bytes),
                POINT_IN_TIME_REUSE_S,
            )
            version.producer.drop_spill()

    async def _holding_space_for_nothing(self) -> list[DiskVersion]:
        """The current versions unread for ``POINT_IN_TIME_REUSE_S`` that are copies, or whose
        image is gone: every image is looked at in one trip to a worker thread (a host's
        thousand disks, every 15 s)."""
        now = time.monotonic()
        idle = [
            v for v in self._current.values() if not v.handles and now - v.last_used > POINT_IN_TIME_REUSE_S
        ]
        gone = await trio.to_thread.run_sync(_not_their_images, [v for v in idle if not v.is_copy])
        return [version for version in idle if version.is_copy or version in gone]

    def _let_go(self, version: DiskVersion) -> None:
        if version.is_copy:
            log.info(
                "disk %s: its point-in-time copy was not read for %g s; let go of it and of the space "
                "it held (its next read takes a new one)",
                version.name,
                POINT_IN_TIME_REUSE_S,
            )
        self.forget(version.name)

    def spill_in_use(self) -> int:
        return sum(v.spill_bytes for v in self._current.values() if v.fd >= 0)

    async def _take(self, name: str, image_path: str, *, attached: bool) -> PointInTime:
        """The image, or a point-in-time copy of a disk in use; a refusal is logged once and remembered."""
        try:
            taken = await trio.to_thread.run_sync(
                partial(
                    take_point_in_time,
                    name,
                    image_path,
                    attached=attached,
                    clone_directory=self.clone_directory,
                    policy=self.copy_policy,
                )
            )
        except PointInTimeError as exc:
            log.warning("%s", exc)
            exc.reported = True
            self.refused[name] = (time.monotonic(), exc)
            raise
        if taken.warning:
            log.warning("%s", taken.warning)
        if taken.consistency is not Consistency.OFFLINE:
            log.info("snapshot of disk %s taken %s", name, taken.describe())
        return taken

    async def _build(self, name: str, image_path: str, filesystem: str, *, attached: bool) -> DiskVersion:
        taken = await self._take(name, image_path, attached=attached)
        image = taken.image
        fd, identity = image.fd, taken.identity
        spill: FrameSpill | None = None
        try:
            # Off the event loop: it maps the image's data with lseek, long for a fragmented one.
            with _reading_the_image(name, _what_is_read(taken), "data map"):
                source = await trio.to_thread.run_sync(image.source, self.settings)
            # A copy is gone after a restart: its index is never worth loading (the suffix never matches).
            key = identity.cache_key(self.settings.key()) + (":point-in-time" if taken.is_copy else "")
            cached = None
            if not taken.is_copy:
                cached = await trio.to_thread.run_sync(
                    self.cache.load, image_path, key, header_names(name, filesystem)
                )
            if cached is not None:
                index, sidecar = cached
            else:
                single_read = taken.consistency is Consistency.LIVE
                with _reading_the_image(name, _what_is_read(taken), "index pass"):
                    index, spill = await self._index_pass(
                        name, source, single_read=single_read, image_path=image_path
                    )
                sidecar = None
                after = await trio.to_thread.run_sync(os.fstat, fd)
                if taken.is_copy:
                    pass  # nobody writes a copy: nothing to check, nothing worth caching
                elif ImageIdentity.from_stat(after) == identity:
                    await trio.to_thread.run_sync(self.cache.save, image_path, key, index, None)
                elif single_read:
                    log.warning("disk %s changed during its index pass; not caching that index", name)
                else:  # raises if the two reads may disagree; an image only renamed over is kept
                    ensure_unchanged(fd, identity, image_path)
            meta = snapshot_meta(name, filesystem, identity.size, identity.mtime_ns, index.checksum)
            producer = SnapshotProducer(
                source,
                self.settings,
                meta,
                index,
                cache=self.frames,
                spill=spill,
                store=self.frame_store,
                makers=self.frame_makers,
            )
        except BaseException as exc:
            if spill is not None:
                spill.close()
            os.close(fd)
            if isinstance(exc, ImageChangedError):  # the log and the status name the disk, not only its path
                raise ImageChangedError(f"disk {name}: {exc}") from None
            raise
        return DiskVersion(
            name,
            filesystem,
            image_path,
            identity,
            producer,
            key,
            fd,
            sidecar,
            consistency=taken.consistency,
            is_copy=taken.is_copy,
            frozen_s=taken.frozen_s,
        )

    async def _index_pass(
        self, name: str, source: FdImageSource, *, single_read: bool, image_path: str
    ) -> tuple[SnapshotIndex, FrameSpill | None]:
        async with self._pass_limit:
            limit = self.spill_limit - self.spill_in_use()
            room = await trio.to_thread.run_sync(room_above_kept, self.spill_directory)
            limit = limit if room is None else min(limit, room)  # never the data path's last space
            # With a frame store the pass's frames are kept there, for this read and later ones,
            # unless the store may not keep them all (a bound below the disk's data, a filesystem
            # short of space): then the read would compress them again, so they are spilled too.
            store = self.frame_store
            spilled = store is None or store.may_not_keep(source.data_before(source.size))
            spill = self._new_spill(limit) if limit > 0 and spilled else None
            progress = self.progress[name] = IndexProgress(0, source.size)
            self.index_passes += 1
            log.info("index pass for disk %s started (%d bytes)", name, source.size)

            def advance(done: int) -> None:
                progress.done = done

            try:
                index = await build_index(
                    source,
                    self.settings,
                    frame_sink=spill.append if spill is not None else None,
                    progress=advance,
                    single_read=single_read,
                    store=self.frame_store,
                    basis=await self._basis(name, image_path),
                )
            except BaseException:
                if spill is not None:
                    spill.close()
                raise
            # The progress stays until the version is installed (see version()): status must
            # never say "not built" between the end of the pass and the version being there.
            self._log_pass(name, index)
            return index, spill

    async def _basis(self, name: str, image_path: str) -> SnapshotIndex | None:
        """The index of the disk's version before this one (in memory, or as the cache kept it
        before a remount): hashing resumes after the chunks that still hold the same bytes
        (build_index checks that, chunk by chunk)."""
        if self.frame_store is None:
            return None  # without fingerprints a basis is of no use
        current = self._current.get(name)
        if current is not None:
            return current.producer.layout.index
        return await trio.to_thread.run_sync(self.cache.load_basis, image_path)

    def _log_pass(self, name: str, index: SnapshotIndex) -> None:
        data_chunks = index.frame_count - sum(index.zero_chunks)
        stored = self.frame_store is not None and index.compressed < data_chunks
        log.info(
            "index pass for disk %s done (checksum %s; %d of %d data chunks compressed%s; "
            "hashed from chunk %d of %d)",
            name,
            index.checksum,
            index.compressed,
            data_chunks,
            ", the others from the frame store" if stored else "",
            index.hashed_from,
            index.frame_count,
        )

    def _new_spill(self, limit: int) -> FrameSpill | None:
        try:
            spill = FrameSpill(self.spill_directory, limit)
        except OSError as exc:  # a full state directory: serve without keeping the pass's frames
            if not self._spill_failed:  # once, not at every pass
                log.warning("cannot keep index frames in %s (%s)", self.spill_directory, exc.strerror)
            self._spill_failed = True
            return None
        self._spill_failed = False
        return spill

    async def sidecar(self, version: DiskVersion) -> str:
        """SHA-256 of the whole snapshot file, computed once per version and cached. The version
        counts as in use meanwhile: reading a large disk's snapshot takes minutes, and an idle
        one is let go of (see :meth:`let_go_of_idle_versions`)."""
        self.acquire(version)
        try:
            return await self._sidecar_of(version)
        finally:
            self.release(version)

    async def _sidecar_of(self, version: DiskVersion) -> str:
        async with version._sidecar_lock:
            if version.sidecar is None:
                digest = hashlib.sha256()

                async def update(data: bytes) -> None:
                    await trio.to_thread.run_sync(digest.update, data)

                await version.producer.copy_to(update)
                version.sidecar = digest.hexdigest()
                if version.is_copy:
                    return version.sidecar  # a copy's index is never cached (see _build)
                await trio.to_thread.run_sync(
                    self.cache.save,
                    version.image_path,
                    version.cache_key,
                    version.producer.layout.index,
                    version.sidecar,
                    header_names(version.name, version.filesystem),
                )
            return version.sidecar
