"""``catalog copy``: move a host's disk catalogue between SQLite and etcd (either way), idempotently.

Parser beside handler; what a copy does is ``disks.catalogs.copy_catalog``'s job.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mirenfs.cli.common import add_scope_option, resolve_data_path, say, say_done
from mirenfs.disks.catalogs import (
    ETCD_TLS_SCHEME,
    NODE_ENV,
    CatalogSpec,
    CopyReport,
    copy_catalog,
    forget_move,
    move_mark,
    node_from,
    note_move,
    open_catalog,
    parse_catalog,
    read_move,
    same_catalogue,
)
from mirenfs.disks.model import Catalog
from mirenfs.errors import MirenfsError


def register(commands: Any) -> None:
    """Add ``catalog copy`` to the top-level subcommands (an argparse subparsers object)."""
    catalog = commands.add_parser("catalog", help="the disk catalogue: copy it between SQLite and etcd")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True, metavar="COMMAND")
    copy = catalog_commands.add_parser(
        "copy",
        help="copy every disk (ids, volumes, leases) from one catalogue into another; running it "
        "again changes nothing",
        description="CATALOG is etcd://HOST:PORT[,HOST:PORT…][/PREFIX] (etcds:// for TLS), "
        "sqlite:///DATA-PATH or a data path.",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="CATALOG", help="the catalogue to read")
    copy.add_argument("--to", dest="destination", required=True, metavar="CATALOG", help="the one to write")
    add_scope_option(
        copy,
        "node",
        help=f"the node whose disks these are (default: ${NODE_ENV}, else the hostname): SQLite disks "
        "copied to etcd get it; only its disks are copied from etcd to SQLite",
    )
    add_scope_option(
        copy,
        "data_path",
        help="this host's data path, when neither catalogue is SQLite (it only names image paths)",
    )
    copy.set_defaults(handler=cmd_catalog_copy)


def cmd_catalog_copy(args: argparse.Namespace) -> int:
    # Parsed before anything is opened: a typo in either is one line, and nothing is written.
    source_spec, destination_spec = (
        _spec(args.source, "--from", args.destination),
        _spec(args.destination, "--to", args.source),
    )
    if (source_spec.data_path, source_spec.etcd) == (destination_spec.data_path, destination_spec.etcd):
        raise MirenfsError(f"--from and --to name the same catalogue ({args.source})")
    if source_spec.etcd is None and destination_spec.etcd is None:  # review C: images not there
        raise MirenfsError(
            f"--from {args.source} and --to {args.destination} are both SQLite stores, each of its own data "
            "path's images: a copy would list disks whose images are not there; to move a disk to "
            "another data path, back it up there and restore it (mirenfs backup NAME -o FILE; "
            "mirenfs restore FILE --data-path OTHER)"
        )
    node = node_from(args.node)
    sqlite_path = next(
        (spec.data_path for spec in (source_spec, destination_spec) if spec.data_path is not None), None
    )
    if sqlite_path is not None and args.data_path and os.path.abspath(args.data_path) != sqlite_path:
        raise MirenfsError(
            f"--data-path {args.data_path} does not apply here: the SQLite catalogue is the store of "
            f"data path {sqlite_path}, which names the image paths; leave --data-path out"
        )
    # Between two etcd catalogues the data path only names images, but this host's registrations and
    # the clusters it pinned are kept there: a missing one is refused, not made (trial R s18).
    data_path = sqlite_path or resolve_data_path(args.data_path, new_one_hint=False)
    source = _open(source_spec, data_path, node, option="--from")
    destination = _open(destination_spec, data_path, node, option="--to")
    to_etcd = destination_spec.etcd
    moving_from = source_spec.data_path if to_etcd is not None else None
    earlier = read_move(moving_from) if moving_from is not None else None
    again = earlier is not None and to_etcd is not None and same_catalogue(earlier.url, to_etcd.url)
    copied_before = frozenset(earlier.copied_ids) if earlier is not None and again else frozenset()
    report = copy_catalog(source, destination, one_host=to_etcd is None, copied_before=copied_before)
    if moving_from is not None and to_etcd is not None and (report.copied_ids or again):
        note_move(moving_from, to_etcd.url, node, report.copied_ids)  # the store is stale from now on
    elif destination_spec.data_path is not None:
        _move_home(destination_spec.data_path, source, destination, report)
    say_done(
        f"copied the disk catalogue {args.source} to {args.destination}: {len(report.added)} added, "
        f"{len(report.unchanged)} already there"
        + (f", {len(report.differing)} differing left as they are" if report.differing else "")
        + (f", {len(report.skipped)} on other nodes left out" if report.skipped else "")
        + (
            f", {len(report.removed_since)} removed there since an earlier copy left out "
            f"({', '.join(report.removed_since)})"
            if report.removed_since
            else ""
        )
    )
    problems = []
    if report.differing:
        problems.append(
            f"{len(report.differing)} disk(s) are in {args.destination} already and differ from "
            f"{args.source}'s (status, volume, node or leases): {', '.join(report.differing)}; they were "
            "left as they are there, since a copy must not undo a newer lease or status (check --node "
            "if every disk differs)"
        )
    if report.conflicts:
        clashing = ", ".join(report.conflicts)
        problems.append(
            f"{len(report.conflicts)} disk(s) clash with other disks in {args.destination} (their name, "
            f"or the image they name, is another disk's there: see the warnings above) and were not "
            f"copied: {clashing}; "
            + (
                _left_in_a_moved_store(moving_from, report.conflicts[0], to_etcd.url, node)
                if moving_from is not None and to_etcd is not None
                else "remove or rename those there, then copy again"
            )
        )
    if report.unusable:
        problems.append(
            f"{len(report.unusable)} disk(s) name an image this host does not use (see the warnings "
            f"above) and were not copied: {', '.join(report.unusable)}"
        )
    if problems:
        raise MirenfsError("; and ".join(problems))
    return 0


def _left_in_a_moved_store(data_path: str, first: str, fleet: str, node: str) -> str:
    """What to do with disks a move left in its SQLite store, which is marked as moved all the
    same (the others' copies are the fleet's now): reached only with --catalog sqlite:// (trial
    E22 E6: the advice named the fleet's disk, which another host may be using)."""
    store = f"sqlite://{data_path}"
    return (
        f"they stay in the SQLite store of {data_path}, which commands now reach only with --catalog "
        f"{store}: bring one into the fleet under a new name (mirenfs backup {first} --catalog {store} "
        f"-o {first}.mirn, then mirenfs restore {first}.mirn --name NEW --catalog {fleet} --node {node}, "
        f"then mirenfs disk remove {first} --catalog {store}), or, if the fleet's disk of that name is not "
        "needed, remove it there and copy again"
    )


def _move_home(data_path: str, fleet: Catalog, store: Catalog, report: CopyReport) -> None:
    """Disks copied back into a SQLite store marked as moved: the mark goes only once that store
    holds what the fleet holds (trial W2: a copy back that failed lifted it, and a later command
    without --catalog replaced a leased, attached disk's image through the older store)."""
    move = read_move(data_path)
    if move is None:
        return
    in_fleet = {record.disk.id for record in fleet.list_disks()}
    removed_there = sorted(
        record.disk.name
        for record in store.list_disks()
        if record.disk.id in move.copied_ids and record.disk.id not in in_fleet
    )
    if report.differing or report.conflicts or report.unusable or removed_there:
        gone = f"; {', '.join(removed_there)} were removed from {move.url} since" if removed_there else ""
        mark = move_mark(data_path)
        say(
            f"the SQLite store of {data_path} stays marked as moved: it does not hold what {move.url} "
            f"holds (see the disks named below{gone}); to use it as it is all the same, remove {mark}",
            file=sys.stderr,
        )
        return
    forget_move(data_path)
    say(f"the SQLite store of {data_path} is in use again (disks copied back to it)")


def _spec(text: str, option: str, other: str) -> CatalogSpec:
    """``text`` parsed; the TLS settings may be meant for ``other`` (etcd:// to etcds://)."""
    spec = parse_catalog(text, tls_elsewhere=other.strip().lower().startswith(ETCD_TLS_SCHEME))
    if spec.etcd is None and spec.data_path is None:
        raise MirenfsError(f"{option} {text}: name a SQLite catalogue by its data path, sqlite:///DIR or DIR")
    return spec


def _open(spec: CatalogSpec, data_path: str, node: str, *, option: str) -> Catalog:
    """A SQLite catalogue's data path must exist, also to be written to: it is the store of the
    data path that holds the copied disks' images, so a missing one is a typo (or the wrong host),
    and an empty store there would list disks whose images are not there."""
    if spec.data_path is not None:
        return open_catalog(spec, resolve_data_path(spec.data_path, given_by=option), node=node)
    return open_catalog(spec, data_path, node=node)
