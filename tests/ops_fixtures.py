"""Helpers for the operations tests (tests/test_ops.py).

- Mounts and processes that are always taken down, even when a test fails or
  a mount hangs (fusermount3, then an abort through the fuse control
  filesystem and a lazy unmount; SIGTERM, then SIGKILL).
- ``systemd/mirenfs.service`` read and expanded the way systemd does
  (Environment=, EnvironmentFile=, ``$VAR``/``${VAR}``/``$$``), and run in a
  sandbox built from the unit's own hardening settings: the capability
  bounding set and no_new_privs (setpriv), the syscall filter, the address
  families and RestrictNamespaces (seccomp through libseccomp), and the device
  policy (a cgroup-v1 devices group). systemd does not run as PID 1 on these
  machines, so this is how the unit's ExecStart is shown to work as written.

Run as a script (``python ops_fixtures.py --sandbox CONFIG -- COMMAND…``) it
is the sandbox's last step: join the cgroup, load the seccomp filter, exec.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "mirenfs.service"
ENV_EXAMPLE = REPO / "systemd" / "mirenfs.env"
VENV_BIN = Path(sys.executable).parent
MIRENFS = VENV_BIN / "mirenfs"
HELPER = VENV_BIN / "mount.mirenfs"
SHIPPED_MIRENFS = "/usr/local/bin/mirenfs"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FUSECTL = Path("/sys/fs/fuse/connections")
DEVICES_CGROUP = Path("/sys/fs/cgroup/devices")
POLL_S = 0.01


# ---- waiting ----------------------------------------------------------------


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 30) -> T:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


# ---- mounts -----------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    source: str
    fstype: str
    options: set[str]
    minor: int


def mounts_at(path: str | os.PathLike[str]) -> list[Mount]:
    """The mounts at ``path`` from /proc/self/mountinfo (never touches the mount itself), topmost last."""
    from mirenfs.cli.mountinfo import mounts

    target = os.path.realpath(path)
    return [
        Mount(entry.mountpoint, entry.source, entry.fstype, set(entry.options.split(",")), entry.minor)
        for entry in mounts()
        if entry.mountpoint == target
    ]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return any(m.fstype.startswith("fuse") for m in mounts_at(path))


def _abort_connection(minor: int) -> None:
    """Make a hung FUSE connection fail every request, so it can be unmounted."""
    if not any(FUSECTL.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True, timeout=10)
    with contextlib.suppress(OSError):
        (FUSECTL / str(minor) / "abort").write_text("1")


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Remove every FUSE mount at ``path``, however stuck."""
    for _ in range(8):  # stacked mounts come off one by one
        fuse = [m for m in mounts_at(path) if m.fstype.startswith("fuse")]
        if not fuse:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=10)
        if len([m for m in mounts_at(path) if m.fstype.startswith("fuse")]) == len(fuse):
            _abort_connection(fuse[-1].minor)
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has finished)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@dataclass
class Teardown:
    """Everything a test started, undone in reverse order whatever happened."""

    mountpoints: list[Path] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    callbacks: list[Callable[[], None]] = field(default_factory=list)

    def mount(self, path: Path) -> Path:
        self.mountpoints.append(path)
        return path

    def process(self, process: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self.processes.append(process)
        return process

    def run(self) -> None:
        for path in reversed(self.mountpoints):
            force_unmount(path)
        for process in reversed(self.processes):
            stop_process(process)
        for pid in self.pids:  # daemons that are not our children
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for callback in reversed(self.callbacks):
            callback()


# ---- the notify socket --------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    fields: dict[str, str]
    pid: int
    mounted: bool  # was the mount there when the datagram arrived
    answered: bool  # and did a stat of its root succeed at that moment


class NotifyListener:
    """A datagram socket like systemd's $NOTIFY_SOCKET, recording each message's sender pid."""

    def __init__(self, address: str, watch: Path) -> None:
        self.address = address
        self.watch = watch
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> Notification | None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (TimeoutError, BlockingIOError):
            return None
        # Checked before anything else, so the state seen is the state READY=1 came in.
        mounted = is_mounted(self.watch)
        try:
            os.stat(self.watch)
            answered = mounted
        except OSError:
            answered = False
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[:4], sys.byteorder)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        return Notification(fields, pid, mounted, answered)

    def wait_for(
        self, key: str, sender: subprocess.Popen[Any] | None = None, timeout: float = 30
    ) -> tuple[Notification, list[Notification]]:
        """The first message holding ``key``, and every message before it; fails early if ``sender`` exits."""
        deadline = time.monotonic() + timeout
        earlier: list[Notification] = []
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(min(left, 0.1))
            if message is None:
                if sender is None or sender.poll() is None:
                    continue
                message = self.receive(0)  # sent just before it exited?
                if message is None:
                    raise AssertionError(f"no {key}: the process exited with {sender.returncode}")
            if key in message.fields:
                return message, earlier
            earlier.append(message)
        raise AssertionError(f"no {key} within {timeout} s (got {[m.fields for m in earlier]})")


# ---- the unit, as systemd reads it ---------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists, in order (continuation lines joined)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None and "=" in line:
            key, value = line.split("=", 1)
            current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [value for k, value in unit.get(section, []) if k == key]


def parse_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, optional quotes)."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_environment(unit: dict[str, list[tuple[str, str]]], env_file: Path | None) -> dict[str, str]:
    """The service's environment: systemd's PATH, then Environment=, then the EnvironmentFile."""
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
    for assignment in unit_values(unit, "Service", "Environment"):
        for word in shlex.split(assignment):
            key, value = word.split("=", 1)
            env[key] = value
    if env_file is not None:
        env.update(parse_environment_file(env_file.read_text()))
    return env


@dataclass(frozen=True)
class Command:
    argv: list[str]
    ignore_failure: bool


def expand_command(line: str, env: dict[str, str]) -> Command:
    """An Exec*= line as systemd runs it: prefixes, quoting, ``$VAR`` (split), ``${VAR}``, ``$$``."""
    prefix = re.match(r"[-@:+!]*", line)
    assert prefix is not None
    flags, rest = prefix.group(0), line[prefix.end() :]
    assert "@" not in flags and ":" not in flags, f"the test does not expand {flags!r} prefixes"
    argv: list[str] = []
    for word in shlex.split(rest):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
            continue
        argv.append(
            re.sub(
                r"\$\$|\$\{(\w+)\}",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""),
                word,
            )
        )
    return Command(argv, "-" in flags)


def runnable_unit(unit_text: str) -> str:
    """The shipped unit with ExecStart pointing at this checkout's mirenfs (which exists)."""
    assert SHIPPED_MIRENFS in unit_text
    return unit_text.replace(SHIPPED_MIRENFS, str(MIRENFS))


# ---- the unit's sandbox ---------------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """systemd's syscall groups (``systemd-analyze syscall-filter``): name -> members."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if re.fullmatch(r"@[\w-]+", line):
            current = groups.setdefault(line, [])
        elif current is not None and line.startswith("    ") and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand_syscalls(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        if name.startswith("@"):
            calls |= expand_syscalls(groups[name], groups)
        else:
            calls.add(name)
    return calls


@dataclass
class Sandbox:
    """What the unit's hardening settings do to its commands, minus a running systemd."""

    capabilities: list[str]
    no_new_privileges: bool
    syscalls: list[str]
    address_families: list[str]
    restrict_namespaces: bool
    devices: list[str]  # cgroup-v1 devices.allow lines
    cgroup: Path | None = None
    config: Path = Path()

    @classmethod
    def from_unit(cls, unit: dict[str, list[tuple[str, str]]]) -> Sandbox:
        def one(key: str) -> str:
            values = unit_values(unit, "Service", key)
            assert len(values) == 1, f"the unit should set {key}= once"
            return values[0]

        groups = syscall_groups()
        syscalls = expand_syscalls(one("SystemCallFilter").split(), groups)
        devices = []
        if one("DevicePolicy") == "closed":
            # What DevicePolicy=closed always allows (systemd.resource-control(5)).
            devices += [f"c {n} rwm" for n in ("1:3", "1:5", "1:7", "1:8", "1:9", "5:0", "5:2", "136:*")]
        for allow in unit_values(unit, "Service", "DeviceAllow"):
            node, access = allow.split()
            info = os.stat(node)
            devices.append(f"c {os.major(info.st_rdev)}:{os.minor(info.st_rdev)} {access}")
        return cls(
            capabilities=one("CapabilityBoundingSet").split(),
            no_new_privileges=one("NoNewPrivileges") == "yes",
            syscalls=sorted(syscalls),
            address_families=one("RestrictAddressFamilies").split(),
            restrict_namespaces=one("RestrictNamespaces") == "yes",
            devices=devices,
        )

    def setup(self, directory: Path) -> None:
        """Write the seccomp list and create the devices cgroup; :meth:`cleanup` removes the cgroup."""
        if (DEVICES_CGROUP / "devices.allow").exists():  # cgroup v1, as on these machines
            self.cgroup = DEVICES_CGROUP / f"mirenfs-test-{os.getpid()}-{directory.name}"
            self.cgroup.mkdir()
            (self.cgroup / "devices.deny").write_text("a")
            for line in self.devices:
                (self.cgroup / "devices.allow").write_text(line)
        self.config = directory / "sandbox.json"
        cgroup = str(self.cgroup) if self.cgroup is not None else None
        self.config.write_text(json.dumps({"syscalls": self.syscalls, "cgroup": cgroup}))

    def cleanup(self) -> None:
        cgroup = self.cgroup
        if cgroup is not None and cgroup.exists():
            wait_until(
                lambda: not (cgroup / "cgroup.procs").read_text().strip(), "the sandbox cgroup to empty"
            )
            cgroup.rmdir()

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the sandbox (after :meth:`setup`)."""
        bounding = "-all," + ",".join("+" + cap.lower().removeprefix("cap_") for cap in self.capabilities)
        privs = ["--no-new-privs"] if self.no_new_privileges else []
        assert self.address_families == ["AF_UNIX"], "the sandbox emulates RestrictAddressFamilies=AF_UNIX"
        assert self.restrict_namespaces
        return [
            "setpriv",
            *privs,
            "--bounding-set",
            bounding,
            "--",
            sys.executable,
            __file__,
            "--sandbox",
            str(self.config),
            "--",
            *argv,
        ]


# ---- inside the sandbox (run as a script) -----------------------------------------

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ = 1, 4


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def load_seccomp(syscalls: list[str]) -> None:
    """The unit's SystemCallFilter=, RestrictAddressFamilies=AF_UNIX and RestrictNamespaces=yes.

    A call outside the filter kills the process (SIGSYS) instead of failing
    with EPERM as in the unit, so that no violation can go unnoticed.
    """
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ScmpArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_KILL_PROCESS)
    assert ctx, "seccomp_init failed"

    def rule(action: int, name: str, *conditions: tuple[int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a call of this architecture
        array = (ScmpArgCmp * max(len(conditions), 1))(*(ScmpArgCmp(a, op, d, 0) for a, op, d in conditions))
        result = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
        if result < 0 and result != -errno.EOPNOTSUPP:
            raise OSError(-result, f"seccomp_rule_add {name}")

    special = {"socket", "clone3", "unshare", "setns"}
    for name in syscalls:
        if name not in special:
            rule(SCMP_ACT_ALLOW, name)
    rule(SCMP_ACT_ALLOW, "socket", (0, SCMP_CMP_EQ, socket.AF_UNIX))
    rule(scmp_act_errno(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_NE, socket.AF_UNIX))
    rule(scmp_act_errno(errno.ENOSYS), "clone3")  # what systemd does: glibc falls back to clone
    rule(scmp_act_errno(errno.EPERM), "unshare")
    rule(scmp_act_errno(errno.EPERM), "setns")
    if lib.seccomp_load(ctx) < 0:
        raise OSError(ctypes.get_errno(), "seccomp_load failed")


def sandbox_exec(argv: list[str]) -> None:
    config_path, separator, *command = argv
    assert separator == "--" and command
    config = json.loads(Path(config_path).read_text())
    if config["cgroup"]:
        Path(config["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    os.environ["SYSTEMD_EXEC_PID"] = str(os.getpid())  # as systemd sets it; exec keeps the pid
    load_seccomp(config["syscalls"])
    os.execvp(command[0], command)


# ---- test data --------------------------------------------------------------------


def make_disk(data: Path, name: str, size: int = 16 << 20, filesystem: str = "ext4") -> str:
    """A disk of the store at ``data`` with a formatted image; returns the image path."""
    from mirenfs.disks.manage import create_disk
    from mirenfs.disks.store import Store

    return create_disk(Store(str(data)), name, size_bytes=size, filesystem=filesystem).image_path


def write_slow_image(path: Path, size: int) -> None:
    """Data that compresses (slowly: 17 symbols at random) and never repeats within a chunk.

    One 4 MiB block is made and written with a different first line each
    time: zstd's work per chunk is the same as for fully random text.
    """
    table = bytes(b"abcdefghijklmnop "[i % 17] for i in range(256))
    block = bytearray(os.urandom(4 << 20).translate(table))
    with open(path, "wb") as f:
        for n in range(size // len(block)):
            block[:16] = b"%016d" % n
            f.write(block)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--sandbox":
        sandbox_exec(sys.argv[2:])
    else:
        sys.exit("usage: ops_fixtures.py --sandbox CONFIG -- COMMAND...")
