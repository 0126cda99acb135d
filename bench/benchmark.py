#!/usr/bin/env python3
"""mirenfs benchmark (SPEC §7): run on demand, not part of the test suite.

    .venv/bin/python bench/benchmark.py [--workdir DIR] [--size 4G] [--runs 3]
        [--only sha256sum,startup,backup,backup-cold,restore,verify] [--keep]
        [--json FILE] [--retries 3] [--quiet-wait 30] [--mirenfs COMMAND]

It builds the §7 sample once (a sparse ext4 image filled by
``mkfs.ext4 -d /usr/lib/x86_64-linux-gnu``, reused while it stays valid) and
measures every figure in the same run, so the ratios compare like with like
on whatever the machine is doing today. Each figure is the median wall-clock
time of ``--runs`` runs after one warm-up run (page cache warm).

The floor is SHA-256 over every image byte, done the way mirenfs must do it:
data extents found with SEEK_DATA/SEEK_HOLE are read and hashed, holes are
hashed from a static zero buffer and never read.

The machine is shared (2 cores): a run during which other processes used
over 5% of the CPU is redone, and the table's "noise" column says how busy
the machine was in the worst run kept.

Adding a figure (the mount figures to come): write ``def measure_x(ctx) -> None``
that calls ``ctx.add(Figure(...))`` / ``ctx.check(...)``, and list it in
``MEASUREMENTS``. The floors are always measured first; one printer shows all.

Exit status: 0 all good, 1 a correctness check failed, 2 a target was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

DEFAULT_WORKDIR = Path("/var/tmp/mirenfs-bench")
SAMPLE_SOURCE = Path("/usr/lib/x86_64-linux-gnu")
SAMPLE_FORMAT = 1  # bump to force every work dir to rebuild its sample
HASH_PIECE = 1 << 20  # measured fastest (or equal) among 256 KiB-16 MiB on this machine
_ZERO_PIECE = memoryview(bytes(HASH_PIECE))
BACKUP_TARGET = 1.2
RESTORE_TARGET = 1.25
NOISE_LIMIT = 0.05  # foreign CPU share above which figures are flagged
GIB = 1 << 30
MB = 1_000_000


# ---------------------------------------------------------------- measuring


@dataclass
class Sample:
    """One timed run: wall-clock seconds, the CPU seconds it used (all its threads),
    the child's peak RSS when it was a command, and the CPU seconds *other*
    processes used meanwhile: on 2 cores, a busy neighbour skews every figure."""

    seconds: float
    cpu_seconds: float | None = None
    max_rss_kib: int | None = None
    foreign_cpu: float = 0.0


@dataclass
class Figure:
    """One row of the table. ``floor`` names an entry of ``Context.floors``."""

    name: str
    samples: list[Sample]
    floor: str | None = None
    target: float | None = None
    note: str = ""
    limit: float | None = None  # an absolute target in seconds (stat after remount, read p99)

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def cpu_seconds(self) -> float | None:
        values = [s.cpu_seconds for s in self.samples if s.cpu_seconds is not None]
        return statistics.median(values) if values else None

    @property
    def foreign_cpu(self) -> float:
        return max(s.foreign_cpu for s in self.samples)

    @property
    def peak_rss_mib(self) -> float | None:
        values = [s.max_rss_kib for s in self.samples if s.max_rss_kib is not None]
        return max(values) / 1024 if values else None


@dataclass
class Check:
    """A correctness check: a fast wrong answer is not a result."""

    name: str
    ok: bool
    detail: str = ""


class CommandFailed(RuntimeError):
    """A timed command exited non-zero: the figure would be meaningless."""


@dataclass
class Context:
    """What measurement functions share: paths, settings, floors and results."""

    workdir: Path
    image: Path
    runs: int
    mirenfs: list[str]  # the command, possibly with a wrapper (env PYTHONPATH=… python -m …)
    selected: set[str]
    keep: bool
    retries: int = 3  # re-runs of a run disturbed by other processes
    quiet_wait: float = 30.0  # seconds to wait, before each run, for the machine to go quiet
    discarded: int = 0
    daemon_pid: int | None = None  # a mount daemon doing the measured work: its CPU is ours, not noise
    floors: dict[str, float] = field(default_factory=dict)  # "sha256", "restore": seconds
    figures: list[Figure] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)  # printed above the table
    image_sha256: str = ""
    snapshot: Path | None = None
    scratch: list[Path] = field(default_factory=list)  # removed at the end unless --keep

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        runs = ", ".join(
            f"{s.seconds:.3f}" + (f" ({s.foreign_cpu:.2f} s foreign CPU)" if s.foreign_cpu >= 0.05 else "")
            for s in figure.samples
        )
        log(f"  {figure.name}: median {figure.seconds:.3f} s  (runs: {runs})")
        return figure

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        log(f"  check {'ok' if ok else 'FAILED'}: {name} {detail}")
        return ok

    def time_runs(
        self, run: Callable[[], Sample | None], *, before: Callable[[], None] | None = None
    ) -> list[Sample]:
        """One warm-up, then ``runs`` timed runs. ``run`` may return its own Sample
        (commands, with their RSS); otherwise its wall-clock time is taken here.
        ``before`` runs untimed ahead of every run (resetting state, syncing).

        The machine is shared: each run waits for the other processes to go quiet,
        and a run during which they used over NOISE_LIMIT of the CPU is done again
        (up to ``retries`` times), so a neighbour's test suite does not pose as a regression.
        """
        samples: list[Sample] = []
        for i in range(self.runs + 1):
            for attempt in range(self.retries + 1):
                if before is not None:
                    before()
                wait_for_quiet(self.quiet_wait)
                sample = self._one_run(run)
                share = sample.foreign_cpu / (sample.seconds * (os.cpu_count() or 1))
                if share <= NOISE_LIMIT or attempt == self.retries:
                    break
                self.discarded += 1
                log(f"    run {sample.seconds:.3f} s discarded: other processes used {share:.0%} of the CPU")
            if i > 0:
                samples.append(sample)
        return samples

    def _one_run(self, run: Callable[[], Sample | None]) -> Sample:
        machine, own, daemon = (
            machine_cpu_seconds(),
            time.process_time(),
            process_cpu_seconds(self.daemon_pid),
        )
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        own = time.process_time() - own  # this process: the timed code, or bookkeeping around a command
        own += process_cpu_seconds(self.daemon_pid) - daemon
        sample = result if result is not None else Sample(elapsed, own)
        child = sample.cpu_seconds if result is not None and sample.cpu_seconds is not None else 0.0
        sample.foreign_cpu = max(0.0, machine_cpu_seconds() - machine - own - child)
        return sample

    def command(self, argv: Sequence[str], **kwargs: object) -> Callable[[], Sample]:
        """A runner for ``time_runs`` that times a command and fails loudly if it fails."""
        return lambda: run_command(argv, **kwargs)  # type: ignore[arg-type]

    def mirenfs_cmd(self, *args: str) -> list[str]:
        return [*self.mirenfs, *args]

    def temp_path(self, name: str) -> Path:
        path = self.workdir / name
        self.scratch.append(path)
        return path

    def ensure_snapshot(self) -> Path:
        """A backup of the sample, made untimed when no backup figure produced one."""
        if self.snapshot is None or not self.snapshot.exists():
            path = self.temp_path("sample.mirn")
            log("  making a snapshot for the figures that need one (untimed)")
            run_command(self.mirenfs_cmd("backup", "--image", str(self.image), "-o", str(path)))
            self.snapshot = path
        return self.snapshot


def run_command(
    argv: Sequence[str],
    *,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
) -> Sample:
    """Run ``argv`` once: wall-clock seconds from spawn to reaping, and its peak RSS."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=errors, env=CHILD_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
            raise CommandFailed(f"{' '.join(argv)} exited {proc.returncode}: {message}")
    return Sample(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def wait_for_quiet(limit: float, window: float = 0.5) -> bool:
    """Wait up to ``limit`` seconds for a ``window`` in which the machine is nearly idle
    (this process sleeps meanwhile, so whatever runs is someone else)."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_cpu_seconds()
        time.sleep(window)
        if machine_cpu_seconds() - before <= window * NOISE_LIMIT * (os.cpu_count() or 1):
            return True
        if time.monotonic() >= deadline:
            log(f"    the machine did not go quiet within {limit:.0f} s; measuring anyway")
            return False


def process_cpu_seconds(pid: int | None) -> float:
    """CPU time of one process (all its threads) so far, from /proc; 0 without a pid."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU time spent by the whole machine so far (all cores, /proc/stat, 10 ms ticks)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# Commands may write .pyc files: this machine sets PYTHONDONTWRITEBYTECODE, which would
# make every timed run recompile mirenfs's changed modules (an installed copy has its
# .pyc files). The warm-up run writes them.
CHILD_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def evict_from_page_cache(path: Path) -> None:
    """Drop one file's pages from the page cache (for cold figures), leaving the
    rest of the machine's cache alone, unlike /proc/sys/vm/drop_caches."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def disk_usage(path: Path) -> tuple[int, int]:
    """(allocated, apparent) bytes as ``du`` reports them."""
    allocated = subprocess.run(["du", "-B1", str(path)], capture_output=True, text=True, check=True)
    apparent = subprocess.run(
        ["du", "-B1", "--apparent-size", str(path)], capture_output=True, text=True, check=True
    )
    return int(allocated.stdout.split()[0]), int(apparent.stdout.split()[0])


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


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def parse_size(text: str) -> int:
    """4096, 512M, 4G: binary units, as the mirenfs CLI reads them."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in units else cleaned
    try:
        value = int(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4G") from None
    if value <= 0 or value % 4096:
        raise argparse.ArgumentTypeError("the image size must be a positive multiple of 4 KiB")
    return value


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
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(SAMPLE_SOURCE), str(partial)], check=True)
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


# ---------------------------------------------------------------- measurements


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


def measure_backup(ctx: Context) -> None:
    """mirenfs backup to a file next to the sample; bytes must repeat run after run."""
    log("mirenfs backup --image IMAGE -o FILE")
    output = ctx.temp_path("sample.mirn")
    digests: list[str] = []
    runner = ctx.command(ctx.mirenfs_cmd("backup", "--image", str(ctx.image), "-o", str(output)))

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
            ctx.time_runs(
                ctx.command(ctx.mirenfs_cmd("backup", "--image", str(ctx.image), "-o", str(output))),
                before=evict,
            ),
            floor="sha256",
            note="info (cold)",
        )
    )
    evict_from_page_cache(ctx.image)  # the next figures warm it up again in their warm-up run
    fair_sha256(ctx.image)


def verify_once(ctx: Context, snapshot: Path) -> Sample | None:
    try:
        sample = run_command(ctx.mirenfs_cmd("verify", str(snapshot)))
    except CommandFailed as exc:
        ctx.check("mirenfs verify passes on the backup", False, str(exc))
        return None
    ctx.check("mirenfs verify passes on the backup", True, f"{sample.seconds:.2f} s")
    return sample


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
            floor="restore" if "restore" in ctx.floors else "sha256",
            note="info",
        )
    )
    ctx.check("mirenfs verify passes on the backup", True, "every run exited 0")


class BenchMount:
    """`mirenfs mount --foreground` on a data path holding the sample as a disk."""

    def __init__(self, ctx: Context, data: Path, mountpoint: Path) -> None:
        self.ctx, self.data, self.mountpoint = ctx, data, mountpoint
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log_file = open(self.data.parent / f"{self.mountpoint.name}.log", "ab")  # noqa: SIM115
        command = self.ctx.mirenfs_cmd(
            "mount", str(self.mountpoint), "--foreground", "--data-path", str(self.data)
        )
        self.process = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=CHILD_ENV)
        self.ctx.daemon_pid = self.process.pid
        log_file.close()
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed(f"mount of {self.mountpoint} failed; see {log_file.name}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is None:
            return
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=60)
        self.process.wait(timeout=60)
        self.process = None
        self.ctx.daemon_pid = None

    def restart(self, *, forget_index: bool) -> None:
        self.stop()
        if forget_index:
            shutil.rmtree(self.data / "mirenfs" / "index", ignore_errors=True)
        os.sync()
        self.start()

    def peak_rss_kib(self) -> int:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def add_disk(ctx: Context, data: Path, name: str, image: Path) -> None:
    run_command(
        ctx.mirenfs_cmd(
            "disk", "add", name, "--image", str(image), "--filesystem", "ext4", "--data-path", str(data)
        )
    )


def fresh_dir(ctx: Context, name: str) -> Path:
    path = ctx.temp_path(name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def measure_mount(ctx: Context) -> None:
    """NAME.mirn through the kernel: cold and warm reads, stat after remount, random reads."""
    data, mountpoint = fresh_dir(ctx, "mount-data"), fresh_dir(ctx, "mnt")
    name = ctx.image.stem  # as `backup --image` names it, so the bytes equal the CLI backup's
    add_disk(ctx, data, name, ctx.image)
    mount = BenchMount(ctx, data, mountpoint)
    snapshot = mountpoint / f"{name}.mirn"
    cat = ctx.command(["cat", str(snapshot)])
    try:
        mount.start()
        log("mount: cold cat NAME.mirn (no index: the pass runs inside the read)")
        ctx.add(
            Figure(
                "mount: cold cat NAME.mirn (index pass + read)",
                ctx.time_runs(cat, before=lambda: mount.restart(forget_index=True)),
                floor="sha256",
                target=1.25,
            )
        )
        expected = file_sha256(ctx.ensure_snapshot())
        ctx.check("mount bytes = mirenfs backup bytes", file_sha256(snapshot) == expected, expected[:16])
        log("mount: warm re-read (index and page cache in place)")
        ctx.add(Figure("mount: warm re-read", ctx.time_runs(cat), floor="sha256", target=0.5))

        log("mount: stat after a remount (the persisted index answers)")
        ctx.add(
            Figure(
                "mount: stat after remount",
                ctx.time_runs(
                    lambda: Sample(_timed(os.stat, snapshot)),
                    before=lambda: mount.restart(forget_index=False),
                ),
                floor="sha256",
                limit=1.0,
            )
        )
        passes = os.getxattr(mountpoint, "user.mirenfs.index_passes").decode()
        ctx.check("stat after remount ran no index pass", passes == "0", f"index passes {passes}")

        log("mount: random 128 KiB reads after a remount (frames compressed on demand)")

        def random_reads() -> Sample:
            size = snapshot.stat().st_size
            rng = __import__("random").Random(len(ctx.figures))
            fd = os.open(snapshot, os.O_RDONLY)
            try:
                latencies = sorted(
                    _timed(os.pread, fd, 128 << 10, rng.randrange(0, size)) for _ in range(200)
                )
            finally:
                os.close(fd)
            return Sample(latencies[int(len(latencies) * 0.99) - 1])

        ctx.add(
            Figure(
                "mount: random 128 KiB read, p99",
                ctx.time_runs(random_reads, before=lambda: mount.restart(forget_index=False)),
                floor="sha256",
                limit=0.05,
            )
        )

        snapshot_file = ctx.ensure_snapshot()
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
                        ["cp", str(snapshot_file), str(mountpoint / "restore" / f"{current[0]}.mirn")]
                    ),
                    before=before_restore,
                ),
                floor="restore" if "restore" in ctx.floors else "sha256",
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
    finally:
        mount.stop()


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
    mount = BenchMount(ctx, data, mountpoint)
    try:
        mount.start()
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
    finally:
        mount.stop()


def _timed(function: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


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


# ---------------------------------------------------------------- report


def verdict(ctx: Context, figure: Figure) -> tuple[float | None, str]:
    floor = ctx.floors.get(figure.floor or "")
    ratio = figure.seconds / floor if floor else None
    if figure.limit is not None:
        return ratio, f"{'PASS' if figure.seconds <= figure.limit else 'MISS'} (<= {figure.limit:g} s)"
    if figure.target is None or ratio is None:
        return ratio, figure.note
    return ratio, "PASS" if ratio <= figure.target else "MISS"


def print_table(ctx: Context) -> None:
    """One table for every figure: seconds, ratios to its floor and to zstd -3 -T2, verdict."""
    print()
    for key, value in ctx.facts.items():
        print(f"{key:>9}: {value}")
    floors = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in ctx.floors.items())
    print(f"   floors: {floors}   (restore floor = slower of sha256 and zstd -d)")
    print(
        f"     runs: median of {ctx.runs} after 1 warm-up; wall-clock seconds; "
        f"{ctx.discarded} run(s) redone because other processes were busy"
    )
    print()
    headers = (
        "figure",
        "seconds",
        "floor",
        "x floor",
        "x zstd-3",
        "target",
        "result",
        "CPU s",
        "RSS",
        "noise",
    )
    aligns = "<><>>><>>>"
    rows = []
    zstd = ctx.floors.get("zstd")
    noisy = False
    for figure in ctx.figures:
        ratio, result = verdict(ctx, figure)
        rss, cpu = figure.peak_rss_mib, figure.cpu_seconds
        noise = figure.foreign_cpu / (figure.seconds * (os.cpu_count() or 1))
        noisy = noisy or noise > NOISE_LIMIT
        rows.append(
            (
                figure.name,
                f"{figure.seconds:.3f}",
                figure.floor or "-",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{figure.seconds / zstd:.2f}" if zstd else "-",
                f"<= {figure.target:.2f}" if figure.target is not None else "-",
                result,
                f"{cpu:.2f}" if cpu is not None else "-",
                f"{rss:.0f}M" if rss is not None else "-",
                f"{noise:.0%}",
            )
        )
    widths = [max(len(str(row[i])) for row in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:{align}{width}}" for cell, align, width in zip(cells, aligns, widths, strict=True)
        )

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))
    print(
        "\n  CPU s: median CPU seconds of the measured process (all threads); RSS: its peak;"
        "\n  noise: CPU other processes used during the worst run, as a share of the machine."
    )
    if noisy:
        print(f"  WARNING: other processes used over {NOISE_LIMIT:.0%} of the CPU in some runs: rerun quiet.")
    print()
    for check in ctx.checks:
        print(
            f"  [{'ok' if check.ok else 'FAIL'}] {check.name}"
            + (f"  ({check.detail})" if check.detail else "")
        )


def write_json(ctx: Context, path: Path) -> None:
    """Machine-readable results, for comparing runs over time."""
    body = {
        "facts": ctx.facts,
        "floors": ctx.floors,
        "runs": ctx.runs,
        "figures": [
            {
                **dataclasses.asdict(figure),
                "median": figure.seconds,
                "ratio": verdict(ctx, figure)[0],
                "result": verdict(ctx, figure)[1],
            }
            for figure in ctx.figures
        ],
        "checks": [dataclasses.asdict(check) for check in ctx.checks],
    }
    path.write_text(json.dumps(body, indent=2) + "\n")


def environment() -> str:
    import ssl

    import zstandard

    zstd_cli = subprocess.run(["zstd", "-V"], capture_output=True, text=True).stdout.strip()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} x {cpu}; Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, "
        f"python-zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}); "
        f"{zstd_cli.split(',')[0].strip('* ')}"
    )


# ---------------------------------------------------------------- main


def find_mirenfs(command: str | None) -> list[str]:
    """``--mirenfs`` if given (to A/B a changed engine), else the venv's mirenfs, else PATH's."""
    if command:
        return shlex.split(command)
    beside = Path(sys.executable).parent / "mirenfs"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mirenfs")
    if found is None:
        raise SystemExit("benchmark: cannot find the mirenfs command (run with .venv/bin/python)")
    return [found]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [m.name for m in MEASUREMENTS if not m.required]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    parser.add_argument("--size", type=parse_size, default=4 * GIB, help="sample image size (default 4G)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure, after one warm-up")
    parser.add_argument(
        "--only",
        type=lambda text: {part.strip() for part in text.split(",") if part.strip()},
        help=f"comma-separated subset of {','.join(names)} (floor and zstd are always measured)",
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="re-runs of a run disturbed by other processes (default 3)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to go quiet (default 30)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the snapshot and restored image")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--mirenfs",
        metavar="COMMAND",
        help="the mirenfs command to time, to A/B a changed engine, e.g. "
        "'env PYTHONPATH=/tmp/try .venv/bin/python -P -m mirenfs.cli' (-P: not the cwd's copy)",
    )
    args = parser.parse_args(argv)
    if args.only is not None and (unknown := args.only - set(names)):
        parser.error(f"unknown figure(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    selected = args.only if args.only is not None else {m.name for m in MEASUREMENTS}
    ctx = Context(
        workdir=args.workdir,
        image=build_sample(args.workdir, args.size),
        runs=args.runs,
        mirenfs=find_mirenfs(args.mirenfs),
        selected=selected,
        keep=args.keep,
        retries=args.retries,
        quiet_wait=args.quiet_wait,
    )
    ctx.facts["machine"] = environment()
    ctx.facts["mirenfs"] = shlex.join(ctx.mirenfs)
    try:
        describe_sample(ctx)
        log("warming the page cache with the sample's data extents")
        fair_sha256(ctx.image)
        for measurement in MEASUREMENTS:
            if measurement.required or measurement.name in selected:
                try:
                    measurement.run(ctx)
                except CommandFailed as exc:  # the other figures still mean something
                    ctx.check(f"{measurement.name}: every timed command succeeded", False, str(exc))
    finally:
        if not ctx.keep:
            for path in ctx.scratch:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
    usage = subprocess.run(["du", "-sh", str(ctx.workdir)], capture_output=True, text=True).stdout.split()
    ctx.facts["workdir"] = f"{ctx.workdir} uses {usage[0] if usage else '?'} on disk"
    print_table(ctx)
    if args.json is not None:
        write_json(ctx, args.json)
    if not all(check.ok for check in ctx.checks):
        return 1
    return 2 if any(verdict(ctx, f)[1] == "MISS" for f in ctx.figures) else 0


if __name__ == "__main__":
    sys.exit(main())
