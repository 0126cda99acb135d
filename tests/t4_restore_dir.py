"""Part 2 of the mount: restoring by writing into restore/ with cp, rsync, tar and dd."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mirenfs.disks.restore import MAX_HOLE
from mirenfs.format.header import Meta, decode_header

from support.bad_snapshots import CASES, FORGED_LOG_LINE, bad_inputs, make_good_snapshot
from support.data import sha256_file, sha256_sparse, staging_files, write_image
from support.loops import loop_device
from support.mounts import restore_state as state
from support.mounts import wait_for
from support.runners import run_mirenfs
from support.sparse import skipped_by_rsync_sparse, snapshot_ending_in_zeros, sparse_writes
from support.vectors import GO_VECTORS, GoVector

TOOLS = ["cp", "rsync", "tar"]


def disk_record(data: Path, name: str) -> dict | None:
    listing = run_mirenfs("disk", "list", "--json", "--data-path", str(data))
    assert listing.returncode == 0, listing.stderr
    return next((d for d in json.loads(listing.stdout) if d["name"] == name), None)


def copy_in(
    tool: str, source: Path, mnt: Path, file_name: str, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """Put ``source`` into restore/ as ``file_name`` the way each tool does it."""
    destination = mnt / "restore" / file_name
    if tool == "cp":
        command = ["cp", str(source), str(destination)]
    elif tool == "rsync":
        command = ["rsync", str(source), str(destination)]  # default: .NAME.mirn.XXXXXX, then rename
    else:
        staged = tmp / "tar-src"
        staged.mkdir(exist_ok=True)
        (staged / file_name).write_bytes(source.read_bytes())
        archive = tmp / f"{file_name}.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(staged), file_name], check=True, timeout=60)
        command = ["tar", "-xf", str(archive), "-C", str(mnt / "restore")]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("vector", GO_VECTORS, ids=lambda v: v.file)
def test_go_vectors_restore_through_the_mount(
    tool: str, vector: GoVector, tmp_path: Path, mounts, need_tool
) -> None:
    need_tool(tool)
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mounts(mnt, data)
    result = copy_in(tool, vector.path, mnt, "restored.mirn", tmp_path)
    assert result.returncode == 0, result.stderr
    assert state(mnt, "restored.mirn") == "installed: created disk restored"

    record = disk_record(data, "restored")
    assert record is not None and record["status"] == "provisioned"
    assert (record["size_bytes"], record["filesystem"]) == (vector.size_bytes, vector.filesystem)
    image = Path(record["image_path"])
    assert sha256_file(image) == vector.sha256
    assert image.stat().st_blocks * 512 <= max(vector.size_bytes // 10, 1 << 20)  # written sparsely
    if vector.file == "go-ext4.mirn":  # the one vector that is a real filesystem (vectors README)
        fsck = subprocess.run([need_tool("e2fsck"), "-fn", str(image)], capture_output=True, timeout=60)
        assert fsck.returncode == 0, fsck.stdout
    snapshot = mnt / "restored.mirn"
    wait_for(snapshot.exists, what="the restored disk's snapshot")
    assert os.getxattr(snapshot, "user.mirn.checksum").decode() == vector.sha256
    assert staging_files(data) == []


@pytest.mark.parametrize("command", [["cp", "-a"], ["cp", "-p"], ["rsync", "-a"]], ids=" ".join)
def test_tools_that_keep_attributes_restore_and_succeed(
    command: list[str], tmp_path: Path, mounts, need_tool
) -> None:
    """cp sets an ACL on the file it wrote (rsync -a does not): "not supported" must not fail it.
    (rsync -X, which asks for xattrs, reports that they were not kept, as on any filesystem
    without them.)"""
    need_tool(command[0])
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mounts(mnt, data)
    vector = GO_VECTORS[0]
    source = tmp_path / "kept.mirn"
    source.write_bytes(vector.path.read_bytes())
    os.setxattr(source, "user.note", b"copied with its attributes")
    argv = [*command, str(source), str(mnt / "restore" / "kept.mirn")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert state(mnt, "kept.mirn") == "installed: created disk kept"
    record = disk_record(data, "kept")
    assert record is not None and sha256_file(Path(record["image_path"])) == vector.sha256


@pytest.fixture
def existing(tmp_path: Path) -> tuple[Path, Path, str]:
    """A data path with disk `pg` whose image must survive every failed restore."""
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "pg.img"
    write_image(image, [("text", 300_000), ("hole", 200_000)], seed=5)
    result = run_mirenfs(
        "disk", "add", "pg", "--image", str(image), "--filesystem", "ext4", "--data-path", str(data)
    )
    assert result.returncode == 0, result.stderr
    return data, image, sha256_file(image)


@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Meta, int]:
    return make_good_snapshot(
        tmp_path_factory.mktemp("good"), [("text", 200_000), ("data", 150_000), ("hole", 300_000)]
    )


@pytest.mark.parametrize("case", CASES)
def test_bad_snapshot_fails_cp_and_loses_nothing(
    case: str, good_snapshot, existing, tmp_path: Path, mounts
) -> None:
    data, image, before = existing
    mnt = tmp_path / "mnt"
    snapshot, reason = bad_inputs(*good_snapshot)[case]
    mounts(
        mnt,
        data,
        "--allow-overwrite",
        expect_log=[
            rf"restore of disk (pg|fresh) from restore/(pg|fresh)\.mirn .*failed: .*(?:{reason})",
            r"restore/(pg|fresh)\.mirn was closed after \d+ bytes, before the snapshot was whole",
        ],
    )
    bad = tmp_path / "bad.mirn"
    bad.write_bytes(snapshot)

    # Over an existing disk: the image stays byte-identical.
    result = subprocess.run(
        ["cp", str(bad), str(mnt / "restore" / "pg.mirn")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "Input/output error" in result.stderr or "Invalid argument" in result.stderr, result.stderr
    assert state(mnt, "pg.mirn").startswith("failed: ")
    assert sha256_file(image) == before
    assert staging_files(tmp_path) == []

    # Into a new name: no disk is left behind.
    result = subprocess.run(
        ["cp", str(bad), str(mnt / "restore" / "fresh.mirn")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert state(mnt, "fresh.mirn").startswith("failed: ")
    assert disk_record(data, "fresh") is None
    assert not (data / "disk-data" / "volumes").exists() or not any(
        p.name == "disk.img" for p in (data / "disk-data" / "volumes").rglob("*")
    )
    assert staging_files(tmp_path) == []


def test_a_filesystem_no_disk_has_is_einval_and_its_value_never_reaches_the_log_raw(
    good_snapshot, existing, tmp_path: Path, mounts
) -> None:
    """A header's filesystem holding a newline and a log line of its own: cp fails with EINVAL, the
    log and the entry's state repeat it escaped, and no disk is created."""
    data, image, before = existing
    mnt = tmp_path / "mnt"
    snapshot, _reason = bad_inputs(*good_snapshot)["filesystem with a log line"]
    forged = "ext4\n" + FORGED_LOG_LINE
    escaped = f"the snapshot's header gives the filesystem {forged!r}"
    mount = mounts(mnt, data, expect_log=[re.escape(f"restore/fresh.mirn by uid 0 failed: {escaped}")])
    bad = tmp_path / "bad.mirn"
    bad.write_bytes(snapshot)
    result = subprocess.run(
        ["cp", str(bad), str(mnt / "restore" / "fresh.mirn")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "Invalid argument" in result.stderr, result.stderr
    assert state(mnt, "fresh.mirn").startswith(f"failed: {escaped}, and a restore accepts only ext4")
    assert [line for line in mount.log().splitlines() if escaped in line] != []
    assert not [line for line in mount.log().splitlines() if line.startswith(FORGED_LOG_LINE)]
    assert disk_record(data, "fresh") is None and sha256_file(image) == before
    assert staging_files(tmp_path) == []


@pytest.mark.usefixtures("no_petabyte_files")  # the mount started here inherits the limit
def test_a_header_claiming_a_petabyte_fails_cp_with_efbig(good_snapshot, tmp_path: Path, mounts) -> None:
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    good, meta, header_len = good_snapshot
    claims = "the snapshot's header claims a disk of 1.0 PiB (1125899906842624 bytes)"
    mounts(mnt, data, expect_log=[re.escape(f"restore/huge.mirn by uid 0 failed: {claims}")])
    huge = tmp_path / "huge.mirn"
    huge.write_bytes(replace(meta, size_bytes=1 << 50).header() + good[header_len:])
    result = subprocess.run(
        ["cp", str(huge), str(mnt / "restore" / "huge.mirn")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "File too large" in result.stderr, result.stderr
    shown = state(mnt, "huge.mirn")
    assert shown.startswith(f"failed: {claims}, more than the filesystem ") and shown.endswith(
        "; disk huge was not created"
    ), shown
    assert disk_record(data, "huge") is None and staging_files(tmp_path) == []


def test_refusals_reach_cp_with_their_errno(existing, tmp_path: Path, mounts, need_tool) -> None:
    data, image, before = existing
    mnt = tmp_path / "mnt"
    mounts(
        mnt,
        data,
        expect_log=[  # each refusal below, logged once at the FUSE boundary
            r"disk pg already has an image",
            r"'sp ace' is not a valid disk name",
            r"restore/notes\.txt: only snapshot files",
            r"'\.hidden' is not a valid disk name",
            r"disk pg is being deleted",
            r"disk pg is in use \(lease lease-\w+ is bound\)",
            r"disk pg is in use: its image .* backs /dev/loop\d+",
        ],
    )
    vector = GO_VECTORS[2].path

    def cp(name: str) -> str:
        result = subprocess.run(
            ["cp", str(vector), str(mnt / "restore" / name)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0, name
        return result.stderr

    assert "File exists" in cp("pg.mirn")  # existing image, mount without --allow-overwrite
    assert "Invalid argument" in cp("sp ace.mirn")
    assert "Invalid argument" in cp("notes.txt")
    assert "Invalid argument" in cp(".hidden.mirn")

    run_mirenfs("disk", "set-status", "pg", "deleting", "--data-path", str(data))
    assert "Device or resource busy" in cp("pg.mirn")
    run_mirenfs("disk", "set-status", "pg", "provisioned", "--data-path", str(data))

    lease = run_mirenfs("lease", "acquire", "pg", "--data-path", str(data))
    assert lease.returncode == 0, lease.stderr
    assert "Device or resource busy" in cp("pg.mirn")
    run_mirenfs("lease", "release", lease.stdout.decode().split()[0], "--data-path", str(data))

    with loop_device(image):
        assert "Device or resource busy" in cp("pg.mirn")
    assert sha256_file(image) == before
    assert disk_record(data, "sp ace") is None and staging_files(tmp_path) == []

    # No entry was left to hold a reason; mirenfs status lists them, the newest first.
    shown = run_mirenfs("status", str(mnt))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert "  refused (newest first):\n    restore/pg.mirn  EBUSY  disk pg is in use: its image" in text
    assert re.search(r"^    restore/notes\.txt  EINVAL  only snapshot files", text, re.M)  # named once
    assert re.search(r"^    restore/pg\.mirn  EEXIST  disk pg already has an image", text, re.M)


@pytest.mark.parametrize(
    ("conversion", "reason"),
    [
        ([], "writes to restore/ must arrive in order: a truncate to"),
        (["conv=notrunc"], "writes to restore/ must arrive in order: the first write came at offset"),
    ],
    ids=["dd-truncates-first", "dd-notrunc"],
)
def test_out_of_order_writes_are_refused(
    conversion: list[str], reason: str, existing, tmp_path: Path, mounts
) -> None:
    """dd seeking farther than a hole may reach (MAX_HOLE, taken as zeros) before it writes,
    whether it extends the file with a truncate first or writes there at once."""
    data, _image, _before = existing
    skipped_blocks = MAX_HOLE // 4096 + 1
    mnt = tmp_path / "mnt"
    mounts(
        mnt,
        data,
        expect_log=[
            rf"restore/seeky\.mirn( failed)?: .*{re.escape(reason)}",
            rf"restore of disk seeky from restore/seeky\.mirn .*failed: {re.escape(reason)}",
            r"restore/seeky\.mirn was empty, before the snapshot was whole",  # dd's closes
        ],
    )
    dd = subprocess.run(
        [
            "dd",
            f"if={GO_VECTORS[0].path}",
            f"of={mnt / 'restore' / 'seeky.mirn'}",
            "bs=4096",
            f"seek={skipped_blocks}",
            "status=none",
            *conversion,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dd.returncode != 0 and "Invalid argument" in dd.stderr
    assert state(mnt, "seeky.mirn").startswith(f"failed: {reason}")
    advice = "copy without -S/--sparse" if conversion == [] else "copy it with cp, or write it with >"
    assert advice in state(mnt, "seeky.mirn")
    assert disk_record(data, "seeky") is None and staging_files(data) == []


WRITER = """
import os, signal, sys
source, target, half = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(source, "rb").read()
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, data[:half])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_halfway_aborts_its_restore(existing, tmp_path: Path, mounts) -> None:
    data, image, before = existing
    mnt = tmp_path / "mnt"
    mounts(
        mnt,
        data,
        "--allow-overwrite",
        expect_log=[
            r"restore/(pg|brand-new)\.mirn was closed after \d+ bytes, before the snapshot was whole",
            r"restore of disk (pg|brand-new) from restore/(pg|brand-new)\.mirn .*failed: .*truncated",
        ],
    )
    vector = GO_VECTORS[0].path
    half = vector.stat().st_size // 2
    for name in ("pg.mirn", "brand-new.mirn"):
        writer = subprocess.run(
            [sys.executable, "-c", WRITER, str(vector), str(mnt / "restore" / name), str(half)], timeout=60
        )
        assert writer.returncode == -signal.SIGKILL
        assert wait_for(lambda n=name: state(mnt, n) != "receiving" and state(mnt, n)).startswith("failed: ")
    assert sha256_file(image) == before
    assert disk_record(data, "brand-new") is None
    assert staging_files(tmp_path) == []


def test_restores_of_two_disks_at_once_and_busy_same_disk(tmp_path: Path, mounts) -> None:
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mounts(mnt, data, expect_log=[r"disk one is already being restored through restore/"])
    first = os.open(mnt / "restore" / "one.mirn", os.O_WRONLY | os.O_CREAT, 0o644)
    second = os.open(mnt / "restore" / "two.mirn", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as busy:
            os.open(mnt / "restore" / ".one.mirn.Ab12Cd", os.O_WRONLY | os.O_CREAT, 0o644)
        assert busy.value.errno == 16  # EBUSY: disk one is already being restored
        ext4, odd = GO_VECTORS[0].path.read_bytes(), GO_VECTORS[2].path.read_bytes()
        for i in range(0, max(len(ext4), len(odd)), 65536):  # interleaved, each in order
            if i < len(ext4):
                os.write(first, ext4[i : i + 65536])
            if i < len(odd):
                os.write(second, odd[i : i + 65536])
    finally:
        os.close(first)
        os.close(second)
    assert state(mnt, "one.mirn") == "installed: created disk one"
    assert state(mnt, "two.mirn") == "installed: created disk two"
    assert sha256_file(disk_record(data, "one")["image_path"]) == GO_VECTORS[0].sha256
    assert sha256_file(disk_record(data, "two")["image_path"]) == GO_VECTORS[2].sha256


def test_reading_a_disk_during_its_restore_gives_the_old_snapshot(existing, tmp_path: Path, mounts) -> None:
    data, image, _before = existing
    mnt = tmp_path / "mnt"
    mounts(mnt, data, "--allow-overwrite")
    old = (mnt / "pg.mirn").read_bytes()
    vector = GO_VECTORS[0].path.read_bytes()
    fd = os.open(mnt / "restore" / "pg.mirn", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, vector[: len(vector) // 2])
        assert (mnt / "pg.mirn").read_bytes() == old
        os.write(fd, vector[len(vector) // 2 :])
    finally:
        os.close(fd)
    assert state(mnt, "pg.mirn") == f"installed from a snapshot of disk {GO_VECTORS[0].name}"
    assert os.getxattr(mnt / "pg.mirn", "user.mirn.checksum").decode() == GO_VECTORS[0].sha256
    assert sha256_file(image) == GO_VECTORS[0].sha256


def test_a_reader_that_opened_before_the_index_gets_the_old_snapshot_whole(tmp_path: Path, mounts) -> None:
    """`cat` and `dd` open NAME.mirn without a stat first: while the disk is not indexed they get
    its listing inode, which stands for whichever version is current. A restore that replaces
    the image meanwhile must not cut their copy at the new snapshot's size (trial 11: a short
    copy, exit status 0) nor mix in the new version's bytes."""
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "big.img"
    write_image(image, [("data", 3 << 20), ("hole", 1 << 20)], seed=21)  # does not compress: ~3 MiB
    added = run_mirenfs(
        "disk", "add", "big", "--image", str(image), "--filesystem", "ext4", "--data-path", str(data)
    )
    assert added.returncode == 0, added.stderr
    old_checksum = sha256_file(image)
    mnt = tmp_path / "mnt"
    mounts(mnt, data, "--allow-overwrite")
    fd = os.open(mnt / "big.mirn", os.O_RDONLY)  # no stat before: the listing inode
    try:
        copy = bytearray(os.read(fd, 1 << 20))
        smaller = GO_VECTORS[0]  # a 16 MiB ext4 image, mostly zeros: a far smaller snapshot
        result = subprocess.run(
            ["cp", str(smaller.path), str(mnt / "restore" / "big.mirn")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert (
            state(mnt, "big.mirn") == f"installed from a snapshot of disk {smaller.name}"
            and sha256_file(image) == smaller.sha256
        )
        assert (mnt / "big.mirn").stat().st_size < len(copy)  # the new version ends before this read
        while piece := os.read(fd, 1 << 20):
            copy += piece
    finally:
        os.close(fd)
    kept = tmp_path / "copy.mirn"
    kept.write_bytes(copy)
    verified = run_mirenfs("verify", str(kept))
    assert verified.returncode == 0, verified.stderr
    assert old_checksum in verified.stdout.decode()


def test_entries_keep_their_state_until_deleted(tmp_path: Path, mounts) -> None:
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mounts(mnt, data)
    subprocess.run(
        ["cp", str(GO_VECTORS[3].path), str(mnt / "restore" / "empty.mirn")], check=True, timeout=60
    )
    assert os.listdir(mnt / "restore") == ["empty.mirn"]
    assert state(mnt, "empty.mirn") == "installed: created disk empty"
    os.unlink(mnt / "restore" / "empty.mirn")
    assert os.listdir(mnt / "restore") == []
    assert (mnt / "empty.mirn").exists()  # deleting the entry does not touch the disk


def test_sixteen_gib_mostly_zero_snapshot_in_bounded_memory(tmp_path: Path, mounts) -> None:
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        for offset in (0, 5 << 30, (16 << 30) - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
        f.truncate(16 << 30)
    snapshot = tmp_path / "big.mirn"
    result = run_mirenfs(
        "backup", "--image", str(image), "--filesystem", "ext4", "-o", str(snapshot), timeout=300
    )
    assert result.returncode == 0, result.stderr
    expected = sha256_sparse(image)
    image.unlink()

    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mount = mounts(mnt, data)
    copy = subprocess.run(
        ["cp", str(snapshot), str(mnt / "restore" / "big.mirn")], capture_output=True, text=True, timeout=300
    )
    assert copy.returncode == 0, copy.stderr
    status = Path(f"/proc/{mount.process.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    assert peak_kib < 200 * 1024, f"daemon peak RSS {peak_kib} KiB"
    restored = Path(disk_record(data, "big")["image_path"])
    assert restored.stat().st_size == 16 << 30
    assert restored.stat().st_blocks * 512 < 1 << 20
    assert os.getxattr(mnt / "big.mirn", "user.mirn.checksum").decode() == expected


def test_a_lease_bound_during_the_restore_stops_it_before_install(existing, tmp_path: Path, mounts) -> None:
    data, image, before = existing
    mnt = tmp_path / "mnt"
    mounts(
        mnt,
        data,
        "--allow-overwrite",
        expect_log=[
            r"restore of disk pg from restore/pg\.mirn .*failed: disk pg is in use \(lease ",
            # `mirenfs lease acquire` is forked while pg.mirn is open: its close-on-exec is a close too.
            r"restore/pg\.mirn was closed after \d+ bytes, before the snapshot was whole",
        ],
    )
    vector = GO_VECTORS[0].path.read_bytes()
    fd = os.open(mnt / "restore" / "pg.mirn", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, vector[: len(vector) // 2])
        lease = run_mirenfs("lease", "acquire", "pg", "--data-path", str(data))
        assert lease.returncode == 0, lease.stderr
        os.write(fd, vector[len(vector) // 2 :])
    finally:
        with pytest.raises(OSError) as closing:
            os.close(fd)
    assert closing.value.errno == 16  # EBUSY, from the close that would have installed the image
    assert state(mnt, "pg.mirn").startswith("failed: disk pg is in use (lease")
    assert sha256_file(image) == before
    assert staging_files(tmp_path) == []


def test_a_writer_that_forks_mid_stream_still_restores(tmp_path: Path, mounts) -> None:
    """A child's close of the inherited descriptor is not the end of the stream."""
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    # FUSE cannot tell the children's closes from the last one: each is answered EIO and logged.
    mounts(
        mnt,
        data,
        expect_log=[r"restore/forked\.mirn was closed after 1000 bytes, before the snapshot was whole"],
    )
    vector = GO_VECTORS[0].path.read_bytes()
    fd = os.open(mnt / "restore" / "forked.mirn", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, vector[:1000])
        os.set_inheritable(fd, True)
        subprocess.run(["true"], close_fds=False, check=True, timeout=30)  # the child closes it at exit
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30)  # closed on exec
        assert state(mnt, "forked.mirn") == "receiving"
        os.write(fd, vector[1000:])
    finally:
        os.close(fd)
    assert state(mnt, "forked.mirn") == "installed: created disk forked"
    assert sha256_file(disk_record(data, "forked")["image_path"]) == GO_VECTORS[0].sha256


def test_a_restore_by_several_processes_still_completes_after_umount_l(tmp_path: Path, mounts) -> None:
    """``umount -l`` only detaches the mount: its open files go on working (README), also when
    the writer is several processes, as in ``(head -c N; tail -c +N+1) < F > restore/NAME``.
    Once detached, /proc names their descriptors by the path inside the mount."""
    data, mnt, source = tmp_path / "data", tmp_path / "mnt", tmp_path / "vector.mirn"
    data.mkdir()
    mounts(mnt, data)
    vector = GO_VECTORS[0].path.read_bytes()
    source.write_bytes(vector)
    fd = os.open(mnt / "restore" / "lazy.mirn", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, vector[:1000])
    rest = (
        "import os, sys; sys.stdin.read(1); view = memoryview(open(sys.argv[1], 'rb').read())[1000:]\n"
        f"while view: view = view[os.write({fd}, view):]\n"
        f"os.close({fd})"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", rest, str(source)],
        stdin=subprocess.PIPE,
        pass_fds=(fd,),
        stderr=subprocess.PIPE,
    )
    try:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=60)
        with pytest.raises(OSError) as first_close:
            os.close(fd)  # the other process still holds it: not the end of the stream
        assert first_close.value.errno == errno.EIO
        _, errors = other.communicate(b"go", timeout=60)
        assert other.returncode == 0, errors
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(timeout=30)
    record = disk_record(data, "lazy")
    assert record is not None, "the restore was not installed"
    assert sha256_file(record["image_path"]) == GO_VECTORS[0].sha256


def test_tar_with_xattrs_makes_the_file_first_and_still_restores(tmp_path: Path, mounts, need_tool) -> None:
    """``tar --xattrs`` creates each file with mknod, sets its xattrs, then opens it for writing:
    the restore starts at that open (the xattrs are not kept, and tar only warns about them).
    A node that is not a regular file has no place in restore/."""
    need_tool("tar")
    data, mnt, staged = tmp_path / "data", tmp_path / "mnt", tmp_path / "staged"
    data.mkdir()
    staged.mkdir()
    mounts(mnt, data)
    vector = GO_VECTORS[0]
    (staged / "xk.mirn").write_bytes(vector.path.read_bytes())
    os.setxattr(staged / "xk.mirn", "user.note", b"archived with its attributes")
    archive = tmp_path / "xattrs.tar"
    subprocess.run(
        ["tar", "--xattrs", "-cf", str(archive), "-C", str(staged), "xk.mirn"], check=True, timeout=60
    )
    extract = ["tar", "--xattrs", "--xattrs-include=*", "-xf", str(archive), "-C", str(mnt / "restore")]
    result = subprocess.run(extract, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert state(mnt, "xk.mirn") == "installed: created disk xk"
    record = disk_record(data, "xk")
    assert record is not None and sha256_file(Path(record["image_path"])) == vector.sha256
    with pytest.raises(PermissionError):
        os.mkfifo(mnt / "restore" / "pipe.mirn")
    assert not (mnt / "restore" / "pipe.mirn").exists()


@pytest.mark.parametrize("ending", ["seek-table", "zeros"])
@pytest.mark.parametrize("sparse", ["--sparse", "-S"])
def test_rsync_sparse_seeks_over_zeros_and_restores(
    sparse: str, ending: str, tmp_path: Path, mounts, need_tool
) -> None:
    """``rsync --sparse`` seeks over runs of zero bytes instead of writing them: what it skipped
    reads as zeros, so the stream is whole and in order (the operator trial's failure was EINVAL
    on the first such seek). A file that ends in zeros it extends with ``ftruncate``: a
    mirenfs snapshot ends in its seek table's magic, so the second kind ends in zeros."""
    need_tool("rsync")
    work = tmp_path / "work"
    work.mkdir()
    image, snapshot = work / "src.img", work / "sparse.mirn"
    segments = [("text", 3 << 20), ("data", 2 << 20), ("hole", 4 << 20), ("text", 1 << 20), ("zero", 70_000)]
    content = write_image(image, segments, seed=9)
    result = run_mirenfs(
        "backup", "--image", str(image), "--filesystem", "ext4", "-o", str(snapshot), timeout=120
    )
    assert result.returncode == 0, result.stderr
    if ending == "zeros":
        meta, _header_len = decode_header(snapshot.read_bytes())
        snapshot.write_bytes(snapshot_ending_in_zeros(meta, content))
    whole = snapshot.read_bytes()
    assert skipped_by_rsync_sparse(whole) > 0  # else rsync would not seek at all
    assert (sparse_writes(whole)[1] is not None) == (ending == "zeros")  # its ftruncate at the end
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    data.mkdir()
    mounts(mnt, data)
    copy = subprocess.run(
        ["rsync", "-a", sparse, str(snapshot), str(mnt / "restore" / "sparse.mirn")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert copy.returncode == 0, copy.stderr
    assert state(mnt, "sparse.mirn") == "installed: created disk sparse"
    record = disk_record(data, "sparse")
    assert record is not None and record["status"] == "provisioned"
    assert sha256_file(Path(record["image_path"])) == sha256_file(image)
    assert staging_files(data) == []
