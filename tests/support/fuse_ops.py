"""The mount's FUSE operations driven in-process, without a kernel (the t3 tier).

:func:`operations` builds :class:`~mirenfs.mount.operations.MirenOperations`
the way ``mirenfs mount`` wires them (:func:`mirenfs.mount.session.build_operations`:
the store's catalog, the snapshot service with its index cache, the
``restore/`` directory, a trio nursery handed in at construction) over a
data path, and takes them down as ``serve`` does. Tests call the handlers
directly with a :class:`FakeContext` and assert on the errno of the
``pyfuse3.FUSEError`` a refusal raises (:func:`fuse_errno`).

Nothing here mounts, attaches a loop device or needs root: ``pyfuse3.init``
is never called, so the two calls that need a live session are avoided
(``readdir_reply`` is replaced for the length of one :meth:`InProcessMount.listdir`;
the operations call no ``invalidate_*``). Loop devices are faked by pointing
``mirenfs.disks.live.SYS_BLOCK`` at a directory (:func:`fake_sys_block`).
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec

import pyfuse3
import pytest
import trio

from mirenfs.disks import live
from mirenfs.disks.store import Store
from mirenfs.engine.files import backup_image
from mirenfs.engine.produce import Settings
from mirenfs.mount.config import DEFAULT_SPILL_LIMIT, MountConfig
from mirenfs.mount.inodes import RESTORE_INODE, ROOT_INODE
from mirenfs.mount.operations import MirenOperations
from mirenfs.mount.session import build_operations

from support.data import write_image

P = ParamSpec("P")

# Small chunks give a few-MiB image many frames, so reads cross frame boundaries and read-ahead runs.
SMALL_SETTINGS = Settings(chunk_size=64 << 10, level=1, workers=2)
PIECE = 128 << 10  # the most one FUSE read or write request carries by default
STATE = b"user.mirenfs.state"
# 1.5 MiB with holes: random data at the start, text further on, a hole up to the end.
IMAGE_SEGMENTS = [("data", 96 << 10), ("hole", 160 << 10), ("text", 300 << 10), ("hole", 1 << 20)]


@dataclass
class FakeContext:
    """What pyfuse3 hands every handler as ``ctx``: the caller's ids and umask."""

    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    pid: int = field(default_factory=os.getpid)
    umask: int = 0o022


@dataclass
class SetattrFields:
    """pyfuse3's ``SetattrFields`` (whose attributes only pyfuse3 itself can set): which fields change."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def trio_test(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test function under ``trio.run`` (pytest sees a plain function with its fixtures)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        trio.run(functools.partial(test, *args, **kwargs))

    return run


async def fuse_errno(call: Awaitable[object]) -> int:
    """The errno a handler answers with; fails the test when the handler succeeds."""
    try:
        result = await call
    except pyfuse3.FUSEError as exc:
        return exc.errno
    raise AssertionError(f"the handler succeeded ({result!r}) where an errno was expected")


@dataclass
class InProcessMount:
    """The operations of one mount and the calls a kernel would make, as small helpers."""

    ops: MirenOperations
    data_path: Path
    ctx: FakeContext = field(default_factory=FakeContext)

    async def lookup(self, name: str, parent: int = ROOT_INODE) -> pyfuse3.EntryAttributes:
        """What a path walk finds once the file's version is built. A lookup never waits for an
        index pass: for a disk not indexed yet it gives the listing inode (timeouts 0), whose
        getattr runs the pass, as a kernel's ``stat`` does; the next walk finds the version."""
        entry = await self.ops.lookup(parent, os.fsencode(name), self.ctx)
        if parent == ROOT_INODE and entry.attr_timeout == 0 and stat.S_ISREG(entry.st_mode):
            await self.ops.getattr(entry.st_ino, self.ctx)
            entry = await self.ops.lookup(parent, os.fsencode(name), self.ctx)
        return entry

    async def open(self, inode: int, flags: int = os.O_RDONLY) -> int:
        info = await self.ops.open(inode, flags, self.ctx)
        return int(info.fh)

    async def read_handle(self, fh: int, *, piece: int = PIECE) -> bytes:
        """Everything from offset 0 to the end, as the kernel reads: in pieces until a short one."""
        data = bytearray()
        while chunk := await self.ops.read(fh, len(data), piece):
            data += chunk
        return bytes(data)

    async def read_file(self, name: str) -> bytes:
        """Look ``name`` up in the root, open it, read it whole, release it."""
        fh = await self.open((await self.lookup(name)).st_ino)
        try:
            return await self.read_handle(fh)
        finally:
            await self.ops.release(fh)

    async def create(self, name: str, *, mode: int = 0o644) -> tuple[int, int]:
        """``creat(restore/NAME)``: the handle and the entry's inode."""
        info, attrs = await self.ops.create(
            RESTORE_INODE, os.fsencode(name), mode, os.O_WRONLY | os.O_CREAT, self.ctx
        )
        return int(info.fh), int(attrs.st_ino)

    async def write_all(self, fh: int, data: bytes, *, piece: int = PIECE) -> None:
        for offset in range(0, len(data), piece):
            written = await self.ops.write(fh, offset, data[offset : offset + piece])
            assert written == len(data[offset : offset + piece])

    async def close(self, fh: int) -> int | None:
        """``close(2)``: flush (whose errno the program sees), then release; the flush's errno."""
        try:
            code = None
            await self.ops.flush(fh)
        except pyfuse3.FUSEError as exc:
            code = exc.errno
        await self.ops.release(fh)  # an error from release reaches nobody, so it must not raise
        return code

    async def copy_in(self, name: str, data: bytes, *, piece: int = PIECE) -> int | None:
        """``cp`` into restore/: create, write in order, close; the first errno the program sees."""
        fh, _inode = await self.create(name)
        try:
            await self.write_all(fh, data, piece=piece)
        except pyfuse3.FUSEError as exc:
            await self.close(fh)
            return exc.errno
        return await self.close(fh)

    async def state(self, name: str) -> str:
        """``user.mirenfs.state`` of ``restore/NAME``."""
        entry = await self.lookup(name, RESTORE_INODE)
        return (await self.ops.getxattr(entry.st_ino, STATE, self.ctx)).decode()

    async def xattrs(self, inode: int) -> dict[str, str]:
        names = await self.ops.listxattr(inode, self.ctx)
        return {
            os.fsdecode(name): (await self.ops.getxattr(inode, name, self.ctx)).decode() for name in names
        }

    async def listdir(self, inode: int, *, page: int = 1000) -> list[tuple[str, pyfuse3.EntryAttributes]]:
        """The entries ``readdir`` gives without ``.`` and ``..``, as ``os.listdir``."""
        listed = await self.readdir(inode, page=page)
        return [(name, attrs) for name, attrs in listed if name not in (".", "..")]

    async def readdir(self, inode: int, *, page: int = 1000) -> list[tuple[str, pyfuse3.EntryAttributes]]:
        """``readdir`` until the end, ``page`` entries per reply buffer (to exercise resuming)."""
        fh = await self.ops.opendir(inode, self.ctx)
        listed: list[tuple[str, pyfuse3.EntryAttributes]] = []
        next_id = 0
        while True:
            buffer = _ReplyBuffer(page)
            original, pyfuse3.readdir_reply = pyfuse3.readdir_reply, buffer.reply
            try:
                await self.ops.readdir(fh, next_id, None)
            finally:
                pyfuse3.readdir_reply = original
            if not buffer.entries:
                return listed
            listed.extend((name, attrs) for name, attrs, _position in buffer.entries)
            next_id = buffer.entries[-1][2]


class _ReplyBuffer:
    """What ``pyfuse3.readdir_reply`` fills for the kernel (it needs a live session): ``page`` entries."""

    def __init__(self, page: int) -> None:
        self.page = page
        self.entries: list[tuple[str, pyfuse3.EntryAttributes, int]] = []

    def reply(self, _token: object, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(self.entries) == self.page:
            return False  # full: the entry is not taken, and comes again in the next readdir
        self.entries.append((os.fsdecode(name), attrs, next_id))
        return True


@asynccontextmanager
async def operations(
    data_path: Path,
    *,
    allow_overwrite: bool = False,
    fuse_options: Iterable[str] = (),
    settings: Settings = SMALL_SETTINGS,
    spill_limit: int = DEFAULT_SPILL_LIMIT,
) -> AsyncIterator[InProcessMount]:
    """The operations of a mount of ``data_path``, with their nursery; taken down as ``serve`` does.

    A background task that fails (read-ahead) fails the test when the block ends.
    """
    config = MountConfig(
        mountpoint=str(data_path / "never-mounted"),
        data_path=str(data_path),
        allow_overwrite=allow_overwrite,
        fuse_options=list(fuse_options),
        settings=settings,
        spill_limit=spill_limit,
    )
    async with trio.open_nursery() as nursery:
        ops = build_operations(config, nursery)
        try:
            yield InProcessMount(ops, data_path)
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await ops.restores.close()  # an unfinished restore is undone, as at unmount
            ops.service.close()


# ---- disks and snapshots ---------------------------------------------------------------


def add_image_disk(
    data_path: Path,
    name: str,
    *,
    seed: int = 0,
    segments: list[tuple[str, int]] = IMAGE_SEGMENTS,
    filesystem: str = "ext4",
    **store_fields: Any,
) -> Path:
    """A disk of the store whose image (``segments``, see ``write_image``) sits at ``images/NAME.img``."""
    images = data_path / "images"
    images.mkdir(exist_ok=True)
    image = images / f"{name}.img"
    content = write_image(image, segments, seed=seed)
    Store(str(data_path)).add_disk(
        name, size_bytes=len(content), filesystem=filesystem, image_path=str(image), **store_fields
    )
    return image


async def snapshot_bytes(
    image: Path, *, name: str, filesystem: str = "ext4", settings: Settings = SMALL_SETTINGS
) -> bytes:
    """What ``mirenfs backup --image`` writes for ``image``: the reference for ``NAME.mirn``."""
    with tempfile.TemporaryDirectory(prefix="mirenfs-t3-") as scratch:
        output = os.path.join(scratch, f"{name}.mirn")
        await backup_image(str(image), output, name=name, filesystem=filesystem, settings=settings)
        return Path(output).read_bytes()


@dataclass(frozen=True)
class FileState:
    """What a refused or failed restore must leave exactly as it was."""

    content: bytes
    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileState:
        info = path.stat()
        return cls(path.read_bytes(), info.st_ino, info.st_mtime_ns)


# ---- loop devices, faked --------------------------------------------------------------


def fake_sys_block(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ``directory`` the /sys/block that mirenfs reads (an unbound loop device and a disk in it),
    so that no test depends on the host's loop devices."""
    (directory / "loop0").mkdir(parents=True)
    (directory / "vda").mkdir()
    monkeypatch.setattr(live, "SYS_BLOCK", str(directory))
    return directory


def attach_fake_loop(sys_block: Path, device: str, backing: Path) -> None:
    """Make ``device`` look attached to ``backing``, as the kernel shows it."""
    (sys_block / device / "loop").mkdir(parents=True)
    (sys_block / device / "loop" / "backing_file").write_text(f"{backing}\n")
