"""The ``mirenfs`` command line (SPEC §4).

Every command runs the same trio engine the mount uses. Failures print one
line, ``mirenfs: error: …``, and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import BinaryIO

import trio

from mirenfs import cli_mount, cli_ops, cli_store
from mirenfs.aio import meaningful_error
from mirenfs.cli_args import add_compression_options, settings_from
from mirenfs.engine import backup_image, restore_file, verify_file
from mirenfs.errors import FormatError, MirenfsError
from mirenfs.format import Meta, read_header
from mirenfs.fstype import detect_filesystem
from mirenfs.progress import ProgressBar
from mirenfs.zstdframes import parse_seek_table

log = logging.getLogger("mirenfs")

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirenfs",
        description="Back up and restore Miren disk images as .mirn snapshots.",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info for mount (one line per event), warning otherwise",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backup = commands.add_parser("backup", help="write a snapshot of a disk, or of an image file")
    backup.add_argument("disk", nargs="?", metavar="NAME", help="the disk to back up (from the disk store)")
    backup.add_argument("--image", metavar="PATH", help="back up this raw image file instead of a disk")
    backup.add_argument("--name", help="with --image: disk name in the header (default: the file's name)")
    backup.add_argument("--filesystem", help="with --image: filesystem in the header (default: detected)")
    backup.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="snapshot file, or - for stdout"
    )
    add_compression_options(backup)
    cli_store.add_data_path_option(backup)
    backup.set_defaults(handler=cmd_backup)

    restore = commands.add_parser("restore", help="restore a disk, or an image file, from a snapshot")
    restore.add_argument("file", metavar="FILE", help="snapshot file, or - for stdin")
    restore.add_argument("--name", metavar="NAME", help="the disk to restore (default: the header's name)")
    restore.add_argument("--image", metavar="PATH", help="write this image file instead of a disk")
    restore.add_argument("--force", action="store_true", help="replace an existing image")
    cli_store.add_data_path_option(restore)
    restore.set_defaults(handler=cmd_restore)

    inspect = commands.add_parser("inspect", help="print a snapshot's header")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print the header as JSON")
    inspect.set_defaults(handler=cmd_inspect)

    verify = commands.add_parser("verify", help="decompress a snapshot and check its size and checksum")
    verify.add_argument("file", metavar="FILE", help="snapshot file, or - for stdin")
    verify.set_defaults(handler=cmd_verify)

    cli_store.register(commands)
    cli_mount.register(commands)
    cli_ops.register(commands)
    return parser


def cmd_backup(args: argparse.Namespace) -> int:
    if (args.disk is None) == (args.image is None):
        raise MirenfsError(
            "backup needs exactly one source: a disk NAME (mirenfs backup NAME -o FILE) "
            "or an image file (mirenfs backup --image PATH -o FILE)"
        )
    if args.disk is not None:
        return cli_store.cmd_backup_disk(args)
    if args.data_path is not None:
        raise MirenfsError("--data-path applies to disk backups; --image PATH names the image directly")
    size = _file_size(args.image, "image")
    name = args.name or os.path.splitext(os.path.basename(args.image))[0]
    filesystem = args.filesystem or detect_filesystem(args.image)
    if filesystem is None:
        log.warning("could not tell the filesystem of %s; writing 'unknown' (use --filesystem)", args.image)
        filesystem = "unknown"
    bar = ProgressBar(size, f"backup {name}", enabled=None if args.output != "-" else sys.stderr.isatty())
    try:
        meta = trio.run(
            partial(
                backup_image,
                args.image,
                args.output,
                name=name,
                filesystem=filesystem,
                settings=settings_from(args),
                progress=bar,
            )
        )
    finally:
        bar.close()
    log.info("backed up %s to %s (checksum %s)", args.image, args.output, meta.checksum)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.image is None:
        return cli_store.cmd_restore_disk(args)
    if args.name is not None or args.data_path is not None:
        raise MirenfsError(
            "--name and --data-path pick a disk of the store; with --image PATH the image is named directly"
        )
    bar: ProgressBar | None = None

    def on_header(meta: Meta) -> None:
        nonlocal bar
        bar = ProgressBar(meta.size_bytes, f"restore {meta.name}")

    try:
        meta = trio.run(
            partial(restore_file, args.file, args.image, overwrite=args.force, on_header=on_header)
        )
    finally:
        if bar is not None:
            bar.close()
    print(f"restored {args.image} from {args.file}: {meta.size_bytes} bytes, checksum {meta.checksum}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as snapshot:
            meta = read_header(snapshot)
            header_len = snapshot.tell()
            total = os.fstat(snapshot.fileno()).st_size
            frames = _seek_table_frames(snapshot, total - header_len)
    except OSError as exc:
        raise MirenfsError(f"cannot read {args.file}: {exc.strerror}") from None
    fields = {
        "name": meta.name,
        "size_bytes": meta.size_bytes,
        "filesystem": meta.filesystem,
        "timestamp": meta.timestamp.rfc3339(),
        "checksum": meta.checksum,
        "version": meta.version,
        "header_bytes": header_len,
        "data_bytes": total - header_len,
        "seekable_frames": frames,
    }
    if args.json:
        print(json.dumps(fields, ensure_ascii=False))
    else:
        for key, value in fields.items():
            print(f"{key}: {value if value is not None else '-'}")
    return 0


def _seek_table_frames(snapshot: BinaryIO, data_len: int) -> int | None:
    """The frame count of a seekable-format seek table, or None for other layouts (Go's)."""
    tail_len = min(data_len, 1 << 20)
    snapshot.seek(-tail_len, os.SEEK_END)
    try:
        return len(parse_seek_table(snapshot.read(tail_len)))
    except FormatError:
        return None


def cmd_verify(args: argparse.Namespace) -> int:
    size = _file_size(args.file, "snapshot") if args.file != "-" else 0
    bar = ProgressBar(size, "verify", enabled=bool(size) and sys.stderr.isatty())
    meta = trio.run(verify_file, args.file)
    bar.close()
    print(f"{args.file}: OK ({meta.name}, {meta.size_bytes} bytes, checksum {meta.checksum})")
    return 0


def _file_size(path: str, what: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise MirenfsError(f"cannot open {what} {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command in ("mount", "demo") else "warning"
    logging.basicConfig(level=args.log_level.upper(), format="mirenfs: %(levelname)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("mirenfs: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # one line for people, whatever went wrong
        error = meaningful_error(exc)
        if isinstance(error, (SystemExit, KeyboardInterrupt)):
            raise
        if isinstance(error, MirenfsError):
            message = str(error)
        elif isinstance(error, OSError):
            message = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        else:
            log.debug("unexpected error", exc_info=error)
            message = f"unexpected {type(error).__name__}: {error}"
        print(f"mirenfs: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
