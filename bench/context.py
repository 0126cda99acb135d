"""The measuring machinery every figure shares.

``Context`` holds the settings, the floors and the results; ``Context.time_runs``
times a figure (one warm-up, then ``runs`` runs) behind the quiet-machine guard:
each run waits for other processes to go quiet and is redone when they used
over ``NOISE_LIMIT`` of the CPU meanwhile. ``run_command`` times one command
with its CPU seconds and peak RSS; ``evict_from_page_cache`` serves the cold figures.
"""

from __future__ import annotations

import contextlib
import os
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

NOISE_LIMIT = 0.05  # foreign CPU share above which figures are flagged
GIB = 1 << 30
MB = 1_000_000

# Commands may write .pyc files: this machine sets PYTHONDONTWRITEBYTECODE, which would
# make every timed run recompile mirenfs's changed modules (an installed copy has its
# .pyc files). The warm-up run writes them.
CHILD_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


@dataclass
class Sample:
    """One timed run: wall-clock seconds, the CPU seconds it used (all its threads),
    the child's peak RSS when it was a command, and the CPU seconds *other*
    processes used meanwhile: on 2 cores, a busy neighbour skews every figure."""

    seconds: float
    cpu_seconds: float | None = None
    max_rss_kib: int | None = None
    foreign_cpu: float = 0.0
    # ``foreign_cpu`` as a share of the machine over the run's whole wall-clock time (which
    # for a latency figure is far longer than the ``seconds`` it reports).
    noise: float = 0.0
    daemon_cpu: float | None = None  # CPU seconds of the mount daemon, in a mount figure
    # The SHA-256 floor timed just before this run (a paired figure): wall-clock seconds, and its
    # CPU seconds for a figure of CPU seconds. This machine's speed drifts by a quarter within
    # minutes, so a ratio to a floor measured at the start would be a ratio to another machine.
    floor_seconds: float | None = None
    floor_cpu: float | None = None


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
    def daemon_cpu(self) -> float | None:
        values = [s.daemon_cpu for s in self.samples if s.daemon_cpu is not None]
        return statistics.median(values) if values else None

    @property
    def foreign_cpu(self) -> float:
        return max(s.foreign_cpu for s in self.samples)

    @property
    def noise(self) -> float:
        """The largest share of the machine other processes took during one of the runs."""
        return max(s.noise for s in self.samples)

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
    one_frame: Path | None = None  # the sample as Go's writer makes it: one zstd frame (see bench.snapshots)
    floor_run: Callable[[], None] | None = (
        None  # the SHA-256 floor, for paired figures (set by measure_floor)
    )
    scratch: list[Path] = field(default_factory=list)  # removed at the end unless --keep

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        runs = ", ".join(
            f"{s.seconds:.3f}"
            + (f" (floor {s.floor_seconds:.3f})" if s.floor_seconds is not None else "")
            + (f" ({s.foreign_cpu:.2f} s foreign CPU)" if s.foreign_cpu >= 0.05 else "")
            for s in figure.samples
        )
        log(f"  {figure.name}: median {figure.seconds:.3f} s  (runs: {runs})")
        return figure

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        log(f"  check {'ok' if ok else 'FAILED'}: {name} {detail}")
        return ok

    def time_runs(
        self,
        run: Callable[[], Sample | None],
        *,
        before: Callable[[], None] | None = None,
        paired: bool = False,
    ) -> list[Sample]:
        """One warm-up, then ``runs`` timed runs. ``run`` may return its own Sample
        (commands, with their RSS); otherwise its wall-clock time is taken here.
        ``before`` runs untimed ahead of every run (resetting state, syncing).
        ``paired``: the SHA-256 floor is timed again just before each timed run
        (ahead of ``before``), and the figure's ratio is the median of each
        run's ratio to its own floor (see :meth:`floor_for`).

        The machine is shared: each run waits for the other processes to go quiet,
        and a run during which they used over NOISE_LIMIT of the CPU is done again
        (up to ``retries`` times), so a neighbour's test suite does not pose as a regression.
        """
        samples: list[Sample] = []
        for i in range(self.runs + 1):
            for attempt in range(self.retries + 1):
                floor = self._floor_run() if paired and i > 0 else None
                if before is not None:
                    before()
                wait_for_quiet(self.quiet_wait)
                sample = self._one_run(run)
                if floor is not None:
                    sample.floor_seconds, sample.floor_cpu = floor.seconds, floor.cpu_seconds
                share = sample.noise
                if share <= NOISE_LIMIT or attempt == self.retries:
                    break
                self.discarded += 1
                log(f"    run {sample.seconds:.3f} s discarded: other processes used {share:.0%} of the CPU")
            if i > 0:
                samples.append(sample)
        return samples

    def _floor_run(self) -> Sample | None:
        if self.floor_run is None:
            return None
        wait_for_quiet(self.quiet_wait)
        floor_run = self.floor_run
        return self._one_run(lambda: floor_run())

    def floor_for(self, floor: str | None, sample: Sample) -> float | None:
        """The floor this run is measured against: its paired SHA-256 run where it has one (the
        restore floor is the slower of that and ``zstd -d``), else the floor measured at the start."""
        paired = sample.floor_cpu if floor == "sha256 cpu" else sample.floor_seconds
        if paired is None or floor not in ("sha256", "sha256 cpu", "restore"):
            return self.floors.get(floor or "")
        if floor == "restore":
            return max(paired, self.floors.get("zstd -d", 0.0))
        return paired

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
        daemon = process_cpu_seconds(self.daemon_pid) - daemon
        own += daemon
        sample = result if result is not None else Sample(elapsed, own)
        if self.daemon_pid is not None:
            sample.daemon_cpu = daemon
        child = sample.cpu_seconds if result is not None and sample.cpu_seconds is not None else 0.0
        sample.foreign_cpu = max(0.0, machine_cpu_seconds() - machine - own - child)
        sample.noise = machine_share(sample.foreign_cpu, elapsed)
        return sample

    def command(self, argv: Sequence[str], **kwargs: object) -> Callable[[], Sample]:
        """A runner for ``time_runs`` that times a command and fails loudly if it fails."""
        return lambda: run_command(argv, **kwargs)  # type: ignore[arg-type]

    def mirenfs_cmd(self, *args: str) -> list[str]:
        return [*self.mirenfs, *args]

    def backup_cmd(self, output: Path) -> list[str]:
        """``mirenfs backup`` of the sample to ``output``."""
        return self.mirenfs_cmd("backup", "--image", str(self.image), "-o", str(output))

    def temp_path(self, name: str) -> Path:
        path = self.workdir / name
        self.scratch.append(path)
        return path

    def ensure_snapshot(self) -> Path:
        """A backup of the sample, made untimed when no backup figure produced one."""
        if self.snapshot is None or not self.snapshot.exists():
            path = self.temp_path("sample.mirn")
            log("  making a snapshot for the figures that need one (untimed)")
            run_command(self.backup_cmd(path))
            self.snapshot = path
        return self.snapshot

    def remove_scratch(self) -> None:
        """Remove every ``temp_path`` (files and directories) that exists."""
        for path in self.scratch:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


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


def timed(function: Callable[..., object], *args: object) -> float:
    """Wall-clock seconds of one call of ``function(*args)``."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


# ---------------------------------------------------------------- the quiet-machine guard


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


def machine_share(cpu_seconds: float, seconds: float) -> float:
    """``cpu_seconds`` used over ``seconds`` of wall clock, as a share of all the cores."""
    return cpu_seconds / (seconds * (os.cpu_count() or 1))


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


# ---------------------------------------------------------------- odds and ends


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
    """Progress goes to stderr; the table goes to stdout."""
    print(message, file=sys.stderr, flush=True)
