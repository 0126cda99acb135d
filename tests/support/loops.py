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
    losetup = shutil.which("losetup")
    assert losetup is not None, "losetup is not installed; .ci/run installs util-linux"
    attached = subprocess.run(
        [losetup, "-f", "--show", str(image)], capture_output=True, text=True, timeout=30, check=False
    )
    assert attached.returncode == 0, f"losetup -f --show {image} failed: {attached.stderr}"
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        detached = subprocess.run([losetup, "-d", device], capture_output=True, text=True, timeout=30)
        assert detached.returncode == 0, f"losetup -d {device} failed: {detached.stderr}"
