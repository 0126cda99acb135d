"""The CLI on plain files, as a user runs it: the image forms of backup, inspect, verify and
restore, and the operator commands that refuse before anything is mounted."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import syslog
from collections.abc import Callable
from pathlib import Path

import pytest

from mirenfs.cli import build_parser, demo, mount_cmds
from mirenfs.cli.common import settle_scope_options
from mirenfs.cli.mount_cmds import config_from
from mirenfs.disks import rules
from mirenfs.disks import store as store_module
from mirenfs.engine import files
from mirenfs.engine import image as image_module
from mirenfs.errors import MirenfsError, StoreError
from mirenfs.mount.config import MountConfig

from support.data import sha256_file, staging_files, write_image
from support.runners import MIRENFS, mirenfs_command, ok, run, run_cli, run_cli_as_process_would, run_mirenfs
from support.store import disks
from support.vectors import GO_VECTORS


def test_backup_inspect_verify_restore(tmp_path: Path) -> None:
    image = tmp_path / "web.img"
    content = write_image(image, [("text", 3 << 20), ("hole", 6 << 20), ("data", 100_001)])
    snap = tmp_path / "web.mirn"

    result = run_cli_as_process_would("backup", "--image", str(image), "--filesystem", "xfs", "-o", str(snap))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # no progress bar when stderr is not a terminal
    checksum = sha256_file(image)
    said = f"backed up {image} to {snap}: {len(content)} bytes, checksum {checksum}\n"
    assert result.stdout.decode() == said  # one line, as restore prints
    piped = run_mirenfs("backup", "--image", str(image), "--filesystem", "xfs", "-o", "-")
    assert piped.stdout == snap.read_bytes()  # to stdout: the snapshot and nothing else

    inspected = run_cli_as_process_would("inspect", "--json", str(snap))
    fields = json.loads(inspected.stdout)
    assert fields["name"] == "web" and fields["filesystem"] == "xfs"
    assert fields["size_bytes"] == len(content)
    assert fields["checksum"] == sha256_file(image)
    assert fields["seekable_frames"] == 3  # 9.1 MiB in 4 MiB chunks

    verified = run_cli_as_process_would("verify", str(snap))
    assert verified.returncode == 0 and b"OK" in verified.stdout

    restored = tmp_path / "restored.img"
    result = run_cli_as_process_would("restore", str(snap), "--image", str(restored))
    assert result.returncode == 0, result.stderr
    assert restored.read_bytes() == content
    assert restored.stat().st_blocks * 512 < 4 << 20  # the hole stayed a hole


def test_stdout_backup_equals_file_backup(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    write_image(image, [("data", 5 << 20), ("hole", 4 << 20), ("text", 12345)])
    snap = tmp_path / "disk.mirn"
    assert (
        run_cli_as_process_would(
            "backup", "--image", str(image), "--filesystem", "ext4", "-o", str(snap)
        ).returncode
        == 0
    )
    piped = run_mirenfs("backup", "--image", str(image), "--filesystem", "ext4", "-o", "-")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == snap.read_bytes()

    restored = tmp_path / "from-stdin.img"
    result = run_mirenfs("restore", "-", "--image", str(restored), input=piped.stdout)
    assert result.returncode == 0, result.stderr
    assert sha256_file(restored) == sha256_file(image)


def test_filesystem_is_detected_from_the_image(tmp_path: Path) -> None:
    image = tmp_path / "ext.img"
    result = run_cli_as_process_would("restore", str(GO_VECTORS[0].path), "--image", str(image))
    assert result.returncode == 0, result.stderr
    snap = tmp_path / "ext.mirn"
    assert (
        run_cli_as_process_would("backup", "--image", str(image), "--name", "pg", "-o", str(snap)).returncode
        == 0
    )
    fields = json.loads(run_cli_as_process_would("inspect", "--json", str(snap)).stdout)
    assert (fields["name"], fields["filesystem"]) == ("pg", "ext4")


def test_restore_refuses_an_existing_image_without_force(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    write_image(image, [("text", 50_000)])
    before = sha256_file(image)
    result = run_cli_as_process_would("restore", str(GO_VECTORS[2].path), "--image", str(image))
    assert result.returncode == 1
    assert b"already exists; pass --force" in result.stderr
    assert sha256_file(image) == before and staging_files(tmp_path) == []

    result = run_cli_as_process_would("restore", str(GO_VECTORS[2].path), "--image", str(image), "--force")
    assert result.returncode == 0, result.stderr
    assert sha256_file(image) == GO_VECTORS[2].sha256


def test_failed_backup_leaves_no_partial_output(tmp_path: Path) -> None:
    result = run_cli_as_process_would(
        "backup", "--image", str(tmp_path / "missing.img"), "-o", str(tmp_path / "x.mirn")
    )
    assert result.returncode == 1
    assert b"cannot open image" in result.stderr and b"missing.img" in result.stderr
    assert os.listdir(tmp_path) == []

    image = tmp_path / "disk.img"
    write_image(image, [("text", 1000)])
    missing_directory = tmp_path / "no-such-dir" / "x.mirn"
    result = run_cli_as_process_would(
        "backup", "--image", str(image), "--filesystem", "ext4", "-o", str(missing_directory)
    )
    assert result.returncode == 1
    assert b"cannot write" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["disk.img"]


def test_verify_reports_go_vectors_ok() -> None:
    for vector in GO_VECTORS:
        result = run_cli_as_process_would("verify", str(vector.path))
        assert result.returncode == 0, (vector.file, result.stderr)
        assert vector.sha256.encode() in result.stdout


# --- demo and status: refused before anything is mounted ---


def test_the_demos_guide_quotes_its_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Review C: with a space in the directory, every command the demo suggested broke."""
    root = tmp_path / "demo two"
    demo._print_guide(root, root / "data", root / "mnt", root / "backups", ["web", "pg"], keep=True)
    commands = [
        line.strip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("  ") and "#" not in line
    ]
    assert shlex.split(commands[0]) == ["ls", "-l", str(root / "mnt")]
    assert shlex.split(commands[1]) == ["cp", str(root / "mnt" / "web.mirn"), f"{root / 'backups'}/"]
    assert shlex.split(commands[-1])[-1] == str(root / "data")


def test_demo_refuses_a_directory_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # root's demo; nothing here needs root
    (tmp_path / "something").write_text("x")
    result = run_cli("demo", tmp_path)
    assert result.code == 1 and "not an empty directory" in result.err
    assert os.listdir(tmp_path) == ["something"]


def test_the_demo_of_a_user_makes_its_btrfs_disk_ext4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trial R (s18): as a user, the demo failed in mkfs.btrfs (it looks at the host's loop devices)
    with advice to try a larger --size or another --filesystem, options the demo has not."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    data = tmp_path / "data"
    data.mkdir()
    assert demo._make_demo_disks(data, tmp_path) == ["web", "pg"]
    assert {name: disk["filesystem"] for name, disk in disks(data).items()} == {"web": "ext4", "pg": "ext4"}
    assert (
        "mkfs.btrfs needs root (it looks at the loop devices); disk pg uses ext4" in capsys.readouterr().out
    )


def test_status_of_what_is_not_a_mirenfs_mount(tmp_path: Path) -> None:
    result = run(MIRENFS, "status", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"mirenfs: error: {tmp_path} is not a mirenfs mount"
    result = run(MIRENFS, "status", "/proc")
    assert result.returncode == 1 and "a proc filesystem is mounted there" in result.stderr
    result = run(MIRENFS, "status", tmp_path / "missing")
    assert result.returncode == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize("where", ["the data path", "a directory above it"])
def test_a_mount_that_would_cover_its_own_data_path_is_refused_before_mounting(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Mounted there, the daemon's first look at its store would wait on its own answer, for ever
    (found by an operator trial: the mount and every `mirenfs status` hung). Trial R (s18): the
    refused mount point (not empty) was first warned about as if the mount went ahead."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "mirenfs.db").write_bytes(b"")
    mountpoint = data if where == "the data path" else tmp_path
    with pytest.raises(MirenfsError, match="the mount would hide the disks' images and its own store"):
        mount_config("mount", str(mountpoint), "--data-path", str(data))  # refused before mounting
    assert "is not empty" not in caplog.text
    beside = tmp_path / "mnt"  # (one inside it is refused too: see the test below)
    beside.mkdir()
    assert mount_config("mount", str(beside), "--data-path", str(data)).mountpoint == str(beside)
    # Review: a mount point reached through a symlink is kept resolved, as /proc/PID/fd names the
    # files in it: a writer's other descriptors (dd's dup2, a fork) were not found, and its
    # first close ended the restore as if it were the last.
    link = tmp_path / "disks"
    link.symlink_to(beside)
    assert mount_config("mount", str(link), "--data-path", str(data)).mountpoint == str(beside)


def mount_config(*argv: str) -> MountConfig:
    """What ``mirenfs mount`` would mount, parsed as ``main`` parses it, without mounting."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    assert not unknown
    settle_scope_options(parser, args, args.command_parser.prog)
    return config_from(args)


def test_backup_to_a_full_device_says_which_file_and_why(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC: one sentence naming what was written, never
    a bare "No space left on device"."""
    image = tmp_path / "web.img"
    write_image(image, [("data", 1 << 20), ("hole", 1 << 20)])
    source = ["backup", "--image", str(image), "--filesystem", "ext4"]
    result = run_mirenfs(*source, "-o", "/dev/full")
    assert (result.returncode, result.stderr.decode()) == (
        1,
        "mirenfs: error: cannot write /dev/full: the device has no space left\n",
    )
    with open("/dev/full", "wb") as full:
        piped = subprocess.run(
            [*mirenfs_command(), *source, "-o", "-"],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    assert (piped.returncode, piped.stderr.decode()) == (
        1,
        "mirenfs: error: cannot write standard output: the device has no space left\n",
    )


def test_a_log_line_the_full_data_path_cannot_take_goes_to_syslog_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial R: with the data path full, mount.log (which lives there) lost its failure lines or
    cut them off mid-sentence, when they mattered most."""
    said: list[tuple[int, str]] = []
    monkeypatch.setattr(mount_cmds.syslog, "openlog", lambda *_args: None)
    monkeypatch.setattr(mount_cmds.syslog, "syslog", lambda priority, text: said.append((priority, text)))
    handler = mount_cmds.MountLog(str(tmp_path / "mount.log"))

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    handler.setStream(Full())
    logger = logging.getLogger("mirenfs.test.full")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("restore of disk a from restore/a.mirn by uid 0 failed: the data path is full")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert said == [
        (
            syslog.LOG_WARNING,
            "WARNING: restore of disk a from restore/a.mirn by uid 0 failed: the data path is full "
            f"(not written to {tmp_path / 'mount.log'})",
        )
    ]


def test_a_new_disk_restored_whose_record_cannot_be_marked_is_said_so_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: when marking a new disk provisioned failed after its image was installed, the
    restore said "disk fresh was not created" (and a mount logged nothing), though the disk and
    its restored image were there. It says what is there, and what to run."""
    data = tmp_path / "data"
    vector = GO_VECTORS[0]
    ok("disk", "create", "other", "--size", "1M", "--data-path", data)  # a data path in use

    def full(_self: object, _disk_id: str) -> bool:
        error = MirenfsError(f"the data path {data} is full (its filesystem has no space left)")
        error.errno = errno.ENOSPC
        raise error

    monkeypatch.setattr(store_module.Store, "mark_provisioned", full)
    result = run_cli("restore", vector.path, "--name", "fresh", "--data-path", data)
    assert result.code == 1
    assert result.err.endswith(
        "disk fresh was created and its image restored, but the catalogue could not mark it provisioned "
        f"(the data path {data} is full (its filesystem has no space left)); once it answers, run "
        "`mirenfs disk set-status fresh provisioned`\n"
    ), result.err
    monkeypatch.undo()
    record = disks(data)["fresh"]
    assert record["status"] == "provisioning" and sha256_file(record["image_path"]) == vector.sha256
    ok("disk", "set-status", "fresh", "provisioned", "--data-path", data)
    assert disks(data)["fresh"]["status"] == "provisioned"


def test_a_new_disk_whose_record_is_marked_at_the_second_try_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial FD F4: one failed write of the record (a disk I/O error) after the image was in place
    failed the restore, though its undo then marked the disk provisioned, and the sentence ended
    "disk c was not created" of a disk in service."""
    data = tmp_path / "data"
    vector = GO_VECTORS[0]
    ok("disk", "create", "other", "--size", "1M", "--data-path", data)
    mark = store_module.Store.mark_provisioned
    failures = [StoreError(f"cannot write the disk store {data}/mirenfs.db: disk I/O error")]

    def once(self: store_module.Store, disk_id: str) -> bool:
        if failures:
            raise failures.pop()
        return mark(self, disk_id)

    monkeypatch.setattr(store_module.Store, "mark_provisioned", once)
    result = run_cli("restore", vector.path, "--name", "fresh", "--data-path", data)
    assert result.code == 0, result.err
    assert (
        "disk fresh: its restored image is in place and recorded, at the second try "
        f"(cannot write the disk store {data}/mirenfs.db: disk I/O error)"
    ) in caplog.text
    assert result.out.startswith("restored disk fresh (")
    record = disks(data)["fresh"]
    assert record["status"] == "provisioned" and sha256_file(record["image_path"]) == vector.sha256


class _FailingSnapshot(io.BytesIO):
    """A snapshot file whose disk fails (EIO) once ``good`` bytes were read."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data)
        self.good = good

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.good:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().read(size)


def test_a_snapshot_that_cannot_be_read_or_a_rename_that_fails_is_named_with_the_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial FI F2-F4: an I/O error reading the snapshot said only "Input/output error" (restore
    and verify), a failed rename "Input/output error: IMG.restore.tmp", and neither said whether
    the image was touched."""
    vector = GO_VECTORS[0]
    image = tmp_path / "t.img"
    image.write_bytes(b"the old image")
    data = vector.path.read_bytes()
    monkeypatch.setattr(files, "open_input", lambda path: _FailingSnapshot(data, len(data) // 2))
    for argv in (["verify", vector.path], ["restore", vector.path, "--image", image, "--force"]):
        result = run_cli(*argv)
        outcome = f"; {image} is as it was" if argv[0] == "restore" else ""
        assert (result.code, result.err) == (
            1,
            f"mirenfs: error: {vector.path}: cannot read it: Input/output error{outcome}\n",
        ), argv
    monkeypatch.undo()

    # verifyR: EPERM said no outcome (refusals use EPERM too)
    for call, code, step in (
        ("rename", errno.EIO, "renaming its staging file {image}.restore.tmp over it"),
        (
            "fchmod",
            errno.EPERM,
            "giving its staging file {image}.restore.tmp the image's owner, mode and time",
        ),
    ):

        def failing(*args: object, code: int = code, **kwargs: object) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, call, failing)
        result = run_cli("restore", vector.path, "--image", image, "--force")
        monkeypatch.undo()
        assert (result.code, result.err) == (
            1,
            f"mirenfs: error: cannot write {image}: {os.strerror(code)} ({step.format(image=image)}); "
            f"{image} is as it was\n",
        ), call
    assert image.read_bytes() == b"the old image" and sorted(p.name for p in tmp_path.iterdir()) == ["t.img"]


def test_a_restore_another_process_is_making_says_the_disk_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial T: the loser of two restores of one disk (a mount's and the CLI's) that both passed
    the check for another restore was told only "a restore of IMAGE is already in progress"; it
    says what became of the disk too, as every other failed restore does."""
    monkeypatch.setattr(rules, "staging_is_held", lambda _path: False)  # both passed that check
    data = tmp_path / "data"
    ok("disk", "create", "pg", "--size", "1M", "--data-path", data)
    image = Path(disks(data)["pg"]["image_path"])
    before = sha256_file(image)
    staging = os.open(f"{image}.restore.tmp", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(staging, fcntl.LOCK_EX)  # the other restore, running
        result = run_cli("restore", GO_VECTORS[0].path, "--name", "pg", "--force", "--data-path", data)
    finally:
        os.close(staging)
    assert result.code == 1
    assert result.err == (
        f"mirenfs: error: a restore of {image} is already in progress; disk pg is unchanged\n"
    )
    assert sha256_file(image) == before


def test_a_signal_after_the_command_said_its_outcome_leaves_its_exit_status(tmp_path: Path) -> None:
    """Trial T: a SIGINT or SIGTERM in the milliseconds after ``restored disk …`` was printed
    ended the process by that signal (130, 143), and a script retried a restore that was done.
    Once the command has said its outcome, the ``mirenfs`` program ignores both."""
    script = (
        "import os, signal, sys\n"
        "from mirenfs.cli import main\n"
        f"code = main(['verify', {str(GO_VECTORS[0].path)!r}], process_ends=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.startswith(f"{GO_VECTORS[0].path}: OK"), done.stdout


@pytest.mark.parametrize("how", ["raised", "signalled"])
@pytest.mark.parametrize("disk", ["existing", "new"])
def test_a_ctrl_c_right_after_the_image_is_replaced_reports_the_restore_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: str, how: str
) -> None:
    """Trial V: a Ctrl-C that came after the rename printed "mirenfs: interrupted" (exit 130)
    over a replaced image, and for a new disk its clean-up removed the restored disk again.
    After the rename the restore is done: recorded, reported, exit 0. ``signalled`` (review):
    a real SIGINT during the rename reaches the command at its next checkpoint, the one that
    records the new disk, and the clean-up had removed the disk the command said it restored."""
    data = tmp_path / "data"
    vector = GO_VECTORS[0]
    ok("disk", "create", "pg", "--size", "1M", "--data-path", data)  # another size than the vector
    real_rename = image_module.StagingImage.rename_over_image

    def renamed_then_interrupted(self: image_module.StagingImage) -> None:
        if how == "signalled":
            os.kill(os.getpid(), signal.SIGINT)  # the Ctrl-C arrives while the rename runs
            real_rename(self)
            return
        real_rename(self)
        raise KeyboardInterrupt  # the Ctrl-C lands as the rename returns

    monkeypatch.setattr(image_module.StagingImage, "rename_over_image", renamed_then_interrupted)
    name = "pg" if disk == "existing" else "fresh"
    result = run_cli("restore", vector.path, "--name", name, "--force", "--data-path", data)
    assert result.code == 0, result.err
    done = "'s image was replaced" if disk == "existing" else " was created"
    assert result.err == f"mirenfs: interrupted after disk {name}{done}\n"
    assert result.out.startswith(f"restored disk {name} (")
    record = disks(data)[name]
    assert (record["status"], record["size_bytes"], record["filesystem"]) == (
        "provisioned",
        vector.size_bytes,
        vector.filesystem,
    )
    assert sha256_file(record["image_path"]) == vector.sha256
    assert staging_files(data) == []


def test_a_cli_restore_the_full_store_refused_says_the_disk_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial V: with the data path too full for the store's record, `mirenfs restore --force`
    said only that the data path is full; the mount's entry said the disk is unchanged too."""
    data = tmp_path / "data"
    ok("disk", "create", "pg", "--size", "1M", "--data-path", data)
    image = disks(data)["pg"]["image_path"]
    before = sha256_file(image)
    full = store_module._data_path_error(str(data), errno.ENOSPC)
    monkeypatch.setattr(store_module, "_no_room_for_sqlite", lambda _path: full)
    monkeypatch.setattr(store_module, "_no_room", lambda _path, _code=None: store_module._FULL)
    result = run_cli("restore", GO_VECTORS[0].path, "--name", "pg", "--force", "--data-path", data)
    assert result.code == 1
    assert result.err == f"mirenfs: error: {full}; disk pg is unchanged\n"
    assert sha256_file(image) == before and staging_files(data) == []


@pytest.mark.parametrize("image_exists", [True, False])
def test_a_ctrl_c_right_after_restore_image_replaced_the_image_reports_it_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_exists: bool
) -> None:
    """Session 13's leftover: ``restore FILE --image PATH`` said "mirenfs: interrupted" (exit
    130) when the Ctrl-C came after the rename, though PATH was whole and verified."""
    vector = GO_VECTORS[0]
    target = tmp_path / "out.img"
    if image_exists:
        target.write_bytes(b"the old image")
    real_rename = image_module.StagingImage.rename_over_image

    def renamed_then_interrupted(self: image_module.StagingImage) -> None:
        real_rename(self)
        raise KeyboardInterrupt  # the Ctrl-C lands as the rename returns

    monkeypatch.setattr(image_module.StagingImage, "rename_over_image", renamed_then_interrupted)
    result = run_cli("restore", vector.path, "--image", target, "--force")
    assert result.code == 0, result.err
    assert (
        result.err == f"mirenfs: interrupted after {target} was {'replaced' if image_exists else 'written'}\n"
    )
    assert (
        result.out
        == f"restored {target} from {vector.path}: {vector.size_bytes} bytes, checksum {vector.sha256}\n"
    )
    assert sha256_file(target) == vector.sha256
    assert staging_files(tmp_path) == []


def test_a_ctrl_c_as_the_backup_is_renamed_into_place_reports_it_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 13's leftover: a real SIGINT that arrived as ``backup -o FILE`` renamed FILE into
    place said "mirenfs: interrupted" (exit 130) over a whole snapshot. The rename and its record
    are one step now; the interrupt is said as late, and the snapshot verifies."""
    image = tmp_path / "web.img"
    content = write_image(image, [("text", 1 << 20), ("hole", 2 << 20), ("data", 70_001)])
    snap = tmp_path / "web.mirn"
    real_rename = os.rename

    def rename_then_signal(source: str, destination: str, **at: int) -> None:
        real_rename(source, destination, **at)
        if destination == snap.name:  # renamed within the directory's descriptor
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: here, in the rename's step

    monkeypatch.setattr(os, "rename", rename_then_signal)
    result = run_cli("backup", "--image", image, "--filesystem", "ext4", "-o", snap)
    assert result.code == 0, result.err
    assert result.err == f"mirenfs: interrupted after {snap} was written\n"
    checksum = sha256_file(image)
    assert result.out == f"backed up {image} to {snap}: {len(content)} bytes, checksum {checksum}\n"
    monkeypatch.undo()
    assert ok("verify", snap).out == f"{snap}: OK (web, {len(content)} bytes, checksum {checksum})\n"


def test_a_ctrl_c_before_the_backup_is_in_place_still_undoes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the point of no return: an interrupt before the rename leaves no file."""
    image = tmp_path / "web.img"
    write_image(image, [("data", 1 << 20)])
    snap = tmp_path / "web.mirn"

    def interrupted(source: str, destination: str, **at: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)
    result = run_cli("backup", "--image", image, "--filesystem", "ext4", "-o", snap)
    assert (result.code, result.err, result.out) == (130, "mirenfs: interrupted\n", "")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["web.img"]


def test_a_mount_point_inside_the_data_path_is_refused(tmp_path: Path) -> None:
    """Trial Q: a mount on DATA/disk-data (the managed images' directory) hid the images from the
    daemon, whose lookups then waited on its own answers: it hung, and every other mount of the
    data path with it, deaf to SIGTERM. Checked on the parsed command, never mounted (a regression
    would hang so)."""
    data = tmp_path / "data"
    ok("disk", "create", "pg", "--size", "1M", "--data-path", data)
    volumes = Path(disks(data)["pg"]["image_path"]).parent.parent
    for inside in (volumes, data / "mirenfs", data / "some-dir"):
        inside.mkdir(exist_ok=True)
        with pytest.raises(MirenfsError) as refused:
            mount_config("mount", str(inside), "--data-path", str(data))
        assert str(refused.value) == (
            f"the mount point {inside} lies inside the data path {data}: the mount could hide disk "
            "images or its own state there from itself; mount on a directory outside the data path"
        )
    outside = tmp_path / "mnt"
    outside.mkdir()
    assert mount_config("mount", str(outside), "--data-path", str(data)).mountpoint == str(outside)


def test_a_mount_point_where_another_filesystem_is_mounted_is_refused_and_a_full_one_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial Q: `mirenfs mount DIR` on the mount point of a disk's live filesystem hid it (its
    freezes then failed, blaming the disk's use), and on a non-empty directory hid its files,
    both without a word."""
    data = tmp_path / "data"
    ok("disk", "create", "pg", "--size", "1M", "--data-path", data)
    with pytest.raises(MirenfsError) as refused:
        mount_config("mount", "/proc", "--data-path", str(data))
    assert str(refused.value) == (
        "mount point /proc is where a proc filesystem (proc) is mounted: a mount there would hide it; "
        "mount on an empty directory of its own"
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("hidden while mounted")
    caplog.set_level(logging.WARNING, logger="mirenfs")
    assert mount_config("mount", str(full), "--data-path", str(data)).mountpoint == str(full)
    assert caplog.records == []  # said by cmd_mount once the catalogue was checked too
    mount_cmds.warn_if_not_empty(str(full))
    assert [r.getMessage() for r in caplog.records] == [
        f"mount point {full} is not empty: its files are hidden while mirenfs is mounted there"
    ]
    caplog.clear()
    unreachable = run_cli(
        "mount", full, "--data-path", data, "--catalog", "etcd://127.0.0.1:1", "--node", "h"
    )
    assert unreachable.code == 1 and "is unreachable" in unreachable.err  # review S4 F11: and no warning
    assert "is not empty" not in unreachable.err + caplog.text


def test_the_daemons_report_carries_warnings_until_its_end_and_nothing_after(tmp_path: Path) -> None:
    """Review S4 F9, F10: a warning another thread logged as the mount became ready could follow
    "ready" in the pipe (the command then waited for the serving daemon to exit) or go into the
    file that reused the closed descriptor's number; and the failure itself came twice, once as
    a WARNING."""
    read_end, write_end = os.pipe()
    report = mount_cmds._Report(write_end)
    relay = mount_cmds._StartupWarnings(report)
    logger = logging.getLogger("mirenfs.test-report")
    logger.addHandler(relay)
    try:
        logger.warning("first\nline")
        logger.error("mount failed: said as the error, not as a warning")
        report.finish("ready")
        logger.warning("after the end")
        report.finish("twice")
    finally:
        logger.removeHandler(relay)
    with os.fdopen(read_end, "rb") as reported:
        assert reported.read() == b"\x1ewarning:first\\nline\nready"  # and then EOF: closed once


def test_a_data_path_this_user_may_not_write_says_who_may(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial Q: a user without write permission was told to mount the data path read-write."""
    monkeypatch.setattr(store_module.os, "access", lambda _path, _mode: False)
    with pytest.raises(MirenfsError) as refused:
        store_module.check_data_path(str(tmp_path))
    assert str(refused.value) == (
        f"the data path {tmp_path} is not writable by this user; restores and snapshot indexes are kept "
        "there, so run as a user who may write there (its owner, or root)"
    )


def test_a_daemon_failing_after_it_was_ready_writes_its_error_to_its_log_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: the daemon wrote a failure after readiness to the ready pipe's number, closed by
    then and maybe another file's by the time (an image, a staging file, a socket)."""
    pipes: list[tuple[int, int]] = []
    parent_ends: list[int] = []  # the waiting parent's end, kept open as the parent would
    real_pipe = os.pipe

    def recorded_pipe() -> tuple[int, int]:
        pipes.append(real_pipe())
        parent_ends.append(os.dup(pipes[-1][0]))
        return pipes[-1]

    victim = tmp_path / "staging"
    victim.write_bytes(b"\0" * 16)

    def serve(config: MountConfig, *, ready: Callable[[], None]) -> None:
        ready()
        fd = os.open(victim, os.O_RDWR)
        os.dup2(fd, pipes[0][1])  # the pipe's number, now another file's
        os.close(fd)
        raise RuntimeError("the catalogue's watch failed")

    def leave(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "pipe", recorded_pipe)
    monkeypatch.setattr(os, "fork", lambda: 0)
    monkeypatch.setattr(os, "setsid", lambda: None)
    monkeypatch.setattr(os, "_exit", leave)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    monkeypatch.setattr(mount_cmds, "_detach_stdio", lambda config, level: None)
    monkeypatch.setattr(mount_cmds, "serve_mount", serve)
    config = MountConfig(str(tmp_path / "mnt"), str(tmp_path / "data"))
    try:
        with pytest.raises(SystemExit) as ended:
            mount_cmds._daemonize(config, "info")
        assert os.read(parent_ends[0], 100) == b"ready"
    finally:
        os.close(pipes[0][1])
        os.close(parent_ends[0])
    assert ended.value.code == 1
    assert victim.read_bytes() == b"\0" * 16
