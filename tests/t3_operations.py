"""The read-only side of the mount, driven in-process (no kernel): what ``NAME.mirn`` and its
sidecar show, every refusal's errno, snapshot versions when an image changes, and the one
errno boundary (``fuse_errors``) that keeps a handler from killing the session."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from mirenfs.disks.model import DiskState
from mirenfs.disks.pointintime import Consistency
from mirenfs.disks.store import Store
from mirenfs.engine.image import ImageIdentity, OpenImage
from mirenfs.engine.produce import SnapshotProducer
from mirenfs.errors import DiskLeasedError, FormatError, PointInTimeError, printable
from mirenfs.format.header import decode_header
from mirenfs.mount import catalog as catalog_module
from mirenfs.mount import inodes as inodes_module
from mirenfs.mount import operations as operations_module
from mirenfs.mount import session as session_module
from mirenfs.mount import versions
from mirenfs.mount.inodes import RESTORE_INODE, ROOT_INODE
from mirenfs.mount.operations import MirenOperations, fuse_errors
from mirenfs.mount.restoredir import IGNORED_BELOW_NESTED_STATE
from mirenfs.mount.versions import SnapshotService

from support.data import sha256_file, write_image
from support.fuse_ops import (
    IMAGE_SEGMENTS,
    PIECE,
    SMALL_SETTINGS,
    STATE,
    FakeContext,
    InProcessMount,
    SetattrFields,
    add_image_disk,
    attach_fake_loop,
    fuse_errno,
    operations,
    snapshot_bytes,
    trio_test,
)

WRITE_FLAGS = [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND]


pytestmark = pytest.mark.usefixtures("sys_block")  # never the host's loop devices


async def snapshot_inodes(m: InProcessMount, name: str = "pg") -> tuple[int, int]:
    return (await m.lookup(f"{name}.mirn")).st_ino, (await m.lookup(f"{name}.mirn.sha256")).st_ino


# ---- what NAME.mirn and NAME.mirn.sha256 show --------------------------------------------


@trio_test
async def test_snapshot_reads_exactly_what_backup_writes(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    expected = await snapshot_bytes(image, name="pg")
    async with operations(data_path) as m:
        attrs = await m.lookup("pg.mirn")
        # Exact before a byte is read, read-only, the image's mtime.
        assert attrs.st_size == len(expected)
        assert stat.S_ISREG(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o444
        assert attrs.st_mtime_ns == image.stat().st_mtime_ns
        assert (await m.ops.getattr(attrs.st_ino, m.ctx)).st_size == len(expected)
        assert await m.read_file("pg.mirn") == expected
        # Any offset and size, across frames and past the end, gives the same bytes.
        fh = await m.open(attrs.st_ino)
        try:
            for offset, size in [
                (0, 7),
                (5, 70_000),
                (len(expected) - 9, PIECE),
                (3000, 1),
                (len(expected), 10),
            ]:
                assert await m.ops.read(fh, offset, size) == expected[offset : offset + size]
        finally:
            await m.ops.release(fh)


@trio_test
async def test_closing_a_handle_that_read_a_whole_disk_gives_memory_back(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy churns chunks, frames and replies that glibc keeps: the close of a handle that read
    a whole snapshot of a disk of WORTH_TRIMMING_AFTER_READING bytes or more trims the heap (in a
    thread); a read that stopped short does not, nor one of a smaller disk."""
    image = add_image_disk(data_path, "pg")
    disk_size = image.stat().st_size
    trims: list[int] = []
    monkeypatch.setattr(operations_module, "give_back_free_memory", trims.append)
    monkeypatch.setattr(operations_module, "WORTH_TRIMMING_AFTER_READING", disk_size)
    async with operations(data_path) as m:
        snapshot = (await m.lookup("pg.mirn")).st_ino
        size = (await m.ops.getattr(snapshot, m.ctx)).st_size

        async def read(stop: int) -> None:
            fh = await m.open(snapshot)
            before = list(trims)
            for offset in range(0, stop, PIECE):
                await m.ops.read(fh, offset, min(PIECE, stop - offset))
            assert trims == before  # not while it is open
            await m.ops.release(fh)

        await read(size - 1)
        assert trims == []  # one byte short
        await read(size)
        assert trims == [disk_size]
        monkeypatch.setattr(operations_module, "WORTH_TRIMMING_AFTER_READING", disk_size + 1)
        await read(size)
        assert trims == [disk_size]


@trio_test
async def test_every_snapshot_shares_one_bounded_frame_cache(data_path: Path) -> None:
    """Frames kept for the next reads are bounded for the whole mount: each snapshot read kept
    16 of its own until unmount, so memory grew with every disk read (64 MiB per disk)."""
    names = [f"d{i}" for i in range(6)]
    segments = [("data", 640 << 10), ("hole", 64 << 10)]  # incompressible: frames as large as chunks
    images = [add_image_disk(data_path, name, seed=i, segments=segments) for i, name in enumerate(names)]
    async with operations(data_path) as m:
        frames = m.ops.service.frames
        handles = [await m.open((await m.lookup(f"{name}.mirn")).st_ino) for name in names]
        produced = 0
        for name, image, fh in zip(names, images, handles, strict=True):  # all open at once
            expected = await snapshot_bytes(image, name=name)
            assert await m.read_handle(fh) == expected
            produced += len(expected)
            assert 0 < frames.bytes <= frames.limit
        assert produced > 2 * frames.limit  # the bound did bite
        for name, image in zip(names, images, strict=True):  # evicted frames are made again, exactly
            assert await m.read_file(f"{name}.mirn") == await snapshot_bytes(image, name=name)
        version = m.ops.service.current(names[-1])
        assert version is not None
        before = frames.bytes
        version.close()  # a version that goes gives its frames back at once
        assert frames.bytes < before
        for fh in handles:
            await m.ops.release(fh)


@trio_test
async def test_the_frames_read_ahead_go_when_the_last_reader_closes(data_path: Path) -> None:
    """Session 19: a copy that ended left its last frames (up to 48 MiB) in the mount's cache
    until other reads evicted them. They now go with the version's last open handle, not before."""
    image = add_image_disk(data_path, "pg", segments=[("data", 2 << 20), ("hole", 64 << 10)])
    expected = await snapshot_bytes(image, name="pg")
    async with operations(data_path) as m:
        frames = m.ops.service.frames
        snapshot = (await m.lookup("pg.mirn")).st_ino
        first, second = await m.open(snapshot), await m.open(snapshot)
        assert await m.read_handle(first) == expected
        assert frames.bytes > 0
        await m.ops.release(first)
        assert frames.bytes > 0, "the frames went while a reader still had the file open"
        assert await m.read_handle(second) == expected
        await m.ops.release(second)
        assert frames.bytes == 0
        assert await m.read_file("pg.mirn") == expected  # and are made again, exactly


@trio_test
async def test_frames_read_ahead_for_a_reader_gone_are_not_kept(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review S5 F3: a reader that stopped early (`head -c`, a killed cp) left the frames its
    read-ahead was still making, which landed in the cache after its last close."""
    image = add_image_disk(data_path, "pg", segments=[("data", 4 << 20)])
    expected = await snapshot_bytes(image, name="pg")
    read = 3 * PIECE  # what the reader reads before it stops
    gate, needed = threading.Event(), [0]
    make_frame = SnapshotProducer._make_frame

    def held_ahead(self: SnapshotProducer, k: int) -> bytes:
        if k > needed[0]:  # read ahead of the reader: made once it has gone
            gate.wait(30)
        return make_frame(self, k)

    monkeypatch.setattr(SnapshotProducer, "_make_frame", held_ahead)
    async with operations(data_path) as m:
        frames = m.ops.service.frames
        snapshot = (await m.lookup("pg.mirn")).st_ino
        version = m.ops.service.current("pg")
        assert version is not None
        needed[0] = version.producer.layout.frame_at(read - 1)
        fh = await m.open(snapshot)
        got = bytearray()
        try:
            while len(got) < read:  # the start only, sequentially: the read-ahead starts
                got += await m.ops.read(fh, len(got), PIECE)
            await trio.testing.wait_all_tasks_blocked()
            assert any(k > needed[0] for k in version.producer._in_flight), "no read-ahead under way"
            await m.ops.release(fh)
        finally:
            gate.set()
        assert bytes(got) == expected[: len(got)]
        with trio.fail_after(30):
            while version.producer._in_flight:  # until the read-ahead landed
                await trio.sleep(0.01)
        assert frames.bytes == 0, f"{frames.bytes} bytes of frames kept for nobody"
        fh = await m.open(snapshot)  # a reader again: frames are kept for it
        assert await m.read_handle(fh) == expected and frames.bytes > 0
        await m.ops.release(fh)


@trio_test
async def test_snapshots_read_at_once_share_the_threads_that_make_frames(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial K s19: each snapshot had `workers` threads of its own making frames (a chunk and its
    frame each), so sixteen readers at once took a mount to 260 MB. A mount has `workers` for all."""
    names = [f"d{i}" for i in range(4)]
    images = {
        name: add_image_disk(data_path, name, seed=i, segments=[("data", 2 << 20)])
        for i, name in enumerate(names)
    }
    making, most = [0], [0]
    lock = threading.Lock()
    make_frame = SnapshotProducer._make_frame

    def counted(self: SnapshotProducer, k: int) -> bytes:
        with lock:
            making[0] += 1
            most[0] = max(most[0], making[0])
        try:
            time.sleep(0.002)  # long enough for the others to pile up, were they allowed to
            return make_frame(self, k)
        finally:
            with lock:
                making[0] -= 1

    monkeypatch.setattr(SnapshotProducer, "_make_frame", counted)
    async with operations(data_path) as m:
        expected = {name: await snapshot_bytes(image, name=name) for name, image in images.items()}
        got: dict[str, bytes] = {}

        async def read(name: str) -> None:
            got[name] = await m.read_file(f"{name}.mirn")

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(read, name)
    assert got == expected
    assert 0 < most[0] <= SMALL_SETTINGS.workers, most[0]


@trio_test
async def test_sidecar_holds_the_sha256sum_line_of_the_snapshot(data_path: Path) -> None:
    expected = await snapshot_bytes(add_image_disk(data_path, "pg"), name="pg")
    line = f"{hashlib.sha256(expected).hexdigest()}  pg.mirn\n".encode()
    async with operations(data_path) as m:
        attrs = await m.lookup("pg.mirn.sha256")
        assert attrs.st_size == len(line)  # known before the snapshot was ever hashed
        assert await m.read_file("pg.mirn.sha256") == line
        assert await m.xattrs(attrs.st_ino) == {}


@trio_test
async def test_a_spill_never_takes_the_space_kept_free_and_goes_once_unread(
    data_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial S22 S1: the spill of an index pass (no frame store, or one held back for space) took
    the last free space of a full data path, unseen by `du`, and kept it until the image changed
    or the mount stopped; a restore there then failed for lack of space. It is held to what leaves
    the filesystem its kept tenth, as the store is, and let go of once unread for a minute."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    monkeypatch.setattr(versions, "IDLE_VERSION_SWEEP_S", 0.005)
    images = {name: add_image_disk(data_path, name, seed=seed) for seed, name in enumerate(("full", "roomy"))}
    expected = {name: await snapshot_bytes(image, name=name) for name, image in images.items()}
    room = [0]
    monkeypatch.setattr(versions, "room_above_kept", lambda _directory: room[0])
    async with operations(data_path, fuse_options=["frame_store_size=0"]) as m:
        assert await m.read_file("full.mirn") == expected["full"]  # served, compressed again
        full = m.ops.service.current("full")
        assert full is not None and full.spill_bytes == 0
        room[0] = 1 << 30
        assert await m.read_file("roomy.mirn") == expected["roomy"]
        roomy = m.ops.service.current("roomy")
        assert roomy is not None and roomy.spill_bytes > 0
        later = versions.time.monotonic() + versions.POINT_IN_TIME_REUSE_S + 1
        monkeypatch.setattr(versions.time, "monotonic", lambda: later)
        with trio.fail_after(10):
            while roomy.spill_bytes:
                await trio.sleep(0.005)
        assert m.ops.service.current("roomy") is roomy  # the version stays, only its spill went
        assert await m.read_file("roomy.mirn") == expected["roomy"]
    assert "disk roomy: let go of the " in caplog.text and "its index pass kept" in caplog.text


@trio_test
async def test_a_spilled_pass_of_an_image_renamed_over_serves_the_old_snapshot(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: with the frames spilled (no frame store, or more data than its bound), a restore's
    rename over the image during the pass closed the spill, yet the version was built (the old
    image's bytes are whole), and its reads failed with EBADF. ``cat`` gets the old snapshot."""
    image = add_image_disk(data_path, "pg")
    expected = await snapshot_bytes(image, name="pg")
    replacement = image.with_suffix(".new")
    replacement.write_bytes(os.urandom(image.stat().st_size))
    build_index = versions.build_index

    async def build_then_restore(*args: Any, **kwargs: Any) -> Any:
        index = await build_index(*args, **kwargs)
        os.rename(replacement, image)  # as a restore installs its image, at the pass's end
        return index

    monkeypatch.setattr(versions, "build_index", build_then_restore)
    async with operations(data_path, fuse_options=["frame_store_size=0"]) as m:
        entry = await m.ops.lookup(ROOT_INODE, b"pg.mirn", m.ctx)  # cat: no stat before the open
        fh = await m.open(entry.st_ino)
        try:
            assert await m.read_handle(fh) == expected
        finally:
            await m.ops.release(fh)


@trio_test
async def test_versions_read_without_a_lookup_leave_no_node_once_closed(data_path: Path) -> None:
    """Review: ``cat`` of a disk not indexed yet opens its listing inode, and the version's node
    made for it never reached the kernel, so no FORGET came: every night's superseded version
    (its whole index) stayed in the inode table for the mount's life."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        for night in range(4):
            write_image(image, IMAGE_SEGMENTS, seed=night + 1)  # the disk changed during the day
            os.utime(image, ns=(night * 10**9 + 5, night * 10**9 + 5))
            entry = await m.ops.lookup(ROOT_INODE, b"pg.mirn", m.ctx)  # cat: no stat first
            fh = await m.open(entry.st_ino)
            await m.read_handle(fh)
            await m.ops.release(fh)
        held = list(m.ops.inodes.nodes.values())
        assert [node.version.fd >= 0 for node in held] == [True], held  # the current version's only
        looked_up = await m.lookup("pg.mirn")  # a stat: the kernel holds that node now
        write_image(image, IMAGE_SEGMENTS, seed=9)
        os.utime(image, ns=(9 * 10**9, 9 * 10**9))
        await m.read_file("pg.mirn")  # a new version; the old one closes, its node stays known
        assert looked_up.st_ino in m.ops.inodes.nodes
        await m.ops.forget([(looked_up.st_ino, 1)])
        assert looked_up.st_ino not in m.ops.inodes.nodes


@trio_test
async def test_a_sidecar_kept_for_an_image_under_another_name_is_not_served(data_path: Path) -> None:
    """Review: the snapshot's SHA-256 was kept by the image's state alone, but the header names
    the disk and its filesystem too: after ``disk remove pg`` and ``disk add pg2`` over the same
    image, pg2.mirn.sha256 held pg's checksum, and ``sha256sum -c`` failed a good copy."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        snapshot = await m.read_file("pg.mirn")
        assert (await m.read_file("pg.mirn.sha256")).split()[0].decode() == hashlib.sha256(
            snapshot
        ).hexdigest()
    store = Store(str(data_path))
    store.delete_disk_records(store.get_disk("pg").disk.id)  # disk remove pg (an added image stays)
    store.add_disk("pg2", size_bytes=image.stat().st_size, filesystem="xfs", image_path=str(image))
    for _remount in range(2):  # and the checksum kept for pg2 is served from then on
        async with operations(data_path) as m:
            snapshot = await m.read_file("pg2.mirn")
            line = f"{hashlib.sha256(snapshot).hexdigest()}  pg2.mirn\n".encode()
            assert await m.read_file("pg2.mirn.sha256") == line


@trio_test
async def test_an_image_changed_in_place_with_its_mtime_put_back_is_indexed_again(
    data_path: Path, compressions: list[int]
) -> None:
    """Review S21 G2: the kept index is keyed by the image's ctime too, which no tool can set back.
    Without it, an image written in place whose mtime was then restored (``touch -d``, ``cp -p``
    of a tool that keeps times) got the old snapshot after a remount, and that snapshot verified."""
    image = add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        first = await m.read_file("pg.mirn")
    before = os.stat(image)
    with open(image, "r+b") as f:
        f.seek(8192)
        f.write(b"changed in place")
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(image).st_size, os.stat(image).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    compressions.clear()
    async with operations(data_path) as m:
        second = await m.read_file("pg.mirn")
    assert decode_header(second)[0].checksum == sha256_file(image) != decode_header(first)[0].checksum
    assert compressions, "no chunk was compressed: the old index was served"


@trio_test
async def test_a_snapshot_keeps_its_inode_across_mounts_until_its_image_changes(data_path: Path) -> None:
    """Trial T21 F5: inodes were counted up at each mount, and restic and borg, which take a new
    inode for a changed file, read every disk again after each remount. A file of the root now
    keeps its inode while what it shows stays the same; a changed image gives a new one."""
    image = add_image_disk(data_path, "pg")
    add_image_disk(data_path, "web")
    seen = []
    for _mount in range(2):
        async with operations(data_path) as m:
            listed = {name: attrs.st_ino for name, attrs in await m.listdir(ROOT_INODE)}
            looked = {
                name: (await m.lookup(name)).st_ino for name in ("web.mirn", "pg.mirn", "pg.mirn.sha256")
            }
            seen.append((listed, looked))
    assert seen[0] == seen[1]
    listed, looked = seen[0]
    assert len(set(listed.values()) | set(looked.values())) == len(listed) + len(looked)  # all apart
    with open(image, "r+b") as f:
        f.write(b"changed")
    async with operations(data_path) as m:
        assert (await m.lookup("pg.mirn")).st_ino != looked["pg.mirn"]
        assert (await m.lookup("web.mirn")).st_ino == looked["web.mirn"]
        assert {name: attrs.st_ino for name, attrs in await m.listdir(ROOT_INODE)} == listed


@dataclass(eq=False)
class _Version:
    """What an inode table reads of a disk version."""

    name: str
    cache_key: str
    fd: int = 3
    consistency: Consistency = Consistency.OFFLINE


def test_inodes_that_meet_take_the_next_free_one_and_a_state_built_again_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    top = inodes_module.STABLE_INODES
    monkeypatch.setattr(inodes_module, "stable_inode", lambda _kind, _name, _identity: top | (top - 2))
    table = inodes_module.InodeTable()
    pg = table.node_for(_Version("pg", "state 1"), inodes_module.SNAPSHOT)  # type: ignore[arg-type]
    web = table.node_for(_Version("web", "state 1"), inodes_module.SNAPSHOT)  # type: ignore[arg-type]
    last = table.node_for(_Version("db", "state 1"), inodes_module.SNAPSHOT)  # type: ignore[arg-type]
    assert (pg.inode, web.inode, last.inode) == (top | (top - 2), top | (top - 1), top)  # round, in range
    again = table.node_for(_Version("pg", "state 1"), inodes_module.SNAPSHOT)  # type: ignore[arg-type]
    assert again.inode == pg.inode and table.nodes[pg.inode] is again  # the same bytes, rebuilt
    live = _Version("pg", "state 1", consistency=Consistency.LIVE)  # read from a moving image
    assert table.node_for(live, inodes_module.SNAPSHOT).inode == top | 1  # type: ignore[arg-type]
    listed = table.listing_inode("pg.mirn")
    assert listed == top | 2 and table.allocate() < top


@trio_test
async def test_snapshot_xattrs_are_its_header(data_path: Path) -> None:
    meta, _header_len = decode_header(await snapshot_bytes(add_image_disk(data_path, "pg"), name="pg"))
    async with operations(data_path) as m:
        inode = (await m.lookup("pg.mirn")).st_ino
        assert await m.xattrs(inode) == {
            "user.mirn.name": "pg",
            "user.mirn.size_bytes": str(meta.size_bytes),
            "user.mirn.filesystem": "ext4",
            "user.mirn.timestamp": meta.timestamp.rfc3339(),
            "user.mirn.checksum": meta.checksum,
            "user.mirenfs.consistency": "offline",  # how the copy was taken: the disk is not in use
        }


@trio_test
async def test_root_lists_each_visible_disk_twice_and_restore(data_path: Path) -> None:
    for name in ("pg", "web"):
        add_image_disk(data_path, name)
    add_image_disk(data_path, "gone", status=DiskState.DELETING)
    add_image_disk(data_path, "lost").unlink()  # registered, but its image is missing
    async with operations(data_path) as m:
        listing = await m.listdir(ROOT_INODE, page=2)  # resumed from the kernel's offset each time
        assert [name for name, _attrs in listing] == [
            "restore",
            "pg.mirn",
            "pg.mirn.sha256",
            "web.mirn",
            "web.mirn.sha256",
        ]
        assert await m.listdir(RESTORE_INODE) == []
        for hidden in ("gone.mirn", "lost.mirn", "gone.mirn.sha256"):
            assert await fuse_errno(m.lookup(hidden)) == errno.ENOENT
        # A listing inode, used without a lookup, stands for the current version.
        listed = dict(listing)["web.mirn"].st_ino
        fh = await m.open(listed)
        try:
            assert await m.read_handle(fh) == await m.read_file("web.mirn")
        finally:
            await m.ops.release(fh)


@trio_test
async def test_directories_and_modes(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        for inode in (ROOT_INODE, RESTORE_INODE):
            attrs = await m.ops.getattr(inode, m.ctx)
            assert stat.S_ISDIR(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o755
        assert (await m.lookup("restore")).st_ino == RESTORE_INODE
        assert (await m.ops.statfs(m.ctx)).f_namemax == 255
    async with operations(data_path, fuse_options=["allow_other"]) as shared:
        for name in ("pg.mirn", "pg.mirn.sha256"):
            assert stat.S_IMODE((await shared.lookup(name)).st_mode) == 0o400
        for inode in (ROOT_INODE, RESTORE_INODE):  # review Sec F8: others may not even look in
            assert stat.S_IMODE((await shared.ops.getattr(inode, shared.ctx)).st_mode) == 0o700


# ---- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["nope.mirn", "nope.mirn.sha256", "pg", "pg.img", "pg.mirn.gz", "restore.mirn"]
)
@trio_test
async def test_unknown_names_are_enoent(data_path: Path, name: str) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        assert await fuse_errno(m.lookup(name)) == errno.ENOENT


@trio_test
async def test_every_directory_lists_dot_and_dot_dot_first(data_path: Path) -> None:
    """`ls -la` showed neither: each listing starts with the directory and its parent, also when
    the kernel resumes it one entry at a time."""
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        ops, ctx = m.ops, m.ctx
        nested = (await ops.mkdir(RESTORE_INODE, b"restore", 0o755, ctx)).st_ino
        deeper = (await ops.mkdir(nested, b"more", 0o700, ctx)).st_ino
        expected = {
            ROOT_INODE: ([".", "..", "restore", "pg.mirn", "pg.mirn.sha256"], ROOT_INODE, ROOT_INODE),
            RESTORE_INODE: ([".", "..", "restore"], RESTORE_INODE, ROOT_INODE),
            nested: ([".", "..", "more"], nested, RESTORE_INODE),
            deeper: ([".", ".."], deeper, nested),
        }
        for inode, (names, here, parent) in expected.items():
            listing = await m.readdir(inode, page=1)
            assert [name for name, _attrs in listing] == names, inode
            dot, dot_dot = listing[0][1], listing[1][1]
            assert (dot.st_ino, dot_dot.st_ino) == (here, parent), inode
            assert stat.S_ISDIR(dot.st_mode) and stat.S_ISDIR(dot_dot.st_mode), inode
        assert oct(stat.S_IMODE((await m.readdir(deeper))[0][1].st_mode)) == oct(0o700)


@trio_test
async def test_rsync_renames_under_an_archives_own_restore_directory(data_path: Path) -> None:
    """Review: ``rsync -a`` of a whole-mount copy into restore/ writes restore/restore/.pg.mirn.XyZ
    and renames it; the rename got EPERM, so rsync exited 23 though every restore went through.
    The ignored file moves, over what had its name; nothing leaves the ignored tree."""
    async with operations(data_path) as m:
        ops, ctx = m.ops, m.ctx
        nested = (await ops.mkdir(RESTORE_INODE, b"restore", 0o755, ctx)).st_ino
        for attempt in range(2):  # the second rename replaces the first's file
            info, attrs = await ops.create(nested, b".pg.mirn.XyZ", 0o644, os.O_WRONLY | os.O_CREAT, ctx)
            await ops.write(info.fh, 0, b"whatever a whole-mount copy holds there")
            await ops.release(info.fh)
            await ops.rename(nested, b".pg.mirn.XyZ", nested, b"pg.mirn", 0, ctx)
            names = [name for name, _attrs in await m.listdir(nested)]
            assert names == ["pg.mirn"], (attempt, names)
        # status names the file as rsync left it, not its temporary name
        assert [item["name"] for item in ops.restores.status()] == ["restore/restore/pg.mirn"] * 2
        assert (await m.lookup("pg.mirn", nested)).st_ino == attrs.st_ino
        assert (
            await fuse_errno(ops.rename(nested, b"pg.mirn", RESTORE_INODE, b"pg.mirn", 0, ctx)) == errno.EXDEV
        )
        assert await fuse_errno(ops.rename(RESTORE_INODE, b"restore", nested, b"x", 0, ctx)) == errno.EXDEV
        assert [name for name, _attrs in await m.listdir(RESTORE_INODE)] == ["restore"]  # no restore began


@trio_test
async def test_a_copy_into_the_archives_own_restore_directory_says_it_restores_nothing(
    data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial R: ``cp s1.mirn restore/restore/s9.mirn`` (a typo, or tar's wrong ``-C``) succeeded
    and nothing said that no disk was restored. It still succeeds (a whole-mount archive's own
    restore/ must extract), and the log names the file, once, and where the copy should go."""
    image = add_image_disk(data_path, "pg")
    before = image.read_bytes()
    async with operations(data_path) as m:
        ops, ctx = m.ops, m.ctx
        nested = (await ops.mkdir(RESTORE_INODE, b"restore", 0o755, ctx)).st_ino
        below = (await ops.mkdir(nested, b"sub\n", 0o755, ctx)).st_ino
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mirenfs"):
            for _attempt in range(2):  # the second copy over the first says nothing new
                info, _attrs = await ops.create(below, b"pg.mirn", 0o644, os.O_WRONLY | os.O_CREAT, ctx)
                await ops.write(info.fh, 0, b"whatever was copied")
                await ops.release(info.fh)
        said, sub = [record.getMessage() for record in caplog.records], printable("sub\n")
        assert said == [
            f"restore/restore/{sub}/pg.mirn: ignored, as everything below restore/restore/ is (a "
            "whole-mount archive's copy of restore/); to restore a snapshot, copy it into restore/ itself"
        ], said
        assert [name for name, _attrs in await m.listdir(RESTORE_INODE)] == ["restore"]  # no restore began
        # Trial T20: `mirenfs status` shows it too, where an operator who copied a level too deep looks.
        assert ops.restores.status() == [
            {"name": f"restore/restore/{sub}/pg.mirn", "state": IGNORED_BELOW_NESTED_STATE}
        ]
    assert image.read_bytes() == before


@trio_test
async def test_lookups_outside_the_tree_are_enoent(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        snapshot, _sidecar = await snapshot_inodes(m)
        assert await fuse_errno(m.lookup("pg.mirn", RESTORE_INODE)) == errno.ENOENT  # no such entry
        assert await fuse_errno(m.lookup("x", snapshot)) == errno.ENOENT  # a file as the parent
        assert await fuse_errno(m.ops.getattr(999_999, m.ctx)) == errno.ENOENT
        assert await fuse_errno(m.ops.read(999_999, 0, 10)) == errno.EBADF


@pytest.mark.parametrize("flags", WRITE_FLAGS, ids=["wronly", "rdwr", "trunc", "append"])
@trio_test
async def test_opening_a_snapshot_for_writing_is_erofs(data_path: Path, flags: int) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        for inode in await snapshot_inodes(m):
            assert await fuse_errno(m.ops.open(inode, flags, m.ctx)) == errno.EROFS


@trio_test
async def test_snapshots_cannot_be_changed(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        snapshot, _sidecar = await snapshot_inodes(m)
        fh = await m.open(snapshot)
        try:
            assert await fuse_errno(m.ops.write(fh, 0, b"x")) == errno.EROFS
        finally:
            await m.ops.release(fh)
        resize, chmod = SetattrFields(update_size=True), SetattrFields(update_mode=True)
        attrs = pyfuse3.EntryAttributes()
        assert await fuse_errno(m.ops.setattr(snapshot, attrs, resize, None, m.ctx)) == errno.EROFS
        assert await fuse_errno(m.ops.setattr(snapshot, attrs, chmod, None, m.ctx)) == errno.EPERM


@trio_test
async def test_the_root_takes_no_new_files_and_no_changes(
    data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial R (s18): a snapshot copied into the root, not restore/, got only "Read-only file
    system" (the mount is rw), with no log line or status record saying where it goes."""
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        snapshot, _sidecar = await snapshot_inodes(m)
        ops, ctx = m.ops, m.ctx
        assert await fuse_errno(ops.create(ROOT_INODE, b"pg.mirn", 0o644, os.O_WRONLY, ctx)) == errno.EROFS
        assert await fuse_errno(ops.create(ROOT_INODE, b"new.mirn", 0o644, os.O_WRONLY, ctx)) == errno.EROFS
        assert await fuse_errno(ops.mknod(ROOT_INODE, b"new.mirn", 0o100644, 0, ctx)) == errno.EROFS
        said = (
            "new.mirn: the mount's root holds only the disks' snapshots and takes no file; copy a snapshot "
            "to restore into restore/ (restore/NAME.mirn restores disk NAME)"
        )
        assert [(r.name, r.errno, r.reason) for r in ops.restores.refusals] == [
            ("new.mirn", "EROFS", said.removeprefix("new.mirn: ")),
            ("pg.mirn", "EROFS", said.removeprefix("new.mirn: ")),
        ]
        assert said in caplog.text
        # Review S4 F7: `cp pg.mirn MNT/` over disk pg's own snapshot opens it for writing.
        ops.restores.refusals.clear()
        assert await fuse_errno(ops.open(snapshot, os.O_WRONLY | os.O_TRUNC, ctx)) == errno.EROFS
        assert [(r.name, r.errno) for r in ops.restores.refusals] == [("pg.mirn", "EROFS")]
        assert await fuse_errno(ops.create(snapshot, b"x.mirn", 0o644, os.O_WRONLY, ctx)) == errno.EPERM
        ops.restores.refusals.clear()
        # Trial R s18: `cp -r backups/ restore/` got EPERM and nothing said what restore/ takes;
        # review S20: `cp -r backups/ MNT/` neither.
        assert await fuse_errno(ops.mkdir(RESTORE_INODE, b"dir", 0o755, ctx)) == errno.EPERM
        assert await fuse_errno(ops.mkdir(ROOT_INODE, b"dir", 0o755, ctx)) == errno.EROFS
        in_restore = (
            "restore/dir: restore/ takes snapshot files only, not directories; copy the snapshots "
            "themselves into restore/ (restore/NAME.mirn restores disk NAME)"
        )
        in_the_root = said.replace("new.mirn", "dir")
        assert [(r.name, r.errno, r.reason) for r in ops.restores.refusals] == [
            ("dir", "EROFS", in_the_root.removeprefix("dir: ")),
            ("restore/dir", "EPERM", in_restore.removeprefix("restore/dir: ")),
        ]
        assert in_restore in caplog.text and in_the_root in caplog.text
        # A user who may not restore gets EACCES, and writes nothing into the owner's status.
        ops.restores.refusals.clear()
        nobody = FakeContext(uid=65534, gid=65534)
        assert await fuse_errno(ops.mkdir(RESTORE_INODE, b"dir", 0o755, nobody)) == errno.EACCES
        assert list(ops.restores.refusals) == []
        assert await fuse_errno(ops.unlink(ROOT_INODE, b"pg.mirn", ctx)) == errno.EPERM
        assert await fuse_errno(ops.unlink(ROOT_INODE, b"restore", ctx)) == errno.EPERM
        assert (
            await fuse_errno(ops.rename(ROOT_INODE, b"pg.mirn", ROOT_INODE, b"x.mirn", 0, ctx)) == errno.EPERM
        )
        for name in (b"user.x", b"user.mirn.name"):
            for inode in (ROOT_INODE, snapshot):
                assert await fuse_errno(ops.setxattr(inode, name, b"v", ctx)) == errno.EPERM
                assert await fuse_errno(ops.removexattr(inode, name, ctx)) == errno.EPERM
        # The snapshot is still there, unchanged.
        assert (await m.lookup("pg.mirn")).st_ino == snapshot


@trio_test
async def test_rename_across_directories_is_exdev(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        await m.lookup("pg.mirn")
        fh, _inode = await m.create("pg.mirn.sha256")
        await m.close(fh)
        ops, ctx = m.ops, m.ctx
        into_restore = ops.rename(ROOT_INODE, b"pg.mirn", RESTORE_INODE, b"pg.mirn", 0, ctx)
        out_of_restore = ops.rename(RESTORE_INODE, b"pg.mirn.sha256", ROOT_INODE, b"pg.mirn.sha256", 0, ctx)
        assert await fuse_errno(into_restore) == errno.EXDEV
        assert await fuse_errno(out_of_restore) == errno.EXDEV
        assert [name for name, _attrs in await m.listdir(RESTORE_INODE)] == ["pg.mirn.sha256"]


@trio_test
async def test_restore_files_take_no_xattrs_and_say_not_supported(data_path: Path) -> None:
    """cp -a / cp -p set an ACL and rsync -aX xattrs on what they create: EOPNOTSUPP lets them
    skip it (EPERM made cp fail after a good restore). The entry's own state is untouched."""
    async with operations(data_path) as m:
        fh, entry = await m.create("new.mirn")
        sidecar_fh, sidecar = await m.create("new.mirn.sha256")  # ignored under restore/, still a file
        ops, ctx = m.ops, m.ctx
        for inode in (entry, sidecar):
            for name in (b"system.posix_acl_access", b"user.x"):
                assert await fuse_errno(ops.setxattr(inode, name, b"v", ctx)) == errno.EOPNOTSUPP
                assert await fuse_errno(ops.removexattr(inode, name, ctx)) == errno.EOPNOTSUPP
        assert (await m.xattrs(entry))["user.mirenfs.state"] == "receiving"
        await m.close(sidecar_fh)
        await m.close(fh)


@trio_test
async def test_a_restore_entry_never_reads_back_as_a_snapshot(data_path: Path) -> None:
    """The README says restore/ files "cannot be read back" (EACCES). Issue 10 makes an entry
    readable as its outcome, one line, so that whole-mount tar and rsync succeed; the working
    tree does that now. Either way no snapshot byte comes back, and the write handle reads nothing."""
    async with operations(data_path) as m:
        fh, inode = await m.create("new.mirn")
        await m.write_all(fh, b"MIRN" + bytes(100))
        assert await fuse_errno(m.ops.read(fh, 0, 10)) in (errno.EACCES, errno.EBADF)
        try:
            reader = await m.open(inode, os.O_RDONLY)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.EACCES  # the README's contract
        else:  # issue 10's: the entry's state, one line
            text = await m.read_handle(reader)
            await m.ops.release(reader)
            assert text.startswith(b"receiving") and text.endswith(b"\n") and b"MIRN" not in text
        await m.close(fh)


@trio_test
async def test_unknown_xattrs_are_enoattr(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        snapshot, sidecar = await snapshot_inodes(m)
        fh, entry = await m.create("new.mirn")
        for inode in (ROOT_INODE, RESTORE_INODE, snapshot, sidecar, entry):
            assert await fuse_errno(m.ops.getxattr(inode, b"user.nope", m.ctx)) == pyfuse3.ENOATTR
        assert await fuse_errno(m.ops.getxattr(sidecar, b"user.mirn.name", m.ctx)) == pyfuse3.ENOATTR
        assert await fuse_errno(m.ops.getxattr(snapshot, STATE, m.ctx)) == pyfuse3.ENOATTR
        await m.close(fh)


@trio_test
async def test_opendir_of_a_file_is_enotdir(data_path: Path) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        fh, entry = await m.create("new.mirn")
        for inode in (*await snapshot_inodes(m), entry):
            assert await fuse_errno(m.ops.opendir(inode, m.ctx)) == errno.ENOTDIR
        await m.close(fh)


# ---- versions: a changed image is a new inode; an open handle never mixes ------------------


# Random data, so that its snapshot has many frames of real size: more than a reader caches.
RANDOM_SEGMENTS = [("data", 2 << 20), ("hole", 1 << 20)]


def replace_image(image: Path, seed: int, segments: list[tuple[str, int]] = IMAGE_SEGMENTS) -> None:
    """Write a new image beside the old one and rename it over (a new inode, as a restore installs)."""
    write_image(image.with_suffix(".new"), segments, seed=seed)
    os.replace(image.with_suffix(".new"), image)


def rewrite_in_place(image: Path, seed: int, segments: list[tuple[str, int]]) -> None:
    """Overwrite every byte of the image in place (the same inode, as a live disk changes)."""
    before = image.stat()
    scratch = image.with_suffix(".scratch")
    write_image(scratch, segments, seed=seed)
    with open(image, "r+b") as f:
        f.write(scratch.read_bytes())
    scratch.unlink()
    # A later mtime even on a coarse clock: the change must show in the identity.
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("spill", ["spilled frames", "no spill"])
@trio_test
async def test_replaced_image_is_a_new_inode_and_old_handle_reads_old_bytes(
    data_path: Path, spill: str
) -> None:
    image = add_image_disk(data_path, "pg")
    old = await snapshot_bytes(image, name="pg")
    async with operations(data_path, spill_limit=0 if spill == "no spill" else 1 << 30) as m:
        before = await m.lookup("pg.mirn")
        fh = await m.open(before.st_ino)
        first = await m.ops.read(fh, 0, PIECE)
        replace_image(image, seed=1)
        new = await snapshot_bytes(image, name="pg")
        after = await m.lookup("pg.mirn")
        assert after.st_ino != before.st_ino
        assert after.st_size == len(new) and await m.read_file("pg.mirn") == new
        rest = bytearray()
        while chunk := await m.ops.read(fh, len(first) + len(rest), PIECE):
            rest += chunk
        assert first + rest == old  # the old version, whole: never a byte of the new image
        assert (await m.ops.getattr(before.st_ino, m.ctx)).st_size == len(old)
        await m.ops.release(fh)
        assert await fuse_errno(m.ops.open(before.st_ino, os.O_RDONLY, m.ctx)) == errno.ESTALE


@trio_test
async def test_a_frame_store_bound_below_the_disks_data_still_spares_the_read_a_second_compression(
    data_path: Path, compressions: list[int]
) -> None:
    """Trial N: with a store bound below a disk's frames, each frame the pass stored pushed out
    the one before, and the read then compressed every chunk again (up to 2.5 times a cold read
    with no store at all). Such a pass keeps its frames in the spill file too."""
    image = add_image_disk(data_path, "pg", segments=RANDOM_SEGMENTS)
    async with operations(data_path) as m:
        store = m.ops.service.frame_store
        assert store is not None
        store.limit = 256 << 10  # an eighth of the disk's 2 MiB of data
        served = await m.read_file("pg.mirn")
    assert len(compressions) == (2 << 20) // SMALL_SETTINGS.chunk_size  # each data chunk once
    assert served == await snapshot_bytes(image, name="pg")


@pytest.mark.parametrize(
    ("options", "old_frames_kept"),
    [(["frame_store_size=0"], False), ([], True)],
    ids=["without-frame-store", "with-frame-store"],
)
@trio_test
async def test_image_changed_in_place_gives_old_bytes_or_eio_never_a_mix(
    data_path: Path, options: list[str], old_frames_kept: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the frame store the old handle's frames come from the changed image: EIO, and the
    log names the file and what to do. With it, the frames of the old version were stored as the
    pass made them: the old bytes, all of them."""
    caplog.set_level(logging.WARNING, logger="mirenfs")
    image = add_image_disk(data_path, "pg", segments=RANDOM_SEGMENTS)
    old = await snapshot_bytes(image, name="pg")
    async with operations(data_path, spill_limit=0, fuse_options=options) as m:
        before = await m.lookup("pg.mirn")
        fh = await m.open(before.st_ino)
        assert await m.ops.read(fh, 0, PIECE) == old[:PIECE]
        rewrite_in_place(image, seed=1, segments=RANDOM_SEGMENTS)
        after = await m.lookup("pg.mirn")
        assert after.st_ino != before.st_ino
        assert await m.read_file("pg.mirn") == await snapshot_bytes(image, name="pg")
        failures = 0
        for offset in range(PIECE, len(old), PIECE):
            try:
                assert await m.ops.read(fh, offset, PIECE) == old[offset : offset + PIECE]
            except pyfuse3.FUSEError as exc:
                assert exc.errno == errno.EIO
                failures += 1
        if old_frames_kept:
            assert failures == 0, "the stored frames of the old version were not served"
        else:
            assert failures > 0, "every chunk changed, yet the old handle read them all"
            said = [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]
            assert said and all(line.startswith("pg.mirn: the image changed") for line in said)
            assert "copy it again for a snapshot of the image as it is now" in said[0]
        await m.ops.release(fh)


@trio_test
async def test_an_image_that_cannot_be_read_is_said_with_its_disk_and_file(
    data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial FD F3: an I/O error reading an image while serving its snapshot was logged as "read:
    [Errno 5] Input/output error", naming no disk, file or place."""
    caplog.set_level(logging.WARNING, logger="mirenfs")
    image = add_image_disk(data_path, "pg", segments=RANDOM_SEGMENTS)
    async with operations(data_path, spill_limit=0) as m:
        fh = await m.open((await m.lookup("pg.mirn")).st_ino)
        handle = m.ops.handles.get(fh)

        async def failing(offset: int, size: int) -> bytes:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        handle.reader.read = failing  # type: ignore[union-attr]
        assert await fuse_errno(m.ops.read(fh, PIECE, PIECE)) == errno.EIO
        assert (
            f"pg.mirn: reading its image {image} failed near byte {PIECE} of the snapshot (Input/output "
            "error), so this copy of it fails; check the disk the image is on"
        ) in caplog.text
        await m.ops.release(fh)


@pytest.mark.parametrize("step", ["index pass", "data map"])
@trio_test
async def test_an_image_that_cannot_be_indexed_is_said_with_its_disk_and_file(
    data_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Trial FD F3, verifyR: an I/O error in a disk's index pass (a cold read), or in mapping an
    indexed image's data with lseek, was logged as "open: [Errno 5] Input/output error", naming no
    disk or file. The next look, once the image reads again, serves the snapshot."""
    caplog.set_level(logging.WARNING, logger="mirenfs")
    image = add_image_disk(data_path, "pg", segments=RANDOM_SEGMENTS)
    expected = await snapshot_bytes(image, name="pg")

    def failing(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async def failing_pass(*args: object, **kwargs: object) -> object:
        return failing()

    async with operations(data_path, spill_limit=0) as m:
        if step == "data map":
            await m.lookup("pg.mirn")  # indexed; a new version of it maps its data again
            m.ops.service.forget("pg")
            monkeypatch.setattr(OpenImage, "source", failing)
        else:
            monkeypatch.setattr(versions, "build_index", failing_pass)
        assert await fuse_errno(m.lookup("pg.mirn")) == errno.EIO
        assert (
            f"disk pg: reading its image {image} failed ({step}: Input/output error), so its snapshot "
            "cannot be served now; check the disk that file is on"
        ) in caplog.text
        assert "[Errno" not in caplog.text
        monkeypatch.undo()
        assert await m.read_file("pg.mirn") == expected


@trio_test
async def test_releasing_a_superseded_snapshot_while_it_reads_ahead_keeps_the_session(
    data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirenfs")
    image = add_image_disk(data_path, "pg", segments=RANDOM_SEGMENTS)
    async with operations(data_path, spill_limit=0) as m:  # as after a remount: frames from the image
        fh = await m.open((await m.lookup("pg.mirn")).st_ino)
        replace_image(image, seed=1, segments=RANDOM_SEGMENTS)
        await m.lookup("pg.mirn")  # the old version is superseded; this handle keeps it open
        # Trial K F3: the pair a backup copies then disagrees; the log says why.
        said = [r.getMessage() for r in caplog.records if "the one 1 open handle(s)" in r.getMessage()]
        assert said and "pg.mirn.sha256 now holds the new one's checksum" in said[0], said
        await m.ops.read(fh, 0, PIECE)  # sequential: starts compressing the next frames ahead
        ahead = m.ops.handles.get(fh).version.producer._in_flight  # type: ignore[union-attr]
        await m.ops.release(fh)  # the last handle: the old version's image fd is closed
        with trio.fail_after(10):  # the read-ahead ran into the closed image, or ended
            while ahead:
                await trio.sleep(0.01)
        assert (await m.lookup("pg.mirn")).st_size > 0


# ---- fuse_errors: the one errno boundary -------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (RuntimeError("a bug"), errno.EIO),
        (KeyError("a bug"), errno.EIO),
        (DiskLeasedError("disk pg is in use"), errno.EBUSY),
        (FormatError("bad magic"), errno.EINVAL),
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (OSError("no errno"), errno.EIO),
        (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
        (pyfuse3.FUSEError(errno.EXDEV), errno.EXDEV),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else errno.errorcode[value],
)
@trio_test
async def test_fuse_errors_turns_every_exception_into_an_errno(raised: BaseException, code: int) -> None:
    @fuse_errors
    async def handler() -> None:
        raise raised

    assert await fuse_errno(handler()) == code


@trio_test
async def test_an_unexpected_exception_answers_eio_logs_it_and_the_session_goes_on(
    data_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:

        async def broken(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError("a bug in the snapshot service")

        with monkeypatch.context() as patch:
            patch.setattr(m.ops.service, "version", broken)
            patch.setattr(m.ops.service, "ready_version", broken)
            with caplog.at_level(logging.ERROR, logger="mirenfs.mount.operations"):
                assert await fuse_errno(m.lookup("pg.mirn")) == errno.EIO
            assert "unexpected error in lookup; answering EIO" in caplog.text
            assert "a bug in the snapshot service" in caplog.text  # with its traceback
            patch.setattr(m.ops.catalog, "disks", broken)
            assert await fuse_errno(m.listdir(ROOT_INODE)) == errno.EIO
            assert (await m.ops.getattr(ROOT_INODE, m.ctx)).st_ino == ROOT_INODE
        # The same operations answer normally once the fault is gone.
        assert (await m.lookup("pg.mirn")).st_size > 0
        assert [name for name, _attrs in await m.listdir(ROOT_INODE)][:2] == ["restore", "pg.mirn"]


@trio_test
async def test_a_lookup_never_waits_for_an_index_pass(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel holds the root's lock through a lookup: a lookup that waited for a pass (17
    minutes per TiB) would stall every `ls` of the mount. It answers with the listing inode
    (timeouts 0) at once; that inode's getattr waits for the pass and gives the exact size,
    and a lookup after the pass finds the version's own inode."""
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        gate = trio.Event()
        build = m.ops.service._build

        async def gated_build(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            return await build(*args, **kwargs)

        monkeypatch.setattr(m.ops.service, "_build", gated_build)
        stat_result: list[pyfuse3.EntryAttributes] = []
        with trio.fail_after(30):
            first = await m.ops.lookup(ROOT_INODE, b"pg.mirn", m.ctx)
            assert (first.st_size, first.attr_timeout, first.entry_timeout) == (0, 0, 0)
            assert first.st_ino not in m.ops.inodes.nodes  # the listing inode, not a version's
            async with trio.open_nursery() as nursery:

                async def stat_it() -> None:
                    stat_result.append(await m.ops.getattr(first.st_ino, m.ctx))

                nursery.start_soon(stat_it)
                await trio.testing.wait_all_tasks_blocked()
                assert stat_result == []  # the getattr waits for the pass...
                again = await m.ops.lookup(ROOT_INODE, b"pg.mirn", m.ctx)  # ...a lookup does not
                assert (again.st_ino, again.st_size) == (first.st_ino, 0)
                assert [name for name, _attrs in await m.listdir(ROOT_INODE)][:2] == ["restore", "pg.mirn"]
                gate.set()
            (stated,) = stat_result
            built = await m.ops.lookup(ROOT_INODE, b"pg.mirn", m.ctx)
        assert stated.attr_timeout == 0  # the listing inode stands for whichever version is current
        # ...and reports that version's number, which the next lookup finds (cp compares them)
        assert stated.st_ino == built.st_ino != first.st_ino and built.st_ino in m.ops.inodes.nodes
        assert stated.st_size == built.st_size > 0 and built.attr_timeout > 0


def test_every_handler_goes_through_fuse_errors() -> None:
    handlers = [
        name
        for name, value in vars(MirenOperations).items()
        if callable(value) and not name.startswith("_") and hasattr(pyfuse3.Operations, name)
    ]
    assert "lookup" in handlers and "write" in handlers
    unwrapped = [
        name
        for name in handlers
        if name != "forget" and not hasattr(vars(MirenOperations)[name], "__wrapped__")
    ]
    assert unwrapped == []


@trio_test
async def test_forget_never_raises(data_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """forget cannot answer an error: it swallows (and logs) anything."""
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        inode = (await m.lookup("pg.mirn")).st_ino
        await m.ops.forget([(inode, 1), (999_999, 3)])
        assert (await m.ops.getattr(inode, m.ctx)).st_ino == inode  # the current version stays

        def broken(*_args: object) -> None:
            raise RuntimeError("a bug in the inode table")

        monkeypatch.setattr(m.ops.inodes, "forget", broken)
        await m.ops.forget([(inode, 1)])


@trio_test
async def test_a_copy_of_a_disk_in_use_stands_for_it_while_read_and_a_minute_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``rsync NAME.mirn NAME.mirn.sha256`` of a large disk in use: the checksum file must be
    that of the snapshot just copied, however long the copy took."""
    clock = [0.0]
    monkeypatch.setattr(versions.time, "monotonic", lambda: clock[0])
    service = SnapshotService.__new__(SnapshotService)  # only the reuse rule is exercised here
    producer = SimpleNamespace(drop_frames=lambda: None, keep_frames=lambda: None)  # only the reuse rule
    copy = versions.DiskVersion("pg", "ext4", "/pg.img", None, producer, "", -1, is_copy=True, last_used=0.0)  # type: ignore[arg-type]

    async def current(at: float) -> bool:
        clock[0] = at
        return await service._copy_still_current(copy, attached=True)

    assert await current(59.0) and not await current(61.0)  # never read: a minute from its instant
    service.acquire(copy)
    assert await current(300.0)  # being read, however long
    clock[0] = 300.0
    service.release(copy)
    assert await current(359.0) and not await current(361.0)  # a minute after the last close


@trio_test
async def test_a_disk_put_in_use_after_it_was_read_offline_is_never_served_as_offline(
    data_path: Path, sys_block: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial T21 F8: after `losetup` of an indexed disk, its image unchanged yet, ``stat`` and the
    consistency xattr said ``offline`` and a read came from the image a write could change at any
    moment. A disk in use is taken from a point-in-time copy, which an ext4 data path cannot make
    of a loop device nothing is mounted from: refused (EBUSY). A handle opened before goes on with
    the bytes it began; once the loop device is gone the disk is offline again, same inode."""
    monkeypatch.setattr(versions, "LOOP_SCAN_REUSE_S", 0.0)  # each lookup looks at the loop devices
    image = add_image_disk(data_path, "pg")
    expected = await snapshot_bytes(image, name="pg")
    async with operations(data_path) as m:
        offline = await m.lookup("pg.mirn")
        assert (await m.xattrs(offline.st_ino))["user.mirenfs.consistency"] == "offline"
        before = await m.open(offline.st_ino)
        attach_fake_loop(sys_block, "loop3", image)
        assert await fuse_errno(m.lookup("pg.mirn")) == errno.EBUSY
        assert await m.read_handle(before) == expected
        await m.ops.release(before)
        shutil.rmtree(sys_block / "loop3" / "loop")  # `losetup -d`
        again = await m.lookup("pg.mirn")
        assert again.st_ino == offline.st_ino and again.st_size == offline.st_size
        assert (await m.xattrs(again.st_ino))["user.mirenfs.consistency"] == "offline"
        assert await m.read_file("pg.mirn") == expected

        # Trial E22 E8: the same when the store says so (set attached from another host), once
        # the mount's listing is renewed; the loop's refusal is forgotten, so it is built anew.
        Store(str(data_path)).set_disk_status("pg", DiskState.ATTACHED)
        monkeypatch.setattr(catalog_module, "CATALOG_TTL_S", 0.0)
        m.ops.service.refused.clear()
        assert await fuse_errno(m.lookup("pg.mirn")) == errno.EBUSY
        assert "its record says it is attached" in str(m.ops.service.refused["pg"][1])
        Store(str(data_path)).set_disk_status("pg", DiskState.DETACHED)
        assert (await m.lookup("pg.mirn")).st_ino == offline.st_ino


@trio_test
async def test_lookups_of_many_disks_share_one_look_at_the_loop_devices(
    data_path: Path, sys_block: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Review D22 D3: each lookup of an offline disk read every loop device's backing file and
    opened its node, so `ls -l` cost disks x loop devices. D2: when one cannot be told about
    (a backing file deleted, no device node to ask), the disk is not taken for in use, and its
    version is not built again at every lookup."""
    names = [f"d{n}" for n in range(6)]
    for seed, name in enumerate(names):
        add_image_disk(data_path, name, seed=seed)
    looks: list[int] = []
    real = versions.loop_backings

    def counted() -> list[versions.LoopBacking]:
        looks.append(1)
        return real()

    monkeypatch.setattr(versions, "loop_backings", counted)
    monkeypatch.setattr(versions, "LOOP_SCAN_REUSE_S", 3600.0)
    attach_fake_loop(sys_block, "loop7", Path("/var/lib/elsewhere/gone.img (deleted)"))  # cannot be told
    builds: list[str] = []
    build = versions.SnapshotService._build

    async def counted_build(
        self: SnapshotService, name: str, *args: Any, **kwargs: Any
    ) -> versions.DiskVersion:
        builds.append(name)
        return await build(self, name, *args, **kwargs)

    monkeypatch.setattr(versions.SnapshotService, "_build", counted_build)
    async with operations(data_path) as m:
        first = {name: (await m.lookup(f"{name}.mirn")).st_ino for name in names}
        for _ in range(5):
            for name in names:
                assert (await m.lookup(f"{name}.mirn")).st_ino == first[name]
                assert (await m.lookup(f"{name}.mirn.sha256")).st_ino > 0
        assert sorted(builds) == names  # once each: never again for an unknown loop device
        assert len(looks) == 1, looks


@trio_test
async def test_versions_holding_space_for_nothing_are_let_go_and_the_others_stay(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A point-in-time copy nobody read for a minute no longer stands for its disk, and a version
    whose image was replaced keeps the old file's blocks through its descriptor: both were held
    until their disk's next request (a nightly backup's copy of a disk in use held a disk's data
    for a day). The mount lets go of them; a version being read, or of an unchanged image, stays."""
    monkeypatch.setattr(versions, "IDLE_VERSION_SWEEP_S", 0.005)
    names = ("kept", "read", "copy", "replaced")  # one sweep looks at them in this order
    images = {name: add_image_disk(data_path, name, seed=seed) for seed, name in enumerate(names)}
    async with operations(data_path) as m:
        built: dict[str, versions.DiskVersion] = {}
        for name in names:
            await m.lookup(f"{name}.mirn")
            version = m.ops.service.current(name)
            assert version is not None and version.fd >= 0
            built[name] = version
        built["copy"].is_copy = True  # stands for a point-in-time copy (t4 takes real ones)
        reading = await m.ops.open((await m.lookup("read.mirn")).st_ino, os.O_RDONLY, m.ctx)
        replace_image(images["replaced"], seed=9)  # outside mirenfs
        later = versions.time.monotonic() + versions.POINT_IN_TIME_REUSE_S + 1
        monkeypatch.setattr(versions.time, "monotonic", lambda: later)
        with trio.fail_after(10):
            while m.ops.service.current("copy") or m.ops.service.current("replaced"):
                await trio.sleep(0.005)
        assert (built["copy"].fd, built["replaced"].fd) == (-1, -1)  # closed: their space returns
        assert m.ops.service.current("kept") is built["kept"] and built["kept"].fd >= 0
        assert m.ops.service.current("read") is built["read"] and built["read"].fd >= 0
        await m.ops.release(reading.fh)
        replaced = await m.lookup("replaced.mirn")  # the next request builds the new image's version
        assert replaced.st_size > 0 and m.ops.service.current("replaced") not in (None, built["replaced"])


@trio_test
async def test_a_lookup_while_a_disk_in_use_is_being_snapshotted_shares_that_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cat NAME.mirn`` (no stat) and an ``ls -l`` a second later: the image of a disk in use
    changes in between (its freeze alone writes to it), and the lookup took a second freeze and a
    second snapshot, whose sidecar then did not match the copy. It waits for the first now. A
    build that fails is shared only by requests that saw the same image; others build anew."""
    service = SnapshotService(
        versions.IndexCache(str(tmp_path / "index")),
        versions.Settings(),
        spill_directory=str(tmp_path / "spill"),
        spill_limit=0,
    )
    identities = iter(ImageIdentity(1, 2, 3, mtime, mtime) for mtime in range(10, 20))
    monkeypatch.setattr(versions.ImageIdentity, "of", lambda _path: next(identities))
    monkeypatch.setattr(service._loop_devices, "backing", lambda _path: True)
    builds: list[trio.Event] = []
    fail = [False]

    async def build(name: str, image_path: str, filesystem: str, *, attached: bool) -> versions.DiskVersion:
        builds.append(trio.Event())
        await builds[-1].wait()
        if fail[0]:
            raise PointInTimeError("the freeze was lifted before the copy was made", "lifted")
        return versions.DiskVersion(name, filesystem, image_path, None, None, "", -1, is_copy=True)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "_build", build)
    looked: list[object] = []  # one per look at the current version (after the image's identity)
    matching = service._matching

    async def counted(*args: Any) -> versions.DiskVersion | None:
        looked.append(args)
        return await matching(*args)

    monkeypatch.setattr(service, "_matching", counted)

    async def until(condition: Callable[[], bool]) -> None:
        """Poll, with a deadline: the identity and the in-use check run on worker threads."""
        with trio.fail_after(10):
            while not condition():
                await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()

    async def two_lookups() -> list[object]:
        """Two requests, each seeing the image changed; the first build ends once both wait."""
        outcomes: list[object] = []

        async def ask() -> None:
            try:
                outcomes.append(await service.version("pg", "/pg.img", "ext4"))
            except PointInTimeError as exc:
                outcomes.append(exc)

        looked.clear()
        async with trio.open_nursery() as nursery:
            for asked in (1, 2):
                nursery.start_soon(ask)
                await until(lambda asked=asked: len(looked) >= asked)  # type: ignore[misc]
            assert len(builds) == 1, "a second build started while the first ran"
            builds[0].set()
            if fail[0]:
                await until(lambda: len(builds) == 2)
                builds[1].set()
        return outcomes

    first, second = await two_lookups()
    assert isinstance(first, versions.DiskVersion) and second is first and len(builds) == 1

    service._current.clear()  # the disk is snapshotted again (its copy was stubbed: nothing to close)
    builds.clear()
    fail[0] = True
    first, second = await two_lookups()
    assert isinstance(first, PointInTimeError) and len(builds) == 2  # the second built anew
    assert isinstance(second, PointInTimeError)


@trio_test
async def test_an_image_inside_the_mount_itself_is_never_looked_at(
    data_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial Q: a disk whose image lay inside the mount (`disk add --image MOUNT/x.mirn`) made the
    daemon look it up through itself: the lookup waited on its own answer and every request hung.
    Such a disk is not shown, its image never looked at, and the log says why, once."""
    add_image_disk(data_path, "pg")
    inside = data_path / "never-mounted"  # the in-process mount's mount point
    inside.mkdir()
    write_image(inside / "loopy.img", IMAGE_SEGMENTS)
    Store(str(data_path)).add_disk(
        "loopy", size_bytes=1 << 20, filesystem="ext4", image_path=str(inside / "loopy.img")
    )
    # Review C: through a link into the mount (`disk add --image LINK/x.mirn`), the same.
    (data_path / "link").symlink_to("never-mounted")
    write_image(inside / "linked.img", IMAGE_SEGMENTS)
    Store(str(data_path)).add_disk(
        "linked", size_bytes=1 << 20, filesystem="ext4", image_path=str(data_path / "link" / "linked.img")
    )
    caplog.set_level(logging.WARNING, logger="mirenfs")
    # Review S2: a real mount deadlocks on any look inside itself; here, any look fails the test.
    real_lstat, real_stat = os.lstat, os.stat

    def never_inside(real: Any) -> Any:
        def look(path: Any, *args: Any, **kwargs: Any) -> Any:
            assert not str(path).startswith(f"{inside}/"), f"{path} was looked at"
            return real(path, *args, **kwargs)

        return look

    async with operations(data_path) as m:  # (its start sweeps staging files there: before mounting)
        monkeypatch.setattr(os, "lstat", never_inside(real_lstat))
        monkeypatch.setattr(os, "stat", never_inside(real_stat))
        for _ in range(2):
            names = [name for name, _attrs in await m.listdir(ROOT_INODE)]
            assert names == ["restore", "pg.mirn", "pg.mirn.sha256"]
            assert await fuse_errno(m.ops.lookup(ROOT_INODE, b"loopy.mirn", m.ctx)) == errno.ENOENT
            assert await fuse_errno(m.ops.lookup(ROOT_INODE, b"linked.mirn", m.ctx)) == errno.ENOENT
    assert any("disk linked is not shown" in r.getMessage() for r in caplog.records)
    said = [r.getMessage() for r in caplog.records if "loopy" in r.getMessage()]
    assert said == [
        f"disk loopy is not shown: its image {inside / 'loopy.img'} lies inside this mount, which cannot "
        "read it through itself; register the image where it is (mirenfs disk remove loopy, then mirenfs "
        "disk add loopy --image PATH)"
    ]


@trio_test
async def test_a_mount_of_a_directory_holding_nothing_of_mirenfs_says_so(
    data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial Q: `mount --data-path /var/lib` (meant: /var/lib/miren) mounted an empty store there
    without a word. It still mounts (a new host restores into an empty data path), and says so in
    a line of its log (info: the tests' mounts of empty data paths are such first mounts)."""
    caplog.set_level(logging.INFO, logger="mirenfs")
    async with operations(data_path):
        pass
    async with operations(data_path):  # the second time it holds a store: nothing to say
        pass
    said = [r.getMessage() for r in caplog.records if "held nothing of mirenfs" in r.getMessage()]
    assert said == [
        f"the data path {data_path} held nothing of mirenfs (no disk store, no state), so this mount "
        "started a new one there: it shows no disks until one is added or restored; if you meant another "
        f"directory, unmount and remove {data_path / 'mirenfs.db'} and {data_path / 'mirenfs'}"
    ]


def test_saved_indexes_of_images_no_disk_has_go_after_a_week_unused(tmp_path: Path) -> None:
    """Trial S: 200 restores under new names and removals left 200 index files for ever (a 1 TiB
    disk's is ~19 MB). A start removes those of images no disk has, once unused for a week; a
    disk's own index stays however old, and a recent one stays (another catalogue, an outage)."""
    cache = versions.IndexCache(str(tmp_path / "index"))
    week_old = time.time() - versions.INDEX_KEPT_UNUSED_S - 60
    paths = {}
    for image in ("/disks/kept.img", "/disks/removed.img", "/disks/recent.img"):
        paths[image] = Path(cache.path_for(image))
        paths[image].write_bytes(b"an index")
        if image != "/disks/recent.img":
            os.utime(paths[image], (week_old, week_old))
    (tmp_path / "index" / "notes.txt").write_text("not an index")
    os.utime(tmp_path / "index" / "notes.txt", (week_old, week_old))
    assert cache.prune(["/disks/kept.img"]) == [str(paths["/disks/removed.img"])]
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(
        [paths["/disks/kept.img"].name, paths["/disks/recent.img"].name, "notes.txt"]
    )


@trio_test
async def test_a_version_whose_sidecar_is_being_computed_is_not_let_go(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rsync NAME.mirn NAME.mirn.sha256` of a large disk in use: the sidecar reads the whole
    snapshot, minutes after the last handle on the copy closed. That read keeps the copy in use."""
    monkeypatch.setattr(versions, "IDLE_VERSION_SWEEP_S", 0.005)
    add_image_disk(data_path, "pg")
    async with operations(data_path) as m:
        await m.lookup("pg.mirn")
        service = m.ops.service
        version = service.current("pg")
        assert version is not None
        version.is_copy = True  # stands for a point-in-time copy (t4 takes real ones)
        looked = [0]  # sweeps
        holding = service._holding_space_for_nothing

        async def counted() -> list[versions.DiskVersion]:
            looked[0] += 1
            return await holding()

        monkeypatch.setattr(service, "_holding_space_for_nothing", counted)
        reading, go_on = trio.Event(), trio.Event()
        real_copy_to = version.producer.copy_to

        async def held_copy_to(write: Any) -> None:
            reading.set()
            await go_on.wait()
            await real_copy_to(write)

        monkeypatch.setattr(version.producer, "copy_to", held_copy_to)

        def a_minute_later() -> None:
            later = time.monotonic() + versions.POINT_IN_TIME_REUSE_S + 1
            monkeypatch.setattr(versions.time, "monotonic", lambda: later)

        async def until(condition: Callable[[], bool]) -> None:
            with trio.fail_after(10):
                while not condition():
                    await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.read_file, "pg.mirn.sha256")
            await reading.wait()
            a_minute_later()
            seen = looked[0]
            await until(lambda: looked[0] >= seen + 2)  # two sweeps looked at it while the sidecar read
            assert service.current("pg") is version and version.fd >= 0
            go_on.set()
        a_minute_later()  # done, and idle for a minute: now it goes
        await until(lambda: service.current("pg") is None)
        assert version.fd == -1


@trio_test
async def test_an_image_that_changed_during_its_index_pass_is_said_with_its_disk(
    data_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial S: `cp` saw EIO and the log named only `…/vol-8e0b…/disk.img`, which an operator had
    to map back to a disk. The line names the disk."""
    image = add_image_disk(data_path, "pg")
    real_pass = versions.build_index

    async def changed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        index = await real_pass(*args, **kwargs)
        os.utime(image, ns=(1, 1))  # the image changes before the pass's end is checked
        return index

    monkeypatch.setattr(versions, "build_index", changed_meanwhile)
    caplog.set_level(logging.WARNING, logger="mirenfs")
    async with operations(data_path) as m:
        entry = await m.ops.lookup(ROOT_INODE, b"pg.mirn", m.ctx)
        assert await fuse_errno(m.ops.getattr(entry.st_ino, m.ctx)) == errno.EIO
    said = [r.getMessage() for r in caplog.records if "changed while it was being read" in r.getMessage()]
    assert said and all(line.startswith(f"disk pg: image {image} changed while") for line in said), said


def test_an_answer_the_kernel_no_longer_takes_is_said_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """Trial K s19: `fusermount3 -u` right after the readers ended logged pyfuse3's "fuse_release():
    fuse_reply_* failed with No such file or directory" as an ERROR; nothing was lost."""
    session_module.quiet_answers_nobody_waits_for()
    session_module.quiet_answers_nobody_waits_for()  # once per process, however often asked
    pyfuse3_log = logging.getLogger("pyfuse3")
    assert sum(isinstance(f, session_module.AnswersNobodyWaitsFor) for f in pyfuse3_log.filters) == 1
    caplog.set_level(logging.INFO, logger="pyfuse3")
    pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s", "No such file or directory")
    pyfuse3_log.error("fuse_read(): fuse_reply_* failed with %s", "Invalid argument")
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pyfuse3"]
    assert said == [
        (
            logging.INFO,
            "fuse_release(): fuse_reply_* failed with No such file or directory (the kernel no longer "
            "waited for this answer: nothing was lost)",
        ),
        (logging.ERROR, "fuse_read(): fuse_reply_* failed with Invalid argument"),
    ]
