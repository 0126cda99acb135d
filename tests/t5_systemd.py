"""Operations (issue 6, SPEC §6) with systemd: the unit as written, its hardening as a
sandbox, the notify protocol and the service's life from start to SIGTERM and after a kill.

Every mount and process a test starts is taken down in teardown, whatever
happened (see support.mounts.Teardown). Nothing waits a fixed time: every wait
polls with a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mirenfs.mount import notify

from support.mounts import Teardown, is_mounted, log_problems, mounts_at
from support.runners import MIRENFS, TIMEOUT, run
from support.store import make_disk
from support.systemd import (
    ENV_EXAMPLE,
    UNIT,
    NotifyListener,
    Sandbox,
    expand_command,
    parse_environment_file,
    parse_unit,
    runnable_unit,
    unit_environment,
    unit_values,
)

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
    # A stop that ends in SIGKILL takes the freeze watchdog too: the freeze record is read at once.
    assert any(
        " cleanup --data-path ${MIRENFS_DATA_PATH}" in line
        for line in unit_values(unit, "Service", "ExecStopPost")
    )
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
    state = os.getxattr(mountpoint / "restore" / "pg2.mirn", "user.mirenfs.state")
    assert state == b"installed: created disk pg2"
    assert "pg2.mirn" in os.listdir(mountpoint)

    service.send_signal(signal.SIGTERM)
    stopping, _ = listener.wait_for("STOPPING", service)
    assert stopping.pid == service.pid
    assert service.wait(timeout=TIMEOUT) == 0, log_path.read_text()
    assert not is_mounted(mountpoint)
    log = log_path.read_text()
    assert "received SIGTERM" in log and "unmounting" in log
    assert log_problems(log) == [], log  # no warning, error or traceback on the way
    for argv in exec_lines("ExecStopPost"):
        stopped = run_sandboxed(argv)  # a failure would be ignored ("-"): check what each did
        assert stopped.returncode == 0, stopped.stderr
        if "cleanup" in argv:  # nothing was frozen when the mount stopped of itself
            assert stopped.stdout.startswith("nothing to clean up in "), stopped.stdout
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
    assert log_problems(log_path.read_text()) == [], log_path.read_text()


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
