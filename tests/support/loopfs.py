"""Filesystems on loop devices for the point-in-time tier: a data path on XFS or btrfs, a disk's
filesystem mounted as Miren mounts it, a writer appending records to it.

Each context manager undoes everything on the way out, whatever happened:
writers are stopped, a filesystem a failing test left frozen is thawed, every
mount comes off (lazily if it must) and every loop device is detached. A
filesystem can also be mounted inside its own mount namespace (a container's),
held by a ``sleep`` process; killing that process takes the mount away.
Fails (never skips) when a tool is missing: this tier needs root and the
packages ``.ci/run`` installs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import records
from support.mounts import wait_for

FITHAW = 0xC0045878
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
TIMEOUT = 30


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found is not None, f"{name} is not installed; .ci/run installs it"
    return found


def run(*argv: str | Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """A command that must succeed, its output in the failure message."""
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed ({done.returncode}): {done.stderr}"
    return done


@dataclass
class LoopFilesystem:
    """A filesystem on a loop device; ``path`` reaches it from here (through /proc/PID/root when it is
    mounted in another namespace)."""

    backing: Path
    device: str
    mountpoint: Path
    holder: subprocess.Popen[bytes] | None = None
    attached: bool = True

    def take_down(self) -> None:
        """Thaw, unmount and detach now (as Miren detaches a disk); the block's end then does nothing."""
        if not self.attached:
            return
        self.attached = False
        thaw(self.path)
        if self.holder is not None:
            self.holder.kill()  # the last process of the namespace: its mounts go with it
            self.holder.wait(timeout=TIMEOUT)
        elif os.path.ismount(self.mountpoint):
            done = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, timeout=TIMEOUT)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=TIMEOUT)
        # Busy (a namespace still going away): -d then detaches it as soon as it is free (autoclear).
        run(tool("losetup"), "-d", self.device)

    @property
    def path(self) -> Path:
        if self.holder is None:
            return self.mountpoint
        return Path(f"/proc/{self.holder.pid}/root{self.mountpoint}")


def make_filesystem(backing: Path, fstype: str, size: int) -> None:
    """A sparse file of ``size`` bytes holding a new ``fstype`` filesystem."""
    with open(backing, "wb") as f:
        f.truncate(size)
    run(tool(MKFS[fstype][0]), *MKFS[fstype][1:], backing)


@contextlib.contextmanager
def loop_filesystem(
    backing: Path, mountpoint: Path, *, direct_io: bool = False, namespace: bool = False
) -> Iterator[LoopFilesystem]:
    """Attach ``backing`` to a loop device and mount it at ``mountpoint`` (in a private mount
    namespace of its own with ``namespace``); thawed, unmounted and detached afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    attach = [tool("losetup"), "-f", "--show", *(["--direct-io=on"] if direct_io else []), str(backing)]
    device = run(*attach).stdout.strip()
    mounted = LoopFilesystem(backing, device, mountpoint)
    try:
        if namespace:
            script = 'mount "$1" "$2" && echo ready && exec sleep 3600'
            mounted.holder = subprocess.Popen(
                [
                    tool("unshare"),
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    "sh",
                    device,
                    mountpoint,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert mounted.holder.stdout is not None
            line = mounted.holder.stdout.readline()
            assert line == b"ready\n", f"mount in a new namespace failed: {mounted.holder.stderr}"
        else:
            run(tool("mount"), device, mountpoint)
        yield mounted
    finally:
        mounted.take_down()


def thaw(path: Path) -> bool:
    """Thaw the filesystem at ``path``; True if it was frozen."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, f"cannot thaw {path}: {exc}"
        return False
    finally:
        os.close(fd)
    return True


class RecordWriter:
    """The records writer running against a mounted disk filesystem; stopped with :meth:`stop`."""

    def __init__(self, mounted: LoopFilesystem, summary: Path) -> None:
        self.mounted = mounted
        self.summary = summary
        inside = mounted.mountpoint / "records"  # as the writer's namespace sees it
        command = [sys.executable, records.__file__, str(inside), str(summary)]
        if mounted.holder is not None:
            command = [tool("nsenter"), "--target", str(mounted.holder.pid), "--mount", "--", *command]
        self.process = subprocess.Popen(command)

    @property
    def file(self) -> Path:
        return self.mounted.path / "records"

    def written(self) -> int:
        """Records on disk so far (whole ones)."""
        try:
            return self.file.stat().st_size // records.RECORD
        except FileNotFoundError:
            return 0

    def wait_for_records(self, count: int) -> None:
        wait_for(lambda: self.process.poll() is None and self.written() >= count, f"{count} records written")

    def stop(self) -> dict[str, Any]:
        """Stop the writer; its summary (``records``, ``longest_stall_s``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=TIMEOUT)
        assert code == 0, f"the records writer failed with {code}"
        summary: dict[str, Any] = json.loads(self.summary.read_text())
        return summary

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=TIMEOUT)


@contextlib.contextmanager
def record_writer(mounted: LoopFilesystem, summary: Path) -> Iterator[RecordWriter]:
    """A :class:`RecordWriter` for the block; killed on the way out if the test did not stop it."""
    writer = RecordWriter(mounted, summary)
    try:
        yield writer
    finally:
        writer.kill()
