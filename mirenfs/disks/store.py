"""The embedded default disk store: SQLite at ``<data-path>/mirenfs.db`` (SPEC §3).

It holds disks, volumes and leases with Miren's statuses and implements
:class:`~mirenfs.disks.DiskResolver` and :class:`~mirenfs.disks.DiskCreator`.
The CLI changes it while the mount reads it, so the database runs in WAL mode
with a busy timeout, every write is one ``BEGIN IMMEDIATE`` transaction, and
each call opens its own connection (sqlite3 connections must not cross
threads, and the mount calls in from trio worker threads).

The database is created on the first write; until then every read sees an
empty store, so ``disk list`` on a fresh data path leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from mirenfs.disks.live import mount_holding, read_mountinfo
from mirenfs.disks.model import (
    DB_FILE_NAME,
    CreatedRecords,
    Disk,
    DiskRecord,
    DiskState,
    Lease,
    LeaseState,
    Volume,
    VolumeState,
    etcd_catalogue_hint,
    image_path_for,
    new_disk_records,
    new_id,
    validate_disk_name,
)
from mirenfs.engine.image import make_directories
from mirenfs.errors import (
    DiskBusyError,
    DiskExistsError,
    DiskNotFoundError,
    LeaseNotFoundError,
    MirenfsError,
    OutOfDescriptorsError,
    StoreError,
    StoreRefusedError,
    VolumeNotFoundError,
    out_of_descriptors,
)

log = logging.getLogger("mirenfs")

BUSY_TIMEOUT_S = 30.0


# --- schema, versioned with PRAGMA user_version: step i brings version i to i + 1 ---


def _statuses(enum_type: type[DiskState] | type[VolumeState] | type[LeaseState]) -> str:
    return ", ".join(f"'{member.value}'" for member in enum_type)


_MIGRATIONS: Sequence[Sequence[str]] = (
    (
        f"""CREATE TABLE disks (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL CHECK (status IN ({_statuses(DiskState)})),
            filesystem TEXT NOT NULL,
            size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
            created_ns INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL
        )""",
        f"""CREATE TABLE volumes (
            id TEXT PRIMARY KEY,
            disk_id TEXT NOT NULL UNIQUE REFERENCES disks (id) ON DELETE CASCADE,
            image_path TEXT UNIQUE,
            status TEXT NOT NULL CHECK (status IN ({_statuses(VolumeState)}))
        )""",
        f"""CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            disk_id TEXT NOT NULL REFERENCES disks (id) ON DELETE CASCADE,
            status TEXT NOT NULL CHECK (status IN ({_statuses(LeaseState)})),
            created_ns INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL
        )""",
        "CREATE INDEX leases_by_disk ON leases (disk_id)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class Store:
    """The SQLite disk store of one data path; safe to use from many threads and processes."""

    def __init__(
        self, data_path: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S, refused: str | None = None
    ) -> None:
        self.data_path = os.path.abspath(data_path)
        # Why this store must not be used (its disks were moved to another catalogue): said by
        # every read and write, not at construction, so that `cleanup` still thaws first.
        self._refused = refused
        self.path = os.path.join(self.data_path, DB_FILE_NAME)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._ready_lock = threading.Lock()
        self._ready = False
        self._read_only_said = False  # the fallback of _read_only_connection is logged once

    # --- connections ---

    def _connect(self) -> sqlite3.Connection:
        no_room = _no_room_for_sqlite(self.data_path)
        if no_room is not None:
            # Said before SQLite maps its -shm index: it allocates that file one byte per 4 KiB page,
            # and on a filesystem of 1 KiB blocks that has run out, a write through the mapping
            # is SIGBUS (the process dies), not an error.
            raise no_room
        if not os.path.exists(self.path):
            self._ready = False  # (re)created by this connection: it needs the schema again
        try:
            # Private from the first byte: SQLite gives its -wal and -shm files the database's mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
            if stat.S_IMODE(os.stat(self.path).st_mode) & 0o077:
                os.chmod(self.path, 0o600)
        except OSError as exc:
            raise self._os_error("open", exc) from None
        try:
            db = sqlite3.connect(
                self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None, check_same_thread=True
            )
        except sqlite3.Error as exc:
            raise self._error("open", exc) from None
        try:
            db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = FULL")
            self._ensure_schema(db)
        except sqlite3.Error as exc:
            db.close()
            raise self._error("open", exc) from None
        except BaseException:
            db.close()
            raise
        return db

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        """WAL mode and the newest schema, once per Store (other processes may race: both are safe)."""
        with self._ready_lock:
            if self._ready:
                return
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                self._migrate(db)
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"the disk store {self.path} has schema version {version}, newer than this mirenfs "
                    f"understands ({SCHEMA_VERSION}); upgrade mirenfs"
                )
            self._ready = True

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")  # one migrator at a time; the loser sees the new version
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {step + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if version < SCHEMA_VERSION:
            log.info("disk store %s: schema version %d -> %d", self.path, version, SCHEMA_VERSION)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        """A connection for reading, or None while no database exists (an empty store)."""
        if self._refused is not None:
            raise StoreRefusedError(self._refused)
        if not os.path.exists(self.path):
            yield None
            return
        try:
            db = self._connect()
        except StoreError as exc:
            db = self._read_only_connection(exc)
        try:
            db.execute("BEGIN")  # one consistent snapshot across the queries of one call
            yield db
        except sqlite3.Error as exc:
            raise self._error("read", exc) from None
        finally:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            db.close()

    def _read_only_connection(self, error: StoreError) -> sqlite3.Connection:
        """The database as it is on disk, when the normal open failed because the data path is
        full or read-only: a WAL reader needs a shared-memory index file that SQLite cannot make
        there, so disks could not even be listed. Opened immutable, which is exact only while the
        write-ahead log holds nothing (at rest it does not: the last connection checkpoints it
        away); otherwise, or for any other failure, ``error`` stands."""
        # The normal open's own refusal for room counts too: the two tests differ (trial X: between
        # 1 and 17 MiB free on XFS the open was refused and this fallback was not taken).
        refused_for = {errno.ENOSPC: _FULL, errno.EROFS: _READ_ONLY}.get(error.errno)
        why = _no_room(self.data_path) or refused_for
        wal = self.path + "-wal"
        if why is None or (os.path.exists(wal) and os.path.getsize(wal) > 0):
            raise error
        try:
            db = sqlite3.connect(
                f"file:{urllib.parse.quote(self.path)}?mode=ro&immutable=1", uri=True, isolation_level=None
            )
        except sqlite3.Error:
            raise error from None
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error:
            version = None
        if version != SCHEMA_VERSION:
            db.close()
            raise error
        with self._ready_lock:
            said, self._read_only_said = self._read_only_said, True
        if not said:  # info, not a warning: reading is all the caller does, and it works
            log.info(
                "the data path %s %s: the disk store %s is read as it is on disk; restores and changes "
                "to disks fail until %s",
                self.data_path,
                why,
                self.path,
                "it is remounted read-write" if why == _READ_ONLY else "space is freed there",
            )
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (IMMEDIATE) so it never dead-ends on a lock upgrade."""
        if self._refused is not None:
            raise StoreRefusedError(self._refused)
        try:
            make_directories(self.data_path)
        except OSError as exc:
            cannot = StoreError(f"cannot create the data path {self.data_path}: {exc.strerror}")
            raise _data_path_error(self.data_path, exc.errno) or cannot from None
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error("write", exc) from None
        finally:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            db.close()

    def check(self) -> None:
        """Refuse, with the reason, a store the mount could not work with: a data path that is not
        writable (restores and indexes live there) or a database that is damaged."""
        check_data_path(self.data_path)
        with self._read() as db:
            if db is None:
                return
            verdict = str(db.execute("PRAGMA quick_check").fetchone()[0])
            if verdict != "ok":
                raise StoreError(
                    f"the disk store {self.path} is damaged ({verdict}); restore it from a backup, "
                    "or move it away to start an empty store"
                )

    def _error(self, action: str, exc: sqlite3.Error) -> StoreError:
        """What failed, in one sentence: SQLite says "disk I/O error" or "database or disk is full"
        for a data path whose filesystem is full or read-only; then that is the sentence."""
        exhausted = out_of_descriptors()  # SQLite says only "unable to open database file"
        if exhausted is not None:
            return OutOfDescriptorsError(exhausted)
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _NO_ROOM_CODES:
            no_room = _data_path_error(self.data_path)
            if no_room is not None:
                return no_room
        return StoreError(f"cannot {action} the disk store {self.path}: {exc}; check the file and try again")

    def _os_error(self, action: str, exc: OSError) -> StoreError:
        exhausted = out_of_descriptors(exc.errno)
        if exhausted is not None:
            return OutOfDescriptorsError(exhausted)
        no_room = _data_path_error(self.data_path, exc.errno)
        return no_room or StoreError(f"cannot {action} the disk store {self.path}: {exc.strerror}")

    def _not_found(self, name: str) -> DiskNotFoundError:
        """No disk ``name`` here; and where it may be, when this data path talked to etcd."""
        hint = etcd_catalogue_hint(self.data_path)
        if hint is None:
            return DiskNotFoundError(name)
        return DiskNotFoundError(
            name,
            f"there is no disk named {name} in the SQLite store of {self.data_path}, which has also "
            f"talked to {hint}",
        )

    # --- DiskResolver ---

    def find_disk_by_name(self, name: str) -> Disk:
        with self._read() as db:
            row = None if db is None else db.execute(_DISK_SELECT + " WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise self._not_found(name)
        return _disk(row)

    def find_volume_by_disk_id(self, disk_id: str) -> Volume:
        with self._read() as db:
            row = (
                None
                if db is None
                else db.execute(_VOLUME_SELECT + " WHERE disk_id = ?", (disk_id,)).fetchone()
            )
        if row is None:
            raise VolumeNotFoundError(
                f"disk {disk_id} has no volume in {self.path}; remove and re-add the disk"
            )
        return _volume(row)

    def find_leases_by_disk_id(self, disk_id: str) -> list[Lease]:
        with self._read() as db:
            if db is None:
                return []
            rows = db.execute(
                _LEASE_SELECT + " WHERE disk_id = ? ORDER BY created_ns, id", (disk_id,)
            ).fetchall()
        return [_lease(row) for row in rows]

    # --- DiskCreator ---

    def create_disk_for_restore(
        self, name: str, *, size_bytes: int, filesystem: str, disk_id: str | None = None
    ) -> CreatedRecords:
        records = new_disk_records(
            name,
            size_bytes=size_bytes,
            filesystem=filesystem,
            status=DiskState.PROVISIONING,
            image_path=None,
            disk_id=disk_id,
        )
        return CreatedRecords(self, *self._insert_disk(*records))

    def update_disk(self, disk_id: str, *, size_bytes: int, filesystem: str) -> None:
        """A restore installed a new image: record its size and filesystem; a disk still
        ``provisioning`` (its first restore was interrupted) is ``provisioned`` now."""
        with self._write() as db:
            db.execute(
                "UPDATE disks SET size_bytes = ?, filesystem = ?, updated_ns = ?, "
                "status = CASE status WHEN ? THEN ? ELSE status END WHERE id = ?",
                (
                    size_bytes,
                    filesystem,
                    time.time_ns(),
                    DiskState.PROVISIONING.value,
                    DiskState.PROVISIONED.value,
                    disk_id,
                ),
            )
            db.execute(
                "UPDATE volumes SET status = ? WHERE disk_id = ?", (VolumeState.PROVISIONED.value, disk_id)
            )

    # --- management (the `mirenfs disk` and `mirenfs lease` commands) ---

    def add_disk(
        self,
        name: str,
        *,
        size_bytes: int,
        filesystem: str,
        status: DiskState = DiskState.PROVISIONED,
        image_path: str | None = None,
        disk_id: str | None = None,
    ) -> DiskRecord:
        """A disk and its volume: a managed image under the data path, or the given (absolute) one."""
        records = new_disk_records(
            name,
            size_bytes=size_bytes,
            filesystem=filesystem,
            status=status,
            image_path=image_path,
            disk_id=disk_id,
        )
        disk, volume = self._insert_disk(*records)
        return DiskRecord(disk, volume, image_path_for(self.data_path, volume), ())

    def _insert_disk(self, disk: Disk, volume: Volume) -> tuple[Disk, Volume]:
        """One transaction: it succeeds only while the name (and explicit image) is free."""
        name, image_path = disk.name, volume.image_path
        now = time.time_ns()
        with self._write() as db:  # IMMEDIATE: no other writer between these checks and the inserts
            if db.execute("SELECT 1 FROM disks WHERE name = ?", (name,)).fetchone():
                raise DiskExistsError(f"a disk named {name} already exists; pick another name")
            if image_path is not None:
                owner = db.execute(
                    "SELECT d.name FROM volumes v JOIN disks d ON d.id = v.disk_id WHERE v.image_path = ?",
                    (image_path,),
                ).fetchone()
                if owner:
                    raise DiskExistsError(
                        f"the image {image_path} already belongs to disk {owner[0]}; "
                        "one image cannot back two disks"
                    )
            db.execute(
                "INSERT INTO disks (id, name, status, filesystem, size_bytes, created_ns, updated_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (disk.id, name, disk.status.value, disk.filesystem, disk.size_bytes, now, now),
            )
            db.execute(
                "INSERT INTO volumes (id, disk_id, image_path, status) VALUES (?, ?, ?, ?)",
                (volume.id, disk.id, image_path, volume.status.value),
            )
        return disk, volume

    def set_disk_status(self, name: str, status: DiskState | str) -> tuple[DiskState, DiskState]:
        """Change a disk's status; return (old, new)."""
        new = _parse_status(status)
        with self._write() as db:
            row = db.execute("SELECT status FROM disks WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise DiskNotFoundError(name)
            db.execute(
                "UPDATE disks SET status = ?, updated_ns = ? WHERE name = ?",
                (new.value, time.time_ns(), name),
            )
        return DiskState(row[0]), new

    def mark_provisioned(self, disk_id: str) -> bool:
        """The disk's image is in place: disk and volume become ``provisioned``; False if it is gone."""
        with self._write() as db:
            found = db.execute(
                "UPDATE disks SET status = ?, updated_ns = ? WHERE id = ?",
                (DiskState.PROVISIONED.value, time.time_ns(), disk_id),
            ).rowcount
            db.execute(
                "UPDATE volumes SET status = ? WHERE disk_id = ?", (VolumeState.PROVISIONED.value, disk_id)
            )
        return bool(found)

    def delete_disk_records(self, disk_id: str) -> bool:
        """Remove a disk with its volume and leases; True if it was there."""
        with self._write() as db:
            return bool(db.execute("DELETE FROM disks WHERE id = ?", (disk_id,)).rowcount)

    def acquire_lease(self, name: str) -> Lease:
        """A ``bound`` lease on the disk: one at a time, as a Miren disk is attached to one user."""
        with self._write() as db:
            row = db.execute("SELECT id, status FROM disks WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise DiskNotFoundError(name)
            disk_id, status = row
            if status == DiskState.DELETING:
                raise DiskBusyError(f"disk {name} is being deleted; it cannot be leased")
            held = db.execute(
                "SELECT id FROM leases WHERE disk_id = ? AND status = ?", (disk_id, LeaseState.BOUND.value)
            ).fetchone()
            if held:
                raise DiskBusyError(
                    f"disk {name} is already leased (lease {held[0]} is bound); release it first"
                )
            lease = Lease(new_id("lease"), disk_id, LeaseState.BOUND)
            now = time.time_ns()
            db.execute(
                "INSERT INTO leases (id, disk_id, status, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?)",
                (lease.id, disk_id, lease.status.value, now, now),
            )
        return lease

    def release_lease(self, lease_id: str) -> tuple[Lease, str, bool]:
        """Mark a lease ``released``; return it, its disk's name, and whether it was held until now."""
        with self._write() as db:
            row = db.execute(
                "SELECT l.id, l.disk_id, l.status, d.name FROM leases l JOIN disks d ON d.id = l.disk_id "
                "WHERE l.id = ?",
                (lease_id,),
            ).fetchone()
            if row is None:
                raise LeaseNotFoundError(f"there is no lease {lease_id}; see `mirenfs disk list`")
            changed = row[2] != LeaseState.RELEASED
            db.execute(
                "UPDATE leases SET status = ?, updated_ns = ? WHERE id = ?",
                (LeaseState.RELEASED.value, time.time_ns(), lease_id),
            )
        return Lease(row[0], row[1], LeaseState.RELEASED), row[3], changed

    def get_disk(self, name: str) -> DiskRecord:
        """One disk with its volume, image path and leases."""
        with self._read() as db:
            records = [] if db is None else self._records(db, " WHERE d.name = ?", (name,))
        if not records:
            raise DiskNotFoundError(name)
        return records[0]

    def list_disks(self) -> list[DiskRecord]:
        """Every disk with its volume, image path and leases, by name: two queries in one snapshot."""
        with self._read() as db:
            return [] if db is None else self._records(db, "", ())

    def _records(self, db: sqlite3.Connection, where: str, params: tuple[str, ...]) -> list[DiskRecord]:
        rows = db.execute(
            "SELECT d.id, d.name, d.status, d.filesystem, d.size_bytes, "
            "v.id, v.disk_id, v.image_path, v.status "
            f"FROM disks d LEFT JOIN volumes v ON v.disk_id = d.id{where} ORDER BY d.name",
            params,
        ).fetchall()
        lease_sql = "SELECT l.id, l.disk_id, l.status FROM leases l"
        if where:
            lease_sql += " JOIN disks d ON d.id = l.disk_id" + where
        leases: dict[str, list[Lease]] = {}
        for lease_row in db.execute(lease_sql + " ORDER BY l.created_ns, l.id", params):
            lease = _lease(lease_row)
            leases.setdefault(lease.disk_id, []).append(lease)
        records = []
        for row in rows:
            disk = _disk(row[:5])
            volume = _volume(row[5:]) if row[5] is not None else None
            image_path: str | None = None
            if volume is not None:
                try:
                    image_path = image_path_for(self.data_path, volume)
                except MirenfsError as exc:
                    log.warning("disk %s: %s", disk.name, exc)
            records.append(DiskRecord(disk, volume, image_path, tuple(leases.get(disk.id, ()))))
        return records

    def put_record(self, record: DiskRecord) -> str:
        """Write one disk as another catalogue has it (``catalog copy``), ids kept: ``added``,
        ``unchanged``, or ``differs`` (that disk is here already as something else, and is left
        alone: it may hold a newer lease or status); a name that belongs to another disk here is
        refused."""
        disk, volume = record.disk, record.volume
        validate_disk_name(disk.name)
        now = time.time_ns()
        with self._write() as db:
            row = db.execute("SELECT id FROM disks WHERE name = ?", (disk.name,)).fetchone()
            if row is not None and row[0] != disk.id:
                raise DiskExistsError(
                    f"a different disk named {disk.name} (id {row[0]}, not {disk.id}) is already in "
                    f"{self.path}; remove one of them first"
                )
            if row is not None:
                (current,) = self._records(db, " WHERE d.name = ?", (disk.name,))
                return "unchanged" if _same_record(current, record) else "differs"
            db.execute(
                "INSERT INTO disks (id, name, status, filesystem, size_bytes, created_ns, updated_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (disk.id, disk.name, disk.status.value, disk.filesystem, disk.size_bytes, now, now),
            )
            if volume is not None:
                db.execute(
                    "INSERT INTO volumes (id, disk_id, image_path, status) VALUES (?, ?, ?, ?)",
                    (volume.id, disk.id, volume.image_path, volume.status.value),
                )
            for order, lease in enumerate(record.leases):
                db.execute(
                    "INSERT OR REPLACE INTO leases (id, disk_id, status, created_ns, updated_ns) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (lease.id, disk.id, lease.status.value, now + order, now + order),  # keeps their order
                )
        return "added"

    def explicit_image_paths(self) -> list[str]:
        """Images registered at their own paths (``disk add``), for staging clean-up."""
        with self._read() as db:
            if db is None:
                return []
            return [
                row[0] for row in db.execute("SELECT image_path FROM volumes WHERE image_path IS NOT NULL")
            ]


_DISK_SELECT = "SELECT id, name, status, filesystem, size_bytes FROM disks"
_VOLUME_SELECT = "SELECT id, disk_id, image_path, status FROM volumes"
_LEASE_SELECT = "SELECT id, disk_id, status FROM leases"


def _disk(row: Sequence[Any]) -> Disk:
    disk_id, name, status, filesystem, size_bytes = row
    return Disk(str(disk_id), str(name), DiskState(status), str(filesystem), int(size_bytes))


def _volume(row: Sequence[Any]) -> Volume:
    volume_id, disk_id, image_path, status = row
    return Volume(
        str(volume_id), str(disk_id), None if image_path is None else str(image_path), VolumeState(status)
    )


def _lease(row: Sequence[Any]) -> Lease:
    lease_id, disk_id, status = row
    return Lease(str(lease_id), str(disk_id), LeaseState(status))


def _same_record(current: DiskRecord, wanted: DiskRecord) -> bool:
    """Whether the store already holds ``wanted`` (the volume's node aside: one host, no nodes)."""
    mine, theirs = current.volume, wanted.volume
    same_volume = (mine is None and theirs is None) or (
        mine is not None
        and theirs is not None
        and (mine.id, mine.image_path, mine.status) == (theirs.id, theirs.image_path, theirs.status)
    )
    return current.disk == wanted.disk and same_volume and current.leases == wanted.leases


# SQLite's primary result codes that a full or read-only filesystem produces: SQLITE_READONLY,
# SQLITE_IOERR (a write or fsync of the database, its -wal or its -shm failed), SQLITE_FULL and
# SQLITE_CANTOPEN (its -wal or -shm could not be made).
_NO_ROOM_CODES = frozenset({8, 10, 13, 14})
# An I/O error with less than this left free is taken for a full data path: SQLite needs room for a
# whole -wal frame and its -shm index, and root may write into blocks others cannot.
ROOM_SLACK_BYTES = 1 << 20


def _data_path_error(data_path: str, code: int | None = None) -> StoreError | None:
    """The error for a data path whose filesystem is read-only or full (by ``os.statvfs``, or by
    the errno ``code`` of a failed call), with that errno for the FUSE boundary (``cp`` into
    restore/ says "No space left on device"); None when it is neither."""
    quota = code == errno.EDQUOT
    no_room = "is over this user's disk quota" if quota else _no_room(data_path, code)
    if no_room is None:
        return None
    read_only = no_room == _READ_ONLY
    remedy = "remount it read-write" if read_only else "free space there"
    number = errno.EDQUOT if quota else errno.EROFS if read_only else errno.ENOSPC
    error = StoreError(f"the data path {data_path} {no_room}; {remedy} and try again")
    error.errno = number
    return error


_EXT4_RESERVED_CLUSTERS = 4096  # ext4 keeps min(2 %, 4096 clusters) free even from root


def _no_room_for_sqlite(data_path: str) -> StoreError | None:
    """The error for a data path SQLite must not change: read-only, or with under
    ``ROOM_SLACK_BYTES`` this process may still write (root may write into the reserve)."""
    try:
        info = os.statvfs(data_path)
    except OSError:
        return None  # not known: SQLite says what fails
    if info.f_flag & os.ST_RDONLY:
        return _data_path_error(data_path, errno.EROFS)
    if os.geteuid() == 0:  # root writes into the reserve, but not into ext4's own (not in f_bfree's sum)
        ext4_own = min(info.f_blocks // 50, _EXT4_RESERVED_CLUSTERS)
        usable = info.f_bfree - ext4_own
        if usable * info.f_frsize < ROOM_SLACK_BYTES and not _is_ext4(data_path):  # asked only then
            usable = info.f_bfree
    else:
        usable = info.f_bavail
    if usable * info.f_frsize < ROOM_SLACK_BYTES:
        return _data_path_error(data_path, errno.ENOSPC)
    return None


def _is_ext4(path: str) -> bool:
    """Whether ``path`` lies on ext4 (by mountinfo: statvfs does not say), whose own reserve is
    subtracted (trial X: on XFS it made 1 to 17 MiB free count as full, and backups failed)."""
    try:
        holding = mount_holding(os.path.realpath(path), read_mountinfo())
    except OSError:  # out of descriptors, say: counted as before
        return True
    return holding is None or holding.fstype == "ext4"  # not known: counted as before


_READ_ONLY = "is on a read-only filesystem"
_FULL = "is full (its filesystem has no space left)"


def _no_room(data_path: str, code: int | None = None) -> str | None:
    """Why the data path takes no writes (read-only, or under ``ROOM_SLACK_BYTES`` or no inodes
    free), by ``os.statvfs`` or the errno ``code`` of a failed call; None when it takes them."""
    read_only, full = code == errno.EROFS, code == errno.ENOSPC
    try:
        info = os.statvfs(data_path)
    except OSError:
        info = None
    if info is not None:
        read_only = read_only or bool(info.f_flag & os.ST_RDONLY)
        no_inodes = info.f_files > 0 and info.f_favail == 0  # btrfs counts no inodes: 0 of 0
        full = full or info.f_bavail * info.f_frsize < ROOM_SLACK_BYTES or no_inodes
    return _READ_ONLY if read_only else _FULL if full else None


def check_data_path(data_path: str) -> None:
    """Refuse a data path the mount could not work with: restores and indexes are written there."""
    try:
        read_only = bool(os.statvfs(data_path).f_flag & os.ST_RDONLY)
    except OSError as exc:
        raise StoreError(f"cannot use the data path {data_path}: {exc.strerror}") from None
    if read_only or not os.access(data_path, os.W_OK):
        if read_only:
            why, fix = "is on a read-only filesystem", "remount that filesystem read-write"
        else:  # trial Q: "mount it read-write" sent a user with no write permission the wrong way
            why, fix = (
                "is not writable by this user",
                "run as a user who may write there (its owner, or root)",
            )
        raise StoreError(
            f"the data path {data_path} {why}; restores and snapshot indexes are kept there, so {fix}"
        )


def _parse_status(status: DiskState | str) -> DiskState:
    try:
        return DiskState(status)
    except ValueError:
        choices = ", ".join(member.value for member in DiskState)
        raise MirenfsError(f"{status!r} is not a disk status; use one of {choices}") from None


__all__ = [
    "DB_FILE_NAME",
    "SCHEMA_VERSION",
    "DiskRecord",
    "Store",
    "check_data_path",
]
