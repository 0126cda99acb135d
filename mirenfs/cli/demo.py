"""``mirenfs demo``: a throwaway data path with two real disks, mounted, for a first look."""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from mirenfs.cli.common import human_size
from mirenfs.cli.mount_cmds import fold_log_repeats, serve_mount, write_held_back_repeats
from mirenfs.disks.manage import create_disk, mkfs_program
from mirenfs.disks.store import Store
from mirenfs.errors import MirenfsError
from mirenfs.mount.config import MountConfig


def register(commands: Any) -> None:
    """Add ``demo`` to the top-level subcommands (an argparse subparsers object)."""
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


DEMO_DISKS = (
    # name, filesystem, size, what it holds
    ("web", "ext4", 64 << 20, "a small web site and its access log"),
    ("pg", "btrfs", 128 << 20, "a database's table files"),
)


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up, mount in the foreground until Ctrl-C (or an unmount), then remove everything."""
    if mkfs_program("ext4") is None:
        raise MirenfsError("the demo needs mkfs.ext4 to build its disks; install e2fsprogs")
    root, created = _demo_directory(args.directory)
    data, mountpoint, backups = root / "data", root / "mnt", root / "backups"
    try:
        for directory in (data, mountpoint, backups):
            directory.mkdir()
        names = _make_demo_disks(data, root)
        config = MountConfig(str(mountpoint), str(data))
        guide = partial(_print_guide, root, data, mountpoint, backups, names, args.keep)
        fold_log_repeats()
        try:
            serve_mount(config, ready=guide)
        finally:
            write_held_back_repeats()
    finally:
        if args.keep:
            print(f"mirenfs demo: stopped; kept {root} (data path {data})", flush=True)
        else:
            _remove(root, created)
            removed = root if created else f"what it made in {root} (the directory you gave stays)"
            print(f"mirenfs demo: stopped and removed {removed}", flush=True)
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
    store = Store(str(data))
    names = []
    for name, filesystem, size, what in DEMO_DISKS:
        if mkfs_program(filesystem) is None:
            print(f"mirenfs demo: mkfs.{filesystem} is not installed; disk {name} uses ext4")
            filesystem = "ext4"
        elif filesystem == "btrfs" and os.geteuid() != 0:  # trial R, review S4 F13
            print(
                f"mirenfs demo: mkfs.btrfs needs root (it looks at the loop devices); disk {name} uses ext4"
            )
            filesystem = "ext4"
        content = root / f"content-{name}"
        fill = _fill_web if name == "web" else _fill_database
        fill(content)
        create_disk(store, name, size_bytes=size, filesystem=filesystem, content=str(content))
        shutil.rmtree(content)
        print(f"mirenfs demo: disk {name}: {filesystem}, {human_size(size)}, holding {what}", flush=True)
        names.append(name)
    return names


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
    return "mirenfs" if found else f"{sys.executable} -m mirenfs"


def _print_guide(
    root: Path, data: Path, mountpoint: Path, backups: Path, names: list[str], keep: bool
) -> None:
    mirenfs, first = _command_name(), names[0]
    q = shlex.quote  # review C: a directory with a space broke every command shown
    m, b, snapshot = str(mountpoint), str(backups), f"{first}.mirn"
    steps = [
        (f"ls -l {q(m)}", "one NAME.mirn snapshot per disk, its .sha256, and restore/"),
        (f"cp {q(f'{m}/{snapshot}')} {q(b + '/')}", "a backup is a plain copy"),
        (f"{mirenfs} verify {q(f'{b}/{snapshot}')}", "decompress it and check size and checksum"),
        (f"{mirenfs} inspect {q(f'{b}/{snapshot}')}", "its header: name, size, filesystem, checksum"),
        (f"(cd {q(m)} && sha256sum -c {snapshot}.sha256)", "the sidecar checks the snapshot file itself"),
        (
            f"cp {q(f'{b}/{snapshot}')} {q(f'{m}/restore/{first}-copy.mirn')}",
            f"restore it as a new disk, {first}-copy",
        ),
        (f"ls -l {q(m)}", f"{first}-copy.mirn is there now"),
        (f"{mirenfs} status {q(m)}", "index state per disk, and the restores"),
        (f"{mirenfs} disk list --data-path {q(str(data))}", "the disks behind the snapshots"),
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
    print(f"Stop with Ctrl-C here (or `fusermount3 -u {q(m)}`): that unmounts and {ending}.", flush=True)
