"""Shared test helpers: the Go vectors, running the CLI, hashing files."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
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


def mirenfs_command() -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).parent / "mirenfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mirenfs.cli"]


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
