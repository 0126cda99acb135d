"""Fixtures only: no test imports this file. Helpers live in the package ``support``."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirenfs.cli import common
from mirenfs.cli.common import DATA_PATH_ENV
from mirenfs.cli.common import DEFAULT_DATA_PATH as HOST_DEFAULT_DATA_PATH
from mirenfs.engine import produce

from support.etcd import EtcdCluster
from support.mounts import Mount, Teardown
from support.runners import HELPER, ok
from support.store import disks
from support.vectors import GO_EXT4

_HOST_STATE = pytest.StashKey[list[tuple[str, int]]]()


@pytest.fixture(autouse=True)
def _no_host_default_data_path(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In this process the default data path is one no test made: a command a test runs without
    --data-path never reaches the host's /var/lib/miren (trial R s18: a catalog copy wrote its
    cluster pin there). Children are watched by :func:`pytest_sessionfinish`."""
    monkeypatch.setattr(
        common, "DEFAULT_DATA_PATH", str(tmp_path_factory.getbasetemp() / "no-default-data-path")
    )


# What a mount of the host's own data path may change while the tests run: not compared.
_CHURNED_BY_A_LIVE_MOUNT = {"index", "frames", "spill", "clones", "mount.log", "mount.lock"}


def _host_data_path_state() -> list[tuple[str, int]]:
    """The host's default data path as only a command changes it: its entries, those of its state
    directory but what a live mount of it churns, and the times of the state files (review S4 F6:
    two files' times alone let a test's mirenfs.db or disk-data/ there pass)."""
    root = Path(HOST_DEFAULT_DATA_PATH)
    state: list[tuple[str, int]] = []
    for directory in (root, root / "mirenfs"):
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
                if directory != root and entry.name in _CHURNED_BY_A_LIVE_MOUNT:
                    continue
                changed = entry.stat(follow_symlinks=False).st_mtime_ns if entry.name.endswith(".json") else 0
                state.append((entry.path, changed))
    return [(str(root), 0), *state] if root.exists() else []


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_HOST_STATE] = _host_data_path_state()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test that ran mirenfs without --data-path (in a child process) changed the host's data path."""
    before = session.config.stash.get(_HOST_STATE, None)
    after = _host_data_path_state()
    if before is None or after == before:
        return
    print(f"\nERROR: the tests changed the host's data path {HOST_DEFAULT_DATA_PATH}: {before} -> {after}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def no_petabyte_files() -> Iterator[None]:
    """Files of 1 PiB are refused (EFBIG) to this process and the ones it starts, whatever the
    filesystem: ext4 refuses them itself, but tmpfs, XFS and btrfs take them, and the tests of
    that refusal skipped there (review MT R-1). Python ignores SIGXFSZ, so the call fails instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = (1 << 50) - 1
    resource.setrlimit(
        resource.RLIMIT_FSIZE, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def need_tool() -> Callable[[str], str]:
    """``need_tool(name)``: the tool's path; fails (never skips) when it is not installed."""

    def check(name: str) -> str:
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        return found

    return check


@pytest.fixture
def mounts() -> Iterator[Callable[..., Mount]]:
    """Start mounts with ``mounts(mountpoint, data_path, *args, expect_log=[regex, …])``.

    All are stopped after the test, and each fails the test if its daemon
    logged a warning, error or traceback that the test did not expect.
    """
    started: list[Mount] = []

    def start(mountpoint: Path, data_path: Path, *extra: str, expect_log: tuple[str, ...] = ()) -> Mount:
        mount = Mount(mountpoint, data_path, *extra, expect_log=expect_log)
        started.append(mount)
        return mount.start()

    yield start
    failures = []
    for mount in reversed(started):  # every mount comes off before any failure is reported
        try:
            mount.stop()
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.fixture
def helper_installed() -> Iterator[Path]:
    """/sbin/mount.mirenfs -> this checkout's helper, for the test only (kept if it was there)."""
    assert HELPER.exists(), f"{HELPER} is missing: reinstall the package (make setup)"
    link = Path("/sbin/mount.mirenfs")
    if link.exists() or link.is_symlink():
        if link.resolve() != HELPER.resolve():
            pytest.fail(f"{link} is another mount.mirenfs ({link.resolve()}); remove it to run this test")
        yield link
        return
    link.symlink_to(HELPER)
    try:
        yield link
    finally:
        link.unlink()


@pytest.fixture
def teardown() -> Iterator[Teardown]:
    """Mounts, processes and clean-ups a test registers; all undone after it, whatever happened."""
    done = Teardown()
    try:
        yield done
    finally:
        done.run()


@pytest.fixture
def compressions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many chunks were compressed (zero chunks use the precomputed frame and never count)."""
    calls: list[int] = []
    original = produce.compress_frame

    def counting(data: bytes | bytearray | memoryview, level: int) -> bytes:
        calls.append(len(data))
        return original(data, level)

    monkeypatch.setattr(produce, "compress_frame", counting)
    return calls


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    """An empty directory to use as a data path, for the in-process tiers."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def sys_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the host's loop devices: /sys/block is a directory of the test's own
    (a module that must never see them says ``pytestmark = pytest.mark.usefixtures("sys_block")``)."""
    from support.fuse_ops import fake_sys_block  # pyfuse3 only for the tests that use it

    return fake_sys_block(tmp_path / "sys-block", monkeypatch)


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data path (commands refuse one that does not exist), with MIRENFS_DATA_PATH unset."""
    monkeypatch.delenv(DATA_PATH_ENV, raising=False)
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def ext4_disk(data: Path) -> Path:
    """Disk ``disk-ext4`` restored from Go's vector (a new disk); returns its image path."""
    result = ok("restore", GO_EXT4.path, "--data-path", data)
    assert "restored disk disk-ext4 (new disk)" in result.out
    return Path(disks(data)["disk-ext4"]["image_path"])


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member on 127.0.0.1 (free ports, a temporary data directory) shared by a module's
    tests, each under its own key prefix; stopped after them, whatever happened."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def etcd_clusters(tmp_path: Path) -> Iterator[Callable[[int], EtcdCluster]]:
    """``etcd_clusters(size)``: a cluster of its own (1 or 3 members) for a test that stops or kills
    members; every one is stopped after the test, whatever happened."""
    started: list[EtcdCluster] = []

    def start(size: int = 1) -> EtcdCluster:
        cluster = EtcdCluster(tmp_path / f"etcd-{len(started)}", size)
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop()
