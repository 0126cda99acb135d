"""Issue 11 through the kernel: writers that fork, memory over hundreds of restores, other users
on a shared mount, planted staging files, a full data path, a killed daemon, a read-only data
path, the replaced image let go, empty and truncated copies, symlinked volumes, and a sample of
the fuzz corpus through ``cp`` into restore/.

Each mount is a ``mirenfs mount --foreground`` whose log is checked when it stops (a warning the
test did not declare, or any traceback, fails it). Every mount, bind mount and loop device is
taken down, also on failure; every command has a timeout; waits have deadlines.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.bad_snapshots import make_good_snapshot
from support.data import seek_table_start, sha256_file, staging_files, write_image, write_slow_image
from support.fuzz import SEED, Oracle, corpus, sample
from support.loopfs import loop_filesystem, make_filesystem, run, tool
from support.mounts import Mount, deleted_files_held, proc_status_kib, restore_state, wait_for
from support.runners import run_mirenfs, status_of
from support.store import disks, store_state
from support.vectors import GO_EXT4, GO_ODD

Mounts = Callable[..., Mount]
TIMEOUT = 60
FAILED_RESTORE = r"restore of disk \S+ from restore/\S+ by uid \d+ failed: "


def add_disk(data: Path, name: str, image: Path) -> None:
    done = run_mirenfs(
        "disk", "add", name, "--image", str(image), "--filesystem", "ext4", "--data-path", str(data)
    )
    assert done.returncode == 0, done.stderr


def sh(script: str, *args: str | Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script, "sh", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def long_snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A snapshot of 8 MiB of data (64 FUSE writes), a copy with a wrong checksum, the image hash."""
    work = tmp_path_factory.mktemp("long")
    data, meta, header_len = make_good_snapshot(work, [("data", 6 << 20), ("text", 2 << 20)])
    good, bad = work / "long.mirn", work / "bad.mirn"
    good.write_bytes(data)
    wrong = meta.__class__(**{**meta.__dict__, "checksum": "0" * 64})
    bad.write_bytes(wrong.header() + data[header_len:])
    return good, bad, meta.checksum


# ---- 1: the exact fork shape ----

FORK_SHAPE = '( exec 3>"$1"; cat "$2" >&3 & C=$!; while kill -0 $C 2>/dev/null; do /bin/true; done; wait $C )'


def test_writers_that_share_the_descriptor_get_the_outcome_as_their_exit_status(
    tmp_path: Path, data: Path, mounts: Mounts, long_snapshot: tuple[Path, Path, str]
) -> None:
    good, bad, checksum = long_snapshot
    mnt = tmp_path / "mnt"
    mounts(mnt, data, "--allow-overwrite", expect_log=[FAILED_RESTORE + "checksum mismatch"])
    target = mnt / "restore" / "x.mirn"
    image: Path | None = None
    for round_number in range(40):
        source = bad if round_number % 4 == 3 else good
        done = sh(FORK_SHAPE, target, source)
        outcome = restore_state(mnt, "x.mirn")
        assert "Device or resource busy" not in done.stderr, f"round {round_number}: {done.stderr}"
        if source == good:
            assert done.returncode == 0, f"round {round_number}: {done.stderr} ({outcome})"
            assert outcome.startswith("installed"), f"round {round_number}: {outcome}"
            image = Path(str(disks(data)["x"]["image_path"]))
            assert sha256_file(image) == checksum
        else:
            assert done.returncode != 0, f"round {round_number}: cat exited 0 but the restore {outcome}"
            assert outcome.startswith("failed: checksum mismatch"), f"round {round_number}: {outcome}"
            assert image is not None and sha256_file(image) == checksum  # the last good one, untouched
        assert staging_files(data) == [], f"round {round_number}"


@pytest.mark.parametrize("then", ["its seek table", "bytes after its end"])
def test_a_close_of_a_copy_of_the_descriptor_where_the_image_is_whole_leaves_the_outcome_to_the_writer(
    tmp_path: Path, data: Path, mounts: Mounts, long_snapshot: tuple[Path, Path, str], then: str
) -> None:
    """Review S21 G1, the fork shape's boundary made certain: a descriptor closed exactly where
    the image data ends, before the seek table, installed the restore, and the writer's next
    write failed (it exited 1, its restore installed). The writer's status is now the outcome."""
    good, _bad, checksum = long_snapshot
    mnt = tmp_path / "mnt"
    expect = [] if then == "its seek table" else [FAILED_RESTORE + "the zstd data is corrupt"]
    mounts(mnt, data, expect_log=expect)
    snapshot = good.read_bytes()
    whole = seek_table_start(snapshot) if then == "its seek table" else len(snapshot)
    rest = snapshot[whole:] if then == "its seek table" else b"after the end"
    fd = os.open(mnt / "restore" / "x.mirn", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, snapshot[:whole])
        os.close(os.dup(fd))  # what a forked child's exit, or dd's dup2, does
        assert restore_state(mnt, "x.mirn").startswith("receiving: whole and verified")
        assert disks(data)["x"]["status"] == "provisioning"  # not installed yet
        os.write(fd, rest)
    finally:
        closed: OSError | None = None
        try:
            os.close(fd)
        except OSError as exc:
            closed = exc
    outcome = restore_state(mnt, "x.mirn")
    if then == "its seek table":
        assert closed is None and outcome.startswith("installed: created disk x"), (closed, outcome)
        assert sha256_file(Path(str(disks(data)["x"]["image_path"]))) == checksum
    else:
        assert closed is not None and closed.errno == errno.EINVAL, (closed, outcome)
        assert outcome.startswith("failed: the zstd data is corrupt"), outcome
        assert "x" not in disks(data)
    assert staging_files(data) == []


# ---- 2 and 5: memory over 200 restores; the state is private whatever the umask ----


def test_the_daemon_memory_stays_flat_over_200_restores(tmp_path: Path, data: Path, mounts: Mounts) -> None:
    mnt = tmp_path / "mnt"
    previous = os.umask(0)  # the daemon inherits it: its state must be private all the same
    try:
        mount = mounts(mnt, data, "--allow-overwrite")
    finally:
        os.umask(previous)
    assert mount.process is not None
    pid = mount.process.pid
    vector = GO_EXT4.path.read_bytes()

    def restore() -> None:
        with open(mnt / "restore" / "m.mirn", "wb") as out:
            out.write(vector)

    samples: dict[int, int] = {0: proc_status_kib(pid)}
    for n in range(1, 201):
        restore()
        if n in (20, 50, 100, 150, 200):
            samples[n] = proc_status_kib(pid)
    assert restore_state(mnt, "m.mirn") == f"installed from a snapshot of disk {GO_EXT4.name}"
    assert sha256_file(str(disks(data)["m"]["image_path"])) == GO_EXT4.sha256
    print(f"daemon VmRSS (KiB) after N restores of {GO_EXT4.file}: {samples}")
    grown = (samples[200] - samples[20]) / 1024
    assert grown < 48, f"the daemon grew {grown:.0f} MiB between restore 20 and 200: {samples}"
    assert samples[200] < 300 * 1024, samples

    state_dir = data / "mirenfs"
    for path in [state_dir, *state_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {mode:o} under umask 000"
    assert (data / "mirenfs.db").exists()  # review MT: checked, not skipped when it is elsewhere
    for name in ("mirenfs.db", "mirenfs.db-wal", "mirenfs.db-shm"):
        if (data / name).exists():
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name


# ---- 3: with -o allow_other --allow-overwrite, no other user can replace a disk ----


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A directory another user can reach (pytest's own are root-only), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mirenfs-t4-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_another_user_cannot_restore_even_into_a_0666_entry(
    world: Path, data: Path, mounts: Mounts, need_tool
) -> None:
    setpriv = need_tool("setpriv")
    image = world / "pg.img"
    image.write_bytes(b"the disk pg" * 1000)
    add_disk(data, "pg", image)
    before = sha256_file(image)
    source = world / "evil.mirn"
    shutil.copyfile(GO_ODD.path, source)
    source.chmod(0o644)
    mnt = world / "mnt"
    mounts(
        mnt,
        data,
        "-o",
        "allow_other",
        "--allow-overwrite",
        expect_log=[r"uid 65534 may not restore", FAILED_RESTORE],
    )
    # The owner leaves an entry behind and makes it writable by everyone (tar -p, chmod).
    sh('printf x > "$1"', mnt / "restore" / "pg.mirn")  # a failed restore: the entry stays
    os.chmod(mnt / "restore" / "pg.mirn", 0o666)
    assert stat.S_IMODE(os.stat(mnt / "restore" / "pg.mirn").st_mode) == 0o666
    for name in ("pg.mirn", "sec2.mirn"):
        done = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "cp",
                str(source),
                str(mnt / "restore" / name),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode != 0 and "Permission denied" in done.stderr, (name, done.stderr)
    # Review Sec F8: another user may not even look in (0700), so her `stat` of a snapshot cannot
    # make the mount index (or freeze and copy) a disk; an entry the owner made 0666 stays theirs.
    for argv in (["cat", str(mnt / "restore" / "pg.mirn")], ["stat", str(mnt / "pg.mirn")], ["ls", str(mnt)]):
        looked = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert looked.returncode != 0 and "Permission denied" in looked.stderr, (argv, looked)
    status = status_of(mnt)
    assert status["index_passes"] == 0 and status["disks"]["pg"]["index"] == "not built", status

    assert sha256_file(image) == before
    assert set(disks(data)) == {"pg"}
    assert staging_files(world) == []


# ---- 4: a FIFO planted at the staging path ----


def test_a_fifo_at_the_staging_path_fails_cp_at_once_and_the_mount_restarts(
    tmp_path: Path, data: Path, mounts: Mounts
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    image = images / "pg.img"
    image.write_bytes(b"the disk pg" * 1000)
    add_disk(data, "pg", image)
    fifo = images / "pg.img.restore.tmp"
    os.mkfifo(fifo)
    mnt = tmp_path / "mnt"
    planted = [FAILED_RESTORE + r".*is in the way of the restore"]
    mount = mounts(mnt, data, "--allow-overwrite", expect_log=planted)
    done = subprocess.run(
        ["timeout", "-s", "KILL", "30", "cp", str(GO_ODD.path), str(mnt / "restore" / "pg.mirn")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode not in (0, -9, 137), done  # failed, and not by the timeout
    assert "File exists" in done.stderr, done.stderr
    assert restore_state(mnt, "pg.mirn").startswith("failed: ") and "is in the way" in restore_state(
        mnt, "pg.mirn"
    )
    assert sorted(os.listdir(mnt)) == ["pg.mirn", "pg.mirn.sha256", "restore"]  # it still answers
    mount.stop()
    mounts(mnt, data, "--allow-overwrite", expect_log=planted)  # the sweep at start passes it by
    assert "pg.mirn" in os.listdir(mnt)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and image.read_bytes() == b"the disk pg" * 1000


# ---- 6: a full data path ----


def fill(directory: Path) -> None:
    """Fill the filesystem of ``directory`` to the last block (root's reserve too)."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as out:
        block = bytes(1 << 20)
        while True:
            out.write(block)
            out.flush()
    with contextlib.suppress(OSError), open(directory / "filler-small", "wb") as out:
        while True:
            out.write(bytes(4096))
            out.flush()
    with pytest.raises(OSError) as full, open(directory / "one-more", "wb") as out:
        out.write(bytes(1 << 16))
        out.flush()
        os.fsync(out.fileno())
    assert full.value.errno == errno.ENOSPC


def test_a_full_data_path_still_serves_its_snapshots(tmp_path: Path, mounts: Mounts) -> None:
    backing = tmp_path / "data.ext4"
    make_filesystem(backing, "ext4", 96 << 20)
    with loop_filesystem(backing, tmp_path / "data") as mounted:
        data = mounted.mountpoint
        for name in ("pg", "web"):
            done = run_mirenfs(
                "disk", "create", name, "--size", "16M", "--data-path", str(data), timeout=TIMEOUT
            )
            assert done.returncode == 0, done.stderr
        mnt = tmp_path / "mnt"
        # The frame store either finds no room for its directory or less than 10% free, by what the
        # disk store's files took of the last blocks.
        full = [r"No space left on device", r"frame store \S+ stops growing"]
        mount = mounts(mnt, data, expect_log=full)
        try:
            assert sorted(os.listdir(mnt)) == [
                "pg.mirn",
                "pg.mirn.sha256",
                "restore",
                "web.mirn",
                "web.mirn.sha256",
            ]
            fill(data)
            for _ in range(2):
                for name in ("pg", "web"):
                    snapshot = mnt / f"{name}.mirn"
                    assert snapshot.stat().st_size > 0
                    copy = tmp_path / f"{name}.copy.mirn"
                    shutil.copyfile(snapshot, copy)  # cat
                    verify = run_mirenfs("verify", str(copy), timeout=TIMEOUT)
                    assert verify.returncode == 0, verify.stderr
                    copy.unlink()
                    assert (mnt / f"{name}.mirn.sha256").read_text().endswith(f"  {name}.mirn\n")
            assert set(disks(data)) == {"pg", "web"}
            mount.stop()
            first_run = mount.log()
            mount = mounts(mnt, data, expect_log=full)  # and a mount starts on it
            assert os.getxattr(mnt / "pg.mirn", "user.mirn.size_bytes") == str(16 << 20).encode()
        finally:
            mount.stop()
    for run_log in (first_run, mount.log()[len(first_run) :]):
        said = [line for line in run_log.splitlines() if "No space left on device" in line]
        kinds = [line.split(": ", 2)[-1].split(" (")[0] for line in said]
        assert len(kinds) == len(set(kinds)), "the log says what is full more than once:\n" + "\n".join(said)


def leave_free(directory: Path, room: int) -> None:
    """Take the filesystem of ``directory`` down to ``room`` bytes free (for root) with one
    allocated filler file, replacing the one a previous call made."""
    filler = directory / "filler"
    filler.unlink(missing_ok=True)
    os.sync()
    fs = os.statvfs(directory)
    size = fs.f_bfree * fs.f_frsize - max(room, 4 << 20)  # the extent tree needs blocks too
    assert size > 0, f"{directory} has no more than {room} bytes free already"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.lseek(fd, size, os.SEEK_SET)
        while not room:  # to the last block, root's reserve too
            try:
                os.write(fd, bytes(4096))
                os.fsync(fd)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    finally:
        os.close(fd)


def frame_store_bytes(data: Path) -> int:
    return sum(entry.stat().st_size for entry in (data / "mirenfs" / "frames").rglob("*") if entry.is_file())


def test_a_restore_into_a_full_data_path_takes_back_the_frame_stores_space(
    tmp_path: Path, mounts: Mounts
) -> None:
    """Trial S: the frame store, a cache, kept 224 MiB of a data path while a restore there failed
    with ENOSPC. A restore that finds the filesystem full now takes the frames' space back
    (least recently used first), from ``mirenfs restore`` and through ``restore/``: when its
    writes find no room, and (trial T) when a new disk's record finds the data path full to
    its last block. The restored images verify, and nothing else is touched."""
    backing = tmp_path / "data.ext4"
    make_filesystem(backing, "ext4", 192 << 20)
    with loop_filesystem(backing, tmp_path / "data") as mounted:
        data = mounted.mountpoint
        (data / "images").mkdir()
        image = data / "images" / "pg.img"
        original = hashlib.sha256(
            write_image(image, [("data", 40 << 20), ("hole", 8 << 20)], seed=7)
        ).hexdigest()
        add_disk(data, "pg", image)
        write_image(data / "images" / "web.img", [("data", 24 << 20)], seed=8)
        add_disk(data, "web", data / "images" / "web.img")
        copy, mnt = tmp_path / "pg.mirn", tmp_path / "mnt"
        gave_back = r"frame store \S+ gave back [^;]+ to a restore that found its filesystem full"

        def index_both() -> None:
            """Reads through a mount: their index passes keep both disks' frames (64 MiB)."""
            mount = mounts(mnt, data)
            shutil.copyfile(mnt / "pg.mirn", copy)
            shutil.copyfile(mnt / "web.mirn", os.devnull)
            mount.stop()
            assert frame_store_bytes(data) > 64 << 20

        index_both()
        leave_free(data, 24 << 20)  # 40 MiB of data to restore: it fits only with the frames' space
        done = run_mirenfs("restore", str(copy), "--name", "pg2", "--data-path", str(data), timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert re.search(gave_back, done.stderr.decode()), done.stderr
        assert frame_store_bytes(data) < 16 << 20
        assert sha256_file(Path(disks(data)["pg2"]["image_path"])) == original

        assert run_mirenfs("disk", "remove", "pg2", "--data-path", str(data)).returncode == 0
        (data / "filler").unlink()
        index_both()  # the frames again, compressed anew
        leave_free(data, 0)  # to the last block: the new disk's record finds no room either
        mount = mounts(mnt, data, expect_log=[gave_back])
        done = subprocess.run(
            ["cp", str(copy), str(mnt / "restore" / "pg3.mirn")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        assert restore_state(mnt, "pg3.mirn") == "installed: created disk pg3"
        assert re.search(gave_back, mount.log()), mount.log()
        mount.stop()
        assert sha256_file(Path(disks(data)["pg3"]["image_path"])) == original
        assert sha256_file(image) == original


def test_a_nearly_full_data_path_of_1k_blocks_is_said_to_be_full_not_a_bus_error(
    tmp_path: Path, mounts: Mounts
) -> None:
    """SQLite allocates its -shm index one byte per 4 KiB page; on 1 KiB blocks with ~20 KiB left,
    its first write through that mapping was SIGBUS: every command and the mount died (the trial's
    finding). Changes are refused as a full data path; listings still work; the mount lives."""
    backing = tmp_path / "data.ext4"
    with open(backing, "wb") as image:
        image.truncate(64 << 20)
    run(tool("mkfs.ext4"), "-q", "-F", "-b", "1024", backing)
    with loop_filesystem(backing, tmp_path / "data") as mounted:
        data = mounted.mountpoint
        done = run_mirenfs("disk", "create", "a", "--size", "8M", "--data-path", str(data), timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        mnt = tmp_path / "mnt"
        mount = mounts(mnt, data, expect_log=[r"No space left on device|is full"])
        try:
            fill(data)
            os.truncate(data / "filler", os.path.getsize(data / "filler") - (20 << 10))
            os.sync()
            full = (
                f"the data path {data} is full (its filesystem has no space left); "
                + "free space there and try again"
            )
            for command in (["disk", "set-status", "a", "detached"], ["disk", "create", "b", "--size", "1M"]):
                done = run_mirenfs(*command, "--data-path", str(data), timeout=TIMEOUT)
                assert (done.returncode, done.stderr.decode()) == (1, f"mirenfs: error: {full}\n"), command
            listed = run_mirenfs("disk", "list", "--data-path", str(data), timeout=TIMEOUT)
            assert listed.returncode == 0 and b"a " in listed.stdout, listed
            assert sorted(os.listdir(mnt)) == ["a.mirn", "a.mirn.sha256", "restore"]
            assert mount.process.poll() is None
        finally:
            mount.stop()
        assert set(disks(data)) == {"a"}


def test_a_full_data_path_refuses_new_disks_saying_it_is_full_and_creates_nothing(
    tmp_path: Path, mounts: Mounts
) -> None:
    """SQLite says "disk I/O error" when it cannot grow its -wal or make its -shm file: on a full
    data path every change to the store is refused naming the full data path, never the store."""
    backing = tmp_path / "data.ext4"
    make_filesystem(backing, "ext4", 64 << 20)
    snapshot = tmp_path / "b.mirn"
    with loop_filesystem(backing, tmp_path / "data") as mounted:
        data = mounted.mountpoint
        done = run_mirenfs("disk", "create", "b", "--size", "8M", "--data-path", str(data), timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        done = run_mirenfs("backup", "b", "-o", str(snapshot), "--data-path", str(data), timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        full = (
            f"the data path {data} is full (its filesystem has no space left); free space there and try again"
        )
        mnt = tmp_path / "mnt"
        mount = mounts(mnt, data, expect_log=[r"No space left on device", FAILED_RESTORE + re.escape(full)])
        try:
            fill(data)
            before = store_state(data)
            copied = subprocess.run(
                ["cp", str(snapshot), str(mnt / "restore" / "newb.mirn")],
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert copied.returncode != 0 and "No space left on device" in copied.stderr, copied
            assert restore_state(mnt, "newb.mirn") == f"failed: {full}; disk newb was not created"
            for command, outcome in (
                (["restore", str(snapshot), "--name", "newc"], "; disk newc was not created"),  # as cp's
                (["disk", "create", "newd", "--size", "1M"], ""),
            ):
                done = run_mirenfs(*command, "--data-path", str(data), timeout=TIMEOUT)
                said = f"mirenfs: error: {full}{outcome}\n"
                assert (done.returncode, done.stderr.decode()) == (1, said), command
            assert store_state(data) == before  # nothing half-done: no disk, no file, no directory
            assert set(disks(data)) == {"b"} and staging_files(data) == []
        finally:
            mount.stop()


def test_a_restore_or_backup_onto_a_full_filesystem_names_the_file_and_leaves_the_target_as_it_was(
    tmp_path: Path, mounts: Mounts
) -> None:
    """A snapshot larger than the room left: cp into restore/, CLI restore (--name, --image) and
    backup -o each say which file could not be written, that its filesystem is full, and what
    became of the target, which is exactly as it was (no disk created, no staging file left)."""
    big_image, big = tmp_path / "big.img", tmp_path / "big.mirn"
    write_image(big_image, [("data", 40 << 20)], seed=3)
    done = run_mirenfs("backup", "--image", str(big_image), "--filesystem", "ext4", "-o", str(big))
    assert done.returncode == 0, done.stderr
    backing = tmp_path / "data.ext4"
    make_filesystem(backing, "ext4", 32 << 20)
    with loop_filesystem(backing, tmp_path / "data") as mounted:
        data = mounted.mountpoint
        done = run_mirenfs("disk", "create", "pg", "--size", "4M", "--data-path", str(data), timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        pg_image = Path(disks(data)["pg"]["image_path"])
        pg_before = sha256_file(pg_image)
        (data / "kept.img").write_bytes(b"an image restore --image --force must not replace")
        full = (
            r"its filesystem is full \(writing its staging file \S+\.restore\.tmp\); "
            "free space there and try again"
        )
        mnt = tmp_path / "mnt"
        mount = mounts(
            mnt,
            data,
            "--allow-overwrite",
            expect_log=[FAILED_RESTORE + r"cannot write \S+: its filesystem is full"],
        )
        try:
            before = store_state(data)
            for entry, outcome in (
                ("big.mirn", "disk big was not created"),
                ("pg.mirn", "disk pg is unchanged"),
            ):
                copied = subprocess.run(
                    ["cp", str(big), str(mnt / "restore" / entry)],
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                )
                assert copied.returncode != 0 and "No space left on device" in copied.stderr, copied
                state = restore_state(mnt, entry)
                assert re.fullmatch(rf"failed: cannot write \S+/disk\.img: {full}; {outcome}", state), state
            for args, outcome in (
                (["--name", "big2", "--data-path", str(data)], "disk big2 was not created"),
                (["--name", "pg", "--force", "--data-path", str(data)], "disk pg is unchanged"),
                (["--image", str(data / "new.img")], f"{data / 'new.img'} was not created"),
                (["--image", str(data / "kept.img"), "--force"], f"{data / 'kept.img'} is as it was"),
            ):
                done = run_mirenfs("restore", str(big), *args, timeout=TIMEOUT)
                said = done.stderr.decode()
                assert done.returncode == 1 and said.count("\n") == 1, said
                assert re.fullmatch(
                    rf"mirenfs: error: cannot write \S+\.img: {full}; {re.escape(outcome)}\n", said
                )
            output = data / "out.mirn"
            done = run_mirenfs("backup", "--image", str(big_image), "--filesystem", "ext4", "-o", str(output))
            said = f"cannot write {output}: its filesystem is full; free space there and try again"
            assert (done.returncode, done.stderr.decode()) == (1, f"mirenfs: error: {said}\n")
            assert store_state(data) == before  # no disk, no file (staging, temporary), no directory
            assert set(disks(data)) == {"pg"} and sha256_file(pg_image) == pg_before
            assert staging_files(data) == [] and not output.exists()
        finally:
            mount.stop()


# ---- 7: kill -9 of the daemon during a restore into a new disk ----


@pytest.mark.parametrize("then", ["restart", "restart-and-restore"])
def test_a_daemon_killed_mid_restore_leaves_no_disk_stuck_provisioning(
    tmp_path: Path, data: Path, mounts: Mounts, long_snapshot: tuple[Path, Path, str], then: str
) -> None:
    good, _bad, checksum = long_snapshot
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    fd = os.open(mnt / "restore" / "fresh.mirn", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, good.read_bytes()[: 3 << 20])  # past the header: the disk is being created
        wait_for(lambda: "fresh" in disks(data), "the restore to create disk fresh")
        assert disks(data)["fresh"]["status"] == "provisioning"
        assert mount.process is not None
        mount.process.kill()
        mount.process.wait(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # ENOTCONN: the daemon is gone
    mount.stop()
    assert disks(data)["fresh"]["status"] == "provisioning"  # what the kill left
    restarted = mounts(
        mnt, data, expect_log=[r"removed disk fresh: a restore that was creating it was interrupted"]
    )
    assert "fresh" not in disks(data) and staging_files(data) == []
    assert not any((data / "disk-data" / "volumes").iterdir())
    if then == "restart-and-restore":
        done = subprocess.run(["cp", str(good), str(mnt / "restore" / "fresh.mirn")], timeout=TIMEOUT)
        assert done.returncode == 0
        assert disks(data)["fresh"]["status"] == "provisioned"
        assert sha256_file(str(disks(data)["fresh"]["image_path"])) == checksum
    restarted.stop()


def test_a_daemon_killed_mid_index_pass_restarts_and_serves_the_same_bytes(
    tmp_path: Path, data: Path, mounts: Mounts
) -> None:
    image = tmp_path / "pg.img"
    write_slow_image(image, 96 << 20)  # an index pass of a second or more on two cores
    add_disk(data, "pg", image)
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    assert mount.process is not None
    waiting = subprocess.Popen(
        ["stat", str(mnt / "pg.mirn")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: "index pass for disk pg started" in mount.log(), "the index pass to start")
        mount.process.kill()
        mount.process.wait(timeout=TIMEOUT)
        assert waiting.wait(timeout=TIMEOUT) != 0  # the stat that waited for the pass: ENOTCONN
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(timeout=TIMEOUT)
    mount.stop()
    mounts(mnt, data)
    expected = tmp_path / "expected.mirn"
    done = run_mirenfs("backup", "pg", "-o", str(expected), "--data-path", str(data), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert sha256_file(mnt / "pg.mirn") == sha256_file(expected)
    leftovers = [str(p) for p in (data / "mirenfs").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers


# ---- 9: a read-only data path ----


def test_a_read_only_data_path_is_refused_before_mounting(tmp_path: Path, data: Path) -> None:
    image = tmp_path / "pg.img"
    image.write_bytes(bytes(4096))
    add_disk(data, "pg", image)
    created = run_mirenfs("disk", "create", "web", "--size", "4M", "--data-path", str(data), timeout=TIMEOUT)
    assert created.returncode == 0, created.stderr
    web_image = Path(disks(data)["web"]["image_path"])
    web_before = sha256_file(web_image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = tool("mount")
    run(mount, "--bind", data, data)
    try:
        run(mount, "-o", "remount,bind,ro", data)
        for extra in (["--foreground"], []):
            done = run_mirenfs("mount", str(mnt), "--data-path", str(data), *extra, timeout=TIMEOUT)
            assert done.returncode == 1, done
            assert f"the data path {data} is on a read-only filesystem".encode() in done.stderr, done.stderr
            assert b"Traceback" not in done.stderr
            assert not os.path.ismount(mnt)
        # Reading the store still works there (disk list, status): SQLite cannot make its index file.
        # Commands that only read say nothing about it; those that change something are refused.
        assert list(disks(data)) == ["pg", "web"]
        elsewhere = tmp_path / "pg.mirn"
        for reading in (["disk", "list"], ["disk", "list", "--json"], ["backup", "pg", "-o", str(elsewhere)]):
            done = run_mirenfs(*reading, "--data-path", str(data), timeout=TIMEOUT)
            assert (done.returncode, done.stderr) == (0, b""), (reading, done.stderr)
        remount = f"the data path {data} is on a read-only filesystem; remount it read-write and try again"
        for writing, outcome in (
            (["disk", "set-status", "pg", "attached"], ""),
            (["lease", "acquire", "pg"], ""),
            (["disk", "create", "other", "--size", "1M"], ""),
            (["restore", str(elsewhere), "--name", "other"], "; disk other was not created"),
        ):
            done = run_mirenfs(*writing, "--data-path", str(data), timeout=TIMEOUT)
            said = f"mirenfs: error: {remount}{outcome}\n"
            assert (done.returncode, done.stderr.decode()) == (1, said), writing
        done = run_mirenfs("restore", str(elsewhere), "--name", "web", "--force", "--data-path", str(data))
        assert done.returncode == 1
        assert b"its filesystem is read-only (creating its staging file " in done.stderr, done.stderr
        assert done.stderr.endswith(b"; remount it read-write and try again; disk web is unchanged\n"), (
            done.stderr
        )
        assert {name: disk["status"] for name, disk in disks(data).items()} == {
            "pg": "provisioned",
            "web": "provisioned",
        }
        assert image.read_bytes() == bytes(4096) and sha256_file(web_image) == web_before
    finally:
        subprocess.run([tool("umount"), str(data)], capture_output=True, timeout=TIMEOUT)
    assert not os.path.ismount(data)


# ---- 10, 11, 15: the replaced image let go; empty and truncated copies ----


def test_the_replaced_image_is_not_held_after_the_restore(tmp_path: Path, data: Path, mounts: Mounts) -> None:
    image = tmp_path / "pg.img"
    image.write_bytes(os.urandom(1 << 20))
    add_disk(data, "pg", image)
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data, "--allow-overwrite")
    assert mount.process is not None
    old = (mnt / "pg.mirn").read_bytes()  # the daemon now holds the image for that snapshot
    assert (
        subprocess.run(["cp", str(GO_ODD.path), str(mnt / "restore" / "pg.mirn")], timeout=TIMEOUT).returncode
        == 0
    )
    assert deleted_files_held(mount.process.pid, image) == []
    assert (mnt / "pg.mirn").read_bytes() != old
    assert os.getxattr(mnt / "pg.mirn", "user.mirn.checksum").decode() == GO_ODD.sha256


def test_an_empty_or_truncated_copy_fails_and_creates_nothing(
    tmp_path: Path, data: Path, mounts: Mounts, long_snapshot: tuple[Path, Path, str]
) -> None:
    mnt = tmp_path / "mnt"
    mounts(mnt, data, expect_log=[FAILED_RESTORE])
    empty = subprocess.run(
        ["cp", "/dev/null", str(mnt / "restore" / "x.mirn")], capture_output=True, timeout=TIMEOUT
    )
    assert empty.returncode != 0, empty
    assert restore_state(mnt, "x.mirn").startswith("failed: ")
    assert disks(data) == {}
    # Cut short: under one feed batch (the disk is made and undone within the close) and over it
    # (the disk exists while the data arrives).
    for round_number, source in enumerate([GO_EXT4.path, long_snapshot[0]] * 3):
        half = tmp_path / "half.mirn"
        whole = source.read_bytes()
        half.write_bytes(whole[: len(whole) // 2])
        name = f"cut{round_number}"
        cut = subprocess.run(
            ["cp", str(half), str(mnt / "restore" / f"{name}.mirn")], capture_output=True, timeout=TIMEOUT
        )
        listed = disks(data)  # right after cp returns: the disk it made is gone already
        assert cut.returncode != 0, cut
        assert name not in listed, listed
        assert restore_state(mnt, f"{name}.mirn").startswith("failed: ")
    assert disks(data) == {} and staging_files(data) == []


# ---- 14: a symlinked volume directory ----


def test_a_symlinked_volume_directory_is_refused_by_restore_and_remove(
    tmp_path: Path, data: Path, mounts: Mounts
) -> None:
    done = run_mirenfs("disk", "create", "pg", "--size", "4M", "--data-path", str(data), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    image = Path(str(disks(data)["pg"]["image_path"]))
    outside = tmp_path / "outside"
    shutil.move(image.parent, outside)  # the volume directory now lives outside, reached by a link
    image.parent.symlink_to(outside)
    before = {path.name: sha256_file(path) for path in outside.iterdir()}
    mnt = tmp_path / "mnt"
    mounts(mnt, data, "--allow-overwrite", expect_log=[r"symbolic link"])
    copy = subprocess.run(
        ["cp", str(GO_EXT4.path), str(mnt / "restore" / "pg.mirn")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert copy.returncode != 0 and "Invalid argument" in copy.stderr, copy.stderr
    removed = run_mirenfs("disk", "remove", "pg", "--data-path", str(data), timeout=TIMEOUT)
    assert removed.returncode == 1 and str(image).encode() in removed.stderr and b"None" not in removed.stderr
    assert {path.name: sha256_file(path) for path in outside.iterdir()} == before
    assert disks(data)["pg"]["status"] == "provisioned"


# ---- the fuzz corpus through cp ----


def test_a_sample_of_the_fuzz_corpus_through_cp(tmp_path: Path, data: Path, mounts: Mounts) -> None:
    images = tmp_path / "images"
    images.mkdir()
    image = images / "pg.img"
    old = os.urandom(256 << 10)
    image.write_bytes(old)
    add_disk(data, "pg", image)
    mnt = tmp_path / "mnt"
    mounts(mnt, data, "--allow-overwrite", expect_log=[FAILED_RESTORE])
    oracle = Oracle()
    cases = sample(corpus(SEED), 30, seed=SEED)
    source = tmp_path / "case.mirn"
    problems: list[str] = []
    for n, case in enumerate(cases):
        verdict = oracle(case.data)
        source.write_bytes(case.data)
        name = "pg" if n % 2 == 0 else f"new{n}"
        done = subprocess.run(
            ["cp", str(source), str(mnt / "restore" / f"{name}.mirn")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        listed = disks(data)
        if (done.returncode == 0) != verdict.accepted:
            problems.append(
                f"{case.id}: cp exited {done.returncode} ({done.stderr.strip()}); oracle: {verdict.reason}"
            )
        if verdict.accepted:
            restored = Path(str(listed[name]["image_path"]))
            if sha256_file(restored) != verdict.sha256:
                problems.append(f"{case.id}: the restored image is not the oracle's")
            if name == "pg":
                image.write_bytes(old)  # the next case starts from the old image again
        else:
            if name == "pg" and image.read_bytes() != old:
                problems.append(f"{case.id}: a refused restore changed the image")
            if name != "pg" and name in listed:
                problems.append(f"{case.id}: a refused restore left disk {name} ({listed[name]['status']})")
        if staging_files(data) or staging_files(images):
            problems.append(f"{case.id}: staging files left")
        if "restore" not in os.listdir(mnt):
            problems.append(f"{case.id}: the mount stopped answering")
    assert not problems, "\n".join(problems)
