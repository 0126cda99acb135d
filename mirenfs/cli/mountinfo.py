"""The mounts this host has, from ``/proc/self/mountinfo``: which are mirenfs, and where.

Used by ``status`` (find the mounts to ask) and by ``mount`` and
``mount.mirenfs`` (refuse to stack a second mount on a mirenfs mount).
"""

from __future__ import annotations

import os

from mirenfs.disks.live import MountLine, read_mountinfo
from mirenfs.disks.live import mount_holding as deepest_mount  # the same rule, for the CLI's mounts
from mirenfs.errors import MirenfsError

FSTYPE = "fuse.mirenfs"
MOUNTINFO = "/proc/self/mountinfo"


MountEntry = MountLine  # one mount, as the CLI looks at it


def mounts(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount this process sees, in mount order."""
    return read_mountinfo(path)


def mirenfs_mounts() -> list[MountEntry]:
    """The mirenfs mounts, the topmost last when several share a mount point."""
    return [entry for entry in mounts() if entry.fstype == FSTYPE]


def mount_at(path: str) -> MountEntry:
    """The mirenfs mount whose mount point is ``path``, or a clear error naming what is there.

    A mount point spelt as mountinfo has it is found without touching the path: a ``stat`` of
    a stopped daemon's mount point waits in the kernel for ever (even past SIGKILL)."""
    everything = mounts()
    spelt = os.path.abspath(path)
    known = any(entry.mountpoint == spelt for entry in everything)
    target = spelt if known else os.path.realpath(path)  # else a symlink on the way; non-strict
    covering = [entry for entry in everything if entry.mountpoint == target]
    if covering and covering[-1].fstype == FSTYPE:
        return covering[-1]
    if not os.path.exists(target) and not covering:
        raise MirenfsError(f"{path} does not exist")
    if covering:
        raise MirenfsError(
            f"{path} is not a mirenfs mount (a {covering[-1].fstype} filesystem is mounted there)"
        )
    inside = _containing(target, mirenfs_mounts())
    if inside:
        raise MirenfsError(f"{path} is inside the mirenfs mount {inside[-1].mountpoint}; give that instead")
    raise MirenfsError(f"{path} is not a mirenfs mount")


def mount_holding(path: str) -> MountEntry | None:
    """The mount ``path`` lies on: the deepest mount point that is ``path`` or above it (topmost
    if stacked). Read from mountinfo, so it answers for a dead mount too."""
    return deepest_mount(os.path.abspath(path), mounts())


def mirenfs_mount_holding(path: str) -> str | None:
    """The mount point of the mirenfs mount a file at ``path`` would lie in, if any: as spelt
    first (nothing is touched, so a stopped daemon cannot hang the question), then where its
    directory really is (review C: a link into a mount registered the mount's own snapshot as
    an image, and the mount then waited on itself for good)."""
    directory = os.path.dirname(os.path.abspath(path))
    for resolve in (False, True):  # resolved only once the spelling is cleared
        holding = mount_holding(os.path.realpath(directory) if resolve else directory)
        if holding is not None and holding.fstype == FSTYPE:
            return holding.mountpoint
    return None


def refuse_if_mirenfs_mount(directory: str) -> None:
    """A second mount on a mirenfs mount would hide the first (and ``mount -a`` cannot tell the
    fstab line is mounted, since the source it shows is not always the data path): refuse it.
    One inside a mirenfs mount (on its ``restore/``) would hide that mount's restores: refuse it too."""
    served = mirenfs_mounts()
    # As spelt first, without touching the path: resolving it stats each part, and a stat of a
    # stopped daemon's mount point waits in the kernel for ever (a mount over it hung).
    for resolve in (False, True):  # resolved only once the spelling is cleared
        target = os.path.realpath(directory) if resolve else os.path.abspath(directory)
        if any(entry.mountpoint == target for entry in served):
            raise MirenfsError(
                f"{directory} is already a mirenfs mount; unmount it first (umount {directory})"
            )
        inside = _containing(target, served)
        if inside:
            where = inside[-1].mountpoint
            raise MirenfsError(
                f"{directory} is inside the mirenfs mount {where}; mount on a directory of its own"
            )


def _containing(target: str, candidates: list[MountEntry]) -> list[MountEntry]:
    """The mounts among ``candidates`` that ``target`` (a real path) lies below, in mount order."""
    return [entry for entry in candidates if target.startswith(entry.mountpoint.rstrip("/") + "/")]
