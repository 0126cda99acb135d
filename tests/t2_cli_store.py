"""The store-based CLI end to end: `mirenfs disk …`, `lease …`, `backup NAME` and
`restore FILE [--name NAME] [--force]`, checked through the CLI and the bytes of
the images. Every refusal checks its message and that nothing changed."""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from mirenfs.cli import common, snapshot_cmds
from mirenfs.cli.common import DATA_PATH_ENV, DEFAULT_DATA_PATH, data_path_from
from mirenfs.disks import live as disks_module
from mirenfs.disks.manage import sweep_stale_staging as remove_stale_staging
from mirenfs.disks.rules import RestoreTarget
from mirenfs.disks.store import Store
from mirenfs.engine.fstype import detect_filesystem
from mirenfs.format.header import decode_header, read_header

from support.bad_snapshots import FORGED_LOG_LINE
from support.data import BAD_NAMES, sha256_file, staging_files
from support.runners import ok, refused, refused_restore, run_cli, run_mirenfs
from support.store import churn_store, disks, make_disk, store_state
from support.vectors import GO_EXT4, GO_ODD

# --- backup by name, restore into a new name, --force ---


def test_restore_into_a_new_disk_takes_name_size_and_filesystem_from_the_header(
    data: Path, ext4_disk: Path
) -> None:
    assert sha256_file(ext4_disk) == GO_EXT4.sha256
    entry = disks(data)["disk-ext4"]
    assert (entry["status"], entry["filesystem"], entry["size_bytes"]) == (
        "provisioned",
        "ext4",
        GO_EXT4.size_bytes,
    )
    assert entry["volume_status"] == "provisioned" and entry["leases"] == []
    assert ext4_disk == data / "disk-data" / "volumes" / entry["volume_id"] / "disk.img"
    assert staging_files(data) == []


def test_backup_by_name_gives_the_engine_bytes_and_restores_under_a_new_name(
    data: Path, ext4_disk: Path, tmp_path: Path
) -> None:
    by_name = tmp_path / "by-name.mirn"
    ok("backup", "disk-ext4", "-o", by_name, "--data-path", data)
    by_image = tmp_path / "by-image.mirn"
    ok("backup", "--image", ext4_disk, "--name", "disk-ext4", "--filesystem", "ext4", "-o", by_image)
    assert by_name.read_bytes() == by_image.read_bytes()
    with open(by_name, "rb") as snapshot:
        meta = read_header(snapshot)
    assert (meta.name, meta.filesystem, meta.size_bytes, meta.checksum) == (
        "disk-ext4",
        "ext4",
        GO_EXT4.size_bytes,
        GO_EXT4.sha256,
    )

    result = ok("restore", by_name, "--name", "copy", "--data-path", data)
    assert "restored disk copy (new disk)" in result.out
    copy = disks(data)["copy"]
    assert sha256_file(copy["image_path"]) == GO_EXT4.sha256
    assert copy["image_path"] != str(ext4_disk)
    assert sha256_file(ext4_disk) == GO_EXT4.sha256


def test_force_replaces_an_existing_disk_and_updates_its_record(data: Path, ext4_disk: Path) -> None:
    volume_id = disks(data)["disk-ext4"]["volume_id"]
    result = ok("restore", GO_ODD.path, "--name", "disk-ext4", "--force", "--data-path", data)
    assert result.out.startswith(
        f"restored disk disk-ext4 (image replaced; it held ext4, now {GO_ODD.filesystem}) from "
        f"{GO_ODD.path}, a snapshot of disk {GO_ODD.name}: "
    ), result.out
    entry = disks(data)["disk-ext4"]
    assert sha256_file(ext4_disk) == GO_ODD.sha256
    assert (entry["size_bytes"], entry["filesystem"], entry["volume_id"]) == (
        GO_ODD.size_bytes,
        "xfs",
        volume_id,
    )
    assert sorted(disks(data)) == ["disk-ext4"]
    ext4_disk.unlink()  # a disk whose image is gone: the restore writes one, it replaces nothing
    result = ok("restore", GO_ODD.path, "--name", "disk-ext4", "--data-path", data)
    assert "restored disk disk-ext4 (image written: the disk had none)" in result.out
    assert sha256_file(ext4_disk) == GO_ODD.sha256
    assert staging_files(data) == []


def test_restore_from_stdin_with_the_console_script(data: Path, tmp_path: Path) -> None:
    done = run_mirenfs(
        "restore",
        "-",
        "--name",
        "piped",
        input=GO_ODD.path.read_bytes(),
        timeout=60,
        env={DATA_PATH_ENV: str(data)},
    )
    assert done.returncode == 0, done.stderr
    assert sha256_file(disks(data)["piped"]["image_path"]) == GO_ODD.sha256


# --- refusals: each checks its message and that nothing changed ---


def test_existing_image_without_force_is_refused(data: Path, ext4_disk: Path) -> None:
    before = store_state(data)
    error = refused(
        "disk disk-ext4 already has an image",
        "restore",
        GO_ODD.path,
        "--name",
        "disk-ext4",
        "--data-path",
        data,
    )
    assert "--force" in error
    refused("already has an image", "restore", GO_EXT4.path, "--data-path", data)  # the header's name
    assert store_state(data) == before
    assert sha256_file(ext4_disk) == GO_EXT4.sha256


def test_deleting_disk_refuses_backup_and_restore(data: Path, ext4_disk: Path, tmp_path: Path) -> None:
    ok("disk", "set-status", "disk-ext4", "deleting", "--data-path", data)
    before = store_state(data)
    output = tmp_path / "out.mirn"
    refused("disk disk-ext4 is being deleted", "backup", "disk-ext4", "-o", output, "--data-path", data)
    assert not output.exists() and list(tmp_path.glob(".out.mirn*")) == []
    refused_restore("disk disk-ext4 is being deleted", GO_ODD.path, "disk-ext4", data)
    assert store_state(data) == before
    assert staging_files(data) == []


def test_bound_lease_refuses_restore_until_released(data: Path, ext4_disk: Path) -> None:
    lease_id = ok("lease", "acquire", "disk-ext4", "--data-path", data).out.strip()
    assert disks(data)["disk-ext4"]["leases"] == [{"id": lease_id, "status": "bound"}]
    before = store_state(data)
    error = refused(
        "disk disk-ext4 is in use",
        "restore",
        GO_ODD.path,
        "--name",
        "disk-ext4",
        "--force",
        "--data-path",
        data,
    )
    assert f"lease {lease_id} is bound" in error and "lease release" in error
    assert store_state(data) == before

    assert "released lease" in ok("lease", "release", lease_id, "--data-path", data).out
    assert disks(data)["disk-ext4"]["leases"] == [{"id": lease_id, "status": "released"}]
    ok("restore", GO_ODD.path, "--name", "disk-ext4", "--force", "--data-path", data)
    assert sha256_file(ext4_disk) == GO_ODD.sha256


def test_unknown_liveness_fails_restore_closed_and_backup_warns(
    data: Path, ext4_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disks_module, "SYS_BLOCK", str(tmp_path / "no-sys-block"))
    before = store_state(data)
    refused(
        "cannot tell whether the image of disk disk-ext4 is in use",
        "restore",
        GO_ODD.path,
        "--name",
        "disk-ext4",
        "--force",
        "--data-path",
        data,
    )
    assert store_state(data) == before
    result = ok("backup", "disk-ext4", "-o", tmp_path / "unsure.mirn", "--data-path", data)
    assert "cannot tell whether disk disk-ext4 is in use" in result.err


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere(data: Path, ext4_disk: Path, tmp_path: Path, name: str) -> None:
    before = store_state(data)
    message = "is not a valid disk name"
    refused(message, "restore", GO_ODD.path, "--name", name, "--force", "--data-path", data)
    refused(message, "backup", name, "-o", tmp_path / "bad.mirn", "--data-path", data)
    refused(message, "disk", "create", name, "--size", "4M", "--data-path", data)
    refused(message, "lease", "acquire", name, "--data-path", data)
    assert store_state(data) == before
    assert not (tmp_path / "bad.mirn").exists()


def test_a_bad_name_in_the_header_is_refused(data: Path, ext4_disk: Path, tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.mirn"  # made by hand: backup --image refuses such a name now
    meta, header_len = decode_header(GO_ODD.path.read_bytes())
    sneaky.write_bytes(replace(meta, name="../escape").header() + GO_ODD.path.read_bytes()[header_len:])
    before = store_state(data)
    refused("'../escape' is not a valid disk name", "restore", sneaky, "--data-path", data)
    assert store_state(data) == before
    assert not (data / "disk-data" / "escape").exists()


@pytest.mark.parametrize("filesystem", ["ntfs", "../../etc", f"ext4\n{FORGED_LOG_LINE}"])
def test_a_header_whose_filesystem_no_disk_has_is_refused_before_anything_changes(
    data: Path, ext4_disk: Path, tmp_path: Path, filesystem: str
) -> None:
    """A restore records the header's filesystem with the disk: only disk create's are taken, by
    every form of restore, and the refusal repeats the value escaped (one line, nothing forged)."""
    snapshot = tmp_path / "odd.mirn"
    meta, header_len = decode_header(GO_ODD.path.read_bytes())
    snapshot.write_bytes(
        replace(meta, filesystem=filesystem).header() + GO_ODD.path.read_bytes()[header_len:]
    )
    said = (
        f"{snapshot}: the snapshot's header gives the filesystem {filesystem!r}, and a restore accepts only "
    )
    before, image = store_state(data), tmp_path / "new.img"
    for argv in (
        ["--name", "fresh", "--data-path", data],
        ["--data-path", data],  # the disk the header names (disk-odd): not created either
        ["--name", "disk-ext4", "--force", "--data-path", data],
        ["--image", image],
    ):
        refused(said + "ext4, xfs or btrfs", "restore", snapshot, *argv)  # one line: nothing forged
        assert store_state(data) == before and staging_files(data) == [] and not image.exists()
    assert sha256_file(ext4_disk) == GO_EXT4.sha256
    listed = run_cli("disk", "list", "--data-path", data).out.splitlines()
    assert len(listed) == 2 and "disk-ext4" in listed[1]
    refused(said, "verify", snapshot)  # it would not restore: verify does not call it OK


@pytest.mark.usefixtures("no_petabyte_files")
def test_a_header_claiming_a_petabyte_says_so_and_leaves_nothing(data: Path, tmp_path: Path) -> None:
    data_bytes = GO_ODD.path.read_bytes()
    meta, header_len = decode_header(data_bytes)
    snapshot = tmp_path / "huge.mirn"
    snapshot.write_bytes(replace(meta, size_bytes=1 << 50).header() + data_bytes[header_len:])
    said = f"{snapshot}: the snapshot's header claims a disk of 1.0 PiB (1125899906842624 bytes), more than "
    new_disk = refused(said, "restore", snapshot, "--name", "huge", "--data-path", data)
    assert new_disk.endswith("; disk huge was not created\n") and "disk-data" not in new_disk, new_disk
    new_image = refused(said, "restore", snapshot, "--image", tmp_path / "new.img")
    assert new_image.endswith(f"; {tmp_path / 'new.img'} was not created\n"), new_image
    assert disks(data) == {} and staging_files(data) == []
    assert not (data / "disk-data").exists() or list((data / "disk-data").rglob("*.img")) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "huge.mirn"]


def test_a_store_that_cannot_be_read_creates_nothing(data: Path) -> None:
    (data / "mirenfs.db").write_bytes(b"not a database at all" * 200)
    before = store_state(data)
    refused("cannot open the disk store", "restore", GO_EXT4.path, "--data-path", data)
    refused("cannot open the disk store", "restore", GO_EXT4.path, "--name", "other", "--data-path", data)
    assert store_state(data) == before
    assert sorted(path.name for path in data.iterdir()) == ["mirenfs.db"]


def test_a_failed_restore_into_a_new_name_leaves_no_disk(data: Path, ext4_disk: Path, tmp_path: Path) -> None:
    whole = GO_EXT4.path.read_bytes()
    truncated = tmp_path / "truncated.mirn"
    truncated.write_bytes(whole[: len(whole) // 2])
    corrupt = tmp_path / "corrupt.mirn"
    damaged = bytearray(whole)
    damaged[len(whole) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(damaged))
    before = store_state(data)
    for snapshot in (truncated, corrupt):
        result = run_cli("restore", snapshot, "--name", "fresh", "--data-path", data)
        assert result.code == 1 and result.err.startswith("mirenfs: error: "), result.err
        assert store_state(data) == before
        assert "fresh" not in disks(data)
        assert staging_files(data) == []


def test_a_failed_restore_over_an_existing_disk_leaves_it_as_it_was(
    data: Path, ext4_disk: Path, tmp_path: Path
) -> None:
    whole = GO_ODD.path.read_bytes()
    truncated = tmp_path / "truncated.mirn"
    truncated.write_bytes(whole[: len(whole) - 100])
    before = store_state(data)
    result = run_cli("restore", truncated, "--name", "disk-ext4", "--force", "--data-path", data)
    assert result.code == 1
    assert store_state(data) == before
    assert sha256_file(ext4_disk) == GO_EXT4.sha256


def test_a_refused_header_says_what_became_of_the_disk(data: Path, ext4_disk: Path, tmp_path: Path) -> None:
    """A header error stops a restore before any byte is written; its sentence still says so, as
    a data error's does (the README: a failed restore says what became of its target)."""
    header_only = tmp_path / "cut.mirn"
    header_only.write_bytes(GO_ODD.path.read_bytes()[:100])
    before = store_state(data)
    said = f"{header_only}: the snapshot header is truncated: the stream ended after 100 bytes; "
    over = refused(said, "restore", header_only, "--name", "disk-ext4", "--force", "--data-path", data)
    assert over.endswith("; disk disk-ext4 is unchanged\n"), over
    fresh = refused(said, "restore", header_only, "--name", "fresh", "--data-path", data)
    assert fresh.endswith("; disk fresh was not created\n"), fresh
    unnamed = refused(said, "restore", header_only, "--data-path", data)
    assert unnamed.endswith("; no disk was changed\n"), unnamed  # the disk is the header's: unread
    assert store_state(data) == before and staging_files(data) == []
    assert sha256_file(ext4_disk) == GO_EXT4.sha256


def test_staging_leftovers_of_a_crash_are_removed(data: Path, ext4_disk: Path) -> None:
    leftover = Path(f"{ext4_disk}.restore.tmp")
    leftover.write_bytes(b"a restore that crashed")
    assert remove_stale_staging(str(data)) == [str(leftover)]
    assert staging_files(data) == []
    assert sha256_file(ext4_disk) == GO_EXT4.sha256


# --- disk create / add / remove / set-status, leases ---


def test_disk_create_over_the_filesystems_file_size_limit_names_the_disk_and_leaves_nothing(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review C: `disk create --size 100T` on ext4 (16 TiB files at most) said "File too large"."""

    def too_large(_fd: int, _length: int) -> None:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(os, "ftruncate", too_large)
    result = run_cli("disk", "create", "sz", "--size", "100T", "--data-path", data)
    assert result.code == 1 and result.err.startswith("mirenfs: error: cannot make the image of disk sz (")
    assert result.err.endswith("File too large; try a smaller --size; nothing was created\n")
    assert not disks(data) and list((data / "disk-data" / "volumes").iterdir()) == []


def test_disk_remove_of_a_disk_without_its_image_does_not_say_it_removed_one(data: Path) -> None:
    """Trial W: "removed disk ghost and its image …" of an image that was never there."""
    ok("disk", "create", "ghost", "--size", "1M", "--data-path", data)
    image = Path(Store(str(data)).get_disk("ghost").image_path or "")
    image.unlink()
    removed = ok("disk", "remove", "ghost", "--data-path", data)
    assert removed.out == f"removed disk ghost (it had no image at {image})\n"
    ok("disk", "create", "real", "--size", "1M", "--data-path", data)
    image = Path(Store(str(data)).get_disk("real").image_path or "")
    assert (
        ok("disk", "remove", "real", "--data-path", data).out == f"removed disk real and its image {image}\n"
    )


def test_disk_create_makes_a_sparse_formatted_image(data: Path, need_tool: object) -> None:
    result = ok("disk", "create", "pg", "--size", "4M", "--data-path", data)
    entry = disks(data)["pg"]
    image = Path(entry["image_path"])
    assert f"created disk pg: ext4, {4 << 20} bytes" in result.out
    assert (entry["status"], entry["filesystem"], entry["size_bytes"]) == ("provisioned", "ext4", 4 << 20)
    assert image.stat().st_size == 4 << 20
    assert image.stat().st_blocks * 512 < 4 << 20, "the image is sparse"
    assert detect_filesystem(str(image)) == "ext4"

    before = store_state(data)
    refused("a disk named pg already exists", "disk", "create", "pg", "--size", "4M", "--data-path", data)
    assert store_state(data) == before


def test_disk_create_without_mkfs_says_the_image_has_no_filesystem(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_path = tmp_path / "no-tools"
    empty_path.mkdir()
    monkeypatch.setenv("PATH", str(empty_path))
    result = ok("disk", "create", "raw", "--size", "1M", "--filesystem", "btrfs", "--data-path", data)
    assert "mkfs.btrfs is not installed" in result.err and "has no filesystem" in result.err
    image = Path(disks(data)["raw"]["image_path"])
    assert image.read_bytes() == bytes(1 << 20)


@pytest.mark.parametrize("size", [["--size", "-5M"], ["--size=-5M"], ["--size", "-1"]])
def test_a_negative_size_is_refused_by_what_is_wrong_with_it(data: Path, size: list[str]) -> None:
    """argparse took ``-5M`` for an unknown option ("expected one argument")."""
    result = run_cli("disk", "create", "pg", *size, "--data-path", data)
    assert result.code == 2 and "must be positive" in result.err, result.err
    assert "expected one argument" not in result.err
    assert not data.exists() or disks(data) == {}


def test_a_failing_mkfs_leaves_nothing_behind(data: Path, need_tool: Callable[[str], str]) -> None:
    need_tool("mkfs.xfs")
    error = refused(
        "mkfs.xfs failed on the image of disk tiny",
        "disk",
        "create",
        "tiny",
        "--size",
        "1M",
        "--filesystem",
        "xfs",
        "--data-path",
        data,
    )
    assert "is too small" in error and "xxx" not in error  # its reason, not the end of its usage text
    assert "nothing was created" in error
    assert disks(data) == {}
    assert list((data / "disk-data" / "volumes").iterdir()) == []


def test_disk_add_registers_an_image_that_remove_keeps(data: Path, ext4_disk: Path, tmp_path: Path) -> None:
    outside = tmp_path / "srv" / "pg.img"
    outside.parent.mkdir()
    shutil.copyfile(ext4_disk, outside)
    ok("disk", "add", "pg", "--image", outside, "--data-path", data)
    entry = disks(data)["pg"]
    assert (entry["image_path"], entry["filesystem"], entry["size_bytes"]) == (
        str(outside),
        "ext4",
        GO_EXT4.size_bytes,
    )
    assert entry["managed_image"] is False

    backup = tmp_path / "pg.mirn"
    ok("backup", "pg", "-o", backup, "--data-path", data)
    with open(backup, "rb") as snapshot:
        assert read_header(snapshot).checksum == GO_EXT4.sha256

    result = ok("disk", "remove", "pg", "--data-path", data)
    assert "is kept" in result.out
    assert "pg" not in disks(data)
    assert sha256_file(outside) == GO_EXT4.sha256

    refused(
        "cannot tell the filesystem", "disk", "add", "blank", "--image", _blank(tmp_path), "--data-path", data
    )
    refused("No such file", "disk", "add", "ghost", "--image", tmp_path / "ghost.img", "--data-path", data)
    # Trial T: a --filesystem its superblock contradicts is taken (the caller may know better),
    # but said: every snapshot of the disk will name that filesystem.
    result = ok("disk", "add", "pg2", "--image", outside, "--filesystem", "xfs", "--data-path", data)
    assert result.err == (
        f"mirenfs: warning: {outside} holds ext4 by its superblock, not xfs as --filesystem says; its "
        "snapshots will say xfs, and a disk restored from them too\n"
    )
    assert disks(data)["pg2"]["filesystem"] == "xfs"


@pytest.mark.parametrize("filesystem", [[], ["--filesystem", "ext4"]], ids=["detected", "given"])
def test_disk_add_names_a_snapshot_or_the_store_for_what_it_is(
    data: Path, tmp_path: Path, filesystem: list[str]
) -> None:
    """Trial R s18: `disk add` of the data path's own store asked for --filesystem first, and a
    snapshot given with --filesystem became the disk's image."""
    snapshot = tmp_path / "pg.mirn"
    shutil.copyfile(GO_EXT4.path, snapshot)
    make_disk(data, "pg")
    store = data / "mirenfs.db"
    before = {path: path.read_bytes() for path in (snapshot, store)}
    listed = disks(data)
    said = refused(
        "it is a mirenfs snapshot, not a disk image",
        "disk",
        "add",
        "x",
        "--image",
        snapshot,
        *filesystem,
        "--data-path",
        data,
    )
    assert f"restore it first (mirenfs restore {snapshot} --image NEW.img" in said
    said = refused(
        "it is the disk store of the data path",
        "disk",
        "add",
        "x",
        "--image",
        store,
        *filesystem,
        "--data-path",
        data,
    )
    assert "--filesystem" not in said
    assert {path: path.read_bytes() for path in (snapshot, store)} == before and disks(data) == listed


def _blank(tmp_path: Path) -> Path:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(8192))
    return blank


def test_status_changes_and_leases_through_the_cli(data: Path, ext4_disk: Path) -> None:
    for status in ("attached", "detached", "error", "provisioned"):
        result = ok("disk", "set-status", "disk-ext4", status, "--data-path", data)
        assert result.out.strip().endswith(f"-> {status}")
        assert disks(data)["disk-ext4"]["status"] == status
    assert run_cli("disk", "set-status", "disk-ext4", "busy", "--data-path", data).code == 2
    refused("there is no disk named nope", "disk", "set-status", "nope", "attached", "--data-path", data)

    first = ok("lease", "acquire", "disk-ext4", "--data-path", data).out.strip()
    refused(f"lease {first} is bound", "lease", "acquire", "disk-ext4", "--data-path", data)
    ok("lease", "release", first, "--data-path", data)
    assert "already released" in ok("lease", "release", first, "--data-path", data).out
    refused("there is no lease nope", "lease", "release", "nope", "--data-path", data)

    table = ok("disk", "list", "--data-path", data).out.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "FILESYSTEM", "SIZE", "LEASES", "IMAGE"]
    assert table[1].split()[:4] == ["disk-ext4", "provisioned", "ext4", "16.0M"]


def test_backup_and_restore_argument_rules(data: Path, ext4_disk: Path, tmp_path: Path) -> None:
    output = tmp_path / "x.mirn"
    refused(
        "exactly one source", "backup", "disk-ext4", "--image", ext4_disk, "-o", output, "--data-path", data
    )
    refused("exactly one source", "backup", "-o", output)
    refused(
        "only apply to --image backups",
        "backup",
        "disk-ext4",
        "--name",
        "x",
        "-o",
        output,
        "--data-path",
        data,
    )
    refused("picks a disk of the store", "restore", GO_ODD.path, "--image", tmp_path / "i.img", "--name", "x")
    refused("there is no disk named nope", "backup", "nope", "-o", output, "--data-path", data)
    assert not output.exists()


def test_data_path_flag_beats_environment_beats_default(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DEFAULT_DATA_PATH == "/var/lib/miren"
    assert data_path_from(None) == common.DEFAULT_DATA_PATH  # the tests' own (see conftest)
    monkeypatch.setenv(DATA_PATH_ENV, str(tmp_path / "from-env"))
    assert data_path_from(None) == str(tmp_path / "from-env")
    assert data_path_from(str(data)) == str(data)
    (tmp_path / "from-env").mkdir()  # a data path must exist: see the test below

    ok("restore", GO_ODD.path, "--name", "env-disk")
    assert "env-disk" in disks(tmp_path / "from-env")
    ok("restore", GO_ODD.path, "--name", "flag-disk", "--data-path", data)
    assert sorted(disks(data)) == ["flag-disk"]
    assert sorted(Store(str(tmp_path / "from-env")).find_disk_by_name(n).name for n in ["env-disk"]) == [
        "env-disk"
    ]


# --- two processes changing and reading the store at once ---


def test_two_processes_change_and_read_the_store_concurrently(data: Path) -> None:
    store = Store(str(data))
    store.add_disk("alpha", size_bytes=1, filesystem="ext4")
    store.add_disk("beta", size_bytes=1, filesystem="ext4")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    rounds = 120
    workers = [
        context.Process(target=churn_store, args=(str(data), disk, rounds, barrier, results))
        for disk in ("alpha", "beta")
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
    listed = disks(data)
    for disk, problems, last_status, acquired in reports:
        assert problems == [], problems[:3]
        assert listed[disk]["status"] == last_status
        assert len(listed[disk]["leases"]) == acquired == (rounds + 4) // 5
        assert {lease["status"] for lease in listed[disk]["leases"]} == {"released"}


def test_an_interrupt_during_the_undo_of_a_restore_still_removes_the_disk_it_was_creating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial T21 F1: a second Ctrl-C (``timeout -s INT`` signals the command, then its process
    group) reached the undo of an interrupted restore at its next checkpoint, shielded or not,
    and the disk it was creating stayed, ``provisioning`` with no image. The undo now runs to its
    end, and the interrupt is said after."""
    data = tmp_path / "data"
    data.mkdir()
    cut = tmp_path / "cut.mirn"
    cut.write_bytes(GO_ODD.path.read_bytes()[:-100])  # fails at its end: the restore is undone
    real = RestoreTarget.cleanup
    calls: list[str] = []

    def interrupted_once(self: RestoreTarget) -> None:
        calls.append(self.name)
        if len(calls) == 1:
            raise KeyboardInterrupt  # where trio raises the pending one: before the undo did anything
        real(self)

    monkeypatch.setattr(RestoreTarget, "cleanup", interrupted_once)
    result = run_cli("restore", cut, "--name", "pg", "--data-path", data)
    assert (result.code, result.err) == (130, "mirenfs: interrupted\n")
    assert calls == ["pg", "pg"]
    assert disks(data) == {}  # nothing left: no provisioning record, no volume directory
    assert [p.name for p in (data / "disk-data").rglob("*")] == []


def test_a_backup_into_a_directory_that_is_not_there_is_refused_before_the_disk_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial T21 F7: ``backup NAME -o`` with a typo in the directory froze and copied a disk in
    use first, then said the directory was missing."""
    data = tmp_path / "data"
    data.mkdir()
    ok("restore", GO_ODD.path, "--name", "pg", "--data-path", data)
    taken: list[str] = []
    monkeypatch.setattr(snapshot_cmds, "take_point_in_time", lambda name, *_a, **_k: taken.append(name))
    nowhere = tmp_path / "no-such-dir" / "pg.mirn"
    said = refused("there is no directory", "backup", "pg", "-o", nowhere, "--data-path", data)
    assert said == f"mirenfs: error: cannot write {nowhere}: there is no directory {nowhere.parent}\n"
    assert taken == []


def test_a_restore_over_a_disk_says_whose_snapshot_it_was_and_a_filesystem_it_changed(
    tmp_path: Path,
) -> None:
    """Trial T21 F6: another disk's snapshot, of another filesystem, restored over a disk by a
    mistyped file name, turned ext4 into xfs with one line that said neither."""
    data = tmp_path / "data"
    data.mkdir()
    ok("restore", GO_ODD.path, "--name", "pg", "--data-path", data)
    before = disks(data)["pg"]["filesystem"]
    other = "btrfs" if before != "btrfs" else "xfs"
    image = tmp_path / "web.img"
    image.write_bytes(os.urandom(1 << 20))
    web = tmp_path / "web.mirn"
    ok("backup", "--image", image, "--name", "web", "--filesystem", other, "-o", web)
    done = ok("restore", web, "--name", "pg", "--force", "--data-path", data)
    assert done.out.startswith(
        f"restored disk pg (image replaced; it held {before}, now {other}) from {web}, "
        "a snapshot of disk web: "
    ), done.out
    assert disks(data)["pg"]["filesystem"] == other
    again = ok("restore", web, "--name", "pg", "--force", "--data-path", data)
    assert again.out.startswith(f"restored disk pg (image replaced) from {web}, a snapshot of disk web: ")

    # Trial E22 E2: what the image held is read from it, since its record may say otherwise (a
    # restore through a wrong data path rewrote it): the mend said the image had held xfs.
    ok("restore", GO_EXT4.path, "--name", "db", "--data-path", data)
    store = Store(str(data))
    store.update_disk(store.find_disk_by_name("db").id, size_bytes=GO_EXT4.size_bytes, filesystem="xfs")
    mended = ok("restore", GO_EXT4.path, "--name", "db", "--force", "--data-path", data)
    assert mended.out.startswith("restored disk db (image replaced; its record said xfs) from "), mended.out
