"""``mount.mirenfs``: what ``mount -t mirenfs`` and fstab lines run.

mount(8) calls ``/sbin/mount.mirenfs SOURCE DIR [-sfnv] [-o OPTIONS]`` with
SOURCE the data path, for example from the fstab line

    /var/lib/miren  /mnt/disks  mirenfs  defaults  0 0

This runs ``mirenfs mount DIR --data-path SOURCE -o OPTIONS`` in daemon mode,
in this process (mount gives helpers no ``PATH``), so it returns only once
the mount answers. Options that belong to mount(8), fstab or systemd
(``defaults``, ``auto``, ``nofail``, ``_netdev``, ``x-systemd.*`` …) are
dropped; the rest go to the mount as ``-o`` options.

Exit status follows mount(8): 0 mounted, 1 bad invocation, 32 mount failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mirenfs.cli import main as mirenfs_main
from mirenfs.cli.mountinfo import refuse_if_mirenfs_mount
from mirenfs.errors import MirenfsError
from mirenfs.mount.config import check_option_values, fuse_options

EXIT_USAGE = 1
EXIT_FAILURE = 32


class MountRefused(Exception):
    """A mount the helper will not make: one clear sentence for mount(8) to show."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mount.mirenfs",
        description="Mount a Miren data path with mirenfs (called by mount -t mirenfs and fstab).",
    )
    parser.add_argument("source", metavar="SOURCE", help="the Miren data path, e.g. /var/lib/miren")
    parser.add_argument("directory", metavar="DIR", help="the mount point")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    parser.add_argument("-f", dest="fake", action="store_true", help="check everything but do not mount")
    parser.add_argument("-v", dest="verbose", action="store_true", help="say what is run")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="accepted (sloppy); changes nothing")
    parser.add_argument("-n", dest="no_mtab", action="store_true", help="accepted; there is no mtab to write")
    parser.add_argument("-t", dest="type", help="accepted; always mirenfs")
    return parser


def mount_arguments(args: argparse.Namespace) -> list[str]:
    """The ``mirenfs`` command line this helper runs."""
    source = os.path.abspath(args.source)
    if not os.path.isdir(source):
        # A typo in fstab must not quietly start an empty disk store.
        what = "is not a directory" if os.path.lexists(source) else "does not exist"
        raise MountRefused(f"data path {source} {what} (SOURCE must be Miren's data path)")
    directory = os.path.abspath(args.directory)
    try:
        refuse_if_mirenfs_mount(directory)
    except MirenfsError as exc:
        raise MountRefused(str(exc)) from None
    command = ["mount", directory, "--data-path", source]
    options = fuse_options(args.options)
    try:
        check_option_values(options)  # -f mounts nothing, so it is the only check it gets
    except MirenfsError as exc:
        raise MountRefused(str(exc)) from None
    if options:
        command += ["-o", ",".join(options)]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else 0
    try:
        command = mount_arguments(args)
    except MountRefused as exc:
        print(f"mount.mirenfs: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.verbose:
        print(f"mount.mirenfs: running mirenfs {' '.join(command)}", file=sys.stderr)
    if args.fake:
        return 0
    # This process is never the one a service manager waits for.
    os.environ.pop("NOTIFY_SOCKET", None)
    try:
        code = mirenfs_main(command)
    except SystemExit as exc:  # argparse: a bad option value
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return 0 if code == 0 else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
