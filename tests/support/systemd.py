"""systemd as the tests need it, without systemd running as PID 1 on these machines.

- ``systemd/mirenfs.service`` read and expanded the way systemd does
  (Environment=, EnvironmentFile=, ``$VAR``/``${VAR}``/``$$``).
- A datagram socket like systemd's $NOTIFY_SOCKET that records each message's
  sender and whether the mount answered when it came.
- A sandbox built from the unit's own hardening settings: the capability
  bounding set and no_new_privs (setpriv), the syscall filter, the address
  families and RestrictNamespaces (seccomp, in :mod:`support.sandbox_exec`),
  and the device policy (a cgroup-v1 devices group). This is how the unit's
  ExecStart is shown to work as written.

:meth:`Sandbox.cleanup` removes the cgroup it made; register it for teardown
before :meth:`Sandbox.setup`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.mounts import is_mounted, wait_for
from support.runners import MIRENFS, REPO

UNIT = REPO / "systemd" / "mirenfs.service"
ENV_EXAMPLE = REPO / "systemd" / "mirenfs.env"
SHIPPED_MIRENFS = "/usr/local/bin/mirenfs"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEVICES_CGROUP = Path("/sys/fs/cgroup/devices")
SANDBOX_EXEC = Path(__file__).resolve().with_name("sandbox_exec.py")


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
            wait_for(
                lambda: not (cgroup / "cgroup.procs").read_text().strip(),
                "the sandbox cgroup to empty",
                timeout=30,
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
            str(SANDBOX_EXEC),
            "--sandbox",
            str(self.config),
            "--",
            *argv,
        ]
