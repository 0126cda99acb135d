"""The service manager's readiness protocol (sd_notify) over ``$NOTIFY_SOCKET``.

``systemd/mirenfs.service`` is ``Type=notify``: systemd counts the service as
started only when ``READY=1`` arrives, which the mount sends once the kernel
has answered a ``stat`` through it, so units ordered after mirenfs find the
snapshots there. ``STOPPING=1`` says the mount is on its way down.

Plain datagram-socket code: no dependency on libsystemd. Without
``$NOTIFY_SOCKET`` (not run by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mirenfs.notify")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
EXEC_PID_ENV = "SYSTEMD_EXEC_PID"


def socket_address(value: str) -> str | None:
    """The address to send to: a path, or an abstract name (``@name`` becomes ``\\0name``).

    Returns None for what this module cannot speak to (``vsock:`` addresses,
    relative paths), which systemd never gives a host service.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*fields: str) -> bool:
    """Send ``fields`` (``READY=1``, ``STATUS=…``) as one datagram; True when it was sent.

    Failures are logged, never raised: a mount that works must not die because
    the service manager went away.
    """
    value = os.environ.get(NOTIFY_SOCKET_ENV)
    if not value:
        return False
    # A forked child (daemon mode) must not speak for the process systemd
    # started: with NotifyAccess=main systemd would reject it anyway.
    exec_pid = os.environ.get(EXEC_PID_ENV)
    if exec_pid and exec_pid != str(os.getpid()):
        return False
    address = socket_address(value)
    if address is None:
        log.warning("cannot notify the service manager: unsupported %s=%s", NOTIFY_SOCKET_ENV, value)
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", value, exc.strerror or exc)
        return False
    log.debug("notified the service manager: %s", ", ".join(fields))
    return True


def ready(status: str) -> bool:
    """The mount answers: let systemd start what is ordered after mirenfs."""
    return notify("READY=1", f"STATUS={status}")


def stopping(status: str) -> bool:
    """The mount is going down (signal, unmount or error)."""
    return notify("STOPPING=1", f"STATUS={status}")
