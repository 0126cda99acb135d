"""Operations (issue 6, SPEC §6) through the kernel: the ``mount.mirenfs`` helper with
``mount -t`` and fstab, ``mirenfs demo`` and ``mirenfs status``.

Every mount and process a test starts is taken down in teardown, whatever
happened (see support.mounts). Nothing waits a fixed time: every wait polls
with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from mirenfs.disks.store import Store
from mirenfs.format.header import decode_header

from support.data import write_slow_image
from support.mounts import Teardown, is_mounted, log_problems, mounts_at, pid_alive, wait_for
from support.runners import MIRENFS, TIMEOUT, run, run_cli, status_of
from support.store import make_disk

# ---- mount -t mirenfs and fstab -----------------------------------------------------


def test_mount_t_mirenfs_and_fstab(tmp_path: Path, teardown: Teardown, helper_installed: Path) -> None:
    data, mountpoint = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mountpoint.mkdir()
    make_disk(data, "pg")
    teardown.mount(mountpoint)

    def mounted_daemon() -> int:
        # live when mount returns: no waiting
        assert "pg.mirn" in os.listdir(mountpoint)
        pid = json.loads(os.getxattr(mountpoint, "user.mirenfs.status"))["pid"]
        teardown.pids.append(pid)
        return int(pid)

    def unmount(pid: int) -> None:
        result = run("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mountpoint)
        wait_for(lambda: not pid_alive(pid), "the mount's process to exit after umount", timeout=30)

    result = run("mount", "-t", "mirenfs", data, mountpoint)
    assert result.returncode == 0, result.stderr
    pid = mounted_daemon()
    (mount,) = mounts_at(mountpoint)
    assert mount.fstype == "fuse.mirenfs" and "allow_other" not in mount.options  # private by default
    unmount(pid)

    result = run("mount", "-t", "mirenfs", "-o", "allow_other,nofail", data, mountpoint)
    assert result.returncode == 0, result.stderr
    pid = mounted_daemon()
    # What the daemon's threads, libfuse or the thaw watchdog print goes to its log, not /dev/null.
    daemon_log_path = data / "mirenfs" / "mount.log"
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)] == [str(daemon_log_path)] * 2
    (mount,) = mounts_at(mountpoint)
    assert {"allow_other", "default_permissions"} <= mount.options
    unmount(pid)

    # The fstab line of the README (with a few of the options people add).
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{data} {mountpoint} mirenfs defaults,nofail,_netdev,x-systemd.after=local-fs.target 0 0\n"
    )
    result = run("mount", "-T", fstab, mountpoint)
    assert result.returncode == 0, result.stderr
    pid = mounted_daemon()
    run("mount", "-T", fstab, "-a")  # again: must not stack a second mount on the first
    assert len(mounts_at(mountpoint)) == 1
    unmount(pid)

    # -f: everything but the mount; a data path that is not there is refused.
    result = run("mount", "-f", "-t", "mirenfs", data, mountpoint)
    assert result.returncode == 0 and not is_mounted(mountpoint)
    result = run("mount", "-f", "-t", "mirenfs", "-o", "nofail,freeze_budget=soon", data, mountpoint)
    assert result.returncode == 32 and "-o freeze_budget=soon: the freeze budget" in result.stderr
    assert not is_mounted(mountpoint)
    result = run("mount", "-t", "mirenfs", tmp_path / "no-such-data", mountpoint)
    assert result.returncode == 32 and "data path" in result.stderr and not is_mounted(mountpoint)
    assert not (tmp_path / "no-such-data").exists()
    daemon_log = daemon_log_path.read_text()  # where a daemonized mount logs
    assert log_problems(daemon_log) == [], daemon_log


# ---- mirenfs demo -----------------------------------------------------------------


def test_demo_end_to_end(tmp_path: Path, teardown: Teardown) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    demo = teardown.process(
        subprocess.Popen(
            [str(MIRENFS), "demo"],
            env={**os.environ, "TMPDIR": str(temp)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read_output() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_output, daemon=True).start()
    output: list[str] = []

    def next_line(deadline: float) -> str | None:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        if line is not None:
            output.append(line)
        return line

    deadline = time.monotonic() + TIMEOUT
    while True:
        line = next_line(deadline)
        assert line is not None, f"the demo ended before mounting: {''.join(output)}"
        if line.startswith("mirenfs demo: mounted "):
            mountpoint = Path(line.split()[3])
            break
    teardown.mount(mountpoint)
    root = mountpoint.parent
    assert root.parent == temp and is_mounted(mountpoint)
    while "Ctrl-C" not in output[-1]:  # the rest of the guide
        assert next_line(deadline) is not None

    snapshots = sorted(name for name in os.listdir(mountpoint) if name.endswith(".mirn"))
    assert snapshots == ["pg.mirn", "web.mirn"]
    guide = "".join(output)
    assert f"ls -l {mountpoint}" in guide and f"{mountpoint}/restore/web-copy.mirn" in guide
    assert f"fusermount3 -u {mountpoint}" in guide

    copy = tmp_path / "web.mirn"
    shutil.copyfile(mountpoint / "web.mirn", copy)
    result = run(MIRENFS, "verify", copy)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
    # Real filesystems holding files: web is ext4 with the site in it.
    image = tmp_path / "web.img"
    result = run(MIRENFS, "restore", copy, "--image", image)
    assert result.returncode == 0, result.stderr
    page = run("debugfs", "-R", "cat /www/index.html", image)
    assert "Served from a Miren disk" in page.stdout
    header = json.loads(run(MIRENFS, "inspect", "--json", mountpoint / "pg.mirn").stdout)
    assert (
        header["filesystem"] == "btrfs" and header["name"] == "pg"
    )  # scripts/install-deps.sh installs btrfs-progs

    demo.send_signal(signal.SIGINT)  # Ctrl-C
    assert demo.wait(timeout=TIMEOUT) == 0, "".join(output)
    while next_line(time.monotonic() + TIMEOUT) is not None:
        pass
    assert f"mirenfs demo: stopped and removed {root}" in "".join(output)
    assert not is_mounted(mountpoint) and not root.exists() and not any(temp.iterdir())
    assert log_problems("".join(output)) == []  # the demo's mount logs to its output


# ---- mirenfs status ----------------------------------------------------------------


def test_status_during_an_index_pass(tmp_path: Path, mounts) -> None:
    data, mountpoint = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mountpoint.mkdir()
    image = tmp_path / "big.img"
    size = 384 << 20  # long enough an index pass to watch (about a second here)
    write_slow_image(image, size)
    Store(str(data)).add_disk("big", size_bytes=size, filesystem="ext4", image_path=str(image))
    make_disk(data, "small")
    mount = mounts(mountpoint, data)

    before = status_of(mountpoint)
    assert before["pid"] == mount.process.pid and before["index_passes"] == 0
    assert before["disks"]["big"] == {"index": "not built"} and before["restores"] == []

    stat_result: list[os.stat_result] = []
    stat = threading.Thread(target=lambda: stat_result.append(os.stat(mountpoint / "big.mirn")))
    stat.start()
    samples: list[tuple[int, int]] = []
    texts: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while stat.is_alive() and time.monotonic() < deadline:
        state = status_of(mountpoint)["disks"]["big"]
        if state["index"] == "building":
            samples.append((state["done"], state["total"]))
            if len(texts) < 3:
                texts.append(run_cli("status", mountpoint).out)
    stat.join(timeout=TIMEOUT)
    assert stat_result, "the stat of big.mirn did not finish"
    assert samples, "never saw the index pass running"
    assert all(total == size and 0 <= done <= total for done, total in samples)
    assert [done for done, _ in samples] == sorted(done for done, _ in samples)
    assert any(re.search(r"^  big +building \d+% \(.+ of 384\.0M\)$", text, re.M) for text in texts), texts

    after = status_of(mountpoint)
    assert after["disks"]["big"]["index"] == "ready"
    assert after["disks"]["big"]["snapshot_bytes"] == stat_result[0].st_size
    assert after["disks"]["small"] == {"index": "not built"} and after["index_passes"] == 1

    # A restore in progress, then finished (the writer here is the test: no timing).
    snapshot = (mountpoint / "small.mirn").read_bytes()
    half = len(snapshot) // 2
    with open(mountpoint / "restore" / "small2.mirn", "wb", buffering=0) as writer:
        writer.write(snapshot[:half])
        (receiving,) = status_of(mountpoint)["restores"]
        assert receiving["name"] == "restore/small2.mirn" and receiving["disk"] == "small2"
        assert receiving["state"] == "receiving" and 0 < receiving["bytes"] <= half
        # how far into the image, by the header: what a sparse disk's bytes received do not say
        image_size = decode_header(snapshot)[0].size_bytes
        assert receiving["image_total"] == image_size and 0 <= receiving["image_done"] <= image_size
        assert re.search(
            r"^    restore/small2\.mirn +disk small2 +receiving +\S+ received +image \S+ of \S+ \(\d+%\)$",
            run_cli("status", mountpoint).out,
            re.M,
        )
        writer.write(snapshot[half:])
    (installed,) = status_of(mountpoint)["restores"]
    assert installed["state"] == "installed: created disk small2" and installed["bytes"] == len(snapshot)
    assert "image_total" not in installed  # only while it receives

    # Without MOUNTPOINT: every mirenfs mount, found in /proc/self/mountinfo.
    result = run(MIRENFS, "status")
    everything = json.loads(run(MIRENFS, "status", "--json").stdout)
    # 3: a mount's catalogue did not answer; other tests' mounts on this host (an etcd outage
    # test run alongside) may say so, never this one. 1: another mount on this host does not
    # answer (a daemon killed by another test or user); never this one.
    others_only = all(str(mountpoint) not in line for line in result.stderr.splitlines())
    assert result.returncode in (0, 3) or (result.returncode == 1 and others_only), result.stderr
    assert everything[str(mountpoint)]["catalog_error"] is None
    assert f"{mountpoint}: mirenfs" in result.stdout and "ready (offline, snapshot" in result.stdout
    assert everything[str(mountpoint)]["disks"]["big"]["index"] == "ready"
    assert everything[str(mountpoint)]["data_path"] == str(data)  # as the text output's header says

    mount.process.send_signal(signal.SIGTERM)
    assert mount.process.wait(timeout=TIMEOUT) == 0


def test_status_of_a_dead_mount(tmp_path: Path, mounts) -> None:
    data, mountpoint = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mountpoint.mkdir()
    mount = mounts(mountpoint, data)
    wait_for(
        lambda: is_mounted(mountpoint) and os.path.isdir(mountpoint / "restore"), "the mount", timeout=30
    )
    mount.process.kill()
    mount.process.wait(timeout=TIMEOUT)
    result = run(MIRENFS, "status", mountpoint)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"mirenfs: error: the mirenfs mount at {mountpoint} does not answer (its process is gone); run "
        f"`mirenfs cleanup --data-path {data}`: it unmounts it, thaws a filesystem it left frozen and "
        "removes what it left"
    )
    assert run(MIRENFS, "cleanup", "--data-path", data).returncode == 0  # as it says: the mount goes
    assert not os.path.ismount(mountpoint)
    mount = mounts(mountpoint, data)  # and the dead mount of a mount attempt, below
    wait_for(
        lambda: is_mounted(mountpoint) and os.path.isdir(mountpoint / "restore"), "the mount", timeout=30
    )
    mount.process.kill()
    mount.process.wait(timeout=TIMEOUT)
    again = run(MIRENFS, "mount", mountpoint, "--data-path", data)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"mirenfs: error: a dead mount is left at {mountpoint} (its daemon was killed); run: fusermount3 -u "
        f"{mountpoint}, then mount again (the new mount also thaws a filesystem the killed one left frozen)"
    )
    below = run(MIRENFS, "mount", mountpoint / "restore", "--data-path", data)  # a directory in it
    assert below.returncode == 1 and f"a dead mount is left at {mountpoint} " in below.stderr
