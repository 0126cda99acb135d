"""Shared test helpers: the Go vectors, running the CLI, hashing files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VECTORS_DIR = Path(__file__).parent / "vectors"


@dataclass(frozen=True)
class GoVector:
    file: str
    name: str
    size_bytes: int
    filesystem: str
    sha256: str

    @property
    def path(self) -> Path:
        return VECTORS_DIR / self.file


# From tests/vectors/README.md (made by Miren's Go code).
GO_VECTORS = [
    GoVector(
        "go-ext4.mirn",
        "disk-ext4",
        16777216,
        "ext4",
        "f7fd4f76f15bb25b86bdda3f0e95569bfc2ee7776c12cd046b6d641eca34bdf6",
    ),
    GoVector(
        "go-sparse.mirn",
        "disk-sparse",
        67110872,
        "ext4",
        "f29843fa74161a4d26b29407760baa99c3b18c30e7fef76df6e0b4d309275529",
    ),
    GoVector(
        "go-odd.mirn",
        "disk-odd",
        1000003,
        "xfs",
        "e74c5dbb36aa7650aac738ad78e49637c0f1baf13afb6465014b06d35bdfd6b5",
    ),
    GoVector(
        "go-empty.mirn",
        "disk-empty",
        0,
        "btrfs",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ),
]


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_sparse(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file whose holes are hashed as zeros without being read (huge sparse images)."""
    digest = hashlib.sha256()
    zeros = bytes(1 << 20)
    with open(path, "rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, 0
        while offset < size:
            try:
                data_start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                data_start = size
            for start in range(offset, data_start, len(zeros)):
                digest.update(zeros[: min(len(zeros), data_start - start)])
            if data_start >= size:
                break
            data_end = os.lseek(f.fileno(), data_start, os.SEEK_HOLE)
            f.seek(data_start)
            digest.update(f.read(data_end - data_start))
            offset = data_end
    return digest.hexdigest()


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


def mirenfs_command() -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).parent / "mirenfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mirenfs"]


def run_mirenfs(
    *args: str, input: bytes | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as users do; never hangs past ``timeout``."""
    return subprocess.run(
        [*mirenfs_command(), *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def staging_files(directory: str | os.PathLike[str]) -> list[str]:
    return sorted(str(p) for p in Path(directory).rglob("*.restore.tmp"))


def write_image(path: Path, segments: list[tuple[str, int]], seed: int = 0) -> bytes:
    """Build an image from (kind, length) segments: 'hole', 'zero', 'data', 'text'.

    Holes are left unwritten (sparse); zero runs are written as real zeros.
    Returns the image's bytes for comparison.
    """
    rng = __import__("random").Random(seed)
    content = bytearray()
    with open(path, "wb") as f:
        for kind, length in segments:
            if kind == "hole":
                f.seek(length, os.SEEK_CUR)
                content += bytes(length)
                continue
            if kind == "zero":
                piece = bytes(length)
            elif kind == "data":
                piece = rng.randbytes(length)
            else:
                piece = (b"mirenfs text %d\n" % rng.randrange(1000) * (length // 16 + 1))[:length]
            f.write(piece)
            content += piece
        f.truncate(len(content))
    return bytes(content)


@pytest.fixture
def need_tool():
    def check(name: str) -> str:
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        return found

    return check


def wait_for(condition, timeout: float = 20.0, what: str = "condition", interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def abort_fuse_connection(mountpoint: str) -> None:
    """Last resort for a hung mount: abort its FUSE connection through fusectl.

    The connection is found by the device number in /proc/self/mountinfo,
    because a stat of a hung mount would hang too.
    """
    connections = Path("/sys/fs/fuse/connections")
    if not os.path.ismount(connections):
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], capture_output=True, timeout=10)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == mountpoint:
            abort = connections / fields[2].split(":")[1] / "abort"
            with contextlib.suppress(OSError):
                abort.write_text("1")
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, timeout=10)


class Mount:
    """A `mirenfs mount --foreground` process; always unmounted and reaped by `stop()`."""

    def __init__(self, mountpoint: Path, data_path: Path, *extra: str) -> None:
        self.mountpoint = mountpoint
        self.data_path = data_path
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_path.parent / f"{mountpoint.name}-mount.log"

    def start(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            [
                *mirenfs_command(),
                "mount",
                str(self.mountpoint),
                "--foreground",
                "--data-path",
                str(self.data_path),
                *self.extra,
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()

        def mounted() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"mount exited with {self.process.returncode}: {self.log()}")
            return os.path.ismount(self.mountpoint)

        wait_for(mounted, what=f"{self.mountpoint} to be mounted")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """Unmount and wait for the daemon; abort a hung connection if it comes to that."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if os.path.ismount(self.mountpoint):
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=20)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            abort_fuse_connection(str(self.mountpoint))
            process.kill()
            process.wait(timeout=20)
            raise AssertionError(f"the mount process did not exit after unmount: {self.log()}") from None
        finally:
            if os.path.ismount(self.mountpoint):
                abort_fuse_connection(str(self.mountpoint))


@pytest.fixture
def mounts():  # type: ignore[no-untyped-def]
    """Start mounts with `mounts(mountpoint, data_path, *args)`; all are stopped after the test."""
    started: list[Mount] = []

    def start(mountpoint: Path, data_path: Path, *extra: str) -> Mount:
        mount = Mount(mountpoint, data_path, *extra)
        started.append(mount)
        return mount.start()

    yield start
    for mount in started:
        mount.stop()
