"""The embedded SQLite store: schema and migrations, the resolver and creator it
implements, leases, use from many threads, and stale staging clean-up."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mirenfs.disks import live
from mirenfs.disks import store as store_module
from mirenfs.disks.manage import sweep_stale_staging as remove_stale_staging
from mirenfs.disks.model import DiskState, LeaseState, VolumeState, image_path_for
from mirenfs.disks.rules import prepare_restore
from mirenfs.disks.store import SCHEMA_VERSION, Store
from mirenfs.errors import (
    DiskBusyError,
    DiskExistsError,
    DiskNotFoundError,
    LeaseNotFoundError,
    StoreError,
)


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_path: Path) -> Store:
    return Store(str(data_path))


def test_reads_of_a_missing_store_create_nothing(store: Store, data_path: Path) -> None:
    assert store.list_disks() == []
    assert store.find_leases_by_disk_id("disk-x") == []
    with pytest.raises(DiskNotFoundError):
        store.find_disk_by_name("pg")
    assert not data_path.exists()


def test_first_write_creates_a_wal_database_at_the_newest_schema(store: Store, data_path: Path) -> None:
    store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    db = sqlite3.connect(data_path / "mirenfs.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()
    assert {"disks", "volumes", "leases"} <= tables


def test_an_old_schema_is_migrated_and_a_newer_one_refused(data_path: Path) -> None:
    data_path.mkdir()
    db = sqlite3.connect(data_path / "mirenfs.db")
    db.execute("PRAGMA user_version = 0")
    db.close()
    store = Store(str(data_path))
    store.add_disk("pg", size_bytes=1, filesystem="ext4")
    assert Store(str(data_path)).find_disk_by_name("pg").size_bytes == 1  # a second open does not re-migrate

    db = sqlite3.connect(data_path / "mirenfs.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this mirenfs understands"):
        Store(str(data_path)).find_disk_by_name("pg")


def test_migrations_run_in_order_from_the_recorded_version(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(str(data_path)).add_disk("pg", size_bytes=1, filesystem="ext4")
    extra = ("ALTER TABLE disks ADD COLUMN note TEXT", "UPDATE disks SET note = 'migrated'")
    monkeypatch.setattr(store_module, "_MIGRATIONS", (*store_module._MIGRATIONS, extra))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    assert Store(str(data_path)).find_disk_by_name("pg").name == "pg"
    db = sqlite3.connect(data_path / "mirenfs.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert db.execute("SELECT note FROM disks").fetchall() == [("migrated",)]
    finally:
        db.close()


def test_a_corrupt_store_is_a_store_error_not_a_missing_disk(store: Store, data_path: Path) -> None:
    data_path.mkdir()
    (data_path / "mirenfs.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the disk store") as failed:
        store.find_disk_by_name("pg")
    assert failed.value.errno == errno.EIO
    with pytest.raises(StoreError):
        prepare_restore(store, "pg", data_path=str(data_path), overwrite=True, creator=store)
    assert sorted(p.name for p in data_path.iterdir()) == ["mirenfs.db"]


def _statvfs_with(free_bytes: int, *, read_only: bool = False) -> os.statvfs_result:
    """What ``os.statvfs`` says of a filesystem with ``free_bytes`` left (in 4 KiB blocks)."""
    flag = os.ST_RDONLY if read_only else 0
    blocks = free_bytes // 4096
    return os.statvfs_result((4096, 4096, 1 << 20, blocks, blocks, 1000, 500, 500, flag, 255))


def _sqlite_fails(monkeypatch: pytest.MonkeyPatch, message: str, code: int) -> None:
    """SQLite answers every open with ``message`` (its result code ``code``), as on a full filesystem."""

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        error = sqlite3.OperationalError(message)
        error.sqlite_errorcode = code  # type: ignore[attr-defined]
        raise error

    monkeypatch.setattr(store_module.sqlite3, "connect", connect)


@pytest.mark.parametrize(("message", "code"), [("disk I/O error", 4874), ("database or disk is full", 13)])
def test_a_full_data_path_is_named_as_such_not_as_a_broken_store(
    store: Store, data_path: Path, monkeypatch: pytest.MonkeyPatch, message: str, code: int
) -> None:
    store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    _sqlite_fails(monkeypatch, message, code)  # 4874: SQLITE_IOERR_SHMOPEN, the -shm file not made
    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: _statvfs_with(0))
    full = (
        f"the data path {data_path} is full (its filesystem has no space left); "
        "free space there and try again"
    )
    with pytest.raises(StoreError) as failed:
        store.add_disk("web", size_bytes=4096, filesystem="ext4")
    assert str(failed.value) == full
    with pytest.raises(StoreError) as failed:
        store.set_disk_status("pg", "attached")
    assert str(failed.value) == full

    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: _statvfs_with(0, read_only=True))
    read_only = r"is on a read-only filesystem; remount it read-write and try again$"
    with pytest.raises(StoreError, match=read_only):
        store.add_disk("web", size_bytes=4096, filesystem="ext4")

    # With room left, the same error is the store's own: it is reported as it is.
    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: _statvfs_with(1 << 30))
    with pytest.raises(StoreError, match=f"cannot open the disk store .*: {message}; check the file"):
        store.add_disk("web", size_bytes=4096, filesystem="ext4")


def changes_are(store: Store, *, allowed: bool) -> None:
    """A change to disk pg goes through, or is refused for a full data path."""
    if allowed:
        store.set_disk_status("pg", "attached")
    else:
        with pytest.raises(StoreError, match="is full"):
            store.set_disk_status("pg", "attached")


@pytest.mark.parametrize("root", [True, False])
def test_under_a_mib_of_room_the_store_is_not_changed_before_sqlite_maps_its_index(
    store: Store, data_path: Path, monkeypatch: pytest.MonkeyPatch, root: bool
) -> None:
    """SQLite writes its -shm index through a mapping: on a filesystem that runs out there, that is
    SIGBUS, not an error, so the room is looked at first. Root may write into the reserve (all
    of f_bfree but what ext4 keeps from root too); others only into f_bavail."""
    store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    monkeypatch.setattr(store_module.os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(store_module, "_is_ext4", lambda _path: True)
    blocks = 1 << 20  # 4 GiB in 4 KiB blocks: ext4 keeps 4096 of them (16 MiB) even from root

    def statvfs(bfree: int, bavail: int) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, blocks, bfree, bavail, 1000, 500, 500, 0, 255))

    reserve_only = statvfs(4096 + 1024, 0)  # 4 MiB past ext4's own: root's reserve
    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: reserve_only)
    changes_are(store, allowed=root)
    nearly_none = statvfs(4096 + 128, 128)  # 512 KiB past every reserve
    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: nearly_none)
    with pytest.raises(StoreError, match="is full") as refused:
        store.set_disk_status("pg", "detached")
    assert refused.value.errno == errno.ENOSPC
    assert [record.disk.name for record in store.list_disks()] == ["pg"]  # reading still works


@pytest.mark.parametrize(("fstype", "changes"), [("xfs", True), ("ext4", False)])
def test_ext4s_own_reserve_counts_only_on_ext4_and_reading_works_whenever_changes_are_refused(
    store: Store, data_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str, changes: bool
) -> None:
    """Trial X: on an XFS data path with 1 to 17 MiB free, root's store was refused for ext4's
    reserve, and the read-only fallback, which tested the room otherwise, was not taken: `ls` of
    the mount, `disk list` and every backup failed as "the data path is full"."""
    store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    monkeypatch.setattr(store_module.os, "geteuid", lambda: 0)
    mounted = live.MountLine(1, (8, 1), "/", fstype, "/dev/vdb", "rw")
    monkeypatch.setattr(store_module, "read_mountinfo", lambda: [mounted])
    eight_mib = os.statvfs_result((4096, 4096, 1 << 20, 2048, 2048, 1000, 500, 500, 0, 255))
    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: eight_mib)
    changes_are(store, allowed=changes)
    assert [record.disk.name for record in store.list_disks()] == ["pg"]  # reading works either way


def test_a_read_only_data_path_is_read_quietly_and_refuses_changes_saying_to_remount(
    store: Store, data_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading works there (the database opened immutable), so it warns nobody; a change is refused
    with the remedy, which is to remount it read-write (not to make room)."""
    store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    connect = sqlite3.connect

    def read_only_connect(database: str, *args: object, **kwargs: object) -> sqlite3.Connection:
        if not kwargs.get("uri"):  # a normal open: SQLite cannot make its -shm file there
            error = sqlite3.OperationalError("attempt to write a readonly database")
            error.sqlite_errorcode = 8  # type: ignore[attr-defined]
            raise error
        return connect(database, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.sqlite3, "connect", read_only_connect)
    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: _statvfs_with(1 << 30, read_only=True))
    caplog.set_level("DEBUG", logger="mirenfs")
    assert [record.disk.name for record in store.list_disks()] == ["pg"]
    assert store.find_disk_by_name("pg").name == "pg"
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == []
    (said,) = [r.getMessage() for r in caplog.records if "read as it is on disk" in r.getMessage()]
    assert "fail until it is remounted read-write" in said and "room" not in said, said
    with pytest.raises(StoreError) as refused:
        store.set_disk_status("pg", "attached")
    assert str(refused.value) == (
        f"the data path {data_path} is on a read-only filesystem; remount it read-write and try again"
    )


def test_disks_volumes_and_image_paths(store: Store, data_path: Path, tmp_path: Path) -> None:
    managed = store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    assert managed.volume is not None and managed.image_path is not None
    assert managed.image_path == image_path_for(str(data_path), managed.volume)
    assert managed.image_path.startswith(str(data_path / "disk-data" / "volumes"))
    registered = store.add_disk("ext", size_bytes=10, filesystem="xfs", image_path=str(tmp_path / "ext.img"))
    assert registered.image_path == str(tmp_path / "ext.img")

    disk = store.find_disk_by_name("pg")
    assert (disk.name, disk.status, disk.filesystem, disk.size_bytes) == (
        "pg",
        DiskState.PROVISIONED,
        "ext4",
        4096,
    )
    assert store.find_volume_by_disk_id(disk.id).status == VolumeState.PROVISIONED
    assert [record.disk.name for record in store.list_disks()] == ["ext", "pg"]

    with pytest.raises(DiskExistsError, match="a disk named pg already exists") as taken:
        store.add_disk("pg", size_bytes=1, filesystem="ext4")
    assert taken.value.errno == errno.EEXIST
    with pytest.raises(DiskExistsError, match="already belongs to disk ext"):
        store.add_disk("ext2", size_bytes=1, filesystem="xfs", image_path=str(tmp_path / "ext.img"))


def test_status_changes_and_record_removal(store: Store) -> None:
    record = store.add_disk("pg", size_bytes=1, filesystem="ext4")
    assert store.set_disk_status("pg", "attached") == (DiskState.PROVISIONED, DiskState.ATTACHED)
    assert store.find_disk_by_name("pg").status == DiskState.ATTACHED
    with pytest.raises(Exception, match="'busy' is not a disk status"):
        store.set_disk_status("pg", "busy")
    with pytest.raises(DiskNotFoundError):
        store.set_disk_status("nope", "attached")
    store.acquire_lease("pg")
    assert store.delete_disk_records(record.disk.id)
    assert not store.delete_disk_records(record.disk.id)
    assert store.list_disks() == []
    assert store.find_leases_by_disk_id(record.disk.id) == [], "leases go with their disk"


def test_leases_bind_one_at_a_time_and_release(store: Store) -> None:
    store.add_disk("pg", size_bytes=1, filesystem="ext4")
    lease = store.acquire_lease("pg")
    assert lease.status == LeaseState.BOUND
    with pytest.raises(DiskBusyError, match=f"lease {lease.id} is bound"):
        store.acquire_lease("pg")
    assert store.release_lease(lease.id)[1:] == ("pg", True)
    assert store.release_lease(lease.id)[1:] == ("pg", False)
    again = store.acquire_lease("pg")
    disk_id = store.find_disk_by_name("pg").id
    assert [(item.id, item.status) for item in store.find_leases_by_disk_id(disk_id)] == [
        (lease.id, LeaseState.RELEASED),
        (again.id, LeaseState.BOUND),
    ]
    with pytest.raises(LeaseNotFoundError, match="there is no lease lease-nope"):
        store.release_lease("lease-nope")
    store.set_disk_status("pg", "deleting")
    store.release_lease(again.id)
    with pytest.raises(DiskBusyError, match="being deleted"):
        store.acquire_lease("pg")


def test_created_disk_is_provisioning_until_finalized(store: Store) -> None:
    created = store.create_disk_for_restore("new", size_bytes=512, filesystem="btrfs")
    assert store.find_disk_by_name("new").status == DiskState.PROVISIONING
    assert store.find_volume_by_disk_id(created.disk.id).status == VolumeState.PROVISIONING
    created.finalize()
    assert store.find_disk_by_name("new").status == DiskState.PROVISIONED
    assert store.find_volume_by_disk_id(created.disk.id).status == VolumeState.PROVISIONED
    store.update_disk(created.disk.id, size_bytes=1024, filesystem="xfs")
    assert store.find_disk_by_name("new").size_bytes == 1024

    doomed = store.create_disk_for_restore("doomed", size_bytes=512, filesystem="ext4")
    doomed.cleanup()
    with pytest.raises(DiskNotFoundError):
        store.find_disk_by_name("doomed")


def test_a_restore_into_a_new_name_is_provisioning_until_finalized(store: Store, data_path: Path) -> None:
    target = prepare_restore(store, "fresh", data_path=str(data_path), overwrite=False, creator=store)
    assert store.list_disks() == [], "nothing is created before the header arrives"
    image_path = Path(target.open(4096, "ext4"))
    assert store.find_disk_by_name("fresh").status == DiskState.PROVISIONING
    image_path.write_bytes(bytes(4096))
    target.finalize()
    assert store.find_disk_by_name("fresh").status == DiskState.PROVISIONED

    failed = prepare_restore(store, "failed", data_path=str(data_path), overwrite=False, creator=store)
    failed_image = Path(failed.open(4096, "xfs"))
    failed.cleanup()
    assert [record.disk.name for record in store.list_disks()] == ["fresh"]
    assert not failed_image.parent.exists()
    assert image_path.exists()


def test_restore_into_an_existing_disk_without_a_volume_directory(store: Store, data_path: Path) -> None:
    record = store.add_disk("hollow", size_bytes=4096, filesystem="ext4")
    assert record.image_path is not None
    failed = prepare_restore(store, "hollow", data_path=str(data_path), overwrite=False, creator=store)
    assert failed.open(4096, "ext4") == record.image_path
    assert Path(record.image_path).parent.is_dir(), "the managed volume directory is made for the restore"
    failed.cleanup()
    assert not (data_path / "disk-data").exists(), "and removed again when the restore fails"
    assert store.find_disk_by_name("hollow").id == record.disk.id, "an existing disk is never removed"


def test_a_store_file_removed_while_in_use_is_recreated(store: Store, data_path: Path) -> None:
    store.add_disk("pg", size_bytes=1, filesystem="ext4")
    for leftover in data_path.glob("mirenfs.db*"):
        leftover.unlink()
    assert store.list_disks() == []
    store.add_disk("again", size_bytes=1, filesystem="ext4")
    assert [record.disk.name for record in store.list_disks()] == ["again"]


def test_one_store_from_many_threads(store: Store) -> None:
    for name in ("a", "b", "c", "d"):
        store.add_disk(name, size_bytes=1, filesystem="ext4")

    def churn(name: str) -> str:
        for round_number in range(40):
            status = ("attached", "detached")[round_number % 2]
            store.set_disk_status(name, status)
            assert {record.disk.name for record in store.list_disks()} == {"a", "b", "c", "d"}
        return status

    with ThreadPoolExecutor(4) as pool:
        finals = list(pool.map(churn, ["a", "b", "c", "d"]))
    assert {record.disk.name: record.disk.status.value for record in store.list_disks()} == dict(
        zip("abcd", finals, strict=True)
    )


def test_stale_staging_files_are_removed_at_start(store: Store, data_path: Path, tmp_path: Path) -> None:
    managed = store.add_disk("pg", size_bytes=1, filesystem="ext4")
    assert managed.image_path is not None
    image = Path(managed.image_path)
    image.parent.mkdir(parents=True)
    image.write_bytes(b"image")
    leftover = Path(f"{image}.restore.tmp")
    leftover.write_bytes(b"half a restore")
    unrelated = image.parent / "notes.txt"
    unrelated.write_bytes(b"keep")

    registered = tmp_path / "elsewhere" / "ext.img"
    registered.parent.mkdir()
    registered.write_bytes(b"ext")
    store.add_disk("ext", size_bytes=3, filesystem="ext4", image_path=str(registered))
    registered_leftover = Path(f"{registered}.restore.tmp")
    registered_leftover.write_bytes(b"half")

    held = data_path / "disk-data" / "volumes" / "vol-live" / "disk.img.restore.tmp"
    held.parent.mkdir()
    held.write_bytes(b"a restore still running")
    busy: list[str] = []
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        removed = remove_stale_staging(str(data_path), on_busy=busy.append)
    finally:
        os.close(fd)

    assert sorted(removed) == sorted([str(leftover), str(registered_leftover)])
    assert not leftover.exists() and not registered_leftover.exists()
    assert held.exists() and busy == [str(held)]
    assert image.read_bytes() == b"image" and unrelated.read_bytes() == b"keep"
    assert registered.read_bytes() == b"ext"
    assert remove_stale_staging(str(tmp_path / "no-such-data-path")) == []
