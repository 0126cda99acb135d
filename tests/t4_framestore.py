"""The frame store through the kernel: private files under <data-path>/mirenfs/frames that survive
a remount, identical bytes from it, a damaged entry recompressed, only changed chunks compressed
after a change, and ``-o frame_store_size``."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from support.data import write_image
from support.runners import run_mirenfs

SEGMENTS = [("text", 6 << 20), ("hole", 9 << 20), ("data", 3 << 20), ("text", 12345)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data path with disk ``web`` spanning several 4 MiB chunks, a hole included."""
    data = tmp_path / "data"
    data.mkdir()
    write_image(tmp_path / "web.img", SEGMENTS, seed=1)
    result = run_mirenfs(
        "disk",
        "add",
        "web",
        "--image",
        str(tmp_path / "web.img"),
        "--filesystem",
        "ext4",
        "--data-path",
        str(data),
    )
    assert result.returncode == 0, result.stderr
    return data


def frames(data: Path) -> list[Path]:
    return sorted(path for path in (data / "mirenfs" / "frames").rglob("*") if path.is_file())


def compressed_counts(log: str) -> list[tuple[int, int]]:
    """(compressed, data chunks) of every finished index pass in a daemon log."""
    found = re.findall(r"index pass for disk web done \(checksum \w+; (\d+) of (\d+) data chunks", log)
    return [(int(done), int(total)) for done, total in found]


def test_frames_survive_a_remount_privately_and_give_the_same_bytes(
    tmp_path: Path, data: Path, mounts
) -> None:
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    first = (mnt / "web.mirn").read_bytes()
    stored = frames(data)
    assert stored, "the index pass kept no frame"
    assert {stat.S_IMODE(path.stat().st_mode) for path in stored} == {0o600}
    directories = {path.parent for path in stored} | {data / "mirenfs" / "frames"}
    assert {stat.S_IMODE(path.stat().st_mode) for path in directories} == {0o700}
    [(compressed, data_chunks)] = compressed_counts(mount.log())
    assert compressed == data_chunks > 1
    assert "the others from the frame store" not in mount.log()  # there were no others

    mount.stop()
    mount.start()
    assert (mnt / "web.mirn").read_bytes() == first
    assert frames(data) == stored
    assert int(os.getxattr(mnt, "user.mirenfs.index_passes")) == 0


def test_a_damaged_frame_is_compressed_again_never_served(tmp_path: Path, data: Path, mounts) -> None:
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data, expect_log=(r"frame store entry .* does not verify",))
    first = (mnt / "web.mirn").read_bytes()
    mount.stop()
    victim = frames(data)[0]
    damaged = bytearray(victim.read_bytes())
    damaged[-100] ^= 0x40
    victim.write_bytes(bytes(damaged))
    mount.start()
    assert (mnt / "web.mirn").read_bytes() == first
    assert "does not verify" in mount.log()
    assert victim.read_bytes() != bytes(damaged)  # written again, whole


def test_after_a_change_only_the_changed_chunk_is_compressed(tmp_path: Path, data: Path, mounts) -> None:
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    (mnt / "web.mirn").read_bytes()
    with open(tmp_path / "web.img", "r+b") as image:
        image.seek(5 << 20)
        image.write(b"one changed chunk")
    after = (mnt / "web.mirn").read_bytes()
    [(first, data_chunks), second] = compressed_counts(mount.log())
    assert first == data_chunks and second == (1, data_chunks)
    copy = tmp_path / "after.mirn"
    copy.write_bytes(after)
    assert run_mirenfs("verify", str(copy)).returncode == 0


def test_frame_store_size_zero_keeps_no_frames(tmp_path: Path, data: Path, mounts) -> None:
    mnt = tmp_path / "mnt"
    mounts(mnt, data, "-o", "frame_store_size=0")
    copy = tmp_path / "web.mirn"
    copy.write_bytes((mnt / "web.mirn").read_bytes())
    assert run_mirenfs("verify", str(copy)).returncode == 0
    assert not (data / "mirenfs" / "frames").exists()


def test_a_bad_frame_store_size_is_refused(tmp_path: Path, data: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_mirenfs("mount", str(mnt), "--data-path", str(data), "-o", "frame_store_size=lots")
    assert result.returncode == 1
    assert b"frame_store_size" in result.stderr


def test_after_a_remount_and_a_change_hashing_resumes_at_the_changed_chunk(
    tmp_path: Path, data: Path, mounts
) -> None:
    mnt = tmp_path / "mnt"
    mount = mounts(mnt, data)
    (mnt / "web.mirn").read_bytes()
    mount.stop()
    with open(tmp_path / "web.img", "r+b") as image:
        image.seek(17 << 20)  # in the last chunk
        image.write(b"changed while unmounted")
    mount.start()
    after = (mnt / "web.mirn").read_bytes()
    assert re.search(r"1 of \d+ data chunks compressed.*; hashed from chunk 4 of 5\)", mount.log())
    copy = tmp_path / "after.mirn"
    copy.write_bytes(after)
    assert run_mirenfs("verify", str(copy)).returncode == 0
