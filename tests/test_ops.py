"""Operations (issue 6, SPEC §6): the systemd unit, the notify protocol, the
``mount.mirenfs`` helper with ``mount -t`` and fstab, ``mirenfs demo`` and
``mirenfs status``.

Every mount and process a test starts is taken down in teardown, whatever
happened (see ops_fixtures.Teardown). Nothing waits a fixed time: every wait
polls with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_fixtures import (
    ENV_EXAMPLE,
    HELPER,
    MIRENFS,
    UNIT,
    NotifyListener,
    Sandbox,
    Teardown,
    expand_command,
    is_mounted,
    make_disk,
    mounts_at,
    parse_environment_file,
    parse_unit,
    pid_alive,
    runnable_unit,
    unit_environment,
    unit_values,
    wait_until,
    write_slow_image,
)
from store_fixtures import run_cli

from mirenfs.disks.store import Store
from mirenfs.mount import notify
from mirenfs.mount.config import fuse_options

TIMEOUT = 60  # for any one subprocess


@pytest.fixture
def teardown() -> Iterator[Teardown]:
    done = Teardown()
    try:
        yield done
    finally:
        done.run()


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )


def status_of(mountpoint: Path) -> dict:
    """``mirenfs status --json MOUNTPOINT``, run in this process (fast enough to poll)."""
    result = run_cli("status", "--json", mountpoint)
    assert result.code == 0, result.err
    return json.loads(result.out)


# ---- the unit -------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # ExecStart must exist for verify: the copy points at this checkout's mirenfs.
    unit = tmp_path / "mirenfs.service"
    unit.write_text(runnable_unit(UNIT.read_text()))
    result = run("systemd-analyze", "verify", unit)
    # verify exits 0 on unknown keys and bad values, but says so: any output is a finding.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr


def test_unit_settings() -> None:
    unit = parse_unit(UNIT.read_text())
    service = dict(unit["Service"])
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    (start,) = unit_values(unit, "Service", "ExecStart")
    assert " --foreground " in start, "a daemon that forks would not be the main process systemd watches"
    # Each of these gives the service its own mount namespace (some only in
    # some systemd versions): the FUSE mount would be invisible outside it
    # (systemd.exec(5), MountFlags=).
    namespacing = {
        "PrivateTmp", "ProtectSystem", "ProtectHome", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
        "ExecPaths", "NoExecPaths", "PrivateDevices", "PrivateMounts", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
        "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "RootDirectory", "RootImage", "MountFlags",
        "MountAPIVFS", "PrivateUsers", "DynamicUser", "StateDirectory", "ProtectHostname",
    }  # fmt: skip
    assert not namespacing & set(service), f"these would hide the mount: {namespacing & set(service)}"
    # The example environment file sets exactly what the unit uses.
    example = parse_environment_file(ENV_EXAMPLE.read_text())
    defaults = unit_environment(unit, None)
    assert set(example) == {key for key in defaults if key.startswith("MIRENFS_")}
    assert example["MIRENFS_DATA_PATH"] == "/var/lib/miren"


# ---- the notify protocol and the service's life, in the unit's sandbox -------------


def test_service_lifecycle_in_the_units_sandbox(tmp_path: Path, teardown: Teardown) -> None:
    """ExecStartPre, ExecStart and ExecStopPost as written, with the unit's hardening:
    READY=1 only once the mount answers, from the main process; SIGTERM: STOPPING=1,
    unmounted, exit 0; a killed mount's dead mount point is cleaned up."""
    data, mountpoint = tmp_path / "data", tmp_path / "mnt"  # the mount point does not exist yet
    data.mkdir()
    make_disk(data, "pg")
    env_file = tmp_path / "mirenfs.env"
    env_file.write_text(
        f"MIRENFS_DATA_PATH={data}\nMIRENFS_MOUNTPOINT={mountpoint}\n"
        'MIRENFS_MOUNT_OPTIONS="-o allow_other"\nMIRENFS_LOG_LEVEL=info\n'
    )
    unit = parse_unit(runnable_unit(UNIT.read_text()))
    env = unit_environment(unit, env_file)
    listener = NotifyListener(str(tmp_path / "notify.sock"), mountpoint)
    teardown.callbacks.append(listener.close)
    env["NOTIFY_SOCKET"] = listener.address
    sandbox = Sandbox.from_unit(unit)
    teardown.callbacks.append(sandbox.cleanup)
    sandbox.setup(tmp_path)
    teardown.mount(mountpoint)

    def exec_lines(key: str) -> list[list[str]]:
        return [expand_command(line, env).argv for line in unit_values(unit, "Service", key)]

    def run_sandboxed(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            sandbox.wrap(argv), env=env, cwd="/", capture_output=True, text=True, timeout=TIMEOUT
        )

    log_path = tmp_path / "service.log"

    def start() -> subprocess.Popen[bytes]:
        for argv in exec_lines("ExecStartPre"):
            pre = run_sandboxed(argv)
            assert pre.returncode == 0, pre.stderr
        (argv,) = exec_lines("ExecStart")
        assert argv[:2] == [str(MIRENFS), "--log-level"] and "allow_other" in argv
        with open(log_path, "w") as log:  # a file, not a pipe nobody reads while it runs
            return teardown.process(subprocess.Popen(sandbox.wrap(argv), env=env, cwd="/", stderr=log))

    service = start()
    ready, before = listener.wait_for("READY", service)
    assert before == [], f"messages before READY=1: {[m.fields for m in before]}"
    assert ready.mounted and ready.answered, "READY=1 came before the mount answered"
    assert ready.pid == service.pid, "READY=1 must come from the main process (NotifyAccess=main)"
    assert "STATUS" in ready.fields
    (mount,) = mounts_at(mountpoint)
    assert mount.fstype == "fuse.mirenfs" and {"allow_other", "default_permissions"} <= mount.options

    # Serving under the sandbox: an index pass (threads, zstd, hashing) and reads.
    copy = tmp_path / "pg.mirn"
    shutil.copyfile(mountpoint / "pg.mirn", copy)
    verified = run(MIRENFS, "verify", copy)
    assert verified.returncode == 0, verified.stderr
    # And a restore through restore/: staging, fsync, rename, a new disk in the store.
    shutil.copyfile(copy, mountpoint / "restore" / "pg2.mirn")
    assert os.getxattr(mountpoint / "restore" / "pg2.mirn", "user.mirenfs.state") == b"installed"
    assert "pg2.mirn" in os.listdir(mountpoint)

    service.send_signal(signal.SIGTERM)
    stopping, _ = listener.wait_for("STOPPING", service)
    assert stopping.pid == service.pid
    assert service.wait(timeout=TIMEOUT) == 0, log_path.read_text()
    assert not is_mounted(mountpoint)
    log = log_path.read_text()
    assert "received SIGTERM" in log and "unmounting" in log
    for argv in exec_lines("ExecStopPost"):
        run_sandboxed(argv)  # nothing to clean; a failure is ignored ("-")
    assert mountpoint.is_dir() and not is_mounted(mountpoint)

    # A killed mount leaves a dead mount point: ExecStopPost removes it (and
    # ExecStartPre does, for a start after a kill), and the service starts again.
    for cleanup in ("ExecStopPost", "ExecStartPre"):
        service = start()
        listener.wait_for("READY", service)
        service.kill()
        service.wait(timeout=TIMEOUT)
        assert is_mounted(mountpoint)
        with pytest.raises(OSError):  # ENOTCONN
            os.stat(mountpoint)
        if cleanup == "ExecStopPost":
            for argv in exec_lines("ExecStopPost"):
                run_sandboxed(argv)
            assert not is_mounted(mountpoint) and mountpoint.is_dir()
    service = start()
    ready, _ = listener.wait_for("READY", service)
    assert ready.answered and len(mounts_at(mountpoint)) == 1
    service.send_signal(signal.SIGTERM)
    assert service.wait(timeout=TIMEOUT) == 0 and not is_mounted(mountpoint)


SANDBOX_PROBE = r"""
import ctypes, errno, os, socket
def attempt(name, call):
    try:
        call()
        print(name, "allowed")
    except OSError as exc:
        print(name, errno.errorcode.get(exc.errno, exc.errno))
libc = ctypes.CDLL(None, use_errno=True)
def unshare():
    if libc.unshare(0x20000):  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
attempt("unix-socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close())
attempt("inet-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("fuse-device", lambda: os.close(os.open("/dev/fuse", os.O_RDWR)))
attempt("kmsg-device", lambda: os.close(os.open("/dev/kmsg", os.O_RDONLY)))
attempt("chroot", lambda: os.chroot("/"))
attempt("unshare", unshare)
status = open("/proc/self/status").read()
print("no-new-privs", status.split("NoNewPrivs:")[1].split()[0], flush=True)
libc.swapon(b"/nonexistent", 0)  # @swap is outside the filter: SIGSYS
print("swapon survived")
"""


def test_the_sandbox_enforces_the_units_hardening(tmp_path: Path, teardown: Teardown) -> None:
    """The emulation the lifecycle test relies on is real: each setting bites."""
    sandbox = Sandbox.from_unit(parse_unit(runnable_unit(UNIT.read_text())))
    teardown.callbacks.append(sandbox.cleanup)
    sandbox.setup(tmp_path)
    probe = subprocess.run(
        sandbox.wrap([sys.executable, "-c", SANDBOX_PROBE]), capture_output=True, text=True, timeout=TIMEOUT
    )
    results = dict(line.split() for line in probe.stdout.splitlines())
    assert "no-new-privs" in results, probe.stderr
    assert results["unix-socket"] == "allowed" and results["inet-socket"] == "EAFNOSUPPORT"
    assert results["fuse-device"] == "allowed"
    if sandbox.cgroup is not None:
        assert results["kmsg-device"] == "EPERM"  # DevicePolicy=closed
    assert results["chroot"] == "EPERM"  # CAP_SYS_CHROOT is outside the bounding set
    assert results["unshare"] == "EPERM" and results["no-new-privs"] == "1"
    assert probe.returncode == -signal.SIGSYS and "survived" not in probe.stdout


def test_no_ready_when_the_mount_fails(tmp_path: Path) -> None:
    listener = NotifyListener(f"@mirenfs-test-{os.getpid()}-{tmp_path.name}", tmp_path / "missing")
    try:
        env = {**os.environ, "NOTIFY_SOCKET": listener.address}
        result = run(MIRENFS, "mount", "--foreground", "--data-path", tmp_path, tmp_path / "missing", env=env)
        assert result.returncode == 1 and "mount point" in result.stderr
        assert listener.receive(0) is None
    finally:
        listener.close()


def test_notify_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False  # not run by systemd: nothing to do
    listener = NotifyListener(f"@mirenfs-test-{os.getpid()}-abstract", tmp_path)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        monkeypatch.delenv("SYSTEMD_EXEC_PID", raising=False)
        assert notify.ready("serving /x")
        message = listener.receive(5)
        assert message is not None and message.fields == {"READY": "1", "STATUS": "serving /x"}
        assert message.pid == os.getpid()
        # A forked child is not the process systemd started: it stays quiet.
        monkeypatch.setenv("SYSTEMD_EXEC_PID", str(os.getpid() + 1))
        assert notify.stopping("x") is False and listener.receive(0) is None
    finally:
        listener.close()
    monkeypatch.delenv("SYSTEMD_EXEC_PID")
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.notify("READY=1") is False  # logged, never raised


# ---- mount -t mirenfs and fstab -----------------------------------------------------


@pytest.fixture
def helper_installed() -> Iterator[Path]:
    """/sbin/mount.mirenfs -> this checkout's helper, for the test only (kept if it was there)."""
    assert HELPER.exists(), f"{HELPER} is missing: reinstall the package (make setup)"
    link = Path("/sbin/mount.mirenfs")
    if link.exists() or link.is_symlink():
        if link.resolve() != HELPER.resolve():
            pytest.fail(f"{link} is another mount.mirenfs ({link.resolve()}); remove it to run this test")
        yield link
        return
    link.symlink_to(HELPER)
    try:
        yield link
    finally:
        link.unlink()


def test_fuse_options_drop_what_belongs_to_mount_and_fstab() -> None:
    given = ["rw,defaults,nofail,_netdev,auto,noauto,user,x-systemd.automount,X-mount.mkdir", "allow_other"]
    assert fuse_options(given) == ["allow_other"]
    assert fuse_options(["ro,nosuid,allow_other,allow_overwrite,comment=x,ro"]) == [
        "ro",
        "nosuid",
        "allow_other",
        "allow_overwrite",
    ]


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
        wait_until(lambda: not pid_alive(pid), "the mount's process to exit after umount")

    result = run("mount", "-t", "mirenfs", data, mountpoint)
    assert result.returncode == 0, result.stderr
    pid = mounted_daemon()
    (mount,) = mounts_at(mountpoint)
    assert mount.fstype == "fuse.mirenfs" and "allow_other" not in mount.options  # private by default
    unmount(pid)

    result = run("mount", "-t", "mirenfs", "-o", "allow_other,nofail", data, mountpoint)
    assert result.returncode == 0, result.stderr
    pid = mounted_daemon()
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
    result = run("mount", "-t", "mirenfs", tmp_path / "no-such-data", mountpoint)
    assert result.returncode == 32 and "data path" in result.stderr and not is_mounted(mountpoint)
    assert not (tmp_path / "no-such-data").exists()


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


def test_demo_refuses_a_directory_in_use(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = run_cli("demo", tmp_path)
    assert result.code == 1 and "not an empty directory" in result.err
    assert os.listdir(tmp_path) == ["something"]


# ---- mirenfs status ----------------------------------------------------------------


def test_status_during_an_index_pass(tmp_path: Path, teardown: Teardown) -> None:
    data, mountpoint = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mountpoint.mkdir()
    image = tmp_path / "big.img"
    size = 384 << 20  # long enough an index pass to watch (about a second here)
    write_slow_image(image, size)
    Store(str(data)).add_disk("big", size_bytes=size, filesystem="ext4", image_path=str(image))
    make_disk(data, "small")
    teardown.mount(mountpoint)
    mount = teardown.process(
        subprocess.Popen(
            [str(MIRENFS), "mount", "--foreground", "--data-path", str(data), str(mountpoint)],
            stderr=subprocess.DEVNULL,
        )
    )
    wait_until(lambda: is_mounted(mountpoint) and mount.poll() is None, "the mount")

    before = status_of(mountpoint)
    assert before["pid"] == mount.pid and before["index_passes"] == 0
    assert before["disks"]["big"] == {"index": "not built"} and before["restores"] == []

    stat_result: list[os.stat_result] = []
    stat = threading.Thread(target=lambda: stat_result.append(os.stat(mountpoint / "big.mirn")))
    stat.start()
    samples: list[tuple[int, int]] = []
    texts: list[str] = []
    while stat.is_alive():
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
        assert re.search(
            r"^    restore/small2\.mirn +disk small2 +receiving ", run_cli("status", mountpoint).out, re.M
        )
        writer.write(snapshot[half:])
    (installed,) = status_of(mountpoint)["restores"]
    assert installed["state"] == "installed" and installed["bytes"] == len(snapshot)

    # Without MOUNTPOINT: every mirenfs mount, found in /proc/self/mountinfo.
    result = run(MIRENFS, "status")
    assert result.returncode == 0, result.stderr
    assert f"{mountpoint}: mirenfs" in result.stdout and "ready (snapshot" in result.stdout
    everything = json.loads(run(MIRENFS, "status", "--json").stdout)
    assert everything[str(mountpoint)]["disks"]["big"]["index"] == "ready"

    mount.send_signal(signal.SIGTERM)
    assert mount.wait(timeout=TIMEOUT) == 0


def test_status_of_what_is_not_a_mirenfs_mount(tmp_path: Path) -> None:
    result = run(MIRENFS, "status", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"mirenfs: error: {tmp_path} is not a mirenfs mount"
    result = run(MIRENFS, "status", "/proc")
    assert result.returncode == 1 and "a proc filesystem is mounted there" in result.stderr
    result = run(MIRENFS, "status", tmp_path / "missing")
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_status_of_a_dead_mount(tmp_path: Path, teardown: Teardown) -> None:
    data, mountpoint = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mountpoint.mkdir()
    teardown.mount(mountpoint)
    mount = teardown.process(
        subprocess.Popen(
            [str(MIRENFS), "mount", "--foreground", "--data-path", str(data), str(mountpoint)],
            stderr=subprocess.DEVNULL,
        )
    )
    wait_until(lambda: is_mounted(mountpoint) and os.path.isdir(mountpoint / "restore"), "the mount")
    mount.kill()
    mount.wait(timeout=TIMEOUT)
    result = run(MIRENFS, "status", mountpoint)
    assert result.returncode == 1 and "does not answer" in result.stderr
    assert f"fusermount3 -u {mountpoint}" in result.stderr
