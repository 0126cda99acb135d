"""Point-in-time snapshots of disks in use (issue 12), through the kernel.

A disk made with ``disk create``, attached with ``losetup --direct-io=on``,
its ext4 mounted (here, or in a mount namespace of its own) and marked
``attached``, while a writer appends fsynced records to it: its snapshot is
a reflink taken under a freeze on an XFS or btrfs data path, a budgeted
sparse copy under freeze (or a refusal) on an ext4 one, crash-consistent
without a mounted filesystem, and the moving image only when asked. Every
freeze is thawed: by the daemon, by its watchdog when the daemon stalls or is
killed, and at the next start when both were killed.

Root, loop devices, xfsprogs, btrfs-progs and e2fsprogs are required (the
tier fails rather than skips without them). Everything is taken down in
``finally`` blocks: writers, mirenfs mounts, disk filesystems, data paths,
loop devices, and any filesystem a failure left frozen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirenfs.disks.pointintime import RECORD_PREFIX

from support.loopfs import (
    LoopFilesystem,
    loop_filesystem,
    make_filesystem,
    record_writer,
    run,
    thaw,
    tool,
)
from support.mounts import Mount, pid_alive, wait_for
from support.records import RecordCheck, check_records
from support.runners import MIRENFS, hold_frozen_in_daemons, ok, refused, run_cli, stop_holding_frozen
from support.store import disks
from support.vectors import GO_ODD

CONSISTENCY = "user.mirenfs.consistency"
STATUS = "user.mirenfs.status"
DATA_FS_SIZE = 512 << 20  # sparse; mkfs.xfs wants at least 300 MiB
STALL_LIMIT_S = 0.8  # the writer's longest append while snapshots are taken: "well under a second",
# with room for a busy 2-core machine (measured: 26-129 ms when quiet)

Mounts = Callable[..., Mount]


@dataclass
class InUse:
    """A data path holding disk ``pg``, whose image is loop-attached and whose ext4 is mounted."""

    data: Path
    image: Path
    disk: LoopFilesystem | None  # None: attached raw, nothing mounted


@contextlib.contextmanager
def data_path_on(fstype: str, tmp_path: Path) -> Iterator[Path]:
    """A data path on a loop-mounted XFS or btrfs, or, for ext4, on this host's own /tmp."""
    if fstype == "ext4":
        yield tmp_path / "miren"
        return
    backing = tmp_path / f"data-{fstype}.img"
    make_filesystem(backing, fstype, DATA_FS_SIZE)
    with loop_filesystem(backing, tmp_path / "data-fs") as mounted:
        yield mounted.mountpoint / "miren"


@contextlib.contextmanager
def disk_in_use(
    tmp_path: Path, data_fs: str, *, mounted: bool = True, namespace: bool = False
) -> Iterator[InUse]:
    """Disk ``pg`` (64 MiB, ext4) attached as Miren attaches it: direct I/O loop device, status
    ``attached``, its filesystem mounted at ``tmp_path/pg`` unless ``mounted`` is False."""
    with data_path_on(data_fs, tmp_path) as data:
        ok("disk", "create", "pg", "--size", "64M", "--filesystem", "ext4", "--data-path", data)
        image = Path(disks(data)["pg"]["image_path"])
        ok("disk", "set-status", "pg", "attached", "--data-path", data)
        if not mounted:
            with contextlib.ExitStack() as stack:
                device = run(tool("losetup"), "-f", "--show", "--direct-io=on", image).stdout.strip()
                stack.callback(run, tool("losetup"), "-d", device)
                yield InUse(data, image, None)
            return
        with loop_filesystem(image, tmp_path / "pg", direct_io=True, namespace=namespace) as disk:
            yield InUse(data, image, disk)


@contextlib.contextmanager
def mirenfs(
    mounts: Mounts, tmp_path: Path, data: Path, *options: str, expect: tuple[str, ...] = ()
) -> Iterator[Mount]:
    """A mirenfs mount of ``data`` at ``tmp_path/mnt``, stopped before the data path goes away."""
    mount = mounts(tmp_path / "mnt", data, *(["-o", ",".join(options)] if options else []), expect_log=expect)
    try:
        yield mount
    finally:
        mount.stop()


def copy_out(source: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cp", str(source), str(target)], capture_output=True, text=True, timeout=120)


def status(mount: Mount) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(os.getxattr(mount.mountpoint, STATUS))
    return result


def restored_records(snapshot: Path, tmp_path: Path, *, clean: bool) -> RecordCheck:
    """Verify the snapshot, restore it into an image, check its ext4 and read the records file back.

    ``clean``: e2fsck must find nothing (a frozen copy); otherwise only the records are checked.
    """
    ok("verify", snapshot)
    restored = tmp_path / f"{snapshot.stem}-restored.img"
    ok("restore", snapshot, "--image", restored)
    fsck = subprocess.run(
        [tool("e2fsck"), "-fn", str(restored)], capture_output=True, text=True, timeout=120, check=False
    )
    if clean:
        assert fsck.returncode == 0, f"e2fsck -fn of the restored copy: {fsck.stdout}{fsck.stderr}"
    dumped = subprocess.run(
        [tool("debugfs"), "-R", "cat /records", str(restored)], capture_output=True, timeout=120, check=False
    )
    assert dumped.returncode == 0, dumped.stderr
    restored.unlink()
    return check_records(dumped.stdout, torn_tail_allowed=not clean)


def copies_held(pid: int, clone_directory: Path) -> list[str]:
    """The point-in-time copies the mount daemon holds open (anonymous files in the clone directory)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(f"{clone_directory}/"):
                held.append(target)
    return held


def daemon_pid(mount: Mount) -> int:
    assert mount.process is not None
    return mount.process.pid


def report(line: str) -> None:
    """Figures the issue asks for (freeze times, writer stalls): shown with ``pytest -s``."""
    print(f"\n[point-in-time] {line}", file=sys.stderr)


# ---- the frozen reflink: XFS and btrfs data paths -----------------------------------------------


@pytest.mark.parametrize("data_fs", ["xfs", "btrfs"])
def test_a_disk_in_use_is_snapshotted_under_freeze_while_its_writer_keeps_writing(
    mounts: Mounts, tmp_path: Path, data_fs: str
) -> None:
    with disk_in_use(tmp_path, data_fs) as disk:
        assert disk.disk is not None
        with (
            record_writer(disk.disk, tmp_path / "writer.json") as writer,
            mirenfs(mounts, tmp_path, disk.data) as mount,
        ):
            snapshot = mount.mountpoint / "pg.mirn"
            writer.wait_for_records(50)
            before = writer.written()
            first = copy_out(snapshot, tmp_path / "first.mirn")
            assert first.returncode == 0, first.stderr
            assert os.getxattr(snapshot, CONSISTENCY) == b"frozen"
            state = status(mount)["disks"]["pg"]
            assert state["consistency"] == "frozen" and 0 < state["frozen_ms"] < 1000, state
            writer.wait_for_records(before + 50)
            again = copy_out(snapshot, tmp_path / "again.mirn")  # the writer never makes a read fail
            assert again.returncode == 0, again.stderr
            cli = run_cli("backup", "pg", "-o", tmp_path / "cli.mirn", "--data-path", disk.data)
            assert cli.code == 0, cli.err
            assert (
                "snapshot taken frozen (reflink under freeze of the ext4 filesystem on /dev/loop" in cli.err
            )
            summary = writer.stop()
            frozen_ms = state["frozen_ms"]
            report(
                f"{data_fs} data path: freeze {frozen_ms} ms; writer's longest append+fsync "
                f"{summary['longest_stall_s'] * 1000:.1f} ms over {summary['records']} records"
            )
            assert summary["longest_stall_s"] < STALL_LIMIT_S, summary
            assert "snapshot of disk pg taken frozen (reflink under freeze of" in mount.log()

            for copy in ("first", "cli"):
                check = restored_records(tmp_path / f"{copy}.mirn", tmp_path, clean=True)
                assert check.problem is None, check.problem
                assert check.records >= before, (copy, check.records, before)
            assert copies_held(daemon_pid(mount), disk.data / "mirenfs" / "clones"), "read from its copy"


def test_a_superseded_copy_is_removed_and_a_detached_disk_is_offline(mounts: Mounts, tmp_path: Path) -> None:
    with disk_in_use(tmp_path, "xfs") as disk:
        assert disk.disk is not None
        with mirenfs(mounts, tmp_path, disk.data) as mount:
            snapshot = mount.mountpoint / "pg.mirn"
            assert os.getxattr(snapshot, CONSISTENCY) == b"frozen"
            clones = disk.data / "mirenfs" / "clones"
            pid = daemon_pid(mount)
            assert len(copies_held(pid, clones)) == 1
            disk.disk.take_down()  # Miren detaches the disk
            ok("disk", "set-status", "pg", "detached", "--data-path", disk.data)
            # The mount's view of the store is at most CATALOG_TTL_S old: poll, with a deadline.
            wait_for(lambda: os.getxattr(snapshot, CONSISTENCY) == b"offline", "the disk to show offline")
            wait_for(lambda: not copies_held(pid, clones), "the superseded copy to be closed")
            assert os.listdir(clones) == []


# ---- other ways in: a container's namespace, a raw loop device ---------------------------------


def test_a_filesystem_mounted_in_another_mount_namespace_is_found_and_frozen(
    mounts: Mounts, tmp_path: Path
) -> None:
    with disk_in_use(tmp_path, "xfs", namespace=True) as disk:
        assert disk.disk is not None and disk.disk.holder is not None
        assert not os.path.ismount(disk.disk.mountpoint), "mounted only inside the other namespace"
        with (
            record_writer(disk.disk, tmp_path / "writer.json") as writer,
            mirenfs(mounts, tmp_path, disk.data) as mount,
        ):
            writer.wait_for_records(30)
            before = writer.written()
            done = copy_out(mount.mountpoint / "pg.mirn", tmp_path / "pg.mirn")
            assert done.returncode == 0, done.stderr
            assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"frozen"
            assert f"as pid {disk.disk.holder.pid} sees it" in mount.log()
            summary = writer.stop()
        assert summary["longest_stall_s"] < STALL_LIMIT_S, summary
        check = restored_records(tmp_path / "pg.mirn", tmp_path, clean=True)
        assert check.problem is None and check.records >= before


def test_a_restore_over_a_disk_whose_filesystem_is_mounted_says_to_unmount_it_first(tmp_path: Path) -> None:
    """``losetup -d`` of a device a filesystem is mounted from only marks it to go once unmounted:
    the refusal names the mount to take down first. Nothing changes."""
    with disk_in_use(tmp_path, "ext4") as disk:
        assert disk.disk is not None
        before = hashlib.sha256(disk.image.read_bytes()).hexdigest()
        device = disk.disk.device
        ok(
            "disk", "set-status", "pg", "detached", "--data-path", disk.data
        )  # the store says so; the device stays
        error = refused(
            "disk pg is in use", "restore", GO_ODD.path, "--name", "pg", "--force", "--data-path", disk.data
        )
        assert (
            f"backs {device}; unmount the ext4 filesystem on {device}, mounted at {disk.disk.mountpoint}, "
            f"then detach it (`losetup -d {device}`) before restoring"
        ) in error
        assert hashlib.sha256(disk.image.read_bytes()).hexdigest() == before
        assert not list(disk.image.parent.glob("*.restore.tmp"))


def test_a_loop_device_used_raw_gives_a_crash_consistent_reflink(mounts: Mounts, tmp_path: Path) -> None:
    with disk_in_use(tmp_path, "xfs", mounted=False) as disk, mirenfs(mounts, tmp_path, disk.data) as mount:
        done = copy_out(mount.mountpoint / "pg.mirn", tmp_path / "pg.mirn")
        assert done.returncode == 0, done.stderr
        assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"crash-consistent"
        assert "no mounted filesystem was found on its loop devices" in mount.log()
    ok("verify", tmp_path / "pg.mirn")


def test_a_loop_device_attached_after_an_offline_read_gives_a_copy(mounts: Mounts, tmp_path: Path) -> None:
    """Trial T21 F8: `losetup` of a disk already read offline left it ``offline`` (its image had
    not changed yet), so its next backup read the image a write could change under it."""
    with data_path_on("xfs", tmp_path) as data:
        ok("disk", "create", "pg", "--size", "64M", "--filesystem", "ext4", "--data-path", data)
        image = Path(disks(data)["pg"]["image_path"])
        with mirenfs(mounts, tmp_path, data) as mount:
            snapshot = mount.mountpoint / "pg.mirn"
            assert os.getxattr(snapshot, CONSISTENCY) == b"offline"
            done = copy_out(snapshot, tmp_path / "offline.mirn")
            assert done.returncode == 0, done.stderr
            with contextlib.ExitStack() as stack:
                device = run(tool("losetup"), "-f", "--show", image).stdout.strip()
                stack.callback(run, tool("losetup"), "-d", device)
                # The loop devices are looked at once a second at most (one look serves `ls -l`).
                wait_for(lambda: os.getxattr(snapshot, CONSISTENCY) == b"crash-consistent", "a copy", 5.0)
                done = copy_out(snapshot, tmp_path / "copy.mirn")
                assert done.returncode == 0, done.stderr
    # Nothing wrote to the image: its copy's snapshot is the same file.
    assert (tmp_path / "copy.mirn").read_bytes() == (tmp_path / "offline.mirn").read_bytes()
    ok("verify", tmp_path / "copy.mirn")


# ---- ext4 data paths: a budgeted sparse copy under freeze, or a refusal ------------------------


def test_an_ext4_data_path_copies_under_freeze_within_the_budget(mounts: Mounts, tmp_path: Path) -> None:
    with disk_in_use(tmp_path, "ext4") as disk:
        assert disk.disk is not None
        with (
            record_writer(disk.disk, tmp_path / "writer.json") as writer,
            mirenfs(mounts, tmp_path, disk.data) as mount,
        ):
            writer.wait_for_records(30)
            before = writer.written()
            done = copy_out(mount.mountpoint / "pg.mirn", tmp_path / "pg.mirn")
            assert done.returncode == 0, done.stderr
            assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"frozen"
            state = status(mount)["disks"]["pg"]
            summary = writer.stop()
        report(
            f"ext4 data path, sparse copy: freeze {state['frozen_ms']} ms; writer's longest append+fsync "
            f"{summary['longest_stall_s'] * 1000:.1f} ms"
        )
        assert "sparse copy under freeze of" in mount.log()
        check = restored_records(tmp_path / "pg.mirn", tmp_path, clean=True)
        assert check.problem is None and check.records >= before


def test_an_ext4_data_path_over_the_budget_refuses_unless_live_reads_are_allowed(
    mounts: Mounts, tmp_path: Path
) -> None:
    refusal = r"disk pg is in use and no point-in-time copy of it can be taken: .* freeze budget of 0\.001 s"
    with disk_in_use(tmp_path, "ext4") as disk:
        with mirenfs(mounts, tmp_path, disk.data, "freeze_budget=0.001", expect=(refusal,)) as mount:
            done = copy_out(mount.mountpoint / "pg.mirn", tmp_path / "pg.mirn")
            assert done.returncode != 0 and "Device or resource busy" in done.stderr, done.stderr
            again = copy_out(mount.mountpoint / "pg.mirn", tmp_path / "pg.mirn")
            assert again.returncode != 0 and "Device or resource busy" in again.stderr
            state = status(mount)["disks"]["pg"]
            assert state["index"] == "refused" and "mount -o live_reads" in state["reason"], state
        assert sum("over the freeze budget" in line for line in mount.log().splitlines()) == 1, "one line"

        live = (
            r"disk pg is in use \(/dev/loop\d+ is backed by its image\) and is read from its moving image, as"
        )
        with mirenfs(
            mounts, tmp_path, disk.data, "freeze_budget=0.001", "live_reads", expect=(live,)
        ) as mount:
            assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"live"

        refused = run_cli(
            "backup", "pg", "-o", tmp_path / "x.mirn", "--freeze-budget", "0.001", "--data-path", disk.data
        )
        assert refused.code == 1 and "over the freeze budget of 0.001 s" in refused.err, refused.err
        assert not (tmp_path / "x.mirn").exists()
        # Freezing switched off: the fix offered is a budget, not another filesystem for the disk.
        off = run_cli(
            "backup", "pg", "-o", tmp_path / "x.mirn", "--freeze-budget", "0", "--data-path", disk.data
        )
        assert off.code == 1 and "freezing is off (freeze budget 0)" in off.err, off.err
        assert "allow a freeze (-o freeze_budget=SECONDS, backup --freeze-budget SECONDS)" in off.err
        assert "mount the disk's filesystem where" not in off.err and not (tmp_path / "x.mirn").exists()
        allowed = run_cli(
            "backup",
            "pg",
            "-o",
            tmp_path / "x.mirn",
            "--freeze-budget",
            "0.001",
            "--live",
            "--data-path",
            disk.data,
        )
        assert allowed.code == 0 and "mirenfs: warning: disk pg is in use" in allowed.err, allowed.err
    assert os.listdir(disk.data / "mirenfs" / "clones") == []


# ---- every freeze is thawed ----------------------------------------------------------------------


def blocked_write(path: Path, *, longer_than: float = 2.0) -> subprocess.Popen[bytes]:
    """A write under ``path`` that the frozen filesystem holds; waits until the freeze is on.

    Each probe that finishes within ``longer_than`` seconds was written before the freeze
    began; the one that does not is returned, still blocked (it finishes once the filesystem
    thaws). Long enough that a probe slowed by a busy machine (CI runs two workers) is not taken
    for a frozen one, short enough to see a freeze that lasts longer.
    """
    code = "import os,sys; f=open(sys.argv[1],'ab'); f.write(b'x'); os.fsync(f.fileno())"

    blocked: list[subprocess.Popen[bytes]] = []

    def probe() -> bool:
        process = subprocess.Popen([sys.executable, "-c", code, str(path / "probe")])
        try:
            process.wait(timeout=longer_than)
        except subprocess.TimeoutExpired:
            blocked.append(process)
            return True
        return False

    wait_for(probe, "the disk's filesystem to be frozen", interval=0)
    return blocked[0]


def finishes(process: subprocess.Popen[bytes], within: float) -> bool:
    try:
        return process.wait(timeout=within) == 0
    except subprocess.TimeoutExpired:
        return False


def watchdog_pids(daemon: int) -> list[int]:
    """The thaw watchdogs ``daemon`` started (not another test's, run alongside)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if (
                    parent == daemon
                    and b"mirenfs thaw watchdog" in Path(f"/proc/{entry}/cmdline").read_bytes()
                ):
                    found.append(int(entry))
    return found


@contextlib.contextmanager
def reading_in_background(snapshot: Path) -> Iterator[subprocess.Popen[bytes]]:
    reader = subprocess.Popen(["cat", str(snapshot)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield reader
    finally:
        reader.kill()
        reader.wait(timeout=30)


def test_a_daemon_killed_while_frozen_leaves_the_filesystem_writable(
    mounts: Mounts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog thaws and removes the freeze record: the next start must not thaw a freeze
    someone else made since, on the strength of a record whose freeze is over."""
    busy = r"disk pg: cannot freeze .*: it is already frozen by someone else; its copy is crash-consistent"
    with disk_in_use(tmp_path, "xfs") as disk:
        assert disk.disk is not None
        clones = disk.data / "mirenfs" / "clones"

        def records() -> list[str]:
            return [name for name in os.listdir(clones) if name.startswith(RECORD_PREFIX)]

        hold_frozen_in_daemons(monkeypatch, 60)  # the daemon stays inside the freeze until killed
        thawed = r"thaw watchdog: mirenfs \(pid \d+\) ended while the filesystem was frozen; thawed the"
        with mirenfs(mounts, tmp_path, disk.data, expect=(thawed,)) as mount:
            stop_holding_frozen(monkeypatch)
            with reading_in_background(mount.mountpoint / "pg.mirn"):
                held = blocked_write(disk.disk.path)
                assert records(), "the freeze is recorded while it lasts"
                assert all(stat.S_IMODE((clones / name).stat().st_mode) == 0o600 for name in records())
                killed = daemon_pid(mount)
                os.kill(killed, signal.SIGKILL)
                assert finishes(held, 5), "the watchdog thaws the filesystem when the daemon dies"
                assert finishes(subprocess.Popen(["touch", str(disk.disk.path / "after")]), 5)
                said = (
                    f"WARNING: mirenfs thaw watchdog: mirenfs (pid {killed}) ended while the filesystem was "
                    f"frozen; thawed the filesystem mounted at {disk.disk.mountpoint}"
                )
                wait_for(lambda: said in mount.log(), "the watchdog's line in the mount's log")
                line = next(line for line in mount.log().splitlines() if said in line)
                assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} mirenfs\[\d+\]: WARNING: ", line), line
                wait_for(lambda: records() == [], "the watchdog to remove the freeze record")
        (clones / "pg.1.deadbeef.clone").write_bytes(b"left by a crash")
        run(tool("fsfreeze"), "--freeze", disk.disk.mountpoint)  # an administrator's freeze, made since
        try:
            with mirenfs(mounts, tmp_path, disk.data, expect=(busy,)) as mount:  # the next start sweeps
                assert os.listdir(clones) == []
                assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"crash-consistent"
        finally:
            assert thaw(disk.disk.path), "the next start left the administrator's freeze alone"


def test_the_watchdog_thaws_a_freeze_that_outlives_its_budget(
    mounts: Mounts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lifted = r"the freeze of .* was lifted before the reflink finished"
    watchdog = (
        r"mirenfs thaw watchdog: the freeze outlived its limit of 0\.7 s; thawed the filesystem mounted at"
    )
    with disk_in_use(tmp_path, "xfs") as disk:
        assert disk.disk is not None
        hold_frozen_in_daemons(monkeypatch, 2)  # the daemon "stalls" 2 s inside a freeze budgeted 0.2 s
        with mirenfs(mounts, tmp_path, disk.data, "freeze_budget=0.2", expect=(lifted, watchdog)) as mount:
            stop_holding_frozen(monkeypatch)
            with reading_in_background(mount.mountpoint / "pg.mirn") as reader:
                held = blocked_write(disk.disk.path, longer_than=0.3)  # the freeze lasts 0.7 s
                # blocked_write saw the freeze 0.3 s or more after it began: the watchdog's 0.7 s is near
                assert finishes(held, 1.0), "thawed by the watchdog (0.7 s), long before the daemon's 2 s"
                assert reader.wait(timeout=30) == 0
            assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"crash-consistent"


def test_a_freeze_held_by_someone_else_is_waited_for_briefly_and_left_alone(
    mounts: Mounts, tmp_path: Path
) -> None:
    busy = r"disk pg: cannot freeze .*: it is already frozen by someone else; its copy is crash-consistent"
    with disk_in_use(tmp_path, "xfs") as disk:
        assert disk.disk is not None
        with mirenfs(mounts, tmp_path, disk.data, expect=(busy,)) as mount:
            run(tool("fsfreeze"), "--freeze", disk.disk.mountpoint)  # an administrator's freeze
            try:
                assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"crash-consistent"
            finally:
                assert thaw(disk.disk.path), "neither mirenfs nor its watchdog thawed someone else's freeze"


@pytest.mark.parametrize("thawer", ["the next start", "mirenfs cleanup"])
def test_a_freeze_left_when_daemon_and_watchdog_are_both_killed_is_thawed(
    mounts: Mounts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thawer: str
) -> None:
    """A cgroup-wide kill takes the watchdog with the mount: the freeze record is what is left,
    read by the next start, or at once by ``mirenfs cleanup`` (the unit's ExecStopPost=)."""
    thawed = r"thawed the ext4 filesystem on /dev/loop\d+, mounted at .*, left frozen by a mirenfs process"
    with disk_in_use(tmp_path, "xfs") as disk:
        assert disk.disk is not None
        hold_frozen_in_daemons(monkeypatch, 60)
        with mirenfs(mounts, tmp_path, disk.data) as mount:
            stop_holding_frozen(monkeypatch)
            with reading_in_background(mount.mountpoint / "pg.mirn"):
                held = blocked_write(disk.disk.path)
                pid = daemon_pid(mount)
                watchdogs = watchdog_pids(pid)
                assert len(watchdogs) == 1
                for victim in (*watchdogs, pid):  # as a kill of the whole cgroup would
                    os.kill(victim, signal.SIGKILL)
                wait_for(lambda: not any(pid_alive(p) for p in (*watchdogs, pid)), "both to be gone")
                assert not finishes(held, 0.5), "nobody is left to thaw it"
        if thawer == "mirenfs cleanup":
            # Root without CAP_SYS_ADMIN (a narrower unit, a container) cannot thaw: it says so,
            # fails, and keeps the freeze record for a run that can.
            weak = subprocess.run(
                [tool("setpriv"), "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", MIRENFS, "cleanup",
                 "--data-path", disk.data], capture_output=True, text=True, timeout=60, check=False
            )  # fmt: skip
            assert weak.returncode == 1 and weak.stdout == "", weak.stdout
            cannot = (
                r"mirenfs: error: cannot thaw the ext4 filesystem on /dev/loop\d+, mounted at .* "
                r"\(Operation not permitted\), left frozen by a mirenfs process that was killed: .*"
                r"its freeze record is kept for the next try\)\n"
            )
            assert re.fullmatch(cannot, weak.stderr), weak.stderr
            assert not finishes(held, 0.5), "still frozen"
            cleaned = ok("cleanup", "--data-path", disk.data)
            assert re.fullmatch(thawed + r" that was killed\n", cleaned.out), cleaned.out
            assert finishes(held, 5), "mirenfs cleanup thaws it from the freeze record"
            again = ok("cleanup", "--data-path", disk.data)
            assert (
                again.out
                == f"nothing to clean up in {disk.data}: no killed mirenfs process left anything behind\n"
            )
        with mirenfs(
            mounts, tmp_path, disk.data, expect=(thawed,) if thawer == "the next start" else ()
        ) as mount:
            assert finishes(held, 5), "the next start thaws it from the freeze record"
            assert os.getxattr(mount.mountpoint / "pg.mirn", CONSISTENCY) == b"frozen"
