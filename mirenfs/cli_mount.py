"""``mirenfs mount``: in the foreground (systemd, tests) or as a daemon that returns once live."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import stat
import sys
from functools import partial
from typing import Any

import trio

from mirenfs.aio import meaningful_error
from mirenfs.cli_store import add_data_path_option, resolve_data_path
from mirenfs.errors import MirenfsError
from mirenfs.mount import MountConfig, serve
from mirenfs.mount_helper import fuse_options

log = logging.getLogger("mirenfs")

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
        "-o", dest="options", action="append", default=[], metavar="OPT,…", help="FUSE mount options"
    )
    mount.set_defaults(handler=cmd_mount)


def config_from(args: argparse.Namespace) -> MountConfig:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        info: os.stat_result | None = os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MirenfsError(
                f"a dead mount is left at {mountpoint} (its daemon was killed); "
                f"run: fusermount3 -u {mountpoint}"
            ) from None
        info = None
    if info is None or not stat.S_ISDIR(info.st_mode):
        raise MirenfsError(f"mount point {mountpoint} is not a directory; create it first")
    data_path = resolve_data_path(args.data_path)
    try:
        os.makedirs(data_path, exist_ok=True)
    except OSError as exc:
        raise MirenfsError(f"cannot use data path {data_path}: {exc.strerror}") from None
    options = fuse_options(args.options)  # the same filter the mount.mirenfs helper applies
    allow_overwrite = args.allow_overwrite or "allow_overwrite" in options
    options = [opt for opt in options if opt != "allow_overwrite"]
    return MountConfig(mountpoint, data_path, allow_overwrite=allow_overwrite, fuse_options=options)


def cmd_mount(args: argparse.Namespace) -> int:
    config = config_from(args)
    if args.foreground:
        trio.run(partial(serve, config))
        return 0
    return _daemonize(config, args.log_level)


def _daemonize(config: MountConfig, log_level: str) -> int:
    """Fork a daemon and return once it reports the mount live, or with its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as report:
            message = report.read().decode(errors="replace")
        if message == "ready":
            return 0
        os.waitpid(pid, 0)
        print(f"mirenfs: error: {message or 'the mount process died before it was ready'}", file=sys.stderr)
        return 1
    os.close(read_end)
    code = 1
    try:
        os.setsid()
        _detach_stdio(config, log_level)

        def ready() -> None:
            os.write(write_end, b"ready")
            os.close(write_end)

        trio.run(partial(serve, config, ready=ready))
        code = 0
    except BaseException as exc:
        error = meaningful_error(exc)
        log.error("mount failed: %s", error)
        with contextlib.suppress(OSError):
            os.write(write_end, str(error).encode())
    finally:
        logging.shutdown()
        os._exit(code)


def _detach_stdio(config: MountConfig, log_level: str) -> None:
    log_path = os.path.join(config.state_directory, "mount.log")
    os.makedirs(config.state_directory, mode=0o700, exist_ok=True)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(log_level.upper())
