"""The mount figures: ``NAME.mirn`` and ``restore/`` through the kernel, on one mount of the sample.

They run in the order of ``MOUNT_FIGURES``, each leaving the mount as the next
expects: a cold read (no index, no stored frames), a warm re-read, a stat and a
whole read after a remount (the persisted index and the frame store answer),
random reads, the incremental case (1% of a copy of the sample changed with
``dd conv=notrunc``, then ``cat`` and the daemon's CPU seconds), and restores
through ``cp`` and ``tar -xf``. Every figure records the daemon's CPU seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.context import GIB, MB, CommandFailed, Context, Figure, Sample, log, run_command, timed
from bench.mount import MountedSample, add_disk, fresh_dir, running_mount
from bench.sample import fair_sha256, file_sha256
from bench.snapshots import (
    TAR_MEMBER,
    change_one_percent,
    ensure_one_frame,
    ensure_tar_archive,
    snapshot_data_offset,
    sparse_copy,
)

COLD_READ_TARGET = 1.25
RE_READ_TARGET = 0.5
INCREMENTAL_TARGET = 1.15
INCREMENTAL_CPU_TARGET = 1.3  # the daemon's CPU against SHA-256's alone
CP_RESTORE_TARGET = 1.15
TAR_RESTORE_TARGET = 1.25
CHANGING_DISK = "changing"


def index_passes(mounted: MountedSample) -> str:
    return os.getxattr(mounted.mountpoint, "user.mirenfs.index_passes").decode()


def measure_mount_cold_cat(ctx: Context, mounted: MountedSample) -> None:
    """cat NAME.mirn with no index and no stored frames: the index pass runs inside the read."""
    log("mount: cold cat NAME.mirn (no index, no stored frames: the pass runs inside the read)")
    ctx.add(
        Figure(
            "mount: cold cat NAME.mirn (index pass + read)",
            ctx.time_runs(
                ctx.command(["cat", str(mounted.snapshot)]),
                before=lambda: mounted.mount.restart(forget_index=True),
                paired=True,
            ),
            floor="sha256",
            target=COLD_READ_TARGET,
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
            target=RE_READ_TARGET,
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
    passes = index_passes(mounted)
    ctx.check("stat after remount ran no index pass", passes == "0", f"index passes {passes}")


def measure_mount_remount_cat(ctx: Context, mounted: MountedSample) -> None:
    """cat NAME.mirn of the unchanged disk after a remount: the frame store serves every frame."""
    log("mount: cat after a remount (persisted index, frames from the store)")
    ctx.add(
        Figure(
            "mount: cat after remount (unchanged disk)",
            ctx.time_runs(
                ctx.command(["cat", str(mounted.snapshot)]),
                before=lambda: mounted.mount.restart(forget_index=False),
            ),
            floor="sha256",
            target=RE_READ_TARGET,
        )
    )
    passes = index_passes(mounted)
    ctx.check("cat after remount ran no index pass", passes == "0", f"index passes {passes}")
    expected = file_sha256(ctx.ensure_snapshot())
    ctx.check("bytes after remount = mirenfs backup bytes", file_sha256(mounted.snapshot) == expected)


def measure_mount_random_read(ctx: Context, mounted: MountedSample) -> None:
    """p99 of 200 random 128 KiB reads after a remount (frames from the store or compressed on demand)."""
    log("mount: random 128 KiB reads after a remount")
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


def measure_mount_incremental(ctx: Context, mounted: MountedSample) -> None:
    """cat of a disk after 1% of it changed (``dd conv=notrunc``): only the changed chunks
    compress. Timed against SHA-256, and the daemon's CPU against SHA-256's.

    Two cases: the change anywhere (the pass hashes again from the first changed
    chunk), and the change starting in the first chunk, as after a mount of the
    disk's filesystem, which rewrites its superblock (the whole image is hashed)."""
    image = sparse_copy(ctx, "changing.img")
    add_disk(ctx, mounted.data, CHANGING_DISK, image)
    snapshot = mounted.mountpoint / f"{CHANGING_DISK}.mirn"
    run_command(["cat", str(snapshot)])  # its first snapshot: what the next ones build on
    rng = random.Random(1)
    for label, in_first_chunk in (("", False), (" in the first chunk", True)):
        log(f"mount: cat after 1% of the disk changed{label} (dd conv=notrunc), with the daemon's CPU")
        figure = ctx.add(
            Figure(
                f"mount: cat after a 1% change{label}",
                ctx.time_runs(
                    ctx.command(["cat", str(snapshot)]),
                    before=partial(change_one_percent, image, rng, in_first_chunk=in_first_chunk),
                    paired=True,
                ),
                floor="sha256",
                target=INCREMENTAL_TARGET,
            )
        )
        daemon = [
            Sample(s.daemon_cpu, noise=s.noise, floor_cpu=s.floor_cpu)
            for s in figure.samples
            if s.daemon_cpu is not None
        ]
        ctx.add(
            Figure(
                f"mount: 1% change{label}, daemon CPU seconds",
                daemon,
                floor="sha256 cpu",
                target=INCREMENTAL_CPU_TARGET,
            )
        )
    check_snapshot_of(ctx, snapshot, image, "snapshot after a 1% change")


def check_snapshot_of(ctx: Context, snapshot: Path, image: Path, what: str) -> None:
    """The snapshot read through the mount carries the image's checksum and verifies."""
    copy = ctx.temp_path("changed-copy.mirn")
    run_command(["cp", str(snapshot), str(copy)])
    header = subprocess.run(ctx.mirenfs_cmd("inspect", "--json", str(copy)), capture_output=True, text=True)
    checksum = json.loads(header.stdout)["checksum"] if header.returncode == 0 else header.stderr
    ctx.check(f"{what}: header checksum = SHA-256 of the image", checksum == fair_sha256(image), checksum)
    verified = subprocess.run(ctx.mirenfs_cmd("verify", str(copy)), capture_output=True, text=True)
    ctx.check(f"{what}: mirenfs verify passes", verified.returncode == 0, verified.stderr.strip())
    copy.unlink()


def restore_runs(
    ctx: Context, mounted: MountedSample, copy: Callable[[str], Sample], name: Callable[[], str]
) -> list[Sample]:
    """Time ``copy(disk)`` runs, each restoring a disk that does not exist yet."""
    current: list[str] = []

    def before_restore() -> None:
        for old in current:
            remove_disk(ctx, mounted, old)
        current[:] = [name()]
        os.sync()

    samples = ctx.time_runs(lambda: copy(current[0]), before=before_restore, paired=True)
    image = disk_image(ctx, mounted, current[0])
    ok = fair_sha256(Path(image)) == ctx.image_sha256
    ctx.check(f"disk {current[0]} restored through the mount = original", ok)
    remove_disk(ctx, mounted, current[0])
    return samples


def remove_disk(ctx: Context, mounted: MountedSample, disk: str) -> None:
    """Remove a disk a restore made, and its entry in restore/."""
    with contextlib.suppress(CommandFailed):
        run_command(ctx.mirenfs_cmd("disk", "remove", disk, "--data-path", str(mounted.data)))
    for entry in mounted.restore_dir.iterdir():
        if entry.name.startswith(disk + "."):
            entry.unlink()


def disk_image(ctx: Context, mounted: MountedSample, disk: str) -> str:
    listing = subprocess.run(
        ctx.mirenfs_cmd("disk", "list", "--json", "--data-path", str(mounted.data)),
        capture_output=True,
        text=True,
        check=True,
    )
    return str(next(d["image_path"] for d in json.loads(listing.stdout) if d["name"] == disk))


def cp_into_restore(source: Path, mounted: MountedSample) -> Callable[[str], Sample]:
    """``cp SOURCE restore/DISK.mirn``, timed."""
    return lambda disk: run_command(["cp", str(source), str(mounted.restore_dir / f"{disk}.mirn")])


def measure_mount_cp_restore(ctx: Context, mounted: MountedSample) -> None:
    """cp of the one-frame (Go-style) snapshot into restore/: a new disk each run."""
    cp_restore_figure(ctx, mounted, ensure_one_frame(ctx), "one-frame", "restored")


def measure_mount_cp_restore_multi(ctx: Context, mounted: MountedSample) -> None:
    """cp of mirenfs's own snapshot (one frame per 4 MiB chunk) into restore/."""
    cp_restore_figure(ctx, mounted, ctx.ensure_snapshot(), "mirenfs", "multi")


def cp_restore_figure(ctx: Context, mounted: MountedSample, source: Path, label: str, prefix: str) -> None:
    """cp of ``source`` into restore/, each run as a new disk ``PREFIX-N``."""
    counter = iter(range(1000))
    log(f"mount: cp of the {label} snapshot into restore/ (a new disk each run)")
    ctx.add(
        Figure(
            f"mount: cp {label} snapshot into restore/",
            restore_runs(ctx, mounted, cp_into_restore(source, mounted), lambda: f"{prefix}-{next(counter)}"),
            floor="restore",
            target=CP_RESTORE_TARGET,
        )
    )


def measure_mount_tar_restore(ctx: Context, mounted: MountedSample) -> None:
    """tar -xf of an archive holding the one-frame snapshot into restore/ (10 KiB writes)."""
    archive = ensure_tar_archive(ctx)
    disk = TAR_MEMBER.removesuffix(".mirn")
    log("mount: tar -xf of the one-frame snapshot into restore/ (10 KiB writes)")
    ctx.add(
        Figure(
            "mount: tar -xf one-frame snapshot into restore/",
            restore_runs(
                ctx,
                mounted,
                lambda _disk: run_command(["tar", "-xf", str(archive), "-C", str(mounted.restore_dir)]),
                lambda: disk,
            ),
            floor="restore",
            target=TAR_RESTORE_TARGET,
        )
    )


MOUNT_FIGURES: list[Callable[[Context, MountedSample], None]] = [
    measure_mount_cold_cat,
    measure_mount_warm_read,
    measure_mount_stat,
    measure_mount_remount_cat,
    measure_mount_random_read,
    measure_mount_incremental,
    measure_mount_cp_restore,
    measure_mount_tar_restore,
    measure_mount_cp_restore_multi,
]


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
        add_rss_figure(
            ctx,
            "mount: 16 GiB sparse cat",
            sample.seconds,
            mount.peak_rss_kib(),
            checked_as="while reading a 16 GiB sparse image",
        )
    measure_mount_rss_many_disks(ctx)
    measure_mount_rss_restores_at_once(ctx)
    measure_index_cache_memory(ctx)


MANY_DISKS = 8
MANY_DISKS_DATA = 96 << 20  # incompressible bytes per disk: frames as large as chunks


def measure_mount_rss_many_disks(ctx: Context) -> None:
    """The daemon's peak RSS over a night's backup of many disks, read one after the other:
    memory must not grow with the number of disks read."""
    data, mountpoint = fresh_dir(ctx, "rss-many-data"), fresh_dir(ctx, "rss-many-mnt")
    for i in range(MANY_DISKS):
        image = ctx.temp_path(f"many-{i}.img")
        with open(image, "wb") as f:
            for _ in range(MANY_DISKS_DATA >> 20):
                f.write(os.urandom(1 << 20))
            f.truncate(2 * MANY_DISKS_DATA)
        add_disk(ctx, data, f"many{i}", image)
    with running_mount(ctx, data, mountpoint) as mount:
        log(f"mount: cat of {MANY_DISKS} disks' snapshots in turn ({MANY_DISKS_DATA >> 20} MiB of data each)")
        seconds = timed(
            lambda: [run_command(["cat", str(mountpoint / f"many{i}.mirn")]) for i in range(MANY_DISKS)]
        )
        add_rss_figure(
            ctx,
            f"mount: {MANY_DISKS} disks read in turn",
            seconds,
            mount.peak_rss_kib(),
            checked_as=f"while reading {MANY_DISKS} disks in turn",
        )


def add_rss_figure(
    ctx: Context, title: str, seconds: float, peak_kib: int, *, checked_as: str | None = None
) -> None:
    """An info figure of the daemon's peak RSS, and, ``checked_as``, the check that it stayed
    under 200 MB (issue 13)."""
    ctx.add(Figure(f"{title} (daemon RSS)", [Sample(seconds, None, peak_kib)], floor="sha256", note="info"))
    if checked_as is not None:
        ctx.check(
            f"daemon peak RSS under 200 MB {checked_as}",
            peak_kib * 1024 < 200 * MB,
            f"{peak_kib * 1024 / MB:.0f} MB",
        )


AT_ONCE = (3, 10)
AT_ONCE_DATA = 128 << 20  # incompressible bytes per image: every frame near 4 MiB, the worst case


def measure_mount_rss_restores_at_once(ctx: Context) -> None:
    """The daemon's peak RSS while several ``cp`` into ``restore/`` run at once (mirenfs's own
    snapshot and Go's one-frame one): restores share one bound, so memory must not grow with
    their number (each had its own: ten took a mount to 383-424 MB before session 19)."""
    data, mountpoint = fresh_dir(ctx, "rss-restores-data"), fresh_dir(ctx, "rss-restores-mnt")
    image = ctx.temp_path("at-once.img")
    with open(image, "wb") as f:
        for _ in range(AT_ONCE_DATA >> 20):
            f.write(os.urandom(1 << 20))
        f.truncate(2 * AT_ONCE_DATA)
    add_disk(ctx, data, "source", image)
    mirenfs_snapshot = ctx.temp_path("at-once.mirn")
    run_command(ctx.mirenfs_cmd("backup", "source", "-o", str(mirenfs_snapshot), "--data-path", str(data)))
    go_snapshot = ctx.temp_path("at-once-one-frame.mirn")
    with open(mirenfs_snapshot, "rb") as source, open(go_snapshot, "wb") as out:
        out.write(source.read(snapshot_data_offset(mirenfs_snapshot)))
        out.flush()
        subprocess.run(["zstd", "-q", "-3", "-c", str(image)], stdout=out, check=True)
    expected = file_sha256(image)
    for label, snapshot in (("mirenfs", mirenfs_snapshot), ("one-frame", go_snapshot)):
        for count in AT_ONCE:
            with running_mount(ctx, data, mountpoint) as mount:
                log(f"mount: {count} cp of the {label} snapshot into restore/ at once, daemon RSS")
                names = [f"{label}-{count}-{n}" for n in range(count)]
                start = time.perf_counter()
                copies = [
                    subprocess.Popen(["cp", str(snapshot), str(mountpoint / "restore" / f"{name}.mirn")])
                    for name in names
                ]
                for copy in copies:
                    copy.wait(timeout=600)
                seconds = time.perf_counter() - start
                failed = [name for name, copy in zip(names, copies, strict=True) if copy.returncode != 0]
                ctx.check(f"{count} restores at once all succeeded", not failed, " ".join(failed))
                add_rss_figure(
                    ctx,
                    f"mount: {count} cp {label} into restore/ at once",
                    seconds,
                    mount.peak_rss_kib(),
                    checked_as=f"with {count} restores of {label} snapshots at once",
                )
            listing = subprocess.run(
                ctx.mirenfs_cmd("disk", "list", "--json", "--data-path", str(data)),
                capture_output=True,
                text=True,
                check=True,
            )
            images = {disk["name"]: disk["image_path"] for disk in json.loads(listing.stdout)}
            wrong = [
                name for name in names if name not in images or file_sha256(Path(images[name])) != expected
            ]
            ctx.check(f"the {count} {label} restores each equal the image", not wrong, " ".join(wrong))
            for name in names:
                with contextlib.suppress(CommandFailed):
                    run_command(ctx.mirenfs_cmd("disk", "remove", name, "--data-path", str(data)))
    _reads_at_once(ctx, data, mountpoint, image, mirenfs_snapshot)


READS_AT_ONCE = 4


def _reads_at_once(ctx: Context, data: Path, mountpoint: Path, image: Path, snapshot: Path) -> None:
    """The daemon's peak RSS while four cold ``cat NAME.mirn`` run at once, then while four more
    run beside four restores (whose buffers share one bound with the index passes)."""
    readers = [f"read-{n}" for n in range(2 * READS_AT_ONCE)]
    for name in readers:
        copy = ctx.temp_path(f"{name}.img")
        run_command(["cp", "--sparse=always", str(image), str(copy)])
        add_disk(ctx, data, name, copy)
    for label, reads, restores in (
        ("cold reads", readers[:READS_AT_ONCE], 0),
        ("cold reads and restores", readers[READS_AT_ONCE:], READS_AT_ONCE),
    ):
        with running_mount(ctx, data, mountpoint) as mount:
            log(f"mount: {len(reads)} {label} at once ({restores} restores), daemon RSS")
            start = time.perf_counter()
            jobs = [
                subprocess.Popen(["cat", str(mountpoint / f"{name}.mirn")], stdout=subprocess.DEVNULL)
                for name in reads
            ] + [
                subprocess.Popen(["cp", str(snapshot), str(mountpoint / "restore" / f"mixed-{n}.mirn")])
                for n in range(restores)
            ]
            for job in jobs:
                job.wait(timeout=600)
            seconds = time.perf_counter() - start
            ctx.check(f"{label} at once all succeeded", all(job.returncode == 0 for job in jobs))
            title = f"mount: {len(reads)} cat" + (f" + {restores} cp into restore/" if restores else "")
            checked = f"with {len(reads)} cold reads" + (f" and {restores} restores" if restores else "")
            peak_kib = mount.peak_rss_kib()
            add_rss_figure(ctx, f"{title} at once", seconds, peak_kib, checked_as=f"{checked} at once")


# A 1 TiB disk's index (262 144 chunks of 4 MiB) saved and loaded twice through the mount's
# index cache, in a process of its own: its memory before, at its peak, and after.
INDEX_CACHE_PROBE = """
import os, sys, tempfile
from array import array
from mirenfs.engine.produce import FINGERPRINT, MIDSTATE, SnapshotIndex
from mirenfs.mount.versions import IndexCache
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
n = 262144
index = SnapshotIndex(size_bytes=n << 22, chunk_size=1 << 22, settings_key="bench", checksum="0" * 64,
    frame_sizes=array("I", os.urandom(4 * n)), frame_checksums=array("I", os.urandom(4 * n)),
    zero_chunks=bytearray(n), fingerprints=os.urandom(FINGERPRINT * n), midstates=os.urandom(MIDSTATE * n))
base = kib("VmRSS")
with tempfile.TemporaryDirectory(dir=sys.argv[1]) as directory:
    cache = IndexCache(directory)
    for _ in range(2):
        cache.save("/bench/1T.img", "key", index, None)
        loaded = cache.load("/bench/1T.img", "key")
        assert loaded is not None and loaded[0] == index
        del loaded
print(index.nbytes, base, kib("VmHWM"), kib("VmRSS"))
"""


def measure_index_cache_memory(ctx: Context) -> None:
    """What saving and loading a 1 TiB disk's index costs the mount: format 3 (base64 in JSON)
    made ~120 MB of copies at once. What stays after the load is trimmed is the loaded index;
    once that is dropped too, glibc keeps it for the next one (bounded: one index)."""
    log("index cache: a 1 TiB disk's index saved and loaded twice (process RSS)")
    result = subprocess.run(
        [sys.executable, "-c", INDEX_CACHE_PROBE, str(ctx.workdir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    size, base, peak, after = (int(value) for value in result.stdout.split())
    ctx.check(
        "a 1 TiB disk's index saved and loaded: memory peaks under 2.5 times its size",
        (peak - base) * 1024 < 2.5 * size,
        f"index {size / MB:.0f} MB; RSS {base / 1024:.0f} MB, peak +{(peak - base) / 1024:.0f} MB, "
        f"+{(after - base) / 1024:.0f} MB once the last copy loaded was dropped (format 3: peak +121 MB)",
    )
