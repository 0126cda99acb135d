"""``mirenfs mount`` (in the foreground for systemd and tests, or as a daemon that returns once
live) and ``mirenfs status`` (what a running mount is doing).

``status`` asks the mount itself: the root of a mirenfs mount answers the
extended attribute ``user.mirenfs.status`` with JSON (per disk the index
state and progress, and the restores).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import select
import stat
import subprocess
import sys
import syslog
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from mirenfs.cli.common import add_data_path_option, catalog_from, human_size, resolve_data_path, say
from mirenfs.cli.logfold import fold_repeats, write_held_back
from mirenfs.cli.mountinfo import (
    FSTYPE,
    MountEntry,
    mirenfs_mounts,
    mount_at,
    mount_holding,
    refuse_if_mirenfs_mount,
)
from mirenfs.disks.catalogs import catalog_spec_from, node_from
from mirenfs.disks.manage import sweep_what_killed_runs_left
from mirenfs.disks.model import Catalog, holds_mirenfs_files
from mirenfs.disks.store import Store
from mirenfs.engine.aio import meaningful_error
from mirenfs.engine.image import make_private_directory
from mirenfs.engine.memory import use_few_heaps
from mirenfs.errors import MirenfsError, one_line
from mirenfs.mount.config import (
    MOUNT_SWITCHES,
    MountConfig,
    check_option_values,
    clone_directory_of,
    copy_policy,
    fuse_options,
)
from mirenfs.mount.status import STATUS_XATTR

log = logging.getLogger(__name__)

# How long `mirenfs status` waits for a mount: it lists its catalogue first, which on an etcd in
# trouble takes up to one 2 s deadline per endpoint before it answers from its last listing.
STATUS_TIMEOUT_S = 15.0
MOUNT_PROBE_TIMEOUT_S = 5.0  # a mount over a mirenfs mount asks whether its daemon answers
LOG_FORMAT = "%(asctime)s mirenfs[%(process)d]: %(levelname)s: %(message)s"


def register(commands: Any) -> None:
    mount = commands.add_parser("mount", help="mount the disks as NAME.mirn snapshot files")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_data_path_option(mount)
    mount.add_argument(
        "--foreground", "-f", action="store_true", help="stay in the foreground (logs on stderr)"
    )
    mount.add_argument(
        "--allow-overwrite", action="store_true", help="let restore/ replace the image of an existing disk"
    )
    mount.add_argument(
        "--index-at-mount",
        action="store_true",
        help="start every disk's index pass in the background at mount time (see mirenfs status), "
        "instead of at the first stat or read of its snapshot",
    )
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT,…",
        help=(
            "mount options: mirenfs's own (allow_overwrite, index_at_mount, frame_store_size=SIZE, "
            "freeze_budget=SECONDS, live_reads; see the README) and FUSE's (allow_other, …)"
        ),
    )
    mount.set_defaults(handler=cmd_mount)

    status = commands.add_parser(
        "status", help="show what a mount is doing: index state and progress per disk, restores"
    )
    status.add_argument(
        "mountpoint", nargs="?", metavar="MOUNTPOINT", help="default: every mirenfs mount of this host"
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the mount's status JSON (without MOUNTPOINT: an object keyed by mount point)",
    )
    status.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=STATUS_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for each mount's answer (default {STATUS_TIMEOUT_S:.0f})",
    )
    status.set_defaults(handler=cmd_status)

    cleanup_help = (
        "after a mount or backup was killed: thaw the filesystems it left frozen, remove its "
        "copies, staging files and the disks its restores were creating (a mount's start does this "
        "too; the systemd unit runs it on stop)"
    )
    cleanup = commands.add_parser(
        "cleanup",
        help=cleanup_help,
        description=f"{cleanup_help[0].upper()}{cleanup_help[1:]}. Needs root. What a running mount or "
        "backup holds is left alone. Exits 1 if a filesystem could not be thawed.",
    )
    add_data_path_option(cleanup)
    cleanup.set_defaults(handler=cmd_cleanup)


def config_from(args: argparse.Namespace) -> MountConfig:
    refuse_a_mirenfs_mount_that_does_not_answer(args.mountpoint)  # before any stat could hang
    refuse_if_mirenfs_mount(args.mountpoint)
    mountpoint = os.path.realpath(args.mountpoint)  # /proc/*/fd links name it so (review: a symlink)
    try:
        info: os.stat_result | None = os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            dead = mount_holding(mountpoint)  # the mount point itself, or a directory above it
            raise _dead_mount_error(dead.mountpoint if dead is not None else mountpoint) from None
        info = None
    if info is None:
        raise MirenfsError(
            f"mount point {mountpoint} does not exist; create it first (mkdir -p {mountpoint})"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise MirenfsError(f"mount point {mountpoint} is not a directory; mount on a directory")
    refuse_hiding_another_mount(mountpoint)
    catalog, node = catalog_spec_from(args.catalog), node_from(args.node)  # refused now if malformed
    data_path = resolve_data_path(args.data_path)
    refuse_covering_the_data_path(mountpoint, data_path)
    options = fuse_options(args.options)  # the same filter the mount.mirenfs helper applies
    # mirenfs's own switches may come as -o options too (fstab): take them out before FUSE sees them
    allow_overwrite = args.allow_overwrite or "allow_overwrite" in options
    index_at_mount = args.index_at_mount or "index_at_mount" in options
    options = [opt for opt in options if opt not in MOUNT_SWITCHES]
    policy, options = copy_policy(options)  # freeze_budget=SECONDS, live_reads: mirenfs's, not FUSE's
    return MountConfig(
        mountpoint,
        data_path,
        allow_overwrite=allow_overwrite,
        fuse_options=options,
        copy_policy=policy,
        index_at_mount=index_at_mount,
        catalog=catalog,
        node=node,
    )


def refuse_a_mirenfs_mount_that_does_not_answer(given: str) -> None:
    """A mount point on a mirenfs mount whose daemon was killed or stopped is refused with what to
    do. Found in mountinfo as spelt and asked from a child: a stat of a stopped daemon's mount
    waits in the kernel for ever, and `mirenfs mount` over one hung."""
    holding = mount_holding(given)
    if holding is None or holding.fstype != FSTYPE:
        return
    try:
        _getxattr_within(holding.mountpoint, STATUS_XATTR, MOUNT_PROBE_TIMEOUT_S)
    except TimeoutError:
        raise MirenfsError(
            f"the mirenfs mount at {holding.mountpoint} does not answer within {MOUNT_PROBE_TIMEOUT_S:g} s: "
            "its daemon is stopped or hung (`kill -CONT` it if it was stopped, or stop it and run "
            f"fusermount3 -u {holding.mountpoint}); mount on a directory of its own"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount_error(holding.mountpoint) from None


def _dead_mount_error(where: str) -> MirenfsError:
    return MirenfsError(
        f"a dead mount is left at {where} (its daemon was killed); run: fusermount3 -u {where}, "
        "then mount again (the new mount also thaws a filesystem the killed one left frozen)"
    )


def refuse_hiding_another_mount(mountpoint: str) -> None:
    """A mount point that is another filesystem's (trial Q: the live filesystem of a disk in use,
    whose freezes then failed with a wrong reason) would hide it: refused, but for the autofs
    mount systemd's automount stands there (a non-empty one: see :func:`warn_if_not_empty`)."""
    holding = mount_holding(mountpoint)
    real = os.path.realpath(mountpoint)
    if holding is not None and holding.mountpoint == real and holding.fstype != "autofs":
        raise MirenfsError(
            f"mount point {mountpoint} is where a {holding.fstype} filesystem ({holding.source}) is mounted: "
            "a mount there would hide it; mount on an empty directory of its own"
        )


def warn_if_not_empty(mountpoint: str) -> None:
    """A non-empty mount point hides its files while mounted: said, not refused."""
    with contextlib.suppress(OSError), os.scandir(mountpoint) as entries:
        if any(True for _ in entries):
            log.warning(
                "mount point %s is not empty: its files are hidden while mirenfs is mounted there", mountpoint
            )


def refuse_covering_the_data_path(mountpoint: str, data_path: str) -> None:
    """A mount on the data path, on a directory above it, or on one inside it (trial Q: on its
    managed images' directory) would hide the disks' images, the store or mirenfs's state from
    the daemon itself: a lookup would wait on its own answer, for ever, and every other mount of
    the data path with it."""
    covered, over = os.path.realpath(data_path), os.path.realpath(mountpoint)
    if covered == over or covered.startswith(over.rstrip("/") + "/"):
        where = "is the mount point" if covered == over else f"lies inside the mount point {mountpoint}"
        raise MirenfsError(
            f"the data path {data_path} {where}: the mount would hide the disks' images and its own "
            "store from itself; mount on a directory outside the data path"
        )
    if over.startswith(covered.rstrip("/") + "/"):
        raise MirenfsError(
            f"the mount point {mountpoint} lies inside the data path {data_path}: the mount could hide "
            "disk images or its own state there from itself; mount on a directory outside the data path"
        )


def serve_mount(config: MountConfig, *, ready: Callable[[], None] | None = None) -> None:
    """Serve the mount until it is unmounted or signalled.

    The one place the CLI loads the FUSE layer, and lazily: every other
    command (``disk``, ``status``, ``backup``, …) must run without pyfuse3.
    """
    from mirenfs.mount.session import serve, stop_signals_held  # lazy on purpose: see the docstring

    # A further Ctrl-C or SIGTERM while the mount stops, or once it is down and this process is on
    # its way out (the demo removes its files first), must not turn a clean end into a death by
    # signal: signals held from before trio starts until the process leaves.
    use_few_heaps()  # before any thread: its blocks would stay in a heap of its own
    with stop_signals_held():
        trio.run(partial(serve, config, ready=ready))


def cmd_mount(args: argparse.Namespace) -> int:
    config = config_from(args)
    # -o options libfuse would refuse, first: a typo got the second-mount warning, said on the
    # way to the mount that refused it (trial T21 F9).
    check_option_values(config.fuse_options)
    # Checked here as well as in the daemon, before the fork: the daemon logs into the data path,
    # so a read-only or damaged one must be named by this process, in one line, not by a daemon's
    # raw error.
    config.open_catalog().check()  # the store, or the etcd catalogue: reachable, with a quorum
    warn_if_not_empty(config.mountpoint)  # once the refusals passed (trial R s18, review S4 F11)
    if args.foreground:
        fold_log_repeats()
        try:
            serve_mount(config)  # checks the store again as it mounts
        finally:
            write_held_back_repeats()
        return 0
    return _daemonize(config, args.log_level)


def _daemonize(config: MountConfig, log_level: str) -> int:
    """Fork a daemon and return once it reports the mount live, or with its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reported:
            message = reported.read().decode(errors="replace")
        while message.startswith(_STARTUP_WARNING):
            warning, _, message = message[len(_STARTUP_WARNING) :].partition("\n")
            say(f"mirenfs: WARNING: {warning}", file=sys.stderr)
        if message == "ready":
            return 0
        os.waitpid(pid, 0)
        say(f"mirenfs: error: {message or 'the mount process died before it was ready'}", file=sys.stderr)
        return 1
    os.close(read_end)
    code = 1
    report = _Report(write_end)
    try:
        os.setsid()
        _detach_stdio(config, log_level)
        logging.getLogger().addHandler(_StartupWarnings(report))
        serve_mount(config, ready=partial(report.finish, "ready"))
        code = 0
    except BaseException as exc:
        error = meaningful_error(exc)
        log.error("mount failed: %s", error)
        report.finish(str(error))  # a failure after readiness is the log's alone
    finally:
        write_held_back_repeats()
        logging.shutdown()
        os._exit(code)


_STARTUP_WARNING = "\x1ewarning:"  # what the daemon's report pipe carries before "ready" or the error


class _Report:
    """The daemon's pipe to the command that started it: warnings, then "ready" or the error. Every
    write and the one close are under a lock, so no thread writes after the end (the parent would
    not take "ready" followed by a warning), nor into whatever file reused the descriptor's number
    (review S4 F9)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def send(self, text: str) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.write(self._fd, text.encode(errors="replace"))

    def finish(self, text: str) -> None:
        with self._lock:
            if self._fd is None:
                return
            with contextlib.suppress(OSError):
                os.write(self._fd, text.encode(errors="replace"))
            os.close(self._fd)
            self._fd = None


class _StartupWarnings(logging.Handler):
    """Until the mount is ready, its warnings reach the terminal that started it as well as its log
    (trial R s18: "another mirenfs mount already serves data path …" went to mount.log alone, and
    the person who made that mistake saw nothing). Warnings only: a failure is reported as such."""

    def __init__(self, report: _Report) -> None:
        super().__init__(logging.WARNING)
        self._report = report

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            self._report.send(f"{_STARTUP_WARNING}{one_line(record.getMessage())}\n")


def _detach_stdio(config: MountConfig, log_level: str) -> None:
    """The daemon's log is its stdout and stderr too: what libfuse prints, a traceback, and the
    thaw watchdog's line (it outlives a killed daemon) reach the log, not /dev/null."""
    log_path = os.path.join(config.state_directory, "mount.log")
    make_private_directory(config.state_directory)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(null)
    os.close(log_fd)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = MountLog(log_path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    fold_log_repeats()


_SYSLOG_PRIORITY = {
    logging.DEBUG: syslog.LOG_DEBUG,
    logging.INFO: syslog.LOG_INFO,
    logging.WARNING: syslog.LOG_WARNING,
    logging.ERROR: syslog.LOG_ERR,
    logging.CRITICAL: syslog.LOG_CRIT,
}


class MountLog(logging.FileHandler):
    """``mount.log``, on the data path. A line that cannot be written there (the data path is
    full: when its log matters most) goes to syslog, the journal on most hosts, whole, rather
    than be lost or cut off (trial R)."""

    def handleError(self, record: logging.LogRecord) -> None:
        try:
            syslog.openlog("mirenfs", syslog.LOG_PID, syslog.LOG_DAEMON)
            priority = _SYSLOG_PRIORITY.get(record.levelno, syslog.LOG_INFO)
            where = f"not written to {self.baseFilename}"
            syslog.syslog(priority, f"{record.levelname}: {record.getMessage()} ({where})")
        except Exception:  # no syslog either: nothing more can be done for this line
            super().handleError(record)


def fold_log_repeats() -> None:
    """A mount's log says a line every request may write once a minute, with a count (cli.logfold)."""
    for handler in logging.getLogger().handlers:
        fold_repeats(handler)


def write_held_back_repeats() -> None:
    """At the end of a mount: the counts of repeats still held back, so none goes unsaid."""
    for handler in logging.getLogger().handlers:
        write_held_back(handler)


# ---- status -------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    """``--timeout``: seconds, more than 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0 (e.g. 5 or 0.5)")
    return seconds


def read_status(entry: MountEntry, *, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """Ask the mount for its status (the root's ``user.mirenfs.status``), giving up after
    ``timeout_s``: a stopped or hung daemon leaves the request waiting in the kernel for ever."""
    where = entry.mountpoint
    try:
        raw = _getxattr_within(where, STATUS_XATTR, timeout_s)
    except TimeoutError:
        raise MirenfsError(
            f"the mirenfs mount at {where} does not answer within {timeout_s:g} s: its daemon is "
            "stopped or hung (see its log, and `kill -CONT` it if it was stopped)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            # Not fusermount3 alone: a freeze the killed daemon held stays until a cleanup or a
            # mount of the data path thaws it, and the host's writers hang (trial T21 F3).
            raise MirenfsError(
                f"the mirenfs mount at {where} does not answer (its process is gone); run "
                f"`mirenfs cleanup --data-path {entry.source}`: it unmounts it, thaws a filesystem "
                "it left frozen and removes what it left"
            ) from None
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            raise MirenfsError(
                f"the mirenfs mount at {where} reports no status (is it an older mirenfs?)"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise MirenfsError(
                f"cannot read the status of {where}: the mount is private to its owner; run as that user"
            ) from None
        raise MirenfsError(f"cannot read the status of {where}: {exc.strerror}") from None
    try:
        status = json.loads(raw)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        raise MirenfsError(f"the mirenfs mount at {where} answered a status that is not a JSON object")
    if entry.source.startswith("/"):  # what the text output's header shows, for scripts too
        status.setdefault("data_path", entry.source)
    return status


def _getxattr_within(path: str, name: str, timeout_s: float) -> bytes:
    """``os.getxattr`` from a child process, TimeoutError after ``timeout_s``. A request that a
    stopped or hung daemon never answers keeps its caller in the kernel, beyond even SIGKILL, so
    the question is asked by a child that can be left behind (init reaps it once the mount goes)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: ask, hand the answer (or the errno) over, and end
        try:
            os.close(read_end)
            # Left behind, it must not hold the command's output open: `mirenfs status | cat`
            # would wait for it as long as the daemon does.
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            try:
                answer = b"=" + os.getxattr(path, name)
            except OSError as exc:
                answer = b"!" + str(exc.errno).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(answer)
        finally:
            os._exit(0)
    os.close(write_end)
    received = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                raise TimeoutError
            piece = os.read(read_end, 65536)
            if not piece:
                break
            received += piece
    finally:
        os.close(read_end)
    os.waitpid(pid, 0)  # it has answered, so it ends now
    if received[:1] == b"!":
        code = int(received[1:])
        raise OSError(code, os.strerror(code), path)
    if received[:1] != b"=":
        raise OSError(errno.EIO, "no answer", path)
    return bytes(received[1:])


def describe_index(state: dict[str, Any]) -> str:
    """One disk's index, as a person reads it."""
    index = state.get("index", "unknown")
    if index == "building":
        done, total = int(state.get("done", 0)), int(state.get("total", 0))
        percent = 100.0 * done / total if total else 100.0
        return f"building {percent:.0f}% ({human_size(done)} of {human_size(total)})"
    if index == "ready":
        detail = []
        if state.get("consistency"):  # how the snapshot was taken: offline, frozen, …
            frozen = f" {state['frozen_ms']} ms" if state.get("frozen_ms") is not None else ""
            detail.append(f"{state['consistency']}{frozen}")
        if "snapshot_bytes" in state:
            detail.append(f"snapshot {human_size(int(state['snapshot_bytes']))}")
        if state.get("checksum"):
            detail.append(f"image sha256 {str(state['checksum'])[:16]}…")
        return "ready" + (f" ({', '.join(detail)})" if detail else "")
    if index == "refused":
        return f"refused: {state.get('reason', '?')}"
    if index == "not built":
        return "not loaded (the first stat or read of the snapshot loads its saved index, or builds one)"
    if index == "queued":  # trial R s18: these showed "not loaded", as if nothing would happen
        return "queued (--index-at-mount: its index is loaded or built once a slot is free, 2 at a time)"
    return str(index)


def format_status(entry: MountEntry, status: dict[str, Any]) -> str:
    header = [f"{entry.mountpoint}: mirenfs"]
    if entry.source.startswith("/"):
        header.append(f"data path {entry.source}")
    if status.get("catalog"):
        header.append(f"disk catalogue {status['catalog']}")
    if status.get("node"):
        header.append(f"node {status['node']}")
    if "pid" in status:
        header.append(f"pid {status['pid']}")
    if "index_passes" in status:
        passes = status["index_passes"]
        header.append(f"{passes} index pass{'' if passes == 1 else 'es'} since mounted")
    lines = [", ".join(header)]
    if status.get("catalog_error"):
        age = status.get("listing_age_s")
        listed = f", {age:.0f} s old" if isinstance(age, (int, float)) else ""
        lines.append(f"  {status['catalog_error']}")
        lines.append(
            f"  (the disks below are from the mount's last listing{listed}; the rest is the mount's own)"
        )
    disks = status.get("disks") or {}
    if disks:
        width = max(len("DISK"), *(len(name) for name in disks))
        lines.append(f"  {'DISK'.ljust(width)}  INDEX")
        for name, state in sorted(disks.items()):
            lines.append(f"  {name.ljust(width)}  {describe_index(state if isinstance(state, dict) else {})}")
    elif status.get("node"):  # a wrong --node shows nothing: say whose disks were looked for
        lines.append(f"  no disks on node {status['node']} in {status.get('catalog') or 'its catalogue'}")
    else:
        lines.append("  no disks")
    missing = [str(name) for name in status.get("without_image_here") or []]
    if missing:  # trial W: "no disks on node X" when X had disks, with their images elsewhere
        named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        lines.append(
            f"  {len(missing)} of {'node ' + str(status['node']) if status.get('node') else 'this host'}'s "
            f"disks {'has' if len(missing) == 1 else 'have'} no image under this data path ({named}): if "
            "the data path or the node name is wrong, stop this mount"
        )
    restores = status.get("restores") or []
    if restores:
        lines.append("  restores:")
        for item in restores:
            if not isinstance(item, dict):
                continue
            parts = [str(item.get("name", "?"))]
            if item.get("disk"):
                parts.append(f"disk {item['disk']}")
            parts.append(str(item.get("state", "?")))
            if "bytes" in item:
                parts.append(f"{human_size(int(item['bytes']))} received")
            if "image_total" in item:  # while it receives: how far into the image, by its header
                done, total = int(item.get("image_done", 0)), int(item["image_total"])
                share = f" ({done * 100 // total}%)" if total else ""
                parts.append(f"image {human_size(done)} of {human_size(total)}{share}")
            lines.append("    " + "  ".join(parts))
    else:
        lines.append("  no restores")
    omitted = status.get("omitted")
    if isinstance(omitted, dict) and any(omitted.values()):
        said = [
            f"{int(omitted.get(kind, 0))} {what}"
            for kind, what in (
                ("disks", "disks at rest"),
                ("restores", "ended restores"),
                ("refused", "older refusals"),
            )
            if omitted.get(kind)
        ]
        lines.append(f"  not shown: {', '.join(said)} (the status the mount gives is at most 64 KiB)")
    store = status.get("frame_store")
    if isinstance(store, dict):
        lines.append(f"  {describe_frame_store(store)}")
    refused = [item for item in status.get("refused") or [] if isinstance(item, dict)]
    if refused:
        lines.append("  refused (newest first):")
        for item in refused:
            tries = int(item.get("tries", 1))
            again = f"  ({tries} tries)" if tries > 1 else ""
            lines.append(
                f"    {item.get('name', '?')}  {item.get('errno', '?')}  {item.get('reason', '?')}{again}"
            )
    return "\n".join(lines)


def describe_frame_store(store: dict[str, Any]) -> str:
    """``frame store 1.2G of 8.0G; 930 frames served from it, 12 compressed anew``, and why it
    does not grow, when it does not."""
    limit = human_size(int(store.get("limit", 0)))
    if not store.get("loaded"):
        return f"frame store of up to {limit}: not used since the mount started"
    said = (
        f"frame store {human_size(int(store.get('bytes', 0)))} of {limit}; "
        f"{store.get('hits', 0)} frames served from it, {store.get('misses', 0)} not found there"
    )
    if store.get("corrupt"):
        said += f", {store['corrupt']} that did not verify (compressed again)"
    if store.get("held_back"):
        said += "; it stopped growing: its filesystem has less than 10% free"
    return said


# The exit status when every mount answered but one could not list its disk catalogue (etcd
# unreachable): the status is printed in full, and a script or a health check can tell.
CATALOG_UNREACHABLE_EXIT = 3


def cmd_status(args: argparse.Namespace) -> int:
    if args.mountpoint is not None:
        entry = mount_at(args.mountpoint)
        status = read_status(entry, timeout_s=args.timeout)
        print(json.dumps(status, indent=2) if args.json else format_status(entry, status))
        return CATALOG_UNREACHABLE_EXIT if status.get("catalog_error") else 0
    found = mirenfs_mounts()
    if not found:
        raise MirenfsError("no mirenfs mount found on this host (start one with `mirenfs mount MOUNTPOINT`)")
    results: dict[str, dict[str, Any]] = {}
    failures = 0
    for entry in found:
        try:
            status = read_status(entry, timeout_s=args.timeout)
        except MirenfsError as exc:
            say(f"mirenfs: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        results[entry.mountpoint] = status
        if not args.json:
            print(format_status(entry, status))
    if args.json:
        print(json.dumps(results, indent=2))
    if failures:
        return 1
    return CATALOG_UNREACHABLE_EXIT if any(s.get("catalog_error") for s in results.values()) else 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """What a mount's start sweeps, on demand: for ``ExecStopPost=`` after a cgroup-wide kill,
    which took the watchdog with the mount and would leave a filesystem frozen until the next
    start, and for a person after a ``kill -9``. What live runs hold is left alone."""
    data_path = resolve_data_path(args.data_path, new_one_hint=False)
    if not holds_mirenfs_files(data_path):
        raise MirenfsError(
            f"{data_path} holds nothing of mirenfs (no mirenfs.db, no mirenfs/): it is not the data "
            "path a mount or backup used; check --data-path (or MIRENFS_DATA_PATH)"
        )
    if os.geteuid() != 0:
        raise MirenfsError("mirenfs cleanup thaws filesystems, which needs root; run it as root (sudo)")
    said, failed = 0, False
    catalog: Catalog | None = catalog_from(args)
    if isinstance(catalog, Store) and not os.path.lexists(catalog.path):
        # An etcd node's data path has no SQLite store: without --catalog no catalogue is looked at,
        # and a disk a killed restore was creating stays `provisioning` there. Only files are
        # cleaned up: the notes of killed creations stay for a cleanup with the catalogue (an
        # empty store read instead forgot them, review D22 D5).
        catalog = None
        say(
            f"{data_path} has no disk store of its own (mirenfs.db), so only its files are cleaned up: on "
            "a fleet, pass --catalog URL and --node NAME (or set $MIRENFS_CATALOG) to also remove a disk "
            "a killed restore was creating",
            flush=True,
        )
        said += 1
    for level, sentence in sweep_what_killed_runs_left(data_path, clone_directory_of(data_path), catalog):
        failed = failed or level >= logging.ERROR
        # each as it is done: a catalogue failure comes after the thaws
        if level >= logging.ERROR:
            say(f"mirenfs: error: {sentence}", file=sys.stderr, flush=True)
        else:
            say(sentence, flush=True)
        said += 1
    for where in _unmount_dead_mounts_of(data_path):
        say(f"unmounted the dead mirenfs mount at {where} (its daemon was killed)", flush=True)
        said += 1
    if not said:
        say(f"nothing to clean up in {data_path}: no killed mirenfs process left anything behind")
    return 1 if failed else 0


DEAD_CHECK_S = 2.0  # a daemon that does not answer this fast is stopped or busy, not dead


def _unmount_dead_mounts_of(data_path: str) -> list[str]:
    """The mounts of ``data_path`` whose daemon is gone (every request: ENOTCONN), unmounted
    lazily, as the unit's ``ExecStopPost=`` does: a killed mount is otherwise left in the way
    of the next one. Asked from a child, as ``status`` asks: a stopped daemon never answers."""
    done = []
    for entry in mirenfs_mounts():
        if entry.source != data_path:
            continue
        try:
            _getxattr_within(entry.mountpoint, STATUS_XATTR, DEAD_CHECK_S)
        except TimeoutError:
            continue
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                continue
            unmounted = subprocess.run(
                ["fusermount3", "-u", "-z", entry.mountpoint], capture_output=True, text=True, timeout=30
            )
            if unmounted.returncode != 0:
                raise MirenfsError(
                    f"cannot unmount the dead mirenfs mount at {entry.mountpoint}: "
                    f"{unmounted.stderr.strip() or 'fusermount3 failed'}"
                ) from None
            done.append(entry.mountpoint)
    return done
