"""Issue 11 in the FUSE operations, driven in-process (no kernel): requests on one restore are
serialized and a writer's close tells it the outcome (1), only the owner and root restore on a
shared mount (3), a full or unwritable state directory only costs the caches (6), a stale handle
cannot touch a newer restore (8), the replaced image is let go at install (10), deep JSON
nesting is EINVAL (12)."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from mirenfs.disks.restore import DiskRestore
from mirenfs.format.header import decode_header
from mirenfs.mount import restoredir
from mirenfs.mount.inodes import RESTORE_INODE, ROOT_INODE
from mirenfs.mount.status import STATUS_XATTR

from support.bad_snapshots import raw_header
from support.data import sha256_file, staging_files
from support.fuse_ops import (
    PIECE,
    FakeContext,
    FileState,
    SetattrFields,
    add_image_disk,
    fuse_errno,
    operations,
    trio_test,
)
from support.mounts import deleted_files_held
from support.store import store_state
from support.vectors import GO_EXT4, GO_ODD

NOBODY = FakeContext(uid=65534, gid=65534)


pytestmark = pytest.mark.usefixtures("sys_block")  # never the host's loop devices


def with_bad_checksum(snapshot: bytes) -> bytes:
    meta, length = decode_header(snapshot)
    other = meta.__class__(**{**meta.__dict__, "checksum": "0" * 64})
    return other.header() + snapshot[length:]


# ---- 1: one request at a time per restore; the writer's close tells the outcome ----------------------


class Overlap:
    """Counts the requests inside a restore at once (the restore's own methods, wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inside = 0
        self.most = 0
        for name in ("write", "feed_pending", "finish", "abort"):
            monkeypatch.setattr(DiskRestore, name, self._counted(getattr(DiskRestore, name)))

    def _counted(self, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.inside += 1
            self.most = max(self.most, self.inside)
            try:
                await trio.sleep(0)  # let every other request in: only the entry's lock keeps them out
                return await method(*args, **kwargs)
            finally:
                self.inside -= 1

        return counted


async def write_while_children_close(m: Any, fh: int, data: bytes, closes: int) -> list[int | None]:
    """The fork shape in one process: one descriptor written in order while "children" close it
    (a FLUSH each) at any moment; the errno each child's close got."""
    answers: list[int | None] = []

    async def child_close() -> None:
        try:
            await m.ops.flush(fh)
            answers.append(None)
        except Exception as exc:  # a FUSEError: its errno is what the child's close(2) saw
            answers.append(getattr(exc, "errno", -1))

    async with trio.open_nursery() as nursery:
        for n, offset in enumerate(range(0, len(data), PIECE)):
            if n < closes:
                nursery.start_soon(child_close)
            await m.ops.write(fh, offset, data[offset : offset + PIECE])
    return answers


@trio_test
async def test_a_close_never_runs_inside_a_write_and_a_whole_stream_installs(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        restoredir, "held_open", lambda path, **_: True
    )  # the children: the writer still holds it
    overlap = Overlap(monkeypatch)
    image = add_image_disk(data_path, "pg")
    vector = GO_EXT4.path.read_bytes()
    async with operations(data_path, allow_overwrite=True) as m:
        fh, _inode = await m.create("pg.mirn")
        answers = await write_while_children_close(m, fh, vector, closes=60)
        assert set(answers) <= {None, errno.EIO}, answers  # "not whole yet", never a failure
        assert await m.close(fh) is None  # the writer's close: the restore installed
        assert await m.state("pg.mirn") == f"installed from a snapshot of disk {GO_EXT4.name}"
    assert overlap.most == 1, f"{overlap.most} requests of one restore ran at once"
    assert sha256_file(image) == GO_EXT4.sha256
    assert staging_files(data_path) == []


@trio_test
async def test_a_writer_whose_restore_failed_meanwhile_is_told_at_its_close(
    data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore that fails (here: its checksum) while children close the shared descriptor:
    the writer's own close fails too, so its exit status says so; the image is untouched."""
    monkeypatch.setattr(restoredir, "held_open", lambda path, **_: True)
    overlap = Overlap(monkeypatch)
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        before = FileState.of(image)
        fh, _inode = await m.create("pg.mirn")
        answers = await write_while_children_close(m, fh, with_bad_checksum(GO_EXT4.path.read_bytes()), 60)
        assert set(answers) <= {None, errno.EIO, errno.EINVAL}, answers
        assert await m.close(fh) in (errno.EINVAL, errno.EIO)
        assert (await m.state("pg.mirn")).startswith("failed: checksum mismatch")
        assert FileState.of(image) == before
    assert overlap.most == 1
    assert staging_files(data_path) == []


# ---- 3: with -o allow_other, only the owner and root restore --------------------------------------------


@trio_test
async def test_another_user_can_neither_start_nor_feed_nor_change_a_restore(
    data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True, fuse_options=["allow_other"]) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        ops, name = m.ops, b"pg.mirn"
        flags = os.O_WRONLY | os.O_CREAT
        assert await fuse_errno(ops.create(RESTORE_INODE, name, 0o666, flags, NOBODY)) == errno.EACCES
        # An entry that exists (a tar member, a chmod 0666) is no way in either.
        fh, inode = await m.create("pg.mirn", mode=0o666)
        await m.close(fh)  # empty: failed, but the entry stays
        fields = SetattrFields(update_mode=True)
        attrs = await ops.getattr(inode, m.ctx)
        assert attrs.st_mode & 0o777 == 0o600  # made without group and other bits, on a shared mount
        attrs.st_mode = (attrs.st_mode & ~0o777) | 0o666
        attrs = await ops.setattr(inode, attrs, fields, None, m.ctx)  # its owner's chmod 0666 stands
        assert attrs.st_mode & 0o777 == 0o666
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            assert await fuse_errno(ops.open(inode, flags, NOBODY)) == errno.EACCES
        assert await fuse_errno(ops.setattr(inode, attrs, fields, None, NOBODY)) == errno.EACCES
        assert await fuse_errno(ops.unlink(RESTORE_INODE, name, NOBODY)) == errno.EACCES
        assert await fuse_errno(ops.rename(RESTORE_INODE, name, RESTORE_INODE, b"x.mirn", 0, NOBODY)) == (
            errno.EACCES
        )
        assert await fuse_errno(ops.mkdir(RESTORE_INODE, b"restore", 0o777, NOBODY)) == errno.EACCES
        # Reading an entry's outcome is anyone's.
        reader = await ops.open(inode, os.O_RDONLY, NOBODY)
        assert (await ops.read(reader.fh, 0, 4096)).startswith(b"failed: ")
        await ops.release(reader.fh)
        assert FileState.of(image) == image_before
        assert store_state(data_path) == before
        # The owner (root here too) restores, and the log names who did.
        with caplog.at_level(logging.INFO, logger="mirenfs.mount.restoredir"):
            assert await m.copy_in("pg.mirn", GO_ODD.path.read_bytes()) is None
        assert f"by uid {m.ctx.uid} installed" in caplog.text
        assert "uid 65534 may not restore" in caplog.text
    assert sha256_file(image) == GO_ODD.sha256


@trio_test
async def test_the_mounts_status_is_its_owners_and_roots_only(data_path: Path) -> None:
    """Trial R: with -o allow_other any user read the status (every image's checksum, who
    restored what), though the snapshots themselves are 0400 to them. Now EACCES, which
    `mirenfs status` words as "the mount is private to its owner"."""
    add_image_disk(data_path, "pg")
    async with operations(data_path, fuse_options=["allow_other"]) as m:
        status = STATUS_XATTR.encode()
        assert await fuse_errno(m.ops.getxattr(ROOT_INODE, status, NOBODY)) == errno.EACCES
        passes = b"user.mirenfs.index_passes"
        assert await fuse_errno(m.ops.getxattr(ROOT_INODE, passes, NOBODY)) == errno.EACCES
        assert await m.ops.listxattr(ROOT_INODE, NOBODY) == []
        acl = b"system.posix_acl_access"  # what `ls` asks of every directory: nothing there, as before
        assert await fuse_errno(m.ops.getxattr(ROOT_INODE, acl, NOBODY)) == pyfuse3.ENOATTR
        assert "pg" in json.loads(await m.ops.getxattr(ROOT_INODE, status, m.ctx))["disks"]
        assert status in await m.ops.listxattr(ROOT_INODE, m.ctx)
        # Review: each restore/ entry's outcome was as readable (cp makes it 0644): the kernel,
        # which checks modes on a shared mount, is shown it as its writer's and root's only.
        fh, inode = await m.create("web.mirn", mode=0o644)
        await m.close(fh)
        assert stat.S_IMODE((await m.ops.getattr(inode, m.ctx)).st_mode) == 0o600
    async with operations(data_path) as private:  # not shared: as the writer made it
        fh, inode = await private.create("web.mirn", mode=0o644)
        await private.close(fh)
        assert stat.S_IMODE((await private.ops.getattr(inode, private.ctx)).st_mode) == 0o644


# ---- 8: a stale handle cannot feed, install or fail a newer restore ------------------------------------


@trio_test
async def test_a_stale_handle_of_a_failed_attempt_cannot_touch_the_next_one(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    vector = GO_ODD.path.read_bytes()
    async with operations(data_path, allow_overwrite=True) as m:
        stale, inode = await m.create("pg.mirn")
        assert await fuse_errno(m.ops.write(stale, 0, b"MIRX" + bytes(2 << 20))) == errno.EINVAL  # failed
        fresh = await m.open(inode, os.O_WRONLY | os.O_TRUNC)  # cp again, the first descriptor still open
        assert await m.state("pg.mirn") == "receiving"
        half = len(vector) // 2
        await m.write_all(fresh, vector[:half])
        # Everything the stale descriptor does now is refused (with its own attempt's failure,
        # EINVAL) or ignored, and hurts nothing.
        assert await fuse_errno(m.ops.write(stale, 2 << 20, b"x" * 100)) == errno.EINVAL
        assert await fuse_errno(m.ops.write(stale, half, vector[half : half + PIECE])) == errno.EINVAL
        assert await fuse_errno(m.ops.flush(stale)) == errno.EINVAL  # its own attempt failed: it says so
        await m.ops.release(stale)
        assert await m.state("pg.mirn") == "receiving"
        for offset in range(half, len(vector), PIECE):
            await m.ops.write(fresh, offset, vector[offset : offset + PIECE])
        assert await m.close(fresh) is None
        assert await m.state("pg.mirn") == f"installed from a snapshot of disk {GO_ODD.name}"
    assert sha256_file(image) == GO_ODD.sha256


@trio_test
async def test_a_stale_handle_of_an_installed_restore_closes_quietly(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        first, inode = await m.create("pg.mirn")
        await m.write_all(first, GO_ODD.path.read_bytes())
        await m.ops.flush(first)  # installed by this close
        second = await m.open(inode, os.O_WRONLY | os.O_TRUNC)  # a new restore, GO_EXT4 this time
        await m.write_all(second, GO_EXT4.path.read_bytes()[: 1 << 20])
        await m.ops.release(first)  # the first descriptor's last close: nothing to do for it
        assert await m.state("pg.mirn") == "receiving"
        data = GO_EXT4.path.read_bytes()
        for offset in range(1 << 20, len(data), PIECE):
            await m.ops.write(second, offset, data[offset : offset + PIECE])
        assert await m.close(second) is None
    assert sha256_file(image) == GO_EXT4.sha256


# ---- 10: the replaced image is let go at install ------------------------------------------------------


@trio_test
async def test_the_replaced_image_is_released_when_the_restore_installs(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        old = (await m.lookup("pg.mirn")).st_size  # the mount now holds the image open for its snapshot
        assert await m.copy_in("pg.mirn", GO_ODD.path.read_bytes()) is None
        assert deleted_files_held(os.getpid(), image) == []  # not at the next lookup: at once
        assert m.ops.service.current("pg") is None
        new = await m.lookup("pg.mirn")  # and the snapshot shown is the new image's
        assert new.st_size != old
        assert (await m.xattrs(new.st_ino))["user.mirn.checksum"] == GO_ODD.sha256


@trio_test
async def test_a_replaced_image_still_read_is_released_by_the_last_reader(data_path: Path) -> None:
    image = add_image_disk(data_path, "pg")
    async with operations(data_path, allow_overwrite=True) as m:
        reader = await m.open((await m.lookup("pg.mirn")).st_ino)
        first = await m.ops.read(reader, 0, 4096)
        assert await m.copy_in("pg.mirn", GO_ODD.path.read_bytes()) is None
        assert len(deleted_files_held(os.getpid(), image)) == 1  # a reader still reads the old snapshot
        assert await m.ops.read(reader, 0, 4096) == first
        await m.ops.release(reader)
        assert deleted_files_held(os.getpid(), image) == []


# ---- 12: JSON nested too deeply is a bad header (EINVAL), not EIO ----------------------------------------


@pytest.mark.parametrize(
    "nested", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000]
)
@trio_test
async def test_deeply_nested_metadata_is_einval(data_path: Path, nested: bytes) -> None:
    image = add_image_disk(data_path, "pg")
    vector = GO_ODD.path.read_bytes()
    meta, length = decode_header(vector)
    body = meta.to_json()[:-1] + b',"deep":' + nested + b"}"
    async with operations(data_path, allow_overwrite=True) as m:
        before, image_before = store_state(data_path), FileState.of(image)
        assert await m.copy_in("pg.mirn", raw_header(body) + vector[length:]) == errno.EINVAL
        assert re.fullmatch(r"failed: .*nested too deeply.*", await m.state("pg.mirn"))
        assert FileState.of(image) == image_before and store_state(data_path) == before


# ---- 6: the state directory is only a cache -------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        "frame-store",
        "spill",
    ],
)
@trio_test
async def test_snapshots_are_served_when_the_state_directory_is_full(
    data_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, frames: str
) -> None:
    """Indexes that cannot be saved and frames that cannot be kept (in the frame store, or with
    ``-o frame_store_size=0`` in the spill) cost a later index pass, never a read; each such problem
    is logged once."""
    add_image_disk(data_path, "pg")
    add_image_disk(data_path, "web", seed=3)
    state = str(data_path / "mirenfs") + os.sep
    real_open = os.open

    def full(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        """Every new file under the state directory fails as on a full filesystem."""
        creating = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
        if creating and os.fspath(path).startswith(state):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(path, flags, *args, **kwargs)

    options = ["frame_store_size=0"] if frames == "spill" else []
    async with operations(data_path, fuse_options=options) as m:
        monkeypatch.setattr(os, "open", full)
        with caplog.at_level(logging.WARNING):
            for disk in ("pg", "web"):
                snapshot = await m.read_file(f"{disk}.mirn")
                assert len(snapshot) == (await m.lookup(f"{disk}.mirn")).st_size
                assert len(await m.read_file(f"{disk}.mirn.sha256")) == 64 + 2 + len(f"{disk}.mirn") + 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len([w for w in warnings if "cannot save snapshot indexes" in w]) == 1, warnings
        assert len([w for w in warnings if "No space left" in w and "frames in" in w]) <= 1, warnings
        assert all("No space left" in w for w in warnings), warnings
