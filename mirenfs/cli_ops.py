"""Operations commands: ``mirenfs status`` (what a running mount is doing) and
``mirenfs demo`` (a throwaway data path with two real disks, mounted, for a
first look).

``status`` asks the mount itself: the root of a mirenfs mount answers the
extended attribute ``user.mirenfs.status`` with JSON (per disk the index
state and progress, and the restores). Mounts are found in
``/proc/self/mountinfo`` by their type, ``fuse.mirenfs``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mirenfs.errors import MirenfsError

log = logging.getLogger("mirenfs")

FSTYPE = "fuse.mirenfs"
STATUS_XATTR = "user.mirenfs.status"
MOUNTINFO = "/proc/self/mountinfo"


def register(commands: Any) -> None:
    """Add ``status`` and ``demo`` to the top-level subcommands (an argparse subparsers object)."""
    status = commands.add_parser(
        "status", help="show what a mount is doing: index state and progress per disk, restores"
    )
    status.add_argument(
        "mountpoint", nargs="?", metavar="MOUNTPOINT", help="default: every mirenfs mount of this host"
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the mount's status JSON (without MOUNTPOINT: an object keyed by mount point)",
    )
    status.set_defaults(handler=cmd_status)

    demo = commands.add_parser(
        "demo",
        help="mount a throwaway data path with two small disks and show what to try (Ctrl-C ends it)",
    )
    demo.add_argument(
        "directory",
        nargs="?",
        metavar="DIR",
        help="where to put the demo; must not exist or be empty (default: a new directory in $TMPDIR)",
    )
    demo.add_argument("--keep", action="store_true", help="keep DIR (data path, disks) after the demo ends")
    demo.set_defaults(handler=cmd_demo)


# ---- mounts -------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    source: str
    fstype: str
    options: str
    major: int
    minor: int


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount this process sees, in mount order."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                separator = fields.index("-", 6)
                major, minor = (int(n) for n in fields[2].split(":"))
                entries.append(
                    MountEntry(
                        mountpoint=_unescape(fields[4]),
                        source=_unescape(fields[separator + 2]),
                        fstype=fields[separator + 1],
                        options=f"{fields[5]},{fields[separator + 3]}",
                        major=major,
                        minor=minor,
                    )
                )
            except (ValueError, IndexError):
                continue  # a line this parser does not understand is not a mirenfs mount
    return entries


def mirenfs_mounts() -> list[MountEntry]:
    """The mirenfs mounts, the topmost last when several share a mount point."""
    return [entry for entry in mounts() if entry.fstype == FSTYPE]


def mount_at(path: str) -> MountEntry:
    """The mirenfs mount whose mount point is ``path``, or a clear error naming what is there."""
    target = os.path.realpath(path)  # never raises for a dead mount: non-strict
    everything = mounts()
    covering = [entry for entry in everything if entry.mountpoint == target]
    if covering and covering[-1].fstype == FSTYPE:
        return covering[-1]
    if not os.path.exists(target) and not covering:
        raise MirenfsError(f"{path} does not exist")
    if covering:
        raise MirenfsError(
            f"{path} is not a mirenfs mount (a {covering[-1].fstype} filesystem is mounted there)"
        )
    inside = [entry for entry in mirenfs_mounts() if target.startswith(entry.mountpoint.rstrip("/") + "/")]
    if inside:
        raise MirenfsError(f"{path} is inside the mirenfs mount {inside[-1].mountpoint}; give that instead")
    raise MirenfsError(f"{path} is not a mirenfs mount")


# ---- status -------------------------------------------------------------------


def read_status(entry: MountEntry) -> dict[str, Any]:
    """Ask the mount for its status (the root's ``user.mirenfs.status``)."""
    where = entry.mountpoint
    try:
        raw = os.getxattr(where, STATUS_XATTR)  # the mount refreshes its view of the store first
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MirenfsError(
                f"the mirenfs mount at {where} does not answer (its process is gone); "
                f"unmount it with `fusermount3 -u {where}`"
            ) from None
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            raise MirenfsError(
                f"the mirenfs mount at {where} reports no status (is it an older mirenfs?)"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise MirenfsError(
                f"cannot read the status of {where}: the mount is private to its owner; run as that user"
            ) from None
        raise MirenfsError(f"cannot read the status of {where}: {exc.strerror}") from None
    try:
        status = json.loads(raw)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        raise MirenfsError(f"the mirenfs mount at {where} answered a status that is not a JSON object")
    return status


def human_size(size: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{int(size)}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def describe_index(state: dict[str, Any]) -> str:
    """One disk's index, as a person reads it."""
    index = state.get("index", "unknown")
    if index == "building":
        done, total = int(state.get("done", 0)), int(state.get("total", 0))
        percent = 100.0 * done / total if total else 100.0
        return f"building {percent:.0f}% ({human_size(done)} of {human_size(total)})"
    if index == "ready":
        detail = []
        if "snapshot_bytes" in state:
            detail.append(f"snapshot {human_size(int(state['snapshot_bytes']))}")
        if state.get("checksum"):
            detail.append(f"image sha256 {str(state['checksum'])[:16]}…")
        return "ready" + (f" ({', '.join(detail)})" if detail else "")
    if index == "not built":
        return "not built (the first stat or read of the snapshot builds it)"
    return str(index)


def format_status(entry: MountEntry, status: dict[str, Any]) -> str:
    header = [f"{entry.mountpoint}: mirenfs"]
    if entry.source.startswith("/"):
        header.append(f"data path {entry.source}")
    if "pid" in status:
        header.append(f"pid {status['pid']}")
    if "index_passes" in status:
        header.append(f"{status['index_passes']} index passes since mounted")
    lines = [", ".join(header)]
    disks = status.get("disks") or {}
    if disks:
        width = max(len("DISK"), *(len(name) for name in disks))
        lines.append(f"  {'DISK'.ljust(width)}  INDEX")
        for name, state in sorted(disks.items()):
            lines.append(f"  {name.ljust(width)}  {describe_index(state if isinstance(state, dict) else {})}")
    else:
        lines.append("  no disks")
    restores = status.get("restores") or []
    if restores:
        lines.append("  restores:")
        for item in restores:
            if not isinstance(item, dict):
                continue
            parts = [str(item.get("name", "?"))]
            if item.get("disk"):
                parts.append(f"disk {item['disk']}")
            parts.append(str(item.get("state", "?")))
            if "bytes" in item:
                parts.append(f"{human_size(int(item['bytes']))} received")
            lines.append("    " + "  ".join(parts))
    else:
        lines.append("  no restores")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    if args.mountpoint is not None:
        entry = mount_at(args.mountpoint)
        status = read_status(entry)
        print(json.dumps(status, indent=2) if args.json else format_status(entry, status))
        return 0
    found = mirenfs_mounts()
    if not found:
        raise MirenfsError("no mirenfs mount found on this host (start one with `mirenfs mount MOUNTPOINT`)")
    results: dict[str, dict[str, Any]] = {}
    failures = 0
    for entry in found:
        try:
            status = read_status(entry)
        except MirenfsError as exc:
            print(f"mirenfs: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        results[entry.mountpoint] = status
        if not args.json:
            print(format_status(entry, status))
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failures else 0


# ---- demo ---------------------------------------------------------------------

DEMO_DISKS = (
    # name, filesystem, size, what it holds
    ("web", "ext4", 64 << 20, "a small web site and its access log"),
    ("pg", "btrfs", 128 << 20, "a database's table files"),
)
_POPULATE = {
    # mkfs options that fill the new filesystem from a directory, no mount needed
    "ext4": ["mkfs.ext4", "-q", "-F", "-d"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "--rootdir"],
}
MKFS_TIMEOUT_S = 120


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up, mount in the foreground until Ctrl-C (or an unmount), then remove everything."""
    import trio

    from mirenfs.mount import MountConfig, serve

    if shutil.which("mkfs.ext4") is None:
        raise MirenfsError("the demo needs mkfs.ext4 to build its disks; install e2fsprogs")
    root, created = _demo_directory(args.directory)
    data, mountpoint, backups = root / "data", root / "mnt", root / "backups"
    try:
        for directory in (data, mountpoint, backups):
            directory.mkdir()
        names = _make_demo_disks(data, root)
        config = MountConfig(str(mountpoint), str(data))
        guide = partial(_print_guide, root, data, mountpoint, backups, names, args.keep)
        trio.run(partial(serve, config, ready=guide))
    finally:
        if args.keep:
            print(f"mirenfs demo: stopped; kept {root} (data path {data})", flush=True)
        else:
            _remove(root, created)
            print(f"mirenfs demo: stopped and removed {root}", flush=True)
    return 0


def _demo_directory(requested: str | None) -> tuple[Path, bool]:
    """The demo's directory and whether the demo created it (then it removes it too)."""
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="mirenfs-demo-")), True
    root = Path(requested).absolute()
    try:
        root.mkdir(mode=0o700)
        return root, True
    except FileExistsError:
        if not root.is_dir() or any(root.iterdir()):
            raise MirenfsError(
                f"{root} is not an empty directory; give a new or empty DIR to the demo"
            ) from None
        return root, False
    except OSError as exc:
        raise MirenfsError(f"cannot create the demo directory {root}: {exc.strerror}") from None


def _remove(root: Path, created: bool) -> None:
    if created:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _make_demo_disks(data: Path, root: Path) -> list[str]:
    """The demo's disks, each a real filesystem holding files (made with ``mkfs -d``/``--rootdir``)."""
    from mirenfs.cli_store import create_disk
    from mirenfs.store import Store

    store = Store(str(data))
    names = []
    for name, filesystem, size, what in DEMO_DISKS:
        if shutil.which(_POPULATE[filesystem][0]) is None:
            print(f"mirenfs demo: {_POPULATE[filesystem][0]} is not installed; disk {name} uses ext4")
            filesystem = "ext4"
        content = root / f"content-{name}"
        fill = _fill_web if name == "web" else _fill_database
        fill(content)
        created = create_disk(store, name, size_bytes=size, filesystem=filesystem)
        _populate(created.image_path, filesystem, content)
        shutil.rmtree(content)
        print(f"mirenfs demo: disk {name}: {filesystem}, {human_size(size)}, holding {what}", flush=True)
        names.append(name)
    return names


def _populate(image: str, filesystem: str, content: Path) -> None:
    command = [*_POPULATE[filesystem], str(content), image]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=MKFS_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MirenfsError(f"could not run {command[0]} for the demo: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise MirenfsError(f"{command[0]} failed for the demo: {detail[-1] if detail else done.returncode}")


def _fill_web(root: Path) -> None:
    """A small site: pages, the host's license texts (real files), an access log, an image."""
    rng = random.Random(6)
    (root / "www" / "blog").mkdir(parents=True)
    (root / "www" / "index.html").write_text(
        "<!doctype html>\n<title>demo</title>\n<h1>Served from a Miren disk</h1>\n"
        "<p>This page lives in an ext4 image that mirenfs shows as web.mirn.</p>\n"
    )
    for n in range(1, 21):
        words = " ".join(rng.choice(_WORDS) for _ in range(400))
        (root / "www" / "blog" / f"post-{n:02d}.html").write_text(f"<h1>Post {n}</h1>\n<p>{words}</p>\n")
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        shutil.copytree(licenses, root / "www" / "licenses", symlinks=True)
    (root / "www" / "logo.bin").write_bytes(rng.randbytes(256 << 10))
    (root / "logs").mkdir()
    with open(root / "logs" / "access.log", "w") as log_file:
        for n in range(20000):
            page = rng.choice(["/", "/blog/post-01.html", "/licenses/GPL-3", "/logo.bin"])
            when = f"25/Nov/2026:10:{n // 600 % 60:02d}:{n % 60:02d} +0000"
            size = rng.randrange(200, 90000)
            log_file.write(
                f'10.0.{n % 7}.{rng.randrange(256)} - - [{when}] "GET {page} HTTP/1.1" 200 {size}\n'
            )


def _fill_database(root: Path) -> None:
    """Something shaped like a database directory: table files and a WAL segment."""
    rng = random.Random(16)
    tables = root / "base" / "16384"
    tables.mkdir(parents=True)
    (root / "PG_VERSION").write_text("16\n")
    with open(tables / "customers.csv", "w") as f:
        f.write("id,name,city,balance\n")
        for n in range(1, 20001):
            name = f"{rng.choice(_WORDS).title()} {rng.choice(_WORDS).title()}"
            f.write(f"{n},{name},{rng.choice(_CITIES)},{rng.randrange(0, 10**6) / 100:.2f}\n")
    with open(tables / "orders.csv", "w") as f:
        f.write("id,customer_id,item,quantity\n")
        for n in range(1, 60001):
            f.write(f"{n},{rng.randrange(1, 20001)},{rng.choice(_WORDS)},{rng.randrange(1, 9)}\n")
    (root / "pg_wal").mkdir()
    (root / "pg_wal" / "000000010000000000000001").write_bytes(rng.randbytes(1 << 20) + bytes(3 << 20))


_WORDS = (
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"),
    *("kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"),
    *("uniform", "victor", "whiskey", "xray", "yankee", "zulu", "disk", "snapshot", "restore"),
    *("backup", "frame", "index", "chunk", "image", "volume", "lease", "mount"),
)
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Perth", "Quebec", "Tallinn")


def _command_name() -> str:
    """How the reader should type ``mirenfs``: plain if the shell finds this one, else its path."""
    script = Path(sys.executable).with_name("mirenfs")
    found = shutil.which("mirenfs")
    if script.exists():
        if found is not None and os.path.samefile(found, script):
            return "mirenfs"
        return str(script)
    return "mirenfs" if found else f"{sys.executable} -m mirenfs.cli"


def _print_guide(
    root: Path, data: Path, mountpoint: Path, backups: Path, names: list[str], keep: bool
) -> None:
    mirenfs, first = _command_name(), names[0]
    m, b = str(mountpoint), str(backups)
    steps = [
        (f"ls -l {m}", "one NAME.mirn snapshot per disk, its .sha256, and restore/"),
        (f"cp {m}/{first}.mirn {b}/", "a backup is a plain copy"),
        (f"{mirenfs} verify {b}/{first}.mirn", "decompress it and check size and checksum"),
        (f"{mirenfs} inspect {b}/{first}.mirn", "its header: name, size, filesystem, checksum"),
        (f"(cd {m} && sha256sum -c {first}.mirn.sha256)", "the sidecar checks the snapshot file itself"),
        (f"cp {b}/{first}.mirn {m}/restore/{first}-copy.mirn", f"restore it as a new disk, {first}-copy"),
        (f"ls -l {m}", f"{first}-copy.mirn is there now"),
        (f"{mirenfs} status {m}", "index state per disk, and the restores"),
        (f"{mirenfs} disk list --data-path {data}", "the disks behind the snapshots"),
    ]
    ending = f"keeps {root}" if keep else f"deletes {root}"
    print()
    print(f"mirenfs demo: mounted {m} ({len(names)} disks, data path {data})")
    print()
    print("In another terminal, try:")
    for command, why in steps:
        print(f"  # {why}")
        print(f"  {command}")
    print()
    print(f"Stop with Ctrl-C here (or `fusermount3 -u {m}`): that unmounts and {ending}.", flush=True)
