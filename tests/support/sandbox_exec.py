"""The sandbox's last step, run as a script inside it: join the cgroup, load the seccomp filter, exec.

``python sandbox_exec.py --sandbox CONFIG -- COMMAND…`` (see
:meth:`support.systemd.Sandbox.wrap`). It runs with the unit's environment, so
it imports the standard library only, never the test tree or mirenfs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import socket
import sys
from pathlib import Path

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


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--sandbox":
        sandbox_exec(sys.argv[2:])
    else:
        sys.exit("usage: sandbox_exec.py --sandbox CONFIG -- COMMAND...")
