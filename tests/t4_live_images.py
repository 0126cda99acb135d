"""Live images, through the kernel: an image a loop device backs is read once, refused as a
restore target, warned about on backup, and kept by `disk remove`."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import trio

from mirenfs.disks.live import image_in_use, loop_devices_backing
from mirenfs.engine.files import OpenImage, backup_image, reading_rules
from mirenfs.engine.produce import Settings

from support.data import sha256_file, staging_files, write_image
from support.loops import loop_device, loop_device_from_another_namespace
from support.runners import mirenfs_command, ok, refused, refused_restore, run_mirenfs
from support.store import disks, store_state
from support.vectors import GO_EXT4, GO_ODD

SMALL = Settings(chunk_size=64 * 1024)  # small chunks so small images have many frames


def test_a_live_image_is_read_once_and_its_snapshot_verifies(tmp_path: Path) -> None:
    image = tmp_path / "live.img"
    write_image(image, [("text", 3 << 20), ("hole", 2 << 20)])
    with loop_device(image):
        handle = OpenImage.open(str(image))
        try:
            assert reading_rules(handle, live=image_in_use(str(image))) == (True, None)
        finally:
            handle.close()
        snapshot = tmp_path / "live.mirn"
        meta = trio.run(
            lambda: backup_image(
                str(image),
                str(snapshot),
                name="live",
                filesystem="ext4",
                settings=SMALL,
                live=image_in_use(str(image)),
            )
        )
        assert meta.checksum == hashlib.sha256(image.read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["live.img", "live.mirn"]


def test_loop_attached_image_refuses_restore_and_backup_warns(
    data: Path, ext4_disk: Path, tmp_path: Path
) -> None:
    before = store_state(data)
    with loop_device(ext4_disk) as device:
        error = refused_restore("disk disk-ext4 is in use", GO_ODD.path, "disk-ext4", data)
        assert f"backs {device}" in error and "losetup -d" in error
        assert store_state(data) == before
        assert staging_files(data) == []

        output = tmp_path / "live.mirn"
        # A raw loop device on an ext4 data path: no reflink, no filesystem to freeze, so only
        # an explicit --live reads the moving image, with a warning naming the device.
        result = ok("backup", "disk-ext4", "-o", output, "--live", "--data-path", data)
        assert "mirenfs: warning:" in result.err and device in result.err
        assert ok("verify", output).code == 0
    assert sha256_file(ext4_disk) == GO_EXT4.sha256


def test_a_loop_device_set_up_in_a_container_or_through_a_removed_link_is_found(
    data: Path, ext4_disk: Path, tmp_path: Path
) -> None:
    """Such a device shows a backing path that leads nowhere here (``/disk.img``, or the link's
    name ``(deleted)``); the kernel still knows its file's device and inode. Matched by path, the
    image looked unused, and a restore replaced it under the device (the trial's finding)."""
    before = sha256_file(ext4_disk)
    with loop_device_from_another_namespace(ext4_disk, tmp_path / "container-view") as device:
        name = Path(device).name
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        assert not os.path.exists(backing), f"{backing} should lead nowhere on the host"
        assert loop_devices_backing(str(ext4_disk)) == [name]
        error = refused_restore("disk disk-ext4 is in use", GO_ODD.path, "disk-ext4", data)
        assert f"backs {device}" in error
    link = ext4_disk.parent / "link.img"
    os.link(ext4_disk, link)
    with loop_device(link) as device:
        link.unlink()
        assert loop_devices_backing(str(ext4_disk)) == [Path(device).name]
        refused_restore("disk disk-ext4 is in use", GO_ODD.path, "disk-ext4", data)
    assert sha256_file(ext4_disk) == before
    assert staging_files(data) == []


def test_disk_remove_deletes_a_managed_image_unless_the_disk_is_held(data: Path, ext4_disk: Path) -> None:
    lease_id = ok("lease", "acquire", "disk-ext4", "--data-path", data).out.strip()
    before = store_state(data)
    refused("disk disk-ext4 is in use", "disk", "remove", "disk-ext4", "--data-path", data)
    ok("lease", "release", lease_id, "--data-path", data)
    ok("disk", "set-status", "disk-ext4", "attached", "--data-path", data)
    refused(
        "disk disk-ext4 is in use (its record says it is attached)",
        "disk",
        "remove",
        "disk-ext4",
        "--data-path",
        data,
    )
    assert store_state(data)["files"] == before["files"]

    ok("disk", "set-status", "disk-ext4", "detached", "--data-path", data)
    with loop_device(ext4_disk):
        refused("backs /dev/loop", "disk", "remove", "disk-ext4", "--data-path", data)
    assert ext4_disk.exists()

    result = ok("disk", "remove", "disk-ext4", "--data-path", data)
    assert "removed disk disk-ext4 and its image" in result.out
    assert disks(data) == {}
    assert not ext4_disk.parent.exists()


def test_restore_image_refuses_an_image_that_a_loop_device_uses(tmp_path: Path) -> None:
    """Renaming a new file over an image a loop device uses would leave the device on the old,
    unlinked file, whose writes are then lost: refused, before the input is read, and again
    right before the image is replaced when the device was attached meanwhile."""
    target = tmp_path / "target.img"
    write_image(target, [("data", 1 << 20), ("hole", 3 << 20)])
    before = sha256_file(target)
    vector = GO_EXT4.path.read_bytes()
    with loop_device(target) as device:
        result = run_mirenfs("restore", str(GO_EXT4.path), "--image", str(target), "--force")
        assert result.returncode == 1
        assert result.stderr.decode().strip() == (
            f"mirenfs: error: {target} is in use: it backs {device}; "
            f"detach it (`losetup -d {device}`) before restoring over it"
        )
    assert sha256_file(target) == before
    restore = subprocess.Popen(
        [*mirenfs_command(), "restore", "-", "--image", str(target), "--force"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert restore.stdin is not None
        restore.stdin.write(vector[: len(vector) // 2])
        restore.stdin.flush()
        with loop_device(target) as device:
            _, errors = restore.communicate(vector[len(vector) // 2 :], timeout=120)
            assert restore.returncode == 1
            assert f"it backs {device}; detach it" in errors.decode()
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.wait(timeout=30)
    assert sha256_file(target) == before and staging_files(tmp_path) == []


def test_backup_image_of_an_image_in_use_says_it_is_not_frozen(tmp_path: Path) -> None:
    """``backup --image`` reads the file it is given as it is: when a loop device uses it, the
    operator is told that the copy may not be consistent, and which command freezes a disk."""
    image, output = tmp_path / "pg.img", tmp_path / "pg.mirn"
    ok("restore", GO_EXT4.path, "--image", image)
    quiet = run_mirenfs("backup", "--image", str(image), "-o", str(output))
    assert quiet.returncode == 0 and b"warning" not in quiet.stderr
    with loop_device(image) as device:
        warned = run_mirenfs("backup", "--image", str(image), "-o", str(output))
    assert warned.returncode == 0
    assert warned.stderr.decode().strip() == (
        f"mirenfs: warning: {image} backs {device}: this backup reads it while it may change, so the "
        "filesystem in it may not be consistent; a disk of the store is frozen first (mirenfs backup NAME)"
    )
