"""The README as a new user meets it (issue 10): its shell examples run as written, every
command-line option is documented, and its apt package list is the one the setup installs.

The examples of the introduction, *Everyday use* and *Command line* are its indented (or
fenced) code blocks, run line by line with bash against a real mount, with these substitutions
(one pass, so a substituted path is never substituted again):

- ``/mnt/disks`` -> the test's mount point, ``/var/lib/miren`` -> its data path (also given as
  ``MIRENFS_DATA_PATH``, so commands without ``--data-path`` find it, as the README says);
- ``backup-host:/srv/`` and ``/srv/`` -> a directory of the test's;
- ``mirenfs`` is the checkout's, put on ``PATH`` as the Quick start says.

Before they run, disks ``pg`` (btrfs, 128 MiB) and ``web`` (ext4, 64 MiB) exist, and the
working directory holds the files the restore examples copy (``pg.mirn``, ``old.mirn``, Miren's
``pg-20261125-030000.miren.zst``, and ``snapshots.tar``, a tar of the whole mount). The
*Everyday use* examples run on a mount started with ``--allow-overwrite``, since they replace
disk ``pg`` (the Restore paragraph says so). A block that shows placeholders (``NAME``,
``[--json]``) is a synopsis: each of its lines must parse, filled in, with the real parser.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirenfs.cli import build_parser, mount_helper
from mirenfs.cli.common import DATA_PATH_ENV

from support.mounts import Teardown, is_mounted, log_problems, pid_alive, restore_state, wait_for
from support.runners import REPO, TIMEOUT, VENV_BIN, ok, status_of

README = REPO / "README.md"
INSTALL_DEPS = REPO / "scripts" / "install-deps.sh"
# What a synopsis line's placeholders stand for when it is parsed.
PLACEHOLDERS = {
    "MOUNTPOINT": "/mnt/disks",
    "DIR": "/tmp/somewhere",
    "NAME": "pg",
    "SIZE": "64M",
    "FS": "ext4",
    "PATH": "/tmp/disk.img",
    "STATUS": "detached",
    "LEASE_ID": "lease-1",
    "FILE": "/tmp/pg.mirn",
    "SECONDS": "3",
    "OPT,…": "allow_other",
    "CATALOG": "sqlite:///var/lib/miren",
}
# An option that this many commands take (--data-path, --log-level) is documented once for all of
# them, in the bullets under the synopsis; the others in the synopsis lines of their command.
GENERAL_OPTION_COMMANDS = 3


# ---- reading the README ----------------------------------------------------------------------


def section(title: str) -> str:
    """The text of ``## TITLE`` up to the next ``## `` heading; ``""``: the introduction."""
    text = README.read_text()
    if not title:
        return text.split("\n## ", 1)[0]
    parts = re.split(rf"^## {re.escape(title)}.*$", text, maxsplit=1, flags=re.M)
    assert len(parts) == 2, f"README.md has no section {title!r}"
    return parts[1].split("\n## ", 1)[0]


def code_blocks(text: str) -> list[list[str]]:
    """The code blocks of Markdown ``text`` (indented by four spaces after a blank line, or fenced
    as ``sh``/``bash``/``shell``/plain), each as its non-blank lines."""
    blocks: list[list[str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            if fence.group(1) in ("", "sh", "bash", "shell", "console"):
                blocks.append([entry for entry in lines[index + 1 : end] if entry.strip()])
            index = end + 1
            continue
        if line.startswith("    ") and line.strip() and (index == 0 or not lines[index - 1].strip()):
            block = []
            while index < len(lines) and (lines[index].startswith("    ") or not lines[index].strip()):
                if lines[index].strip():
                    block.append(lines[index][4:])
                index += 1
            blocks.append(block)
            continue
        index += 1
    return blocks


def command_part(line: str) -> str:
    """A line without its trailing ``# comment``."""
    return re.sub(r"\s+#.*$", "", line).strip()


def is_synopsis(line: str) -> bool:
    """A usage line (``mirenfs disk create NAME --size SIZE [--filesystem …]``), not a command."""
    command = command_part(line)
    return "[" in command or re.search(r"(?<![\w$-])[A-Z][A-Z_]+(?![\w-])", command) is not None


def synopsis_lines() -> list[str]:
    blocks = [block for block in code_blocks(section("Command line")) if any(map(is_synopsis, block))]
    lines = [line for block in blocks for line in block]
    assert lines, "the Command line section has no synopsis"
    return [command_part(line) for line in lines]


def example_blocks(title: str) -> list[list[str]]:
    """The blocks of a section that are commands to run (a synopsis block is checked elsewhere)."""
    return [block for block in code_blocks(section(title)) if not any(map(is_synopsis, block))]


# ---- the synopsis is what the parser takes -----------------------------------------------------


def filled_in(line: str, *, optional: bool) -> list[str]:
    """A synopsis line as an argument list: placeholders filled in, the first of each ``a|b``, and
    the ``[optional]`` parts kept or dropped."""
    argv: list[str] = []
    in_group = False
    for token in shlex.split(line):
        starts, ends = token.startswith("["), token.endswith("]")
        in_group = in_group or starts
        word = token.strip("[]")
        if not in_group or optional:
            word = word.split("|")[0] if word not in PLACEHOLDERS else word
            if re.fullmatch(r"[A-Z][A-Z_]+(?:,…)?", word) or word in PLACEHOLDERS:
                assert word in PLACEHOLDERS, f"placeholder {word} of {line!r}: add it to PLACEHOLDERS"
                word = PLACEHOLDERS[word]
            argv.append(word)
        in_group = in_group and not ends
    return argv


def parses(argv: list[str]) -> str:
    """``""`` if the real parser takes ``argv`` (``--version`` exits 0), else what it said."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return "" if exc.code == 0 else err.getvalue() or f"exit {exc.code}"
    return ""


def test_every_synopsis_line_parses_with_the_real_parser() -> None:
    for line in synopsis_lines():
        assert line.startswith("mirenfs "), line
        for optional in (False, True):
            argv = filled_in(line, optional=optional)[1:]
            assert parses(argv) == "", f"README: {line!r} as {argv}: {parses(argv)}"


# ---- every option is documented -----------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("disk", "create")
    options: list[list[str]]  # each option's strings, without help and the suppressed ones


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every command of ``parser`` (a leaf of its subcommand tree) with its options."""
    options: list[list[str]] = []
    children: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            children.update(action.choices)
        elif action.option_strings and action.help != argparse.SUPPRESS:
            options.append(list(action.option_strings))
    yield Command(path, options)
    for name, child in children.items():
        yield from commands(child, (*path, name))


def command_path_of(line: str) -> tuple[str, ...]:
    """The subcommands a synopsis line names: ``mirenfs disk create NAME …`` -> (disk, create)."""
    parser, path = build_parser(), []
    for word in shlex.split(line)[1:]:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or word not in subparsers[0].choices:
            break
        parser = subparsers[0].choices[word]
        path.append(word)
    return tuple(path)


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_and_option_of_mirenfs_is_in_the_readme() -> None:
    readme = README.read_text()
    lines = synopsis_lines()
    by_path: dict[tuple[str, ...], list[str]] = {}
    for line in lines:
        by_path.setdefault(command_path_of(line), []).append(line)
    every = list(commands(build_parser()))
    taken_by = Counter(option for command in every for strings in command.options for option in strings)
    missing = []
    for command in every:
        documented = " ".join(by_path.get(command.path, []))
        if command.path and not any(p[: len(command.path)] == command.path for p in by_path):
            missing.append(f"mirenfs {' '.join(command.path)} has no synopsis line")
        for strings in command.options:
            general = max(taken_by[option] for option in strings) >= GENERAL_OPTION_COMMANDS
            where = readme if general or not command.path else documented
            if not any(mentions(where, option) for option in strings):
                missing.append(f"mirenfs {' '.join(command.path)} {'/'.join(strings)}")
    assert not missing, "not in README.md's Command line section:\n" + "\n".join(missing)


def test_every_option_of_mount_mirenfs_is_in_the_readme() -> None:
    readme = README.read_text()
    missing = [
        "/".join(strings)
        for command in commands(mount_helper.build_parser())
        for strings in command.options
        if not any(mentions(readme, option) for option in strings)
    ]
    assert not missing, f"mount.mirenfs options not in README.md: {missing}"


# ---- the apt packages and the PATH -----------------------------------------------------------


def test_the_apt_packages_in_the_readme_are_the_ones_installed() -> None:
    described = re.search(r"apt packages `([^`]+)`", section("Quick start"))
    assert described, "the Quick start does not list the apt packages"
    installed = re.search(r"^packages=\(([^)]*)\)", INSTALL_DEPS.read_text(), re.M)
    assert installed, f"no packages=(…) in {INSTALL_DEPS}"
    assert described.group(1).split() == installed.group(1).split()


def test_the_quick_start_says_how_to_put_mirenfs_on_path() -> None:
    lines = [line for block in code_blocks(section("Quick start")) for line in block if "PATH" in line]
    assert lines, "the Quick start does not say how to get mirenfs on PATH"
    shell = f"{lines[0]}; command -v mirenfs; command -v mount.mirenfs"
    found = subprocess.run(
        ["bash", "-c", shell],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert found.stdout.split() == [
        str(REPO / ".venv" / "bin" / name) for name in ("mirenfs", "mount.mirenfs")
    ]


# ---- the examples run as written ------------------------------------------------------------------


@dataclass
class Host:
    """A machine as the README's examples expect it: a data path holding disks pg and web, a mount
    point, a backup directory, and a working directory with snapshot files."""

    root: Path
    data: Path
    mountpoint: Path
    srv: Path
    work: Path
    teardown: Teardown

    def substitute(self, line: str) -> str:
        paths = {
            "backup-host:/srv/": f"{self.srv}/",
            "/srv/": f"{self.srv}/",
            "/mnt/disks": str(self.mountpoint),
            "/var/lib/miren": str(self.data),
        }
        pattern = "|".join(re.escape(key) for key in sorted(paths, key=len, reverse=True))
        return re.sub(pattern, lambda match: paths[match.group(0)], line)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", DATA_PATH_ENV: str(self.data)}

    def run(self, line: str) -> str:
        """One line of an example, as written but for the substitutions; it must succeed."""
        command = self.substitute(line)
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=self.env,
        )
        assert done.returncode == 0, (
            f"README example {line!r} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
        if command.startswith("mirenfs mount "):  # a daemon: its process goes when the test ends
            self.teardown.pids.append(int(status_of(self.mountpoint)["pid"]))
        return done.stdout

    def run_blocks(self, blocks: list[list[str]]) -> None:
        for block in blocks:
            for line in block:
                self.run(line)

    def mount(self, *options: str) -> None:
        self.run(" ".join(["mirenfs mount /mnt/disks", *options]))

    def unmount(self) -> None:
        self.run("umount /mnt/disks")
        wait_for(lambda: not is_mounted(self.mountpoint), "the mount to go")

    def check_log(self) -> None:
        log = self.data / "mirenfs" / "mount.log"  # where a daemonized mount logs
        text = log.read_text() if log.exists() else ""
        assert log_problems(text) == [], text


@pytest.fixture
def host(tmp_path: Path, teardown: Teardown) -> Iterator[Host]:
    root = tmp_path
    data, mountpoint, srv, work = root / "var/lib/miren", root / "mnt/disks", root / "srv", root / "work"
    for directory in (mountpoint, srv / "backups", srv / "archive", work):
        directory.mkdir(parents=True)
    teardown.mount(mountpoint)
    ok("disk", "create", "pg", "--size", "128M", "--filesystem", "btrfs", "--data-path", data)
    ok("disk", "create", "web", "--size", "64M", "--filesystem", "ext4", "--data-path", data)
    yield Host(root, data, mountpoint, srv, work, teardown)


def test_the_introduction_and_everyday_use_examples_run_as_written(host: Host) -> None:
    (introduction,) = example_blocks("")
    host.run_blocks([introduction])  # mounts, backs up, archives, restores as pg-copy
    assert restore_state(host.mountpoint, "pg-copy.mirn") == "installed: created disk pg-copy"
    assert (host.srv / "archive" / "disks.tar").stat().st_size > 0
    host.unmount()

    host.mount("--allow-overwrite")  # the Restore examples replace disk pg
    snapshot = host.mountpoint / "pg.mirn"
    for name in ("pg.mirn", "old.mirn", "pg-20261125-030000.miren.zst"):
        shutil.copyfile(snapshot, host.work / name)
    host.run(f"tar -cf {host.work / 'snapshots.tar'} -C /mnt/disks .")  # a whole mount: the harder case
    checksums = {
        name: os.getxattr(host.mountpoint / f"{name}.mirn", "user.mirn.checksum") for name in ("pg", "web")
    }

    blocks = example_blocks("Everyday use")
    assert len(blocks) >= 3, blocks  # backup, restore, and looking at the outcome
    host.run_blocks(blocks)

    assert restore_state(host.mountpoint, "pg.mirn") == "installed"
    assert restore_state(host.mountpoint, "web.mirn") == "installed"
    assert restore_state(host.mountpoint, "pg-20261125-030000.miren.zst") == "installed"
    for name, checksum in checksums.items():  # restored from their own snapshots: the same images
        assert os.getxattr(host.mountpoint / f"{name}.mirn", "user.mirn.checksum") == checksum
    host.unmount()
    host.check_log()


def test_the_command_line_examples_run_as_written(host: Host) -> None:
    blocks = example_blocks("Command line")
    assert blocks, "the Command line section has no examples"
    lines = [line for block in blocks for line in block]
    assert command_part(lines[0]).startswith("mirenfs mount /mnt/disks")
    assert command_part(lines[-1]) == "umount /mnt/disks"
    host.run_blocks(blocks)
    wait_for(lambda: not is_mounted(host.mountpoint), "the mount to go")
    for pid in host.teardown.pids:
        wait_for(lambda pid=pid: not pid_alive(pid), "the mount daemon to exit")
    host.check_log()
