"""What a mount is asked to be: mount point, data path, consent to overwrite, FUSE options.

No pyfuse3 here: the CLI builds a :class:`MountConfig` (and filters options
the same way ``mount.mirenfs`` does) without loading FUSE.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from mirenfs.engine.produce import Settings

DEFAULT_SPILL_LIMIT = 4 << 30

# Meaningful to mount(8), fstab or systemd only; FUSE would refuse them as unknown.
DROPPED_OPTIONS = frozenset(
    {"defaults", "rw", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group"}
)
DROPPED_PREFIXES = ("x-", "X-", "comment=")


def fuse_options(groups: Iterable[str]) -> list[str]:
    """The ``-o`` options to hand to ``mirenfs mount``, in order, without mount(8)'s own."""
    kept: list[str] = []
    for group in groups:
        for option in group.split(","):
            option = option.strip()
            if not option or option in DROPPED_OPTIONS or option.startswith(DROPPED_PREFIXES):
                continue
            if option not in kept:
                kept.append(option)
    return kept


@dataclass
class MountConfig:
    mountpoint: str
    data_path: str
    allow_overwrite: bool = False
    fuse_options: list[str] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    spill_limit: int = DEFAULT_SPILL_LIMIT

    @property
    def shared(self) -> bool:
        return "allow_other" in self.fuse_options

    @property
    def state_directory(self) -> str:
        """mirenfs's own files under the data path: index cache and spilled frames."""
        return os.path.join(self.data_path, "mirenfs")

    def kernel_options(self) -> set[str]:
        # The data path as the source, as in fstab, so `mount -a` sees the line is mounted.
        plain = self.data_path and not any(c in self.data_path for c in ", \t\n")
        options = {f"fsname={self.data_path if plain else 'mirenfs'}", "subtype=mirenfs", *self.fuse_options}
        if self.shared:
            options.add("default_permissions")  # with other users, the kernel checks modes
        return options
