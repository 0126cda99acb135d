"""A fleet through the kernel: mounts of two hosts (node names, data paths) sharing one etcd
catalogue, restores racing across them, changes seen everywhere within a second, and what
happens when etcd stops or loses its quorum (fail closed, recover).

etcd runs on 127.0.0.1 only, with free ports and temporary data, and is always stopped
(the ``etcd`` and ``etcd_clusters`` fixtures)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.data import sha256_file, staging_files, write_image
from support.etcd import EtcdCluster, make_tls_files
from support.mounts import Mount, wait_for
from support.mounts import restore_state as state
from support.runners import ok, run_cli
from support.vectors import GO_EXT4, GO_ODD

pytestmark = pytest.mark.timeout(180)

UNREACHABLE = r"the disk catalogue at etcd://\S+ is unreachable"


@dataclass
class Host:
    """One host of the fleet: its node name, data path and mount point, on a shared catalogue."""

    node: str
    data: Path
    mnt: Path
    catalog: str

    @property
    def args(self) -> list[str | Path]:
        return ["--catalog", self.catalog, "--node", self.node, "--data-path", self.data]

    def cli(self, *args: str | Path) -> str:
        return ok(*args, *self.args).out

    def mount(self, mounts: Callable[..., Mount], *extra: str, expect_log: tuple[str, ...] = ()) -> Mount:
        return mounts(
            self.mnt, self.data, "--catalog", self.catalog, "--node", self.node, *extra, expect_log=expect_log
        )

    def listing(self) -> list[str]:
        return sorted(os.listdir(self.mnt))

    def disks(self) -> dict[str, dict[str, object]]:
        listed = json.loads(self.cli("disk", "list", "--json", "--all-nodes"))
        return {entry["name"]: entry for entry in listed}


def hosts(tmp_path: Path, catalog: str, *nodes: str) -> list[Host]:
    made = []
    for node in nodes:
        data = tmp_path / f"data-{node}"
        data.mkdir()
        made.append(Host(node, data, tmp_path / f"mnt-{node}", catalog))
    return made


def cp(source: Path, destination: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cp", str(source), str(destination)], capture_output=True, text=True, timeout=120)


def lists(host: Host) -> list[str] | None:
    """The mount's listing, or None while it answers with an error."""
    try:
        return host.listing()
    except OSError:
        return None


def snapshot_of(tmp_path: Path, name: str, size: int, seed: int) -> tuple[Path, str]:
    """A snapshot of an image of ``size`` bytes of incompressible data; (its path, the image's SHA-256)."""
    image = tmp_path / f"{name}-{seed}.img"
    write_image(image, [("data", size)], seed=seed)
    snapshot = tmp_path / f"{name}-{seed}.mirn"
    ok("backup", "--image", image, "--name", name, "--filesystem", "ext4", "-o", snapshot)
    return snapshot, sha256_file(image)


def test_two_hosts_share_one_catalogue_each_mount_shows_its_own(
    etcd: EtcdCluster, tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    a, b = hosts(tmp_path, etcd.url(f"t4-{secrets.token_hex(4)}"), "host-a", "host-b")
    a.cli("restore", GO_EXT4.path, "--name", "pg")
    b.cli("restore", GO_EXT4.path, "--name", "web")
    b.cli("disk", "create", "cache", "--size", "8M")
    a.mount(mounts)
    b.mount(mounts)
    assert a.listing() == ["pg.mirn", "pg.mirn.sha256", "restore"]
    assert b.listing() == ["cache.mirn", "cache.mirn.sha256", "restore", "web.mirn", "web.mirn.sha256"]
    ls = subprocess.run(["ls", "-l", str(a.mnt)], capture_output=True, text=True, timeout=60)
    assert ls.returncode == 0 and "pg.mirn" in ls.stdout
    assert sha256_file(a.mnt / "pg.mirn") == sha256_file(a.mnt / "pg.mirn")  # readable, stable
    assert {name: entry["node"] for name, entry in a.disks().items()} == {
        "cache": "host-b",
        "pg": "host-a",
        "web": "host-b",
    }

    # A disk set deleting through one host leaves the other's listing within a second.
    a.cli("disk", "set-status", "web", "deleting")
    started = time.monotonic()
    wait_for(lambda: "web.mirn" not in b.listing(), "web.mirn to leave host-b's mount", timeout=1.0)
    assert time.monotonic() - started < 1.0
    a.cli("disk", "set-status", "web", "status.detached")
    wait_for(lambda: "web.mirn" in b.listing(), "web.mirn to come back", timeout=1.0)


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member that speaks only TLS and asks every client for a certificate the test
    authority signed; stopped after the module's tests, whatever happened."""
    root = tmp_path_factory.mktemp("etcd-tls")
    cluster = EtcdCluster(root, tls=make_tls_files(root / "tls"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_a_catalogue_over_tls_with_client_certificates(
    etcd_tls: EtcdCluster, tmp_path: Path, mounts: Callable[..., Mount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd was plain HTTP only (Sec F10, left since session 17). etcds:// speaks TLS, checks
    etcd's certificate against $MIRENFS_ETCD_CACERT, and shows this host's; each setting missing
    is named with what to do, and nothing is written anywhere until all are right."""
    tls = etcd_tls.tls
    assert tls is not None
    catalogue = etcd_tls.url(f"t4-{secrets.token_hex(4)}")
    endpoint = etcd_tls.members[0].endpoint
    host = hosts(tmp_path, catalogue, "host-a")[0]
    # requests would let this override the authority given (psf/requests#3829): it must not
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.client_cert))
    for name in ("MIRENFS_ETCD_CACERT", "MIRENFS_ETCD_CERT", "MIRENFS_ETCD_KEY"):
        monkeypatch.delenv(name, raising=False)
    unreachable = f"mirenfs: error: the disk catalogue at {catalogue} is unreachable ({endpoint}: "
    nothing_done = "; no disk pg was created or changed; try again when the catalogue answers\n"
    refused = run_cli("restore", GO_EXT4.path, "--name", "pg", *host.args)
    assert (refused.code, refused.err) == (
        1,
        f"{unreachable}TLS: certificate verify failed: unable to get local issuer certificate; set "
        f"$MIRENFS_ETCD_CACERT to the authority that signed etcd's certificate){nothing_done}",
    )
    monkeypatch.setenv("MIRENFS_ETCD_CACERT", str(tls.ca))
    refused = run_cli("restore", GO_EXT4.path, "--name", "pg", *host.args)
    # TLS 1.3 shows etcd's refusal as an end of the handshake or as its alert, by timing (review S20)
    ended = r"TLS: (etcd ended the handshake|sslv3 alert bad certificate|tlsv13 alert certificate required)"
    advice = (
        "; if etcd asks for a client certificate, set $MIRENFS_ETCD_CERT and $MIRENFS_ETCD_KEY; if it "
        "speaks plain HTTP there, the catalogue is etcd://)"
    )
    assert refused.code == 1
    assert re.fullmatch(f"{re.escape(unreachable)}{ended}{re.escape(advice + nothing_done)}", refused.err), (
        refused.err
    )
    plain = run_cli(
        "disk", "list", "--catalog", catalogue.replace("etcds://", "etcd://"), "--data-path", host.data
    )
    assert plain.code == 1 and "is plain HTTP, but $MIRENFS_ETCD_CACERT is set for TLS" in plain.err
    assert os.listdir(host.data) == []  # no store, no image, no state: nothing was done
    monkeypatch.setenv("MIRENFS_ETCD_CERT", str(tls.client_cert))
    monkeypatch.setenv("MIRENFS_ETCD_KEY", str(tls.client_key))
    assert host.disks() == {}

    host.cli("restore", GO_EXT4.path, "--name", "pg")
    host.mount(mounts)  # the daemon inherits the settings
    assert host.listing() == ["pg.mirn", "pg.mirn.sha256", "restore"]
    host.cli("disk", "create", "cache", "--size", "8M")
    wait_for(lambda: "cache.mirn" in host.listing(), "the watch, over TLS, to bring disk cache")
    snapshot = tmp_path / "pg.mirn"
    assert cp(host.mnt / "pg.mirn", snapshot).returncode == 0
    assert ok("verify", snapshot).code == 0
    assert cp(snapshot, host.mnt / "restore" / "copy.mirn").returncode == 0
    assert sorted(host.disks()) == ["cache", "copy", "pg"]
    assert sha256_file(Path(str(host.disks()["copy"]["image_path"]))) == GO_EXT4.sha256


def test_a_catalogue_is_copied_from_plain_etcd_to_etcd_over_tls(
    etcd: EtcdCluster, etcd_tls: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review S20: with the TLS settings set, the etcd:// side of `catalog copy` was refused for
    them, so a fleet could not move its catalogue onto TLS. They are meant for the etcds:// side."""
    tls = etcd_tls.tls
    assert tls is not None
    prefix = f"t4-{secrets.token_hex(4)}"
    plain, over_tls = etcd.url(prefix), etcd_tls.url(prefix)
    host = hosts(tmp_path, plain, "host-a")[0]
    host.cli("restore", GO_EXT4.path, "--name", "pg")
    for name, file in (
        ("MIRENFS_ETCD_CACERT", tls.ca),
        ("MIRENFS_ETCD_CERT", tls.client_cert),
        ("MIRENFS_ETCD_KEY", tls.client_key),
    ):
        monkeypatch.setenv(name, str(file))
    ok("catalog", "copy", "--from", plain, "--to", over_tls, "--node", "host-a", "--data-path", host.data)
    moved = Host("host-a", host.data, host.mnt, over_tls)
    assert list(moved.disks()) == ["pg"]
    refused = run_cli("disk", "list", "--catalog", plain, "--data-path", host.data)  # alone: refused
    assert refused.code == 1 and "is plain HTTP, but $MIRENFS_ETCD_CACERT is set for TLS" in refused.err


def test_a_wrong_node_mounts_and_says_whose_disks_are_there(
    etcd: EtcdCluster, tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    """A typo'd --node showed no disks without a word: the log names the nodes that have disks,
    status names the catalogue and node, and a second mount of the data path does not claim to
    show the same disks."""
    url = etcd.url(f"t4-{secrets.token_hex(4)}")
    (a,) = hosts(tmp_path, url, "hostA")
    a.cli("restore", GO_EXT4.path, "--name", "pg")
    typo = Host("hosta", a.data, tmp_path / "mnt-typo", url)
    nowhere = r"no disk in the disk catalogue at etcd://\S+ is on node hosta; its disks are on node hostA: "
    wrong = typo.mount(mounts, expect_log=(nowhere,))
    assert re.search(nowhere + r"if this host is one of them, pass --node NAME", wrong.log())
    assert typo.listing() == ["restore"]
    text = run_cli("status", typo.mnt)
    assert text.code == 0 and f", disk catalogue {url}, node hosta, " in text.out.splitlines()[0], text.out
    assert f"\n  no disks on node hosta in {url}\n" in text.out
    status = json.loads(run_cli("status", "--json", typo.mnt).out)
    assert (status["catalog"], status["node"]) == (url, "hosta")

    second = r"another mirenfs mount already serves data path \S+; this one uses the disk catalogue"
    right = a.mount(mounts, expect_log=(second,))
    assert re.search(rf"{second} {re.escape(url)} as node hostA: if the other uses the same", right.log())
    assert a.listing() == ["pg.mirn", "pg.mirn.sha256", "restore"]
    assert "no disk in the disk catalogue" not in right.log()


def test_a_restore_onto_a_disk_whose_image_is_not_under_this_data_path_needs_consent(
    etcd: EtcdCluster, tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    """Trial E22 E2: the right node with the wrong data path (or a second host with the same
    hostname, the default node name) restored without --force: an image written there, and the
    size and filesystem of the record every host reads changed, so host A's snapshots of its
    real disk said another filesystem. The CLI wants --force, the mount --allow-overwrite."""
    url = etcd.url(f"t4-{secrets.token_hex(4)}")
    (a,) = hosts(tmp_path, url, "host-a")
    a.cli("restore", GO_EXT4.path, "--name", "pg")
    image = Path(str(a.disks()["pg"]["image_path"]))
    before = (sha256_file(image), a.disks()["pg"])
    twin = Host("host-a", tmp_path / "data-twin", tmp_path / "mnt-twin", url)
    twin.data.mkdir()
    elsewhere = twin.data / image.relative_to(a.data)
    not_here = (
        f"disk pg of node host-a has no image at {elsewhere}: if it lives on another host (a wrong "
        "{data_path}, or two hosts sharing one node name), restore it there; "
    )
    refused = run_cli("restore", GO_ODD.path, "--name", "pg", *twin.args)
    assert (refused.code, refused.err) == (
        1,
        "mirenfs: error: "
        + not_here.format(data_path="--data-path")
        + "to write its image here, and its size and filesystem into the record every host reads, "
        "pass --force\n",
    )
    missing = r"1 of this host's disks has no image under the data path \S+ \(pg\)"
    mounted = twin.mount(mounts, expect_log=(missing, "disk pg of node host-a has no image at"))
    copied = cp(GO_ODD.path, twin.mnt / "restore" / "pg.mirn")
    assert copied.returncode != 0 and "Operation not permitted" in copied.stderr, (
        copied.stderr
    )  # no file exists
    said = (
        not_here.format(data_path="data path")
        + "restore/ writes its image here only on a mount started with --allow-overwrite"
    )
    assert said in mounted.log()
    assert not (twin.mnt / "restore" / "pg.mirn").exists()  # refused at its create: no entry
    assert (sha256_file(image), a.disks()["pg"]) == before  # the record every host reads, unchanged
    assert not elsewhere.exists() and not list(twin.data.rglob("*.img"))

    ok("restore", GO_ODD.path, "--name", "pg", "--force", *twin.args)  # consent: written there
    assert sha256_file(elsewhere) == GO_ODD.sha256 and sha256_file(image) == before[0]


def test_a_mount_of_a_wiped_catalogue_says_the_images_no_disk_has(
    etcd: EtcdCluster, tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    """Trial E22 E4: after etcd was wiped and made again (the same cluster id), every mount was
    empty without a warning. (Another prefix stands for the wiped catalogue here.)"""
    (a,) = hosts(tmp_path, etcd.url(f"t4-{secrets.token_hex(4)}"), "host-a")
    a.cli("restore", GO_EXT4.path, "--name", "pg")
    wiped = Host("host-a", a.data, a.mnt, etcd.url(f"t4-{secrets.token_hex(4)}"))
    orphans = r"1 disk image\(s\) under \S+ belong to no disk of the catalogue \(vol-\w+\): if the catalogue"
    empty = r"the disk catalogue at \S+ holds no disks \(is its /PREFIX right\?\); this mount shows no disks"
    mounted = wiped.mount(mounts, expect_log=(orphans, empty))
    assert wiped.listing() == ["restore"]
    assert re.search(rf"WARNING: {orphans}", mounted.log()) and re.search(rf"WARNING: {empty}", mounted.log())


def test_a_lease_bound_through_one_host_refuses_a_restore_through_the_other(
    etcd: EtcdCluster, tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    a, b = hosts(tmp_path, etcd.url(f"t4-{secrets.token_hex(4)}"), "host-a", "host-b")
    a.cli("restore", GO_EXT4.path, "--name", "pg")
    image = Path(a.disks()["pg"]["image_path"])
    before = sha256_file(image)
    a.mount(mounts, "--allow-overwrite", expect_log=(r"disk pg is in use \(lease lease-\w+ is bound\)",))
    lease = b.cli("lease", "acquire", "pg").strip()
    refused = cp(GO_EXT4.path, a.mnt / "restore" / "pg.mirn")
    assert refused.returncode != 0 and "Device or resource busy" in refused.stderr, refused.stderr
    assert sha256_file(image) == before
    b.cli("lease", "release", lease)
    replaced = cp(GO_EXT4.path, a.mnt / "restore" / "pg.mirn")
    assert replaced.returncode == 0, replaced.stderr
    assert state(a.mnt, "pg.mirn") == f"installed from a snapshot of disk {GO_EXT4.name}"


def test_two_simultaneous_restores_of_one_new_name_create_one_disk(
    etcd: EtcdCluster, tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    a, b = hosts(tmp_path, etcd.url(f"t4-{secrets.token_hex(4)}"), "host-a", "host-b")
    refusals = (
        r"a disk named new\d already exists",
        r"disk new\d is on node host-[ab], not on this node",
        r"restore of disk new\d from restore/new\d\.mirn by uid \d+ failed",
    )
    a.mount(mounts, expect_log=refusals)
    b.mount(mounts, expect_log=refusals)
    for round_number in range(3):
        name = f"new{round_number}"
        barrier = threading.Barrier(2)
        results: dict[str, subprocess.CompletedProcess[str]] = {}

        def restore(
            host: Host,
            name: str = name,
            barrier: threading.Barrier = barrier,
            results: dict[str, subprocess.CompletedProcess[str]] = results,
        ) -> None:
            barrier.wait(timeout=30)
            results[host.node] = cp(GO_EXT4.path, host.mnt / "restore" / f"{name}.mirn")

        threads = [threading.Thread(target=restore, args=(host,)) for host in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        won = [node for node, result in results.items() if result.returncode == 0]
        assert len(won) == 1, {node: result.stderr for node, result in results.items()}
        lost = next(result for node, result in results.items() if node not in won)
        assert "File exists" in lost.stderr or "Device or resource busy" in lost.stderr, lost.stderr
        disks = a.disks()
        assert disks[name]["node"] == won[0] and disks[name]["status"] == "provisioned"
        for host in (a, b):  # each data path holds the images of its own node's disks, and nothing else
            on_disk = {path.parent.name for path in (host.data / "disk-data" / "volumes").glob("*/disk.img")}
            assert on_disk == {str(d["volume_id"]) for d in disks.values() if d["node"] == host.node}
    assert staging_files(tmp_path) == []


def test_etcd_stopped_fails_closed_then_everything_works_again(
    etcd_clusters: Callable[[int], EtcdCluster], tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    cluster = etcd_clusters(1)
    (a,) = hosts(tmp_path, cluster.url("fleet"), "host-a")
    original, original_sha = snapshot_of(tmp_path, "pg", 6 << 20, seed=1)
    replacement, _ = snapshot_of(tmp_path, "pg", 6 << 20, seed=2)
    a.cli("restore", original, "--name", "pg")
    image = Path(a.disks()["pg"]["image_path"])
    a.mount(
        mounts,
        "--allow-overwrite",
        expect_log=(UNREACHABLE, r"restore of disk (pg|fresh) from restore/\S+ by uid \d+ failed"),
    )

    snapshot = (a.mnt / "pg.mirn").read_bytes()
    reader = open(a.mnt / "pg.mirn", "rb")  # noqa: SIM115 - read across the outage below
    head = reader.read(1 << 20)

    # A restore whose final re-check cannot reach the catalogue keeps the old image.
    data = replacement.read_bytes()
    fd = os.open(a.mnt / "restore" / "pg.mirn", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data[: len(data) - 4096])  # the header was checked against the catalogue
        cluster.stop_member(0)
        os.write(fd, data[len(data) - 4096 :])
        with pytest.raises(OSError) as failed:
            os.close(fd)
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    assert failed.value.errno == 5, failed.value  # EIO
    assert "is unreachable" in state(a.mnt, "pg.mirn")
    assert sha256_file(image) == original_sha

    # While it is down: no restore starts, nothing is created, the image stays as it was.
    fresh = cp(original, a.mnt / "restore" / "fresh.mirn")
    assert fresh.returncode != 0 and "Input/output error" in fresh.stderr, fresh.stderr
    over = cp(replacement, a.mnt / "restore" / "pg.mirn")
    assert over.returncode != 0 and "Input/output error" in over.stderr, over.stderr
    assert sha256_file(image) == original_sha
    wait_for(lambda: lists(a) is None, "the mount to answer EIO", timeout=5.0)
    with reader:  # a snapshot already open reads on, its version known
        assert head + reader.read() == snapshot
    cli = run_cli("restore", original, "--name", "fresh", *a.args)
    assert cli.code == 1 and "is unreachable" in cli.err
    assert [p.name for p in (a.data / "disk-data" / "volumes").iterdir()] == [image.parent.name]

    # Back: everything works again, and nothing was created meanwhile.
    cluster.restart(0)
    cluster.wait_healthy()
    wait_for(
        lambda: lists(a) == ["pg.mirn", "pg.mirn.sha256", "restore"], "the mount to list again", timeout=10
    )
    assert sorted(a.disks()) == ["pg"]
    restored = cp(original, a.mnt / "restore" / "fresh.mirn")
    assert restored.returncode == 0, restored.stderr
    assert state(a.mnt, "fresh.mirn") == "installed: created disk fresh"
    wait_for(lambda: "fresh.mirn" in a.listing(), "the new disk's snapshot", timeout=1.0)
    assert staging_files(tmp_path) == []


@pytest.mark.parametrize("how", ["SIGTERM", "SIGSTOP"])
def test_status_answers_during_an_outage_from_what_the_mount_knows_and_says_why(
    etcd_clusters: Callable[[int], EtcdCluster], tmp_path: Path, mounts: Callable[..., Mount], how: str
) -> None:
    """`mirenfs status` during an etcd outage: the mount's last listing, index states and restores,
    a line naming the unreachable catalogue with the reason, exit status 3; 0 again once it is back."""
    cluster = etcd_clusters(1)
    (a,) = hosts(tmp_path, cluster.url("fleet"), "host-a")
    a.cli("restore", GO_EXT4.path, "--name", "pg")
    a.mount(mounts, expect_log=(UNREACHABLE,))
    assert (a.mnt / "pg.mirn").stat().st_size > 0  # the index is built: ready
    assert cp(GO_EXT4.path, a.mnt / "restore" / "web.mirn").returncode == 0
    fine = run_cli("status", "--json", a.mnt)
    assert fine.code == 0 and json.loads(fine.out)["catalog_error"] is None, fine

    member = cluster.members[0]
    assert member.process is not None
    paused = how == "SIGSTOP"
    if paused:
        member.process.send_signal(signal.SIGSTOP)
    else:
        cluster.stop_member(0)
    try:
        wait_for(lambda: run_cli("status", a.mnt).code == 3, "status to report the outage", timeout=10)
        text = run_cli("status", a.mnt)
        assert text.code == 3 and text.err == "", text
        assert re.search(rf"^  {UNREACHABLE} \(.+\)$", text.out, re.MULTILINE), text.out
        assert "(the disks below are from the mount's last listing" in text.out
        assert re.search(r"^  pg +ready \(offline", text.out, re.MULTILINE), text.out
        assert "restore/web.mirn  disk web  installed: created disk web" in text.out
        as_json = run_cli("status", "--json", a.mnt)
        assert as_json.code == 3, as_json
        status = json.loads(as_json.out)
        assert re.fullmatch(rf"{UNREACHABLE} \(.+\)", status["catalog_error"]), status["catalog_error"]
        assert cluster.url("fleet").split("/")[2] in status["catalog_error"]
        assert set(status["disks"]) == {"pg", "web"} and status["disks"]["pg"]["index"] == "ready"
        assert status["restores"][0]["state"] == "installed: created disk web"
        assert lists(a) is None  # listing itself still fails closed
    finally:
        if paused:
            member.process.send_signal(signal.SIGCONT)
    cluster.restart(0)
    cluster.wait_healthy()
    wait_for(lambda: run_cli("status", a.mnt).code == 0, "status to be whole again", timeout=10)
    assert json.loads(run_cli("status", "--json", a.mnt).out)["catalog_error"] is None


def test_three_members_one_killed_changes_nothing_two_killed_fail_closed(
    etcd_clusters: Callable[[int], EtcdCluster], tmp_path: Path, mounts: Callable[..., Mount]
) -> None:
    cluster = etcd_clusters(3)
    a, b = hosts(tmp_path, cluster.url("fleet"), "host-a", "host-b")
    a.cli("restore", GO_EXT4.path, "--name", "pg")
    image = Path(a.disks()["pg"]["image_path"])
    before = sha256_file(image)
    a.mount(mounts, "--allow-overwrite", expect_log=(UNREACHABLE, r"restore of disk \w+ .* failed"))

    cluster.kill(0)  # the member every client asks first
    assert a.listing() == ["pg.mirn", "pg.mirn.sha256", "restore"]
    assert cp(GO_EXT4.path, a.mnt / "restore" / "one.mirn").returncode == 0
    b.cli("disk", "set-status", "pg", "detached")
    assert a.disks()["pg"]["status"] == "detached"
    wait_for(lambda: "one.mirn" in a.listing(), "the restored disk's snapshot", timeout=1.0)

    cluster.kill(1)  # no quorum left
    two = cp(GO_EXT4.path, a.mnt / "restore" / "two.mirn")
    assert two.returncode != 0 and "Input/output error" in two.stderr, two.stderr
    over = cp(GO_EXT4.path, a.mnt / "restore" / "pg.mirn")
    assert over.returncode != 0 and "Input/output error" in over.stderr, over.stderr
    assert sha256_file(image) == before
    wait_for(lambda: lists(a) is None, "the mount to answer EIO", timeout=6.0)
    refused = run_cli("disk", "set-status", "pg", "attached", *b.args)
    assert refused.code == 1 and "is unreachable" in refused.err

    cluster.restart(1)  # quorum again
    cluster.wait_healthy()
    wait_for(lambda: lists(a) is not None, "the mount to list again", timeout=10)
    assert sorted(a.disks()) == ["one", "pg"] and a.disks()["pg"]["status"] == "detached"
    assert [p.name for p in (a.data / "disk-data" / "volumes").glob("*/disk.img")].count("disk.img") == 2
