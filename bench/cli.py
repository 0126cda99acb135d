"""``python -m bench``: the arguments, finding the mirenfs command, and ``main``.

``main`` builds (or reuses) the sample, measures the selected figures of
``bench.figures.MEASUREMENTS`` in order (the floors always), removes the
scratch files, prints the table and returns the exit status.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import bench
from bench.context import GIB, CommandFailed, Context, log
from bench.figures import MEASUREMENTS
from bench.report import environment, exit_status, print_table, write_json
from bench.sample import SampleError, build_sample, describe_sample, fair_sha256

DEFAULT_WORKDIR = Path("/var/tmp/mirenfs-bench")


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
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(bench.__doc__ or "").split("\n\n")[0]
    )
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
        "'env PYTHONPATH=/tmp/try .venv/bin/python -P -m mirenfs' (-P: not the cwd's copy)",
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
    try:
        image = build_sample(args.workdir, args.size)
    except SampleError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    ctx = Context(
        workdir=args.workdir,
        image=image,
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
            ctx.remove_scratch()
    usage = subprocess.run(["du", "-sh", str(ctx.workdir)], capture_output=True, text=True).stdout.split()
    ctx.facts["workdir"] = f"{ctx.workdir} uses {usage[0] if usage else '?'} on disk"
    print_table(ctx)
    if args.json is not None:
        write_json(ctx, args.json)
    return exit_status(ctx)
