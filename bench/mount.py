"""A ``mirenfs mount`` daemon for the mount figures.

``running_mount`` keeps a ``BenchMount`` (``mirenfs mount --foreground``) up for
a block of figures and always unmounts it; ``mounted_sample`` does so for the
sample added as a disk, which the mount figures in ``bench.figures`` share.
While the daemon runs, ``Context.daemon_pid`` names it, so its CPU counts as
the figure's own work, not as noise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.context import CHILD_ENV, CommandFailed, Context, process_cpu_seconds, run_command


class BenchMount:
    """`mirenfs mount --foreground` on a data path holding the sample as a disk."""

    def __init__(self, ctx: Context, data: Path, mountpoint: Path, extra: Sequence[str] = ()) -> None:
        self.ctx, self.data, self.mountpoint = ctx, data, mountpoint
        self.extra = list(extra)  # more `mirenfs mount` arguments (--catalog, --node)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log_file = open(self.data.parent / f"{self.mountpoint.name}.log", "ab")  # noqa: SIM115
        command = self.ctx.mirenfs_cmd(
            "mount", str(self.mountpoint), "--foreground", "--data-path", str(self.data), *self.extra
        )
        self.process = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=CHILD_ENV)
        self.ctx.daemon_pid = self.process.pid
        log_file.close()
        deadline = time.monotonic() + 60
        # Answering, not only mounted: until the daemon has answered its own readiness check, an
        # unmount finds the mount busy (the kernel mounts it before the daemon serves it).
        while not (os.path.ismount(self.mountpoint) and _answers(self.mountpoint / "restore")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed(f"mount of {self.mountpoint} failed; see {log_file.name}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is None:
            return
        deadline = time.monotonic() + 60
        while True:  # EBUSY while something still looks at the mount: try again, within a deadline
            unmount = ["fusermount3", "-u", str(self.mountpoint)]
            done = subprocess.run(unmount, capture_output=True, timeout=60)
            if done.returncode == 0 or not os.path.ismount(self.mountpoint):
                break
            if time.monotonic() > deadline:
                raise CommandFailed(f"cannot unmount {self.mountpoint}: {done.stderr.decode().strip()}")
            time.sleep(0.05)
        self.process.wait(timeout=60)
        self.process = None
        self.ctx.daemon_pid = None

    def restart(self, *, forget_index: bool) -> None:
        """Remount; ``forget_index`` also drops what a remount keeps (indexes and stored frames),
        so that the next read of a snapshot is truly cold."""
        self.stop()
        if forget_index:
            for kept in ("index", "frames"):
                shutil.rmtree(self.data / "mirenfs" / kept, ignore_errors=True)
        os.sync()
        self.start()

    def cpu_seconds(self) -> float:
        """The daemon's CPU seconds so far (all its threads)."""
        return process_cpu_seconds(self.process.pid if self.process is not None else None)

    def peak_rss_kib(self) -> int:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


@dataclass
class MountedSample:
    """The sample as disk ``name`` of a running mount: what the mount figures share."""

    mount: BenchMount
    name: str

    @property
    def data(self) -> Path:
        return self.mount.data

    @property
    def mountpoint(self) -> Path:
        return self.mount.mountpoint

    @property
    def restore_dir(self) -> Path:
        return self.mountpoint / "restore"

    @property
    def snapshot(self) -> Path:
        """The disk's snapshot file in the mount."""
        return self.mountpoint / f"{self.name}.mirn"


def _answers(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def add_disk(ctx: Context, data: Path, name: str, image: Path) -> None:
    run_command(
        ctx.mirenfs_cmd(
            "disk", "add", name, "--image", str(image), "--filesystem", "ext4", "--data-path", str(data)
        )
    )


def fresh_dir(ctx: Context, name: str) -> Path:
    """An empty scratch directory in the work dir."""
    path = ctx.temp_path(name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@contextmanager
def running_mount(ctx: Context, data: Path, mountpoint: Path, *extra: str) -> Iterator[BenchMount]:
    """A started mount of ``data`` on ``mountpoint``, stopped on the way out."""
    mount = BenchMount(ctx, data, mountpoint, extra)
    try:
        mount.start()
        yield mount
    finally:
        mount.stop()


@contextmanager
def mounted_sample(ctx: Context) -> Iterator[MountedSample]:
    """The sample added as a disk to a fresh data path, mounted."""
    data, mountpoint = fresh_dir(ctx, "mount-data"), fresh_dir(ctx, "mnt")
    name = ctx.image.stem  # as `backup --image` names it, so the bytes equal the CLI backup's
    add_disk(ctx, data, name, ctx.image)
    with running_mount(ctx, data, mountpoint) as mount:
        yield MountedSample(mount, name)
