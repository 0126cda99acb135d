"""The store-based commands of the CLI (SPEC §4): ``disk …``, ``lease …``,
``backup NAME`` and ``restore FILE [--name NAME]``.

Images of ``disk create`` (and of restores into a new name) are *managed*:
they live at ``<data-path>/disk-data/volumes/<volume-id>/disk.img`` and
``disk remove`` deletes them with their volume directory. An image
registered with ``disk add`` stays where it is: ``disk remove`` only forgets it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

import trio

from mirenfs.cli_args import parse_size, settings_from
from mirenfs.disks import (
    DiskLeasedError,
    DiskState,
    ImageLiveError,
    LeaseState,
    LiveCheckError,
    RestoreTarget,
    loop_devices_backing,
    prepare_backup,
    prepare_restore,
    validate_disk_name,
)
from mirenfs.engine import backup_image, open_input, read_pieces
from mirenfs.errors import MirenfsError
from mirenfs.format import read_header
from mirenfs.fstype import detect_filesystem
from mirenfs.image import STAGING_SUFFIX, remove_stale_staging
from mirenfs.progress import ProgressBar
from mirenfs.restoring import DiskRestore
from mirenfs.store import DiskBusyError, DiskRecord, Store

DEFAULT_DATA_PATH = "/var/lib/miren"
DATA_PATH_ENV = "MIRENFS_DATA_PATH"
FILESYSTEMS = ("ext4", "xfs", "btrfs")
_MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], "e2fsprogs"),
    "xfs": (["mkfs.xfs", "-q", "-f"], "xfsprogs"),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], "btrfs-progs"),
}
MKFS_TIMEOUT_S = 600


def resolve_data_path(arg: str | None) -> str:
    """``--data-path`` if given, else ``$MIRENFS_DATA_PATH``, else ``/var/lib/miren``; made absolute."""
    chosen = arg or os.environ.get(DATA_PATH_ENV) or DEFAULT_DATA_PATH
    return os.path.abspath(chosen)


def add_data_path_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-path",
        metavar="DIR",
        default=None,
        help=f"Miren's data path (default: ${DATA_PATH_ENV}, else {DEFAULT_DATA_PATH})",
    )


def register(commands: Any) -> None:
    """Add ``disk …`` and ``lease …`` to the top-level subcommands (an argparse subparsers object)."""
    disk = commands.add_parser("disk", help="manage the disks of the embedded store")
    disk_commands = disk.add_subparsers(dest="disk_command", required=True, metavar="COMMAND")

    create = disk_commands.add_parser("create", help="create a disk with a new sparse image")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--size", required=True, type=parse_size, help="image size: 4096, 512M, 10G, …")
    create.add_argument("--filesystem", choices=FILESYSTEMS, default="ext4", help="default: ext4")
    create.set_defaults(handler=cmd_disk_create)

    add = disk_commands.add_parser("add", help="register an existing image as a disk (it stays where it is)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--image", required=True, metavar="PATH", help="the raw image file")
    add.add_argument("--filesystem", choices=FILESYSTEMS, help="default: detected from the image")
    add.set_defaults(handler=cmd_disk_add)

    listing = disk_commands.add_parser("list", help="list disks with their status, image and leases")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=cmd_disk_list)

    set_status = disk_commands.add_parser("set-status", help="change a disk's status")
    set_status.add_argument("name", metavar="NAME")
    set_status.add_argument("status", metavar="STATUS", choices=[state.value for state in DiskState])
    set_status.set_defaults(handler=cmd_disk_set_status)

    remove = disk_commands.add_parser(
        "remove", help="remove a disk (and its image, if disk create or a restore made it)"
    )
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=cmd_disk_remove)

    lease = commands.add_parser("lease", help="hold or release a disk (restore refuses a leased disk)")
    lease_commands = lease.add_subparsers(dest="lease_command", required=True, metavar="COMMAND")
    acquire = lease_commands.add_parser("acquire", help="bind a lease on a disk; prints the lease id")
    acquire.add_argument("name", metavar="NAME")
    acquire.set_defaults(handler=cmd_lease_acquire)
    release = lease_commands.add_parser("release", help="release a lease")
    release.add_argument("lease_id", metavar="LEASE_ID")
    release.set_defaults(handler=cmd_lease_release)

    for parser in (create, add, listing, set_status, remove, acquire, release):
        add_data_path_option(parser)


def _store(args: argparse.Namespace) -> Store:
    return Store(resolve_data_path(args.data_path))


# --- disk create / add ---


@dataclass(frozen=True)
class CreatedImage:
    record: DiskRecord
    image_path: str
    formatted: bool
    mkfs_missing: str | None  # the package to install when mkfs was not found


def create_disk(store: Store, name: str, *, size_bytes: int, filesystem: str) -> CreatedImage:
    """A new disk with a managed sparse image, formatted when the right mkfs is installed.

    The disk is ``provisioning`` until its image is ready; on any failure the
    records, the image and its volume directory are removed again.
    """
    validate_disk_name(name)
    record = store.add_disk(name, size_bytes=size_bytes, filesystem=filesystem, status=DiskState.PROVISIONING)
    assert record.image_path is not None
    image_path = record.image_path
    volume_dir = os.path.dirname(image_path)
    try:
        os.makedirs(os.path.dirname(volume_dir), mode=0o755, exist_ok=True)
        os.mkdir(volume_dir, 0o700)
        fd = os.open(image_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)
        formatted, missing = _make_filesystem(name, image_path, filesystem)
        store.mark_provisioned(record.disk.id)
    except BaseException:
        shutil.rmtree(volume_dir, ignore_errors=True)
        store.delete_disk_records(record.disk.id)
        raise
    return CreatedImage(store.get_disk(name), image_path, formatted, missing)


def _make_filesystem(name: str, image_path: str, filesystem: str) -> tuple[bool, str | None]:
    command, package = _MKFS[filesystem]
    program = shutil.which(command[0])
    if program is None:
        return False, package
    try:
        done = subprocess.run(
            [program, *command[1:], image_path],
            capture_output=True,
            text=True,
            timeout=MKFS_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MirenfsError(f"could not run {command[0]} on the image of disk {name}: {exc}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise MirenfsError(
            f"{command[0]} failed on the image of disk {name} ({detail}); nothing was created, "
            "try a larger --size or another --filesystem"
        )
    return True, None


def cmd_disk_create(args: argparse.Namespace) -> int:
    created = create_disk(_store(args), args.name, size_bytes=args.size, filesystem=args.filesystem)
    if created.formatted:
        print(f"created disk {args.name}: {args.filesystem}, {args.size} bytes, image {created.image_path}")
    else:
        print(f"created disk {args.name}: {args.size} bytes, image {created.image_path}")
        print(
            f"mirenfs: warning: mkfs.{args.filesystem} is not installed, so the image of disk {args.name} "
            f"has no filesystem yet; install {created.mkfs_missing} and run mkfs.{args.filesystem} "
            f"{created.image_path}",
            file=sys.stderr,
        )
    return 0


def cmd_disk_add(args: argparse.Namespace) -> int:
    name = validate_disk_name(args.name)
    image_path = os.path.abspath(args.image)
    try:
        info = os.stat(image_path)
    except OSError as exc:
        raise MirenfsError(f"cannot register {image_path} as disk {name}: {exc.strerror}") from None
    if not os.path.isfile(image_path):
        raise MirenfsError(f"cannot register {image_path} as disk {name}: it is not a regular file")
    filesystem = args.filesystem or detect_filesystem(image_path)
    if filesystem is None:
        raise MirenfsError(
            f"cannot tell the filesystem of {image_path}; pass --filesystem {'|'.join(FILESYSTEMS)}"
        )
    _store(args).add_disk(name, size_bytes=info.st_size, filesystem=filesystem, image_path=image_path)
    print(f"added disk {name}: {filesystem}, {info.st_size} bytes, image {image_path} (kept on disk remove)")
    return 0


# --- disk list / set-status / remove ---


def cmd_disk_list(args: argparse.Namespace) -> int:
    records = _store(args).list_disks()
    if args.json:
        entries = []
        for record in records:
            entry = record.to_json()
            entry["image_exists"] = bool(record.image_path and os.path.isfile(record.image_path))
            entries.append(entry)
        print(json.dumps(entries, indent=2))
        return 0
    table = [("NAME", "STATUS", "FILESYSTEM", "SIZE", "LEASES", "IMAGE")]
    for record in records:
        bound = [lease.id for lease in record.leases if lease.status == LeaseState.BOUND]
        image = record.image_path or "-"
        if record.image_path and not os.path.isfile(record.image_path):
            image += " (missing)"
        table.append(
            (
                record.disk.name,
                record.disk.status.value,
                record.disk.filesystem,
                _human_size(record.disk.size_bytes),
                ",".join(bound) or "-",
                image,
            )
        )
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{size}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"


def cmd_disk_set_status(args: argparse.Namespace) -> int:
    name = validate_disk_name(args.name)
    old, new = _store(args).set_disk_status(name, args.status)
    print(f"disk {name}: {old.value} -> {new.value}")
    return 0


@dataclass(frozen=True)
class RemovedDisk:
    record: DiskRecord
    image_removed: bool


def remove_disk(store: Store, name: str) -> RemovedDisk:
    """Remove a disk: refused while it is attached, leased or its image is live.

    The disk goes to ``deleting`` first (the mount stops showing it), then a
    managed image is deleted with its volume directory, then the records.
    If deleting the files fails the disk stays in ``deleting``, and running
    the command again finishes the job.
    """
    validate_disk_name(name)
    record = store.get_disk(name)
    if record.disk.status == DiskState.ATTACHED:
        raise DiskBusyError(
            f"disk {name} is attached; detach it (`mirenfs disk set-status {name} detached`) "
            "before removing it"
        )
    bound = [lease for lease in record.leases if lease.status == LeaseState.BOUND]
    if bound:
        raise DiskLeasedError(
            f"disk {name} is in use (lease {bound[0].id} is bound); release it "
            f"(`mirenfs lease release {bound[0].id}`) before removing the disk"
        )
    managed = record.volume is not None and not record.volume.image_path
    image_path = record.image_path if managed else None
    if image_path is not None:
        try:
            devices = loop_devices_backing(image_path)
        except LiveCheckError as exc:
            raise LiveCheckError(
                f"cannot tell whether the image of disk {name} is in use ({exc}), so it is not removed"
            ) from None
        if devices:
            raise ImageLiveError(
                f"disk {name} is in use: its image backs /dev/{devices[0]}; detach it "
                f"(`losetup -d /dev/{devices[0]}`) before removing the disk"
            )
        remove_stale_staging(image_path + STAGING_SUFFIX)  # EBUSY while a restore writes it
    store.set_disk_status(name, DiskState.DELETING)
    if image_path is not None and record.volume is not None:
        volume_dir = os.path.dirname(image_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image_path)
        try:
            shutil.rmtree(volume_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MirenfsError(
                f"disk {name} is marked deleting but its volume directory {volume_dir} could not be removed "
                f"({exc.strerror}); fix that and run `mirenfs disk remove {name}` again"
            ) from None
    store.delete_disk_records(record.disk.id)
    return RemovedDisk(record, image_path is not None)


def cmd_disk_remove(args: argparse.Namespace) -> int:
    removed = remove_disk(_store(args), args.name)
    if removed.image_removed:
        print(f"removed disk {args.name} and its image {removed.record.image_path}")
    elif removed.record.image_path:
        print(f"removed disk {args.name}; its registered image {removed.record.image_path} is kept")
    else:
        print(f"removed disk {args.name}")
    return 0


# --- leases ---


def cmd_lease_acquire(args: argparse.Namespace) -> int:
    lease = _store(args).acquire_lease(validate_disk_name(args.name))
    print(lease.id)
    return 0


def cmd_lease_release(args: argparse.Namespace) -> int:
    lease, disk_name, changed = _store(args).release_lease(args.lease_id)
    if changed:
        print(f"released lease {lease.id} of disk {disk_name}")
    else:
        print(f"lease {lease.id} of disk {disk_name} was already released")
    return 0


# --- backup NAME / restore FILE [--name NAME] ---


def cmd_backup_disk(args: argparse.Namespace) -> int:
    """``mirenfs backup NAME -o FILE``: the same bytes the mount serves as ``NAME.mirn``."""
    if args.name is not None or args.filesystem is not None:
        raise MirenfsError(
            f"--name and --filesystem only apply to --image backups; disk {args.disk} is backed up "
            "under its own name and filesystem"
        )
    data_path = resolve_data_path(args.data_path)
    target = prepare_backup(Store(data_path), args.disk, data_path=data_path)
    if target.warning:
        print(f"mirenfs: warning: {target.warning}", file=sys.stderr)
    size = os.stat(target.image_path).st_size
    bar = ProgressBar(
        size, f"backup {target.name}", enabled=None if args.output != "-" else sys.stderr.isatty()
    )
    try:
        trio.run(
            partial(
                backup_image,
                target.image_path,
                args.output,
                name=target.name,
                filesystem=target.filesystem,
                settings=settings_from(args),
                progress=bar,
            )
        )
    finally:
        bar.close()
    return 0


def cmd_restore_disk(args: argparse.Namespace) -> int:
    """``mirenfs restore FILE [--name NAME] [--force]``: restore into a disk of the store.

    With ``--name`` every refusal happens before a byte is read; without it
    the disk is the one the header names, so the header is read first.
    """
    data_path = resolve_data_path(args.data_path)
    store = Store(data_path)

    def prepare(name: str) -> RestoreTarget:
        return prepare_restore(store, name, data_path=data_path, overwrite=args.force, creator=store)

    target = prepare(args.name) if args.name is not None else None
    with open_input(args.file) as source:
        meta = read_header(source)
        if target is None:
            target = prepare(meta.name)
        total = _remaining_bytes(source)
        bar = ProgressBar(total, f"restore {target.name}", enabled=None if total else False)
        try:
            trio.run(_restore_from, DiskRestore(target, header_read=meta), source, bar)
        finally:
            bar.close()
    how = "new disk" if target.creates_disk else "image replaced"
    print(
        f"restored disk {target.name} ({how}) from {args.file}: {meta.size_bytes} bytes, "
        f"checksum {meta.checksum}"
    )
    return 0


async def _restore_from(restore: DiskRestore, source: BinaryIO, progress: ProgressBar) -> None:
    """The same disk restore the mount's restore/ runs, fed from a file or a pipe."""
    try:
        async for piece in read_pieces(source):
            await restore.append(piece)
            progress(restore.next_offset)
        await restore.finish()
    except BaseException:
        with trio.CancelScope(shield=True):
            await restore.abort()
        raise


def _remaining_bytes(source: BinaryIO) -> int:
    """Bytes left in a regular file (for the progress bar); 0 for a pipe."""
    try:
        return max(os.fstat(source.fileno()).st_size - source.tell(), 0)
    except (OSError, ValueError):
        return 0
