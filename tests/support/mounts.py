"""Mounts and processes that are always taken down, and the one way tests wait.

- :func:`wait_for` polls with a deadline; no test sleeps a fixed time.
- :class:`Mount` runs ``mirenfs mount --foreground`` with its log in a file.
  :meth:`Mount.stop` unmounts and reaps the daemon first and only then checks
  the log: a line at WARNING or above, a traceback or a Python warning that
  the test did not declare with :meth:`Mount.expect_log` fails the test (the
  idea of s3ql's ``pytest_checklogs`` and ratarmount's ``RunRatarmount``).
- :class:`Teardown` undoes what a test started by other means (``mount -t``,
  the demo, a sandboxed service): every FUSE mount comes off, however stuck
  (fusermount3, then an abort through the fuse control filesystem and a lazy
  unmount), every process ends (SIGTERM, then SIGKILL).

Mount state is read from /proc/self/mountinfo, never by a stat of the mount
point: a stat of a hung mount would hang the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mirenfs.cli.mountinfo import mounts
from mirenfs.mount.status import STATE_XATTR

from support.runners import mirenfs_command

T = TypeVar("T")

FUSECTL = Path("/sys/fs/fuse/connections")
STOP_TIMEOUT = 20  # seconds for an unmount, or a daemon to exit after one


# ---- waiting ----------------------------------------------------------------


def wait_for(
    condition: Callable[[], T], what: str = "condition", timeout: float = 20.0, interval: float = 0.02
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---- what is mounted ----------------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    """One mount at a path, as /proc/self/mountinfo shows it."""

    mountpoint: str
    source: str
    fstype: str
    options: set[str]
    minor: int


def mounts_at(path: str | os.PathLike[str]) -> list[MountInfo]:
    """The mounts at ``path`` from /proc/self/mountinfo (never touches the mount itself), topmost last."""
    target = os.path.realpath(path)
    return [
        MountInfo(entry.mountpoint, entry.source, entry.fstype, set(entry.options.split(",")), entry.minor)
        for entry in mounts()
        if entry.mountpoint == target
    ]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """A FUSE mount is at ``path`` (answering or not)."""
    return any(m.fstype.startswith("fuse") for m in mounts_at(path))


def _abort_connection(minor: int) -> None:
    """Make a hung FUSE connection fail every request, so it can be unmounted."""
    if not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True, timeout=10)
    with contextlib.suppress(OSError):
        (FUSECTL / str(minor) / "abort").write_text("1")


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Remove every FUSE mount at ``path``, however stuck."""
    for _ in range(8):  # stacked mounts come off one by one
        fuse = [m for m in mounts_at(path) if m.fstype.startswith("fuse")]
        if not fuse:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=10)
        if len([m for m in mounts_at(path) if m.fstype.startswith("fuse")]) == len(fuse):
            _abort_connection(fuse[-1].minor)
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def restore_state(mountpoint: Path, file_name: str) -> str:
    """The outcome of ``restore/FILE_NAME`` as its ``user.mirenfs.state`` says it."""
    return os.getxattr(mountpoint / "restore" / file_name, STATE_XATTR).decode()


# ---- processes -------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has finished)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` from /proc/PID/status (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def deleted_files_held(pid: int, path: str | os.PathLike[str]) -> list[str]:
    """The descriptors of ``pid`` still open on ``path`` after it was replaced (``PATH (deleted)``)."""
    held = []
    fd_directory = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_directory):
        with contextlib.suppress(OSError):
            if os.readlink(fd_directory / fd) == f"{os.fspath(path)} (deleted)":
                held.append(fd)
    return held


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@dataclass
class Teardown:
    """Everything a test started, undone in reverse order whatever happened."""

    mountpoints: list[Path] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    callbacks: list[Callable[[], None]] = field(default_factory=list)

    def mount(self, path: Path) -> Path:
        self.mountpoints.append(path)
        return path

    def process(self, process: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self.processes.append(process)
        return process

    def run(self) -> None:
        for path in reversed(self.mountpoints):
            force_unmount(path)
        for process in reversed(self.processes):
            stop_process(process)
        for pid in self.pids:  # daemons that are not our children
            with contextlib.suppress(AssertionError):
                wait_for(lambda pid=pid: not pid_alive(pid), f"process {pid} to exit", timeout=10)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for callback in reversed(self.callbacks):
            callback()


# ---- the daemon's log --------------------------------------------------------------

# What a daemon's log must not show unless a test asked for it: a record at
# WARNING or above (``mirenfs: WARNING: …`` in the foreground,
# ``… mirenfs[PID]: ERROR: …`` when daemonized), a traceback, a Python
# warning (``RuntimeWarning: coroutine … was never awaited``) or an
# exception Python could only print (``Exception ignored in …``).
LOG_PROBLEM = re.compile(r"\b(?:WARNING|ERROR|CRITICAL): |^Traceback |\b\w+Warning: |^Exception ignored in")


def log_problems(text: str, expected: Iterable[re.Pattern[str]] = ()) -> list[str]:
    """The lines of ``text`` that show a problem none of the ``expected`` patterns matches."""
    allowed = list(expected)
    return [
        line
        for line in text.splitlines()
        if LOG_PROBLEM.search(line) and not any(pattern.search(line) for pattern in allowed)
    ]


# ---- the mount daemon ----------------------------------------------------------------


class Mount:
    """A ``mirenfs mount --foreground`` process; always unmounted and reaped by :meth:`stop`,
    which then fails on a log line the test did not declare with :meth:`expect_log`."""

    def __init__(
        self, mountpoint: Path, data_path: Path, *extra: str, expect_log: Iterable[str] = ()
    ) -> None:
        self.mountpoint = mountpoint
        self.data_path = data_path
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_path.parent / f"{mountpoint.name}-mount.log"
        self.expected: list[re.Pattern[str]] = []
        self._checked = len(self.log())  # characters of the log already checked (kept across restarts)
        self.expect_log(*expect_log)

    def expect_log(self, *patterns: str) -> Mount:
        """Allow the warnings this test provokes on purpose: each a regex searched in a log line.

        A traceback is allowed only by a pattern that matches its ``Traceback`` line.
        """
        self.expected += [re.compile(pattern) for pattern in patterns]
        return self

    def start(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            [
                *mirenfs_command(),
                "mount",
                str(self.mountpoint),
                "--foreground",
                "--data-path",
                str(self.data_path),
                *self.extra,
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()

        def mounted() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"mount exited with {self.process.returncode}: {self.log()}")
            return os.path.ismount(self.mountpoint)  # a stat answered: the daemon serves

        wait_for(mounted, what=f"{self.mountpoint} to be mounted")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """Unmount and wait for the daemon, aborting a hung connection if it comes to that; then
        check the log. No mount is left behind, whether the daemon or the log check fails."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        try:
            # EBUSY while the daemon's own readiness check (a stat of its root) is in flight right
            # after the start: unmount again until it goes, within the deadline.
            deadline = time.monotonic() + STOP_TIMEOUT
            while is_mounted(self.mountpoint) and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(
                        ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=STOP_TIMEOUT
                    )
                if is_mounted(self.mountpoint):
                    time.sleep(0.05)
            try:
                code = process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                force_unmount(self.mountpoint)
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"the mount process did not exit after unmount: {self.log()}") from None
        finally:
            force_unmount(self.mountpoint)  # a killed or hung daemon leaves its mount: take it off
        self.check_log()
        return code

    def check_log(self) -> None:
        """Fail on what the daemon logged since the last check that the test did not expect."""
        text = self.log()
        problems = log_problems(text[self._checked :], self.expected)
        self._checked = len(text)
        assert not problems, (
            f"the mount daemon at {self.mountpoint} logged what the test did not expect "
            f"(declare it with expect_log) in {self.log_path}:\n" + "\n".join(problems)
        )
