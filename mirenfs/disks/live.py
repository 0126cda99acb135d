"""Is an image in use: loop devices backed by it (``/sys/block/loop*/loop/backing_file``),
and the filesystems mounted from those devices in any mount namespace (``/proc/*/mountinfo``).

Blocking reads of ``/sys`` and ``/proc``; run from worker threads in trio. When
it cannot tell whether an image is live, it says so (:class:`LiveCheckError`)
rather than guessing "not live": restore fails closed on that. It only looks:
it never freezes, mounts or changes anything (``pointintime`` does the freezing).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from mirenfs.errors import LiveCheckError

SYS_BLOCK = "/sys/block"  # where loop devices tell their backing files; tests point it elsewhere
DEV = "/dev"  # where their device nodes are (tests point it elsewhere too)
PROC = "/proc"
_DELETED_SUFFIX = " (deleted)"
LOOP_GET_STATUS64 = 0x4C05  # linux/loop.h
# struct loop_info64: lo_device, lo_inode (the backing file's st_dev and st_ino), then the rest.
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")


@dataclass(frozen=True)
class LoopBacking:
    """One attached loop device as /sys shows it: its name, its backing path, and the backing
    file's (st_dev, st_ino) as the kernel holds it (None without access to its device node)."""

    device: str
    backing: str
    identity: tuple[int, int] | None


def loop_backings(*, sys_block: str | None = None) -> list[LoopBacking]:
    """Every attached loop device, in one look at /sys (raises :class:`LiveCheckError` when it
    cannot be read): :func:`devices_backing` then says which back an image, as often as needed."""
    sys_block = SYS_BLOCK if sys_block is None else sys_block
    try:
        entries = sorted(name for name in os.listdir(sys_block) if name.startswith("loop"))
    except OSError as exc:
        raise LiveCheckError(f"cannot list loop devices in {sys_block}: {exc.strerror}") from None
    found = []
    for device in entries:
        try:
            with open(os.path.join(sys_block, device, "loop", "backing_file"), encoding="utf-8") as text:
                backing = text.read().rstrip("\n")
        except FileNotFoundError:
            continue  # a loop device with nothing attached (or detached meanwhile)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise LiveCheckError(f"cannot read the backing file of {device}: {reason}") from None
        found.append(LoopBacking(device, backing, backing_identity(device, sys_block=sys_block)))
    return found


def loop_devices_backing(image_path: str, *, sys_block: str | None = None) -> list[str]:
    """The loop devices (``loop3``, …) whose backing file is ``image_path``: see
    :func:`devices_backing`, over a fresh look at /sys."""
    return devices_backing(image_path, loop_backings(sys_block=sys_block))


def devices_backing(image_path: str, backings: list[LoopBacking]) -> list[str]:
    """Of ``backings``, the loop devices whose backing file is ``image_path``.

    Compared by the backing file's device and inode as the kernel holds them
    (``LOOP_GET_STATUS64``, what ``losetup -O BACK-INO`` shows), so a loop
    device set up through another path, another mount namespace (a container
    sees its own ``/disk.img``) or a hard link removed since still matches.
    Without access to the device node (not root), by the path ``/sys`` shows:
    by device and inode where it can be stat'ed, by name otherwise (a deleted
    backing file). Raises :class:`LiveCheckError` when it cannot tell: a
    backing path that leads nowhere from here, with no device node to ask.
    """
    try:
        image_stat: os.stat_result | None = os.stat(image_path)
    except FileNotFoundError:
        image_stat = None
    except OSError as exc:
        raise LiveCheckError(f"cannot stat {image_path}: {exc.strerror}") from None
    wanted = os.path.realpath(image_path)
    found = []
    for loop in backings:
        device, backing, identity = loop.device, loop.backing, loop.identity
        if image_stat is not None and identity is not None:
            if identity == (image_stat.st_dev, image_stat.st_ino):
                found.append(device)
        elif _same_file(backing, wanted, image_stat):
            found.append(device)
        elif image_stat is not None and not _leads_somewhere(backing):
            raise LiveCheckError(
                f"/dev/{device} is backed by {backing!r}, which does not lead to a file from here (a path "
                f"in another mount namespace, or unlinked), and /dev/{device} cannot be opened to ask the "
                f"kernel which file it is (that takes root): run it as root (sudo), or detach /dev/{device} "
                f"if nothing uses it (losetup -d /dev/{device})"
            )
    return found


def backing_identity(device: str, *, sys_block: str | None = None) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file backing loop ``device``, from the kernel; None when its node
    in ``DEV`` cannot be opened (no root), is not that device, or it was detached meanwhile."""
    sys_block = SYS_BLOCK if sys_block is None else sys_block
    try:
        with open(os.path.join(sys_block, device, "dev"), encoding="ascii") as text:
            major, minor = (int(number) for number in text.read().strip().split(":"))
        fd = os.open(os.path.join(DEV, device), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError):
        return None
    try:
        node = os.fstat(fd)
        if not stat.S_ISBLK(node.st_mode) or node.st_rdev != os.makedev(major, minor):
            return None
        info = bytearray(_LOOP_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
    except OSError:
        return None  # ENXIO: detached since /sys was read
    finally:
        os.close(fd)
    lo_device, lo_inode = _LOOP_INFO64.unpack(info)[:2]
    return lo_device, lo_inode


def _same_file(backing: str, wanted: str, image_stat: os.stat_result | None) -> bool:
    candidates = [backing]
    if backing.endswith(_DELETED_SUFFIX):
        candidates.append(backing.removesuffix(_DELETED_SUFFIX))
    for candidate in candidates:
        if os.path.realpath(candidate) == wanted:
            return True
    if image_stat is None:
        return False
    try:
        backing_stat = os.stat(backing)
    except OSError:
        return False
    return (backing_stat.st_dev, backing_stat.st_ino) == (image_stat.st_dev, image_stat.st_ino)


def _leads_somewhere(backing: str) -> bool:
    """Whether the backing path names a file from this mount namespace (so that, not matching,
    it is some other file)."""
    if backing.endswith(_DELETED_SUFFIX):
        return False
    try:
        os.stat(backing)
    except OSError:
        return False
    return True


def image_is_live(image_path: str, *, sys_block: str | None = None) -> bool:
    """True when a loop device is backed by the image; raises :class:`LiveCheckError` if unsure."""
    return bool(loop_devices_backing(image_path, sys_block=sys_block))


def image_in_use(image_path: str) -> bool:
    """Whether a loop device backs the image, and so it may change while it is read (an index
    pass must then read each byte once: ``build_index(single_read=...)``, a torn but valid
    snapshot). When that cannot be told, the answer is yes."""
    try:
        return image_is_live(image_path)
    except LiveCheckError:
        return True


# --- the filesystems mounted from an image's loop devices ---


@dataclass(frozen=True)
class MountedFilesystem:
    """A filesystem mounted from a loop device, and the path by which this process reaches it.

    ``path`` goes through ``/proc/PID/root`` of a process in the mount's
    namespace, so a mount inside a container is reached too. It is only a
    way in: :func:`open_mount` checks that it still leads to mount ``mount_id``.
    """

    device: str  # "loop3", or a partition "loop3p1"
    fstype: str
    mount_id: int  # unique across mount namespaces
    pid: int  # a process that sees the mount
    mountpoint: str  # where that process sees it
    path: str

    def describe(self) -> str:
        where = (
            f"{self.mountpoint}"
            if self.pid == os.getpid()
            else f"{self.mountpoint} (as pid {self.pid} sees it)"
        )
        return f"the {self.fstype} filesystem on /dev/{self.device}, mounted at {where}"


@dataclass(frozen=True)
class MountLine:
    """One line of a ``/proc/PID/mountinfo``."""

    mount_id: int
    device: tuple[int, int]
    mountpoint: str
    fstype: str
    source: str
    options: str  # the mount's options, then the filesystem's, comma-separated

    @property
    def major(self) -> int:
        return self.device[0]

    @property
    def minor(self) -> int:
        return self.device[1]


def block_devices(loops: list[str], *, sys_block: str | None = None) -> dict[tuple[int, int], str]:
    """(major, minor) of each loop device and of its partitions, to its name (``loop3p1``)."""
    sys_block = SYS_BLOCK if sys_block is None else sys_block
    found: dict[tuple[int, int], str] = {}
    for loop in loops:
        base = os.path.join(sys_block, loop)
        names = [loop]
        with contextlib.suppress(OSError):
            names += sorted(entry for entry in os.listdir(base) if entry.startswith(loop + "p"))
        for name in names:
            path = os.path.join(base, "dev") if name == loop else os.path.join(base, name, "dev")
            try:
                with open(path, encoding="ascii") as text:
                    major, minor = (int(n) for n in text.read().strip().split(":"))
            except (OSError, ValueError):
                continue  # detached meanwhile, or not a block device as the kernel shows it
            found[(major, minor)] = name
    return found


def filesystems_on(
    loops: list[str], *, sys_block: str | None = None, proc: str = PROC
) -> list[MountedFilesystem]:
    """The filesystems mounted from ``loops`` (or their partitions), one reachable mount each.

    Every mount namespace on the host is looked at once (through the first
    process found in it, this process's own first); a device mounted in
    several places, or namespaces, shares one filesystem and is listed once.
    """
    devices = block_devices(loops, sys_block=sys_block)
    if not devices:
        return []
    sources = {f"/dev/{name}": name for name in devices.values()}
    found: dict[str, MountedFilesystem] = {}
    for pid, lines in _mount_tables(proc):
        for line in lines:
            device = devices.get(line.device) or sources.get(line.source)
            if device is None or device in found:
                continue
            path = os.path.join(proc, str(pid), "root") + line.mountpoint
            candidate = MountedFilesystem(device, line.fstype, line.mount_id, pid, line.mountpoint, path)
            with contextlib.suppress(OSError):
                os.close(open_mount(candidate))  # only a mount this process can reach counts
                found[device] = candidate
    return [found[name] for name in sorted(found)]


def open_mount(filesystem: MountedFilesystem) -> int:
    """A read-only descriptor on the root of ``filesystem``'s mount (for FIFREEZE/FITHAW).

    The path is opened without side effects first (``O_PATH``), must be a
    directory or regular file, and must lead to mount ``mount_id`` (another
    mount stacked on top, or a symbolic link elsewhere, is refused): raises
    ``OSError`` otherwise.
    """
    handle = os.open(filesystem.path, os.O_PATH | os.O_CLOEXEC)
    try:
        kind = os.fstat(handle).st_mode
        if not (stat.S_ISDIR(kind) or stat.S_ISREG(kind)):
            raise OSError(f"{filesystem.path} is neither a directory nor a file")
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    finally:
        os.close(handle)
    if _mount_id_of(fd) != filesystem.mount_id:
        os.close(fd)
        raise OSError(f"{filesystem.path} no longer leads to mount {filesystem.mount_id}")
    return fd


def _mount_id_of(fd: int) -> int | None:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def _mount_tables(proc: str) -> Iterator[tuple[int, list[MountLine]]]:
    """(pid, mounts) for one process of each mount namespace, this process's namespace first."""
    seen: set[str] = set()
    own = os.getpid()
    try:
        pids = sorted((int(entry) for entry in os.listdir(proc) if entry.isdigit()), key=lambda p: p != own)
    except OSError as exc:
        raise LiveCheckError(f"cannot list the processes in {proc}: {exc.strerror}") from None
    for pid in pids:
        try:
            namespace = os.readlink(os.path.join(proc, str(pid), "ns", "mnt"))
            if namespace in seen:
                continue
            lines = read_mountinfo(os.path.join(proc, str(pid), "mountinfo"))
        except OSError:
            continue  # the process ended, or is a kernel thread without a mount table
        seen.add(namespace)
        yield pid, lines


def mount_holding(path: str, lines: list[MountLine]) -> MountLine | None:
    """The mount an absolute ``path`` lies on, among ``lines``: the deepest mount point that is
    ``path`` or above it (topmost if stacked)."""
    holding = [line for line in lines if line.mountpoint == path] + [
        line for line in lines if path.startswith(line.mountpoint.rstrip("/") + "/")
    ]
    return max(reversed(holding), key=lambda line: len(line.mountpoint), default=None)  # ties: the top


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountLine]:
    """The mounts of one mountinfo file, in mount order (raises OSError)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def parse_mountinfo(text: str) -> list[MountLine]:
    """The mounts of one mountinfo file, in mount order; lines it cannot read are skipped."""
    lines = []
    for line in text.splitlines():
        fields = line.split()
        try:
            separator = fields.index("-", 6)
            major, minor = (int(n) for n in fields[2].split(":"))
            lines.append(
                MountLine(
                    int(fields[0]),
                    (major, minor),
                    _unescape(fields[4]),
                    fields[separator + 1],
                    _unescape(fields[separator + 2]),
                    f"{fields[5]},{fields[separator + 3]}",
                )
            )
        except (ValueError, IndexError):
            continue  # a line this parser does not understand holds no loop device of ours
    return lines


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
