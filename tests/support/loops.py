"""Loop devices for the kernel tier: attached for a block, always detached afterwards.

Fails (never skips) when losetup is missing: the kernel tier needs root and util-linux.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """Attach ``image`` to a free loop device for the block; always detached afterwards."""
    with _attached([_losetup(), "-f", "--show", str(image)]) as device:
        yield device


@contextlib.contextmanager
def loop_device_from_another_namespace(image: Path, view: Path) -> Iterator[str]:
    """Attach ``image`` as a container would: from a mount namespace of its own, through a bind
    mount of its directory at ``view`` that only that namespace has. Once that namespace is
    gone, ``/sys`` shows the backing file by a path of that mount's (``/disk.img``), which leads
    nowhere on the host."""
    view.mkdir()
    script = f'mount --bind "$1" "$2" && exec {_losetup()} -f --show "$2/$3"'
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare is not installed; .ci/run installs util-linux"
    argv = [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh", str(image.parent), str(view)]
    with _attached([*argv, image.name]) as device:
        yield device


def _losetup() -> str:
    losetup = shutil.which("losetup")
    assert losetup is not None, "losetup is not installed; .ci/run installs util-linux"
    return losetup


@contextlib.contextmanager
def _attached(command: list[str]) -> Iterator[str]:
    losetup = _losetup()
    attached = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert attached.returncode == 0, f"{' '.join(command)} failed: {attached.stderr}"
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        detached = subprocess.run([losetup, "-d", device], capture_output=True, text=True, timeout=30)
        assert detached.returncode == 0, f"losetup -d {device} failed: {detached.stderr}"
