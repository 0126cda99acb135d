"""Issue 11 at the disk layer, pure (files and the SQLite store, no mount, no root except where
marked): what is planted at a staging path is never opened blocking, followed or removed (4), a
disk a killed restore left ``provisioning`` is swept or finished (7), and a symbolic link in a
managed volume never leads a restore or a removal outside the data path (14)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from mirenfs import errors as errors_module
from mirenfs.disks import catalogs, live
from mirenfs.disks.creations import mark_creating, marked_creating
from mirenfs.disks.manage import (
    remove_disk,
    remove_interrupted_creation,
    sweep_interrupted_creations,
    sweep_stale_staging,
    sweep_what_killed_runs_left,
)
from mirenfs.disks.model import DiskState
from mirenfs.disks.rules import prepare_backup, prepare_restore
from mirenfs.disks.store import Store
from mirenfs.engine.aio import meaningful_error, task_group
from mirenfs.engine.image import (
    STAGING_SUFFIX,
    StagingImage,
    make_private_directory,
    remove_staging_if_unheld,
)
from mirenfs.errors import DiskNotFoundError, InvalidVolumeError, MirenfsError, StoreError, TargetError

from support.data import sha256_file
from support.store import make_disk

T = TypeVar("T")
PROMPT_S = 10  # a call that blocks on a FIFO would never return: fail after this instead


def promptly(call: Callable[[], T]) -> T:
    """Run ``call`` in a thread; fail the test if it does not return in time (an open that hangs)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed back to the test below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(PROMPT_S)
    assert not thread.is_alive(), f"{call} did not return within {PROMPT_S} s (blocked on what was planted?)"
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def no_loops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake /sys/block with no loop device bound: nothing depends on the host's loops."""
    sys_block = tmp_path / "sys-block"
    (sys_block / "loop0").mkdir(parents=True)
    monkeypatch.setattr(live, "SYS_BLOCK", str(sys_block))


@pytest.fixture
def store(data_path: Path) -> Store:
    return Store(str(data_path))


# ---- 4: whatever is planted at <image>.restore.tmp --------------------------------------------------


@pytest.fixture(params=["fifo", "symlink", "directory", "socket"])
def planted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(image, what sits at its staging path) with a file outside that a symlink points to."""
    image = tmp_path / "images" / "pg.img"
    image.parent.mkdir()
    image.write_bytes(b"the old image")
    staging = Path(f"{image}{STAGING_SUFFIX}")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not mirenfs's")
    holder: socket.socket | None = None
    if request.param == "fifo":
        os.mkfifo(staging)
    elif request.param == "symlink":
        staging.symlink_to(outside)
    elif request.param == "directory":
        staging.mkdir()
    else:
        holder = socket.socket(socket.AF_UNIX)
        cwd = os.getcwd()
        os.chdir(staging.parent)  # bound by its name: a long $TMPDIR exceeds AF_UNIX's 108 bytes
        try:
            holder.bind(staging.name)
        finally:
            os.chdir(cwd)
    yield image, staging
    if holder is not None:
        holder.close()
    assert outside.read_bytes() == b"not mirenfs's"


def test_a_staging_path_that_is_not_our_file_is_refused_and_left(planted: tuple[Path, Path]) -> None:
    image, staging = planted
    kind = os.lstat(staging).st_mode
    with pytest.raises(TargetError) as refused:
        promptly(lambda: remove_staging_if_unheld(str(staging)))
    assert refused.value.errno == errno.EEXIST
    assert "is in the way of the restore" in str(refused.value) and str(staging) in str(refused.value)
    with pytest.raises(TargetError, match="is in the way of the restore"):
        promptly(lambda: StagingImage.create(str(image), 4096))
    assert os.lstat(staging).st_mode == kind  # neither opened for good, nor replaced, nor removed
    assert image.read_bytes() == b"the old image"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file another user owns")
def test_a_staging_file_of_another_user_is_refused(tmp_path: Path) -> None:
    staging = tmp_path / f"pg.img{STAGING_SUFFIX}"
    staging.write_bytes(b"someone else's")
    os.chown(staging, 65534, 65534)
    with pytest.raises(TargetError, match="owned by uid 65534"):
        remove_staging_if_unheld(str(staging))
    assert staging.read_bytes() == b"someone else's"


def test_a_staging_file_a_live_restore_holds_is_busy(tmp_path: Path) -> None:
    staging = tmp_path / f"pg.img{STAGING_SUFFIX}"
    staging.write_bytes(b"")
    fd = os.open(staging, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(TargetError) as busy:
            remove_staging_if_unheld(str(staging))
        assert busy.value.errno == errno.EBUSY
    finally:
        os.close(fd)
    assert remove_staging_if_unheld(str(staging)) and not staging.exists()  # unheld: a leftover


def test_the_sweep_at_start_passes_what_was_planted(
    planted: tuple[Path, Path], store: Store, data_path: Path
) -> None:
    image, staging = planted
    store.add_disk("pg", size_bytes=13, filesystem="ext4", image_path=str(image))
    kept: list[str] = []
    assert promptly(lambda: sweep_stale_staging(str(data_path), on_busy=kept.append)) == []
    assert kept == [str(staging)] and os.path.lexists(staging)


# ---- 7: a disk a killed restore was creating -----------------------------------------------------------


def interrupted_creation(store: Store, name: str) -> Path:
    """What ``kill -9`` mid-restore into a new name leaves: the disk ``provisioning``, its volume
    directory, maybe a staging file (the image itself never appeared)."""
    created = store.create_disk_for_restore(name, size_bytes=1 << 20, filesystem="ext4")
    mark_creating(store.data_path, created.disk.id)  # as the restore does right after
    image = Path(store.get_disk(name).image_path or "")
    image.parent.mkdir(parents=True)
    Path(f"{image}{STAGING_SUFFIX}").write_bytes(b"half a restore")
    assert created.disk.status == DiskState.PROVISIONING
    return image


def status(store: Store, name: str) -> str | None:
    try:
        return store.get_disk(name).disk.status.value
    except DiskNotFoundError:
        return None


def test_a_disk_left_provisioning_by_a_killed_restore_is_removed_at_start(
    store: Store, data_path: Path
) -> None:
    image = interrupted_creation(store, "killed")
    assert sweep_interrupted_creations(store).removed == ["killed"]
    assert status(store, "killed") is None and not image.parent.exists()
    assert sweep_interrupted_creations(store).removed == []


def test_a_disk_provisioning_that_no_restore_here_created_is_kept(store: Store, data_path: Path) -> None:
    """Trial W: the sweep (each start, and `cleanup` after each stop) removed any disk of the
    node provisioning without an image, such as one Miren was provisioning at that moment."""
    created = store.create_disk_for_restore("mirenapp", size_bytes=1 << 20, filesystem="ext4")
    ours = interrupted_creation(store, "ours")
    assert sweep_interrupted_creations(store).removed == ["ours"]
    assert status(store, "mirenapp") == "provisioning" and not ours.parent.exists()
    assert marked_creating(str(data_path)) == set()  # the entry goes with its disk
    assert store.get_disk("mirenapp").disk.id == created.disk.id


def test_a_catalogue_that_cannot_be_used_does_not_stop_the_rest_of_the_sweep(
    store: Store, data_path: Path, tmp_path: Path
) -> None:
    """Trial W2: `cleanup` stopped at the catalogue's error (etcd down, a moved store) when a
    creation was noted, and what came after it (a dead mount's unmount) was never done."""
    interrupted_creation(store, "killed")
    refused = Store(str(data_path), refused="the disks of this data path were copied elsewhere")
    said = list(sweep_what_killed_runs_left(str(data_path), str(tmp_path / "clones"), refused))
    assert (
        logging.ERROR,
        "cannot remove the disks killed restores were creating: the disks of this "
        "data path were copied elsewhere",
    ) in said


def test_a_creation_that_cannot_be_checked_yet_is_retried_not_said_to_be_kept(
    store: Store, data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review S: on a full data path the removal's first step failed, the disk was said to be
    kept ("a restore since took it over") and the mount stopped retrying."""
    image = interrupted_creation(store, "stranded")
    shutil.rmtree(image.parent)  # as the failed restore's undo left it

    def full(path: object, mode: int = 0o777) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    disk_id = store.get_disk("stranded").disk.id
    with monkeypatch.context() as patched:
        patched.setattr(os, "mkdir", full)
        with pytest.raises(StoreError, match="cannot remove disk stranded yet"):
            remove_interrupted_creation(store, "stranded", disk_id)
        assert sweep_interrupted_creations(store).removed == []  # the sweep keeps it for a later start
    assert status(store, "stranded") == "provisioning"
    assert remove_interrupted_creation(store, "stranded", disk_id) is True  # once there is room
    assert status(store, "stranded") is None


def test_the_staging_sweep_of_a_store_marked_as_moved_still_finds_registered_images(
    store: Store, data_path: Path, tmp_path: Path
) -> None:
    """Review S: `cleanup` on a moved data path could not look next to registered images, and
    said there was nothing to clean up."""
    image = tmp_path / "srv" / "pg.img"
    image.parent.mkdir()
    image.write_bytes(b"\0" * 4096)
    store.add_disk("pg", size_bytes=4096, filesystem="ext4", image_path=str(image))
    leftover = Path(f"{image}{STAGING_SUFFIX}")
    leftover.write_bytes(b"half a restore")
    moved = Store(str(data_path), refused="the disks of this data path were copied elsewhere")
    assert sweep_stale_staging(str(data_path), catalog=moved) == [str(leftover)]
    assert not leftover.exists() and image.exists()


def test_what_is_not_an_interrupted_creation_is_kept(store: Store, data_path: Path, tmp_path: Path) -> None:
    running = interrupted_creation(store, "running")  # a restore still at work: its staging file is held
    over = interrupted_creation(store, "over")  # one at work over a file that was there (--force)
    over.write_bytes(b"")
    making = store.create_disk_for_restore("mkfs", size_bytes=1, filesystem="ext4")  # not noted: not ours
    Path(store.get_disk("mkfs").image_path or "").parent.mkdir(parents=True)
    Path(store.get_disk("mkfs").image_path or "").write_bytes(b"")  # `disk create` formatting it
    assert making.disk.status == DiskState.PROVISIONING
    store.add_disk("ready", size_bytes=1, filesystem="ext4")  # provisioned, no image yet: not ours to judge
    store.add_disk(
        "own",
        size_bytes=1,
        filesystem="ext4",
        image_path=str(tmp_path / "own.img"),
        status=DiskState.PROVISIONING,
    )  # `disk add`: never removed
    held = [os.open(f"{image}{STAGING_SUFFIX}", os.O_RDONLY) for image in (running, over)]
    try:
        for fd in held:
            fcntl.flock(fd, fcntl.LOCK_EX)
        swept = sweep_interrupted_creations(store)
        assert (swept.removed, swept.completed) == ([], [])
    finally:
        for fd in held:
            os.close(fd)
    assert {name: status(store, name) for name in ("running", "over", "mkfs", "ready", "own")} == {
        "running": "provisioning",
        "over": "provisioning",
        "mkfs": "provisioning",
        "ready": "provisioned",
        "own": "provisioning",
    }


def test_a_disk_a_restore_installs_while_the_sweep_looks_is_kept(
    store: Store, data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: the sweep saw no image, then a restore through another mount renamed its staging
    file over the image and was told "created disk", then the sweep removed the disk."""
    image = interrupted_creation(store, "fresh")
    staging = f"{image}{STAGING_SUFFIX}"
    restore = os.open(staging, os.O_RDWR)  # the live restore's staging file, locked as it keeps it
    fcntl.flock(restore, fcntl.LOCK_EX)
    real_lexists = os.path.lexists
    installed: list[bool] = []

    def lexists(path: str) -> bool:
        there = real_lexists(path)
        if path == str(image) and not installed:  # just after the sweep looked: the restore installs
            installed.append(True)
            os.rename(staging, image)
            store.set_disk_status("fresh", DiskState.PROVISIONED)
            os.close(restore)
        return there

    monkeypatch.setattr(os.path, "lexists", lexists)
    try:
        assert sweep_interrupted_creations(store).removed == []
    finally:
        with contextlib.suppress(OSError):
            os.close(restore)
    monkeypatch.undo()
    assert status(store, "fresh") == "provisioned" and image.read_bytes() == b"half a restore"


def test_a_restore_into_a_disk_left_provisioning_makes_it_provisioned(store: Store, data_path: Path) -> None:
    """If the disk was not swept (restored before any mount started), the next good restore finishes it."""
    image = interrupted_creation(store, "again")
    Path(f"{image}{STAGING_SUFFIX}").unlink()
    target = prepare_restore(store, "again", data_path=str(data_path), overwrite=False, creator=store)
    assert target.open(2 << 20, "xfs") == str(image)
    target.before_install()
    image.write_bytes(b"restored")  # what the engine installs
    target.finalize()
    record = store.get_disk("again")
    assert (record.disk.status.value, record.disk.size_bytes, record.disk.filesystem) == (
        "provisioned",
        2 << 20,
        "xfs",
    )


# ---- 14: a symbolic link in a managed volume ------------------------------------------------------------


@pytest.fixture(params=["volume-directory", "image"])
def linked(request: pytest.FixtureRequest, store: Store, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Disk pg's managed volume directory (or its image) is a symlink to a directory outside the
    data path holding a file someone cares about; (the image path, that outside directory)."""
    record = store.add_disk("pg", size_bytes=9, filesystem="ext4")
    image = Path(record.image_path or "")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "disk.img").write_bytes(b"precious")
    if request.param == "volume-directory":
        image.parent.parent.mkdir(parents=True)
        image.parent.symlink_to(outside)
    else:
        image.parent.mkdir(parents=True)
        image.symlink_to(outside / "disk.img")
    yield image, outside
    assert sorted(p.name for p in outside.iterdir()) == ["disk.img"]
    assert (outside / "disk.img").read_bytes() == b"precious"


def test_restore_backup_and_remove_refuse_a_symlinked_volume(
    linked: tuple[Path, Path], store: Store, data_path: Path
) -> None:
    image, _outside = linked
    for attempt in (
        lambda: prepare_restore(store, "pg", data_path=str(data_path), overwrite=True, creator=store),
        lambda: prepare_backup(store, "pg", data_path=str(data_path)),
        lambda: remove_disk(store, "pg"),
    ):
        with pytest.raises(InvalidVolumeError) as refused:
            attempt()
        message = str(refused.value)
        assert str(image) in message and "symbolic link" in message and "None" not in message
    assert status(store, "pg") == "provisioned"  # not even marked deleting
    assert sweep_interrupted_creations(store).removed == []


@pytest.mark.parametrize("meanwhile", ["lease", "attached"])
def test_a_lease_bound_while_a_disk_is_being_removed_keeps_it(
    store: Store, data_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """Review: ``disk remove`` checked the leases, then made the disk ``deleting`` in a second
    step: a lease bound (or the disk attached) in between was not seen, and the disk and its
    image went with it in use. The check is made again once the disk is deleting (when no
    lease can bind any more); the disk is then set back as it was, and kept."""
    image = Path(make_disk(data_path, "pg", size=1 << 20))
    before = sha256_file(image)
    other = Store(str(data_path))  # another process: `mirenfs lease acquire`, or Miren
    real_set_status = Store.set_disk_status

    def someone_acts_first(self: Store, name: str, status: DiskState) -> object:
        if status is DiskState.DELETING and not acted:
            acted.append(True)
            if meanwhile == "lease":
                other.acquire_lease(name)
            else:
                real_set_status(other, name, DiskState.ATTACHED)
        return real_set_status(self, name, status)

    acted: list[bool] = []
    monkeypatch.setattr(Store, "set_disk_status", someone_acts_first)
    with pytest.raises(MirenfsError, match="is in use"):
        remove_disk(store, "pg")
    record = store.get_disk("pg")
    expected = DiskState.ATTACHED if meanwhile == "attached" else DiskState.PROVISIONED
    assert record.disk.status is expected and sha256_file(image) == before


def test_an_interrupt_is_never_lost_to_an_error_a_cancelled_sibling_raised() -> None:
    """Review F: a Ctrl-C that landed while a sibling task failed in its clean-up came out as
    that task's error, so the command exited 1 and said something else instead of interrupted."""

    async def fails_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise MirenfsError("the clean-up after the cancel failed")

    async def interrupted() -> None:
        await trio.sleep(0)
        raise KeyboardInterrupt

    async def run() -> None:
        async with task_group() as tasks:
            tasks.start_soon(fails_when_cancelled)
            tasks.start_soon(interrupted)

    with pytest.raises(KeyboardInterrupt):
        trio.run(run)
    group = BaseExceptionGroup("both", [MirenfsError("an error"), ValueError("another")])
    assert isinstance(meaningful_error(group), MirenfsError)  # without an interrupt, as before


def test_the_error_table_lists_every_error_with_its_errno() -> None:
    """Review F: the table of mirenfs/errors.py, which the README points to, had left out two."""
    lines = (errors_module.__doc__ or "").splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("===")]
    documented = dict(line.split()[:2] for line in lines[rules[1] + 1 : rules[2]])
    classes = {
        name: value
        for name, value in vars(errors_module).items()
        if isinstance(value, type) and issubclass(value, MirenfsError)
    }
    assert set(documented) == set(classes)
    for name, code in documented.items():
        if code != "(set)":
            assert errno.errorcode[classes[name].errno] == code, name


def test_a_move_mark_whose_last_sync_fails_is_kept_and_one_not_written_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial FI2 G5: `catalog copy` to etcd that had copied every disk and written its mark exited
    1 with "Input/output error" when the directory's sync failed; a mark never written said no
    more than that either."""
    real = catalogs.replace_private_file

    def then_the_sync_fails(path: str, data: bytes, *, durable: bool = False) -> None:
        real(path, data)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(catalogs, "replace_private_file", then_the_sync_fails)
    catalogs.note_move(str(tmp_path), "etcd://127.0.0.1:2379/fleet", "a", ["disk-1"])
    moved = catalogs.read_move(str(tmp_path))
    assert moved is not None and list(moved.copied_ids) == ["disk-1"]
    assert "but its directory could not be synced" in caplog.text

    def fails(path: str, data: bytes, *, durable: bool = False) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(catalogs, "replace_private_file", fails)
    with pytest.raises(
        MirenfsError, match=r"could not be marked as moved .*No space left on device.*run the same"
    ):
        catalogs.note_move(str(tmp_path / "other"), "etcd://127.0.0.1:2379/fleet", "a", ["disk-1"])


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """Review Sec F7: mirenfs's state directory was used wherever it led and whoever owned it: a
    link to another user's directory had mirenfs trust her trusted-images.json and chmod it."""
    hers = tmp_path / "hers"
    hers.mkdir(mode=0o755)
    os.chown(hers, 64_123, 64_123)
    state = tmp_path / "data" / "mirenfs"
    state.parent.mkdir()
    state.symlink_to(hers)
    os.lchown(state, 64_123, 64_123)
    with pytest.raises(PermissionError, match="is another user's"):
        make_private_directory(str(state))
    assert stat.S_IMODE(hers.stat().st_mode) == 0o755  # not made 0700 through her link
    state.unlink()  # review MT: her directory itself at that name (not a link to one), refused too
    state.mkdir(mode=0o755)
    os.chown(state, 64_123, 64_123)
    with pytest.raises(PermissionError, match="is another user's"):
        make_private_directory(str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o755
