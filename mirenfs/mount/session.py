"""Running the mount: wiring, the FUSE session, signals, readiness, and a clean unmount."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import signal
from collections.abc import Callable, Iterator
from functools import partial

import pyfuse3
import trio

from mirenfs.disks.catalogs import (
    images_missing_here,
    images_no_disk_has,
    mount_listing,
    node_from,
    none_on_this_node,
)
from mirenfs.disks.live import read_mountinfo
from mirenfs.disks.manage import settle_a_killed_restore, sweep_what_killed_runs_left
from mirenfs.disks.model import DB_FILE_NAME, DiskRecord, holds_mirenfs_files, index_directory
from mirenfs.engine.framestore import FrameStore, frames_to_give_back
from mirenfs.engine.image import make_private_directory
from mirenfs.errors import MirenfsError, MountError
from mirenfs.mount import notify
from mirenfs.mount.catalog import CatalogEntry, StoreCatalog
from mirenfs.mount.config import MountConfig, refused_options_sentence
from mirenfs.mount.operations import MirenOperations
from mirenfs.mount.restoredir import RestoreDirectory
from mirenfs.mount.versions import IndexCache, SnapshotService

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

READ_AHEAD_KB = 1024  # the most one FUSE read request carries (256 pages)


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: a mount keeps each disk's image open
    once it was read, and the usual soft limit (1024, systemd's default for services) is less
    than a large host's disks, while the hard one (524288 there) is not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as nr_open:  # the most the kernel allows a process
            wanted = int(nr_open.read())
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    log.info("open files: limit raised from %d to %d (one per disk read)", soft, wanted)


def build_operations(config: MountConfig, nursery: trio.Nursery) -> MirenOperations:
    """The operations of one mount, their background work running in ``nursery``."""
    raise_open_file_limit()
    held_nothing = not holds_mirenfs_files(config.data_path)
    store = config.open_catalog()  # the data path's SQLite store, or the fleet's catalogue on etcd
    store.check()  # before the mount reports ready: refuse now rather than answer EIO later
    make_private_directory(config.state_directory)  # indexes and spilled frames describe disk contents
    nursery.start_soon(_at_session_end, partial(os.close, _claim_data_path(config)))
    for level, sentence in sweep_what_killed_runs_left(config.data_path, config.clone_directory, store):
        log.log(level, "%s", sentence)
    if held_nothing and config.node_name is None:
        # Trial Q: a typo that named an existing directory (/var/lib, not /var/lib/miren) mounted
        # an empty store there without a word.
        log.info(  # not a warning: a new host's first mount restores into an empty data path so
            "the data path %s held nothing of mirenfs (no disk store, no state), so this mount started "
            "a new one there: it shows no disks until one is added or restored; if you meant another "
            "directory, unmount and remove %s and %s",
            config.data_path,
            os.path.join(config.data_path, DB_FILE_NAME),
            config.state_directory,
        )
    records = store.list_disks()
    _say_if_this_hosts_disks_are_not_here(records, config)
    cache = IndexCache(index_directory(config.data_path))
    for path in cache.prune(record.image_path for record in records if record.image_path):
        log.info("removed %s, the saved index of an image no disk has (unused for a week)", path)
    frame_store = frame_store_of(config)
    service = SnapshotService(
        cache,
        config.settings,
        spill_directory=os.path.join(config.state_directory, "spill"),
        spill_limit=config.spill_limit,
        clone_directory=config.clone_directory,
        copy_policy=config.copy_policy,
        frame_store=frame_store,
    )

    def restores(allocate_inode: Callable[[], int]) -> RestoreDirectory:
        return RestoreDirectory(
            store,
            config.data_path,
            allow_overwrite=config.allow_overwrite,
            allocate_inode=allocate_inode,
            on_installed=service.forget,  # the replaced image and its old snapshot are let go at once
            mountpoint=config.mountpoint,
            make_room=(  # with the store off, the frames earlier mounts kept there (trial S22 S2)
                frame_store or frames_to_give_back(config.frame_store_directory, config.settings.key())
            ).give_back,
        )

    listing = mount_listing(store)  # on etcd: a local copy fed by a watch, so `ls` costs no request
    nursery.start_soon(_at_session_end, listing.close)  # ends the catalogue's watch, if any
    operations = MirenOperations(
        StoreCatalog(listing, config.mountpoint, settle=partial(settle_a_killed_restore, store)),
        service,
        shared=config.shared,
        restores=restores,
        nursery=nursery,
        catalog_name=config.catalog_name,
        node=config.node_name,
    )
    nursery.start_soon(operations.restores.retry_stranded)  # disks an outage left provisioning
    nursery.start_soon(service.let_go_of_idle_versions)  # copies of disks in use, replaced images
    return operations


def _say_if_this_hosts_disks_are_not_here(records: list[DiskRecord], config: MountConfig) -> None:
    """A wrong --node mounts fine and shows nothing: on etcd, say so when no disk is on this node
    (a warning when other nodes have disks; only a note when the catalogue is empty, as a new
    fleet's is). A wrong data path (or a node name two hosts share) mounts fine too and shows
    disks whose images are not there, and a catalogue wiped shows none of the images that are:
    say those as well."""
    orphans = images_no_disk_has(records, data_path=config.data_path)
    if orphans is not None:
        log.warning("%s", orphans)
    if config.node_name is not None:  # on SQLite every disk is this host's
        problem = none_on_this_node(records, url=config.catalog_name, node=config.node_name)
        if problem is not None:
            loud = records or orphans is not None
            (log.warning if loud else log.info)("%s; this mount shows no disks until one is", problem)
            return
    missing = images_missing_here(records, data_path=config.data_path)
    if missing is not None:
        log.warning("%s", missing)


MOUNT_LOCK = "mount.lock"  # in the state directory: every mount of the data path holds it shared


def _claim_data_path(config: MountConfig) -> int:
    """Say so when another mount already serves this data path. It is allowed (both show the
    same disks, and a restore of a disk through one makes the other refuse that disk while
    it runs), but it is more often a mistake: an fstab line and a manual mount, say."""
    fd = os.open(
        os.path.join(config.state_directory, MOUNT_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        node = f" as node {config.node_name}" if config.node_name else ""
        log.warning(
            "another mirenfs mount already serves data path %s; this one uses the disk catalogue %s%s: "
            "if the other uses the same, both show the same disks, and if not (mirenfs status shows "
            "each mount's), one of them is on the wrong catalogue or node (--catalog, --node)",
            config.data_path,
            config.catalog_name,
            node,
        )
    with contextlib.suppress(BlockingIOError):  # only a mount starting this instant holds it exclusively
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return fd


async def _at_session_end(cleanup: Callable[[], object]) -> None:
    """Runs ``cleanup`` when the session's nursery is cancelled: what the mount holds for its
    whole life (the catalogue's watch, the data path's mount lock) is let go then."""
    try:
        await trio.sleep_forever()
    finally:
        cleanup()


def frame_store_of(config: MountConfig) -> FrameStore | None:
    """The mount's frame store (-o frame_store_size=0: none); it reads its directory on first use."""
    if config.frame_store_limit <= 0:
        return None
    return FrameStore(config.frame_store_directory, config.frame_store_limit, config.settings.key())


class AnswersNobodyWaitsFor(logging.Filter):
    """pyfuse3 logs at ERROR an answer the kernel no longer takes ("fuse_release(): fuse_reply_*
    failed with No such file or directory"): a release the kernel sent as the mount went away,
    or an answer to a caller that was interrupted. Nothing is lost, so it is said at INFO, with
    why (trial K s19: a plain `fusermount3 -u` right after the readers ended logged it as an
    ERROR, which log alerting chases)."""

    _GONE = "fuse_reply_* failed with No such file or directory"

    def filter(self, record: logging.LogRecord) -> bool:
        said = record.getMessage()
        if record.levelno == logging.ERROR and said.endswith(self._GONE):
            record.msg = "%s (the kernel no longer waited for this answer: nothing was lost)"
            record.args = (said,)
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def quiet_answers_nobody_waits_for() -> None:
    """Once per process: pyfuse3's logger says those answers at INFO."""
    pyfuse3_log = logging.getLogger("pyfuse3")
    if not any(isinstance(f, AnswersNobodyWaitsFor) for f in pyfuse3_log.filters):
        pyfuse3_log.addFilter(AnswersNobodyWaitsFor())


async def serve(config: MountConfig, *, ready: Callable[[], None] | None = None) -> None:
    """Mount, call ``ready`` once the mount answers, serve until unmounted or signalled.

    A signal ends the session at once: requests in progress (an index pass, a
    restore) are cancelled rather than awaited, and a restore that was
    receiving is undone. Signals that arrive while stopping are only logged.
    """
    quiet_answers_nobody_waits_for()
    async with trio.open_nursery() as signals:
        stop = trio.CancelScope()
        # Listening before anything is mounted (it lives until the clean-up is over): a signal
        # during start-up unmounts cleanly too, never leaving a dead mount behind.
        await signals.start(_stop_on_signals, stop)
        try:
            with stop:
                await _serve_session(config, ready)
        finally:
            signals.cancel_scope.cancel()


async def _serve_session(config: MountConfig, ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        operations = build_operations(config, nursery)
        _init_session(operations, config)
        try:
            answered = trio.Event()
            nursery.start_soon(_announce_ready, config, operations, ready, answered)
            if config.index_at_mount:
                nursery.start_soon(_index_every_disk, operations)
            await pyfuse3.main()  # until unmounted, or cancelled by a signal
            if not answered.is_set():  # libfuse ended the session at the kernel's INIT: exit 0 would lie
                raise MountError(_ended_at_start(config.mountpoint))
        finally:
            nursery.cancel_scope.cancel()  # read-ahead and the announcement end with the session
            notify.stopping(f"unmounting {config.mountpoint}")
            log.info("unmounting %s", config.mountpoint)
            pyfuse3.close(unmount=True)
            with trio.CancelScope(shield=True):
                await operations.restores.close()  # an unfinished restore is undone, not left half-done
            operations.service.close()


def _init_session(operations: MirenOperations, config: MountConfig) -> None:
    """Start the FUSE session, turning libfuse's terse failures into what to do."""
    try:
        pyfuse3.init(operations, config.mountpoint, config.kernel_options())
    except RuntimeError as exc:
        operations.service.close()
        if "fuse_session_new" in str(exc):
            raise MountError(refused_options_sentence(config.fuse_options)) from None
        raise MountError(
            f"cannot mount at {config.mountpoint} ({exc}): mounting needs root, or /dev/fuse access "
            "and fusermount3 (Debian's fuse3 package); with -o allow_other, also user_allow_other "
            "in /etc/fuse.conf"
        ) from None


async def _index_every_disk(operations: MirenOperations) -> None:
    """``--index-at-mount``: the passes a first ``stat`` would wait for, started now (two at a
    time, as always); ``mirenfs status`` shows their progress."""
    try:
        disks = await operations.catalog.disks(fresh=True)
    except MirenfsError as exc:  # the catalogue went away since the mount checked it
        log.warning("the index passes were not started at mount: %s", exc)
        return
    log.info("starting the index passes of %d disks in the background", len(disks))
    async with trio.open_nursery() as passes:
        for entry in disks.values():
            passes.start_soon(_index_one, operations.service, entry)


async def _index_one(service: SnapshotService, entry: CatalogEntry) -> None:
    service.queued.add(entry.name)  # until its pass runs (status: "queued", not "not loaded")
    try:
        await service.version(entry.name, entry.image_path, entry.filesystem, attached=entry.attached)
    except Exception as exc:  # the first stat of that snapshot will say it again, to whoever asks
        if not (isinstance(exc, MirenfsError) and exc.reported):  # a refused copy has said why
            log.warning("the index pass of disk %s, started at mount, failed: %s", entry.name, exc)
    finally:
        service.queued.discard(entry.name)


def _mount_id(mountpoint: str, device: int) -> int | None:
    """This mount's id in /proc/self/mountinfo: the topmost mount at ``mountpoint`` with ``device``."""
    try:
        lines = read_mountinfo()
    except OSError:
        return None
    where, numbers = os.path.realpath(mountpoint), (os.major(device), os.minor(device))
    ours = [line.mount_id for line in lines if line.mountpoint == where and line.device == numbers]
    return ours[-1] if ours else None


def _ended_at_start(mountpoint: str, reason: str = "") -> str:
    return (
        f"FUSE ended the session at {mountpoint} as it started{reason}; "
        "its own message, if any, is above (an -o option it cannot honour?)"
    )


async def _announce_ready(
    config: MountConfig,
    operations: MirenOperations,
    ready: Callable[[], None] | None,
    answered: trio.Event,
) -> None:
    try:
        # Answered by the session: never stat the mount from the thread that serves it.
        root = await trio.to_thread.run_sync(os.stat, config.mountpoint)
    except OSError as exc:
        raise MountError(_ended_at_start(config.mountpoint, f" ({exc.strerror})")) from None
    answered.set()
    # How its files are known after umount -l (see openfiles.held_open).
    operations.restores.mount_id = await trio.to_thread.run_sync(_mount_id, config.mountpoint, root.st_dev)
    _raise_read_ahead(root.st_dev)
    catalog = config.catalog
    node = node_from(config.node)
    where = f", disk catalogue {catalog.text} as node {node}" if catalog and catalog.is_etcd else ""
    log.info("mounted %s (data path %s%s)", config.mountpoint, config.data_path, where)
    if ready is not None:
        ready()
    notify.ready(f"serving {config.mountpoint}")


_held_stops: list[int] = []  # stop signals that came while no session listened (see stop_signals_held)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """For the mount process's whole ``trio.run``: a stop signal that comes while the session's
    receiver does not listen is kept, not let kill the process (SIGTERM's default) or raise
    KeyboardInterrupt in the middle of the clean-up. Before the session listens, it stops the
    session as soon as it does; after the receiver closed (the end of a clean-up), the mount is
    down anyway; once the block ends, stop signals are ignored on the way out."""

    def keep(signum: int, _frame: object) -> None:
        _held_stops.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, keep)
    try:
        yield
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


async def _stop_on_signals(
    stop: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as received:
        task_status.started()
        if _held_stops:  # signalled before anything listened: stop before mounting
            log.info(
                "received %s before the mount started; not mounting", signal.Signals(_held_stops[0]).name
            )
            _held_stops.clear()
            stop.cancel()
        async for signum in received:
            name = signal.Signals(signum).name
            if stop.cancel_called:
                log.info("received %s; already unmounting", name)
                continue
            log.info("received %s; unmounting", name)
            # Cancel, not pyfuse3.terminate(): requests in progress (an index pass takes long)
            # are not waited for, and a signal before the session exists is safe too.
            stop.cancel()


def _raise_read_ahead(device: int) -> None:
    """Let the kernel read ahead up to 1 MiB per request instead of 128 KiB (root only)."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("cannot raise read-ahead through %s: %s", path, exc)
