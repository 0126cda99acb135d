"""restore/ driven in-process (no kernel): every refusal of the README's errno table at create,
each state of an entry (``receiving``, ``installed``, ``failed: REASON``), and that a failed
restore leaves the disk exactly as it was: image bytes, store, no staging file, no new disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from mirenfs.disks import live
from mirenfs.disks import store as store_module
from mirenfs.disks.model import DiskState
from mirenfs.disks.restore import FEED_BATCH, MAX_HOLE
from mirenfs.disks.store import Store
from mirenfs.engine import image as image_module
from mirenfs.engine.framestore import FrameStore
from mirenfs.engine.produce import Settings
from mirenfs.errors import CatalogUnreachableError, DiskNotFoundError
from mirenfs.format.frames import compress_frame
from mirenfs.format.header import Meta, decode_header
from mirenfs.mount import openfiles, restoredir
from mirenfs.mount.inodes import RESTORE_INODE, ROOT_INODE
from mirenfs.mount.status import STATUS_XATTR

from support.bad_snapshots import CASES, bad_inputs
from support.data import BAD_NAMES, seek_table_start, sha256_file, staging_files, write_image
from support.fuse_ops import (
    PIECE,
    FileState,
    InProcessMount,
    SetattrFields,
    add_image_disk,
    attach_fake_loop,
    fuse_errno,
    operations,
    snapshot_bytes,
    trio_test,
)
from support.sparse import snapshot_ending_in_zeros
from support.store import make_disk, store_state
from support.vectors import GO_EXT4, GO_VECTORS, GoVector

pytestmark = pytest.mark.usefixtures("sys_block")  # never the host's loop devices


@dataclass(frozen=True)
class Snapshot:
    """A valid snapshot made by the backup engine, with what restoring it must give."""

    data: bytes
    meta: Meta
    header_len: int
    image_sha256: str


def make_snapshot(directory: Path, name: str, segments: list[tuple[str, int]]) -> Snapshot:
    image = directory / f"{name}.img"
    write_image(image, segments, seed=5)
    data = trio.run(lambda: snapshot_bytes(image, name=name))
    meta, header_len = decode_header(data)
    return Snapshot(data, meta, header_len, sha256_file(image))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """Small (under one feed batch): text, random data and a hole, as the bad-input cases expect."""
    segments = [("text", 200_000), ("data", 150_000), ("hole", 300_000), ("text", 5)]
    return make_snapshot(tmp_path_factory.mktemp("good"), "good", segments)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """Over one feed batch: its header is parsed, and a new disk created, before the stream ends."""
    snapshot = make_snapshot(tmp_path_factory.mktemp("big"), "big", [("data", 3 << 20), ("hole", 1 << 20)])
    assert len(snapshot.data) > 2 * FEED_BATCH
    return snapshot


async def entry_names(m: InProcessMount) -> list[str]:
    return [name for name, _attrs in await m.listdir(RESTORE_INODE)]


def disk_status(data_path: Path, name: str) -> str | None:
    try:
        return Store(str(data_path)).get_disk(name).disk.status.value
    except DiskNotFoundError:
        return None


def assert_untouched(
    data_path: Path, before: dict[str, object], image: Path | None, image_before: FileState | None
) -> None:
    """A refused or failed restore changed nothing: store rows, files, directories, the image itself."""
    assert staging_files(data_path) == []
    assert store_state(data_path) == before
    if image is not None:
        assert FileState.of(image) == image_before


# ---- refusals at create: the README's table -----------------------------------------------


@pytest.mark.parametrize(
    "file_name",
    [
        "pg",
        "pg.txt",
        "pg.mirn.bak",
        "pg.MIRN",
        ".mirn",
        "-pg.mirn",
        *(f"{bad}.mirn" for bad in BAD_NAMES if "/" not in bad),
        "sp ace.mirn.sha256",
    ],
)
@trio_test
async def test_not_a_snapshot_name_or_a_bad_disk_name_is_einval(data_path: Path, file_name: str) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before = store_state(data_path)
        assert await fuse_errno(m.create(file_name)) == errno.EINVAL
        assert await entry_names(m) == []
    assert_untouched(data_path, before, None, None)


@pytest.mark.parametrize(
    ("file_name", "shown"),
    [
        ("notes\nmirenfs: INFO restore/pg.mirn: installed.txt", r"'notes\nmirenfs: INFO"),
        ("pg\x1b[2J.mirn", r"'pg\x1b[2J.mirn'"),
    ],
)
@trio_test
async def test_a_refused_name_that_does_not_print_is_logged_quoted_on_one_line(
    data_path: Path, file_name: str, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The name is the writer's (any bytes but '/'): it must not forge a log line or reach a
    terminal's escapes through the log or ``mirenfs status``."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before = store_state(data_path)
        assert await fuse_errno(m.create(file_name)) == errno.EINVAL
        assert await entry_names(m) == []
        [refusal] = m.ops.restores.refusals  # what ``mirenfs status`` lists
        assert refusal.name.startswith(f"restore/{shown}")
        assert "\n" not in refusal.reason and "\x1b" not in refusal.reason
    messages = [record.getMessage() for record in caplog.records if "restore/" in record.getMessage()]
    assert len(messages) == 1
    assert "\n" not in messages[0] and "\x1b" not in messages[0]
    assert messages[0].startswith(f"restore/{shown}")
    assert_untouched(data_path, before, None, None)


Situation = Callable[[Path, Path, Path], None]  # (data path, image, fake /sys/block)


def set_deleting(data_path: Path, image: Path, sys_block: Path) -> None:
    Store(str(data_path)).set_disk_status("pg", DiskState.DELETING)


def bind_lease(data_path: Path, image: Path, sys_block: Path) -> None:
    Store(str(data_path)).acquire_lease("pg")


def attach_loop(data_path: Path, image: Path, sys_block: Path) -> None:
    attach_fake_loop(sys_block, "loop3", image)


def set_attached(data_path: Path, image: Path, sys_block: Path) -> None:
    """A machine may use the image file itself: a restore would leave it writing the old one."""
    Store(str(data_path)).set_disk_status("pg", DiskState.ATTACHED)


BUSY: list[Situation] = [set_deleting, bind_lease, attach_loop, set_attached]


@pytest.mark.parametrize("allow_overwrite", [False, True], ids=["plain", "allow-overwrite"])
@pytest.mark.parametrize("situation", BUSY, ids=lambda f: f.__name__)
@trio_test
async def test_a_disk_in_use_is_ebusy(
    data_path: Path, sys_block: Path, situation: Situation, allow_overwrite: bool
) -> None:
    image = add_image_disk(data_path, "pg")
    situation(data_path, image, sys_block)
    async with operations(data_path, allow_overwrite=allow_overwrite) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        for file_name in ("pg.mirn", ".pg.mirn.Ab12Cd"):  # cp's name and rsync's temporary one
            assert await fuse_errno(m.create(file_name)) == errno.EBUSY
        assert await entry_names(m) == []
    assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_a_loop_device_backing_another_file_or_a_released_lease_does_not_refuse(
    data_path: Path, sys_block: Path
) -> None:
    add_image_disk(data_path, "pg")
    other = data_path / "images" / "other.img"
    other.write_bytes(b"another disk")  # a backing path that leads nowhere could be the image
    attach_fake_loop(sys_block, "loop3", other)
    store = Store(str(data_path))
    store.release_lease(store.acquire_lease("pg").id)
    async with operations(data_path, allow_overwrite=True) as m:
        fh, _inode = await m.create("pg.mirn")
        assert await m.state("pg.mirn") == "receiving"
        await m.close(fh)


@trio_test
async def test_when_loop_devices_cannot_be_read_the_restore_fails_closed(
    data_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = add_image_disk(data_path, "pg")
    monkeypatch.setattr(live, "SYS_BLOCK", str(tmp_path / "no-sys-block"))
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        assert await fuse_errno(m.create("pg.mirn")) == errno.EIO
    assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_an_existing_image_without_allow_overwrite_is_eexist(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        for file_name in ("pg.mirn", ".pg.mirn.Ab12Cd"):
            assert await fuse_errno(m.create(file_name)) == errno.EEXIST
        assert await entry_names(m) == []
        # No entry holds the reason: mirenfs status does, newest first. One process's retries
        # (rsync's new temporary names) count once, under the latest name; another's count again.
        assert await fuse_errno(m.create("not a disk.mirn")) == errno.EINVAL
        m.ctx.pid += 1  # another command
        assert await fuse_errno(m.create("pg.mirn")) == errno.EEXIST
        status = json.loads(await m.ops.getxattr(ROOT_INODE, b"user.mirenfs.status", m.ctx))
        assert [(r["name"], r["errno"], r["tries"]) for r in status["refused"]] == [
            ("restore/pg.mirn", "EEXIST", 1),
            ("restore/not a disk.mirn", "EINVAL", 1),
            ("restore/.pg.mirn.Ab12Cd", "EEXIST", 2),
        ]
        assert "disk pg already has an image" in status["refused"][0]["reason"]
        # Each record names its file once (trial R: "restore/x.part  EINVAL  restore/x.part: …").
        # Each record names its file once (trial R: "restore/x.part  EINVAL  restore/x.part: …").
        assert await fuse_errno(m.create("pg.mirn.part")) == errno.EINVAL
        newest = m.ops.restores.refusal_status()[0]
        assert (newest["name"], newest["reason"]) == (
            "restore/pg.mirn.part",
            "only snapshot files (NAME.mirn, or Miren's NAME.miren.zst and NAME-DATE-TIME.miren.zst) "
            "can be restored",
        )
    async with operations(data_path, allow_overwrite=True) as m:
        fh, _inode = await m.create("pg.mirn")
        assert await m.state("pg.mirn") == "receiving"
        await m.ops.release(fh)
    assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_a_second_restore_of_a_disk_being_restored_is_ebusy(
    data_path: Path, good: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    add_image_disk(data_path, "pg")
    add_image_disk(data_path, "web")
    async with operations(data_path, allow_overwrite=True) as m:
        fh, inode = await m.create("pg.mirn")
        assert await fuse_errno(m.create(".pg.mirn.Ab12Cd")) == errno.EBUSY
        # Trial S: the refusal names the entry that holds the restore, and how far it got.
        held = "disk pg is already being restored through restore/pg.mirn (0 bytes received)"
        assert held in caplog.text, caplog.text
        assert await fuse_errno(m.ops.open(inode, os.O_WRONLY, m.ctx)) == errno.EBUSY
        # A sidecar restores nothing, and another disk is another restore: neither is refused.
        sidecar, _inode = await m.create("pg.mirn.sha256")
        other, _inode = await m.create("web.mirn")
        await m.write_all(fh, good.data)
        assert await m.close(fh) is None
        assert (await m.state("pg.mirn")).startswith("installed")
        # Once it ended, the disk can be restored again.
        again, _inode = await m.create(".pg.mirn.Ab12Cd")
        assert await m.state(".pg.mirn.Ab12Cd") == "receiving"
        for handle in (sidecar, other, again):
            await m.ops.release(handle)


@trio_test
async def test_two_restores_of_one_disk_started_at_once_one_is_ebusy(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        fh, inode = await m.create("pg.mirn")
        await m.ops.release(fh)  # an entry that ended (failed: empty), as after an earlier cp
        outcomes: dict[str, int | None] = {}

        async def reopen() -> None:  # cp onto the existing entry: an open, outside the dir lock
            try:
                await m.ops.open(inode, os.O_WRONLY | os.O_TRUNC, m.ctx)
                outcomes["open"] = None
            except pyfuse3.FUSEError as exc:
                outcomes["open"] = exc.errno

        async def rsync() -> None:  # rsync's temporary file: a create, at the same moment
            try:
                await m.create(".pg.mirn.Ab12Cd")
                outcomes["create"] = None
            except pyfuse3.FUSEError as exc:
                outcomes["create"] = exc.errno

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reopen)
            nursery.start_soon(rsync)
        assert sorted(outcomes.values(), key=str) == [errno.EBUSY, None]


# ---- each state of an entry ------------------------------------------------------------


@trio_test
async def test_receiving_then_installed_into_a_new_disk(data_path: Path, good: Snapshot) -> None:
    async with operations(data_path) as m:
        fh, inode = await m.create("good.mirn")
        assert (await m.ops.getxattr(inode, b"user.mirenfs.state", m.ctx)).decode() == "receiving"
        status = json.loads(await m.ops.getxattr(ROOT_INODE, b"user.mirenfs.status", m.ctx))
        assert [(r["name"], r["state"]) for r in status["restores"]] == [("restore/good.mirn", "receiving")]
        await m.write_all(fh, good.data)
        assert await m.state("good.mirn") == "receiving"  # installed by the close, not by the last write
        assert await m.close(fh) is None
        assert (await m.state("good.mirn")).startswith("installed")
        assert await entry_names(m) == ["good.mirn"]

        record = Store(str(data_path)).get_disk("good")
        assert (record.disk.status, record.disk.size_bytes, record.disk.filesystem) == (
            DiskState.PROVISIONED,
            good.meta.size_bytes,
            good.meta.filesystem,
        )
        assert record.image_path is not None
        image = Path(record.image_path)
        assert sha256_file(image) == good.image_sha256
        assert image.stat().st_mtime_ns == good.meta.timestamp.unix_ns
        assert staging_files(data_path) == []
        # The new disk shows at once, and backing it up gives back the very bytes restored.
        assert "good.mirn" in [name for name, _attrs in await m.listdir(ROOT_INODE)]
        assert await m.read_file("good.mirn") == good.data


@trio_test
async def test_a_new_disk_another_restore_created_meanwhile_is_said_as_such(
    data_path: Path, good: Snapshot
) -> None:
    """Trial T: the loser of two restores creating one new disk (two mounts, or a mount and the
    CLI) was told "a disk named n already exists; pick another name". It is told the disk was
    created meanwhile and that this restore changed nothing; the winner's disk is untouched."""
    async with operations(data_path) as m:
        fh, _inode = await m.create("n.mirn")  # its refusals passed: there was no disk n
        image = Path(make_disk(data_path, "n"))  # the other restore (or a disk create) wins
        before = sha256_file(image)
        await m.write_all(fh, good.data)  # gathered: the header is read by the close
        assert await m.close(fh) == errno.EEXIST
        assert await m.state("n.mirn") == (
            "failed: disk n was created while this restore began (by another restore of it, through "
            "another mount or `mirenfs restore`, or by `disk create`); to replace its image, restore "
            "again; this restore changed nothing"
        )
    assert sha256_file(image) == before and disk_status(data_path, "n") == DiskState.PROVISIONED


@trio_test
async def test_a_restore_that_ends_gives_its_memory_back_either_way(
    data_path: Path, good: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial S: each batch of ten restores left the idle daemon larger (154 MB, then 238 to 253
    MB): their stages' threads freed into glibc arenas it keeps. A restore that ends, installed
    or failed, trims the heap, with what it received to judge whether that is worth it."""
    trims: list[int] = []
    monkeypatch.setattr(restoredir, "give_back_free_memory", trims.append)
    damaged = bytearray(good.data)
    damaged[good.header_len + 50] ^= 0xFF  # inside the first frame
    async with operations(data_path) as m:
        assert await m.copy_in("good.mirn", good.data) is None
        assert trims == [len(good.data)]
        assert await m.copy_in("bad.mirn", bytes(damaged)) in (errno.EINVAL, errno.EIO)
        assert (await m.state("bad.mirn")).startswith("failed: ")
        assert trims == [len(good.data), len(damaged)]


@pytest.mark.parametrize("vector", GO_VECTORS, ids=lambda v: v.file)
@trio_test
async def test_go_vectors_install_over_an_existing_disk(
    data_path: Path, vector: GoVector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirenfs")
    image = add_image_disk(data_path, "pg", filesystem="ext4")
    async with operations(data_path, allow_overwrite=True) as m:
        assert await m.copy_in("pg.mirn", vector.path.read_bytes()) is None
        # The file's name chose the disk; the entry's state and the log say whose snapshot replaced it.
        assert await m.state("pg.mirn") == f"installed from a snapshot of disk {vector.name}"
    changed = "" if vector.filesystem == "ext4" else f"; it held ext4, now {vector.filesystem}"
    assert f"installed (image replaced{changed}, from a snapshot of disk {vector.name})" in caplog.text
    assert sha256_file(image) == vector.sha256
    record = Store(str(data_path)).get_disk("pg")
    assert (record.disk.size_bytes, record.disk.filesystem) == (vector.size_bytes, vector.filesystem)
    assert staging_files(data_path) == []


@pytest.mark.parametrize("into", ["existing disk", "new disk"])
@pytest.mark.parametrize("case", CASES)
@trio_test
async def test_bad_data_fails_and_leaves_the_disk_exactly_as_it_was(
    data_path: Path, good: Snapshot, case: str, into: str
) -> None:
    data, reason = bad_inputs(good.data, good.meta, good.header_len)[case]
    image = add_image_disk(data_path, "pg")
    target = "pg.mirn" if into == "existing disk" else "fresh.mirn"
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        assert await m.copy_in(target, data) in (errno.EINVAL, errno.EIO)
        state = await m.state(target)
        assert state.startswith("failed: ") and re.search(reason, state), state
        assert_untouched(data_path, before, image, image_before)
        assert disk_status(data_path, "fresh") is None


@trio_test
async def test_a_full_filesystem_is_what_every_later_request_of_that_descriptor_hears(
    data_path: Path, big: Snapshot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial R: the kernel splits one ``write(2)`` into several requests, and the one after the
    request that failed got EIO ("this descriptor belongs to a restore that ended", logged a
    second time): the tool said "Input/output error" for a full filesystem."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    full = threading.Event()

    def no_space(*_args: object) -> None:
        full.set()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image_module, "_pwrite_all", no_space)  # the staging file's filesystem is full
    add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        fh, _inode = await m.create("pg.mirn")
        first_batch = FEED_BATCH + PIECE
        await m.write_all(fh, big.data[:first_batch])  # handed to the pipeline, whose write-out fails
        writer = m.ops.handles.get(fh)
        assert isinstance(writer, restoredir.RestoreWriter) and writer.session is not None
        stream = writer.session._restore.stream
        with trio.fail_after(10):  # the stage failed, and its failure is recorded (on a busy machine
            # the stage thread may wait for the CPU after its write failed: the feeds would go on)
            while not (full.is_set() and stream._pipeline is not None and stream._pipeline.stages.failure):
                await trio.sleep(0.01)
        offset = first_batch
        with pytest.raises(pyfuse3.FUSEError) as failed:  # the request that learns of it
            for offset in range(first_batch, len(big.data), PIECE):
                await m.ops.write(fh, offset, big.data[offset : offset + PIECE])
        assert failed.value.errno == errno.ENOSPC
        # The rest of that write(2), as the kernel sends it (from where the short write stopped).
        again = m.ops.write(fh, offset, big.data[offset : offset + PIECE])
        assert await fuse_errno(again) == errno.ENOSPC
        assert await m.close(fh) == errno.ENOSPC
        assert (await m.state("pg.mirn")).endswith("free space there and try again; disk pg is unchanged")
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "its filesystem is full" in warnings[0], warnings


@pytest.mark.parametrize("into", ["existing disk", "new disk"])
@trio_test
async def test_a_full_filesystem_fails_the_restore_naming_the_image_and_what_became_of_the_disk(
    data_path: Path, big: Snapshot, into: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image_module, "_pwrite_all", no_space)  # every write of the staging file
    image = add_image_disk(data_path, "pg")
    target, disk = ("pg.mirn", "pg") if into == "existing disk" else ("fresh.mirn", "fresh")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        assert await m.copy_in(target, big.data) == errno.ENOSPC  # cp: "No space left on device"
        state = await m.state(target)
        outcome = "disk pg is unchanged" if disk == "pg" else "disk fresh was not created"
        staged = r"(\S+/disk\.img|\S+/pg\.img)"
        assert re.fullmatch(
            rf"failed: cannot write {staged}: its filesystem is full \(writing its staging file "
            rf"{staged}\.restore\.tmp\); free space there and try again; {outcome}",
            state,
        ), state
        assert "[Errno" not in state
        assert_untouched(data_path, before, image, image_before)
        assert disk_status(data_path, "fresh") is None


@trio_test
async def test_a_new_disk_the_full_data_path_kept_from_removal_is_removed_once_there_is_room(
    data_path: Path, big: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial X: the staging write found the data path full, and the undo's removal of the new disk
    found it still full (XFS frees removed files' blocks in the background): the disk stayed
    provisioning for good. It is removed once the store takes the change, and the entry says so."""
    monkeypatch.setattr(restoredir, "STRANDED_RETRY_S", 0.02, raising=False)

    def no_space(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    full = store_module._data_path_error(str(data_path), errno.ENOSPC)
    refusals = [full, full]  # the undo's removal, then the first retry

    def delete_when_there_is_room(store: Store, disk_id: str) -> None:
        if refusals:
            raise refusals.pop()
        delete(store, disk_id)

    delete = Store.delete_disk_records
    monkeypatch.setattr(image_module, "_pwrite_all", no_space)
    monkeypatch.setattr(Store, "delete_disk_records", delete_when_there_is_room)
    async with operations(data_path) as m:
        assert await m.copy_in("fresh.mirn", big.data) == errno.ENOSPC
        left = "disk fresh was left provisioning and will be removed when the data path has room"
        assert (await m.state("fresh.mirn")).endswith(left), await m.state("fresh.mirn")
        with trio.fail_after(5):
            while m.ops.restores.stranded:
                await trio.sleep(0.01)
        removed = "disk fresh was left provisioning and was removed once the data path had room"
        assert (await m.state("fresh.mirn")).endswith(removed)
    assert disk_status(data_path, "fresh") is None and refusals == []


@trio_test
async def test_bad_magic_fails_the_write_that_feeds_it(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        assert await fuse_errno(m.ops.write(fh, 0, b"MIRX" + bytes(FEED_BATCH))) == errno.EINVAL
        assert re.fullmatch(r"failed: .*bad magic.*", await m.state("pg.mirn"))
        await m.close(fh)
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_bad_magic_in_a_small_first_write_fails_by_the_close(data_path: Path, good: Snapshot) -> None:
    """The README: bad data fails "a write or the final close". Writes are gathered up to
    FEED_BATCH before they are parsed, so a cp-sized first write may pass and the close fails."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        try:
            await m.ops.write(fh, 0, b"MIRX" + good.data[4:PIECE])
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.EINVAL
            await m.close(fh)
        else:
            assert await m.close(fh) == errno.EINVAL
        assert re.fullmatch(r"failed: .*bad magic.*", await m.state("pg.mirn"))
        assert_untouched(data_path, before, image, image_before)


def test_a_descriptor_of_the_detached_mount_counts_only_when_it_is_of_this_mount(tmp_path: Path) -> None:
    """After ``umount -l`` /proc shows a writer's descriptor as ``/restore/NAME``, the path inside
    the detached mount: it holds the file when its fdinfo shows this mount's id and the entry's
    inode, and a file of that name anywhere else never does."""
    proc = tmp_path / "proc"
    (proc / "4242" / "fd").mkdir(parents=True)
    (proc / "4242" / "fdinfo").mkdir()
    os.symlink("/restore/pg.mirn", proc / "4242" / "fd" / "5")  # how readlink names it once detached
    (proc / "4242" / "fdinfo" / "5").write_text("pos:\t1000\nflags:\t0100001\nmnt_id:\t77\nino:\t12\n")
    mounted_path = "/mnt/disks/restore/pg.mirn"  # where the mount was: no descriptor names it now

    def held(identity: tuple[int, int] | None) -> bool:
        return openfiles.held_open(mounted_path, inside="/restore/pg.mirn", identity=identity, proc=str(proc))

    assert held((77, 12))
    assert not held((77, 13)) and not held((78, 12)) and not held(None)
    assert not openfiles.held_open(mounted_path, proc=str(proc))
    # Only a descriptor that can write holds it: `cat restore/pg.mirn` reading the outcome does not.
    (proc / "4242" / "fdinfo" / "5").write_text("pos:\t0\nflags:\t0100000\nmnt_id:\t77\nino:\t12\n")
    assert not held((77, 12))
    os.symlink(mounted_path, proc / "4242" / "fd" / "6")  # the mount still there: named by its path
    (proc / "4242" / "fdinfo" / "6").write_text("pos:\t0\nflags:\t0100002\nmnt_id:\t9\nino:\t12\n")
    assert openfiles.held_open(mounted_path, proc=str(proc))
    (proc / "4242" / "fdinfo" / "6").write_text("pos:\t0\nflags:\t02100000\nmnt_id:\t9\nino:\t12\n")
    assert not openfiles.held_open(mounted_path, proc=str(proc))


@trio_test
async def test_a_short_stream_held_by_another_writer_fails_the_close_with_eio_then_the_release(
    data_path: Path, good: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(restoredir, "held_open", lambda path, **_: True)  # a forked writer still holds it
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        await m.write_all(fh, good.data[: len(good.data) // 2])
        assert await fuse_errno(m.ops.flush(fh)) == errno.EIO
        # Not over yet: another descriptor (a forked writer's) may still write the rest.
        assert await m.state("pg.mirn") == "receiving"
        await m.ops.release(fh)
        assert re.fullmatch(r"failed: .*(truncated|short).*", await m.state("pg.mirn"))
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_the_last_close_of_a_short_stream_fails_it_at_once(data_path: Path, good: Snapshot) -> None:
    """Nobody else holds the file: the failing close itself leaves the disk as it was."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        await m.write_all(fh, good.data[: len(good.data) // 2])
        assert await fuse_errno(m.ops.flush(fh)) in (errno.EINVAL, errno.EIO)
        assert re.fullmatch(r"failed: .*(truncated|short).*", await m.state("pg.mirn"))
        assert_untouched(data_path, before, image, image_before)  # before the release
        await m.ops.release(fh)
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_the_last_close_of_a_short_stream_into_a_new_name_removes_the_disk(
    data_path: Path, good: Snapshot
) -> None:
    async with operations(data_path) as m:
        fh, _inode = await m.create("fresh.mirn")
        await m.write_all(fh, good.data[: len(good.data) // 2])
        assert await fuse_errno(m.ops.flush(fh)) in (errno.EINVAL, errno.EIO)
        assert Store(str(data_path)).list_disks() == []  # and gone when the failing close returns
        assert not (data_path / "disk-data" / "volumes").exists() or not any(
            (data_path / "disk-data" / "volumes").iterdir()
        )
        await m.ops.release(fh)


@trio_test
async def test_an_empty_file_fails_its_close(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        assert await m.close(fh) in (errno.EINVAL, errno.EIO)
        assert (await m.state("pg.mirn")).startswith("failed: ")
        assert_untouched(data_path, before, image, image_before)


@pytest.mark.parametrize("where", ["halfway", "in the seek table"])
@trio_test
async def test_a_close_before_the_end_leaves_the_restore_open_for_the_rest(
    data_path: Path, good: Snapshot, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """dd and forked writers close a descriptor while the stream goes on through another. Review
    MT: also after every image byte is out, inside the seek table that ends the snapshot."""
    monkeypatch.setattr(restoredir, "held_open", lambda path, **_: True)
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        fh, _inode = await m.create("pg.mirn")
        half = len(good.data) // 2 if where == "halfway" else len(good.data) - 5
        await m.write_all(fh, good.data[:half])
        assert await fuse_errno(m.ops.flush(fh)) == errno.EIO
        for offset in range(half, len(good.data), PIECE):
            await m.ops.write(fh, offset, good.data[offset : min(offset + PIECE, len(good.data))])
        assert await m.close(fh) is None
        assert (await m.state("pg.mirn")).startswith("installed")
    assert sha256_file(image) == good.image_sha256


@pytest.mark.parametrize("then", ["its seek table", "bytes after its end"])
@trio_test
async def test_a_close_that_finds_the_stream_whole_while_it_is_written_on_installs_at_the_last(
    data_path: Path, good: Snapshot, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """Review S21 G1: a close of another descriptor (a dup, a forked child) that came where the
    image data ends, before the seek table, installed the restore; the writer's next write then
    failed, and it exited 1 with its restore installed. Now that close succeeds and the install
    waits for the close that leaves no writer, so what comes next still counts: a seek table
    is taken, bytes after the end fail the restore, and the writer learns either way."""
    writers = [True]
    monkeypatch.setattr(restoredir, "held_open", lambda path, **_: writers[0])
    image = add_image_disk(data_path, "pg")
    whole = seek_table_start(good.data) if then == "its seek table" else len(good.data)
    rest = good.data[whole:] if then == "its seek table" else b"after the end"
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        await m.write_all(fh, good.data[:whole])
        assert await m.ops.flush(fh) is None  # whole and verified: that close succeeds
        assert await m.state("pg.mirn") == restoredir.VERIFIED_WAITING
        assert store_state(data_path)["rows"] == before["rows"] and FileState.of(image) == image_before
        if then == "its seek table":
            await m.ops.write(fh, whole, rest)
            assert await m.state("pg.mirn") == "receiving"
            writers[0] = False  # the writer's own close: nobody else holds it
            assert await m.ops.flush(fh) is None
            assert (await m.state("pg.mirn")).startswith("installed")
            await m.ops.release(fh)
            assert sha256_file(image) == good.image_sha256
        else:
            assert await m.ops.write(fh, whole, rest) == len(rest)  # gathered: fed at the close
            assert await m.close(fh) == errno.EINVAL
            assert re.fullmatch(r"failed: .*(no frame starts here|corrupt).*", await m.state("pg.mirn"))
            assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_a_whole_stream_whose_checksum_does_not_match_fails_a_close_that_leaves_a_writer(
    data_path: Path, good: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close that finds the stream whole while a writer remains compares the checksum then:
    that close fails, not only the last one."""
    monkeypatch.setattr(restoredir, "held_open", lambda path, **_: True)
    data, _reason = bad_inputs(good.data, good.meta, good.header_len)["checksum mismatch"]
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        await m.write_all(fh, data[: seek_table_start(data)])
        assert await fuse_errno(m.ops.flush(fh)) == errno.EINVAL
        assert (await m.state("pg.mirn")).startswith("failed: checksum mismatch")
        assert await fuse_errno(m.ops.write(fh, seek_table_start(data), data[seek_table_start(data) :])) in (
            errno.EINVAL,
            errno.EIO,
        )
        await m.ops.release(fh)
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_a_checksum_mismatch_fails_the_close_with_einval(data_path: Path, good: Snapshot) -> None:
    data, _reason = bad_inputs(good.data, good.meta, good.header_len)["checksum mismatch"]
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        await m.write_all(fh, data)
        assert await m.close(fh) == errno.EINVAL
        assert (await m.state("pg.mirn")).startswith("failed: checksum mismatch")
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_a_snapshot_appended_to_an_entry_is_refused_as_such(data_path: Path, good: Snapshot) -> None:
    """Trial R: `cat pg.mirn >> restore/pg.mirn` over an installed entry wrote first at the
    entry's size, and the gap read as zeros: "bad magic 00 00 00 00" blamed a good snapshot."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        assert await m.copy_in("pg.mirn", good.data) is None
        before, image_before = store_state(data_path), FileState.of(image)
        entry = await m.lookup("pg.mirn", RESTORE_INODE)
        fh = await m.open(entry.st_ino, os.O_WRONLY | os.O_APPEND)
        assert await fuse_errno(m.ops.write(fh, entry.st_size, good.data[:PIECE])) == errno.EINVAL
        assert await m.close(fh) == errno.EINVAL
        assert await m.state("pg.mirn") == (
            f"failed: writes to restore/ must arrive in order: the first write came at offset "
            f"{entry.st_size}, where a snapshot is written from its first byte (appended with >>, or "
            "after a seek as dd seek= makes?); copy it with cp, or write it with >; disk pg is unchanged"
        )
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_a_backwards_write_is_einval_and_undoes_the_restore(data_path: Path, good: Snapshot) -> None:
    """Bytes already fed cannot be written again: a hole is only ever ahead of the stream."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        await m.ops.write(fh, 0, good.data[:PIECE])
        back = PIECE - 7
        assert await fuse_errno(m.ops.write(fh, back, good.data[back : back + PIECE])) == errno.EINVAL
        state = (
            f"failed: writes to restore/ must arrive in order: got offset {back}, expected {PIECE}; "
            "disk pg is unchanged"
        )
        assert await m.state("pg.mirn") == state
        # The restore is over: what comes next (even in order) is refused with the same errno (it
        # is the same failure), and the state stays.
        assert await fuse_errno(m.ops.write(fh, PIECE, good.data[PIECE : 2 * PIECE])) == errno.EINVAL
        assert await m.close(fh) == errno.EINVAL
        assert await m.state("pg.mirn") == state
        assert_untouched(data_path, before, image, image_before)


@pytest.mark.parametrize("disk", ["pg", "fresh"])
@trio_test
async def test_a_failed_restore_says_what_became_of_its_disk(
    data_path: Path, good: Snapshot, disk: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The entry's state and the log line end with the disk's fate, as the CLI's sentence does:
    the next step differs for a disk left as it was and one never created."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        assert await m.copy_in(f"{disk}.mirn", good.data[: len(good.data) // 2]) == errno.EINVAL
        fate = "disk pg is unchanged" if disk == "pg" else "disk fresh was not created"
        state = await m.state(f"{disk}.mirn")
        cut = "(a file cut short, or a copy stopped before its end)"  # a cp stopped by Ctrl-C looks the same
        assert (
            state
            == f"failed: the snapshot data is truncated: the stream ended inside a zstd frame {cut}; {fate}"
        )
        assert_untouched(data_path, before, image, image_before)
    [logged] = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith(f"restore of disk {disk} ")
    ]
    assert logged.endswith(f"failed: {state.removeprefix('failed: ')}"), logged


def zero_run(data: bytes, start: int) -> tuple[int, int]:
    """Where the first run of zero bytes at or after ``start`` begins, and how long it is."""
    first = data.index(0, start)
    end = first
    while data[end] == 0:
        end += 1
    return first, end - first


async def write_from(m: InProcessMount, fh: int, data: bytes, start: int, end: int) -> None:
    """``pwrite`` ``data[start:end]`` at ``start``, in the pieces the kernel sends."""
    for offset in range(start, end, PIECE):
        piece = data[offset : min(offset + PIECE, end)]
        assert await m.ops.write(fh, offset, piece) == len(piece)


async def assert_installed_as_new_disk(
    m: InProcessMount, data_path: Path, name: str, snapshot: Snapshot
) -> None:
    assert await m.state(f"{name}.mirn") == f"installed: created disk {name}"
    record = Store(str(data_path)).get_disk(name)
    assert record.disk.status == DiskState.PROVISIONED and record.image_path is not None
    assert sha256_file(Path(record.image_path)) == snapshot.image_sha256
    assert staging_files(data_path) == []


@trio_test
async def test_a_write_past_a_few_skipped_bytes_takes_them_as_zeros(data_path: Path, big: Snapshot) -> None:
    """``rsync --sparse`` seeks over the zero bytes of what it copies (the operator trial: one
    byte): the bytes skipped read as zeros, so the stream is still in order. Here past a feed
    batch, so the skipped zeros and the writes around them are gathered together."""
    first, length = zero_run(big.data, FEED_BATCH + 1)
    assert length <= 16  # a few bytes, as in a compressed snapshot
    async with operations(data_path) as m:
        fh, _inode = await m.create("big.mirn")
        await write_from(m, fh, big.data, 0, first)
        await write_from(m, fh, big.data, first + length, len(big.data))
        [status] = m.ops.restores.status()
        assert status["bytes"] == len(big.data)
        assert await m.close(fh) is None
        await assert_installed_as_new_disk(m, data_path, "big", big)


@pytest.fixture(scope="module")
def ending_in_zeros(tmp_path_factory: pytest.TempPathFactory, good: Snapshot) -> Snapshot:
    """A valid snapshot whose last 3000 bytes are zeros (rsync -S extends the file over them with
    ftruncate); a mirenfs snapshot ends in its seek table's magic, never in a zero."""
    image = tmp_path_factory.mktemp("zeros") / "zeros.img"
    content = write_image(image, [("text", 200_000), ("zero", 3000)], seed=5)
    data = snapshot_ending_in_zeros(replace(good.meta, name="zeros"), content)
    meta, header_len = decode_header(data)
    assert data.endswith(bytes(3000)) and not data.endswith(bytes(3001))
    return Snapshot(data, meta, header_len, sha256_file(image))


@trio_test
async def test_a_hole_at_the_end_is_closed_by_an_extending_truncate(
    data_path: Path, ending_in_zeros: Snapshot
) -> None:
    """What rsync -S does when a file ends in zeros: write up to them, then ``ftruncate`` to the
    full size. The truncate feeds those zeros, so the close installs the whole snapshot."""
    snapshot = ending_in_zeros.data
    end = len(snapshot) - 3000
    async with operations(data_path) as m:
        fh, inode = await m.create("zeros.mirn")
        await write_from(m, fh, snapshot, 0, end)
        attrs = await m.ops.getattr(inode, m.ctx)
        for size in (end, len(snapshot)):  # to what was received: nothing changes; beyond it: zeros
            attrs.st_size = size
            await m.ops.setattr(inode, attrs, SetattrFields(update_size=True), fh, m.ctx)
            [status] = m.ops.restores.status()
            assert (status["state"], status["bytes"]) == ("receiving", size)
        assert await m.close(fh) is None
        await assert_installed_as_new_disk(m, data_path, "zeros", ending_in_zeros)


@pytest.mark.parametrize("how", ["write", "truncate"])
@trio_test
async def test_a_hole_larger_than_the_limit_is_einval_and_leaves_nothing(
    data_path: Path, good: Snapshot, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hole is fed as the zeros it stands for: one seek must not make the mount decompress
    gigabytes. Past the limit it is refused, with the in-order error saying to drop -S."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, inode = await m.create("pg.mirn")
        await m.ops.write(fh, 0, good.data[:PIECE])
        beyond = PIECE + MAX_HOLE + 1
        if how == "write":
            refused = m.ops.write(fh, beyond, good.data[PIECE : 2 * PIECE])
        else:
            attrs = await m.ops.getattr(inode, m.ctx)
            attrs.st_size = beyond
            refused = m.ops.setattr(inode, attrs, SetattrFields(update_size=True), fh, m.ctx)
        assert await fuse_errno(refused) == errno.EINVAL
        state = await m.state("pg.mirn")
        assert state.startswith("failed: writes to restore/ must arrive in order: ")
        assert state.endswith(
            f"a hole of {MAX_HOLE + 1} bytes; holes (bytes skipped by a seek, as rsync -S/--sparse and "
            "dd seek= make) longer than 4 MiB are not supported: write the snapshot in order (copy "
            "without -S/--sparse); disk pg is unchanged"
        )
        assert await m.close(fh) == errno.EINVAL
        assert_untouched(data_path, before, image, image_before)
    [logged] = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert logged.startswith("restore of disk pg from restore/pg.mirn by uid")


@trio_test
async def test_a_raw_image_copied_in_with_its_holes_skipped_is_named_as_such(data_path: Path) -> None:
    """Trial R (s18): ``cp pg.img restore/pg.mirn`` (the disk itself, not its snapshot) skips the
    image's holes, and the entry blamed a hole and ``-S/--sparse``, never given, instead of the
    file: the bytes that came before the hole were judged only once handed over. They are judged
    first now, and a raw filesystem is named as one."""
    image = add_image_disk(data_path, "pg")
    raw = bytearray(300_000)
    raw[1080:1082] = b"\x53\xef"  # an ext4 superblock's magic
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        await m.ops.write(fh, 0, bytes(raw))  # gathered, not yet judged
        assert await fuse_errno(m.ops.write(fh, 8 << 20, b"data after a hole")) == errno.EINVAL
        assert await m.state("pg.mirn") == (
            "failed: not a .mirn snapshot: bad magic (it starts with the bytes 00 00 00 00, where a snapshot "
            "starts with MIRN): it is a raw ext4 image, not a snapshot of one; make one of it with "
            "mirenfs backup --image IMAGE -o NAME.mirn; disk pg is unchanged"
        )
        assert await m.close(fh) == errno.EINVAL
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_a_disk_created_for_a_restore_that_fails_is_removed(data_path: Path, big: Snapshot) -> None:
    add_image_disk(data_path, "pg")  # the store exists before: only the new disk must go again
    async with operations(data_path) as m:
        before = store_state(data_path)
        fh, _inode = await m.create("big.mirn")
        await m.write_all(fh, big.data[: FEED_BATCH + PIECE])  # the header is in: the disk exists
        assert disk_status(data_path, "big") == "provisioning"
        assert len(staging_files(data_path)) == 1
        offset = FEED_BATCH + PIECE + MAX_HOLE + 1  # a hole longer than may be taken as zeros
        assert await fuse_errno(m.ops.write(fh, offset, big.data[offset : offset + PIECE])) == errno.EINVAL
        assert disk_status(data_path, "big") is None
        assert_untouched(data_path, before, None, None)
        await m.close(fh)
        assert (await m.state("big.mirn")).startswith("failed: ")


@pytest.mark.usefixtures("no_petabyte_files")
@trio_test
async def test_a_header_claiming_a_petabyte_is_efbig_and_says_so(data_path: Path, good: Snapshot) -> None:
    """The staging file cannot be made that large here: the errno stays EFBIG (cp says "File too
    large"), the reason says what the header claims, and the disk created for it goes again."""
    claimed = replace(good.meta, size_bytes=1 << 50).header() + good.data[good.header_len :]
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        before = store_state(data_path)
        assert await m.copy_in("huge.mirn", claimed) == errno.EFBIG
        state = await m.state("huge.mirn")
        assert state.startswith(
            "failed: the snapshot's header claims a disk of 1.0 PiB (1125899906842624 "
        ), state
        assert disk_status(data_path, "huge") is None
        assert_untouched(data_path, before, None, None)


@trio_test
async def test_a_sidecar_is_accepted_and_ignored(data_path: Path, good: Snapshot) -> None:
    image = add_image_disk(data_path, "pg")
    line = f"{'0' * 64}  pg.mirn\n".encode()
    async with operations(data_path) as m:  # no --allow-overwrite: a sidecar overwrites nothing
        before, image_before = store_state(data_path), FileState.of(image)
        for file_name in ("pg.mirn.sha256", "new.mirn.sha256", ".pg.mirn.sha256.Ab12Cd"):
            assert await m.copy_in(file_name, line) is None
            state = await m.state(file_name)
            assert not state.startswith(("failed", "receiving", "installed")), state
        assert sorted(await entry_names(m)) == [".pg.mirn.sha256.Ab12Cd", "new.mirn.sha256", "pg.mirn.sha256"]
        assert_untouched(data_path, before, image, image_before)
        assert disk_status(data_path, "new") is None
        # A snapshot copied under a checksum file's name is too large to be one: "File too large",
        # with a reason that says what to do, and still nothing is restored.
        assert await m.copy_in("web.mirn.sha256", good.data) == errno.EFBIG
        assert await m.state("web.mirn.sha256") == (
            "refused: a checksum file holds at most 4096 bytes; copy a snapshot to NAME.mirn"
        )
        assert_untouched(data_path, before, image, image_before)
        assert disk_status(data_path, "web") is None


@trio_test
async def test_deleting_an_entry_while_it_receives_undoes_the_restore(data_path: Path, big: Snapshot) -> None:
    add_image_disk(data_path, "pg")  # the store exists before: only the new disk must go again
    async with operations(data_path) as m:
        before = store_state(data_path)
        fh, _inode = await m.create("big.mirn")
        await m.write_all(fh, big.data[: FEED_BATCH + PIECE])
        assert disk_status(data_path, "big") == "provisioning"
        await m.ops.unlink(RESTORE_INODE, b"big.mirn", m.ctx)
        assert await entry_names(m) == []
        assert await fuse_errno(m.lookup("big.mirn", RESTORE_INODE)) == errno.ENOENT
        offset = FEED_BATCH + PIECE
        assert await fuse_errno(m.ops.write(fh, offset, big.data[offset : offset + PIECE])) == errno.EIO
        await m.close(fh)
        assert_untouched(data_path, before, None, None)


@trio_test
async def test_a_failed_restore_whose_writer_removed_its_file_is_still_in_the_status(
    data_path: Path, good: Snapshot
) -> None:
    """Trial X: rsync removes its temporary file when its close fails, and the failure was then
    nowhere but in the log (an older entry of that name went on saying installed)."""
    async with operations(data_path) as m:
        temporary = ".good.mirn.AbCdEf"
        assert await m.copy_in(temporary, good.data[:-1]) is not None  # cut short: the close fails
        await m.ops.unlink(RESTORE_INODE, temporary.encode(), m.ctx)
        newest = m.ops.restores.refusal_status()[0]
        assert newest["name"] == f"restore/{temporary}" and newest["errno"] == "EINVAL"
        assert newest["reason"].endswith("(its writer then removed it)"), newest
        assert "truncated" in newest["reason"]
    assert disk_status(data_path, "good") is None


@trio_test
async def test_the_log_says_a_verified_snapshot_is_replacing_the_image_before_it_does(
    data_path: Path, good: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial M (s18): a mount killed right after a restore's rename told the writer its close
    failed, and no line anywhere said the disk had been replaced: the intent is logged first."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    async with operations(data_path) as m:
        assert await m.copy_in("good.mirn", good.data) is None
    lines = [record.getMessage() for record in caplog.records]
    intent = (
        f"disk good: the snapshot verified ({good.meta.size_bytes} bytes, checksum {good.meta.checksum}); "
        "replacing its image now"
    )
    [installed] = [
        i for i, line in enumerate(lines) if line.startswith("restore of disk good ") and "installed" in line
    ]
    assert intent in lines[:installed], lines


@trio_test
async def test_an_installed_restore_whose_writer_removed_its_file_is_still_in_the_status(
    data_path: Path, good: Snapshot
) -> None:
    """Trial R (s18): ``rsync --delay-updates`` cannot move its temporary file into a partial
    directory and removes it, once installed: the disk was replaced, and ``mirenfs status`` said
    "no restores" (the README said the entry reads installed)."""
    async with operations(data_path) as m:
        temporary = ".good.mirn.AbCdEf"
        assert await m.copy_in(temporary, good.data) is None  # installed: the close succeeds
        await m.ops.unlink(RESTORE_INODE, temporary.encode(), m.ctx)
        [shown] = m.ops.restores.status()
        assert shown["name"] == f"restore/{temporary}" and shown["disk"] == "good"
        assert str(shown["state"]).startswith("installed: created disk good")
        assert str(shown["state"]).endswith(" (its file was removed since)")
        assert m.ops.restores.refusal_status() == []
    assert disk_status(data_path, "good") == "provisioned"


@trio_test
async def test_a_refused_restore_over_an_ended_entry_says_so_in_the_entry(
    data_path: Path, good: Snapshot
) -> None:
    """Trial M (s18): the entry of an earlier restore that installed kept saying "installed" when a
    new copy onto it was refused (a lease bound since): a script checking the state, as the README
    advises, read success. The entry says the refusal now; the disk is as the first restore left it."""
    async with operations(data_path, allow_overwrite=True) as m:
        assert await m.copy_in("good.mirn", good.data) is None
        assert (await m.state("good.mirn")).startswith("installed")
        Store(str(data_path)).acquire_lease("good")
        inode = (await m.lookup("good.mirn", RESTORE_INODE)).st_ino
        assert await fuse_errno(m.open(inode, os.O_WRONLY | os.O_TRUNC)) == errno.EBUSY
        state = await m.state("good.mirn")
        assert state.startswith("failed: ") and "lease" in state, state
        # Nothing of the earlier restore's outcome stays with it (review S21 G7: its size and
        # checksum, and its bytes received, read as the refused copy's).
        assert "checksum" not in state, state
        shown = [item for item in m.ops.restores.status() if item["name"] == "restore/good.mirn"]
        assert [item["bytes"] for item in shown] == [0]
    assert disk_status(data_path, "good") == "provisioned"


@trio_test
async def test_stopping_the_mount_undoes_an_unfinished_restore(data_path: Path, big: Snapshot) -> None:
    add_image_disk(data_path, "pg")  # the store exists before: only the new disk must go again
    async with operations(data_path) as m:
        before = store_state(data_path)
        fh, _inode = await m.create("big.mirn")
        await m.write_all(fh, big.data[: FEED_BATCH + PIECE])
        assert disk_status(data_path, "big") == "provisioning"
        # Never closed: the mount stops first.
    assert disk_status(data_path, "big") is None
    assert_untouched(data_path, before, None, None)


@pytest.mark.parametrize("situation", [bind_lease, attach_loop], ids=lambda f: f.__name__)
@trio_test
async def test_a_disk_taken_into_use_mid_stream_fails_the_close_with_ebusy(
    data_path: Path, sys_block: Path, good: Snapshot, situation: Situation
) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        fh, _inode = await m.create("pg.mirn")
        await m.write_all(fh, good.data)
        situation(data_path, image, sys_block)
        before, image_before = store_state(data_path), FileState.of(image)
        assert await m.close(fh) == errno.EBUSY
        assert (await m.state("pg.mirn")).startswith("failed: ")
        assert_untouched(data_path, before, image, image_before)


GONE = "the disk catalogue at etcd://127.0.0.1:1/t3 is unreachable (127.0.0.1:1: connection refused)"
TRY_AGAIN = "try again when the catalogue answers"


def catalogue_goes_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lookup by name fails closed from now on, as on an etcd catalogue that went away."""

    def unreachable(self: Store, name: str) -> None:
        raise CatalogUnreachableError(GONE)

    monkeypatch.setattr(Store, "find_disk_by_name", unreachable)


@trio_test
async def test_a_catalogue_gone_at_the_final_check_says_the_disk_is_unchanged_and_what_to_do(
    data_path: Path, good: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        fh, _inode = await m.create("pg.mirn")
        await m.write_all(fh, good.data)
        before, image_before = store_state(data_path), FileState.of(image)
        catalogue_goes_away(monkeypatch)
        assert await m.close(fh) == errno.EIO
        assert await m.state("pg.mirn") == f"failed: {GONE}; disk pg is unchanged; {TRY_AGAIN}"
        assert_untouched(data_path, before, image, image_before)


async def restore_over_another_filesystem(
    m: InProcessMount, image: Path, at_close: Callable[[], None]
) -> tuple[int | None, FileState]:
    """GO_EXT4 written over ``pg`` (an XFS disk of another size): the store must take a new size
    and filesystem. ``at_close`` runs once the stream is in; the errno of the close, and the
    image's state before it."""
    fh, _inode = await m.create("pg.mirn")
    await m.write_all(fh, GO_EXT4.path.read_bytes())
    image_before = FileState.of(image)
    at_close()
    return await m.close(fh), image_before


@trio_test
async def test_a_store_too_full_to_record_the_new_image_keeps_the_old_one(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial R: the image was renamed into place before the store took its new size and
    filesystem; a full data path then refused that record, and the entry said "disk pg is
    unchanged" over a replaced image. The store takes the record first, while the old image
    is still in place."""
    image = add_image_disk(data_path, "pg", filesystem="xfs")
    full = store_module._data_path_error(str(data_path), errno.ENOSPC)
    assert full is not None
    async with operations(data_path, allow_overwrite=True) as m:
        before = store_state(data_path)

        def fill_the_data_path() -> None:  # what the store's checks see with under 1 MiB left
            monkeypatch.setattr(store_module, "_no_room_for_sqlite", lambda _path: full)
            monkeypatch.setattr(store_module, "_no_room", lambda _path, _code=None: store_module._FULL)

        answer, image_before = await restore_over_another_filesystem(m, image, fill_the_data_path)
        assert answer == errno.ENOSPC
        assert await m.state("pg.mirn") == f"failed: {full}; disk pg is unchanged"
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_an_image_not_replaced_after_its_record_sets_the_record_back(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store took the new image's record, then the rename failed: it describes the old
    image again. And if it cannot be set back, the entry says what the store now claims."""
    image = add_image_disk(data_path, "pg", filesystem="xfs")
    old = Store(str(data_path)).get_disk("pg").disk

    def rename_fails(self: image_module.StagingImage) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(image_module.StagingImage, "rename_over_image", rename_fails)
    async with operations(data_path, allow_overwrite=True) as m:
        answer, image_before = await restore_over_another_filesystem(m, image, lambda: None)
        assert answer == errno.EIO
        assert (await m.state("pg.mirn")).endswith("; disk pg is unchanged")
        assert FileState.of(image) == image_before and staging_files(data_path) == []
        disk = Store(str(data_path)).get_disk("pg").disk
        assert (disk.size_bytes, disk.filesystem) == (old.size_bytes, "xfs")

        recorded = Store.update_disk

        def record_once(self: Store, disk_id: str, *, size_bytes: int, filesystem: str) -> None:
            """The record is taken; setting it back finds the data path full."""
            monkeypatch.setattr(Store, "update_disk", refuse)
            recorded(self, disk_id, size_bytes=size_bytes, filesystem=filesystem)

        def refuse(self: Store, disk_id: str, *, size_bytes: int, filesystem: str) -> None:
            raise store_module._data_path_error(str(data_path), errno.ENOSPC) or AssertionError

        monkeypatch.setattr(Store, "update_disk", record_once)
        answer, image_before = await restore_over_another_filesystem(m, image, lambda: None)
        assert answer == errno.EIO and FileState.of(image) == image_before
        state = await m.state("pg.mirn")
        assert state.endswith(
            f"; disk pg: its image is unchanged ({old.size_bytes} bytes with xfs), but the store could "
            f"not be set back and says {GO_EXT4.size_bytes} bytes with ext4 (the data path {data_path} "
            "is full (its filesystem has no space left); free space there and try again); restore it again"
        ), state
        disk = Store(str(data_path)).get_disk("pg").disk
        assert (disk.size_bytes, disk.filesystem) == (GO_EXT4.size_bytes, "ext4")  # as the entry says


@trio_test
async def test_a_directory_that_will_not_sync_after_the_rename_still_reports_the_restore_installed(
    data_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After the rename the image is the new one: a failed fsync of its directory must not
    report the restore failed and the disk unchanged (nor set the store's record back)."""
    image = add_image_disk(data_path, "pg", filesystem="xfs")

    def will_not_sync(path: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(image_module, "fsync_directory", will_not_sync)
    caplog.set_level(logging.WARNING, logger="mirenfs")
    async with operations(data_path, allow_overwrite=True) as m:
        answer, _image_before = await restore_over_another_filesystem(m, image, lambda: None)
        assert answer is None
        assert await m.state("pg.mirn") == f"installed from a snapshot of disk {GO_EXT4.name}"
    assert sha256_file(image) == GO_EXT4.sha256
    disk = Store(str(data_path)).get_disk("pg").disk
    assert (disk.size_bytes, disk.filesystem) == (GO_EXT4.size_bytes, "ext4")
    assert "could not be synced (Input/output error)" in caplog.text


@trio_test
async def test_a_restore_refused_while_the_catalogue_is_gone_says_nothing_was_created(
    data_path: Path, good: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with operations(data_path) as m:
        catalogue_goes_away(monkeypatch)
        assert await fuse_errno(m.create("fresh.mirn")) == errno.EIO
        refused = m.ops.restores.refusal_status()[0]
        assert refused["reason"] == f"{GONE}; no disk fresh was created or changed; {TRY_AGAIN}"


@trio_test
async def test_a_disk_an_outage_left_provisioning_is_removed_once_the_catalogue_answers(
    data_path: Path, big: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalogue went away mid-stream: the new disk could not be removed at once. The entry
    says it will be; the mount removes it when the catalogue answers again, and says it did."""
    monkeypatch.setattr(restoredir, "STRANDED_RETRY_S", 0.02, raising=False)
    async with operations(data_path) as m:
        fh, _inode = await m.create("big.mirn")
        await m.write_all(fh, big.data[: FEED_BATCH + PIECE])  # the header is in: the disk exists
        assert disk_status(data_path, "big") == "provisioning"

        tries: list[object] = []

        def unreachable(*args: object) -> None:
            tries.append(args)
            raise CatalogUnreachableError(GONE)

        with monkeypatch.context() as outage:
            outage.setattr(Store, "find_disk_by_name", unreachable)
            outage.setattr(Store, "delete_disk_records", unreachable)
            for offset in range(FEED_BATCH + PIECE, len(big.data), PIECE):
                await m.ops.write(fh, offset, big.data[offset : offset + PIECE])
            assert await m.close(fh) == errno.EIO
            left = "disk big was left provisioning and will be removed when the catalogue answers"
            assert await m.state("big.mirn") == f"failed: {GONE}; {left}; {TRY_AGAIN}"
            assert disk_status(data_path, "big") == "provisioning" and staging_files(data_path) == []
            restores = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])["restores"]
            assert left in restores[0]["state"]
            tried = len(tries)
            with trio.fail_after(5):  # rounds of retries while it is still down: kept for later
                while len(tries) < tried + 2:
                    await trio.sleep(0.01)
            assert m.ops.restores.stranded and disk_status(data_path, "big") == "provisioning"
        with trio.fail_after(5):
            while m.ops.restores.stranded:  # until the retry has removed it and said so
                await trio.sleep(0.01)
        removed = "disk big was left provisioning and was removed once the catalogue answered"
        assert await m.state("big.mirn") == f"failed: {GONE}; {removed}; {TRY_AGAIN}"
        assert disk_status(data_path, "big") is None


@trio_test
async def test_shrinking_a_receiving_entry_is_einval(data_path: Path, good: Snapshot) -> None:
    """A truncate below what was received would take back bytes already fed."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        fh, inode = await m.create("pg.mirn")
        await m.write_all(fh, good.data[:PIECE])
        attrs = await m.ops.getattr(inode, m.ctx)
        attrs.st_size = PIECE // 2
        assert (
            await fuse_errno(m.ops.setattr(inode, attrs, SetattrFields(update_size=True), fh, m.ctx))
            == errno.EINVAL
        )
        assert (await m.state("pg.mirn")).startswith("failed: restore/ files cannot be shrunk")
        await m.close(fh)
        assert_untouched(data_path, before, image, image_before)


@trio_test
async def test_rsync_temporary_file_and_rename(data_path: Path, good: Snapshot) -> None:
    async with operations(data_path) as m:
        temporary = ".good.mirn.Ab12Cd"
        assert await m.copy_in(temporary, good.data) is None
        assert (await m.state(temporary)).startswith("installed")
        await m.ops.rename(RESTORE_INODE, temporary.encode(), RESTORE_INODE, b"good.mirn", 0, m.ctx)
        assert await entry_names(m) == ["good.mirn"]
        assert (await m.state("good.mirn")).startswith("installed")
    assert disk_status(data_path, "good") == "provisioned"


@trio_test
async def test_with_the_store_off_a_restore_short_of_space_takes_back_the_frames_left_there(
    data_path: Path,
) -> None:
    """Trial S22 S2: with -o frame_store_size=0 the frames earlier mounts kept were never read,
    and a restore through the mount failed for lack of the space they held, while the CLI's
    restore of the same file took it back."""
    async with operations(data_path, fuse_options=["frame_store_size=64M"]) as m:
        directory = m.ops.service.frame_store.directory  # type: ignore[union-attr]
    left = FrameStore(directory, 1 << 30, Settings().key())
    for n in range(3):
        left.put(bytes([n]) * 32, compress_frame(os.urandom(64 << 10), 3))
    kept = [path for path in Path(directory).rglob("*") if path.is_file()]
    assert len(kept) == 3
    async with operations(data_path, fuse_options=["frame_store_size=0"]) as m:
        assert m.ops.service.frame_store is None
        make_room = m.ops.restores._make_room
        assert make_room is not None
        assert make_room(os.stat(directory).st_dev, 1) > 0
    assert not [path for path in Path(directory).rglob("*") if path.is_file()]


RENAME_NOREPLACE = 1  # renameat2(2), as the kernel passes it in rename's flags
RENAME_EXCHANGE = 2


@pytest.mark.parametrize(
    ("flags", "code"),
    [(RENAME_NOREPLACE, errno.EEXIST), (RENAME_EXCHANGE, errno.EINVAL)],
    ids=["noreplace-eexist", "exchange-einval"],
)
@trio_test
async def test_rename_noreplace_or_exchange_onto_an_existing_entry_changes_nothing(
    data_path: Path, flags: int, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry is a restore in progress, not a file to swap: exchange is refused as noreplace is,
    and neither is logged (review D22 D9: each was a warning naming neither restore/ nor who asked)."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    async with operations(data_path) as m:
        one, _inode = await m.create("one.mirn")
        two, _inode = await m.create("two.mirn")
        rename = m.ops.rename(RESTORE_INODE, b"one.mirn", RESTORE_INODE, b"two.mirn", flags, m.ctx)
        assert await fuse_errno(rename) == code
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert sorted(await entry_names(m)) == ["one.mirn", "two.mirn"]
        assert await m.state("two.mirn") == "receiving"
        for fh in (one, two):
            await m.ops.release(fh)


@trio_test
async def test_a_rename_to_another_disk_or_to_no_disk_is_eperm_said_once(
    data_path: Path, good: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """EPERM, not EINVAL: mv reads EINVAL as "into a subdirectory of itself" and tries again."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    async with operations(data_path) as m:
        assert await m.copy_in("good.mirn", good.data) is None
        for new in (b"other.mirn", b"notes.txt"):
            rename = m.ops.rename(RESTORE_INODE, b"good.mirn", RESTORE_INODE, new, 0, m.ctx)
            assert await fuse_errno(rename) == errno.EPERM
        assert await entry_names(m) == ["good.mirn"]
        assert (await m.state("good.mirn")).startswith("installed")
    said = [r.getMessage() for r in caplog.records if "cannot be renamed" in r.getMessage()]
    assert len(said) == 2 and "a name of disk other" in said[0] and "only snapshot files" in said[1]
    assert disk_status(data_path, "other") is None


@trio_test
async def test_a_name_longer_than_255_bytes_is_enametoolong(data_path: Path, good: Snapshot) -> None:
    long = b"p" * 251 + b".mirn"  # 256 bytes
    async with operations(data_path) as m:
        assert (
            await fuse_errno(m.ops.create(RESTORE_INODE, long, 0o644, os.O_WRONLY, m.ctx))
            == errno.ENAMETOOLONG
        )
        regular = stat.S_IFREG | 0o644
        assert await fuse_errno(m.ops.mknod(RESTORE_INODE, long, regular, 0, m.ctx)) == errno.ENAMETOOLONG
        assert await m.copy_in("good.mirn", good.data) is None
        rename = m.ops.rename(RESTORE_INODE, b"good.mirn", RESTORE_INODE, long, 0, m.ctx)
        assert await fuse_errno(rename) == errno.ENAMETOOLONG
        assert await entry_names(m) == ["good.mirn"]


@trio_test
async def test_links_are_eperm_everywhere(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        snapshot = (await m.lookup("pg.mirn")).st_ino
        for parent in (ROOT_INODE, RESTORE_INODE):
            assert await fuse_errno(m.ops.symlink(parent, b"x.mirn", b"/etc/passwd", m.ctx)) == errno.EPERM
            assert await fuse_errno(m.ops.link(snapshot, parent, b"y.mirn", m.ctx)) == errno.EPERM
        assert await entry_names(m) == []


# ---- the lock that serializes one entry's requests --------------------------------------------


@trio_test
async def test_request_lock_serializes_first_come_first_served_and_survives_a_cancelled_waiter() -> None:
    lock = restoredir.RequestLock()
    order: list[str] = []
    inside = 0

    async def request(name: str, hold: trio.Event) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1, "two requests held the lock at once"
            order.append(name)
            await hold.wait()
            inside -= 1

    release_first, go = trio.Event(), trio.Event()
    go.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "first", release_first)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as cancelled:
            nursery.start_soon(request, "second", go)
            await trio.testing.wait_all_tasks_blocked()
        cancelled_waiter = trio.CancelScope()

        async def given_up() -> None:
            with cancelled_waiter:
                await request("given up", go)

        nursery.start_soon(given_up)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "third", go)
        await trio.testing.wait_all_tasks_blocked()
        cancelled_waiter.cancel()  # leaves the queue without ever holding the lock
        await trio.testing.wait_all_tasks_blocked()
        assert lock.locked() and order == ["first"]
        release_first.set()
    assert order == ["first", "second", "third"]
    assert not lock.locked()
    assert not cancelled.cancelled_caught


@trio_test
async def test_request_lock_taken_while_free_does_not_yield_to_other_tasks() -> None:
    """The point of it: a write that finds the lock free runs on without a scheduler round."""
    lock = restoredir.RequestLock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with lock:
            assert ran == []  # the other task has not had a turn
        assert not lock.locked()


@trio_test
async def test_a_mknod_entry_whose_open_is_refused_says_so_and_the_image_is_untouched(
    data_path: Path,
) -> None:
    """Review: ``tar --xattrs`` over an existing disk without --allow-overwrite made the entry,
    its open got EEXIST, and the entry kept saying its restore would start."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        attrs = await m.ops.mknod(RESTORE_INODE, b"pg.mirn", stat.S_IFREG | 0o644, 0, m.ctx)
        assert await fuse_errno(m.open(attrs.st_ino, os.O_WRONLY)) == errno.EEXIST
        state = await m.state("pg.mirn")
        assert state.startswith("failed: disk pg already has an image"), state
        assert store_state(data_path) == before and FileState.of(image) == image_before


@trio_test
async def test_mknod_makes_an_empty_entry_whose_restore_starts_when_it_is_opened(
    data_path: Path, good: Snapshot
) -> None:
    """``tar --xattrs`` makes each file with mknod before it opens it for writing."""
    async with operations(data_path) as m:
        before = store_state(data_path)
        attrs = await m.ops.mknod(RESTORE_INODE, b"good.mirn", stat.S_IFREG | 0o644, 0, m.ctx)
        assert await m.state("good.mirn") == "created: the restore starts when it is opened for writing"
        assert store_state(data_path) == before  # nothing in the store until the restore starts
        refusals = [
            (ROOT_INODE, b"x.mirn", stat.S_IFREG | 0o644, errno.EROFS),  # snapshots are read-only
            (RESTORE_INODE, b"pipe.mirn", stat.S_IFIFO | 0o644, errno.EPERM),  # no special files
            (RESTORE_INODE, b"good.mirn", stat.S_IFREG | 0o644, errno.EEXIST),
            (RESTORE_INODE, b"no-suffix", stat.S_IFREG | 0o644, errno.EINVAL),  # names no disk
        ]
        for parent, name, mode, expected in refusals:
            assert await fuse_errno(m.ops.mknod(parent, name, mode, 0, m.ctx)) == expected, name
        fh = await m.open(attrs.st_ino, os.O_WRONLY)
        await m.write_all(fh, good.data)
        assert await m.close(fh) is None
        assert await m.state("good.mirn") == "installed: created disk good"
    assert disk_status(data_path, "good") == "provisioned"
