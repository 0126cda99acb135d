"""The figures: one ``measure_*`` function per figure, and ``MEASUREMENTS``, their order.

Each function times its figure with ``Context.time_runs``, adds it with
``Context.add`` and records its correctness checks with ``Context.check``; floors
go to ``Context.floors`` for the later figures' ratios. The mount figures
(``bench.mount_figures``) run in order on one mount of the sample
(``bench.mount.mounted_sample``), each leaving the mount as the next expects, so
``--only mount`` selects them together.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from bench.catalog import measure_catalog
from bench.context import (
    MB,
    CommandFailed,
    Context,
    Figure,
    Sample,
    evict_from_page_cache,
    log,
    run_command,
)
from bench.mount import mounted_sample
from bench.mount_figures import MOUNT_FIGURES, measure_mount_rss
from bench.sample import disk_usage, fair_sha256, file_sha256
from bench.snapshots import ensure_one_frame, snapshot_data_offset

BACKUP_TARGET = 1.2
CLI_RESTORE_TARGET = 1.1
VERIFY_CHECK = "mirenfs verify passes on the backup"
RESTORE_PIECE = 4 << 20  # what the restore pipeline decompresses into at a time


# ---------------------------------------------------------------- helpers


def add_info(ctx: Context, name: str, samples: list[Sample], *, floor: str) -> Figure:
    """A row shown for what it explains, held to no target."""
    return ctx.add(Figure(name, samples, floor=floor, note="info"))


def verify_once(ctx: Context, snapshot: Path) -> Sample | None:
    try:
        sample = run_command(ctx.mirenfs_cmd("verify", str(snapshot)))
    except CommandFailed as exc:
        ctx.check(VERIFY_CHECK, False, str(exc))
        return None
    ctx.check(VERIFY_CHECK, True, f"{sample.seconds:.2f} s")
    return sample


# ---------------------------------------------------------------- floors and references


def measure_floor(ctx: Context) -> None:
    """SHA-256 of the image, holes from a zero buffer: the floor of every snapshot."""
    log("floor: fair SHA-256 (data extents read, holes hashed from zeros)")
    digests: list[str] = []
    figure = ctx.add(
        Figure(
            "SHA-256 floor (hashlib, holes not read)",
            ctx.time_runs(lambda: digests.append(fair_sha256(ctx.image))),
            floor="sha256",
            note="the floor",
        )
    )
    ctx.floors["sha256"] = figure.seconds
    ctx.floor_run = lambda: digests.append(fair_sha256(ctx.image))  # the paired figures' floor
    ctx.floors["sha256 cpu"] = figure.cpu_seconds or figure.seconds  # what the daemon's CPU is held to
    ctx.image_sha256 = digests[0]
    ctx.check("fair SHA-256 is stable across runs", len(set(digests)) == 1, digests[0])


def measure_contended_floor(ctx: Context) -> None:
    """The SHA-256 floor again while the other core hashes too: what the hash lane of a pipeline
    gets when compression or decompression keeps the second core busy. On a VM whose cores share
    a physical core or its power budget this is slower than the floor, and every two-core figure
    whose pace the hash sets carries that difference however well it overlaps its work."""
    log("info: the SHA-256 floor while the other core hashes too")
    stop = threading.Event()

    def busy() -> None:
        zeros = bytes(4 << 20)
        while not stop.is_set():
            hashlib.sha256(zeros).digest()

    def contended() -> None:
        stop.clear()
        neighbour = threading.Thread(target=busy, name="bench-busy-core")
        neighbour.start()
        try:
            fair_sha256(ctx.image)
        finally:
            stop.set()
            neighbour.join()

    add_info(
        ctx, "SHA-256 floor, other core busy (info)", ctx.time_runs(contended, paired=True), floor="sha256"
    )


def measure_sha256sum(ctx: Context) -> None:
    """Plain sha256sum reads the holes too: a reference, not the floor."""
    log("reference: sha256sum image")
    ctx.add(
        Figure(
            "sha256sum image (NOT the floor: reads holes)",
            ctx.time_runs(ctx.command(["sha256sum", str(ctx.image)])),
            floor="sha256",
            note="reference",
        )
    )


def measure_zstd(ctx: Context) -> None:
    """zstd -3 -T2 does not hash at all: the comparison figure of §7."""
    log("reference: zstd -3 -T2 -c image > /dev/null")
    figure = ctx.add(
        Figure(
            "zstd -3 -T2 -c image >/dev/null",
            ctx.time_runs(ctx.command(["zstd", "-q", "-3", "-T2", "-c", str(ctx.image)])),
            floor="sha256",
            note="reference",
        )
    )
    ctx.floors["zstd"] = figure.seconds


def measure_startup(ctx: Context) -> None:
    """How much of each CLI figure is interpreter start and imports."""
    log("info: mirenfs --help (interpreter start and imports)")
    add_info(
        ctx,
        "mirenfs --help (startup cost)",
        ctx.time_runs(ctx.command(ctx.mirenfs_cmd("--help"))),
        floor="sha256",
    )


# ---------------------------------------------------------------- the CLI


def measure_backup(ctx: Context) -> None:
    """mirenfs backup to a file next to the sample; bytes must repeat run after run."""
    log("mirenfs backup --image IMAGE -o FILE")
    output = ctx.temp_path("sample.mirn")
    digests: list[str] = []
    runner = ctx.command(ctx.backup_cmd(output))

    def run() -> Sample:
        sample = runner()
        digests.append(file_sha256(output))  # after the clock stopped
        return sample

    ctx.add(
        Figure(
            "mirenfs backup -o FILE",
            ctx.time_runs(run, before=os.sync, paired=True),
            floor="sha256",
            target=BACKUP_TARGET,
        )
    )
    ctx.snapshot = output
    size = output.stat().st_size
    ctx.facts["snapshot"] = (
        f"{output}: {size / MB:.1f} MB ({ctx.image.stat().st_size / size:.1f}:1 of the image)"
    )
    ctx.check("backup bytes identical on every run", len(set(digests)) == 1, f"{len(digests)} runs")
    header = subprocess.run(ctx.mirenfs_cmd("inspect", "--json", str(output)), capture_output=True, text=True)
    if header.returncode != 0:
        raise CommandFailed(f"mirenfs inspect failed: {header.stderr.strip()}")
    checksum = json.loads(header.stdout)["checksum"]
    ctx.check("snapshot header checksum = fair SHA-256 of the image", checksum == ctx.image_sha256, checksum)
    if "verify" not in ctx.selected:
        verify_once(ctx, output)


def measure_backup_cold(ctx: Context) -> None:
    """Backup with the image out of the page cache: adds the disk's read speed,
    and shows whether any lane reads the image twice from disk."""
    output = ctx.temp_path("sample-cold.mirn")
    log("info: mirenfs backup with the image evicted from the page cache")

    def evict() -> None:
        os.sync()
        evict_from_page_cache(ctx.image)

    ctx.add(
        Figure(
            "mirenfs backup, image not in page cache",
            ctx.time_runs(ctx.command(ctx.backup_cmd(output)), before=evict),
            floor="sha256",
            note="info (cold)",
        )
    )
    evict_from_page_cache(ctx.image)  # the next figures warm it up again in their warm-up run
    fair_sha256(ctx.image)


def ensure_restore_floor(ctx: Context) -> str:
    """The restore floor, measured once: the slower of SHA-256 and ``zstd -d`` of the
    one-frame snapshot's data (Go's layout, the case the restore targets are set for)."""
    if "restore" in ctx.floors:
        return "restore"
    snapshot = ensure_one_frame(ctx)
    offset = snapshot_data_offset(snapshot)
    log(f"restore floor: zstd -d -c of the one-frame snapshot's data (from byte {offset}) > /dev/null")
    fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)

    def rewind() -> None:
        """zstd reads the inherited descriptor from the data's first byte (header skipped)."""
        os.lseek(fd, offset, os.SEEK_SET)

    try:
        decompress = ctx.command(["zstd", "-q", "-d", "-c"], stdin=fd)
        figure = ctx.add(
            Figure(
                "zstd -d -c one-frame data >/dev/null",
                ctx.time_runs(decompress, before=rewind),
                floor="sha256",
                note="floor part",
            )
        )
    finally:
        os.close(fd)
    ctx.floors["zstd -d"] = figure.seconds
    ctx.floors["restore"] = max(ctx.floors["sha256"], figure.seconds)
    log("info: the one-frame restore's own bound: its decompression ahead of the hash, in process")
    bounds: list[StreamBound] = []

    def bound_run() -> Sample:
        bounds.append(one_stream_bound(snapshot, offset))
        return Sample(bounds[-1].seconds, bounds[-1].hashing + bounds[-1].decompressing)

    add_info(
        ctx,
        "one-frame restore's bound: hash waits for 1 zstd stream (info)",
        ctx.time_runs(bound_run, paired=True),
        floor="restore",
    )
    last = bounds[-1]
    ctx.facts["one-frame bound"] = (
        f"{last.seconds:.2f} s = {last.ratio:.3f}x the slower of its own hash ({last.hashing:.2f} s) and "
        f"decompression ({last.decompressing:.2f} s), CPU seconds of one thread (last run)"
    )
    return "restore"


@dataclass(frozen=True)
class StreamBound:
    """What :func:`one_stream_bound` measured, in CPU seconds of one thread."""

    seconds: float
    hashing: float
    decompressing: float

    @property
    def ratio(self) -> float:
        """The bound against the slower of the two totals: independent of a busy neighbour."""
        return self.seconds / max(self.hashing, self.decompressing)


def one_stream_bound(snapshot: Path, offset: int) -> StreamBound:
    """The least time any restore of a one-frame snapshot can take on two cores, with no
    process start, FUSE or writes: one stream decompresses in order, and the hash of a piece
    cannot start before the piece is out. Where the data compresses (the sample's first
    700 MiB), the stream is slower than the hash; in the holes the hash is slower. So the
    bound is the largest, over the pieces, of the decompression up to a piece plus the hash
    from it on, not the slower of the two totals, which is the floor. Each is timed here in
    CPU seconds of this thread, one after the other: what a core gives them when it is free."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 31)
    sha = hashlib.sha256()
    piece = bytearray(RESTORE_PIECE)
    view = memoryview(piece)
    decompressed_by: list[float] = []  # decompression seconds up to and including piece i
    hashed_before: list[float] = []  # hash seconds of the pieces before piece i
    decompressing = hashing = 0.0
    with open(snapshot, "rb") as data:
        data.seek(offset)
        reader = decompressor.stream_reader(data, read_size=1 << 20, read_across_frames=True)
        while True:
            started = time.thread_time()
            length = reader.readinto(piece)
            decompressing += time.thread_time() - started
            if not length:
                break
            decompressed_by.append(decompressing)
            hashed_before.append(hashing)
            started = time.thread_time()
            sha.update(view[:length])
            hashing += time.thread_time() - started
    bound = max(
        (out + hashing - before for out, before in zip(decompressed_by, hashed_before, strict=True)),
        default=0.0,
    )
    return StreamBound(bound, hashing, decompressing)


def measure_restore(ctx: Context) -> None:
    """mirenfs restore of the one-frame and of mirenfs's own snapshot, against the restore floor.

    Each run writes ~700 MB and fsyncs it. On this VM the kernel throttles such a
    write burst after the disk was idle a while (pwrite drops from ~5.5 GB/s to
    ~0.4 GB/s after ~400 MB), so restore figures vary more than the others.
    """
    floor = ensure_restore_floor(ctx)
    restored = ctx.temp_path("restored.img")

    def reset() -> None:
        """Every run writes a new image: an old one would make later runs cheaper or dearer."""
        restored.unlink(missing_ok=True)
        os.sync()

    for label, snapshot, target in (
        ("one-frame", ensure_one_frame(ctx), CLI_RESTORE_TARGET),
        ("mirenfs's", ctx.ensure_snapshot(), None),
    ):
        log(f"mirenfs restore {label} snapshot --image OUT --force")
        command = ctx.mirenfs_cmd("restore", str(snapshot), "--image", str(restored), "--force")
        ctx.add(
            Figure(
                f"mirenfs restore FILE --image OUT ({label})",
                ctx.time_runs(ctx.command(command), before=reset, paired=target is not None),
                floor=floor,
                target=target,
                note="info" if target is None else "",
            )
        )
        check_restored_image(ctx, restored, f"CLI restore of the {label} snapshot")


def check_restored_image(ctx: Context, restored: Path, what: str) -> None:
    """The restored image has the original's bytes and is sparse."""
    digest = fair_sha256(restored)
    ctx.check(f"{what}: image SHA-256 = original", digest == ctx.image_sha256, digest)
    allocated, apparent = disk_usage(restored)
    original_allocated, _ = disk_usage(ctx.image)
    ctx.check(
        f"{what}: image is sparse (du no larger than the original's)",
        allocated <= original_allocated and apparent == ctx.image.stat().st_size,
        f"du {allocated / MB:.0f} MB, original {original_allocated / MB:.0f} MB",
    )


def measure_verify(ctx: Context) -> None:
    """mirenfs verify of the one-frame snapshot (restore without the writing), and of mirenfs's
    own, whose frames decompress on every core (info)."""
    floor = ensure_restore_floor(ctx)
    for label, snapshot, target in (
        ("one-frame", ensure_one_frame(ctx), CLI_RESTORE_TARGET),
        ("mirenfs's", ctx.ensure_snapshot(), None),
    ):
        log(f"mirenfs verify FILE ({label}; decompress + hash, no writes)")
        ctx.add(
            Figure(
                f"mirenfs verify FILE ({label})",
                ctx.time_runs(
                    ctx.command(ctx.mirenfs_cmd("verify", str(snapshot))), paired=target is not None
                ),
                floor=floor,
                target=target,
                note="info" if target is None else "",
            )
        )
    ctx.check(VERIFY_CHECK, True, "every run exited 0")


def measure_mount(ctx: Context) -> None:
    """The mount: every figure of ``MOUNT_FIGURES``, in order, on one mount of the sample."""
    ensure_restore_floor(ctx)
    with mounted_sample(ctx) as mounted:
        for measure in MOUNT_FIGURES:
            measure(ctx, mounted)


# ---------------------------------------------------------------- the list


@dataclass(frozen=True)
class Measurement:
    name: str
    run: Callable[[Context], None]
    required: bool = False  # floors and references every ratio needs


MEASUREMENTS: list[Measurement] = [
    Measurement("floor", measure_floor, required=True),
    Measurement("zstd", measure_zstd, required=True),
    Measurement("contended", measure_contended_floor),
    Measurement("sha256sum", measure_sha256sum),
    Measurement("startup", measure_startup),
    Measurement("backup", measure_backup),
    Measurement("backup-cold", measure_backup_cold),
    Measurement("restore", measure_restore),
    Measurement("verify", measure_verify),
    Measurement("mount", measure_mount),
    Measurement("mount-rss", measure_mount_rss),
    Measurement("catalog", measure_catalog),
]
