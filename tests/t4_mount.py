"""Part 1 of the mount, through the kernel: NAME.mirn read with cat, tar, rsync, dd and pread."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mirenfs.cli.mount_cmds import read_status
from mirenfs.cli.mountinfo import mount_at
from mirenfs.errors import MirenfsError
from mirenfs.format.header import decode_header

from support.data import write_image
from support.mounts import wait_for
from support.runners import run_mirenfs


def add_disk(data: Path, name: str, image: Path) -> None:
    result = run_mirenfs(
        "disk", "add", name, "--image", str(image), "--filesystem", "ext4", "--data-path", str(data)
    )
    assert result.returncode == 0, result.stderr


def cli_backup(data: Path, name: str, out: Path) -> bytes:
    result = run_mirenfs("backup", name, "-o", str(out), "--data-path", str(data))
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def index_passes(mountpoint: Path) -> int:
    return int(os.getxattr(mountpoint, "user.mirenfs.index_passes"))


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A data path with two disks spanning several 4 MiB chunks, holes included."""
    data = tmp_path / "data"
    data.mkdir()
    contents = {
        "web": write_image(
            tmp_path / "web.img",
            [("text", 6 << 20), ("hole", 9 << 20), ("data", 1 << 20), ("text", 12345)],
            seed=1,
        ),
        "pg": write_image(
            tmp_path / "pg.img", [("data", 3 << 20), ("zero", 5 << 20), ("text", 700_001)], seed=2
        ),
    }
    for name in contents:
        add_disk(data, name, tmp_path / f"{name}.img")
    return data, contents


def test_snapshot_is_what_backup_writes_and_it_verifies(tmp_path: Path, disks, mounts) -> None:
    data, contents = disks
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)

    listing = subprocess.run(["ls", "-la", str(mnt)], capture_output=True, text=True, timeout=60, check=True)
    sizes = {line.split()[-1]: int(line.split()[4]) for line in listing.stdout.splitlines()[1:]}
    kinds = {line.split()[-1]: line[0] for line in listing.stdout.splitlines()[1:]}
    assert (kinds["."], kinds[".."], kinds["restore"], kinds["web.mirn"]) == ("d", "d", "d", "-")
    inside = subprocess.run(["ls", "-a", str(mnt / "restore")], capture_output=True, text=True, timeout=60)
    assert inside.stdout.split() == [".", ".."]
    first = (mnt / "web.mirn").read_bytes()
    assert sizes["web.mirn"] == len(first) == os.stat(mnt / "web.mirn").st_size
    assert (mnt / "web.mirn").read_bytes() == first
    assert first == cli_backup(data, "web", tmp_path / "cli.mirn")
    assert os.stat(mnt / "web.mirn").st_mtime_ns == os.stat(tmp_path / "web.img").st_mtime_ns

    copy = tmp_path / "copy.mirn"
    copy.write_bytes(first)
    assert run_mirenfs("verify", str(copy)).returncode == 0
    _, header_len = decode_header(first)
    unzstd = subprocess.run(["zstd", "-d", "-c"], input=first[header_len:], capture_output=True, timeout=60)
    assert unzstd.returncode == 0 and unzstd.stdout == contents["web"]

    inodes = {name: os.stat(mnt / name).st_ino for name in ("web.mirn", "web.mirn.sha256")}
    mount.stop()
    mount.start()
    # The same inodes (trial T21 F5: restic and borg read every disk again after a remount).
    assert {name: os.stat(mnt / name).st_ino for name in inodes} == inodes
    assert index_passes(mnt) == 0  # the persisted index answered: the image was not read
    assert (mnt / "web.mirn").read_bytes() == first


def test_hundreds_of_random_preads_match_the_whole(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    mounts(mnt, data)
    whole = cli_backup(data, "web", tmp_path / "web.mirn")
    rng = random.Random(42)
    fd = os.open(mnt / "web.mirn", os.O_RDONLY)
    try:
        for _ in range(300):
            size = rng.choice([1, 2, 511, 4096, 65536, 131072, 1 << 20, 3 << 20, rng.randrange(1, 5 << 20)])
            offset = rng.randrange(0, len(whole) + (1 << 20))
            assert os.pread(fd, size, offset) == whole[offset : offset + size], (offset, size)
    finally:
        os.close(fd)


def test_tar_rsync_sha256sum_and_xattrs(tmp_path: Path, disks, mounts, need_tool) -> None:
    data, contents = disks
    mnt = tmp_path / "mnt"
    mounts(mnt, data)

    archive = tmp_path / "disks.tar"
    tar = subprocess.run(
        [need_tool("tar"), "-cf", str(archive), "-C", str(mnt), "."],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tar.returncode == 0, tar.stderr
    assert "changed as we read it" not in tar.stderr
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(extracted)], check=True, timeout=60)
    for name in contents:
        assert run_mirenfs("verify", str(extracted / f"{name}.mirn")).returncode == 0
    check = subprocess.run(
        [need_tool("sha256sum"), "-c", "web.mirn.sha256", "pg.mirn.sha256"],
        cwd=extracted,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 2

    backups = tmp_path / "backups"
    for round_ in (1, 2):
        rsync = subprocess.run(
            [need_tool("rsync"), "-a", "--stats", f"{mnt}/", f"{backups}/"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rsync.returncode == 0, rsync.stderr
        transferred = next(line for line in rsync.stdout.splitlines() if "regular files transferred" in line)
        assert transferred.split(":")[1].strip() == ("4" if round_ == 1 else "0"), rsync.stdout
    assert (backups / "pg.mirn").read_bytes() == (mnt / "pg.mirn").read_bytes()

    getfattr = subprocess.run(
        [need_tool("getfattr"), "-d", "--absolute-names", str(mnt / "pg.mirn")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    values = dict(line.split("=", 1) for line in getfattr.stdout.splitlines() if "=" in line)
    header, _ = decode_header((mnt / "pg.mirn").read_bytes())
    assert values == {
        "user.mirn.name": '"pg"',
        "user.mirn.size_bytes": f'"{len(contents["pg"])}"',
        "user.mirn.filesystem": '"ext4"',
        "user.mirn.timestamp": f'"{header.timestamp.rfc3339()}"',
        "user.mirn.checksum": f'"{header.checksum}"',
        "user.mirenfs.consistency": '"offline"',
    }


def test_dd_reads_at_odd_block_sizes(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    mounts(mnt, data)
    whole = cli_backup(data, "pg", tmp_path / "pg.mirn")
    dd = subprocess.run(
        ["dd", f"if={mnt / 'pg.mirn'}", "bs=12345", "skip=7", "count=99", "status=none"],
        capture_output=True,
        timeout=60,
    )
    assert dd.returncode == 0 and dd.stdout == whole[7 * 12345 : 106 * 12345]


def test_corrupt_index_cache_is_rebuilt(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data, expect_log=[r"index cache .*\.idx for .*web\.img is corrupt .*; rebuilding it"])
    expected = (mnt / "web.mirn").read_bytes()
    mount.stop()
    caches = list((data / "mirenfs" / "index").glob("*.idx"))
    assert len(caches) == 1  # only the disk that was read has an index
    raw = bytearray(caches[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    caches[0].write_bytes(bytes(raw))
    mount.start()
    assert (mnt / "web.mirn").read_bytes() == expected
    assert index_passes(mnt) == 1


def test_first_stats_at_once_run_one_index_pass(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    mounts(mnt, data)
    sizes: list[int] = []
    threads = [
        threading.Thread(target=lambda: sizes.append(os.stat(mnt / "web.mirn").st_size)) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(sizes) == 8 and len(set(sizes)) == 1
    assert index_passes(mnt) == 1


def test_concurrent_readers_of_different_disks(tmp_path: Path, disks, mounts) -> None:
    data, contents = disks
    mnt = tmp_path / "mnt"
    mounts(mnt, data)
    expected = {name: cli_backup(data, name, tmp_path / f"{name}.cli") for name in contents}
    results: dict[str, bytes] = {}

    def read(name: str) -> None:
        results[name] = subprocess.run(
            ["cat", str(mnt / f"{name}.mirn")], capture_output=True, timeout=120, check=True
        ).stdout

    threads = [threading.Thread(target=read, args=(name,)) for name in contents for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == expected


def test_changed_image_shows_a_new_snapshot(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    # The old handle may get EIO (below), which the daemon logs.
    mounts(mnt, data, expect_log=[r"the image changed since its snapshot index was built"])
    snapshot = mnt / "pg.mirn"
    old = snapshot.read_bytes()
    old_checksum = os.getxattr(snapshot, "user.mirn.checksum")
    reader = open(snapshot, "rb")  # noqa: SIM115 - an old handle kept across the change
    try:
        head = reader.read(100)
        with open(tmp_path / "pg.img", "r+b") as image:
            image.seek(4 << 20)
            image.write(b"new data in the middle of the zero run")
        os.utime(tmp_path / "pg.img", ns=(1, 1_800_000_000_000_000_000))

        def changed_checksum() -> bytes | None:
            checksum = os.getxattr(snapshot, "user.mirn.checksum")
            return checksum if checksum != old_checksum else None

        new_checksum = wait_for(changed_checksum, what="the new checksum")
        assert os.stat(snapshot).st_mtime_ns == 1_800_000_000_000_000_000
        new = snapshot.read_bytes()
        assert new != old and new_checksum.decode() in new.decode("latin-1")
        copy = tmp_path / "new.mirn"
        copy.write_bytes(new)
        assert run_mirenfs("verify", str(copy)).returncode == 0
        try:  # the old handle: consistent old bytes, or EIO, never a mix
            rest = reader.read()
            assert head + rest == old
        except OSError as exc:
            assert exc.errno == errno.EIO
    finally:
        reader.close()


def test_disks_appear_and_disappear_without_remount(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    mounts(mnt, data)
    write_image(tmp_path / "new.img", [("text", 100_000)])
    add_disk(data, "new", tmp_path / "new.img")
    wait_for(lambda: "new.mirn" in os.listdir(mnt), what="the new disk to appear")
    assert run_mirenfs("disk", "set-status", "new", "deleting", "--data-path", str(data)).returncode == 0
    wait_for(lambda: "new.mirn" not in os.listdir(mnt), what="the deleting disk to disappear")
    assert not (mnt / "new.mirn").exists()
    assert run_mirenfs("disk", "set-status", "new", "provisioned", "--data-path", str(data)).returncode == 0
    wait_for(lambda: (mnt / "new.mirn").exists(), what="the disk to come back")
    assert run_mirenfs("disk", "remove", "new", "--data-path", str(data)).returncode == 0
    wait_for(lambda: "new.mirn.sha256" not in os.listdir(mnt), what="the removed disk to disappear")


def test_snapshots_cannot_be_changed(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    mounts(mnt, data, expect_log=[r"(new-file|web\.mirn): the mount's root holds only the disks' snapshots"])
    snapshot = mnt / "web.mirn"
    before = snapshot.read_bytes()
    for action, expected in [
        (lambda: os.open(snapshot, os.O_RDWR), errno.EROFS),
        (lambda: os.open(snapshot, os.O_WRONLY | os.O_APPEND), errno.EROFS),
        (lambda: os.truncate(snapshot, 0), errno.EROFS),
        (lambda: os.unlink(snapshot), errno.EPERM),
        (lambda: os.rename(snapshot, mnt / "other.mirn"), errno.EPERM),
        (lambda: os.chmod(snapshot, 0o666), errno.EPERM),
        (lambda: os.open(mnt / "new-file", os.O_WRONLY | os.O_CREAT, 0o644), errno.EROFS),
    ]:
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == expected
    assert snapshot.read_bytes() == before
    assert os.stat(snapshot).st_mode & 0o777 == 0o444


def test_unmount_leaves_no_process_behind(tmp_path: Path, disks, mounts) -> None:
    data, _ = disks
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    (mnt / "web.mirn").read_bytes()
    pid = mount.process.pid
    assert mount.stop() == 0
    assert not os.path.ismount(mnt)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_status_of_a_stopped_daemon_gives_up_with_one_line_then_answers_again(
    tmp_path: Path, disks, mounts
) -> None:
    """A request the daemon never answers keeps its caller in the kernel (even SIGKILL waits):
    ``mirenfs status`` asks from a child it can leave behind, and says what is wrong."""
    data, _ = disks
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    entry = mount_at(str(mnt))
    os.kill(mount.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(
            MirenfsError, match=f"the mirenfs mount at {mnt} does not answer within 1 s: its daemon"
        ):
            read_status(entry, timeout_s=1.0)
    finally:
        os.kill(mount.process.pid, signal.SIGCONT)
    assert "disks" in read_status(entry)


def test_status_of_a_stopped_daemon_ends_when_named_and_when_its_output_is_piped(
    tmp_path: Path, disks, mounts
) -> None:
    """``mirenfs status MNT`` once stat'ed the mount point itself (waiting in the kernel for ever),
    and the child left behind held the command's stdout, so ``status | cat`` waited as long."""
    data, _ = disks
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    os.kill(mount.process.pid, signal.SIGSTOP)
    # Should the command hang all the same, the daemon is resumed after a while: the test then
    # fails on its output instead of hanging with it.
    resume = threading.Timer(25, os.kill, (mount.process.pid, signal.SIGCONT))
    resume.start()
    try:
        for args in (["status", str(mnt)], ["status"]):
            done = run_mirenfs(*args, "--timeout", "1", timeout=60)  # stdout and stderr are pipes
            assert done.returncode == 1, done
            assert f"the mirenfs mount at {mnt} does not answer within 1 s" in done.stderr.decode()
            assert resume.is_alive(), f"{args} ended only once the daemon was resumed"
    finally:
        resume.cancel()
        os.kill(mount.process.pid, signal.SIGCONT)
    assert run_mirenfs("status", str(mnt), timeout=60).returncode == 0


def test_a_mount_over_a_stopped_daemon_is_refused_without_waiting_for_it(
    tmp_path: Path, disks, mounts
) -> None:
    """``mirenfs mount`` once stat'ed its mount point first, which over a stopped daemon waits in
    the kernel for ever: on the mount point itself and on a directory in it, it now says so."""
    data, _ = disks
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    os.kill(mount.process.pid, signal.SIGSTOP)
    resume = threading.Timer(25, os.kill, (mount.process.pid, signal.SIGCONT))  # a hang fails, ends
    resume.start()
    try:
        for where in (mnt, mnt / "restore"):
            done = run_mirenfs("mount", str(where), "--data-path", str(data), timeout=60)
            assert done.returncode == 1, done
            assert f"the mirenfs mount at {mnt} does not answer within 5 s: its daemon is stopped" in (
                done.stderr.decode()
            )
            assert resume.is_alive(), f"mount on {where} ended only once the daemon was resumed"
    finally:
        resume.cancel()
        os.kill(mount.process.pid, signal.SIGCONT)
    again = run_mirenfs("mount", str(mnt), "--data-path", str(data), timeout=60)  # it answers now
    assert again.returncode == 1
    assert f"{mnt} is already a mirenfs mount; unmount it first" in again.stderr.decode()


def test_a_mount_whose_disks_have_no_images_there_says_so_at_start(tmp_path: Path, mounts) -> None:
    """A mistyped data path on a fleet (or a node name two hosts share) showed this host's disks
    without images, silently; a restore into one then wrote an image there and changed its
    record. The start names them (here: an image gone from a one-host data path)."""
    data = tmp_path / "data"
    for name in ("a", "b"):
        assert run_mirenfs("disk", "create", name, "--size", "1M", "--data-path", str(data)).returncode == 0
    listed = json.loads(run_mirenfs("disk", "list", "--json", "--data-path", str(data)).stdout)
    Path(next(disk["image_path"] for disk in listed if disk["name"] == "b")).unlink()
    said = (
        f"1 of this host's disks has no image under the data path {data} (b): if the data path (or the "
        "node name) is wrong, stop this mount, since a restore into one of them would write its image "
        "here and change its record"
    )
    mount = mounts(tmp_path / "mnt", data, expect_log=[re.escape(said)])
    assert f"WARNING: {said}" in mount.log()


def test_cleanup_unmounts_a_dead_mount_of_its_data_path_and_leaves_a_live_one(
    tmp_path: Path, disks, mounts
) -> None:
    """After a ``kill -9`` of the mount, ``cleanup`` said "nothing to clean up" beside a mount
    point answering ENOTCONN; only the unit's ``ExecStopPost=`` took it away."""
    data, _ = disks
    live = mounts(tmp_path / "live", data)
    dead = mounts(tmp_path / "dead", data, expect_log=[r"another mirenfs mount already serves data path"])
    os.kill(dead.process.pid, signal.SIGKILL)
    dead.process.wait(timeout=30)

    def refused_as_dead() -> bool:
        try:
            os.stat(dead.mountpoint / "restore")
        except OSError as exc:
            return exc.errno == errno.ENOTCONN
        return False

    wait_for(refused_as_dead, "the killed mount to answer ENOTCONN")
    done = run_mirenfs("cleanup", "--data-path", str(data), timeout=60)
    assert done.returncode == 0, done.stderr
    assert (
        f"unmounted the dead mirenfs mount at {dead.mountpoint} (its daemon was killed)"
        in done.stdout.decode()
    )
    assert not os.path.ismount(dead.mountpoint) and os.path.ismount(live.mountpoint)
    assert "restore" in os.listdir(live.mountpoint)


def test_other_disks_stay_readable_during_an_index_pass(tmp_path: Path, disks, mounts) -> None:
    """The index pass runs on worker threads: the event loop keeps answering other disks."""
    data, _ = disks
    big = tmp_path / "big.img"
    with open(big, "wb") as f:  # ~400 MB of compressible, non-repeating text: a pass of a second or more
        block = bytearray(random.Random(9).choices(b"abcdefgh ", k=1 << 20))
        for i in range(400):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
    add_disk(data, "big", big)
    mnt = tmp_path / "mnt"
    mounts(mnt, data)
    expected = (mnt / "pg.mirn").read_bytes()  # indexed before the big pass starts

    def building() -> bool:
        status = json.loads(os.getxattr(mnt, "user.mirenfs.status"))
        return status["disks"].get("big", {}).get("index") == "building"

    stat_big = threading.Thread(target=os.stat, args=(mnt / "big.mirn",))
    stat_big.start()
    try:
        wait_for(building, what="the big disk's index pass to start")
        assert (mnt / "pg.mirn").read_bytes() == expected
        assert building(), "the big pass ended before the other disk was read: make it bigger"
        assert os.stat(mnt / "web.mirn").st_size > 0  # a new disk's first pass need not wait for it
    finally:
        stat_big.join(timeout=120)
    assert index_passes(mnt) == 3


def test_a_session_libfuse_ends_at_init_is_a_failed_mount(tmp_path: Path) -> None:
    """Past mirenfs's own refusal (-o max_read is refused before mounting), a session that
    libfuse ends at the kernel's INIT must fail the mount, not end it with exit status 0."""
    data, mountpoint = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mountpoint.mkdir()
    script = (
        "import sys\n"
        "from mirenfs.cli.mount_cmds import serve_mount\n"
        "from mirenfs.engine.aio import meaningful_error\n"
        "from mirenfs.mount.config import MountConfig\n"
        f"config = MountConfig({str(mountpoint)!r}, {str(data)!r})\n"
        "config.fuse_options.append('max_read=4096')  # libfuse accepts it, then ends the session\n"
        "try:\n"
        "    serve_mount(config)\n"
        "except BaseException as exc:\n"
        "    sys.exit(f'failed: {meaningful_error(exc)}')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    # The session's end is seen either by the main loop or first by the stat that checks readiness
    # (which then names its error): either way one line says what happened.
    said = re.escape(f"failed: FUSE ended the session at {mountpoint} as it started") + r"( \([^)]*\))?; "
    said += re.escape("its own message, if any, is above (an -o option it cannot honour?)")
    assert re.search(said + "$", result.stderr.strip()), result.stderr
    assert not os.path.ismount(mountpoint)
