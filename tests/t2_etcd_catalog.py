"""The disk catalogue on a real etcd (Debian's etcd-server on 127.0.0.1, started per module, each
test under its own key prefix): creation races, compare-and-swap, nodes, Miren's spellings in
etcd records, failing closed, the watched copy, ``catalog copy`` and the CLI with ``--catalog``.
No FUSE here (t4_etcd.py mounts)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from mirenfs.disks import etcd as etcd_module
from mirenfs.disks.catalogs import images_no_disk_has, open_catalog, parse_catalog
from mirenfs.disks.creations import mark_creating
from mirenfs.disks.etcd import CatalogWatch, EtcdCatalog, EtcdKV, _delete, _put
from mirenfs.disks.manage import create_disk, sweep_stale_staging
from mirenfs.disks.model import DiskState, Lease, LeaseState
from mirenfs.disks.rules import prepare_backup, prepare_restore
from mirenfs.disks.store import Store
from mirenfs.disks.trust import TrustedImages, disk_key
from mirenfs.errors import (
    CatalogUnreachableError,
    DiskBusyError,
    DiskDeletingError,
    DiskElsewhereError,
    DiskExistsError,
    DiskLeasedError,
    DiskNotFoundError,
    ImageNotHereError,
    LeaseNotFoundError,
    StoreError,
)

from support.data import sha256_file, write_image
from support.etcd import EtcdCluster, free_port
from support.mounts import wait_for
from support.runners import ok, run_cli
from support.vectors import GO_EXT4, GO_ODD

pytestmark = pytest.mark.timeout(120)


def prefix() -> str:
    return f"t2-{secrets.token_hex(4)}"


def etcd_catalog(url: str, data_path: Path, node: str) -> EtcdCatalog:
    data_path.mkdir(parents=True, exist_ok=True)
    catalog = open_catalog(url, str(data_path), node=node)
    assert isinstance(catalog, EtcdCatalog)
    return catalog


@pytest.fixture
def hosts(etcd: EtcdCluster, tmp_path: Path) -> tuple[EtcdCatalog, EtcdCatalog]:
    """Two hosts, nodes ``a`` and ``b`` with their own data paths, sharing a fresh prefix of one etcd."""
    url = etcd.url(prefix())
    return etcd_catalog(url, tmp_path / "a", "a"), etcd_catalog(url, tmp_path / "b", "b")


def put_raw(catalog: EtcdCatalog, name: str, record: dict[str, object]) -> None:
    """A disk record as another writer (Miren's own code) might have put it."""
    assert catalog.kv.txn([], [_put(f"{catalog.disks_prefix}{name}", json.dumps(record))]).succeeded


# --- the backend's semantics ---


def test_disks_are_global_volumes_are_on_their_node(hosts: tuple[EtcdCatalog, EtcdCatalog]) -> None:
    a, b = hosts
    pg = a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    b.add_disk("web", size_bytes=8192, filesystem="xfs")
    seen_by_b = {record.disk.name: record for record in b.list_disks()}
    assert sorted(seen_by_b) == ["pg", "web"]
    assert seen_by_b["web"].local and seen_by_b["web"].image_path is not None
    assert not seen_by_b["pg"].local and seen_by_b["pg"].image_path is None
    assert seen_by_b["pg"].volume is not None and seen_by_b["pg"].volume.node == "a"
    assert a.find_volume_by_disk_id(pg.disk.id).node == "a"
    with pytest.raises(DiskElsewhereError, match="on node a"):
        b.find_volume_by_disk_id(pg.disk.id)
    with pytest.raises(DiskElsewhereError):  # a restore through the wrong node is refused, not redirected
        prepare_restore(b, "pg", data_path=b.data_path, overwrite=True, creator=b)
    with pytest.raises(DiskExistsError):
        b.add_disk("pg", size_bytes=1, filesystem="ext4")
    with pytest.raises(DiskNotFoundError):
        a.find_disk_by_name("nope")
    assert a.get_disk("web").disk.filesystem == "xfs"


def test_one_name_created_by_many_hosts_at_once_is_one_disk(hosts: tuple[EtcdCatalog, EtcdCatalog]) -> None:
    a, b = hosts
    barrier = threading.Barrier(12)
    outcomes: list[str] = []

    def create(catalog: EtcdCatalog) -> None:
        barrier.wait(timeout=30)
        try:
            catalog.create_disk_for_restore("race", size_bytes=4096, filesystem="ext4")
            outcomes.append(f"created on {catalog.node}")
        except DiskExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(catalog,)) for catalog in (a, b) * 6]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes).count("exists") == 11, outcomes
    assert [record.disk.name for record in a.list_disks()] == ["race"]
    assert a.get_disk("race").disk.status is DiskState.PROVISIONING


def test_a_lease_in_a_record_another_writer_put_is_released_by_its_id(
    hosts: tuple[EtcdCatalog, EtcdCatalog],
) -> None:
    """Review: a record written without mirenfs's index keys (Miren's own code) listed its bound
    lease, and ``lease release`` of that id said there was no such lease."""
    a, b = hosts
    a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    lease = a.acquire_lease("pg")
    assert a.kv.txn([], [_delete(a._lease_key(lease.id))]).succeeded  # as the other writer left it
    released, name, changed = b.release_lease(lease.id)
    assert (released.status, name, changed) == (LeaseState.RELEASED, "pg", True)
    assert [x.status for x in a.get_disk("pg").leases] == [LeaseState.RELEASED]
    with pytest.raises(LeaseNotFoundError, match="there is no lease lease-none"):
        b.release_lease("lease-none")


def test_a_restore_into_a_disk_a_killed_restore_here_was_creating_needs_no_consent(
    hosts: tuple[EtcdCatalog, EtcdCatalog],
) -> None:
    """Trial E22 E2 made a disk whose image is not under this data path need --force; one a
    restore on this host was creating when it was killed (its creation note is here) has no image
    anywhere yet, and restoring it again is how it is finished."""
    a, _b = hosts
    killed = a.create_disk_for_restore("half", size_bytes=4096, filesystem="ext4")  # no image made
    with pytest.raises(ImageNotHereError, match="disk half of node a has no image at"):
        prepare_restore(a, "half", data_path=a.data_path, overwrite=False, creator=a)
    mark_creating(a.data_path, killed.disk.id)  # what the killed restore noted first
    target = prepare_restore(a, "half", data_path=a.data_path, overwrite=False, creator=a)
    assert target.existing is not None and target.existing.id == killed.disk.id


def test_the_loser_of_a_create_race_between_hosts_is_told_where_the_disk_is(
    hosts: tuple[EtcdCatalog, EtcdCatalog],
) -> None:
    """Trial W: the loser was told to "restore again", which its node then refused."""
    a, b = hosts
    target = prepare_restore(b, "race1", data_path=b.data_path, overwrite=False, creator=b)
    a.create_disk_for_restore("race1", size_bytes=4096, filesystem="ext4")  # host a wins meanwhile
    with pytest.raises(DiskExistsError) as lost:
        target.open(4096, "ext4")
    assert "disk race1 was created on node a while this restore began" in str(lost.value)
    assert str(lost.value).endswith("to replace its image, restore it through node a")


def test_released_leases_beyond_the_latest_few_leave_the_record_and_their_keys(
    hosts: tuple[EtcdCatalog, EtcdCatalog],
) -> None:
    """Trial E22 E7: every acquire and release grew the disk's record (and left a key), which
    every change rewrites: after ~28 000 cycles it would pass etcd's request limit, and no lease
    or status change of that disk would go through any more."""
    a, _b = hosts
    a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    cycles = []
    for _ in range(etcd_module.RELEASED_LEASES_KEPT + 12):
        cycles.append(a.acquire_lease("pg").id)
        a.release_lease(cycles[-1])
    kept = cycles[-etcd_module.RELEASED_LEASES_KEPT - 1 :]  # pruned at each binding: the last one too
    leases = a.get_disk("pg").leases
    assert [lease.id for lease in leases] == kept
    assert all(lease.status is LeaseState.RELEASED for lease in leases)
    _, keys, _ = a.kv.range(a._lease_key(""), prefix=True)
    assert sorted(key.key.rsplit("/", 1)[1] for key in keys) == sorted(kept)
    with pytest.raises(LeaseNotFoundError):  # an old one is gone, as if it had never been
        a.release_lease(cycles[0])
    bound = a.acquire_lease("pg")  # one bound is never dropped, nor the latest released
    assert [lease.id for lease in a.get_disk("pg").leases] == [*kept[1:], bound.id]


def test_a_disk_with_more_released_leases_than_one_transaction_takes_is_leased_and_copied(
    hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path
) -> None:
    """Review D22 D1: a disk whose record an older mirenfs let grow to 150 released leases could
    never be leased again (one transaction deleted every old key, over etcd's 128 operations), and
    a SQLite disk with as many could not be copied into etcd. A binding drops the oldest 64."""
    a, _b = hosts
    a.add_disk("old", size_bytes=4096, filesystem="ext4")
    grown = tuple(
        Lease(f"lease-{n:016x}", a.get_disk("old").disk.id, LeaseState.RELEASED) for n in range(150)
    )
    a._update("old", lambda stored: (replace(stored, leases=grown), [], []))
    counts = []
    for _ in range(3):
        lease = a.acquire_lease("old")
        counts.append(len(a.get_disk("old").leases))
        a.release_lease(lease.id)
    assert counts == [150 - 64 + 1, 150 - 128 + 2, etcd_module.RELEASED_LEASES_KEPT + 1]

    store = Store(str(tmp_path / "sqlite"))
    store.add_disk("many", size_bytes=4096, filesystem="ext4")
    for _ in range(150):
        store.release_lease(store.acquire_lease("many").id)
    assert a.put_record(store.get_disk("many")) == "added"
    kept = [lease.id for lease in store.get_disk("many").leases][-etcd_module.RELEASED_LEASES_KEPT :]
    assert [lease.id for lease in a.get_disk("many").leases] == kept


def test_concurrent_lease_changes_lose_no_update(hosts: tuple[EtcdCatalog, EtcdCatalog]) -> None:
    """Every change is a compare-and-swap: leases bound and released by many threads on two hosts
    all end up in the record, and two leases are never bound at once."""
    a, b = hosts
    a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    acquired: list[str] = []
    released: list[tuple[str, bool]] = []
    overlaps: list[str] = []

    def churn(catalog: EtcdCatalog) -> None:
        for _ in range(8):
            try:
                lease = catalog.acquire_lease("pg")
            except DiskBusyError:
                continue
            acquired.append(lease.id)
            bound = [x for x in catalog.find_leases_by_disk_id(lease.disk_id) if x.status is LeaseState.BOUND]
            if [x.id for x in bound] != [lease.id]:
                overlaps.append(f"{lease.id} bound with {bound}")
            _, _, changed = catalog.release_lease(lease.id)  # raises if its binding was lost
            released.append((lease.id, changed))

    threads = [threading.Thread(target=churn, args=(catalog,)) for catalog in (a, b) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    leases = a.get_disk("pg").leases
    assert acquired and not overlaps
    assert sorted(released) == sorted((lease_id, True) for lease_id in acquired)  # none lost
    # The record keeps the latest released leases (and the one released after the last binding).
    assert {lease.id for lease in leases} <= set(acquired)
    assert len(leases) == min(len(acquired), etcd_module.RELEASED_LEASES_KEPT + 1)
    assert all(lease.status is LeaseState.RELEASED for lease in leases)
    old, new = b.set_disk_status("pg", "attached")
    assert (old, new) == (DiskState.PROVISIONED, DiskState.ATTACHED)
    assert [lease.id for lease in a.get_disk("pg").leases] == [lease.id for lease in leases]


def test_a_lease_bound_through_one_host_refuses_a_restore_through_the_other(
    hosts: tuple[EtcdCatalog, EtcdCatalog],
) -> None:
    a, b = hosts
    a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    lease = b.acquire_lease("pg")
    with pytest.raises(DiskLeasedError, match=lease.id):
        prepare_restore(a, "pg", data_path=a.data_path, overwrite=True, creator=a)
    with pytest.raises(DiskBusyError):
        a.acquire_lease("pg")
    released, name, changed = a.release_lease(lease.id)
    assert (released.status, name, changed) == (LeaseState.RELEASED, "pg", True)
    assert a.release_lease(lease.id)[2] is False
    prepare_restore(a, "pg", data_path=a.data_path, overwrite=True, creator=a)


def test_restores_create_finalize_and_clean_up(hosts: tuple[EtcdCatalog, EtcdCatalog]) -> None:
    a, _b = hosts
    created = a.create_disk_for_restore("new", size_bytes=4096, filesystem="ext4")
    assert created.volume.node == "a" and a.get_disk("new").disk.status is DiskState.PROVISIONING
    created.finalize()
    assert a.get_disk("new").disk.status is DiskState.PROVISIONED
    a.update_disk(created.disk.id, size_bytes=8192, filesystem="xfs")
    assert (a.get_disk("new").disk.size_bytes, a.get_disk("new").disk.filesystem) == (8192, "xfs")
    gone = a.create_disk_for_restore("gone", size_bytes=4096, filesystem="ext4")
    gone.cleanup()
    with pytest.raises(DiskNotFoundError):
        a.get_disk("gone")
    assert a.delete_disk_records(created.disk.id) and not a.delete_disk_records(created.disk.id)
    assert a.list_disks() == [] and a.kv.range(a.location.root, prefix=True)[1] == []  # no index left


def test_an_image_backs_one_disk_per_node(hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path) -> None:
    a, b = hosts
    image = str(tmp_path / "shared.img")
    a.add_disk("one", size_bytes=1, filesystem="ext4", image_path=image)
    with pytest.raises(DiskExistsError, match="belongs to disk one"):
        a.add_disk("two", size_bytes=1, filesystem="ext4", image_path=image)
    b.add_disk("two", size_bytes=1, filesystem="ext4", image_path=image)  # the same path on another host
    assert a.explicit_image_paths() == [image] and b.explicit_image_paths() == [image]


@pytest.mark.parametrize("spelling", ["deleting", "DELETING", "status.deleting"])
def test_deleting_in_any_spelling_in_etcd_refuses(
    hosts: tuple[EtcdCatalog, EtcdCatalog], spelling: str
) -> None:
    a, _b = hosts
    put_raw(
        a,
        "pg",
        {"id": "d1", "name": "pg", "status": spelling, "filesystem": "ext4", "size_bytes": 4096,
         "volume": {"id": "v1", "node": "a", "image_path": None, "status": "PROVISIONED"}, "leases": []},
    )  # fmt: skip
    assert a.find_disk_by_name("pg").status is DiskState.DELETING
    with pytest.raises(DiskDeletingError):
        prepare_restore(a, "pg", data_path=a.data_path, overwrite=True, creator=a)
    with pytest.raises(DiskDeletingError):
        prepare_backup(a, "pg", data_path=a.data_path)
    with pytest.raises(DiskBusyError):
        a.acquire_lease("pg")


@pytest.mark.parametrize("spelling", ["bound", "BOUND", "status.bound"])
def test_bound_in_any_spelling_in_etcd_refuses(hosts: tuple[EtcdCatalog, EtcdCatalog], spelling: str) -> None:
    a, _b = hosts
    put_raw(
        a,
        "pg",
        {"id": "d1", "name": "pg", "status": "status.provisioned", "filesystem": "ext4", "size_bytes": 4096,
         "volume": {"id": "v1", "node": "a", "image_path": None, "status": "provisioned"},
         "leases": [{"id": "l1", "status": spelling}]},
    )  # fmt: skip
    with pytest.raises(DiskLeasedError, match="l1"):
        prepare_restore(a, "pg", data_path=a.data_path, overwrite=True, creator=a)


def test_a_disk_with_no_volume_or_no_node_is_removed_from_any_host(etcd: EtcdCluster, tmp_path: Path) -> None:
    """No host holds its image, so none may refuse it as "on another node" (it said "node None")."""
    url = etcd.url(prefix())
    b = etcd_catalog(url, tmp_path / "b", "b")
    put_raw(
        b,
        "nullvol",
        {"id": "d1", "name": "nullvol", "status": "provisioned", "filesystem": "ext4", "size_bytes": 4096,
         "volume": None, "leases": []},
    )  # fmt: skip
    put_raw(
        b,
        "nonode",
        {"id": "d2", "name": "nonode", "status": "provisioned", "filesystem": "ext4", "size_bytes": 4096,
         "volume": {"id": "v2", "node": None, "image_path": None, "status": "provisioned"}, "leases": []},
    )  # fmt: skip
    on_b = ["--catalog", url, "--node", "b", "--data-path", tmp_path / "b"]
    for name in ("nullvol", "nonode"):
        removed = run_cli("disk", "remove", name, *on_b)
        assert removed.code == 0 and "None" not in removed.out + removed.err, removed
        assert removed.out == f"removed disk {name}\n"
    assert b.list_disks() == []


def test_a_damaged_record_is_an_error_never_no_such_disk(
    hosts: tuple[EtcdCatalog, EtcdCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    a, _b = hosts
    a.add_disk("fine", size_bytes=1, filesystem="ext4")
    put_raw(a, "pg", {"id": "d1", "name": "pg", "status": "melting"})
    with pytest.raises(StoreError, match="damaged record for disk pg") as failed:
        prepare_restore(a, "pg", data_path=a.data_path, overwrite=True, creator=a)
    assert not isinstance(failed.value, DiskNotFoundError)
    assert [record.disk.name for record in a.list_disks()] == ["fine"]  # the rest stays listable
    assert "damaged record for disk pg" in caplog.text


# --- failing closed ---


def test_an_unreachable_catalogue_fails_every_lookup_and_creates_nothing(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    data_path = tmp_path / "data"
    catalog = etcd_catalog(f"etcd://127.0.0.1:{port}/t2", data_path, "a")
    message = f"the disk catalogue at etcd://127.0.0.1:{port}/t2 is unreachable"
    for lookup in (
        lambda: catalog.find_disk_by_name("pg"),
        lambda: catalog.list_disks(),
        lambda: catalog.check(),
        lambda: catalog.acquire_lease("pg"),
        lambda: prepare_restore(catalog, "pg", data_path=str(data_path), overwrite=False, creator=catalog),
    ):
        with pytest.raises(CatalogUnreachableError, match=message) as failed:
            lookup()
        assert not isinstance(failed.value, DiskNotFoundError) and failed.value.errno == 5  # EIO
    restore = run_cli(
        "restore", GO_EXT4.path, "--data-path", data_path, "--catalog", f"etcd://127.0.0.1:{port}/t2"
    )
    assert (
        restore.code == 1
        and restore.err
        == f"mirenfs: error: {message} (127.0.0.1:{port}: connection refused); "
        "no disk disk-ext4 was created or changed; try again when the catalogue answers\n"
    )
    assert list(data_path.iterdir()) == []  # nothing created, not even a directory


class _NotEtcd(http.server.BaseHTTPRequestHandler):
    """Some other web server on an endpoint's port: every request gets a 404 page."""

    def do_POST(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        return None


def test_an_endpoint_that_is_not_an_etcd_gateway_counts_as_failed_and_the_next_is_tried(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotEtcd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wrong = f"127.0.0.1:{server.server_address[1]}"
        name = prefix()
        catalog = etcd_catalog(f"etcd://{wrong},{etcd.members[0].endpoint}/{name}", tmp_path / "a", "a")
        catalog.add_disk("pg", size_bytes=4096, filesystem="ext4")
        assert [record.disk.name for record in catalog.list_disks()] == ["pg"]
        alone = etcd_catalog(f"etcd://{wrong}/{name}", tmp_path / "b", "a")
        with pytest.raises(CatalogUnreachableError) as failed:
            alone.list_disks()
        assert f"({wrong}: not an etcd gateway (it answered Not Found))" in str(failed.value)
    finally:
        server.shutdown()
        server.server_close()


def test_a_name_taken_on_another_node_says_which(hosts: tuple[EtcdCatalog, EtcdCatalog]) -> None:
    a, b = hosts
    b.add_disk("pgB", size_bytes=4096, filesystem="ext4")
    with pytest.raises(
        DiskExistsError, match=r"^a disk named pgB already exists \(on node b\); pick another"
    ):
        create_disk(a, "pgB", size_bytes=4096, filesystem="ext4")
    with pytest.raises(DiskExistsError, match=r"\(on this node, b\)"):
        b.add_disk("pgB", size_bytes=4096, filesystem="ext4")


def test_three_members_one_down_changes_nothing_two_down_fail_closed(
    etcd_clusters: Callable[[int], EtcdCluster], tmp_path: Path
) -> None:
    cluster = etcd_clusters(3)
    catalog = etcd_catalog(cluster.url("t2"), tmp_path / "a", "a")
    catalog.add_disk("pg", size_bytes=4096, filesystem="ext4")
    cluster.kill(0)  # the first endpoint the client asks
    catalog.create_disk_for_restore("new", size_bytes=4096, filesystem="ext4").finalize()
    assert catalog.set_disk_status("pg", "detached")[1] is DiskState.DETACHED
    assert [record.disk.name for record in catalog.list_disks()] == ["new", "pg"]
    cluster.kill(1)
    with pytest.raises(CatalogUnreachableError):
        prepare_restore(catalog, "other", data_path=catalog.data_path, overwrite=False, creator=catalog)
    with pytest.raises(CatalogUnreachableError):
        catalog.set_disk_status("pg", "attached")
    cluster.restart(1)  # quorum again: everything works as before
    cluster.wait_healthy()
    assert catalog.find_disk_by_name("pg").status is DiskState.DETACHED


# --- the mount's watched copy ---


def test_a_watch_that_stops_delivering_while_etcd_answers_is_started_again(
    hosts: tuple[EtcdCatalog, EtcdCatalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial W: a stream that stopped delivering (a proxy, a half-open connection) while etcd
    answered the probe left the copy stale for good, in silence: a disk set to deleting was still
    served, a new one never shown. The probe compares etcd's newest change with the watch's."""
    a, b = hosts
    a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    receive = CatalogWatch._receive

    def deaf(self: CatalogWatch, message: dict[str, object], *args: object) -> None:
        result = message.get("result")
        if isinstance(result, dict) and result.get("events"):
            return  # the stream goes on, but what it carries never arrives
        receive(self, message, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(CatalogWatch, "_receive", deaf)
    monkeypatch.setattr(etcd_module, "WATCH_LAG_S", 0.5)  # the same check, sooner (probes: 0.5 s)
    view = a.watch()
    assert isinstance(view, CatalogWatch)
    try:
        assert [record.disk.name for record in view.list_disks()] == ["pg"]
        b.add_disk("web", size_bytes=1, filesystem="ext4")
        wait_for(lambda: len(view.list_disks()) == 2, "the watch started again", timeout=10.0)
        b.delete_disk_records(b.get_disk("web").disk.id)
        wait_for(lambda: len(view.list_disks()) == 1, "the watch started again", timeout=10.0)
    finally:
        view.close()
        view.join()


def test_the_watched_copy_follows_changes_within_a_second_and_fails_closed(
    etcd_clusters: Callable[[int], EtcdCluster], tmp_path: Path
) -> None:
    cluster = etcd_clusters(1)
    url = cluster.url("t2")
    a, b = etcd_catalog(url, tmp_path / "a", "a"), etcd_catalog(url, tmp_path / "b", "b")
    a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    view = a.watch()
    assert isinstance(view, CatalogWatch)
    try:
        assert [record.disk.name for record in view.list_disks()] == ["pg"]
        # Review: an idle watch stream a NAT drops silently would never hear of a change again;
        # its connection keeps itself alive, and a peer gone quiet ends it (and a new listing).
        stream = view._stream
        assert stream is not None
        watched = socket.socket(fileno=os.dup(stream.raw.fileno()))
        try:
            assert watched.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert watched.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        finally:
            watched.close()
        started = time.monotonic()
        b.set_disk_status("pg", "status.deleting")
        wait_for(lambda: view.list_disks()[0].disk.status is DiskState.DELETING, "the watch", timeout=1.0)
        b.add_disk("web", size_bytes=1, filesystem="ext4")
        wait_for(lambda: len(view.list_disks()) == 2, "the watch", timeout=1.0)
        assert time.monotonic() - started < 2.0
        cluster.stop_member(0)
        wait_for(lambda: not view.current, "the copy to know it is stale", timeout=5.0)
        with pytest.raises(CatalogUnreachableError, match="is unreachable"):
            view.list_disks()
        cluster.restart(0)
        cluster.wait_healthy()
        wait_for(lambda: view.current, "the copy to catch up", timeout=5.0)
        assert [record.disk.name for record in view.list_disks()] == ["pg", "web"]
    finally:
        view.close()
        view.join()


# --- catalog copy and the CLI ---


def test_catalog_copy_moves_a_host_into_etcd_and_back_idempotently(etcd: EtcdCluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    image = tmp_path / "pg.img"
    image.write_bytes(b"\0" * 65536)
    ok("disk", "add", "pg", "--image", image, "--filesystem", "ext4", "--data-path", data)
    ok("restore", GO_EXT4.path, "--name", "web", "--data-path", data)
    lease = ok("lease", "acquire", "web", "--data-path", data).out.strip()
    url = etcd.url(prefix())
    first = ok("catalog", "copy", "--from", f"sqlite://{data}", "--to", url, "--node", "host1")
    assert "2 added, 0 already there" in first.out
    again = ok("catalog", "copy", "--from", str(data), "--to", url, "--node", "host1")
    assert "0 added, 2 already there" in again.out
    listed = json.loads(
        ok("disk", "list", "--json", "--catalog", url, "--node", "host1", "--data-path", data).out
    )
    assert [(e["name"], e["node"], e["image_exists"]) for e in listed] == [
        ("pg", "host1", True),
        ("web", "host1", True),
    ]
    assert listed[1]["leases"] == [{"id": lease, "status": "bound"}]
    other = etcd_catalog(url, tmp_path / "other", "host2")
    other.add_disk("theirs", size_bytes=1, filesystem="ext4")
    back = tmp_path / "back"
    back.mkdir()
    # pg's image lies outside the new data path, which has not registered it: copied once it has
    refused = run_cli("catalog", "copy", "--from", url, "--to", f"sqlite://{back}", "--node", "host1")
    assert refused.code == 1 and "were not copied: pg" in refused.err
    on_back = ["--catalog", url, "--node", "host1", "--data-path", back]
    ok("disk", "add", "pg", "--image", image, "--filesystem", "ext4", *on_back)  # registers it there
    home = ok("catalog", "copy", "--from", url, "--to", f"sqlite://{back}", "--node", "host1")
    assert "1 added, 1 already there, 1 on other nodes left out" in home.out
    assert sorted(record.disk.name for record in Store(str(back)).list_disks()) == ["pg", "web"]
    copied, original = Store(str(back)).get_disk("web"), Store(str(data)).get_disk("web")
    assert (copied.disk, copied.volume, copied.leases) == (original.disk, original.volume, original.leases)
    assert (
        "0 added, 2 already there"
        in ok("catalog", "copy", "--from", url, "--to", back, "--node", "host1").out
    )
    Store(str(back)).delete_disk_records(Store(str(back)).get_disk("pg").disk.id)
    Store(str(back)).add_disk("pg", size_bytes=1, filesystem="ext4")  # another disk of that name
    clash = run_cli("catalog", "copy", "--from", url, "--to", back, "--node", "host1")
    assert clash.code == 1 and "not copied: pg" in clash.err


def test_catalog_copy_between_etcd_prefixes_trusts_nothing_new_and_shares_no_image(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Review: ``catalog copy`` into etcd registered every image path of this node's records as
    trusted, the ones the source refused too (laundering a record anyone wrote), and wrote a
    disk whose image another disk there already had (two disks on one image)."""
    data = tmp_path / "a"
    source = etcd_catalog(etcd.url(prefix()), data, "a")
    destination = etcd_catalog(etcd.url(prefix()), data, "a")
    shared = tmp_path / "srv" / "pg.img"
    shared.parent.mkdir()
    shared.write_bytes(b"\1" * 65536)
    victim = tmp_path / "outside" / "victim.img"
    victim.parent.mkdir()
    victim.write_bytes(b"\2" * 65536)
    for catalog in (source, destination):  # the same image, registered by this host in each
        name = "pg" if catalog is destination else "pg2"
        ok(
            "disk",
            "add",
            name,
            "--image",
            shared,
            "--filesystem",
            "ext4",
            "--catalog",
            catalog.location.url,
            "--node",
            "a",
            "--data-path",
            data,
        )
    put_raw(source, "out1", _foreign_record("out1", str(victim), "a"))  # untrusted in the source
    copied = run_cli(
        "catalog",
        "copy",
        "--from",
        source.location.url,
        "--to",
        destination.location.url,
        "--node",
        "a",
        "--data-path",  # trial R s18: without it, this wrote into the host's /var/lib/miren
        data,
    )
    assert "clash with other disks" in copied.err and copied.err.endswith(
        "were not copied: pg2; remove or rename those there, then copy again\n"
    ), copied.err
    listed = {record.disk.name: record.image_path for record in destination.list_disks()}
    assert listed == {"out1": None, "pg": str(shared)}  # pg2 not copied; out1 copied, still untrusted
    trusted = json.loads(Path(data, "mirenfs", "trusted-images.json").read_text())["images"]
    assert str(victim) not in trusted


def test_a_move_that_left_a_clashing_disk_behind_says_how_to_reach_it(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Trial E22 E6: a copy into etcd where another host has a disk of the same name still marks
    the SQLite store as moved (the others' copies are the fleet's), and the advice was to remove
    or rename the fleet's disk, which another host may be using. The advice now names the way:
    back the disk up through the store, restore it into the fleet under a new name."""
    url = etcd.url(prefix())
    other = tmp_path / "other"
    other.mkdir()
    ok("disk", "create", "pg", "--size", "1M", "--catalog", url, "--node", "host2", "--data-path", other)
    data = tmp_path / "data"
    for name in ("pg", "web"):
        ok("disk", "create", name, "--size", "1M", "--data-path", data)
    copied = run_cli("catalog", "copy", "--from", data, "--to", url, "--node", "host1")
    store = f"sqlite://{data}"
    assert copied.code == 1 and copied.err.endswith(
        f"were not copied: pg; they stay in the SQLite store of {data}, which commands now reach only "
        f"with --catalog {store}: bring one into the fleet under a new name (mirenfs backup pg --catalog "
        f"{store} -o pg.mirn, then mirenfs restore pg.mirn --name NEW --catalog {url} --node host1, then "
        f"mirenfs disk remove pg --catalog {store}), or, if the fleet's disk of that name is not needed, "
        "remove it there and copy again\n"
    ), copied.err
    fleet = ["--catalog", url, "--node", "host1", "--data-path", data]
    ok("backup", "pg", "--catalog", store, "--data-path", data, "-o", tmp_path / "pg.mirn")
    ok("restore", tmp_path / "pg.mirn", "--name", "pg-host1", *fleet)
    ok("disk", "remove", "pg", "--catalog", store, "--data-path", data)
    assert {
        entry["name"] for entry in json.loads(ok("disk", "list", "--json", "--all-nodes", *fleet).out)
    } == {
        "pg",
        "pg-host1",
        "web",
    }


def moved_to_etcd(etcd: EtcdCluster, tmp_path: Path) -> tuple[Path, str, list[str | Path], str]:
    """Disks pg and web made in a SQLite store, copied into etcd as node host1, and pg leased there:
    (data path, catalogue URL, the options naming it, the lease)."""
    data = tmp_path / "data"
    for name in ("pg", "web"):
        ok("disk", "create", name, "--size", "1M", "--data-path", data)
    url = etcd.url(prefix())
    ok("catalog", "copy", "--from", data, "--to", url, "--node", "host1")
    on_etcd: list[str | Path] = ["--catalog", url, "--node", "host1", "--data-path", data]
    return data, url, on_etcd, ok("lease", "acquire", "pg", *on_etcd).out.strip()


def test_catalog_copy_between_etcd_catalogues_refuses_a_missing_data_path(
    etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial R (s18): between two etcd catalogues, with no --data-path, the copy made the default
    data path (/var/lib/miren) to keep its cluster pin there, where every other command refuses a
    data path that does not exist. Nothing is copied or made."""
    source = etcd_catalog(etcd.url(prefix()), tmp_path / "a", "a")
    source.add_disk("pg", size_bytes=1, filesystem="ext4")
    destination = etcd.url(prefix())
    missing = tmp_path / "typo"
    monkeypatch.setenv("MIRENFS_DATA_PATH", str(missing))
    refused = run_cli("catalog", "copy", "--from", source.location.url, "--to", destination, "--node", "a")
    assert (refused.code, refused.err) == (
        1,
        f"mirenfs: error: the data path {missing} does not exist (from $MIRENFS_DATA_PATH); check it\n",
    )
    assert not missing.exists()
    assert etcd_catalog(destination, tmp_path / "a", "a").list_disks() == []


def test_catalog_copy_run_again_never_undoes_a_newer_lease_or_status(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """After the move, etcd is where leases and statuses change: copying the old SQLite store
    again must leave them, and say which disks it left and why (exit 1)."""
    data, url, on_etcd, lease = moved_to_etcd(etcd, tmp_path)
    ok("disk", "set-status", "web", "deleting", *on_etcd)
    before = etcd_catalog(url, data, "host1").list_disks()
    again = run_cli("catalog", "copy", "--from", data, "--to", url, "--node", "host1")
    assert again.code == 1
    assert "0 added, 0 already there, 2 differing left as they are" in again.out
    assert "differ from" in again.err and "pg, web" in again.err and "left as they are there" in again.err
    assert etcd_catalog(url, data, "host1").list_disks() == before  # the lease and the status stand
    catalog = etcd_catalog(url, data, "host1")
    with pytest.raises(DiskLeasedError):
        prepare_restore(catalog, "pg", data_path=str(data), overwrite=True, creator=catalog)
    ok("lease", "release", lease, *on_etcd)  # its index key still leads to it


def test_a_data_path_whose_disks_were_moved_refuses_its_stale_store_and_a_copy_again_resurrects_nothing(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Trial W: after `catalog copy` to etcd, a command without --catalog (a new shell, sudo,
    cron) went back to the SQLite store and replaced the image of a disk etcd said was leased
    and attached; and copying the old store again brought back a disk removed from etcd since."""
    data, url, on_etcd, _lease = moved_to_etcd(etcd, tmp_path)
    image = Path(etcd_catalog(url, data, "host1").get_disk("pg").image_path or "")
    before = sha256_file(image)
    where = etcd_catalog(url, data, "host1").location.url
    moved = f"the disks of data path {data} were copied to the disk catalogue {where} (node host1)"
    for argv in (["disk", "list"], ["restore", str(GO_EXT4.path), "--name", "pg", "--force"]):
        stale = run_cli(*argv, "--data-path", data)
        assert stale.code == 1 and moved in stale.err and "pass --catalog" in stale.err, stale.err
    assert sha256_file(image) == before
    assert "pg" in ok("disk", "list", "--catalog", f"sqlite://{data}", "--data-path", data).out  # as asked
    ok("disk", "remove", "web", *on_etcd)
    again = run_cli("catalog", "copy", "--from", data, "--to", url, "--node", "host1")  # pg: leased there
    assert "1 removed there since an earlier copy left out (web)" in again.out, again.out
    assert [r.disk.name for r in etcd_catalog(url, data, "host1").list_disks()] == ["pg"]
    # Home again: pg differs (its lease), and web was removed from etcd since: the store stays
    # marked (trial W2: a copy back that failed lifted the mark, and the stale store was used).
    back = run_cli("catalog", "copy", "--from", url, "--to", data, "--node", "host1")
    assert back.code == 1 and f"the SQLite store of {data} stays marked as moved" in back.err
    assert "web were removed from" in back.err
    assert run_cli("disk", "list", "--data-path", data).code == 1
    mark = data / "mirenfs" / "catalog-moved.json"
    mark.write_text("{damaged")  # a damaged mark is no mark's absence (trial W2)
    damaged = run_cli("disk", "list", "--data-path", data)
    assert damaged.code == 1 and f"cannot read {mark}" in damaged.err


def test_a_copy_again_knows_its_catalogue_by_its_prefix_only(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Review S: a copy to /fleet after one to /staging/fleet copied nothing ("removed there
    since"), and an endpoint list spelt otherwise forgot what was copied before."""
    data = tmp_path / "data"
    for name in ("a", "b"):
        ok("disk", "create", name, "--size", "1M", "--data-path", data)
    staging, fleet = prefix(), prefix()
    ok("catalog", "copy", "--from", data, "--to", etcd.url(f"{staging}/{fleet}"), "--node", "n1")
    second = ok("catalog", "copy", "--from", data, "--to", etcd.url(fleet), "--node", "n1")
    assert "2 added" in second.out
    ok("disk", "remove", "b", "--catalog", etcd.url(fleet), "--node", "n1", "--data-path", data)
    endpoint = etcd.members[0].endpoint
    respelt = f"etcd://{endpoint.replace('127.0.0.1', 'localhost')},{endpoint}/{fleet}"
    for _ in range(2):
        again = ok("catalog", "copy", "--from", data, "--to", respelt, "--node", "n1")
        assert "1 removed there since an earlier copy left out (b)" in again.out, again.out
    assert [r.disk.name for r in etcd_catalog(etcd.url(fleet), tmp_path / "x", "n1").list_disks()] == ["a"]


def test_copying_the_disks_back_unchanged_lifts_the_mark(etcd: EtcdCluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok("disk", "create", "pg", "--size", "1M", "--data-path", data)
    url = etcd.url(prefix())
    ok("catalog", "copy", "--from", data, "--to", url, "--node", "host1")
    assert run_cli("disk", "list", "--data-path", data).code == 1
    back = ok("catalog", "copy", "--from", url, "--to", data, "--node", "host1")
    assert f"the SQLite store of {data} is in use again" in back.out
    assert "pg" in ok("disk", "list", "--data-path", data).out


def test_catalog_copy_with_a_wrong_node_moves_no_disk(etcd: EtcdCluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok("disk", "create", "pg", "--size", "1M", "--data-path", data)
    url = etcd.url(prefix())
    ok("catalog", "copy", "--from", data, "--to", url, "--node", "hosta")
    typo = run_cli("catalog", "copy", "--from", data, "--to", url, "--node", "hostb")
    assert typo.code == 1 and "check --node" in typo.err
    [record] = etcd_catalog(url, tmp_path / "b", "hostb").list_disks()
    assert record.volume is not None and record.volume.node == "hosta"


def _foreign_record(name: str, image_path: str, node: str) -> dict[str, object]:
    return {
        "id": f"disk-{name}",
        "name": name,
        "status": "provisioned",
        "filesystem": "ext4",
        "size_bytes": 65536,
        "volume": {"id": f"vol-{name}", "image_path": image_path, "node": node, "status": "provisioned"},
        "leases": [],
    }


def test_a_record_naming_a_file_the_data_path_keeps_is_not_trusted_by_where_it_is(
    hosts: tuple[EtcdCatalog, EtcdCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    """Review: an image under the data path was trusted by where it is, so a record anyone with
    the prefix wrote could name another disk's managed image (or mirenfs's own files), and a
    restore of that record's disk replaced it, leases and `attached` notwithstanding."""
    a, _b = hosts
    data = Path(a.data_path)
    victim = data / "disk-data" / "volumes" / "vol-victim" / "disk.img"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"\1" * 65536)
    before = victim.read_bytes()
    put_raw(a, "decoy", _foreign_record("decoy", str(victim), "a"))
    put_raw(a, "state", _foreign_record("state", str(data / "mirenfs" / "trusted-images.json"), "a"))
    put_raw(a, "store", _foreign_record("store", str(data / "mirenfs.db"), "a"))
    # Review Sec F4: any other file under the data path was trusted by where it is too: a secret
    # Miren keeps there, or a file outside reached through a link there.
    (data / "server").mkdir()
    secret = data / "server" / "ca.key"
    secret.write_bytes(b"the host's key")
    outside = data.parent / "outside-etc"
    outside.mkdir()
    (outside / "shadow").write_bytes(b"root:secret-hash")
    (data / "containers").symlink_to(outside)
    put_raw(a, "key", _foreign_record("key", str(secret), "a"))
    put_raw(a, "shadow", _foreign_record("shadow", str(data / "containers" / "shadow"), "a"))
    put_raw(a, "cron", _foreign_record("cron", str(data / "containers" / "cron.d" / "evil"), "a"))
    ours = data / "images" / "ours.img"
    put_raw(a, "ours", _foreign_record("ours", str(ours), "a"))  # trusted once registered, below
    listed = {record.disk.name: record.image_path for record in a.list_disks()}
    assert set(listed) == {"decoy", "state", "store", "key", "shadow", "cron", "ours"}
    assert set(listed.values()) == {None}
    assert "inside the managed volumes of the data path" in caplog.text
    on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
    restore = run_cli("restore", GO_EXT4.path, "--name", "decoy", "--force", *on_a)
    assert restore.code == 1 and "mirenfs neither reads nor replaces it through disk decoy" in restore.err
    assert victim.read_bytes() == before
    backup = run_cli("backup", "key", "-o", data.parent / "key.mirn", *on_a)
    assert backup.code == 1 and "this host never registered that path for disk key" in backup.err
    created = run_cli("restore", GO_EXT4.path, "--name", "cron", *on_a)
    assert created.code == 1 and "this host never registered that path for disk cron" in created.err
    assert not (data / "images").exists() and sorted(os.listdir(outside)) == ["shadow"]
    assert not (data.parent / "key.mirn").exists()
    ours.parent.mkdir()
    ours.write_bytes(b"\0" * 65536)
    ok("disk", "add", "ours", "--image", ours, "--filesystem", "ext4", *on_a)
    assert a.get_disk("ours").image_path == str(ours)


def test_of_two_records_leading_to_one_image_only_the_first_is_used(
    hosts: tuple[EtcdCatalog, EtcdCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    """Trial W: a copy of pg's record under another name and id (etcdctl, another tool) shared
    pg's volume: a restore through the copy replaced pg's image while pg was leased and attached,
    and `disk remove` of the copy deleted it."""
    a, _b = hosts
    ok(
        "restore",
        GO_EXT4.path,
        "--name",
        "pg",
        "--catalog",
        a.location.url,
        "--node",
        "a",
        "--data-path",
        a.data_path,
    )
    pg = a.get_disk("pg")
    image = Path(pg.image_path or "")
    before = sha256_file(image)
    a.acquire_lease("pg")
    copied = json.loads(a.kv.range(f"{a.disks_prefix}pg")[1][0].value)
    copied.update(name="pgalias", id="disk-00000000000a11a5", leases=[])
    put_raw(a, "pgalias", copied)
    listed = {record.disk.name: record.image_path for record in a.list_disks()}
    assert listed == {"pg": str(image), "pgalias": None}  # the record made first keeps it (trial W2)
    assert (
        "disk pgalias names the image" in caplog.text
        and "which disk pg (recorded first) names" in caplog.text
    )
    on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
    restore = run_cli("restore", GO_ODD.path, "--name", "pgalias", "--force", *on_a)
    assert (
        restore.code == 1
        and "mirenfs neither reads, replaces nor removes it through disk pgalias" in restore.err
    )
    backup = run_cli("backup", "pgalias", "-o", str(Path(a.data_path).parent / "x.mirn"), *on_a)
    assert backup.code == 1
    ok("disk", "remove", "pgalias", *on_a)  # its record goes; the image is pg's, and stays
    assert sha256_file(image) == before
    assert a.get_disk("pg").image_path == str(image)  # pg alone names it again


def test_a_member_of_another_etcd_cluster_in_the_endpoint_list_is_never_taken_for_the_catalogue(
    etcd_clusters: Callable[[int], EtcdCluster], tmp_path: Path
) -> None:
    """Trial W: with a member of another cluster in the list (a typo), a stall of the fleet's
    member moved every command and the mount to that cluster, whose empty prefix was taken for
    an empty catalogue: disks vanished, and a restore created a second disk of a name. Trial W2:
    the first answer was recorded as the catalogue's cluster, a wrong one's too."""
    fleet, other = etcd_clusters(3), etcd_clusters(1)
    name = prefix()
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    odd = other.members[0].endpoint
    halves = f"etcd://{fleet.members[0].endpoint},{odd}/{name}"  # one for each: which is it?
    first = run_cli(
        "restore",
        str(GO_EXT4.path),
        "--name",
        "pg",
        "--catalog",
        halves,
        "--node",
        "a",
        "--data-path",
        elsewhere,
    )
    assert first.code == 1 and "it cannot be told yet which etcd cluster the catalogue is in" in first.err
    mixed = f"etcd://{','.join(m.endpoint for m in fleet.members)},{odd}/{name}"
    on_mixed = ["--catalog", mixed, "--node", "a", "--data-path", data]
    ok("restore", GO_EXT4.path, "--name", "pg", *on_mixed)  # 3 of 4 answer for the fleet: recorded
    # Review S2: an endpoint list edited since (here: the other cluster's only) that shares an
    # endpoint with the one the cluster was learnt through keeps what was learnt.
    edited = f"etcd://{fleet.members[0].endpoint},{odd}/{name}"
    on_edited = ["--catalog", edited, "--node", "a", "--data-path", data]
    assert "pg" in ok("disk", "list", *on_edited).out
    for index in range(3):
        fleet.stop_member(index)
    for argv, on in (
        (["disk", "list"], on_mixed),
        (["restore", str(GO_EXT4.path), "--name", "pg"], on_edited),
    ):
        stalled = run_cli(*argv, *on)
        assert stalled.code == 1 and "is unreachable" in stalled.err, stalled.err
        assert f"{odd}: a member of etcd cluster" in stalled.err
        assert "fix the endpoint list" in stalled.err and "etcd-clusters.json" in stalled.err
    assert etcd_catalog(other.url(name), tmp_path / "third", "a").list_disks() == []  # nothing made there


def test_a_change_etcd_received_without_answering_in_time_is_never_said_to_be_undone(
    hosts: tuple[EtcdCatalog, EtcdCatalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial W: etcd applies a change it got but did not answer in time (a slow fsync, a lost
    reply): `disk create` said unreachable and the disk was there later; a restore said "not
    created" or "unchanged"; a lease was bound whose id nobody was told."""
    a, _b = hosts
    on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
    ok("restore", GO_EXT4.path, "--name", "pg", *on_a)
    ok("restore", GO_EXT4.path, "--name", "web", *on_a)
    real_post = EtcdKV.post
    txns_answered = [10**6]  # how many more changes are answered before the next one is not

    def applied_then_no_answer(self: EtcdKV, path: str, payload: dict[str, object], **kwargs: object):  # type: ignore[no-untyped-def]
        answer = real_post(self, path, payload, **kwargs)  # type: ignore[arg-type]
        if path == "kv/txn":
            txns_answered[0] -= 1
            if txns_answered[0] < 0:
                late = self.unreachable("127.0.0.1:2379: no answer in time")
                late.maybe_applied = True
                raise late
        return answer

    monkeypatch.setattr(EtcdKV, "post", applied_then_no_answer)
    txns_answered[0] = 1  # the record is made; its step to provisioned lands without an answer
    made = run_cli("disk", "create", "made", "--size", "1M", *on_a)
    image = Path(a.get_disk("made").image_path or "")
    assert made.code == 1 and f"disk made was created with its image {image}" in made.err, made.err
    assert image.exists() and a.get_disk("made").disk.status is DiskState.PROVISIONED  # trial W2: deleted
    txns_answered[0] = 0
    removing = run_cli("disk", "remove", "made", *on_a)
    assert removing.code == 1 and "disk made may be `deleting` now all the same" in removing.err
    assert "run `mirenfs disk remove made` again once the catalogue answers" in removing.err
    assert "the change may have been made all the same" not in removing.err  # said once (trial E22 E9)
    created = run_cli("disk", "create", "ghost", "--size", "1M", *on_a)
    assert created.code == 1 and "disk ghost may have been created all the same" in created.err, created.err
    assert "remove it (`mirenfs disk remove ghost`) if it is provisioning" in created.err
    leased = run_cli("lease", "acquire", "pg", *on_a)
    assert (
        leased.code == 1
        and "may have been bound all the same" in leased.err
        and "mirenfs lease release lease-" in leased.err
    )
    fresh = run_cli("restore", GO_EXT4.path, "--name", "late", *on_a)
    assert fresh.code == 1 and "disk late may have been created all the same" in fresh.err, fresh.err
    assert "was not created" not in fresh.err
    over = run_cli("restore", GO_ODD.path, "--name", "web", "--force", *on_a)  # another size: recorded first
    assert (
        over.code == 1
        and "the image of disk web is unchanged, but its record may have been changed" in over.err
    )
    assert "disk web is unchanged;" not in over.err
    monkeypatch.undo()
    listed = {record.disk.name: record for record in a.list_disks()}
    assert {"ghost", "late", "pg"} <= set(listed)  # they did land
    assert [lease.status for lease in listed["pg"].leases] == [LeaseState.BOUND]


def test_looking_for_shared_images_touches_no_image_path(
    hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review S: the check resolved every image path on every listing: one under the mount point
    was looked up through the mount from inside the mount's own listing, which waited for good.
    Records are decoded (and their trust checked) by the watch's thread; the listing looks at
    nothing on disk."""
    a, _b = hosts
    mounted = tmp_path / "mnt"
    mounted.mkdir()
    for name in ("x", "y"):
        image = mounted / f"{name}.img"
        image.write_bytes(b"\1" * 65536)
        on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
        ok("disk", "add", name, "--image", image, "--filesystem", "ext4", *on_a)
    real_lstat, real_stat = os.lstat, os.stat

    def never_inside(path: object, *args: object, **kwargs: object) -> os.stat_result:
        assert not str(path).startswith(str(mounted)), f"{path} was looked at"
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    def stat_never_inside(path: object, *args: object, **kwargs: object) -> os.stat_result:
        assert not str(path).startswith(str(mounted)), f"{path} was looked at"
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    listed = a.list_disks()  # as the mount's watch thread decodes them
    monkeypatch.setattr(os, "lstat", never_inside)
    monkeypatch.setattr(os, "stat", stat_never_inside)
    # What the mount's own listing runs (CatalogWatch.list_disks, under its lock, in a FUSE request).
    assert a.refuse_shared_images(listed) == listed


def test_removing_a_disk_drops_its_images_registration_here(
    hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path
) -> None:
    """Trial W: the registration outlived `disk remove`: a record written later naming that
    path (by anyone who can write the prefix) was trusted at once."""
    a, _b = hosts
    image = tmp_path / "srv" / "newx.img"
    image.parent.mkdir()
    image.write_bytes(b"\1" * 65536)
    on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
    ok("disk", "add", "newx", "--image", image, "--filesystem", "ext4", *on_a)
    ok("disk", "remove", "newx", *on_a)
    assert image.exists()  # a registered image is kept
    put_raw(a, "sneaky", _foreign_record("sneaky", str(image), "a"))
    assert a.get_disk("sneaky").image_path is None


def test_a_catalogue_recorded_in_another_cluster_is_refused_until_its_record_is_removed(
    hosts: tuple[EtcdCatalog, EtcdCatalog],
) -> None:
    """As after etcd was restored from a snapshot (a new cluster id): refused, with the file to
    remove; once it is removed, a running process (a mount) answers again (trial W2: only after
    a remount)."""
    a, _b = hosts
    a.add_disk("pg", size_bytes=4096, filesystem="ext4")
    pins = Path(a.data_path, "mirenfs", "etcd-clusters.json")
    endpoints = [f"{host}:{port}" for host, port in a.location.endpoints]
    pins.write_text(json.dumps({a.location.prefix: {"cluster": "12345", "endpoints": endpoints}}))
    running = etcd_catalog(a.location.url, Path(a.data_path), "a")
    with pytest.raises(
        CatalogUnreachableError, match=f"not of cluster 12345 that this catalogue is in .recorded in {pins}"
    ):
        running.list_disks()
    pins.unlink()
    assert [record.disk.name for record in running.list_disks()] == ["pg"]
    assert json.loads(pins.read_text())[a.location.prefix]["cluster"] != "12345"  # learnt again


def create_through(server: socket.socket, data_path: Path) -> CatalogUnreachableError:
    """What creating a disk through a catalogue whose one endpoint is ``server`` fails with."""
    url = f"etcd://127.0.0.1:{server.getsockname()[1]}/{prefix()}"
    location = parse_catalog(url).etcd
    assert location is not None
    catalog = EtcdCatalog(location, str(data_path), node="a", timeout_s=0.5)
    with pytest.raises(CatalogUnreachableError) as failed:
        catalog.create_disk_for_restore("zz", size_bytes=1 << 20, filesystem="ext4")
    return failed.value


def test_only_a_change_that_may_have_reached_etcd_is_said_to_have_maybe_landed(tmp_path: Path) -> None:
    """Review S: a connect timeout (packets dropped: a partition) was said to be "received"."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    backlog = []
    try:
        for _ in range(8):  # a full backlog: the next connect's SYN is dropped, as in a partition
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
            backlog.append(filler)
        assert create_through(listener, tmp_path / "a").maybe_applied is False
    finally:
        for filler in backlog:
            filler.close()
        listener.close()
    silent = socket.socket()  # accepts, reads the request, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        assert create_through(silent, tmp_path / "b").maybe_applied is True
    finally:
        silent.close()
        for connection in accepted:
            connection.close()


def test_restore_image_refuses_the_registered_image_of_a_fleet_disk(
    hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: ``restore FILE --image PATH --force`` looked for PATH only among a SQLite store's
    disks, so it replaced the image of a fleet disk, attached and leased, that this host had
    registered. The data path's registrations count too: that disk is restored by its name."""
    a, _b = hosts
    image = tmp_path / "srv" / "pg.img"
    image.parent.mkdir()
    image.write_bytes(b"\1" * 65536)
    before = image.read_bytes()
    on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
    ok("disk", "add", "pg", "--image", image, "--filesystem", "ext4", *on_a)
    monkeypatch.setenv("MIRENFS_DATA_PATH", a.data_path)
    refused = run_cli("restore", GO_EXT4.path, "--image", image, "--force")
    assert refused.code == 1 and "the image of a disk this host registered" in refused.err, refused.err
    assert "restore that disk by its name" in refused.err
    assert image.read_bytes() == before


def test_an_image_outside_the_data_path_is_used_only_once_this_host_registered_it(
    hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can write the prefix could point a host's backups and restores at any file."""
    a, _b = hosts
    outside = tmp_path / "outside"
    outside.mkdir()
    secret, victim = outside / "secret.txt", outside / "victim.img"
    secret.write_text("TOP SECRET\n")
    victim.write_bytes(b"\1" * 65536)
    before = victim.read_bytes()
    put_raw(a, "out1", _foreign_record("out1", str(victim), "a"))
    put_raw(a, "out2", _foreign_record("out2", str(secret), "a"))
    put_raw(a, "dd1", _foreign_record("dd1", f"{a.data_path}/../outside/victim.img", "a"))
    put_raw(a, "theirs", _foreign_record("theirs", str(victim), "b"))  # another node's: not ours to judge
    assert [(r.disk.name, r.image_path) for r in a.list_disks()] == [
        ("dd1", None),
        ("out1", None),
        ("out2", None),
        ("theirs", None),
    ]  # listed (a catalogue copy takes them), but with no image here
    for name in ("out1", "out2", "dd1"):
        assert f"disk {name} in the disk catalogue" in caplog.text
    assert "never registered that path" in caplog.text and "mirenfs disk add out1 --image" in caplog.text
    # Every listing meets them (a mount's start lists four times): a mount's log folds the repeats.
    assert all(
        getattr(record, "fold_repeats", False) for record in caplog.records if "disk " in record.message
    )
    url = a.location.url
    on_a = ["--catalog", url, "--node", "a", "--data-path", a.data_path]
    backup = run_cli("backup", "out2", "-o", tmp_path / "o.mirn", *on_a)
    assert backup.code == 1 and "never registered that path" in backup.err
    assert not (tmp_path / "o.mirn").exists()
    for name in ("out1", "dd1"):
        restore = run_cli("restore", GO_EXT4.path, "--name", name, "--force", *on_a)
        assert restore.code == 1 and "never registered that path" in restore.err
    assert victim.read_bytes() == before
    staging = outside / "victim.img.restore.tmp"  # a record must not choose what the sweep removes
    staging.write_bytes(b"not mirenfs's")
    assert sweep_stale_staging(a.data_path, catalog=a) == []
    assert staging.exists()
    adopted = ok("disk", "add", "out1", "--image", victim, "--filesystem", "ext4", *on_a)
    assert f"registered the image {victim} of disk out1 on this host" in adopted.out
    # dd1's record leads to that file too: the path was registered for out1 only (review Sec F6).
    assert a.get_disk("out1").image_path == str(victim)
    assert {r.disk.name: r.image_path for r in a.list_disks()}["dd1"] is None
    assert "never registered that path for disk dd1" in caplog.text
    assert a.kv.txn([], [_delete(f"{a.disks_prefix}dd1")]).succeeded
    trusted = Path(a.data_path, "mirenfs", "trusted-images.json")
    assert oct(trusted.stat().st_mode & 0o777) == "0o600"
    out1 = a.get_disk("out1").disk.id
    assert json.loads(trusted.read_text()) == {
        "images": [str(victim)],
        "disks": {str(victim): f"{out1} out1"},
    }
    home = tmp_path / "home"  # a one-host store trusts its paths: an unregistered one is not copied
    home.mkdir()
    copied = run_cli("catalog", "copy", "--from", url, "--to", f"sqlite://{home}", "--node", "a")
    assert copied.code == 1 and "were not copied: out1, out2" in copied.err  # home registered none
    assert Store(str(home)).list_disks() == []
    # out2's record names another file: registering this one, out1's image, does not adopt it
    other = run_cli("disk", "add", "out2", "--image", victim, "--filesystem", "ext4", *on_a)
    assert other.code == 1 and "one image cannot back two disks" in other.err
    assert a.get_disk("out2").image_path is None


def test_a_record_written_before_an_image_is_registered_does_not_take_it(
    hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path
) -> None:
    """Review Sec F6: a record anyone with the prefix wrote, naming an image before the operator
    registered it (``disk add pg --image PATH``), was made first, so it kept the image: pg had
    none and left the mount's backups, and the squatter's record read (and could replace) it."""
    a, _b = hosts
    image = tmp_path / "outside" / "pg.img"
    image.parent.mkdir()
    image.write_bytes(b"\2" * 65536)
    put_raw(a, "squat", _foreign_record("squat", str(image), "a"))
    on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
    ok("disk", "add", "pg", "--image", image, "--filesystem", "ext4", *on_a)
    listed = {record.disk.name: record.image_path for record in a.list_disks()}
    assert listed == {"pg": str(image), "squat": None}
    backup = run_cli("backup", "squat", "-o", tmp_path / "squat.mirn", *on_a)
    assert backup.code == 1 and "never registered that path for disk squat" in backup.err
    assert not (tmp_path / "squat.mirn").exists()
    # Review S3 F5: ids are no secret. A record copying pg's id under another name does not pass
    # for pg, and once pg is removed (its image kept: it was added), its registration goes.
    copied = _foreign_record("copy", str(image), "a")
    copied["id"] = a.get_disk("pg").disk.id
    put_raw(a, "copy", copied)
    assert {record.disk.name: record.image_path for record in a.list_disks()}["copy"] is None
    ok("disk", "remove", "pg", *on_a)
    assert image.exists() and a.get_disk("copy").image_path is None
    backup = run_cli("backup", "copy", "-o", tmp_path / "copy.mirn", *on_a)
    assert backup.code == 1 and not (tmp_path / "copy.mirn").exists()


def test_a_registration_file_that_is_not_this_users_alone_trusts_nothing(
    hosts: tuple[EtcdCatalog, EtcdCatalog], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review Sec F7: the state directory's trusted-images.json was read wherever it led and
    whoever wrote it. A link, or a file others may change, registers nothing; an older
    mirenfs's file (paths without their disks) still registers its paths."""
    a, _b = hosts
    image = tmp_path / "outside" / "pg.img"
    image.parent.mkdir()
    image.write_bytes(b"\2" * 65536)
    put_raw(a, "pg", _foreign_record("pg", str(image), "a"))
    trusted = Path(a.data_path, "mirenfs", "trusted-images.json")
    trusted.parent.mkdir(exist_ok=True)
    elsewhere = tmp_path / "hers.json"
    elsewhere.write_text(json.dumps({"images": [str(image)]}))
    trusted.symlink_to(elsewhere)
    assert a.get_disk("pg").image_path is None
    trusted.unlink()
    trusted.write_text(json.dumps({"images": [str(image)]}))
    os.chmod(trusted, 0o666)
    assert a.get_disk("pg").image_path is None
    assert f"{trusted} is not a file of this user that only it may change" in caplog.text
    os.chmod(trusted, 0o600)
    assert a.get_disk("pg").image_path == str(image)  # an older mirenfs's registration, for any disk


def test_a_record_with_escapes_in_its_node_or_lease_or_a_negative_size_is_damaged(
    hosts: tuple[EtcdCatalog, EtcdCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    """Review Sec F5: a node name or lease id holding terminal escapes reached `disk list`, its
    errors and the mount's log raw (a title set, the screen cleared); a size of -5 was listed."""
    a, _b = hosts
    escape = "n\x1b]0;pwned\x07\x1b[2J"
    put_raw(a, "node", _foreign_record("node", "", escape))
    leased = _foreign_record("leased", "", "a")
    leased["leases"] = [{"id": f"lease{escape}", "status": "bound"}]
    put_raw(a, "leased", leased)
    negative = _foreign_record("negative", "", "a")
    negative["size_bytes"] = -5
    put_raw(a, "negative", negative)
    a.add_disk("fine", size_bytes=1, filesystem="ext4")
    go_none = _foreign_record("nonode", "", "")  # review S3: what Go writes for no node is kept
    go_none["leases"] = [{"id": "tenant/pg/1", "status": "released"}]
    put_raw(a, "nonode", go_none)
    assert [record.disk.name for record in a.list_disks()] == ["fine", "nonode"]
    assert a.get_disk("nonode").volume.node is None  # type: ignore[union-attr]
    assert "\x1b" not in caplog.text
    for said in ("its node 'n\\x1b]0;pwned\\x07\\x1b[2J' is not a node name", "its size is negative (-5)"):
        assert said in caplog.text
    on_a = ["--catalog", a.location.url, "--node", "a", "--data-path", a.data_path]
    listed = run_cli("disk", "list", "--all-nodes", *on_a)
    assert "\x1b" not in listed.out + listed.err


def test_disk_add_and_catalog_copy_on_this_host_register_their_images(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    image = tmp_path / "elsewhere" / "pg.img"
    image.parent.mkdir()
    image.write_bytes(b"\0" * 65536)
    url = etcd.url(prefix())
    on_etcd = ["--catalog", url, "--node", "a", "--data-path", tmp_path / "a"]
    ok("disk", "add", "pg", "--image", image, "--filesystem", "ext4", *on_etcd)
    [here] = etcd_catalog(url, tmp_path / "a", "a").list_disks()
    assert here.image_path == str(image)
    [there] = etcd_catalog(url, tmp_path / "a2", "a").list_disks()
    assert there.image_path is None  # another data path on node a never registered it
    home = tmp_path / "home"
    ok("disk", "add", "web", "--image", image, "--filesystem", "ext4", "--data-path", home)
    ok("catalog", "copy", "--from", home, "--to", etcd.url(prefix()), "--node", "h")
    assert Path(home, "mirenfs", "trusted-images.json").exists()


def test_a_copy_killed_before_it_registered_an_image_is_finished_by_the_next_run(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Trial FI2 G4: ``catalog copy`` killed between putting a disk into etcd and registering its
    image on this host was run again: "1 already there", exit 0, and the disk stayed unusable here
    (backup and restore refused it as never registered). The next run registers it; another disk's
    registration of that path is never taken over."""
    home = tmp_path / "home"
    image = tmp_path / "elsewhere" / "pg.img"
    image.parent.mkdir()
    write_image(image, [("data", 65536)])
    ok("disk", "add", "pg", "--image", image, "--filesystem", "ext4", "--data-path", home)
    url = etcd.url(prefix())
    ok("catalog", "copy", "--from", home, "--to", url, "--node", "h")
    TrustedImages(str(home)).unregister(str(image))  # as if killed before it registered pg's image
    on_etcd = ["--catalog", url, "--node", "h", "--data-path", home]
    refused = run_cli("backup", "pg", "-o", tmp_path / "pg.mirn", *on_etcd)
    assert refused.code == 1 and "never registered that path for disk pg" in refused.err
    again = run_cli("catalog", "copy", "--from", home, "--to", url, "--node", "h")
    assert again.code == 0 and "already there" in again.out, again.err
    ok("backup", "pg", "-o", tmp_path / "pg.mirn", *on_etcd)
    assert run_cli("verify", tmp_path / "pg.mirn").code == 0
    trusted = TrustedImages(str(home))
    trusted.unregister(str(image))
    trusted.register(str(image), disk_key("another-id", "web"))  # bound to another disk: left so
    ok("catalog", "copy", "--from", home, "--to", url, "--node", "h")
    assert TrustedImages(str(home)).bound_to(str(image)) == disk_key("another-id", "web")


def test_a_record_whose_key_is_not_a_disk_name_is_skipped_and_said(
    hosts: tuple[EtcdCatalog, EtcdCatalog], caplog: pytest.LogCaptureFixture
) -> None:
    a, _b = hosts
    a.add_disk("fine", size_bytes=1, filesystem="ext4")
    put_raw(a, "../etc", _foreign_record("../etc", "", "a"))
    put_raw(a, "-bad name", _foreign_record("-bad name", "", "a"))
    assert [record.disk.name for record in a.list_disks()] == ["fine"]
    view = a.watch()
    try:
        assert [record.disk.name for record in view.list_disks()] == ["fine"]  # what the mount lists
    finally:
        view.close()
        view.join()
    assert "whose name is not a disk's" in caplog.text and "delete that key" in caplog.text


def test_the_cli_works_on_etcd(etcd: EtcdCluster, tmp_path: Path) -> None:
    url = etcd.url(prefix())
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    on_a = ["--catalog", url, "--node", "a", "--data-path", a]
    on_b = ["--catalog", url, "--node", "b", "--data-path", b]
    ok("restore", GO_EXT4.path, *on_a)
    refused = run_cli("restore", GO_EXT4.path, *on_b)
    assert refused.code == 1 and "is on node a, not on this node (b)" in refused.err
    assert "disk-ext4" not in ok("disk", "list", *on_b).out
    assert "(on that node)" in ok("disk", "list", "--all-nodes", *on_b).out
    assert (
        ok("disk", "set-status", "disk-ext4", "DELETING", *on_b).out
        == "disk disk-ext4: provisioned -> deleting\n"
    )
    assert run_cli("backup", "disk-ext4", "-o", tmp_path / "x.mirn", *on_a).code == 1
    # Being deleted, on node a: the advice (finish it with `disk remove`) is for node a's host.
    refused = run_cli("restore", GO_EXT4.path, *on_b)
    assert refused.code == 1 and "is on node a, not on this node (b)" in refused.err, refused.err
    ok("disk", "set-status", "disk-ext4", "status.detached", *on_a)
    ok("backup", "disk-ext4", "-o", tmp_path / "x.mirn", *on_a)
    assert run_cli("disk", "remove", "disk-ext4", *on_b).code == 1
    ok("disk", "remove", "disk-ext4", *on_a)
    assert json.loads(ok("disk", "list", "--json", "--all-nodes", *on_b).out) == []


def test_removing_a_disk_whose_image_is_not_under_this_data_path_needs_force(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Trial E22 E3: the right node with the wrong data path removed the fleet's record of a disk
    in use on its host, exit 0, its image orphaned. E5: a host gone for good left its disks
    unremovable anywhere else. Both take --force, which removes only the record."""
    url = etcd.url(prefix())
    a, twin, b = tmp_path / "a", tmp_path / "twin", tmp_path / "b"
    for data in (a, twin, b):
        data.mkdir()
    on_a = ["--catalog", url, "--node", "a", "--data-path", a]
    on_twin = ["--catalog", url, "--node", "a", "--data-path", twin]
    on_b = ["--catalog", url, "--node", "b", "--data-path", b]
    ok("disk", "create", "pg", "--size", "1M", *on_a)
    ok("disk", "create", "web", "--size", "1M", *on_a)
    own = tmp_path / "own.img"  # review D22 D4: an image registered at its own path, on host a
    write_image(own, [("data", 1 << 20)])
    ok("disk", "add", "logs", "--image", own, "--filesystem", "ext4", *on_a)
    listed = json.loads(ok("disk", "list", "--json", *on_a).out)
    images = {entry["name"]: Path(entry["image_path"]) for entry in listed if entry["name"] != "logs"}
    elsewhere = twin / images["pg"].relative_to(a)
    refused = run_cli("disk", "remove", "logs", *on_twin)  # the twin never registered it
    assert refused.code == 1 and f"disk logs of node a has no image at {own} on this host" in refused.err

    refused = run_cli("disk", "remove", "pg", *on_twin)
    assert (refused.code, refused.err) == (
        1,
        f"mirenfs: error: disk pg of node a has no image at {elsewhere} on this host: if it lives on "
        "another host (a wrong --data-path, or two hosts sharing one node name), remove it there; to "
        "remove its record for every host anyway, pass --force\n",
    )
    refused = run_cli("disk", "remove", "web", *on_b)
    assert (refused.code, refused.err) == (
        1,
        "mirenfs: error: disk web is on node a, whose data path holds its image; remove it there (if "
        "that node is gone for good, `mirenfs disk remove web --force` removes its record from the "
        "catalogue; its image stays where it was)\n",
    )
    assert json.loads(ok("disk", "list", "--json", *on_a).out) == listed  # nothing changed

    assert (
        ok("disk", "remove", "pg", "--force", *on_twin).out
        == f"removed disk pg (it had no image at {elsewhere})\n"
    )
    assert (
        ok("disk", "remove", "web", "--force", *on_b).out
        == "removed disk web; its image, on node a, was not touched\n"
    )
    ok("disk", "remove", "logs", *on_a)  # on its host: its record goes, the registered image stays
    assert own.exists()
    assert json.loads(ok("disk", "list", "--json", "--all-nodes", *on_a).out) == []
    assert all(image.exists() for image in images.values())  # no image of another host is touched
    assert not list(twin.rglob("*.img")) and not list(b.rglob("*.img"))


def test_images_no_disk_of_the_catalogue_has_are_said_by_an_empty_disk_list(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Trial E22 E4: an etcd wiped and made again with the same flags has the same cluster id, so
    the pin cannot tell, and every host saw an empty catalogue without a word while its images
    were still under its data path. (Another prefix stands for the wiped catalogue here.)"""
    data = tmp_path / "data"
    data.mkdir()
    on_a = ["--catalog", etcd.url(prefix()), "--node", "a", "--data-path", data]
    ok("restore", GO_EXT4.path, "--name", "pg", *on_a)
    volume = next((data / "disk-data" / "volumes").iterdir())
    wiped = etcd.url(prefix())
    listed = run_cli("disk", "list", "--catalog", wiped, "--node", "a", "--data-path", data)
    assert listed.code == 0 and len(listed.out.splitlines()) == 1  # the heading alone
    assert listed.err.endswith(
        f"mirenfs: 1 disk image(s) under {volume.parent} belong to no disk of the catalogue ({volume.name}): "
        "if the catalogue was wiped or restored from an older copy, its records of them are gone; put those "
        "back (restore the catalogue) before restoring disks here, or the restores make new disks beside "
        "them (with no copy of it, back each image up with mirenfs backup --image PATH --name NAME -o FILE "
        "and restore FILE under its name)\n"
    ), listed.err
    assert "belong to no disk" not in run_cli("disk", "list", "--catalog", wiped, "--data-path", tmp_path).err
    # Review D22 D7: the disks a move left in the data path's own SQLite store are not orphans.
    moved = tmp_path / "moved"
    ok("disk", "create", "left", "--size", "1M", "--data-path", moved)
    assert images_no_disk_has([], data_path=str(moved)) is None


def test_an_empty_disk_list_says_which_catalogue_and_node_it_looked_in(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    name = prefix()
    url = etcd.url(name)
    ok("disk", "create", "pg", "--size", "1M", "--catalog", url, "--node", "hostA", "--data-path", tmp_path)
    wrong_node = run_cli(
        "disk", "list", "--json", "--catalog", url, "--node", "hosta", "--data-path", tmp_path
    )
    assert wrong_node.code == 0 and wrong_node.out == "[]\n"  # stdout as it was
    assert wrong_node.err == (
        f"mirenfs: no disk in the disk catalogue at {url} is on node hosta; its disks are on node hostA: "
        "if this host is one of them, pass --node NAME (or set $MIRENFS_NODE; the default is the hostname)\n"
    )
    bare = etcd.url("mirenfs")  # the prefix forgotten: the default one, empty
    no_prefix = run_cli(
        "disk", "list", "--catalog", bare.rsplit("/", 1)[0], "--node", "hostA", "--data-path", tmp_path
    )
    assert no_prefix.code == 0 and no_prefix.out.startswith("NAME")
    assert no_prefix.err.startswith(
        f"mirenfs: the disk catalogue at {bare} holds no disks (is its /PREFIX right?)\n"
        "mirenfs: 1 disk image(s) under "  # pg's, whose catalogue that is not
    ), no_prefix.err
    right = run_cli("disk", "list", "--catalog", url, "--node", "hostA", "--data-path", tmp_path)
    assert right.err == "" and "pg" in right.out


def test_the_environment_names_the_catalogue_and_node(
    etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIRENFS_CATALOG", etcd.url(prefix()))
    monkeypatch.setenv("MIRENFS_NODE", "envnode")
    ok("disk", "create", "pg", "--size", "1M", "--data-path", tmp_path)
    assert json.loads(ok("disk", "list", "--json", "--data-path", tmp_path).out)[0]["node"] == "envnode"
    assert not (tmp_path / "mirenfs.db").exists()  # nothing went to SQLite


def test_commands_on_sqlite_never_load_the_etcd_client(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from mirenfs.cli import main\n"
        f"code = main(['disk', 'list', '--data-path', {str(tmp_path)!r}])\n"
        "assert 'etcd3gw' not in sys.modules and 'requests' not in sys.modules, 'etcd3gw was loaded'\n"
        "print('not loaded, exit', code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "not loaded, exit 0" in done.stdout, done.stderr
