"""What every command module shares: the data path, the disk catalogue and node name, sizes,
compression options, the progress bar.

One copy each; the command modules hold parsers and handlers only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import signal
import sys
import threading
import time
from typing import TextIO

from mirenfs.disks.catalogs import CATALOG_ENV, NODE_ENV, catalog_spec_from, node_from, open_catalog
from mirenfs.disks.model import DB_FILE_NAME, STATE_DIRECTORY, Catalog
from mirenfs.engine.image import make_directories
from mirenfs.engine.produce import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, Settings
from mirenfs.errors import MirenfsError, one_line
from mirenfs.mount.config import size_in_bytes

DEFAULT_DATA_PATH = "/var/lib/miren"
DATA_PATH_ENV = "MIRENFS_DATA_PATH"


class ProcessEnd:
    """Whether this process ends with its command (the ``mirenfs`` program; not a test or a
    program that calls :func:`mirenfs.cli.main`): only then may a command change how the process
    takes signals."""

    with_the_command = False


def ignore_interrupts_from_now_on() -> None:
    """The command's outcome is settled (its file is in place): a Ctrl-C or SIGTERM from now on
    can undo nothing, and must not make the program say it failed (trial T21 F2: a second SIGINT
    of ``timeout -s INT`` made a backup whose file was written exit 130)."""
    if ProcessEnd.with_the_command and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resolve_data_path(
    arg: str | None, *, create: bool = False, given_by: str | None = None, new_one_hint: bool = True
) -> str:
    """The data path (see :func:`data_path_from`), which must exist.

    A data path that does not exist is refused: a typo must not quietly start
    an empty disk store. Only the commands that add a disk (``create=True``)
    make a new one, and say so. ``given_by`` names the option the path came
    from when it is not ``--data-path`` (``catalog copy --from``). Without
    ``new_one_hint`` the refusal does not suggest starting a new data path
    (``cleanup``: where none exists, nothing was left behind either).
    """
    path = data_path_from(arg)
    if os.path.isdir(path):
        _refuse_a_data_path_of_another_user(path)
        return path
    if os.path.lexists(path):
        raise MirenfsError(f"the data path {path} is not a directory")
    if not create and (given_by is not None or not new_one_hint):
        raise MirenfsError(
            f"the data path {path} does not exist (from {given_by or _data_path_source(arg)}); check it"
        )
    if not create:
        raise MirenfsError(
            f"the data path {path} does not exist (from {_data_path_source(arg)}); check it, or start a new "
            f"one with `mirenfs disk create NAME --size SIZE --data-path {path}`"
        )
    try:
        make_directories(path)
    except OSError as exc:
        raise MirenfsError(f"cannot create the data path {path}: {exc.strerror}") from None
    print(f"mirenfs: created the data path {path}", file=sys.stderr)
    return path


def _refuse_a_data_path_of_another_user(path: str) -> None:
    """A data path whose store or state directory this user may not read is another user's (root's,
    most often: a command run without sudo). Said so, once, before any command fails on one of its
    files with a story of its own (trial R s18: "cannot read …/catalog-moved.json, the mark
    `catalog copy` left", of a data path never copied anywhere)."""
    for name, what, needed in (
        (DB_FILE_NAME, "disk store", os.R_OK),
        (STATE_DIRECTORY, "state directory", os.R_OK | os.X_OK),
    ):
        inner = os.path.join(path, name)
        try:
            owner = os.stat(inner).st_uid
        except FileNotFoundError:
            continue
        except PermissionError:  # the data path itself cannot be searched
            owner, name, what = os.stat(path).st_uid, "", "data path"
        else:
            if os.access(inner, needed, effective_ids=os.access in os.supports_effective_ids):
                continue
        shown = f"{what} {os.path.join(path, name)}" if name else f"data path {path}"
        raise MirenfsError(
            f"the {shown} is {_user_named(owner)}'s, and this user ({_user_named(os.geteuid())}) may not "
            f"read it: run the command as {_user_named(owner)}" + (" (sudo)" if owner == 0 else "")
        )


def _user_named(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def data_path_from(arg: str | None) -> str:
    """``--data-path`` if given, else ``$MIRENFS_DATA_PATH``, else ``/var/lib/miren``; made absolute."""
    return os.path.abspath(arg or os.environ.get(DATA_PATH_ENV) or DEFAULT_DATA_PATH)


def _data_path_source(arg: str | None) -> str:
    if arg:
        return "--data-path"
    if os.environ.get(DATA_PATH_ENV):
        return f"${DATA_PATH_ENV}"
    return "the default"


# The options that say which disks a command works on. They may come before the command as
# well as after it (``mirenfs --data-path DIR disk list``); see :func:`settle_scope_options`.
SCOPE_OPTIONS = {"data_path": "--data-path", "catalog": "--catalog", "node": "--node"}
_SCOPE_HELP = {
    "data_path": ("DIR", f"Miren's data path (default: ${DATA_PATH_ENV}, else {DEFAULT_DATA_PATH})"),
    "catalog": (
        "CATALOG",
        f"the disk catalogue: etcd://HOST:PORT[,HOST:PORT…][/PREFIX] for a fleet's, etcds://… over "
        f"TLS (default: ${CATALOG_ENV}, else the SQLite store of the data path)",
    ),
    "node": ("NAME", f"this host's node name in an etcd catalogue (default: ${NODE_ENV}, else the hostname)"),
}
_ACCEPTED = "scope_options"  # the parser default that lists the scope options a command takes


def add_data_path_option(parser: argparse.ArgumentParser) -> None:
    """``--data-path``, and with it the catalogue of disks it is used with (``--catalog``, ``--node``)."""
    for dest in SCOPE_OPTIONS:
        add_scope_option(parser, dest)


def add_scope_option(parser: argparse.ArgumentParser, dest: str, *, help: str | None = None) -> None:
    """One of :data:`SCOPE_OPTIONS` on a command's parser, recorded as one the command takes."""
    _add_scope_argument(parser, dest, help or _SCOPE_HELP[dest][1])
    accepted: frozenset[str] = parser.get_default(_ACCEPTED) or frozenset[str]()
    parser.set_defaults(**{_ACCEPTED: accepted | {dest}})


def add_scope_options_before_command(parser: argparse.ArgumentParser) -> None:
    """The scope options on a parser above the commands (the top level; ``disk``, ``lease``,
    ``catalog``), for the commands below that take them."""
    for dest in SCOPE_OPTIONS:
        _add_scope_argument(parser, dest, f"{_SCOPE_HELP[dest][1]}; also after the command")


def _add_scope_argument(parser: argparse.ArgumentParser, dest: str, help: str) -> None:
    """Its default is "not given" rather than None: argparse copies every default of a command's
    parser over what was parsed before the command, which would drop the DIR of
    ``mirenfs --data-path DIR disk list``."""
    parser.add_argument(
        SCOPE_OPTIONS[dest],
        dest=dest,
        metavar=_SCOPE_HELP[dest][0],
        type=_given,
        default=argparse.SUPPRESS,
        help=help,
    )


def _given(text: str) -> str:
    """An empty value (``--data-path "$UNSET"``) is refused: taken as "not given", it would
    quietly fall back to the environment or the default and act on another data path."""
    if not text:
        raise argparse.ArgumentTypeError(
            "it is empty (an unset shell variable?); give a value or leave it out"
        )
    return text


def refuse_disk_options(args: argparse.Namespace, *others: str, instead: str) -> None:
    """Refuse the options that pick a disk of the store (``others`` such as ``--name``, and the
    scope options) in a command that was given an image file directly, naming those given."""
    given = [flag for flag in others if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None]
    given += [flag for dest, flag in SCOPE_OPTIONS.items() if getattr(args, dest, None) is not None]
    if given:
        verb = "pick" if len(given) > 1 else "picks"
        raise MirenfsError(f"{' and '.join(given)} {verb} a disk of the store; {instead}")


def settle_scope_options(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> None:
    """After parsing: a scope option given before a command that does not take it is refused
    (it would be ignored), and every one not given is None (the environment, then the default)."""
    accepted: frozenset[str] = getattr(args, _ACCEPTED, frozenset())
    for dest, flag in SCOPE_OPTIONS.items():
        if not hasattr(args, dest):
            setattr(args, dest, None)
        elif dest not in accepted:
            parser.error(f"{flag} does not apply to `{command}`")


def catalog_from(args: argparse.Namespace, *, create: bool = False) -> Catalog:
    """The catalogue a command works on, for this host: its data path (see
    :func:`resolve_data_path`; ``create`` for the commands that add a disk) and node name."""
    spec = catalog_spec_from(args.catalog)  # a malformed one is refused before the data path is looked at
    node = node_from(args.node)
    return open_catalog(spec, resolve_data_path(args.data_path, create=create), node=node)


def add_compression_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, help=argparse.SUPPRESS)


def parse_size(text: str) -> int:
    """Sizes as operators write them: 4096, 512M, 10G, 1T (binary units)."""
    value = size_in_bytes(text)
    if value is None and text.startswith("-") and size_in_bytes(text[1:]) is not None:
        value = -1  # a negative size: say so, not that it is no size at all
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4096, 512M or 10G")
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


def say(text: str, *, file: TextIO | None = None, flush: bool = False) -> None:
    """Print one line of a command's output: a path in it cannot split it or hide in it (see
    :func:`mirenfs.errors.one_line`)."""
    print(one_line(text), file=file, flush=flush)


def say_done(text: str) -> None:
    """Print the line that says a change is done (an image replaced, a backup written, a disk
    made): the change stands whatever becomes of that line. A standard output that cannot take
    it (``>> log`` on a full disk) gets it said on standard error instead, and the command still
    succeeds (trial FI F1: it exited 1 with "No space left on device" over a restored image)."""
    try:
        say(text, flush=True)
    except BrokenPipeError:
        raise  # the reader went away: ended quietly, as every command is
    except OSError as exc:
        silence_standard_output()
        say(f"mirenfs: standard output could not take this line ({exc.strerror}): {text}", file=sys.stderr)


def silence_standard_output() -> None:
    """After standard output failed: what stays buffered goes nowhere, not into an error at exit."""
    try:
        fileno = sys.stdout.fileno()
    except (OSError, ValueError):  # no descriptor (the API, the tests' in-process runs): nothing to do
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fileno)
    os.close(null)
    with contextlib.suppress(OSError):
        sys.stdout.flush()


def snapshot_size(path: str) -> int:
    """The size of the snapshot a command reads, 0 for standard input (``-``), which must be open:
    a closed one read as /dev/null's stand-in, and the snapshot was called empty (review S2)."""
    if path != "-":
        return file_size(path, "snapshot")
    if getattr(sys.stdin, "closed_at_start", False):  # see mirenfs.launch
        raise MirenfsError(
            "standard input is closed, so there is no snapshot to read: pipe one in, or give the "
            "snapshot's file instead of -"
        )
    return 0


def file_size(path: str, what: str) -> int:
    """The size of a file the command reads, or one line saying why it cannot be opened."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise MirenfsError(f"cannot open {what} {path}: {exc.strerror}") from None


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    Call it with the bytes done so far; it redraws at most ten times a second
    and shows the same units everywhere: percent, MiB/s and the time left.
    A ``total`` of 0 means unknown (a pipe): then it shows bytes and rate only.
    """

    def __init__(self, total: int, label: str, *, enabled: bool | None = None) -> None:
        self.total = total
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._drawn = 0.0
        self._done = 0
        self._done_at = self._started

    def __call__(self, done: int) -> None:
        self._done = done
        now = self._done_at = time.monotonic()
        if not self.enabled or now - self._drawn < 0.1:
            return
        self._drawn = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = self._done / elapsed
        parts = [self.label]
        if self.total > 0:
            fraction = min(self._done / self.total, 1.0)
            left = (self.total - self._done) / rate if rate > 0 else float("inf")
            parts += [f"[{'#' * int(fraction * 30):<30}]", f"{fraction:6.1%}"]
            parts.append(f"{rate / (1 << 20):8.1f} MiB/s")
            parts.append(f"ETA {_clock(left)}" if self._done < self.total else f"in {_clock(elapsed)}")
        else:
            parts += [f"{human_size(self._done):>8}", f"{rate / (1 << 20):8.1f} MiB/s", _clock(elapsed)]
        sys.stderr.write("\r" + "  ".join(parts) + "\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw(self._done_at)  # the rate of the work itself, not of what came after it
            sys.stderr.write("\n")
            sys.stderr.flush()


def _clock(seconds: float) -> str:
    if seconds == float("inf") or seconds > 99 * 3600:
        return "--:--"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
