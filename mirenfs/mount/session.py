"""Running the mount: wiring, the FUSE session, signals, readiness, and a clean unmount."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import pyfuse3
import trio

from mirenfs.disks.manage import sweep_stale_staging
from mirenfs.disks.store import Store
from mirenfs.mount import notify
from mirenfs.mount.catalog import StoreCatalog
from mirenfs.mount.config import MountConfig
from mirenfs.mount.operations import MirenOperations
from mirenfs.mount.restoredir import RestoreDirectory
from mirenfs.mount.versions import IndexCache, SnapshotService

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024  # the most one FUSE read request carries (256 pages)


def build_operations(config: MountConfig, nursery: trio.Nursery) -> MirenOperations:
    """The operations of one mount, their background work running in ``nursery``."""
    store = Store(config.data_path)
    for path in sweep_stale_staging(config.data_path):
        log.info("removed %s, left over from an interrupted restore", path)
    cache = IndexCache(os.path.join(config.state_directory, "index"))
    service = SnapshotService(
        cache,
        config.settings,
        spill_directory=os.path.join(config.state_directory, "spill"),
        spill_limit=config.spill_limit,
    )

    def restores(allocate_inode: Callable[[], int]) -> RestoreDirectory:
        return RestoreDirectory(
            store, config.data_path, allow_overwrite=config.allow_overwrite, allocate_inode=allocate_inode
        )

    return MirenOperations(
        StoreCatalog(store), service, shared=config.shared, restores=restores, nursery=nursery
    )


async def serve(config: MountConfig, *, ready: Callable[[], None] | None = None) -> None:
    """Mount, call ``ready`` once the mount answers, serve until unmounted or signalled."""
    async with trio.open_nursery() as nursery:
        operations = build_operations(config, nursery)
        pyfuse3.init(operations, config.mountpoint, config.kernel_options())
        try:
            nursery.start_soon(_stop_on_signal)
            nursery.start_soon(_announce_ready, config, ready)
            await pyfuse3.main()  # until unmounted, or terminated by a signal
        finally:
            nursery.cancel_scope.cancel()  # read-ahead and the announcement end with the session
            notify.stopping(f"unmounting {config.mountpoint}")
            log.info("unmounting %s", config.mountpoint)
            pyfuse3.close(unmount=True)
            with trio.CancelScope(shield=True):
                await operations.restores.close()  # an unfinished restore is undone, not left half-done
            operations.service.close()


async def _announce_ready(config: MountConfig, ready: Callable[[], None] | None) -> None:
    # Answered by the session: never stat the mount from the thread that serves it.
    root = await trio.to_thread.run_sync(os.stat, config.mountpoint)
    _raise_read_ahead(root.st_dev)
    log.info("mounted %s (data path %s)", config.mountpoint, config.data_path)
    if ready is not None:
        ready()
    notify.ready(f"serving {config.mountpoint}")


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _raise_read_ahead(device: int) -> None:
    """Let the kernel read ahead up to 1 MiB per request instead of 128 KiB (root only)."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("cannot raise read-ahead through %s: %s", path, exc)
