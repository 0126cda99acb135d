"""The inputs the restore and incremental figures need, made untimed: the sample's snapshot
as Go's writer makes it (one zstd frame of unknown content size), a tar archive of it, a
sparse copy of the sample, and a 1% change to such a copy.

Nothing here times anything; every function leaves the sample image untouched (its stamp
would otherwise force a rebuild).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from bench.context import Context, log, run_command
from bench.sample import data_extents

TAR_MEMBER = "tarred.mirn"  # the disk name the archive restores
CHANGE_SHARE = 0.01  # the incremental figure's change: 1% of the image
BLOCK = 64 << 10  # dd's block size for the change
CHUNK = 4 << 20  # mirenfs's chunk size


def snapshot_data_offset(path: Path) -> int:
    """Where the zstd data starts: 12 + the big-endian metadata length at offset 8."""
    with open(path, "rb") as snapshot:
        head = snapshot.read(12)
    if len(head) < 12 or head[:4] != b"MIRN":
        raise RuntimeError(f"{path} is not a .mirn snapshot")
    return 12 + int.from_bytes(head[8:12], "big")


def ensure_one_frame(ctx: Context) -> Path:
    """The sample as Go's writer makes it: mirenfs's header, then one zstd frame of the whole
    image compressed from a pipe (so without a content size), as ``zstd -3`` writes it."""
    if ctx.one_frame is not None and ctx.one_frame.exists():
        return ctx.one_frame
    snapshot = ctx.ensure_snapshot()
    with open(snapshot, "rb") as source:
        header = source.read(snapshot_data_offset(snapshot))
    path = ctx.temp_path("sample-one-frame.mirn")
    log("  making a one-frame (Go-style) snapshot of the sample (untimed)")
    with open(path, "wb") as out:
        out.write(header)
        out.flush()
        with subprocess.Popen(["cat", str(ctx.image)], stdout=subprocess.PIPE) as cat:
            subprocess.run(["zstd", "-q", "-3", "-T2", "-c"], stdin=cat.stdout, stdout=out, check=True)
    ctx.one_frame = path
    ctx.facts["one-frame"] = f"{path}: {path.stat().st_size / 1e6:.1f} MB, one zstd frame, no content size"
    return path


def ensure_tar_archive(ctx: Context) -> Path:
    """A tar archive holding the one-frame snapshot as ``tarred.mirn``: ``tar -xf`` writes it
    in 10 KiB records, the small writes the tar figure is about."""
    path = ctx.temp_path("sample-one-frame.tar")
    if path.exists():
        return path
    source = ensure_one_frame(ctx)
    rename = f"s,.*,{TAR_MEMBER},"
    run_command(["tar", "-cf", str(path), "--transform", rename, "-C", str(source.parent), source.name])
    return path


def sparse_copy(ctx: Context, name: str) -> Path:
    """A sparse copy of the sample the incremental figure may change."""
    path = ctx.temp_path(name)
    path.unlink(missing_ok=True)
    run_command(["cp", "--sparse=always", str(ctx.image), str(path)])
    return path


def change_one_percent(image: Path, rng: random.Random, *, in_first_chunk: bool = False) -> None:
    """Overwrite 1% of ``image`` in place (``dd conv=notrunc``) with file data from elsewhere
    in it, at a new place each time: as compressible as the rest, never what was there, and
    never a chunk-aligned copy (4 MiB chunks that already exist would not count as changed).

    ``in_first_chunk`` starts the change inside the first chunk, as on a disk whose
    filesystem was mounted since its last snapshot (ext4 rewrites its superblock, at 1 KiB):
    the whole image must then be hashed again, where a change further in lets the pass
    resume the hash from the last unchanged chunk."""
    size = image.stat().st_size
    count = max(1, int(size * CHANGE_SHARE) // BLOCK)
    runs = _data_runs(image, count)  # read once: the image's extents, not once per attempt
    for _ in range(1000):
        first, last = rng.choice(runs)
        source = rng.randrange(first, last + 1)
        if in_first_chunk:
            target = rng.randrange(1, CHUNK // BLOCK)
        else:
            target = rng.randrange(0, size // BLOCK - count)
        if abs(target - source) >= count and (target - source) % (CHUNK // BLOCK):
            break
    else:
        raise RuntimeError(f"{image} has no data far enough from where the 1% change must go")
    run_command(
        [
            "dd",
            f"if={image}",
            f"of={image}",
            f"bs={BLOCK}",
            f"skip={source}",
            f"seek={target}",
            f"count={count}",
            "conv=notrunc",
            "status=none",
        ]
    )


def _data_runs(image: Path, count: int) -> list[tuple[int, int]]:
    """The ranges of block offsets where ``count`` blocks of data (no hole) start."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents = data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    runs = [(-(-start // BLOCK), end // BLOCK - count) for start, end in extents]
    runs = [(first, last) for first, last in runs if last >= first]
    if not runs:
        raise RuntimeError(f"{image} holds no {count * BLOCK} contiguous bytes of data to copy")
    return runs
