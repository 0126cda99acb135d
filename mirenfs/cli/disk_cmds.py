"""``disk …`` and ``lease …``: the disks, volumes and leases of the catalogue (SPEC §4): the
embedded store, or a fleet's on etcd (``--catalog``), where ``disk list`` shows this node's disks
unless ``--all-nodes``.

Parsers beside handlers; creating and removing images is ``disks.manage``'s job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mirenfs.cli.common import (
    add_data_path_option,
    catalog_from,
    human_size,
    parse_size,
    resolve_data_path,
    say,
    say_done,
    silence_standard_output,
)
from mirenfs.cli.mountinfo import mirenfs_mount_holding
from mirenfs.disks.catalogs import (
    ImageAdopting,
    catalog_spec_from,
    images_no_disk_has,
    node_from,
    none_on_this_node,
)
from mirenfs.disks.manage import create_disk, remove_disk
from mirenfs.disks.model import Catalog, DiskState, LeaseState, etcd_catalogue_hint, validate_disk_name
from mirenfs.disks.rules import what_the_data_path_keeps_at
from mirenfs.engine.fstype import detect_filesystem
from mirenfs.errors import DiskExistsError, MirenfsError, printable
from mirenfs.format.header import FILESYSTEMS, MAGIC


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
    listing.add_argument(
        "--all-nodes",
        action="store_true",
        help="with an etcd catalogue: every node's disks, not only this one's",
    )
    listing.set_defaults(handler=cmd_disk_list)

    set_status = disk_commands.add_parser("set-status", help="change a disk's status")
    set_status.add_argument("name", metavar="NAME")
    set_status.add_argument(
        "status",
        metavar="STATUS",
        type=_disk_state,
        help=", ".join(state.value for state in DiskState) + " (Miren's DELETING, status.deleting too)",
    )
    set_status.set_defaults(handler=cmd_disk_set_status)

    remove = disk_commands.add_parser(
        "remove", help="remove a disk (and its image, if disk create or a restore made it)"
    )
    remove.add_argument("name", metavar="NAME")
    remove.add_argument(
        "--force",
        action="store_true",
        help="on a fleet, remove the record of a disk whose image is not under this data path "
        "(its node gone for good); the image, on that node, stays",
    )
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


def _disk_state(text: str) -> DiskState:
    """A status as any of Miren's spellings writes it: ``deleting``, ``DELETING``, ``status.deleting``."""
    try:
        return DiskState(text)
    except ValueError:
        choices = ", ".join(state.value for state in DiskState)
        raise argparse.ArgumentTypeError(f"{text!r} is not a disk status; use one of {choices}") from None


def _store(args: argparse.Namespace, *, create: bool = False) -> Catalog:
    return catalog_from(args, create=create)


def cmd_disk_create(args: argparse.Namespace) -> int:
    created = create_disk(
        _store(args, create=True), args.name, size_bytes=args.size, filesystem=args.filesystem
    )
    if created.formatted:
        say_done(
            f"created disk {args.name}: {args.filesystem}, {args.size} bytes, image {created.image_path}"
        )
    else:
        say_done(f"created disk {args.name}: {args.size} bytes, image {created.image_path}")
        say(
            f"mirenfs: warning: mkfs.{args.filesystem} is not installed, so the image of disk {args.name} "
            f"has no filesystem yet; install {created.mkfs_missing} and run mkfs.{args.filesystem} "
            f"{created.image_path}",
            file=sys.stderr,
        )
    return 0


def cmd_disk_add(args: argparse.Namespace) -> int:
    name = validate_disk_name(args.name)
    image_path = os.path.abspath(args.image)
    mount = mirenfs_mount_holding(image_path)  # before a stat, which a stopped mount would hang
    if mount is not None:  # trial Q: the mount then looked the image up through itself, and hung
        raise MirenfsError(
            f"cannot register {image_path} as disk {name}: it is in the mirenfs mount at {mount}, which "
            f"serves snapshots, not images; to make a disk of a snapshot, copy it into {mount}/restore/"
            f"{name}.mirn"
        )
    try:
        info = os.stat(image_path)
    except OSError as exc:
        raise MirenfsError(f"cannot register {image_path} as disk {name}: {exc.strerror}") from None
    if not os.path.isfile(image_path):
        raise MirenfsError(f"cannot register {image_path} as disk {name}: it is not a regular file")
    _refuse_a_snapshot(image_path, name)
    detected = detect_filesystem(image_path)
    filesystem = args.filesystem or detected
    if detected is not None and filesystem != detected:  # trial T: accepted without a word
        say(
            f"mirenfs: warning: {image_path} holds {detected} by its superblock, not {filesystem} as "
            f"--filesystem says; its snapshots will say {filesystem}, and a disk restored from them too",
            file=sys.stderr,
        )
    if filesystem is None:
        _refuse_what_the_data_path_keeps(args, image_path, name)
        raise MirenfsError(
            f"cannot tell the filesystem of {image_path}; pass --filesystem {'|'.join(FILESYSTEMS)}"
        )
    catalog = _store(args, create=True)
    # Trial V: the store itself, or another disk's managed image, was taken as an image, and a
    # restore into the disk then destroyed the catalogue (or the other disk). Its own image, on
    # a record another host wrote, is adopted below.
    kept = what_the_data_path_keeps_at(image_path, catalog.data_path, catalog.list_disks())
    if kept is not None and (kept.disk != name or kept.by_link):
        shared = "; one image cannot back two disks" if kept.disk is not None else ""
        raise MirenfsError(f"cannot register {image_path} as disk {name}: it is {kept.said}{shared}")
    try:
        catalog.add_disk(name, size_bytes=info.st_size, filesystem=filesystem, image_path=image_path)
    except DiskExistsError:
        # A record another host or tool wrote, naming this very image on this node: register it here.
        if not (isinstance(catalog, ImageAdopting) and catalog.adopt_image(name, image_path)):
            raise
        say(
            f"registered the image {image_path} of disk {name} on this host: it may now be backed up and "
            "restored here"
        )
        return 0
    say_done(
        f"added disk {name}: {filesystem}, {info.st_size} bytes, image {image_path} (kept on disk remove)"
    )
    return 0


def _refuse_a_snapshot(image_path: str, name: str) -> None:
    """A snapshot is no disk image, whatever ``--filesystem`` says (trial R s18: without it, the
    command asked for one; with it, the snapshot became the disk's image)."""
    try:
        with open(image_path, "rb") as image:
            start = image.read(len(MAGIC))
    except OSError as exc:
        raise MirenfsError(f"cannot register {image_path} as disk {name}: {exc.strerror}") from None
    if start == MAGIC:
        raise MirenfsError(
            f"cannot register {image_path} as disk {name}: it is a mirenfs snapshot, not a disk image; "
            f"restore it first (mirenfs restore {image_path} --image NEW.img, or copy it into a "
            f"mount's restore/{name}.mirn, which makes the disk too)"
        )


def _refuse_what_the_data_path_keeps(args: argparse.Namespace, image_path: str, name: str) -> None:
    """Before ``--filesystem`` is asked for: a file the data path keeps (its disk store, its state)
    is named as such (trial R s18: the store got "pass --filesystem", then was refused with it)."""
    try:
        data_path = resolve_data_path(args.data_path)
    except MirenfsError:
        return  # no data path yet: nothing of one to be taken for an image
    kept = what_the_data_path_keeps_at(image_path, data_path, [])
    if kept is not None:
        raise MirenfsError(f"cannot register {image_path} as disk {name}: it is {kept.said}")


def cmd_disk_list(args: argparse.Namespace) -> int:
    store = _store(args)
    every = store.list_disks()
    records = [record for record in every if record.local or args.all_nodes]
    spec = catalog_spec_from(args.catalog)
    if not records and spec is not None and spec.etcd is not None:  # a wrong --node or prefix: say so
        problem = none_on_this_node(every, url=spec.etcd.url, node=node_from(args.node))
        if problem is not None:  # stderr: the table and the JSON stay as they were
            say(f"mirenfs: {problem}", file=sys.stderr)
    elif not every and spec is None and (hint := etcd_catalogue_hint(store.data_path)):
        say(  # no --catalog (a cron job, a new shell): the empty SQLite store was read
            f"mirenfs: the SQLite store of {store.data_path} holds no disks; this data path has talked "
            f"to {hint}",
            file=sys.stderr,
        )
    if not records and (orphans := images_no_disk_has(every, data_path=store.data_path)):
        say(f"mirenfs: {orphans}", file=sys.stderr)
    if args.json:
        entries = []
        for record in records:
            entry = record.to_json()
            entry["image_exists"] = bool(record.image_path and os.path.isfile(record.image_path))
            entries.append(entry)
        print(json.dumps(entries, indent=2))
        return 0
    nodes = any(record.volume is not None and record.volume.node for record in records)
    table = [("NAME", "STATUS", "FILESYSTEM", "SIZE", "LEASES", *(("NODE",) if nodes else ()), "IMAGE")]
    for record in records:
        bound = [lease.id for lease in record.leases if lease.status == LeaseState.BOUND]
        image = printable(record.image_path) if record.image_path else "-"
        if record.image_path and not os.path.isfile(record.image_path):
            image += " (missing)"
        node = (record.volume.node if record.volume else None) or "-"
        table.append(
            (
                record.disk.name,
                record.disk.status.value,
                printable(record.disk.filesystem),  # a store written before restores checked it
                human_size(record.disk.size_bytes),
                ",".join(bound) or "-",
                *((node,) if nodes else ()),
                image if record.local else "(on that node)",
            )
        )
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_disk_set_status(args: argparse.Namespace) -> int:
    name = validate_disk_name(args.name)
    old, new = _store(args).set_disk_status(name, args.status)
    say_done(f"disk {name}: {old.value} -> {new.value}")
    return 0


def cmd_disk_remove(args: argparse.Namespace) -> int:
    removed = remove_disk(_store(args), args.name, force=args.force)
    node = removed.record.volume.node if removed.record.volume is not None else None
    if not removed.record.local and node is not None:
        say_done(f"removed disk {args.name}; its image, on node {node}, was not touched")
    elif removed.image_removed:
        say_done(f"removed disk {args.name} and its image {removed.record.image_path}")
    elif removed.record.image_path and removed.record.volume and removed.record.volume.image_path:
        say_done(f"removed disk {args.name}; its registered image {removed.record.image_path} is kept")
    elif removed.record.image_path:
        say_done(f"removed disk {args.name} (it had no image at {removed.record.image_path})")
    else:
        say_done(f"removed disk {args.name}")
    return 0


# --- leases ---


def cmd_lease_acquire(args: argparse.Namespace) -> int:
    """The lease's id is the output, not a report of a change: a lease whose id nobody could
    read (standard output full, its reader gone) would hold the disk, refusing restores, until
    someone found it; it is released again (review S3 F7)."""
    name = validate_disk_name(args.name)
    if getattr(sys.stdout, "closed_at_start", False):  # see mirenfs.launch (review S4 F12)
        raise MirenfsError(
            "standard output is closed, so nobody would learn the lease's id: no lease was acquired"
        )
    store = _store(args)
    lease = store.acquire_lease(name)
    try:
        say(lease.id, flush=True)
    except OSError as exc:
        silence_standard_output()
        try:
            store.release_lease(lease.id)
        except MirenfsError as failed:  # the id must be said somewhere, or nobody can release it
            raise MirenfsError(
                f"standard output could not take the id of the lease just acquired on disk {name} "
                f"({exc.strerror}), and releasing it failed too ({failed}): it is {lease.id}; release it "
                f"with mirenfs lease release {lease.id}"
            ) from None
        if isinstance(exc, BrokenPipeError):
            raise  # the reader went away: ended quietly, as every command is
        raise MirenfsError(
            f"standard output could not take the id of the lease just acquired on disk {name} "
            f"({exc.strerror}), so the lease was released again; disk {name} is as it was"
        ) from None
    return 0


def cmd_lease_release(args: argparse.Namespace) -> int:
    lease, disk_name, changed = _store(args).release_lease(args.lease_id)
    if changed:
        say_done(f"released lease {lease.id} of disk {disk_name}")
    else:
        say(f"lease {lease.id} of disk {disk_name} was already released")
    return 0
