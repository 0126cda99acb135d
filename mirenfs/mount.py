"""Running the mount: FUSE session, signals, readiness, and clean unmount."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from mirenfs import notify
from mirenfs.fs import MirenOperations, StoreCatalog
from mirenfs.produce import Settings
from mirenfs.restoredir import RestoreDirectory
from mirenfs.snapshots import IndexCache, SnapshotService
from mirenfs.store import Store, remove_stale_staging

log = logging.getLogger("mirenfs.mount")

DEFAULT_SPILL_LIMIT = 4 << 30
READ_AHEAD_KB = 1024  # the most one FUSE read request carries (256 pages)


@dataclass
class MountConfig:
    mountpoint: str
    data_path: str
    allow_overwrite: bool = False
    fuse_options: list[str] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    spill_limit: int = DEFAULT_SPILL_LIMIT

    @property
    def shared(self) -> bool:
        return "allow_other" in self.fuse_options

    @property
    def state_directory(self) -> str:
        """mirenfs's own files under the data path: index cache and spilled frames."""
        return os.path.join(self.data_path, "mirenfs")

    def kernel_options(self) -> set[str]:
        # The data path as the source, as in fstab, so `mount -a` sees the line is mounted.
        plain = self.data_path and not any(c in self.data_path for c in ", \t\n")
        options = {f"fsname={self.data_path if plain else 'mirenfs'}", "subtype=mirenfs", *self.fuse_options}
        if self.shared:
            options.add("default_permissions")  # with other users, the kernel checks modes
        return options


def build_operations(config: MountConfig) -> MirenOperations:
    store = Store(config.data_path)
    for path in remove_stale_staging(config.data_path):
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

    return MirenOperations(StoreCatalog(store), service, shared=config.shared, restores=restores)


async def serve(config: MountConfig, *, ready: Callable[[], None] | None = None) -> None:
    """Mount, call ``ready`` once the mount answers, serve until unmounted or signalled."""
    operations = build_operations(config)
    pyfuse3.init(operations, config.mountpoint, config.kernel_options())
    try:
        async with trio.open_nursery() as nursery:
            operations.nursery = nursery
            nursery.start_soon(_run_session, nursery)
            nursery.start_soon(_stop_on_signal)
            # Answered by the session above: never stat the mount from this thread.
            root = await trio.to_thread.run_sync(os.stat, config.mountpoint)
            _raise_read_ahead(root.st_dev)
            log.info("mounted %s (data path %s)", config.mountpoint, config.data_path)
            if ready is not None:
                ready()
            notify.ready(f"serving {config.mountpoint}")
    finally:
        notify.stopping(f"unmounting {config.mountpoint}")
        log.info("unmounting %s", config.mountpoint)
        pyfuse3.close(unmount=True)
        with trio.CancelScope(shield=True):
            await operations.restores.close()  # an unfinished restore is undone, not left half-done
        operations.service.close()


async def _run_session(nursery: trio.Nursery) -> None:
    await pyfuse3.main()
    nursery.cancel_scope.cancel()  # unmounted (or terminated): stop the other tasks too


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
