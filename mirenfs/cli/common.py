"""What every command module shares: the data path, sizes, compression options, the progress bar.

One copy each; the command modules hold parsers and handlers only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mirenfs.engine.produce import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, Settings
from mirenfs.errors import MirenfsError

DEFAULT_DATA_PATH = "/var/lib/miren"
DATA_PATH_ENV = "MIRENFS_DATA_PATH"


def resolve_data_path(arg: str | None, *, create: bool = False) -> str:
    """``--data-path`` if given, else ``$MIRENFS_DATA_PATH``, else ``/var/lib/miren``; made absolute.

    A data path that does not exist is refused: a typo must not quietly start
    an empty disk store. Only the commands that add a disk (``create=True``)
    make a new one, and say so.
    """
    chosen = arg or os.environ.get(DATA_PATH_ENV) or DEFAULT_DATA_PATH
    path = os.path.abspath(chosen)
    if os.path.isdir(path):
        return path
    if os.path.lexists(path):
        raise MirenfsError(f"the data path {path} is not a directory")
    if not create:
        raise MirenfsError(
            f"the data path {path} does not exist (from {_data_path_source(arg)}); check it, or start a new "
            f"one with `mirenfs disk create NAME --size SIZE --data-path {path}`"
        )
    try:
        os.makedirs(path, mode=0o755)
    except OSError as exc:
        raise MirenfsError(f"cannot create the data path {path}: {exc.strerror}") from None
    print(f"mirenfs: created the data path {path}", file=sys.stderr)
    return path


def _data_path_source(arg: str | None) -> str:
    if arg:
        return "--data-path"
    if os.environ.get(DATA_PATH_ENV):
        return f"${DATA_PATH_ENV}"
    return "the default"


def add_data_path_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-path",
        metavar="DIR",
        default=None,
        help=f"Miren's data path (default: ${DATA_PATH_ENV}, else {DEFAULT_DATA_PATH})",
    )


def add_compression_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, help=argparse.SUPPRESS)


def parse_size(text: str) -> int:
    """Sizes as operators write them: 4096, 512M, 10G, 1T (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in units:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = int(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4096, 512M or 10G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        return Settings(chunk_size=args.chunk_size, level=args.level)
    except ValueError as exc:
        raise MirenfsError(str(exc)) from None


def human_size(size: float) -> str:
    """``512B``, ``64.0M``, ``1.5G``: binary units, one decimal."""
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{int(size)}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def file_size(path: str, what: str) -> int:
    """The size of a file the command reads, or one line saying why it cannot be opened."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise MirenfsError(f"cannot open {what} {path}: {exc.strerror}") from None


class ProgressBar:
    """A one-line progress bar on stderr, shown only when stderr is a terminal.

    Call with the bytes done so far; redraws at most ten times a second.
    """

    def __init__(self, total: int, label: str, *, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._drawn < 0.1 and done < self.total):
            return
        self._drawn = now
        fraction = min(done / self.total, 1.0)
        rate = done / max(now - self._started, 1e-6) / 1e6
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:6.1%} {rate:8.1f} MB/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
