"""The rules of §3 as a library: names, image paths, live images, and the refusals
of prepare_backup / prepare_restore, against an in-memory resolver and creator."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mirenfs.disks import live as disks
from mirenfs.disks.creations import marked_creating
from mirenfs.disks.live import image_is_live
from mirenfs.disks.model import (
    Disk,
    DiskState,
    Lease,
    LeaseState,
    Volume,
    image_path_for,
    validate_disk_name,
)
from mirenfs.disks.rules import prepare_backup, prepare_restore
from mirenfs.errors import (
    DiskAttachedError,
    DiskDeletingError,
    DiskLeasedError,
    DiskNotFoundError,
    ImageExistsError,
    ImageLiveError,
    ImageMissingError,
    InvalidDiskNameError,
    InvalidVolumeError,
    LiveCheckError,
    MirenfsError,
)

from support.data import BAD_NAMES


class StoreDown(Exception):
    """A lookup failure that is not "no such disk" (a store outage)."""


@dataclass
class FakeCreated:
    disk: Disk
    volume: Volume
    events: list[str]

    def finalize(self) -> None:
        self.events.append(f"finalize {self.disk.name}")

    def cleanup(self) -> None:
        self.events.append(f"cleanup {self.disk.name}")


@dataclass
class FakeDisks:
    """An in-memory resolver and creator that records every creation and update."""

    disks: dict[str, Disk] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)
    leases: dict[str, list[Lease]] = field(default_factory=dict)
    lookup_error: Exception | None = None
    events: list[str] = field(default_factory=list)

    def add(self, name: str, status: DiskState = DiskState.PROVISIONED, *, image: str | None = None) -> Disk:
        disk = Disk(f"disk-{name}", name, status, "ext4", 4096)
        self.disks[name] = disk
        self.volumes[disk.id] = Volume(f"vol-{name}", disk.id, image)
        return disk

    def find_disk_by_name(self, name: str) -> Disk:
        if self.lookup_error is not None:
            raise self.lookup_error
        if name not in self.disks:
            raise DiskNotFoundError(name)
        return self.disks[name]

    def find_volume_by_disk_id(self, disk_id: str) -> Volume:
        return self.volumes[disk_id]

    def find_leases_by_disk_id(self, disk_id: str) -> list[Lease]:
        return list(self.leases.get(disk_id, []))

    def create_disk_for_restore(
        self, name: str, *, size_bytes: int, filesystem: str, disk_id: str | None = None
    ) -> FakeCreated:
        self.events.append(f"create {name} {size_bytes} {filesystem}")
        disk = Disk(disk_id or f"disk-{name}", name, DiskState.PROVISIONING, filesystem, size_bytes)
        return FakeCreated(disk, Volume(f"vol-{name}", disk.id), self.events)

    def update_disk(self, disk_id: str, *, size_bytes: int, filesystem: str) -> None:
        self.events.append(f"update {disk_id} {size_bytes} {filesystem}")


@pytest.fixture
def no_loops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /sys/block with one unbound loop device, so tests never depend on the host's loops."""
    sys_block = tmp_path / "sys-block"
    (sys_block / "loop0").mkdir(parents=True)
    (sys_block / "vda").mkdir()
    monkeypatch.setattr(disks, "SYS_BLOCK", str(sys_block))
    return sys_block


def attach_fake_loop(sys_block: Path, device: str, backing: str) -> None:
    (sys_block / device / "loop").mkdir(parents=True)
    (sys_block / device / "loop" / "backing_file").write_text(backing + "\n")


def make_image(fake: FakeDisks, data_path: Path, name: str, content: bytes = b"old image") -> Path:
    path = Path(image_path_for(str(data_path), fake.volumes[fake.disks[name].id]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# --- names and paths ---


@pytest.mark.parametrize("name", ["a", "disk-ext4", "A.b_c-1", "9lives", "x" * 63])
def test_valid_disk_names(name: str) -> None:
    assert validate_disk_name(name) == name


@pytest.mark.parametrize("name", [*BAD_NAMES, "-lead", "_x", "a\n", "é", "a\x00b"])
def test_invalid_disk_names_are_refused_with_einval(name: str) -> None:
    with pytest.raises(InvalidDiskNameError, match="is not a valid disk name") as refused:
        validate_disk_name(name)
    assert refused.value.errno == errno.EINVAL
    assert repr(name) in str(refused.value)


def test_image_path_default_and_explicit(tmp_path: Path) -> None:
    assert image_path_for("/var/lib/miren", Volume("vol-1", "d")) == (
        "/var/lib/miren/disk-data/volumes/vol-1/disk.img"
    )
    assert image_path_for("/var/lib/miren", Volume("vol-1", "d", "/srv/pg.img")) == "/srv/pg.img"
    with pytest.raises(InvalidVolumeError, match="relative"):
        image_path_for("/var/lib/miren", Volume("vol-1", "d", "pg.img"))


@pytest.mark.parametrize("volume_id", ["../x", "a/b", ".", "..", "", ".hidden", "x\n"])
def test_volume_ids_cannot_escape_the_data_path(volume_id: str) -> None:
    with pytest.raises(InvalidVolumeError) as refused:
        image_path_for("/var/lib/miren", Volume(volume_id, "d"))
    assert refused.value.errno == errno.EINVAL


# --- live images ---


def test_live_image_found_by_path_inode_and_deleted_suffix(tmp_path: Path, no_loops: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    other = tmp_path / "other.img"
    other.write_bytes(b"y")
    assert not image_is_live(str(image))

    attach_fake_loop(no_loops, "loop1", str(other))
    assert not image_is_live(str(image))

    attach_fake_loop(no_loops, "loop2", str(image))
    assert disks.loop_devices_backing(str(image)) == ["loop2"]

    hard_link = tmp_path / "same-inode.img"
    os.link(image, hard_link)
    assert image_is_live(str(hard_link)), "a different path to the same inode is the same image"

    deleted = tmp_path / "gone.img"
    attach_fake_loop(no_loops, "loop3", f"{deleted} (deleted)")
    assert disks.loop_devices_backing(str(deleted)) == ["loop3"]


def test_live_check_raises_when_it_cannot_tell(tmp_path: Path, no_loops: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    with pytest.raises(LiveCheckError, match="cannot list loop devices"):
        image_is_live(str(image), sys_block=str(tmp_path / "no-sysfs"))
    (no_loops / "loop4" / "loop" / "backing_file").mkdir(parents=True)  # unreadable as a file
    with pytest.raises(LiveCheckError, match="loop4"):
        image_is_live(str(image))


@pytest.mark.parametrize("backing", ["/disk.img", "{other} (deleted)"])
def test_a_backing_file_that_leads_nowhere_cannot_be_told_without_the_kernel(
    tmp_path: Path, no_loops: Path, backing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop device set up in a container shows a path of the container's (``/disk.img``), and
    one set up through a link removed since shows it ``(deleted)``: either may be the image.
    Without its device node to ask the kernel (here: no node), that is "cannot tell", never
    "not live", while the image exists; for an image that does not exist, nothing backs it."""
    image, other = tmp_path / "disk.img", tmp_path / "other.img"
    image.write_bytes(b"x")
    attach_fake_loop(no_loops, "loop5", backing.format(image=image, other=other))
    (no_loops / "loop5" / "dev").write_text("7:5\n")
    monkeypatch.setattr(disks, "DEV", str(tmp_path / "no-dev"))
    with pytest.raises(
        LiveCheckError,
        match=(  # trial R (s18): what to do, too
            r"/dev/loop5 is backed by .* cannot be opened to ask the kernel which file it is \(that takes "
            r"root\): run it as root \(sudo\), or detach /dev/loop5 if nothing uses it "
            r"\(losetup -d /dev/loop5\)$"
        ),
    ):
        image_is_live(str(image))
    assert not image_is_live(str(tmp_path / "not-yet.img"))


# --- restore refusals ---


def test_lookup_failure_is_raised_as_is_and_creates_nothing(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks(lookup_error=StoreDown("store unreachable"))
    with pytest.raises(StoreDown, match="store unreachable"):
        prepare_restore(fake, "pg", data_path=str(data_path), overwrite=True, creator=fake)
    fake.lookup_error = MirenfsError("the disk store is locked")
    with pytest.raises(MirenfsError, match="locked"):
        prepare_restore(fake, "pg", data_path=str(data_path), overwrite=True, creator=fake)
    assert fake.events == []
    assert list(data_path.iterdir()) == []


def test_missing_disk_without_creator_is_not_found(data_path: Path, no_loops: Path) -> None:
    with pytest.raises(DiskNotFoundError, match="may not create") as refused:
        prepare_restore(FakeDisks(), "pg", data_path=str(data_path), overwrite=True, creator=None)
    assert refused.value.errno == errno.ENOENT


@pytest.mark.parametrize("name", BAD_NAMES)
def test_restore_refuses_bad_names_before_any_lookup(data_path: Path, name: str) -> None:
    fake = FakeDisks(lookup_error=StoreDown("must not be asked"))
    with pytest.raises(InvalidDiskNameError):
        prepare_restore(fake, name, data_path=str(data_path), overwrite=True, creator=fake)
    assert fake.events == []


def test_restore_refusals_and_their_errnos(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    fake.add("gone", DiskState.DELETING)
    with pytest.raises(DiskDeletingError, match="disk gone is being deleted") as deleting:
        prepare_restore(fake, "gone", data_path=str(data_path), overwrite=True, creator=fake)
    assert deleting.value.errno == errno.EBUSY

    held = fake.add("held")
    fake.leases[held.id] = [
        Lease("l-old", held.id, LeaseState.RELEASED),
        Lease("l-now", held.id, LeaseState.BOUND),
    ]
    with pytest.raises(DiskLeasedError, match="lease l-now is bound") as leased:
        prepare_restore(fake, "held", data_path=str(data_path), overwrite=True, creator=fake)
    assert leased.value.errno == errno.EBUSY

    fake.add("running", DiskState.ATTACHED)  # a machine may write its image file directly
    refusal = r"disk running is in use \(its record says it is attached\).*set-status running detached"
    with pytest.raises(DiskAttachedError, match=refusal):
        prepare_restore(fake, "running", data_path=str(data_path), overwrite=True, creator=fake)

    fake.add("kept")
    image = make_image(fake, data_path, "kept")
    with pytest.raises(ImageExistsError, match=r"disk kept already has an image.*--force") as exists:
        prepare_restore(fake, "kept", data_path=str(data_path), overwrite=False, creator=fake)
    assert exists.value.errno == errno.EEXIST

    attach_fake_loop(no_loops, "loop5", str(image))
    with pytest.raises(ImageLiveError, match="backs /dev/loop5") as live:
        prepare_restore(fake, "kept", data_path=str(data_path), overwrite=True, creator=fake)
    assert live.value.errno == errno.EBUSY
    assert fake.events == []
    assert image.read_bytes() == b"old image"


def test_pending_failed_and_released_leases_do_not_block(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    disk = fake.add("pg")
    fake.leases[disk.id] = [
        Lease(f"l-{state}", disk.id, state)
        for state in (LeaseState.PENDING, LeaseState.FAILED, LeaseState.RELEASED)
    ]
    target = prepare_restore(fake, "pg", data_path=str(data_path), overwrite=False, creator=fake)
    assert not target.creates_disk


def test_restore_fails_closed_when_liveness_is_unknown(
    data_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDisks()
    fake.add("pg")
    make_image(fake, data_path, "pg")
    monkeypatch.setattr(disks, "SYS_BLOCK", str(tmp_path / "unreadable"))
    with pytest.raises(LiveCheckError, match="cannot tell whether the image of disk pg is in use"):
        prepare_restore(fake, "pg", data_path=str(data_path), overwrite=True, creator=fake)


def test_open_checks_again_for_a_lease_bound_since_prepare(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    disk = fake.add("pg")
    target = prepare_restore(fake, "pg", data_path=str(data_path), overwrite=True, creator=fake)
    fake.leases[disk.id] = [Lease("l-late", disk.id, LeaseState.BOUND)]
    with pytest.raises(DiskLeasedError, match="l-late"):
        target.open(4096, "ext4")


def test_open_checks_again_for_a_disk_attached_since_prepare(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    fake.add("pg")
    target = prepare_restore(fake, "pg", data_path=str(data_path), overwrite=True, creator=fake)
    fake.add("pg", DiskState.ATTACHED)  # the same disk, attached meanwhile
    with pytest.raises(DiskAttachedError) as attached:
        target.open(4096, "ext4")
    assert attached.value.errno == errno.EBUSY


# --- restore targets: create, finalize, cleanup ---


def test_new_disk_is_created_only_at_open_and_finalized(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    target = prepare_restore(fake, "fresh", data_path=str(data_path), overwrite=False, creator=fake)
    assert target.creates_disk and fake.events == []
    assert list(data_path.iterdir()) == []

    image_path = target.open(8192, "xfs")
    assert fake.events == ["create fresh 8192 xfs"]
    assert image_path == str(data_path / "disk-data" / "volumes" / "vol-fresh" / "disk.img")
    assert os.path.isdir(os.path.dirname(image_path))
    Path(image_path).write_bytes(b"restored")
    target.finalize()
    target.cleanup()  # after success: nothing to undo
    assert fake.events == ["create fresh 8192 xfs", "finalize fresh"]
    assert Path(image_path).read_bytes() == b"restored"


def test_a_disk_is_noted_as_being_created_before_its_record_exists(data_path: Path, no_loops: Path) -> None:
    """Trial FI F8: a restore killed after the new disk's record was made, before the note that
    lets the sweep remove it, left a `provisioning` disk no sweep would touch."""
    fake = FakeDisks()
    noted_when_created: list[set[str]] = []
    create = fake.create_disk_for_restore

    def noting(name: str, *, size_bytes: int, filesystem: str, disk_id: str | None = None) -> FakeCreated:
        noted_when_created.append(marked_creating(str(data_path)))
        return create(name, size_bytes=size_bytes, filesystem=filesystem, disk_id=disk_id)

    fake.create_disk_for_restore = noting  # type: ignore[method-assign]
    target = prepare_restore(fake, "fresh", data_path=str(data_path), overwrite=False, creator=fake)
    target.open(8192, "ext4")
    assert target._created is not None and noted_when_created == [{target._created.disk.id}]
    target.cleanup()
    assert marked_creating(str(data_path)) == set()


def test_cleanup_removes_the_created_disk_and_its_directory_once(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    target = prepare_restore(fake, "fresh", data_path=str(data_path), overwrite=False, creator=fake)
    image_path = Path(target.open(8192, "ext4"))
    Path(str(image_path) + ".restore.tmp").write_bytes(b"partial")
    target.cleanup()
    target.cleanup()
    assert fake.events == ["create fresh 8192 ext4", "cleanup fresh"]
    assert not image_path.parent.exists()
    assert list(data_path.iterdir()) == [], "parents made for the volume are removed when left empty"


def test_cleanup_before_open_and_for_existing_disks_does_nothing(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    fake.add("pg")
    image = make_image(fake, data_path, "pg")
    target = prepare_restore(fake, "pg", data_path=str(data_path), overwrite=True, creator=fake)
    assert target.open(4096, "ext4") == str(image)
    target.cleanup()
    new = prepare_restore(fake, "new", data_path=str(data_path), overwrite=True, creator=fake)
    new.cleanup()
    assert fake.events == []
    assert image.read_bytes() == b"old image"


def test_an_existing_disk_is_updated_before_its_image_is_replaced_and_only_when_it_changed(
    data_path: Path, no_loops: Path
) -> None:
    """The record comes at before_install, while the old image is in place (a store that cannot
    take it refuses the restore); undo_record sets it back when the image was not replaced."""
    fake = FakeDisks()
    fake.add("same")
    fake.add("other")
    same = prepare_restore(fake, "same", data_path=str(data_path), overwrite=True, creator=fake)
    same.open(4096, "ext4")
    same.before_install()
    same.finalize()
    other = prepare_restore(fake, "other", data_path=str(data_path), overwrite=True, creator=fake)
    other.open(1000003, "xfs")
    other.before_install()
    assert fake.events == ["update disk-other 1000003 xfs"]
    other.finalize()
    assert fake.events == ["update disk-other 1000003 xfs"]  # nothing more once installed

    fake.events.clear()
    undone = prepare_restore(fake, "other", data_path=str(data_path), overwrite=True, creator=fake)
    undone.open(1000003, "xfs")
    undone.undo_record()  # nothing was recorded yet: nothing to set back
    undone.before_install()
    undone.undo_record()
    undone.undo_record()  # once only
    assert fake.events == ["update disk-other 1000003 xfs", "update disk-other 4096 ext4"]
    assert undone.outcome() == "disk other is unchanged"


# --- backup ---


def test_backup_refusals_and_warnings(data_path: Path, no_loops: Path) -> None:
    fake = FakeDisks()
    with pytest.raises(DiskNotFoundError, match="no disk named nope"):
        prepare_backup(fake, "nope", data_path=str(data_path))
    fake.add("gone", DiskState.DELETING)
    make_image(fake, data_path, "gone")
    with pytest.raises(DiskDeletingError, match="disk gone is being deleted"):
        prepare_backup(fake, "gone", data_path=str(data_path))
    fake.add("empty")
    with pytest.raises(ImageMissingError, match="disk empty has no image") as missing:
        prepare_backup(fake, "empty", data_path=str(data_path))
    assert missing.value.errno == errno.ENOENT

    fake.add("quiet")
    quiet_image = make_image(fake, data_path, "quiet")
    target = prepare_backup(fake, "quiet", data_path=str(data_path))
    assert (target.name, target.image_path, target.filesystem, target.warning) == (
        "quiet",
        str(quiet_image),
        "ext4",
        None,
    )

    fake.add("busy", DiskState.ATTACHED)
    busy_image = make_image(fake, data_path, "busy")
    attach_fake_loop(no_loops, "loop6", str(busy_image))
    warning = prepare_backup(fake, "busy", data_path=str(data_path)).warning
    assert warning is not None
    assert "disk busy is attached" in warning and "/dev/loop6" in warning


def test_backup_only_warns_when_liveness_is_unknown(
    data_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDisks()
    fake.add("pg")
    make_image(fake, data_path, "pg")
    monkeypatch.setattr(disks, "SYS_BLOCK", str(tmp_path / "unreadable"))
    warning = prepare_backup(fake, "pg", data_path=str(data_path)).warning
    assert warning is not None and "cannot tell whether disk pg is in use" in warning
