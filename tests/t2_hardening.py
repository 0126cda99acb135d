"""Issue 11 in the engine and the CLI, no mount: memory stays flat over hundreds of verifies and
restores (2), and a FIFO or symlink planted at the staging path fails a restore at once with the
reason, never hanging it (4). Items 5 (umask) and 13 (names printed safely) are in
t4_operator_cli.py; the rest of the disk layer in t1_hardening.py."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import random
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from mirenfs.disks import pointintime
from mirenfs.disks.pointintime import Consistency, CopyPolicy, take_point_in_time
from mirenfs.engine.consume import restore_to_path
from mirenfs.engine.files import verify_file
from mirenfs.engine.image import OpenImage
from mirenfs.errors import PointInTimeError, TargetError

from support.data import sha256_file, staging_files
from support.fuzz import header, metadata, streamed_frame
from support.mounts import proc_status_kib
from support.runners import run_mirenfs
from support.streams import restore_threads
from support.vectors import GO_EXT4, GO_ODD


def rss_mib() -> float:
    return proc_status_kib(os.getpid()) / 1024


async def file_pieces(path: Path, piece: int = 1 << 20) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(piece):
            yield data


def test_memory_stays_flat_over_many_verifies_and_restores(tmp_path: Path) -> None:
    """The zstd context of each stream is freed with it: no cycle the collector cannot see."""
    image = tmp_path / "image.img"

    def one(n: int) -> None:
        if n % 3:
            trio.run(verify_file, str(GO_EXT4.path))
        else:
            trio.run(lambda: restore_to_path(str(image), file_pieces(GO_EXT4.path), overwrite=True))

    for n in range(15):  # warm up: the allocator's arenas, the thread cache, the buffer pool
        one(n)
    gc.collect()
    before = rss_mib()
    for n in range(90):
        one(n)
    gc.collect()
    grown = rss_mib() - before
    assert grown < 48, f"RSS grew {grown:.0f} MiB over 90 runs (from {before:.0f} MiB)"
    assert sha256_file(image) == GO_EXT4.sha256
    assert restore_threads() == [] and staging_files(tmp_path) == []


def snapshot_packed(path: Path, content: bytes, packed: bytes) -> Path:
    """A snapshot of ``content`` whose zstd data is ``packed`` as the test packed it."""
    fields = {
        "name": path.stem,
        "size_bytes": len(content),
        "filesystem": "ext4",
        "timestamp": "2026-06-04T12:00:00Z",
        "checksum": hashlib.sha256(content).hexdigest(),
        "version": 1,
    }
    path.write_bytes(header(metadata(**fields)) + packed)
    return path


def test_a_large_window_is_freed_after_each_stream(tmp_path: Path) -> None:
    """A window-log-27 stream without a content size makes zstd allocate a 128 MiB window."""
    content = bytes(64 << 20)
    snapshot = snapshot_packed(tmp_path / "w27.mirn", content, streamed_frame(content, window_log=27))
    trio.run(verify_file, str(snapshot))
    gc.collect()
    before = rss_mib()
    for _ in range(8):
        trio.run(verify_file, str(snapshot))
    gc.collect()
    grown = rss_mib() - before
    assert grown < 96, f"RSS grew {grown:.0f} MiB over 8 streams of 64 MiB through a 128 MiB window"


def test_a_window_over_128_mib_is_named_not_called_corrupt(tmp_path: Path) -> None:
    """zstd --long=28 (from a pipe: no size to shrink the window to) asks for a 256 MiB window,
    over the 128 MiB mirenfs decodes: verify and restore say so, and what to do."""
    content = random.Random(3).randbytes(1 << 20)
    packed = subprocess.run(
        ["zstd", "-q", "--long=28", "-c"], input=content, capture_output=True, check=True, timeout=60
    ).stdout
    snapshot = snapshot_packed(tmp_path / "long.mirn", content, packed)
    said = (
        f"mirenfs: error: {snapshot}: the snapshot's zstd data needs a decoding window of 256 MiB, and "
        "mirenfs decodes windows up to 128 MiB (was it compressed with zstd --long?); "
    )
    image = tmp_path / "long.img"
    for argv in (["verify", str(snapshot)], ["restore", str(snapshot), "--image", str(image)]):
        done = run_mirenfs(*argv, timeout=60)
        assert done.returncode == 1 and done.stderr.decode().startswith(said), done.stderr
        assert b"corrupt" not in done.stderr and done.stderr.count(b"\n") == 1
    assert not image.exists() and staging_files(tmp_path) == []


# ---- 4: what is planted at the staging path fails the restore at once ---------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_restore_refuses_a_planted_staging_path_without_hanging(tmp_path: Path, kind: str) -> None:
    image = tmp_path / "pg.img"
    image.write_bytes(b"the old image")
    staging = tmp_path / "pg.img.restore.tmp"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not mirenfs's")
    if kind == "fifo":
        os.mkfifo(staging)
    else:
        staging.symlink_to(target)

    async def run() -> None:
        with trio.fail_after(10), pytest.raises(TargetError, match="is in the way of the restore"):
            await restore_to_path(str(image), file_pieces(GO_ODD.path), overwrite=True)

    trio.run(run)
    # The CLI says the same in one line, and exits (a hung open would be killed by the timeout).
    done = run_mirenfs("restore", str(GO_ODD.path), "--image", str(image), "--force", timeout=30)
    assert done.returncode == 1, done.stderr
    assert b"is in the way of the restore" in done.stderr and done.stderr.count(b"\n") == 1
    assert image.read_bytes() == b"the old image" and target.read_bytes() == b"not mirenfs's"
    assert os.path.lexists(staging)
    assert restore_threads() == []


def test_verify_of_a_header_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    """Item 12 at the CLI: a bad header, not "unexpected" with a traceback."""
    snapshot = tmp_path / "deep.mirn"
    body = metadata(name="d")[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    snapshot.write_bytes(header(body) + GO_ODD.path.read_bytes()[200:])
    for argv in (
        ["verify", str(snapshot)],
        ["inspect", str(snapshot)],
        ["restore", str(snapshot), "--image", str(tmp_path / "x.img")],
    ):
        done = run_mirenfs(*argv, timeout=60)
        assert done.returncode == 1, (argv, done.stderr)
        assert done.stderr.startswith(b"mirenfs: error: ") and b"nested too deeply" in done.stderr, (
            done.stderr
        )
        assert b"Traceback" not in done.stderr and b"unexpected" not in done.stderr
    assert not (tmp_path / "x.img").exists() and staging_files(tmp_path) == []


# ---- open files: a mount keeps each disk's image open once it was read (scale trial) ------------

_AT_THE_LIMIT = """
import errno, os, resource, sys
from mirenfs.disks.store import Store
from mirenfs.errors import StoreError, out_of_descriptors
assert out_of_descriptors() is None
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(out_of_descriptors())
try:
    Store(sys.argv[1]).list_disks()
except StoreError as exc:
    print(exc)
    print(errno.errorcode[exc.errno])
"""


def test_a_process_out_of_descriptors_is_told_so_not_that_its_store_is_broken(tmp_path: Path) -> None:
    """SQLite says "unable to open database file" when the process has no descriptor left; the
    sentence must name the limit and what to do, not send the operator to check the store."""
    data = tmp_path / "data"
    assert run_mirenfs("disk", "create", "pg", "--size", "1M", "--data-path", str(data)).returncode == 0
    done = subprocess.run(
        [sys.executable, "-c", _AT_THE_LIMIT, str(data)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    said, store_said, store_errno = done.stdout.splitlines()
    assert store_errno == "EMFILE"  # what cp and ls print: "Too many open files", not EIO
    expected = (
        "mirenfs has 64 files open, all that its limit allows (ulimit -n): a mount keeps each disk's "
        "image open once it was read; raise the limit (LimitNOFILE= in its service) and mount again"
    )
    assert said == store_said == expected, done.stdout


_RAISED = """
import resource
from mirenfs.mount.session import raise_open_file_limit
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
raise_open_file_limit()
soft, after = resource.getrlimit(resource.RLIMIT_NOFILE)
nr_open = int(open("/proc/sys/fs/nr_open").read())
print(soft == (nr_open if hard == resource.RLIM_INFINITY else hard) and after == hard)
"""


def test_a_mount_lifts_its_soft_open_file_limit_to_the_hard_one() -> None:
    """systemd gives services a soft limit of 1024 and a hard one of 524288: a host with more
    disks than the soft limit must not run out (no root needed: the hard limit is not raised)."""
    done = subprocess.run([sys.executable, "-c", _RAISED], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr


def test_a_copy_whose_image_changed_size_meanwhile_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a point-in-time copy's header took the image's size from before the copy, and
    nothing compared it with the copy's: an image resized in between gave a snapshot whose data
    is not its header's size, which no restore takes. Such a copy is refused; try again."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 8192)
    grown = tmp_path / "grown.img"
    grown.write_bytes(b"x" * 12288)
    opened: list[int] = []

    def copied_after_a_resize(_name: str, source: OpenImage, *_args: object) -> tuple[int, object]:
        opened.append(os.open(grown, os.O_RDONLY))
        taken = pointintime._Taken(source.identity, Consistency.CRASH_CONSISTENT, "reflink", None, "reflink")
        return opened[-1], taken

    monkeypatch.setattr(pointintime, "_copy_into", copied_after_a_resize)
    with pytest.raises(PointInTimeError) as refused:
        take_point_in_time(
            "pg", str(image), attached=True, clone_directory=str(tmp_path / "clones"), policy=CopyPolicy()
        )
    assert "its image changed size while its copy was made (8192 to 12288 bytes); try again" in str(
        refused.value
    )
    try:  # the copy's descriptor is closed (its number may since name another file)
        still = os.readlink(f"/proc/self/fd/{opened[0]}")
    except FileNotFoundError:
        still = None
    assert still != str(grown)


@pytest.mark.parametrize("before", ["nothing", "an image"])
def test_a_restore_replaces_only_what_was_at_its_path_when_it_began(tmp_path: Path, before: str) -> None:
    """Review Sec F3: a file another user put at ``--image PATH`` while the stream arrived (no
    ``--force`` needed for a new path) was replaced, and gave the restored disk her owner and mode.
    Now the restore is refused at its end, and what she put there is left as it is."""
    image = tmp_path / "restored.img"
    if before == "an image":
        image.write_bytes(b"the old image")
        os.chmod(image, 0o600)
    checks = []

    def someone_else_puts_a_file_there() -> None:
        checks.append(True)
        if len(checks) == 2:  # the check right before the install; the first one is at the start
            image.unlink(missing_ok=True)
            image.write_bytes(b"hers")
            os.chmod(image, 0o666)

    async def restore() -> None:
        await restore_to_path(
            str(image),
            file_pieces(GO_EXT4.path),
            overwrite=before == "an image",
            check_target=someone_else_puts_a_file_there,
        )

    with pytest.raises(TargetError, match="while the snapshot was restored, by another process") as refused:
        trio.run(restore)
    assert refused.value.errno == errno.EEXIST
    assert image.read_bytes() == b"hers" and staging_files(tmp_path) == []


def test_a_restored_image_keeps_its_owner_and_mode_less_what_others_may_do(tmp_path: Path) -> None:
    """Review Sec F3: an image left 0644 (by a restore of an older mirenfs) stayed readable by
    every user after each restore over it."""
    image = tmp_path / "restored.img"
    image.write_bytes(b"the old image")
    os.chmod(image, 0o664)
    owner = (4321, 4322) if os.geteuid() == 0 else (os.getuid(), os.getgid())  # review MT: owner checked
    os.chown(image, *owner)

    async def restore() -> None:
        await restore_to_path(str(image), file_pieces(GO_EXT4.path), overwrite=True)

    trio.run(restore)
    assert sha256_file(image) == GO_EXT4.sha256
    assert stat.S_IMODE(image.stat().st_mode) == 0o660
    assert (image.stat().st_uid, image.stat().st_gid) == owner


def test_a_restore_syncs_its_staging_file_before_it_replaces_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review MT: nothing checked that the new image is on disk before it takes the old one's name
    (a crash after the rename would leave neither), nor that a sync refused (a full filesystem at
    writeback) keeps the old image."""
    image = tmp_path / "restored.img"
    image.write_bytes(b"the old image")
    steps: list[tuple[str, int]] = []  # (call, inode): the staging file is made unnamed, then linked
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        steps.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def rename(source: str, destination: str, **at: int) -> None:
        steps.append(("rename", os.stat(source, **at).st_ino))
        real_rename(source, destination, **at)

    async def restore() -> None:
        await restore_to_path(str(image), file_pieces(GO_EXT4.path), overwrite=True)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    trio.run(restore)
    monkeypatch.undo()
    [renamed] = [i for i, (call, _inode) in enumerate(steps) if call == "rename"]
    assert steps[renamed][1] == image.stat().st_ino
    assert ("fsync", image.stat().st_ino) in steps[:renamed], steps
    assert ("fsync", tmp_path.stat().st_ino) in steps[renamed:], steps  # the rename itself, durable

    image.write_bytes(b"the old image")

    def full(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the staging file's (the directory's comes after)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TargetError, match="its filesystem is full"):
        trio.run(restore)
    monkeypatch.undo()
    assert image.read_bytes() == b"the old image" and sorted(p.name for p in tmp_path.iterdir()) == [
        "restored.img"
    ]


def test_a_staging_file_that_cannot_be_removed_does_not_hide_why_the_restore_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial FD F7: a restore that found the filesystem full, then could not remove its staging
    file (EIO), told the writer EIO and lost "unchanged"; the staging file's removal is said."""
    image = tmp_path / "restored.img"
    image.write_bytes(b"the old image")
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        if os.fspath(path).endswith(".restore.tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    async def restore() -> None:
        await restore_to_path(str(image), file_pieces(GO_EXT4.path), overwrite=True, check_target=full)

    def full() -> None:
        if os.path.exists(f"{image}.restore.tmp"):  # the check right before the install
            raise TargetError(f"cannot write {image}: its filesystem is full", errno.ENOSPC)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(TargetError, match="its filesystem is full") as refused:
        trio.run(restore)
    monkeypatch.undo()
    assert refused.value.errno == errno.ENOSPC and image.read_bytes() == b"the old image"
    assert f"could not remove {image}.restore.tmp, the staging file of a failed restore" in caplog.text
