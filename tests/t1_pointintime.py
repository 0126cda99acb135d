"""The pure parts of point-in-time snapshots: mount options, the names the status contract
shows, loop devices as /sys shows them, and the records check the kernel tier relies on."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from mirenfs.disks import pointintime
from mirenfs.disks.live import MountedFilesystem, block_devices
from mirenfs.disks.pointintime import DEFAULT_FREEZE_BUDGET_S, Consistency, CopyPolicy
from mirenfs.engine.image import OpenImage
from mirenfs.errors import MirenfsError, PointInTimeError
from mirenfs.mount.config import copy_policy

from support.records import RECORD, check_records, record


def test_freeze_budget_and_live_reads_are_mount_options_fuse_never_sees() -> None:
    assert copy_policy(["allow_other", "ro"]) == (
        CopyPolicy(DEFAULT_FREEZE_BUDGET_S, False),
        ["allow_other", "ro"],
    )
    policy, rest = copy_policy(["freeze_budget=0.5", "allow_other", "live_reads"])
    assert policy == CopyPolicy(freeze_budget_s=0.5, live_reads=True) and rest == ["allow_other"]
    assert copy_policy(["freeze_budget=0"])[0].freeze_budget_s == 0  # never freeze


@pytest.mark.parametrize(
    "option", ["freeze_budget=", "freeze_budget=soon", "freeze_budget=-1", "freeze_budget=nan"]
)
def test_a_bad_freeze_budget_is_refused_with_what_to_write(option: str) -> None:
    with pytest.raises(MirenfsError, match=f"-o {option}: the freeze budget is a number of seconds"):
        copy_policy([option])


def test_consistency_names_and_the_refusal_errno_are_the_contract() -> None:
    assert [str(level) for level in Consistency] == ["offline", "frozen", "crash-consistent", "live"]
    assert PointInTimeError("disk pg is in use …").errno == 16  # EBUSY: "Device or resource busy"


def test_loop_devices_and_their_partitions_by_device_number(tmp_path: Path) -> None:
    (tmp_path / "loop3" / "loop3p1").mkdir(parents=True)
    (tmp_path / "loop3" / "dev").write_text("7:3\n")
    (tmp_path / "loop3" / "loop3p1" / "dev").write_text("259:4\n")
    (tmp_path / "loop4").mkdir()  # detached meanwhile: no dev file
    found = block_devices(["loop3", "loop4", "loop9"], sys_block=str(tmp_path))
    assert found == {(7, 3): "loop3", (259, 4): "loop3p1"}


def test_records_form_an_unbroken_prefix_or_say_where_they_break() -> None:
    data = b"".join(record(n) for n in range(5))
    assert check_records(data).records == 5 and check_records(data).problem is None
    torn = data + record(5)[:100]
    assert check_records(torn).problem is not None
    assert check_records(torn, torn_tail_allowed=True).records == 5
    zeroed = data + bytes(RECORD)  # size grew, data never written: only after a crash
    assert check_records(zeroed, torn_tail_allowed=True).problem is None
    assert check_records(zeroed).problem == f"{RECORD} bytes after record 4 are not the next record"
    swapped = record(0) + record(2) + record(1)
    assert check_records(swapped, torn_tail_allowed=True).records == 1
    assert check_records(swapped, torn_tail_allowed=True).problem is not None


def test_a_copy_with_no_room_says_how_much_it_needs_and_how_much_there_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trial read "needs more than the 273 MiB free" for 213 MiB of data as false: the
    margin the copy leaves was not said. Refused before anything is frozen."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as data:
        data.truncate(64 << 20)
        data.write(b"x" * (3 << 20))
    monkeypatch.setattr(pointintime, "_free_bytes", lambda _directory: 40 << 20)
    source = OpenImage.open(str(image))
    try:
        with pytest.raises(PointInTimeError) as refused:
            pointintime._frozen_sparse_copy(
                "pg",
                source,
                None,
                [],
                CopyPolicy(),
                "no reflinks on ext4",
                str(tmp_path),  # type: ignore[arg-type]
            )
    finally:
        source.close()
    assert (
        f"copying its 3.0 MiB of data needs 67 MiB free in {tmp_path} (its data and 64 MiB to spare), "
        "and 40 MiB are"
    ) in str(refused.value)


def test_a_second_calibration_samples_the_data_after_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    mib = 1 << 20
    copied: list[list[tuple[int, int]]] = []
    monkeypatch.setattr(
        pointintime, "_copy_extents", lambda _s, _t, sample, _size, deadline: copied.append(sample)
    )
    monkeypatch.setattr(pointintime.os, "ftruncate", lambda _fd, _size: None)
    extents = [(0, 10 * mib), (20 * mib, 60 * mib)]
    for skip in (0, 32 * mib, 50 * mib):
        pointintime._estimate_copy_seconds(-1, -1, extents, 50 * mib, skip=skip)
    assert copied == [
        [(0, 10 * mib), (20 * mib, 42 * mib)],  # the first 32 MiB of data
        [(42 * mib, 60 * mib)],  # the rest after them
        [(0, 10 * mib), (20 * mib, 42 * mib)],  # nothing after them: from the start again
    ]


@pytest.mark.parametrize(("first", "second", "refused"), [(30.0, 40.0, True), (30.0, 0.5, False)])
def test_an_estimate_over_the_budget_is_measured_again_and_the_faster_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: float, second: float, refused: bool
) -> None:
    """Trial T21 F4: one sample slowed by a busy host (20 to 60 times the copies that followed)
    refused a disk in use with EBUSY, and a nightly tar lost it. A slow copy is slow twice."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as data:
        data.truncate(64 << 20)
        data.write(b"x" * (3 << 20))
    measured = iter([first, second])
    skips: list[int] = []

    def estimate(_source: int, _target: int, _extents: object, _data: int, *, skip: int = 0) -> float:
        skips.append(skip)
        return next(measured)

    monkeypatch.setattr(pointintime, "_estimate_copy_seconds", estimate)
    monkeypatch.setattr(pointintime, "_free_bytes", lambda _directory: 1 << 40)

    class NoFreezeHere(Exception):
        pass

    def freeze(*_args: object) -> None:
        raise NoFreezeHere  # past the estimate: it would freeze now

    monkeypatch.setattr(pointintime, "_Freeze", freeze)
    source = OpenImage.open(str(image))
    try:
        with pytest.raises((PointInTimeError, NoFreezeHere)) as ended:
            pointintime._frozen_sparse_copy(
                "pg",
                source,
                SimpleNamespace(fd=-1, directory=str(tmp_path)),  # type: ignore[arg-type]
                [],
                CopyPolicy(freeze_budget_s=3.0),
                "no reflinks",
                str(tmp_path),
            )
    finally:
        source.close()
    assert skips == [0, pointintime.CALIBRATION_BYTES]
    assert isinstance(ended.value, PointInTimeError) is refused
    if refused:
        assert "would take about 37.6 s, over the freeze budget of 3 s" in str(ended.value)


@pytest.mark.parametrize("when", ["freeze", "thaw"])
def test_a_ctrl_c_as_a_freeze_or_thaw_returns_still_leaves_nothing_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Trial N: `timeout -s INT|TERM … mirenfs backup` left the disk's filesystem frozen 3 and 6
    times in 25. The interrupt landed right after FIFREEZE returned, before the filesystem was
    noted as frozen, so nothing thawed it. Here it lands exactly there (and, a second Ctrl-C,
    as the first thaw returns): it still arrives, and every freeze is thawed."""
    calls: list[str] = []

    def ioctl(fd: int, request: int, arg: int = 0) -> int:
        calls.append({pointintime.FIFREEZE: "freeze", pointintime.FITHAW: "thaw"}[request])
        if calls[-1] == when and calls.count(when) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, its exception due at the next bytecode
        return 0

    filesystems = [
        MountedFilesystem(f"loop{n}", "ext4", n, os.getpid(), f"/mnt/{n}", str(tmp_path)) for n in (1, 2)
    ]
    monkeypatch.setattr(pointintime, "open_mount", lambda _filesystem: os.open(tmp_path, os.O_RDONLY))
    monkeypatch.setattr(pointintime.fcntl, "ioctl", ioctl)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), pointintime._Freeze(filesystems, 5.0, str(tmp_path)):
            if when == "thaw":
                calls.append("copied")
    finally:
        signal.signal(signal.SIGINT, previous)
    if when == "freeze":  # the first freeze was interrupted: thawed, the second never made
        assert calls == ["freeze", "thaw"]
    else:
        assert calls == ["freeze", "freeze", "copied", "thaw", "thaw"]
    assert list(tmp_path.iterdir()) == []  # the freeze record is gone too


def test_the_freeze_record_is_written_only_once_the_watchdog_stands_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial V: a SIGKILL while the watchdog started left a record of a freeze that never was,
    and the next `cleanup` thawed a freeze someone else had made since, on its strength."""
    records_while_arming: list[list[Path]] = []
    arm = pointintime._Freeze._arm_watchdog

    def arming(self: pointintime._Freeze) -> None:
        records_while_arming.append(list(tmp_path.glob("freeze-*")))  # what a SIGKILL now leaves
        arm(self)

    filesystem = MountedFilesystem("loop1", "ext4", 1, os.getpid(), "/mnt/1", str(tmp_path))
    monkeypatch.setattr(pointintime, "open_mount", lambda _filesystem: os.open(tmp_path, os.O_RDONLY))
    monkeypatch.setattr(pointintime.fcntl, "ioctl", lambda *_args: 0)
    monkeypatch.setattr(pointintime._Freeze, "_arm_watchdog", arming)
    with pointintime._Freeze([filesystem], 5.0, str(tmp_path)):
        [record] = tmp_path.glob("freeze-*")  # while frozen, the record names the filesystem
        assert record.read_text() == "loop1\n"
    assert records_while_arming == [[]] and list(tmp_path.glob("freeze-*")) == []
