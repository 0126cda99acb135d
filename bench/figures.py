"""The figures: one ``measure_*`` function per figure, and ``MEASUREMENTS``, their order.

Each function times its figure with ``Context.time_runs``, adds it with
``Context.add`` and records its correctness checks with ``Context.check``; floors
go to ``Context.floors`` for the later figures' ratios. The mount figures run in
order on one mount of the sample (``bench.mount.mounted_sample``), each leaving
the mount as the next expects, so ``--only mount`` selects them together.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.context import (
    GIB,
    MB,
    CommandFailed,
    Context,
    Figure,
    Sample,
    evict_from_page_cache,
    log,
    run_command,
    timed,
)
from bench.mount import MountedSample, add_disk, fresh_dir, mounted_sample, running_mount
from bench.sample import disk_usage, fair_sha256

BACKUP_TARGET = 1.2
RESTORE_TARGET = 1.25
VERIFY_CHECK = "mirenfs verify passes on the backup"


# ---------------------------------------------------------------- helpers


def snapshot_data_offset(path: Path) -> int:
    """Where the zstd data starts: 12 + the big-endian metadata length at offset 8."""
    with open(path, "rb") as snapshot:
        head = snapshot.read(12)
    if len(head) < 12 or head[:4] != b"MIRN":
        raise RuntimeError(f"{path} is not a .mirn snapshot")
    return 12 + int.from_bytes(head[8:12], "big")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as data:
        return hashlib.file_digest(data, "sha256").hexdigest()


def restore_floor(ctx: Context) -> str:
    """The floor of a figure that restores: restore's when measured, else SHA-256."""
    return "restore" if "restore" in ctx.floors else "sha256"


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
    ctx.image_sha256 = digests[0]
    ctx.check("fair SHA-256 is stable across runs", len(set(digests)) == 1, digests[0])


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
    ctx.add(
        Figure(
            "mirenfs --help (startup cost)",
            ctx.time_runs(ctx.command(ctx.mirenfs_cmd("--help"))),
            floor="sha256",
            note="info",
        )
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
            "mirenfs backup -o FILE", ctx.time_runs(run, before=os.sync), floor="sha256", target=BACKUP_TARGET
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


def measure_restore(ctx: Context) -> None:
    """mirenfs restore, against the slower of SHA-256 and zstd -d of the same data.

    Each run writes ~700 MB and fsyncs it. On this VM the kernel throttles such a
    write burst after the disk was idle a while (pwrite drops from ~5.5 GB/s to
    ~0.4 GB/s after ~400 MB), so restore figures vary more than the others.
    """
    snapshot = ctx.ensure_snapshot()
    offset = snapshot_data_offset(snapshot)
    log(f"restore floor: zstd -d -c of the snapshot's zstd data (from byte {offset}) > /dev/null")
    fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)

    def rewind() -> None:
        """zstd reads the inherited descriptor from the data's first byte (header skipped)."""
        os.lseek(fd, offset, os.SEEK_SET)

    try:
        decompress = ctx.command(["zstd", "-q", "-d", "-c"], stdin=fd)
        figure = ctx.add(
            Figure(
                "zstd -d -c snapshot-data >/dev/null",
                ctx.time_runs(decompress, before=rewind),
                floor="sha256",
                note="floor part",
            )
        )
    finally:
        os.close(fd)
    ctx.floors["zstd -d"] = figure.seconds
    ctx.floors["restore"] = max(ctx.floors["sha256"], figure.seconds)

    log("mirenfs restore FILE --image OUT --force")
    restored = ctx.temp_path("restored.img")

    def reset() -> None:
        """Every run writes a new image: an old one would make later runs cheaper or dearer."""
        restored.unlink(missing_ok=True)
        os.sync()

    command = ctx.mirenfs_cmd("restore", str(snapshot), "--image", str(restored), "--force")
    ctx.add(
        Figure(
            "mirenfs restore FILE --image OUT",
            ctx.time_runs(ctx.command(command), before=reset),
            floor="restore",
            target=RESTORE_TARGET,
        )
    )
    digest = fair_sha256(restored)
    ctx.check("restored image SHA-256 = original", digest == ctx.image_sha256, digest)
    allocated, apparent = disk_usage(restored)
    original_allocated, _ = disk_usage(ctx.image)
    ctx.check(
        "restored image is sparse (du no larger than the original's)",
        allocated <= original_allocated and apparent == ctx.image.stat().st_size,
        f"du {allocated / MB:.0f} MB, original {original_allocated / MB:.0f} MB",
    )


def measure_verify(ctx: Context) -> None:
    """mirenfs verify is restore without the writing: it splits restore's cost."""
    snapshot = ctx.ensure_snapshot()
    log("info: mirenfs verify FILE (decompress + hash, no writes)")
    ctx.add(
        Figure(
            "mirenfs verify FILE (restore minus writes)",
            ctx.time_runs(ctx.command(ctx.mirenfs_cmd("verify", str(snapshot)))),
            floor=restore_floor(ctx),
            note="info",
        )
    )
    ctx.check(VERIFY_CHECK, True, "every run exited 0")


# ---------------------------------------------------------------- the mount


def measure_mount_cold_cat(ctx: Context, mounted: MountedSample) -> None:
    """cat NAME.mirn with no index: the index pass runs inside the read."""
    log("mount: cold cat NAME.mirn (no index: the pass runs inside the read)")
    ctx.add(
        Figure(
            "mount: cold cat NAME.mirn (index pass + read)",
            ctx.time_runs(
                ctx.command(["cat", str(mounted.snapshot)]),
                before=lambda: mounted.mount.restart(forget_index=True),
            ),
            floor="sha256",
            target=1.25,
        )
    )
    expected = file_sha256(ctx.ensure_snapshot())
    ctx.check("mount bytes = mirenfs backup bytes", file_sha256(mounted.snapshot) == expected, expected[:16])


def measure_mount_warm_read(ctx: Context, mounted: MountedSample) -> None:
    """cat NAME.mirn again, with the index and the page cache in place."""
    log("mount: warm re-read (index and page cache in place)")
    ctx.add(
        Figure(
            "mount: warm re-read",
            ctx.time_runs(ctx.command(["cat", str(mounted.snapshot)])),
            floor="sha256",
            target=0.5,
        )
    )


def measure_mount_stat(ctx: Context, mounted: MountedSample) -> None:
    """stat NAME.mirn after a remount: the persisted index answers, no pass runs."""
    log("mount: stat after a remount (the persisted index answers)")
    ctx.add(
        Figure(
            "mount: stat after remount",
            ctx.time_runs(
                lambda: Sample(timed(os.stat, mounted.snapshot)),
                before=lambda: mounted.mount.restart(forget_index=False),
            ),
            floor="sha256",
            limit=1.0,
        )
    )
    passes = os.getxattr(mounted.mountpoint, "user.mirenfs.index_passes").decode()
    ctx.check("stat after remount ran no index pass", passes == "0", f"index passes {passes}")


def measure_mount_random_read(ctx: Context, mounted: MountedSample) -> None:
    """p99 of 200 random 128 KiB reads after a remount (frames compressed on demand)."""
    log("mount: random 128 KiB reads after a remount (frames compressed on demand)")
    snapshot = mounted.snapshot

    def random_reads() -> Sample:
        size = snapshot.stat().st_size
        rng = random.Random(len(ctx.figures))
        fd = os.open(snapshot, os.O_RDONLY)
        try:
            latencies = sorted(timed(os.pread, fd, 128 << 10, rng.randrange(0, size)) for _ in range(200))
        finally:
            os.close(fd)
        return Sample(latencies[int(len(latencies) * 0.99) - 1])

    ctx.add(
        Figure(
            "mount: random 128 KiB read, p99",
            ctx.time_runs(random_reads, before=lambda: mounted.mount.restart(forget_index=False)),
            floor="sha256",
            limit=0.05,
        )
    )


def measure_mount_cp_restore(ctx: Context, mounted: MountedSample) -> None:
    """cp of the snapshot into restore/: a new disk each run, checked against the original."""
    snapshot_file = ctx.ensure_snapshot()
    data = mounted.data
    log("mount: cp of the snapshot into restore/ (a new disk each run)")
    counter = iter(range(1000))
    current: list[str] = []

    def before_restore() -> None:
        for old in current:
            run_command(ctx.mirenfs_cmd("disk", "remove", old, "--data-path", str(data)))
        current[:] = [f"restored-{next(counter)}"]
        os.sync()

    ctx.add(
        Figure(
            "mount: cp snapshot into restore/",
            ctx.time_runs(
                lambda: run_command(
                    ["cp", str(snapshot_file), str(mounted.mountpoint / "restore" / f"{current[0]}.mirn")]
                ),
                before=before_restore,
            ),
            floor=restore_floor(ctx),
            target=RESTORE_TARGET,
        )
    )
    listing = subprocess.run(
        ctx.mirenfs_cmd("disk", "list", "--json", "--data-path", str(data)),
        capture_output=True,
        text=True,
        check=True,
    )
    image = next(d["image_path"] for d in json.loads(listing.stdout) if d["name"] == current[0])
    ctx.check("image restored through the mount = original", fair_sha256(Path(image)) == ctx.image_sha256)


MOUNT_FIGURES: list[Callable[[Context, MountedSample], None]] = [
    measure_mount_cold_cat,
    measure_mount_warm_read,
    measure_mount_stat,
    measure_mount_random_read,
    measure_mount_cp_restore,
]


def measure_mount(ctx: Context) -> None:
    """NAME.mirn through the kernel: every figure of ``MOUNT_FIGURES``, in order, on one mount."""
    with mounted_sample(ctx) as mounted:
        for measure in MOUNT_FIGURES:
            measure(ctx, mounted)


def measure_mount_rss(ctx: Context) -> None:
    """The daemon's peak RSS while a 16 GiB sparse image is indexed and read."""
    data, mountpoint = fresh_dir(ctx, "rss-data"), fresh_dir(ctx, "rss-mnt")
    image = ctx.temp_path("sparse-16G.img")
    with open(image, "wb") as f:
        for offset in (0, 5 * GIB, 11 * GIB):
            f.seek(offset)
            f.write(os.urandom(1 << 20))
        f.truncate(16 * GIB)
    add_disk(ctx, data, "sparse", image)
    with running_mount(ctx, data, mountpoint) as mount:
        log("mount: cat of a 16 GiB sparse image's snapshot (index pass + read), daemon RSS")
        sample = run_command(["cat", str(mountpoint / "sparse.mirn")])
        peak = mount.peak_rss_kib()
        ctx.add(
            Figure(
                "mount: 16 GiB sparse cat (daemon RSS)",
                [Sample(sample.seconds, None, peak)],
                floor="sha256",
                note="info",
            )
        )
        ctx.check(
            "daemon peak RSS under 200 MB while reading a 16 GiB sparse image",
            peak * 1024 < 200 * MB,
            f"{peak * 1024 / MB:.0f} MB",
        )


# ---------------------------------------------------------------- the list


@dataclass(frozen=True)
class Measurement:
    name: str
    run: Callable[[Context], None]
    required: bool = False  # floors and references every ratio needs


MEASUREMENTS: list[Measurement] = [
    Measurement("floor", measure_floor, required=True),
    Measurement("zstd", measure_zstd, required=True),
    Measurement("sha256sum", measure_sha256sum),
    Measurement("startup", measure_startup),
    Measurement("backup", measure_backup),
    Measurement("backup-cold", measure_backup_cold),
    Measurement("restore", measure_restore),
    Measurement("verify", measure_verify),
    Measurement("mount", measure_mount),
    Measurement("mount-rss", measure_mount_rss),
]
