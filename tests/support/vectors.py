"""The snapshots made by Miren's Go code (tests/vectors/README.md), with what they must restore to.

Data only: the one list every test takes the Go vectors from. Never written to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"


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

# By name, for tests about one of them: a real ext4 filesystem, a sparse one, an odd size, an empty one.
GO_EXT4, GO_SPARSE, GO_ODD, GO_EMPTY = GO_VECTORS
