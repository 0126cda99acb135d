"""The results: each figure's verdict, the table on stdout, the JSON file, the machine's description.

``verdict`` is the one place a figure is judged (ratio to its floor against its
target, or seconds against its absolute limit); the table, the JSON file and
the exit status all go by it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import ssl
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench.context import NOISE_LIMIT, Context, Figure


def ratio_to_floor(ctx: Context, figure: Figure) -> float | None:
    """The median of each run's ratio to its floor (its own paired floor where it has one)."""
    ratios = []
    for sample in figure.samples:
        floor = ctx.floor_for(figure.floor, sample)
        if not floor:
            return None
        ratios.append(sample.seconds / floor)
    return statistics.median(ratios) if ratios else None


def floor_seconds(ctx: Context, figure: Figure) -> float | None:
    """The floor the figure was measured against (the median of its paired floors)."""
    floors = [ctx.floor_for(figure.floor, sample) for sample in figure.samples]
    known = [floor for floor in floors if floor]
    return statistics.median(known) if known else None


def verdict(ctx: Context, figure: Figure) -> tuple[float | None, str]:
    """The figure's ratio to its floor (None without one) and its result: PASS, MISS or its note."""
    ratio = ratio_to_floor(ctx, figure)
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
    print(
        "   paired: the figures held to a ratio above 1 time the SHA-256 floor again just before each "
        "run; their x floor is the median of the runs' ratios to their own floor (floor s: its median)"
    )
    print()
    headers = (
        "figure",
        "seconds",
        "floor",
        "floor s",
        "x floor",
        "x zstd-3",
        "target",
        "result",
        "CPU s",
        "daemon CPU s",
        "RSS",
        "noise",
    )
    aligns = "<><>>>><>>>>"
    rows = []
    zstd = ctx.floors.get("zstd")
    noisy = False
    for figure in ctx.figures:
        ratio, result = verdict(ctx, figure)
        rss, cpu = figure.peak_rss_mib, figure.cpu_seconds
        noise = figure.noise
        noisy = noisy or noise > NOISE_LIMIT
        rows.append(
            (
                figure.name,
                f"{figure.seconds:.3f}",
                figure.floor or "-",
                f"{paired_floor:.3f}" if (paired_floor := floor_seconds(ctx, figure)) else "-",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{figure.seconds / zstd:.2f}" if zstd else "-",
                f"<= {figure.target:.2f}" if figure.target is not None else "-",
                result,
                f"{cpu:.2f}" if cpu is not None else "-",
                f"{figure.daemon_cpu:.2f}" if figure.daemon_cpu is not None else "-",
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
        "\n  daemon CPU s: median CPU seconds of the mount daemon meanwhile (mount figures);"
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
    figures = []
    for figure in ctx.figures:
        ratio, result = verdict(ctx, figure)
        figures.append(
            {**dataclasses.asdict(figure), "median": figure.seconds, "ratio": ratio, "result": result}
        )
    body = {
        "facts": ctx.facts,
        "floors": ctx.floors,
        "runs": ctx.runs,
        "figures": figures,
        "checks": [dataclasses.asdict(check) for check in ctx.checks],
    }
    path.write_text(json.dumps(body, indent=2) + "\n")


def exit_status(ctx: Context) -> int:
    """0 all good, 1 a correctness check failed, 2 a target was missed."""
    if not all(check.ok for check in ctx.checks):
        return 1
    return 2 if any(verdict(ctx, f)[1] == "MISS" for f in ctx.figures) else 0


def environment() -> str:
    """The machine, the Python, OpenSSL and zstd versions: the facts a figure depends on."""
    import zstandard  # the venv's; imported here so that --help works without it

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
