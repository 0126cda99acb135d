"""The catalogue, pure: Miren's three status spellings (``status.deleting``, ``DELETING``,
``deleting``) mean one state whatever resolver answers, and ``--catalog`` / ``--node`` parse or
are refused in one line. No etcd here (t2_etcd_catalog.py has it)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mirenfs.disks.catalogs import (
    ETCD_TLS_ENVS,
    EtcdLocation,
    EtcdTls,
    images_missing_here,
    mount_listing,
    none_on_this_node,
    open_catalog,
    parse_catalog,
    same_catalogue,
)
from mirenfs.disks.model import (
    Disk,
    DiskRecord,
    DiskState,
    Lease,
    LeaseState,
    Volume,
    VolumeState,
    validate_node_name,
)
from mirenfs.disks.rules import prepare_backup, prepare_restore
from mirenfs.disks.store import Store
from mirenfs.errors import (
    DiskDeletingError,
    DiskLeasedError,
    DiskNotFoundError,
    InvalidDiskNameError,
    MirenfsError,
)

from support.etcd import TlsFiles, make_tls_files

DELETING_SPELLINGS = ["deleting", "DELETING", "status.deleting", "Status.Deleting"]
BOUND_SPELLINGS = ["bound", "BOUND", "status.bound"]


@pytest.mark.parametrize("spelling", DELETING_SPELLINGS)
def test_every_spelling_of_deleting_is_one_state(spelling: str) -> None:
    assert DiskState(spelling) is DiskState.DELETING
    assert Disk("d1", "pg", spelling, "ext4", 4096).status is DiskState.DELETING


@pytest.mark.parametrize("spelling", BOUND_SPELLINGS)
def test_every_spelling_of_bound_is_one_state(spelling: str) -> None:
    assert LeaseState(spelling) is LeaseState.BOUND
    assert Lease("l1", "d1", spelling).status is LeaseState.BOUND


@pytest.mark.parametrize(
    ("spelling", "state"),
    [("PROVISIONING", VolumeState.PROVISIONING), ("status.provisioned", VolumeState.PROVISIONED)],
)
def test_volume_statuses_parse_the_same_way(spelling: str, state: VolumeState) -> None:
    assert Volume("v1", "d1", None, spelling).status is state


@pytest.mark.parametrize("bad", ["", "delete", "status.", "status.unknown", "bound"])
def test_an_unknown_disk_status_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        DiskState(bad)


@dataclass
class RawResolver:
    """A resolver that answers as Miren's own code might: plain objects with statuses as strings."""

    status: str = "provisioned"
    lease_statuses: list[str] = field(default_factory=list)
    data_path: str = "/nonexistent"

    def find_disk_by_name(self, name: str) -> Any:
        return SimpleNamespace(
            id=f"id-{name}", name=name, status=self.status, filesystem="ext4", size_bytes=4096
        )

    def find_volume_by_disk_id(self, disk_id: str) -> Any:
        return Volume(f"vol-{disk_id}", disk_id, f"{self.data_path}/{disk_id}.img")

    def find_leases_by_disk_id(self, disk_id: str) -> Any:
        return [
            SimpleNamespace(id=f"lease-{i}", disk_id=disk_id, status=s)
            for i, s in enumerate(self.lease_statuses)
        ]


@pytest.mark.parametrize("spelling", DELETING_SPELLINGS)
def test_restore_and_backup_refuse_deleting_in_any_spelling(spelling: str, tmp_path: Path) -> None:
    resolver = RawResolver(status=spelling, data_path=str(tmp_path))
    with pytest.raises(DiskDeletingError):
        prepare_restore(resolver, "pg", data_path=str(tmp_path), overwrite=True, creator=None)
    with pytest.raises(DiskDeletingError):
        prepare_backup(resolver, "pg", data_path=str(tmp_path))


@pytest.mark.parametrize("spelling", BOUND_SPELLINGS)
def test_restore_refuses_a_bound_lease_in_any_spelling(spelling: str, tmp_path: Path) -> None:
    resolver = RawResolver(lease_statuses=["released", spelling], data_path=str(tmp_path))
    with pytest.raises(DiskLeasedError) as refused:
        prepare_restore(resolver, "pg", data_path=str(tmp_path), overwrite=True, creator=None)
    assert refused.value.errno == 16  # EBUSY


def test_released_leases_in_any_spelling_do_not_refuse(tmp_path: Path) -> None:
    resolver = RawResolver(lease_statuses=["RELEASED", "status.released", "failed"], data_path=str(tmp_path))
    target = prepare_restore(resolver, "pg", data_path=str(tmp_path), overwrite=True, creator=None)
    assert target.existing is not None and target.existing.name == "pg"


def test_the_sqlite_store_reads_and_writes_miren_spellings(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    assert store.set_disk_status("pg", "status.deleting") == (DiskState.PROVISIONED, DiskState.DELETING)
    assert store.find_disk_by_name("pg").status is DiskState.DELETING
    with pytest.raises(DiskDeletingError):
        prepare_restore(store, "pg", data_path=str(tmp_path), overwrite=True, creator=store)


# --- --catalog and --node ---


@pytest.mark.parametrize(
    ("text", "endpoints", "prefix"),
    [
        ("etcd://10.0.0.1:2379", (("10.0.0.1", 2379),), "mirenfs"),
        ("etcd://a:1,b:2,c:3/fleet", (("a", 1), ("b", 2), ("c", 3)), "fleet"),
        ("etcd://[::1]:2379/x/y/", (("::1", 2379),), "x/y"),
    ],
)
def test_etcd_catalogues_parse(text: str, endpoints: tuple[tuple[str, int], ...], prefix: str) -> None:
    spec = parse_catalog(text)
    assert spec.etcd == EtcdLocation(endpoints, prefix)
    assert spec.etcd.root == f"/{prefix}/"
    assert parse_catalog(spec.etcd.url).etcd == spec.etcd  # the url it prints reads back the same


@pytest.mark.parametrize(
    ("text", "data_path"),
    [
        ("sqlite:", None),
        ("sqlite://", None),
        ("sqlite:///var/lib/miren", "/var/lib/miren"),
        ("sqlite:////var/lib/miren", "/var/lib/miren"),  # trial E22 E9: it was //var/lib/miren
        ("/srv/m", "/srv/m"),
        ("//srv/m", "/srv/m"),
    ],
)
def test_sqlite_catalogues_parse(text: str, data_path: str | None) -> None:
    spec = parse_catalog(text)
    assert spec.etcd is None and spec.data_path == data_path


@pytest.mark.parametrize(
    "bad",
    ["", "etcd://", "etcd://host", "etcd://host:0", "etcd://host:99999", "etcd://:2379", "etcd://a:1,,b:2",
     "etcd://a:1/../x", "http://a:1", "sqlite:relative/dir"],
)  # fmt: skip
def test_bad_catalogues_are_refused_in_one_line(bad: str) -> None:
    with pytest.raises(MirenfsError) as refused:
        parse_catalog(bad)
    assert "\n" not in str(refused.value) and not isinstance(refused.value, DiskNotFoundError)


@pytest.mark.parametrize("typo", ["etcd:/127.0.0.1:23791/fleet", "etcd:127.0.0.1:23791", "ETCD:/h:1"])
def test_an_etcd_url_with_one_slash_is_refused_not_taken_for_a_data_path(typo: str) -> None:
    with pytest.raises(MirenfsError, match=r"not a well-formed etcd URL; did you mean etcd://HOST:PORT"):
        parse_catalog(typo)


def test_an_etcd_url_in_capitals_is_read_and_an_empty_endpoint_is_named_as_such() -> None:
    """Trial W: `ETCD://h:1/p` was told "two slashes after etcd:", and `etcd://a:1,/x` that
    'an empty endpoint' was not HOST:PORT."""
    spec = parse_catalog("ETCD://127.0.0.1:23791/trialw")
    assert spec.etcd is not None and spec.etcd.url == "etcd://127.0.0.1:23791/trialw"
    with pytest.raises(MirenfsError, match="its list of endpoints has an empty entry"):
        parse_catalog("etcd://127.0.0.1:23791,/x")


@pytest.mark.parametrize(
    "url",
    ["etcd://user:s3cret@127.0.0.1:23791/fleet", "etcd://a:1,user:s3cret@b:2", "etcd://u:s3/cret@h:1/p"],
)
def test_credentials_in_an_etcd_url_are_refused_and_never_echoed(url: str) -> None:
    with pytest.raises(MirenfsError, match="a user name or password in the URL is not supported") as refused:
        parse_catalog(url)
    assert "s3" not in str(refused.value) and "cret" not in str(refused.value)


@pytest.fixture
def no_tls_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ETCD_TLS_ENVS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls") / "files")


@pytest.mark.usefixtures("no_tls_settings")
def test_an_etcds_catalogue_speaks_tls_with_the_files_the_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls_files: TlsFiles
) -> None:
    """etcd was plain HTTP only (Sec F10, left since session 17). etcds:// is TLS: the files
    $MIRENFS_ETCD_* name, made absolute (a daemon may start elsewhere), or none at all. The TLS
    files do not make another location: etcd:// and etcds:// of one cluster are one catalogue."""
    spec = parse_catalog("ETCDS://a:1,b:2/fleet")
    assert spec.etcd == EtcdLocation((("a", 1), ("b", 2)), "fleet") and spec.etcd.tls == EtcdTls()
    assert spec.etcd.url == "etcds://a:1,b:2/fleet" and parse_catalog(spec.etcd.url).etcd == spec.etcd
    monkeypatch.chdir(tls_files.ca.parent)
    files = (tls_files.ca, tls_files.client_cert, tls_files.client_key)
    for name, file in zip(ETCD_TLS_ENVS, files, strict=True):
        monkeypatch.setenv(name, file.name)
    location = parse_catalog("etcds://a:1/fleet").etcd
    assert location is not None and location.tls == EtcdTls(*map(str, files))
    assert same_catalogue("etcd://a:1/fleet", "etcds://a:1/fleet")  # whatever the environment holds


def _encrypted_key(tls_files: TlsFiles, tmp_path: Path) -> Path:
    key = tmp_path / "locked-key.pem"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(tls_files.client_key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(key),
        ],
        check=True,
        timeout=60,
    )
    return key


@pytest.mark.parametrize(
    ("catalogue", "settings", "said"),
    [
        (
            "etcd://a:1/fleet",
            {"MIRENFS_ETCD_CACERT": "CA"},
            "catalogue 'etcd://a:1/fleet' is plain HTTP, but $MIRENFS_ETCD_CACERT is set for TLS; write "
            "etcds://… to speak TLS to etcd, or unset $MIRENFS_ETCD_CACERT",
        ),
        (
            "etcds://a:1/fleet",
            {"MIRENFS_ETCD_CERT": "CERT"},
            "catalogue 'etcds://a:1/fleet': a client certificate needs its key and the key its "
            "certificate; set $MIRENFS_ETCD_KEY too",
        ),
        (
            "etcds://a:1/fleet",
            {"MIRENFS_ETCD_CACERT": "nowhere.pem"},
            "catalogue 'etcds://a:1/fleet': $MIRENFS_ETCD_CACERT names nowhere.pem (HERE/nowhere.pem), "
            "which does not exist",
        ),
        (
            "etcds://a:1/fleet",
            {"MIRENFS_ETCD_CACERT": "."},
            "catalogue 'etcds://a:1/fleet': $MIRENFS_ETCD_CACERT names . (HERE), which is not a file",
        ),
        (
            "etcds://a:1/fleet",
            {"MIRENFS_ETCD_CACERT": "KEY"},
            "catalogue 'etcds://a:1/fleet': $MIRENFS_ETCD_CACERT (KEY) is not a PEM file of the authority "
            "that signed etcd's certificate (no certificate or crl found)",
        ),
        (
            "etcds://a:1/fleet",
            {"MIRENFS_ETCD_CERT": "CERT", "MIRENFS_ETCD_KEY": "ETCD_KEY"},
            "catalogue 'etcds://a:1/fleet': $MIRENFS_ETCD_CERT (CERT) and $MIRENFS_ETCD_KEY (ETCD_KEY) are "
            "not a PEM certificate and its unencrypted key (key values mismatch)",
        ),
        (
            "etcds://a:1/fleet",
            {"MIRENFS_ETCD_CERT": "CERT", "MIRENFS_ETCD_KEY": "LOCKED"},
            "catalogue 'etcds://a:1/fleet': $MIRENFS_ETCD_CERT (CERT) and $MIRENFS_ETCD_KEY (LOCKED) are "
            "not a PEM certificate and its unencrypted key (the key is encrypted, and mirenfs asks nobody "
            "for its password)",
        ),
        (
            "etcds:/a:1/fleet",
            {},
            "catalogue 'etcds:/a:1/fleet' is not a well-formed etcd URL; did you mean "
            "etcds://HOST:PORT[,HOST:PORT…][/PREFIX] (two slashes after etcds:)?",
        ),
    ],
    ids=[
        "TLS files for plain HTTP",
        "a certificate alone",
        "a missing file",
        "a directory",
        "a key for an authority",
        "another's key",
        "an encrypted key",
        "one slash",
    ],
)
@pytest.mark.usefixtures("no_tls_settings")
def test_tls_settings_that_cannot_work_are_refused_before_etcd_is_asked(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tls_files: TlsFiles,
    catalogue: str,
    settings: dict[str, str],
    said: str,
) -> None:
    """Trial T20 / review S20: a key that is not the certificate's, a CA file that is no
    authority's or an encrypted key reached etcd and read as an outage ("unreachable (… PEM
    lib)"). Each is named, with its file, before anything is asked."""
    monkeypatch.chdir(tmp_path)
    files = {
        "CA": tls_files.ca,
        "CERT": tls_files.client_cert,
        "KEY": tls_files.client_key,
        "ETCD_KEY": tls_files.server_key,
        "LOCKED": _encrypted_key(tls_files, tmp_path),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, str(files.get(value, value)))
    with pytest.raises(MirenfsError) as refused:
        parse_catalog(catalogue)
    expected = said.replace("HERE", str(tmp_path))
    for word, path in sorted(files.items(), key=lambda item: -len(item[0])):
        expected = expected.replace(f"({word})", f"({path})")
    assert str(refused.value) == expected


VERIFY_FAILED = (
    "HTTPSConnectionPool(host='h', port=1): Max retries exceeded with url: /v3/kv/range (Caused by "
    "SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
    "unable to get local issuer certificate (_ssl.c:1006)')))"
)
ENDED = "(Caused by SSLError(SSLEOFError(8, 'EOF occurred in violation of protocol (_ssl.c:2427)')))"
ENDED_WHILE_READING = (
    "(Caused by SSLError(SSLEOFError(8, '[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation "
    "of protocol (_ssl.c:1006)')))"
)
BAD_CERTIFICATE = (
    "(Caused by SSLError(SSLError(1, '[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate "
    "(_ssl.c:2580)')))"
)
MISMATCH = (
    '(Caused by SSLError(SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate '
    "verify failed: Hostname mismatch, certificate is not valid for 'localhost'. (_ssl.c:1006)\")))"
)
CLOSED = "('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))"
NO_CERTIFICATE = (
    "if etcd asks for a client certificate, set $MIRENFS_ETCD_CERT and $MIRENFS_ETCD_KEY; if it speaks "
    "plain HTTP there, the catalogue is etcd://"
)
REFUSED_CERTIFICATE = (
    "etcd refused this host's certificate ($MIRENFS_ETCD_CERT, /me.pem): is it signed by an authority "
    "etcd trusts (its --trusted-ca-file), and still valid?"
)
WITH_CA = EtcdTls("/ca.pem")
WITH_ALL = EtcdTls("/ca.pem", "/me.pem", "/me-key.pem")


@pytest.mark.parametrize(
    ("raised", "tls", "said"),
    [
        (
            VERIFY_FAILED,
            EtcdTls(),
            "TLS: certificate verify failed: unable to get local issuer certificate; set "
            "$MIRENFS_ETCD_CACERT to the authority that signed etcd's certificate",
        ),
        (
            VERIFY_FAILED,
            WITH_CA,
            "TLS: certificate verify failed: unable to get local issuer certificate; etcd's certificate is "
            "not signed by $MIRENFS_ETCD_CACERT (/ca.pem)",
        ),
        (
            MISMATCH,
            WITH_CA,
            "TLS: certificate verify failed: Hostname mismatch, certificate is not valid for 'localhost'.; "
            "name each endpoint as etcd's certificate does (its subjectAltName)",
        ),
        (ENDED, WITH_CA, f"TLS: etcd ended the handshake; {NO_CERTIFICATE}"),
        (ENDED_WHILE_READING, WITH_CA, f"TLS: etcd ended the handshake; {NO_CERTIFICATE}"),
        (BAD_CERTIFICATE, WITH_CA, f"TLS: sslv3 alert bad certificate; {NO_CERTIFICATE}"),
        (ENDED, WITH_ALL, f"TLS: etcd ended the handshake; {REFUSED_CERTIFICATE}"),
        (BAD_CERTIFICATE, WITH_ALL, f"TLS: sslv3 alert bad certificate; {REFUSED_CERTIFICATE}"),
        (
            CLOSED,
            None,
            "it closed the connection without an answer (as an etcd that speaks only TLS does: etcds://?)",
        ),
        (CLOSED, WITH_ALL, "it closed the connection without an answer"),
    ],
    ids=[
        "no authority given",
        "another authority",
        "another name",
        "no client certificate",
        "eof while reading",
        "a bad one without one",
        "ended, with one",
        "a refused one",
        "plain",
        "closed over TLS",
    ],
)
def test_a_failed_tls_handshake_is_said_with_what_to_do(raised: str, tls: EtcdTls | None, said: str) -> None:
    """Review S20: which words TLS 1.3 shows for a refused client depends on timing, and the
    advice came from the words alone (set a certificate already set): it also follows what this
    host has set."""
    from mirenfs.disks import etcd  # the HTTP client, as a catalogue opened imports it

    assert etcd.advised(etcd._why(ConnectionError(raised)), tls) == said


def test_disks_of_this_host_without_their_images_here_are_named(tmp_path: Path) -> None:
    """A mistyped data path (or a node name two hosts share) shows this host's disks with no
    images: a restore into one then wrote an image there and changed another host's record."""

    def disk(name: str, status: DiskState = DiskState.PROVISIONED, *, local: bool = True) -> DiskRecord:
        image = tmp_path / name / "disk.img"
        record = Disk(f"id-{name}", name, status, "ext4", 1)
        volume = Volume(f"v-{name}", record.id, None, VolumeState.PROVISIONED, "a")
        return DiskRecord(record, volume, str(image), (), local)

    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "disk.img").write_bytes(b"")
    assert images_missing_here([disk("here")], data_path=str(tmp_path)) is None
    quiet = [
        disk("new", DiskState.PROVISIONING),
        disk("going", DiskState.DELETING),
        disk("there", local=False),
    ]
    assert images_missing_here([disk("here"), *quiet], data_path=str(tmp_path)) is None
    said = images_missing_here([disk(f"d{i}") for i in range(7)] + [disk("here")], data_path=str(tmp_path))
    assert said == (
        f"7 of this host's disks have no image under the data path {tmp_path} (d0, d1, d2, d3, d4 and 2 "
        "more): if the data path (or the node name) is wrong, stop this mount, since a restore into one "
        "of them would write its image here and change its record (on a fleet, only with --allow-overwrite)"
    )


def test_a_host_that_sees_no_disks_is_told_which_nodes_have_them() -> None:
    def on(node: str | None, name: str) -> DiskRecord:
        disk = Disk(f"id-{name}", name, DiskState.PROVISIONED, "ext4", 1)
        return DiskRecord(
            disk, Volume(f"v-{name}", disk.id, None, VolumeState.PROVISIONED, node), None, (), False
        )

    url = "etcd://127.0.0.1:2379/fleet"
    found = none_on_this_node([on("hostA", "pg"), on("hostB", "web")], url=url, node="hosta")
    assert found == (
        "no disk in the disk catalogue at etcd://127.0.0.1:2379/fleet is on node hosta; its disks are on "
        "nodes hostA, hostB: if this host is one of them, pass --node NAME (or set $MIRENFS_NODE; the "
        "default is the hostname)"
    )
    assert (
        none_on_this_node([], url=url, node="a")
        == f"the disk catalogue at {url} holds no disks (is its /PREFIX right?)"
    )
    assert "None" not in str(none_on_this_node([on(None, "x")], url=url, node="a"))
    mine = DiskRecord(on("a", "pg").disk, on("a", "pg").volume, "/d/pg.img", (), True)
    assert none_on_this_node([mine, on("b", "web")], url=url, node="a") is None


def test_node_names_use_the_disk_name_alphabet() -> None:
    assert validate_node_name("host-a.example.com") == "host-a.example.com"
    for bad in ("", "-x", "a/b", "a b", "x" * 64):
        with pytest.raises(InvalidDiskNameError):
            validate_node_name(bad)


def test_a_sqlite_catalogue_is_the_store_of_its_own_data_path(tmp_path: Path) -> None:
    store = open_catalog(None, str(tmp_path), node="n1")
    assert isinstance(store, Store) and store.data_path == str(tmp_path)
    assert isinstance(open_catalog(f"sqlite://{tmp_path}", str(tmp_path)), Store)
    assert isinstance(open_catalog(f"sqlite:///{tmp_path}", f"/{tmp_path}"), Store)  # one slash more
    with pytest.raises(MirenfsError, match="--data-path"):
        open_catalog(f"sqlite://{tmp_path}/other", str(tmp_path))


def test_the_mount_lists_a_sqlite_store_by_asking_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.add_disk("pg", size_bytes=4096, filesystem="ext4")
    listing = mount_listing(store)
    assert [record.disk.name for record in listing.list_disks()] == ["pg"]
    assert all(record.local for record in listing.list_disks())
    listing.close()
