"""The §7 sample image and the SHA-256 floor.

``build_sample`` makes the sparse ext4 sample once and reuses it while its stamp
says nothing touched it; ``fair_sha256`` hashes every image byte the way mirenfs
must (data extents read, holes hashed from a zero buffer), with its own
SEEK_DATA/SEEK_HOLE walk, ``data_extents``, written independently of mirenfs's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

from bench.context import GIB, MB, Context, log

SAMPLE_SOURCE = Path("/usr/lib/x86_64-linux-gnu")
SAMPLE_FORMAT = 1  # bump to force every work dir to rebuild its sample
HASH_PIECE = 1 << 20  # measured fastest (or equal) among 256 KiB-16 MiB on this machine
_ZERO_PIECE = memoryview(bytes(HASH_PIECE))


# ---------------------------------------------------------------- image helpers


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Data ranges by SEEK_DATA/SEEK_HOLE, written here independently of mirenfs's own."""
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents


def _hash_zeros(sha: hashlib._Hash, length: int) -> None:
    while length > 0:
        step = min(length, len(_ZERO_PIECE))
        sha.update(_ZERO_PIECE[:step])
        length -= step


def fair_sha256(path: Path) -> str:
    """SHA-256 of every byte of ``path``, reading only data extents: the floor."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        sha = hashlib.sha256()
        buffer = memoryview(bytearray(HASH_PIECE))
        offset = 0
        for start, end in data_extents(fd, size):
            _hash_zeros(sha, start - offset)
            position = start
            while position < end:
                got = os.preadv(fd, [buffer[: min(HASH_PIECE, end - position)]], position)
                if got == 0:
                    raise RuntimeError(f"{path} shrank while being hashed")
                sha.update(buffer[:got])
                position += got
            offset = end
        _hash_zeros(sha, size - offset)
        return sha.hexdigest()
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes as they read (a snapshot, to compare two of them)."""
    with open(path, "rb") as data:
        return hashlib.file_digest(data, "sha256").hexdigest()


def disk_usage(path: Path) -> tuple[int, int]:
    """(allocated, apparent) bytes as ``du`` reports them."""
    allocated = subprocess.run(["du", "-B1", str(path)], capture_output=True, text=True, check=True)
    apparent = subprocess.run(
        ["du", "-B1", "--apparent-size", str(path)], capture_output=True, text=True, check=True
    )
    return int(allocated.stdout.split()[0]), int(apparent.stdout.split()[0])


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


# ---------------------------------------------------------------- the sample


def sample_paths(workdir: Path, size: int) -> tuple[Path, Path]:
    label = f"{size // GIB}G" if size % GIB == 0 else str(size)
    return workdir / f"sample-{label}.img", workdir / f"sample-{label}.json"


def _stamp(size: int, info: os.stat_result) -> dict[str, object]:
    """What the sample was built as; any change (a write, a new mtime) means rebuild."""
    return {
        "format": SAMPLE_FORMAT,
        "source": str(SAMPLE_SOURCE),
        "size": size,
        "st_size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "blocks": info.st_blocks,
    }


def sample_is_valid(image: Path, stamp: Path, size: int) -> bool:
    """Reuse the sample only if nothing touched it since it was built and checked."""
    try:
        recorded: object = json.loads(stamp.read_text())
        info = image.stat()
    except (OSError, ValueError):
        return False
    return recorded == _stamp(size, info)


class SampleError(RuntimeError):
    """The sample image cannot be built as asked; the message says what to change."""


def tree_bytes(path: Path) -> int:
    """Bytes ``du`` counts under ``path`` (what ``mkfs.ext4 -d`` must fit)."""
    counted = subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True)
    return int(counted.stdout.split()[0]) if counted.returncode == 0 and counted.stdout else 0


def build_sample(workdir: Path, size: int) -> Path:
    """The §7 sample: a sparse ext4 image holding a copy of /usr/lib/x86_64-linux-gnu."""
    image, stamp = sample_paths(workdir, size)
    if sample_is_valid(image, stamp, size):
        log(f"reusing sample {image}")
        return image
    log(f"building sample {image} (mkfs.ext4 -d {SAMPLE_SOURCE}) ...")
    stamp.unlink(missing_ok=True)
    partial = image.with_name(image.name + ".building")
    partial.unlink(missing_ok=True)
    with open(partial, "wb") as out:
        out.truncate(size)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(SAMPLE_SOURCE), str(partial)], capture_output=True, text=True
    )
    if made.returncode != 0:
        partial.unlink(missing_ok=True)
        said = (made.stderr.strip().splitlines() or ["no message"])[-1]
        raise SampleError(
            f"mkfs.ext4 could not make a {human(size)} sample holding {SAMPLE_SOURCE} "
            f"({human(tree_bytes(SAMPLE_SOURCE))} of files; it said: {said}): give a larger --size, "
            f"such as {-(-2 * tree_bytes(SAMPLE_SOURCE) // GIB)}G"
        )
    fsck = subprocess.run(["e2fsck", "-fn", str(partial)], capture_output=True, text=True)
    if fsck.returncode != 0:
        raise RuntimeError(f"e2fsck rejects the fresh sample:\n{fsck.stdout}{fsck.stderr}")
    os.replace(partial, image)
    stamp.write_text(json.dumps(_stamp(size, image.stat())))
    return image


def describe_sample(ctx: Context) -> None:
    """Check the sample looks like §7 (sparse, ~730 MB of data) and record its facts."""
    allocated, apparent = disk_usage(ctx.image)
    fd = os.open(ctx.image, os.O_RDONLY)
    try:
        extents = data_extents(fd, apparent)
    finally:
        os.close(fd)
    data = sum(end - start for start, end in extents)
    ctx.facts["sample"] = (
        f"{ctx.image}: {human(apparent)} apparent, du {human(allocated)}, "
        f"{len(extents)} data extents holding {data / MB:.0f} MB"
    )
    ctx.check(
        "sample image is sparse (du well below its size)",
        allocated < apparent // 2,
        f"du {allocated / MB:.0f} MB of {apparent / MB:.0f} MB",
    )
