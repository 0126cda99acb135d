"""The disk catalogue on etcd v3, shared by a fleet of hosts: the same :class:`Catalog` as the
SQLite store, so the rules, the CLI and the mount work with either.

It talks to etcd's JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``,
``/v3/watch``) through etcd3gw's client, one client per endpoint and thread,
trying the endpoints in turn. Keys, under ``/PREFIX/``:

- ``disks/NAME``: the disk, its volume (with the node that holds its image)
  and its leases, one JSON record. Every change to a disk is one
  compare-and-swap on this key's ``mod_revision``, retried on a conflict, so
  no update is lost and a lease is bound only on the disk as it was checked;
- ``ids/DISK_ID`` -> NAME, ``leases/LEASE_ID`` -> the lease's disk, and
  ``images/NODE/SHA256(PATH)`` -> the disk an explicit image belongs to: the
  indexes, written in the same transactions.

Creating a disk is one transaction that succeeds only while its name (and id,
and explicit image) has no key: of two hosts creating one name, exactly one
wins and the other gets :class:`~mirenfs.errors.DiskExistsError`.

Failure policy: fail closed. A request no endpoint answers (refused, no
answer within ``REQUEST_TIMEOUT_S``, no leader, no quorum) raises
:class:`~mirenfs.errors.CatalogUnreachableError` ("the disk catalogue at …
is unreachable"), never :class:`~mirenfs.errors.DiskNotFoundError`: only a
read that succeeded and found no key means "no such disk". Reads are
linearizable, so a member cut off from its quorum cannot answer from a stale
copy.

:class:`CatalogWatch` is the mount's local copy: one listing, then a watch
on ``disks/``, applied in a worker thread; a second thread asks the member
serving the watch for a linearizable read every ``PROBE_INTERVAL_S``. The
copy answers ``list_disks`` from memory only while it was confirmed current
(by the probe, or an event) within ``STALE_AFTER_S``; otherwise it raises the
unreachable error (EIO at the FUSE boundary), logging the change once. A
broken stream is followed again at once, on another member if need be: one
member going away does not interrupt the mount.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from mirenfs.disks.catalogs import ETCD_CACERT_ENV, ETCD_CERT_ENV, ETCD_KEY_ENV, EtcdLocation, EtcdTls
from mirenfs.disks.model import (
    ETCD_CLUSTERS_FILE,
    CreatedRecords,
    Disk,
    DiskRecord,
    DiskState,
    Lease,
    LeaseState,
    Volume,
    VolumeState,
    image_path_for,
    new_disk_records,
    new_id,
    state_directory,
    validate_disk_name,
    validate_node_name,
)
from mirenfs.disks.rules import what_the_data_path_keeps_at
from mirenfs.disks.store import check_data_path
from mirenfs.disks.trust import TrustedImages, disk_key
from mirenfs.engine.image import make_private_directory, replace_private_file, written_by_this_user_alone
from mirenfs.errors import (
    FOLDED_WHEN_REPEATED,
    CatalogUnreachableError,
    DiskBusyError,
    DiskElsewhereError,
    DiskExistsError,
    DiskNotFoundError,
    LeaseNotFoundError,
    MirenfsError,
    StoreError,
    UntrustedImageError,
    VolumeNotFoundError,
    printable,
)

log = logging.getLogger(__name__)

API_PATH = "/v3/"  # etcd >= 3.4 (Debian bookworm has 3.4); set, so no request is spent discovering it
WATCH_LAG_S = 2.0  # a watch that has not delivered a change etcd holds for this long is started again
REQUEST_TIMEOUT_S = 2.0  # per endpoint: a member without quorum answers only after ~7 s
CAS_ATTEMPTS = 64  # compare-and-swap rounds before a change gives up (each lost round is a change made)
RELEASED_LEASES_KEPT = 8  # a disk record keeps its latest released leases, for `disk list` (older ones go)
# Older released leases whose keys one binding deletes: etcd refuses a transaction of over 128
# operations (--max-txn-ops), and a disk that ran for a year had thousands (review D22 D1).
LEASE_KEYS_DROPPED_AT_ONCE = 64
PROBE_INTERVAL_S = 0.5
STALE_AFTER_S = 3.0
FIRST_SYNC_WAIT_S = REQUEST_TIMEOUT_S + 1.0
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^')\"]+)")
# OpenSSL's reason as Python's ssl module words it, up to where in _ssl.c it was found: "[SSL:
# CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, certificate is not valid
# for 'h'. (_ssl.c:1006)"
_TLS_TEXT = re.compile(r"\[(?:SSL|X509)(?:: [A-Z0-9_]+)?\] (.+?)(?: \(_ssl\.c:\d+\)|['\"]\)|$)")
_TLS_ENDED = "EOF occurred in violation of protocol"  # OpenSSL's words for a peer that hung up mid-handshake
_CLOSED_WITHOUT_ANSWER = "it closed the connection without an answer"
# The words of a handshake that etcd ended because of this host's certificate (or its absence):
# which one TLS 1.3 shows depends on timing (review S20), so they are taken as one.
_CLIENT_REFUSED = (
    "ended the handshake",
    "bad certificate",
    "certificate required",
    "unknown ca",
    "certificate unknown",
)


# --- the wire: base64 keys and values, revisions as strings ---


def _b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (its last byte plus one)."""
    data = bytearray(prefix.encode())
    data[-1] += 1
    return bytes(data).decode()


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int


def _key_value(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        _unb64(item["key"]).decode(),
        _unb64(item.get("value", "")),
        int(item.get("mod_revision", 0)),
        int(item.get("create_revision", 0)),
    )


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    ranges: list[list[KeyValue]]  # what each range request of the branch that ran found


def _missing(key: str) -> dict[str, Any]:
    """Compare: ``key`` does not exist (it was never created, or was deleted)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}


def _unchanged(key: str, mod_revision: int) -> dict[str, Any]:
    """Compare: ``key`` is still as it was read."""
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}


def _put(key: str, value: str | bytes) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value)}}


def _without_old_released(
    leases: Iterable[Lease], *, most: int | None = None
) -> tuple[tuple[Lease, ...], list[str]]:
    """``leases`` without the released ones older than the latest ``RELEASED_LEASES_KEPT`` (at
    most ``most`` of them, the oldest first), and the ids of those left out."""
    leases = tuple(leases)
    released = [lease.id for lease in leases if lease.status == LeaseState.RELEASED]
    dropped = released[: max(0, len(released) - RELEASED_LEASES_KEPT)][:most]
    gone = set(dropped)
    return tuple(lease for lease in leases if lease.id not in gone), dropped


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def _get(key: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def _why(exc: BaseException) -> str:
    """A short reason from whatever requests, urllib3 or the gateway said."""
    detail = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    if _TLS_ENDED in detail:
        return "TLS: etcd ended the handshake"
    tls = _TLS_TEXT.search(detail)
    if tls is not None:  # etcds://: see advised() for what to do
        return f"TLS: {tls.group(1).strip()}"
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = json.loads(detail).get("message") or json.loads(detail).get("error")
        if message:
            return str(message)
    if "timed out" in detail or isinstance(exc, etcd_errors.ConnectionTimeoutError):
        return "no answer in time"
    if "Remote end closed connection without response" in detail:
        return _CLOSED_WITHOUT_ANSWER
    found = _ERRNO_TEXT.search(detail)
    if found:
        return found.group(1).strip().lower()
    return detail.splitlines()[0][:200]


def advised(reason: str, tls: EtcdTls | None) -> str:
    """``reason`` (from :func:`_why`) with what to do about it where that depends on how this host
    speaks to etcd: a failed handshake, or etcd's gateway unable to reach etcd itself."""
    said = reason.lower()
    if tls is None:
        return (
            f"{reason} (as an etcd that speaks only TLS does: etcds://?)"
            if reason == _CLOSED_WITHOUT_ANSWER
            else reason
        )
    advice = None
    if "wrong version number" in said:
        advice = "it does not speak TLS there: is the catalogue etcd://, plain HTTP?"
    elif "verify failed" in said and "mismatch" in said:
        advice = "name each endpoint as etcd's certificate does (its subjectAltName)"
    elif "verify failed" in said and "expired" in said:
        advice = "etcd's certificate must be renewed"
    elif "verify failed" in said:
        advice = (
            f"set ${ETCD_CACERT_ENV} to the authority that signed etcd's certificate"
            if tls.ca_file is None
            else f"etcd's certificate is not signed by ${ETCD_CACERT_ENV} ({tls.ca_file})"
        )
    elif said.startswith("tls:") and any(words in said for words in _CLIENT_REFUSED):
        advice = (
            f"if etcd asks for a client certificate, set ${ETCD_CERT_ENV} and ${ETCD_KEY_ENV}; if it speaks "
            "plain HTTP there, the catalogue is etcd://"
            if tls.cert_file is None
            else f"etcd refused this host's certificate (${ETCD_CERT_ENV}, {tls.cert_file}): is it signed by "
            "an authority etcd trusts (its --trusted-ca-file), and still valid?"
        )
    elif said == "connection closed":  # the gateway's: it could not dial etcd's own gRPC port
        advice = (
            "etcd's gateway could not reach etcd; with --client-cert-auth, etcd's own certificate must "
            "also allow client use (extendedKeyUsage clientAuth)"
        )
    return f"{reason}; {advice}" if advice else reason


def _may_have_arrived(exc: BaseException) -> bool:
    """Whether a request that failed so may have reached etcd: its answer timed out or was cut
    off. Not when the connection was never made (review S: a connect timeout, the usual sign of
    a partition, was said to be "received")."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    errors = requests.exceptions
    if any(isinstance(e, errors.ConnectTimeout) for e in chain):
        return False
    if any(isinstance(e, (errors.ReadTimeout, errors.ChunkedEncodingError)) for e in chain):
        return True
    text = " ".join(str(e) for e in chain)
    if "refused" in text or "not known" in text or "unreachable" in text.lower():
        return False
    cut_off = ("prematurely", "reset by peer", "aborted", "RemoteDisconnected")
    return any(word in text for word in cut_off) or _why(exc) == "no answer in time"


def _from_etcd(exc: etcd_errors.Etcd3Exception) -> bool:
    """Whether a refusal came from etcd's gateway, which explains itself in JSON (``code`` and
    ``message`` or ``error``); anything else answered from a server that is not one."""
    with contextlib.suppress(ValueError, TypeError):
        body = json.loads(exc.detail_text or "")
        return isinstance(body, dict) and "code" in body and ("message" in body or "error" in body)
    return False


class Unreachable(CatalogUnreachableError):
    """No endpoint answered; ``why`` says what each one did."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"the disk catalogue at {url} is unreachable ({why})")
        self.why = why


class ClusterPin:
    """The etcd cluster a data path's catalogue is in, by its cluster id, kept in
    ``<data-path>/mirenfs/etcd-clusters.json`` per prefix with the endpoints it was learnt
    through: a member of another cluster in the endpoint list (a typo, an address reused)
    answers as an empty catalogue, and moving to it on a stall made disks vanish from the mount
    and let a restore create a second disk of a name (trial W). Its answers count as no
    answer, with the reason.

    The cluster is learnt once most of the endpoints answer for it (trial W2: the first answer
    was taken, a wrong cluster's too). A record applies to a list of endpoints that shares one
    with the list it was learnt through (review S2: an edited list forgot it); a list sharing
    none is another catalogue (a move to a new cluster), learnt afresh. A removed record is
    noticed by a running process too (after an etcd restored from a snapshot)."""

    FILE = ETCD_CLUSTERS_FILE

    def __init__(
        self, data_path: str | None, location: EtcdLocation, survey: Callable[[], list[str | None]]
    ) -> None:
        self.path = None if data_path is None else os.path.join(state_directory(data_path), self.FILE)
        self.prefix = location.prefix
        self.endpoints = sorted(f"{host}:{port}" for host, port in location.endpoints)
        self._survey = survey  # the cluster id each endpoint answers for (None: no answer)
        self._lock = threading.Lock()
        self._cluster: str | None = None

    def mismatch(self, cluster_id: object) -> str | None:
        """Why an answer from cluster ``cluster_id`` is not this catalogue's, or None."""
        if cluster_id is None or cluster_id == "":
            return None
        cluster = str(cluster_id)
        with self._lock:
            if self._cluster == cluster:
                return None
            self._cluster = self._recorded()  # (again: it may have been removed)
            if self._cluster is None:
                answers = self._survey()
                self._cluster = _most_of(answers)
                if self._cluster is None:
                    named = ", ".join(sorted({answer or "none" for answer in answers}))
                    return (
                        "it cannot be told yet which etcd cluster the catalogue is in: most of its endpoints "
                        f"must answer for one cluster first (they answered for {named})"
                    )
                self._record(self._cluster)
            if cluster == self._cluster:
                return None
            recorded = f" (recorded in {self.path})" if self.path is not None else ""
            return (
                f"a member of etcd cluster {cluster}, not of cluster {self._cluster} that this catalogue is "
                f"in{recorded}: fix the endpoint list"
                + (", or remove that file if the catalogue moved to a new cluster" if recorded else "")
            )

    def _recorded(self) -> str | None:
        entry = self._read().get(self.prefix)
        if not isinstance(entry, dict) or not set(entry.get("endpoints", [])) & set(self.endpoints):
            return None
        cluster = entry.get("cluster")
        return str(cluster) if cluster else None

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, encoding="utf-8") as f:
                info = os.fstat(f.fileno())
                if not written_by_this_user_alone(info):
                    # review Sec F7: another user's file chose which etcd cluster this host trusts
                    log.warning(
                        "%s is not a file of this user alone: the etcd cluster is asked again", self.path
                    )
                    return {}
                saved = json.load(f)
            return saved if isinstance(saved, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): the etcd cluster is asked of the endpoints", self.path, exc)
            return {}

    def _record(self, cluster: str) -> None:
        if self.path is None:
            return
        entry = {"cluster": cluster, "endpoints": self.endpoints}
        try:
            make_private_directory(os.path.dirname(self.path))
            replace_private_file(self.path, json.dumps({**self._read(), self.prefix: entry}).encode())
        except OSError as exc:  # a user who may not write there: pinned for this process only
            log.debug("cannot record the etcd cluster in %s: %s", self.path, exc)


class _OwnAuthoritySession(requests.Session):
    """A session whose own authority stands: requests lets ``$REQUESTS_CA_BUNDLE`` (set on many
    hosts, to the system's bundle) override a session's ``verify`` (psf/requests#3829), and
    etcd's certificate, signed by the fleet's own authority, failed to verify."""

    def merge_environment_settings(
        self, url: str, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self.verify if verify is None or verify is True else verify
        return settings


def _tls_session(tls: EtcdTls) -> requests.Session:
    """A session for an etcds:// catalogue: its authority (else the usual ones), and this host's
    certificate if one is given."""
    session = requests.Session() if tls.ca_file is None else _OwnAuthoritySession()
    if tls.ca_file is not None:
        session.verify = tls.ca_file
    if tls.cert_file is not None and tls.key_file is not None:
        session.cert = (tls.cert_file, tls.key_file)
    return session


def _most_of(answers: list[str | None]) -> str | None:
    """The cluster more than half of the endpoints answer for, or None."""
    for candidate in {answer for answer in answers if answer is not None}:
        if sum(answer == candidate for answer in answers) * 2 > len(answers):
            return candidate
    return None


class EtcdKV:
    """Requests to one etcd cluster through its JSON gateway, trying each endpoint in turn.

    A request that no endpoint answers raises :class:`CatalogUnreachableError`;
    one etcd refuses (a malformed request) raises :class:`StoreError`. Each
    thread has its own clients: a requests session is not made to be shared.
    """

    def __init__(self, location: EtcdLocation, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.location = location
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._preferred = 0  # the endpoint that answered last: asked first next time
        self._pin = ClusterPin(None, location, self.survey)  # this process's; pin_to: a data path's

    def client(self, endpoint: int) -> Etcd3Client:
        clients: list[Etcd3Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            tls = self.location.tls
            clients = [
                Etcd3Client(
                    host=host,
                    port=port,
                    protocol="http" if tls is None else "https",
                    timeout=self.timeout_s,
                    api_path=API_PATH,
                    session=None if tls is None else _tls_session(tls),  # None: a plain one of its own
                )
                for host, port in self.location.endpoints
            ]
            self._local.clients = clients
        return clients[endpoint]

    def pin_to(self, pin: ClusterPin) -> None:
        self._pin = pin

    def survey(self) -> list[str | None]:
        """The cluster id each endpoint answers for, asked of each directly: None for one that
        does not answer (a stalled member may be the catalogue's); left out, one that answers
        as no etcd gateway does (another server there is no member of any cluster)."""
        answers: list[str | None] = []
        for index in range(len(self.location.endpoints)):
            client = self.client(index)
            try:
                answer = client.post(client.get_url("maintenance/status"), json={})
            except ValueError:  # an answer that is not JSON: not an etcd gateway
                continue
            except etcd_errors.Etcd3Exception as exc:
                if not _from_etcd(exc) and not isinstance(
                    exc, (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError)
                ):
                    continue  # a 404 page, say
                answer = None
            except Exception:  # whatever else: this endpoint did not answer
                answer = None
            cluster = answer.get("header", {}).get("cluster_id") if isinstance(answer, dict) else None
            answers.append(None if cluster in (None, "") else str(cluster))
        return answers

    def unreachable(self, why: str) -> Unreachable:
        return Unreachable(self.location.url, why)

    def post(
        self, path: str, payload: dict[str, Any], *, endpoint: int | None = None
    ) -> tuple[dict[str, Any], int]:
        """The gateway's answer to ``payload`` at ``/v3/PATH``, and the endpoint that gave it.

        ``endpoint`` pins the request to one member (the watch's, for its probe).
        """
        count = len(self.location.endpoints)
        order = [endpoint] if endpoint is not None else [(self._preferred + i) % count for i in range(count)]
        problems = []
        sent = False  # a member may have it: it got the request and did not answer in time
        for index in order:
            client = self.client(index)
            host, port = self.location.endpoints[index]
            try:
                answer = client.post(client.get_url(path), json=payload)
            except (
                etcd_errors.ConnectionFailedError,
                etcd_errors.ConnectionTimeoutError,
                etcd_errors.InternalServerError,
                requests.RequestException,
                ValueError,  # an answer that is not JSON: not an etcd gateway there
            ) as exc:
                sent = sent or _may_have_arrived(exc)
                problems.append(f"{host}:{port}: {advised(_why(exc), self.location.tls)}")
                continue
            except etcd_errors.Etcd3Exception as exc:
                if not _from_etcd(exc):  # a 404 page, say: another server there; try the next member
                    said = str(exc.args[0]) if exc.args else _why(exc)  # the HTTP reason: Not Found
                    problems.append(f"{host}:{port}: not an etcd gateway (it answered {said})")
                    continue
                raise StoreError(
                    f"the disk catalogue at {self.location.url} refused a request ({_why(exc)})"
                ) from None
            if not isinstance(answer, dict):
                problems.append(f"{host}:{port}: an answer that is not an etcd gateway's")
                continue
            other_cluster = self._pin.mismatch(answer.get("header", {}).get("cluster_id"))
            if other_cluster is not None:  # trial W: an empty prefix there was taken for the catalogue
                problems.append(f"{host}:{port}: {other_cluster}")
                continue
            self._preferred = index
            return answer, index
        unreachable = self.unreachable("; ".join(problems))
        unreachable.maybe_applied = sent and path == "kv/txn"
        raise unreachable

    def range(
        self, key: str, *, prefix: bool = False, limit: int | None = None, endpoint: int | None = None
    ) -> tuple[int, list[KeyValue], int]:
        """The keys (``prefix``: every key starting with ``key``): (revision, keys, endpoint)."""
        payload: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            payload["range_end"] = _b64(_prefix_end(key))
        if limit is not None:
            payload["limit"] = str(limit)
        answer, served = self.post("kv/range", payload, endpoint=endpoint)
        revision = int(answer.get("header", {}).get("revision", 0))
        return revision, [_key_value(item) for item in answer.get("kvs", [])], served

    def newest(self, prefix: str, *, endpoint: int | None = None) -> tuple[int, int]:
        """How many keys start with ``prefix``, and the newest revision any of them was changed at
        (one linearizable request that returns no values)."""
        payload: dict[str, Any] = {
            "key": _b64(prefix),
            "range_end": _b64(_prefix_end(prefix)),
            "limit": "1",
            "sort_order": "DESCEND",
            "sort_target": "MOD",
            "keys_only": True,
        }
        answer, _ = self.post("kv/range", payload, endpoint=endpoint)
        kvs = answer.get("kvs", [])
        return int(answer.get("count", 0) or 0), int(kvs[0].get("mod_revision", 0)) if kvs else 0

    def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> TxnResult:
        answer, _ = self.post(
            "kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}
        )
        ranges = [
            [_key_value(item) for item in response["response_range"].get("kvs", [])]
            for response in answer.get("responses", [])
            if "response_range" in response
        ]
        revision = int(answer.get("header", {}).get("revision", 0))
        return TxnResult(bool(answer.get("succeeded", False)), revision, ranges)


# --- one disk as etcd holds it ---


@dataclass(frozen=True)
class _Stored:
    """A disk record read from etcd, with the revision a change must compare against."""

    disk: Disk
    volume: Volume | None
    leases: tuple[Lease, ...]
    created_ns: int
    updated_ns: int
    mod_revision: int = 0

    def encode(self) -> str:
        volume = self.volume
        return json.dumps(
            {
                "id": self.disk.id,
                "name": self.disk.name,
                "status": self.disk.status.value,
                "filesystem": self.disk.filesystem,
                "size_bytes": self.disk.size_bytes,
                "created_ns": self.created_ns,
                "updated_ns": self.updated_ns,
                "volume": None
                if volume is None
                else {
                    "id": volume.id,
                    "node": volume.node,
                    "image_path": volume.image_path,
                    "status": volume.status.value,
                },
                "leases": [{"id": lease.id, "status": lease.status.value} for lease in self.leases],
            },
            sort_keys=True,
        )


_PRINTABLE_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII but space


def _node_of(raw: object) -> str | None:
    """A volume's node; absent, null or "" (what Go writes for none, review S3) is none."""
    return None if raw is None or raw == "" else str(raw)


def _decode(name: str, value: bytes, mod_revision: int) -> _Stored:
    """Parse a disk record; statuses in any of Miren's spellings. ValueError if it is damaged."""
    try:
        fields = json.loads(value)
        disk = Disk(
            str(fields["id"]),
            str(fields.get("name", name)),
            DiskState(fields["status"]),
            str(fields["filesystem"]),
            int(fields["size_bytes"]),
        )
        raw_volume = fields.get("volume")
        volume = (
            None
            if raw_volume is None
            else Volume(
                str(raw_volume["id"]),
                disk.id,
                None if raw_volume.get("image_path") is None else str(raw_volume["image_path"]),
                VolumeState(raw_volume.get("status", VolumeState.PROVISIONED.value)),
                _node_of(raw_volume.get("node")),
            )
        )
        leases = tuple(
            Lease(str(item["id"]), disk.id, LeaseState(item["status"])) for item in fields.get("leases") or ()
        )
        created_ns, updated_ns = int(fields.get("created_ns", 0)), int(fields.get("updated_ns", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if disk.name != name:
        raise ValueError(f"the record names disk {disk.name!r}")
    _refuse_what_no_host_writes(disk, volume, leases)
    return _Stored(disk, volume, leases, created_ns, updated_ns, mod_revision)


def _refuse_what_no_host_writes(disk: Disk, volume: Volume | None, leases: tuple[Lease, ...]) -> None:
    """Fields a record prints or a host acts on, which anyone with the prefix can write: a node
    name is a node name, an id prints as itself, a size is not negative (review Sec F5: escape
    sequences in a node name or lease id cleared the screen of `disk list` and the log's)."""
    if disk.size_bytes < 0:
        raise ValueError(f"its size is negative ({disk.size_bytes})")
    ids = [("disk id", disk.id), *(("lease id", lease.id) for lease in leases)]
    if volume is not None:
        ids.append(("volume id", volume.id))
        if volume.node is not None:
            try:
                validate_node_name(volume.node)
            except MirenfsError:
                raise ValueError(f"its node {printable(volume.node)} is not a node name") from None
    for what, value in ids:
        if not _PRINTABLE_ID.fullmatch(value):
            raise ValueError(f"its {what} {printable(value)} is not one (1-128 printable ASCII characters)")


# --- the catalogue ---


# What an edit of a disk record returns: the new record, and what else the transaction must
# compare and do (a lease's index key); None when nothing needs to change.
Change = tuple[_Stored, list[dict[str, Any]], list[dict[str, Any]]]
Edit = Callable[[_Stored], Change | None]


class EtcdCatalog:
    """The disks of a fleet on etcd, as one host (``node``, with its ``data_path``) sees them.

    Implements :class:`~mirenfs.disks.model.Catalog`. Blocking: every call is
    one or a few HTTP requests; call it from worker threads in trio.
    """

    def __init__(
        self, location: EtcdLocation, data_path: str, *, node: str, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.location = location
        self.data_path = os.path.abspath(data_path)
        self.node = validate_node_name(node)
        self.kv = EtcdKV(location, timeout_s=timeout_s)
        self.kv.pin_to(ClusterPin(self.data_path, location, self.kv.survey))
        self.trusted = TrustedImages(self.data_path)  # images outside the data path this host registered
        self._root = location.root
        # Disk id -> name, as records are read (a disk's name never changes): the resolver's
        # "by disk id" lookups follow a lookup by name, and then cost one request, not two.
        self._names: dict[str, str] = {}
        self._key_created: dict[str, int] = {}  # disk id -> its key's create revision, as read

    def __repr__(self) -> str:
        return f"EtcdCatalog({self.location.url}, node={self.node}, data_path={self.data_path})"

    # --- keys ---

    @property
    def disks_prefix(self) -> str:
        return f"{self._root}disks/"

    def _disk_key(self, name: str) -> str:
        return f"{self.disks_prefix}{name}"

    def _id_key(self, disk_id: str) -> str:
        return f"{self._root}ids/{disk_id}"

    def _lease_key(self, lease_id: str) -> str:
        return f"{self._root}leases/{lease_id}"

    def _image_key(self, node: str, image_path: str) -> str:
        return f"{self._root}images/{node}/{hashlib.sha256(image_path.encode()).hexdigest()}"

    # --- reading ---

    def _parse(self, name: str, item: KeyValue) -> _Stored:
        """The record under ``item``; StoreError when it is damaged or its key is not a disk name."""
        stored = self._decode(name, item)
        self._names[stored.disk.id] = name
        return stored

    def _check_trusted(self, stored: _Stored, volume: Volume) -> None:
        """Refuse (UntrustedImageError) an image on this node outside the data path that this host never
        registered, or one under it that is a file mirenfs keeps there (the store, its state, the
        managed volumes, where another disk's image lies: review): whoever can write the catalogue
        must not choose what this host reads or replaces."""
        explicit = volume.image_path
        if not explicit or not os.path.isabs(explicit):
            return
        name, image = stored.disk.name, printable(explicit)
        kept = what_the_data_path_keeps_at(explicit, self.data_path, ())
        if kept is not None:
            raise UntrustedImageError(
                f"disk {name} in the disk catalogue at {self.location.url} names the image {image} on this "
                f"node ({self.node}), which is {kept.said}, so mirenfs neither reads nor replaces it "
                f"through disk {name}: fix the record {self._disk_key(name)}"
            )
        if not self.trusted.allows(explicit, disk_key(stored.disk.id, stored.disk.name)):
            raise UntrustedImageError(
                f"disk {name} in the disk catalogue at {self.location.url} names the image {image} on this "
                f"node ({self.node}), and this host never registered that path for disk {name}, so "
                "mirenfs neither reads nor replaces it: if it is this host's image of that disk, register "
                f"it with 'mirenfs disk add {name} --image {image}', else fix the record "
                f"{self._disk_key(name)}"
            )

    def _decode(self, name: str, item: KeyValue) -> _Stored:
        try:
            validate_disk_name(name)
        except MirenfsError as exc:
            raise StoreError(
                f"the disk catalogue at {self.location.url} holds a record under the key "
                f"{printable(item.key)}, whose name is not a disk's ({exc}); delete that key"
            ) from None
        try:
            stored = _decode(name, item.value, item.mod_revision)
        except ValueError as exc:
            raise StoreError(
                f"the disk catalogue at {self.location.url} holds a damaged record for disk {name} ({exc}); "
                f"fix or delete the key {item.key}"
            ) from None
        self._key_created[stored.disk.id] = item.create_revision  # which of two records came first
        return stored

    def _load(self, name: str) -> _Stored | None:
        validate_disk_name(name)
        _, found, _ = self.kv.range(self._disk_key(name))
        return self._parse(name, found[0]) if found else None

    def _load_existing(self, name: str) -> _Stored:
        stored = self._load(name)
        if stored is None:
            raise DiskNotFoundError(name)
        return stored

    def _name_of(self, disk_id: str) -> str | None:
        """The name of disk ``disk_id``: known from a record read before, or from its index key, or
        (a record another writer put, without our index) by reading every record."""
        known = self._names.get(disk_id)
        if known is not None:
            return known
        _, found, _ = self.kv.range(self._id_key(disk_id))
        if found:
            return found[0].value.decode()
        self.list_disks()  # fills self._names
        return self._names.get(disk_id)

    def _load_by_id(self, disk_id: str) -> _Stored | None:
        name = self._name_of(disk_id)
        stored = None if name is None else self._load(name)
        if stored is not None and stored.disk.id != disk_id:  # that name is another disk's now
            self._names.pop(disk_id, None)
            return None
        return stored

    def record_of(self, stored: _Stored, *, quiet: bool = False) -> DiskRecord:
        """The disk as this host sees it: local or not, and its image path here (``quiet``: an
        image it does not use is not said, as a listing says it)."""
        volume = stored.volume
        local = volume is not None and volume.node == self.node
        image_path: str | None = None
        if local and volume is not None:
            try:
                self._check_trusted(stored, volume)
                image_path = image_path_for(self.data_path, volume)
            except UntrustedImageError as exc:  # every listing meets it: once a minute in a mount's log
                if not quiet:
                    log.warning("%s", exc, extra=FOLDED_WHEN_REPEATED)
            except MirenfsError as exc:
                if not quiet:
                    log.warning("disk %s: %s", stored.disk.name, exc, extra=FOLDED_WHEN_REPEATED)
        return DiskRecord(stored.disk, volume, image_path, stored.leases, local)

    def record_from(self, name: str, item: KeyValue) -> DiskRecord:
        return self.record_of(self._parse(name, item))

    # --- DiskResolver ---

    def find_disk_by_name(self, name: str) -> Disk:
        return self._load_existing(name).disk

    def find_volume_by_disk_id(self, disk_id: str) -> Volume:
        stored = self._load_by_id(disk_id)
        if stored is None or stored.volume is None:
            raise VolumeNotFoundError(
                f"disk {disk_id} has no volume in the disk catalogue at {self.location.url}; "
                "remove and re-add the disk"
            )
        volume = stored.volume
        if volume.node != self.node:
            where = volume.node or "(none recorded)"
            raise DiskElsewhereError(
                f"disk {stored.disk.name} is on node {where}, not on this node ({self.node}): "
                f"back it up, restore or remove it through node {where}"
            )
        self._check_trusted(stored, volume)
        sharing = self._shared_images().get(disk_id)
        if sharing is not None:
            clause, _several = sharing
            raise UntrustedImageError(
                f"{clause}, on this node ({self.node}) in the disk catalogue at {self.location.url}; one "
                f"image never backs two disks, so mirenfs neither reads, replaces nor removes it through "
                f"disk {stored.disk.name}: fix its record (copied from another, or pointed at its image)"
            )
        return volume

    def find_leases_by_disk_id(self, disk_id: str) -> list[Lease]:
        stored = self._load_by_id(disk_id)
        return [] if stored is None else list(stored.leases)

    # --- DiskCreator ---

    def create_disk_for_restore(
        self, name: str, *, size_bytes: int, filesystem: str, disk_id: str | None = None
    ) -> CreatedRecords:
        records = new_disk_records(
            name,
            size_bytes=size_bytes,
            filesystem=filesystem,
            status=DiskState.PROVISIONING,
            image_path=None,
            node=self.node,
            disk_id=disk_id,
        )
        return CreatedRecords(self, *self._insert(*records))

    def update_disk(self, disk_id: str, *, size_bytes: int, filesystem: str) -> None:
        """A restore installed a new image: record its size and filesystem; ``provisioning`` ends."""
        name = self._name_of(disk_id)
        if name is None:
            return

        def edit(stored: _Stored) -> Change | None:
            if stored.disk.id != disk_id:
                return None
            status = (
                DiskState.PROVISIONED if stored.disk.status == DiskState.PROVISIONING else stored.disk.status
            )
            disk = replace(stored.disk, size_bytes=size_bytes, filesystem=filesystem, status=status)
            volume = None if stored.volume is None else replace(stored.volume, status=VolumeState.PROVISIONED)
            return replace(stored, disk=disk, volume=volume), [], []

        with contextlib.suppress(DiskNotFoundError):
            self._update(name, edit)

    # --- management ---

    def check(self) -> None:
        """The data path must be writable and the catalogue reachable (with quorum)."""
        check_data_path(self.data_path)
        self.kv.range(self.disks_prefix, prefix=True, limit=1)

    def add_disk(
        self,
        name: str,
        *,
        size_bytes: int,
        filesystem: str,
        status: DiskState = DiskState.PROVISIONED,
        image_path: str | None = None,
        disk_id: str | None = None,
    ) -> DiskRecord:
        records = new_disk_records(
            name,
            size_bytes=size_bytes,
            filesystem=filesystem,
            status=status,
            image_path=image_path,
            node=self.node,
            disk_id=disk_id,
        )
        if image_path is None:
            disk, volume = self._insert(*records)
        else:
            with self.trusted.registering(
                image_path, disk_key(records[0].id, name)
            ):  # by this host's operator
                disk, volume = self._insert(*records)
        return DiskRecord(disk, volume, image_path_for(self.data_path, volume), ())

    def adopt_image(self, name: str, image_path: str) -> bool:
        """Register ``image_path`` on this host when disk ``name``'s record (written by another
        host or tool) names exactly that image on this node; False when it does not."""
        _, found, _ = self.kv.range(self._disk_key(validate_disk_name(name)))
        if not found:
            return False
        volume = self._decode(name, found[0]).volume
        if volume is None or volume.node != self.node or not volume.image_path:
            return False
        if os.path.normpath(volume.image_path) != os.path.normpath(image_path):
            return False
        self.trusted.register(image_path, disk_key(volume.disk_id, name))
        # A new revision of the record (same content): mounts that refused it read it again.
        self._update(name, lambda stored: (stored, [], []))
        return True

    def _insert(self, disk: Disk, volume: Volume) -> tuple[Disk, Volume]:
        """One transaction: it succeeds only while the name (and id, and explicit image) is free."""
        name, image_path = disk.name, volume.image_path
        now = time.time_ns()
        stored = _Stored(disk, volume, (), now, now)
        key, id_key = self._disk_key(name), self._id_key(disk.id)
        compare = [_missing(key), _missing(id_key)]
        success = [_put(key, stored.encode()), _put(id_key, name)]
        failure = [_get(key)]
        if image_path is not None:
            image_key = self._image_key(self.node, image_path)
            compare.append(_missing(image_key))
            success.append(_put(image_key, disk.id))
            failure.append(_get(image_key))
        result = self.kv.txn(compare, success, failure)
        if result.succeeded:
            return disk, volume
        holder = result.ranges[0] if result.ranges else []
        if holder:
            existing = self._parse(name, holder[0])
            if existing.disk.id == disk.id:
                return disk, volume  # our own creation, answered late and sent again to another member
            raise DiskExistsError(
                f"a disk named {name} already exists ({self._whereabouts(existing)}); pick another name"
            )
        owner = result.ranges[1] if len(result.ranges) > 1 else []
        if owner:
            owner_id = owner[0].value.decode()
            owner_name = self._name_of(owner_id) or owner_id
            raise DiskExistsError(
                f"the image {image_path} already belongs to disk {owner_name}; "
                "one image cannot back two disks"
            )
        raise StoreError(
            f"disk {name} could not be created in the disk catalogue at {self.location.url}; try again"
        )

    def _whereabouts(self, stored: _Stored) -> str:
        """Where a disk's image is, in a few words: names are global, so a clash may be elsewhere."""
        node = stored.volume.node if stored.volume is not None else None
        if node is None:
            return "with no image on any node"
        return f"on this node, {node}" if node == self.node else f"on node {node}"

    def _update(self, name: str, edit: Edit) -> tuple[_Stored, _Stored]:
        """Compare-and-swap on the disk's record: read it, ``edit`` it (None: nothing to change),
        write it only if nobody changed it since; again on a conflict. Returns (before, after)."""
        key = self._disk_key(name)
        for _ in range(CAS_ATTEMPTS):
            current = self._load_existing(name)
            change = edit(current)
            if change is None:
                return current, current
            new, compare, success = change
            new = replace(new, updated_ns=time.time_ns())
            result = self.kv.txn(
                [_unchanged(key, current.mod_revision), *compare], [_put(key, new.encode()), *success]
            )
            if result.succeeded:
                return current, replace(new, mod_revision=result.revision)
        raise StoreError(
            f"disk {name} changed {CAS_ATTEMPTS} times while this change was being made; try again"
        )

    def set_disk_status(self, name: str, status: DiskState | str) -> tuple[DiskState, DiskState]:
        try:
            new_status = DiskState(status)
        except ValueError:
            choices = ", ".join(member.value for member in DiskState)
            raise MirenfsError(f"{status!r} is not a disk status; use one of {choices}") from None

        def edit(stored: _Stored) -> Change | None:
            if stored.disk.status == new_status:
                return None
            return replace(stored, disk=replace(stored.disk, status=new_status)), [], []

        before, _ = self._update(name, edit)
        return before.disk.status, new_status

    def mark_provisioned(self, disk_id: str) -> bool:
        name = self._name_of(disk_id)
        if name is None:
            return False

        def edit(stored: _Stored) -> Change | None:
            if stored.disk.id != disk_id:
                raise DiskNotFoundError(name)
            volume = None if stored.volume is None else replace(stored.volume, status=VolumeState.PROVISIONED)
            return (
                replace(stored, disk=replace(stored.disk, status=DiskState.PROVISIONED), volume=volume),
                [],
                [],
            )

        try:
            self._update(name, edit)
        except DiskNotFoundError:
            return False
        return True

    def delete_disk_records(self, disk_id: str) -> bool:
        name = self._name_of(disk_id)
        if name is None:
            return False
        key = self._disk_key(name)
        for _ in range(CAS_ATTEMPTS):
            stored = self._load(name)
            if stored is None or stored.disk.id != disk_id:
                return False
            success = [_delete(key), _delete(self._id_key(disk_id))]
            success += [_delete(self._lease_key(lease.id)) for lease in stored.leases]
            volume = stored.volume
            if volume is not None and volume.image_path and volume.node:
                success.append(_delete(self._image_key(volume.node, volume.image_path)))
            if self.kv.txn([_unchanged(key, stored.mod_revision)], success).succeeded:
                return True
        raise StoreError(f"disk {name} changed {CAS_ATTEMPTS} times while it was being removed; try again")

    def acquire_lease(self, name: str) -> Lease:
        """A ``bound`` lease, bound only on the disk as it was checked (not deleting, no other bound)."""
        lease_id = new_id("lease")
        lease_key = self._lease_key(lease_id)

        def edit(stored: _Stored) -> Change | None:
            bound = [lease for lease in stored.leases if lease.status == LeaseState.BOUND]
            if any(lease.id == lease_id for lease in bound):
                return None  # bound by an earlier round of this very call
            if stored.disk.status == DiskState.DELETING:
                raise DiskBusyError(f"disk {name} is being deleted; it cannot be leased")
            if bound:
                raise DiskBusyError(
                    f"disk {name} is already leased (lease {bound[0].id} is bound); release it first"
                )
            lease = Lease(lease_id, stored.disk.id, LeaseState.BOUND)
            reference = json.dumps({"disk_id": stored.disk.id, "name": name})
            # Released leases beyond the latest few go, with their keys: every cycle grew the
            # record, which every change rewrites, towards etcd's request limit (trial E22 E7).
            kept, dropped = _without_old_released(stored.leases, most=LEASE_KEYS_DROPPED_AT_ONCE)
            return (
                replace(stored, leases=(*kept, lease)),
                [_missing(lease_key)],
                [_put(lease_key, reference), *(_delete(self._lease_key(old)) for old in dropped)],
            )

        try:
            _, after = self._update(name, edit)
        except CatalogUnreachableError as exc:  # its id is ours: said, so that it can be released
            exc.add_if_maybe_applied(
                f"lease {lease_id} of disk {name} may have been bound all the same: once the catalogue "
                f"answers, see `mirenfs disk list`, and release it with `mirenfs lease release {lease_id}` "
                "if it is bound"
            )
            raise
        return Lease(lease_id, after.disk.id, LeaseState.BOUND)

    def release_lease(self, lease_id: str) -> tuple[Lease, str, bool]:
        _, found, _ = self.kv.range(self._lease_key(lease_id))
        not_found = LeaseNotFoundError(f"there is no lease {lease_id}; see `mirenfs disk list`")
        if found:
            try:
                reference = json.loads(found[0].value)
                name, disk_id = str(reference["name"]), str(reference["disk_id"])
            except (ValueError, KeyError, TypeError):
                raise StoreError(
                    f"the disk catalogue holds a damaged reference for lease {lease_id}"
                ) from None
        else:  # a record another writer put, without our index key (review): found by reading them all
            holder = next(
                (
                    record
                    for record in self.list_disks()
                    if any(lease.id == lease_id for lease in record.leases)
                ),
                None,
            )
            if holder is None:
                raise not_found
            name, disk_id = holder.disk.name, holder.disk.id

        def edit(stored: _Stored) -> Change | None:
            if stored.disk.id != disk_id or not any(lease.id == lease_id for lease in stored.leases):
                raise not_found
            if all(lease.status == LeaseState.RELEASED for lease in stored.leases if lease.id == lease_id):
                return None
            leases = tuple(
                replace(lease, status=LeaseState.RELEASED) if lease.id == lease_id else lease
                for lease in stored.leases
            )
            return replace(stored, leases=leases), [], []

        try:
            before, after = self._update(name, edit)
        except DiskNotFoundError:
            raise not_found from None
        changed = before is not after
        return Lease(lease_id, disk_id, LeaseState.RELEASED), name, changed

    def get_disk(self, name: str) -> DiskRecord:
        record = self.record_of(self._load_existing(name))
        if record.image_path is None:
            return record
        return replace(record, image_path=None) if record.disk.id in self._shared_images() else record

    def _shared_images(self) -> dict[str, tuple[str, bool]]:
        """:func:`_sharing_an_image` over every record (one request), quietly: a record this host
        does not use (untrusted) shares nothing, and is said by listings."""
        records = [self.record_of(stored, quiet=True) for stored in self._every_stored()]
        return _sharing_an_image(records, self._key_created)

    def _every_stored(self) -> list[_Stored]:
        """Every record that can be read (one request): a damaged one is left out here."""
        _, found, _ = self.kv.range(self.disks_prefix, prefix=True)
        stored = []
        for item in found:
            with contextlib.suppress(StoreError):
                stored.append(self._decode(item.key[len(self.disks_prefix) :], item))
        return stored

    def list_disks(self) -> list[DiskRecord]:
        """Every disk of every node, by name (one request); a damaged record is skipped, and said."""
        _, found, _ = self.kv.range(self.disks_prefix, prefix=True)
        records = []
        for item in found:
            name = item.key[len(self.disks_prefix) :]
            try:
                records.append(self.record_from(name, item))
            except StoreError as exc:
                log.warning("%s", exc)
        return self.refuse_shared_images(sorted(records, key=lambda record: record.disk.name))

    def refuse_shared_images(self, records: list[DiskRecord]) -> list[DiskRecord]:
        """Records of this node that lead to one image file (a copied record, two volume ids of one
        path) are shown without an image: a restore or removal through one of them replaced or
        deleted the other's image past its lease and its `attached` state (trial W). Said, folded."""
        shared = _sharing_an_image(records, self._key_created)
        for clause, several in set(shared.values()):
            log.warning(
                "%s, on this node (%s) in the disk catalogue at %s; one image never backs two disks, so "
                "mirenfs neither reads, replaces nor removes it through %s: fix the record%s (copied from "
                "another, or pointed at its image)",
                clause,
                self.node,
                self.location.url,
                "them" if several else "it",
                "s" if several else "",
                extra=FOLDED_WHEN_REPEATED,
            )
        if not shared:
            return records
        return [replace(r, image_path=None) if r.disk.id in shared else r for r in records]

    def forget_registered_image(self, image_path: str, removed: str | None = None) -> None:
        """After disk ``removed`` (its :func:`disk_key`), whose image this host registered, was
        removed: the registration goes too. One an older mirenfs made for no disk stays while
        another disk of this node names that path."""
        path = os.path.normpath(image_path)
        if removed is not None and self.trusted.bound_to(path) == removed:
            self.trusted.unregister(path)  # review S3: a record that copied the id kept it
            return
        still = [
            stored
            for stored in self._every_stored()
            if stored.volume is not None
            and stored.volume.node == self.node
            and stored.volume.image_path
            and os.path.normpath(stored.volume.image_path) == path
        ]
        if not still:
            self.trusted.unregister(path)

    def explicit_image_paths(self) -> list[str]:
        """This node's images at their own paths, for the staging sweep: only trusted ones (the
        sweep removes ``<image>.restore.tmp`` files, and a record must not choose where)."""
        return [
            record.image_path
            for record in self.list_disks()
            if record.local and record.volume is not None and record.volume.image_path and record.image_path
        ]

    def put_record(self, record: DiskRecord) -> str:
        """Write a disk as another catalogue has it (``catalog copy``), ids kept; a volume without a
        node is this node's. ``added``, ``unchanged``, or ``differs``: a record of that disk is here
        already and is not the source's, and it is left alone (it may hold a newer lease or status)."""
        name = validate_disk_name(record.disk.name)
        volume = record.volume
        if volume is not None and volume.node is None:
            volume = replace(volume, node=self.node)
        now = time.time_ns()
        # A SQLite store keeps every lease: its old released ones stay there (review D22 D1: a disk
        # of 150 leases made one transaction over etcd's 128 operations, and no copy went through).
        leases, _dropped = _without_old_released(record.leases)
        wanted = _Stored(record.disk, volume, leases, now, now)
        key, id_key = self._disk_key(name), self._id_key(record.disk.id)
        indexes = [_put(id_key, name)] + [
            _put(self._lease_key(lease.id), json.dumps({"disk_id": record.disk.id, "name": name}))
            for lease in leases
        ]
        image_key = None
        if volume is not None and volume.image_path and volume.node:
            image_key = self._image_key(volume.node, volume.image_path)
            indexes.append(_put(image_key, record.disk.id))
        for _ in range(CAS_ATTEMPTS):
            current = self._load(name)
            if current is None:
                compare = [_missing(key)]
                if image_key is not None:  # review: two disks on one image, by a copy
                    compare.append(self._image_free_for(image_key, record))
                if self.kv.txn(compare, [_put(key, wanted.encode()), *indexes]).succeeded:
                    # This host copied it here, so the path is its own: only one the source trusted
                    # (review: every path of the source, refused ones too, became trusted).
                    image = self._copied_image_of_this_host(volume, record)
                    if image is not None:
                        self.trusted.register(image, disk_key(record.disk.id, name))
                    return "added"
                continue  # created meanwhile: compare with what is there now
            if current.disk.id != record.disk.id:
                raise DiskExistsError(
                    f"a different disk named {name} (id {current.disk.id}, not {record.disk.id}) is already "
                    f"in the disk catalogue at {self.location.url}; remove one of them first"
                )
            self._finish_a_copied_registration(current.volume, record)
            if (current.disk, current.volume, current.leases) == (wanted.disk, wanted.volume, wanted.leases):
                return "unchanged"
            return "differs"
        raise StoreError(f"disk {name} changed {CAS_ATTEMPTS} times while it was being copied; try again")

    def _copied_image_of_this_host(self, volume: Volume | None, record: DiskRecord) -> str | None:
        """The image ``volume`` (as copied here) names on this node, when the source trusted it."""
        if volume is None or volume.node != self.node or not volume.image_path or not record.image_path:
            return None
        return volume.image_path

    def _finish_a_copied_registration(self, there: Volume | None, record: DiskRecord) -> None:
        """A disk an earlier copy put here whose image is still unregistered on this host: a copy
        killed between the record and the registration was run again (trial FI2 G4: "already
        there", and the disk stayed unusable here). A path bound to another disk is left so."""
        image = self._copied_image_of_this_host(there, record)
        copied = record.volume
        if (
            image is None
            or copied is None
            or copied.image_path != image
            or self.trusted.bound_to(image) is not None
        ):
            return
        self.trusted.register(image, disk_key(record.disk.id, record.disk.name))

    def _image_free_for(self, image_key: str, record: DiskRecord) -> dict[str, Any]:
        """The compare that keeps the image ``record`` names its own: the image's index still
        absent, or still as read (already this disk's); DiskExistsError when another disk's."""
        _, found, _ = self.kv.range(image_key)
        if not found:
            return _missing(image_key)
        if found[0].value.decode() == record.disk.id:
            return _unchanged(image_key, found[0].mod_revision)
        owner_id = found[0].value.decode()
        owner = self._name_of(owner_id) or owner_id
        assert record.volume is not None
        raise DiskExistsError(
            f"disk {record.disk.name} names the image {printable(record.volume.image_path or '')}, which "
            f"already belongs to disk {owner} in the disk catalogue at {self.location.url}; one image "
            "cannot back two disks"
        )

    # --- the mount's local copy ---

    def watch(self) -> CatalogWatch:
        """A local copy of the disks, kept current by a watch (started; close it when done)."""
        return CatalogWatch(self).start()


def _sharing_an_image(records: list[DiskRecord], key_created: dict[str, int]) -> dict[str, tuple[str, bool]]:
    """The ids of this node's records that lead to an image an earlier record (its key created
    first) leads to, each with a clause saying so and whether it names several. The earliest
    keeps its image (trial W2: a copied record hid the real disk, and `rsync --delete` then
    dropped its backup); when that cannot be told, all of them are refused."""
    by_image: dict[str, list[DiskRecord]] = {}
    for record in records:
        if record.local and record.image_path is not None:
            # As recorded, normalised: resolving it would touch the path, and one under the mount
            # point then waited on the mount itself, for good (review S).
            by_image.setdefault(os.path.normpath(record.image_path), []).append(record)
    shared = {}
    for image, group in by_image.items():
        if len(group) < 2:
            continue
        created = sorted((key_created.get(record.disk.id, 0), record.disk.name) for record in group)
        first_known = 0 < created[0][0] < created[1][0]
        later = [record for record in group if not first_known or record.disk.name != created[0][1]]
        names = ", ".join(sorted(record.disk.name for record in later))
        several = len(later) > 1
        clause = (
            f"disk{'s' if several else ''} {names} name{'' if several else 's'} the image {printable(image)}"
        )
        if first_known:
            clause += f", which disk {created[0][1]} (recorded first) names"
        shared.update({record.disk.id: (clause, several) for record in later})
    return shared


class CatalogWatch:
    """The mount's copy of the catalogue's disks, fed by a watch: ``list_disks`` costs no request.

    Two daemon threads: one lists ``disks/`` and follows a watch from the
    revision after that listing (listing again whenever the stream breaks),
    one probes the member serving the watch. The copy answers only while it is
    known current (confirmed within ``stale_after_s``): it misses nothing
    meanwhile, because a member that answers a linearizable read is in touch
    with its quorum and streams every change. Else it raises the unreachable
    error, logged once per outage.
    """

    def __init__(
        self,
        catalog: EtcdCatalog,
        *,
        probe_interval_s: float = PROBE_INTERVAL_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.catalog = catalog
        self._probe_interval_s = probe_interval_s
        self._stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._records: dict[str, DiskRecord] = {}
        self._stream: requests.Response | None = None
        self._endpoint: int | None = None  # the member serving the watch, while the stream is open
        self._confirmed_at = -math.inf  # when the copy was last known to hold every change
        self._problem = "not connected yet"
        self._reachable: bool | None = None  # what was last said in the log
        self._first_sync = threading.Event()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._follow, name="mirenfs-catalog-watch", daemon=True),
            threading.Thread(target=self._probe, name="mirenfs-catalog-probe", daemon=True),
        ]
        self._damaged: set[tuple[str, int]] = set()
        # What the watch has delivered: the keys there and the newest revision it knows of, set
        # when it starts; the probe compares them with etcd's (trial W: a stream that stopped
        # delivering while etcd answered left the copy stale for good, in silence).
        self._watched_keys: set[str] = set()
        self._watched_revision = 0
        self._lagging_since: float | None = None

    @property
    def data_path(self) -> str:
        return self.catalog.data_path

    def start(self) -> CatalogWatch:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stop following (at once: the threads end on their own, within one request's time)."""
        self._stopping.set()
        self._drop_stream()

    def join(self, timeout: float = REQUEST_TIMEOUT_S + 1) -> None:
        for thread in self._threads:
            thread.join(timeout)

    # --- answering ---

    @property
    def current(self) -> bool:
        with self._lock:
            return self._current_locked()

    @property
    def confirmed_age_s(self) -> float | None:
        """How long ago the catalogue last confirmed this copy (a watch event or the probe), or
        None before it ever did: the age of a listing in an outage (trial W: the time since the
        last `ls` was shown)."""
        with self._lock:
            confirmed = self._confirmed_at
        return None if confirmed == -math.inf else time.monotonic() - confirmed

    def _current_locked(self) -> bool:
        return time.monotonic() - self._confirmed_at <= self._stale_after_s

    def list_disks(self) -> list[DiskRecord]:
        """The disks as the catalogue has them now (within a watch event's delay), from memory."""
        if not self._first_sync.is_set():  # the mount's first listing: the watch is starting
            self._first_sync.wait(timeout=FIRST_SYNC_WAIT_S)
            self._first_sync.set()  # waited once: from now on the answer is now
        with self._lock:
            if self._current_locked():
                listed = sorted(self._records.values(), key=lambda record: record.disk.name)
                return self.catalog.refuse_shared_images(listed)
            problem = self._problem
        self._announce_if_stale()
        error = self.catalog.kv.unreachable(problem)
        error.reported = True  # the outage is logged once, not per request
        raise error

    # --- following the watch ---

    def _follow(self) -> None:
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                self._list_and_watch()
                why = "the watch stream ended"
            except (MirenfsError, requests.RequestException, ValueError, OSError, KeyError, TypeError) as exc:
                why = _reason(exc)
            except Exception as exc:  # this thread must not die: the copy would stay stale for good
                log.exception("unexpected error following the disk catalogue; starting again")
                why = _reason(exc)
            if self._stopping.is_set():
                return
            self._trouble(why)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 0.5)

    def _list_and_watch(self) -> None:
        prefix = self.catalog.disks_prefix
        revision, found, endpoint = self.catalog.kv.range(prefix, prefix=True)
        records = {}
        for item in found:
            record = self._record(item.key[len(prefix) :], item)
            if record is not None:
                records[record.disk.name] = record
        listed = ({item.key[len(prefix) :] for item in found}, revision)
        client = self.catalog.kv.client(endpoint)
        request = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(_prefix_end(prefix)),
                "start_revision": str(revision + 1),
            }
        }
        response = client.session.post(
            client.get_url("watch"), json=request, stream=True, timeout=(self.catalog.kv.timeout_s, None)
        )
        try:
            if response.status_code != 200:
                raise StoreError(f"the watch was refused ({response.status_code} {response.reason})")
            _keep_alive(response)
            with self._lock:
                self._stream = response
            if self._stopping.is_set():
                return
            for message in _json_messages(response):
                self._receive(message, records, endpoint, listed)
        finally:
            with self._lock:
                self._stream, self._endpoint = None, None
            response.close()

    def _receive(
        self,
        message: dict[str, Any],
        records: dict[str, DiskRecord],
        endpoint: int,
        listed: tuple[set[str], int],  # the keys the listing held, and its revision
    ) -> None:
        if "error" in message:
            raise StoreError(f"the watch failed: {message['error'].get('message', message['error'])}")
        result = message.get("result", {})
        if result.get("canceled"):
            raise StoreError(f"the watch was cancelled ({result.get('cancel_reason') or 'compacted'})")
        if result.get("created"):
            with self._lock:
                self._records = records  # the listing, caught up: from now on, events apply to it
                self._endpoint = endpoint
                self._confirmed_at = time.monotonic()
                self._watched_keys, self._watched_revision = set(listed[0]), listed[1]
                self._lagging_since = None
            self._first_sync.set()
            self._found()
            return
        prefix = self.catalog.disks_prefix
        changes: list[tuple[str, DiskRecord | None, bool]] = []
        for event in result.get("events", []):
            item = _key_value(event["kv"])
            name = item.key[len(prefix) :]
            deleted = event.get("type") == "DELETE"
            changes.append((name, None if deleted else self._record(name, item), deleted))
        with self._lock:
            for name, record, deleted in changes:
                if record is None:
                    self._records.pop(name, None)  # gone, or damaged: not listed
                else:
                    self._records[name] = record
                if deleted:
                    self._watched_keys.discard(name)
                else:
                    self._watched_keys.add(name)
            newest = [int(event.get("kv", {}).get("mod_revision", 0)) for event in result.get("events", [])]
            header = int(result.get("header", {}).get("revision", 0) or 0)
            self._watched_revision = max(self._watched_revision, header, *newest)
            self._confirmed_at = time.monotonic()

    def _record(self, name: str, item: KeyValue) -> DiskRecord | None:
        try:
            return self.catalog.record_from(name, item)
        except StoreError as exc:
            if (name, item.mod_revision) not in self._damaged:
                self._damaged.add((name, item.mod_revision))
                log.warning("%s", exc)
            return None

    def _drop_stream(self) -> None:
        """End the watch stream now (its thread is blocked reading it): shut its socket down."""
        with self._lock:
            stream, self._endpoint = self._stream, None
        if stream is None:
            return
        with contextlib.suppress(Exception):  # already closed, or never connected: nothing to end
            fd = stream.raw.fileno()
            sock = socket.socket(fileno=os.dup(fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()

    # --- probing the watch's member ---

    def _probe(self) -> None:
        while not self._stopping.wait(self._probe_interval_s):
            with self._lock:
                endpoint = self._endpoint
            if endpoint is None:
                continue
            try:  # a linearizable read: the member serving the watch still has its quorum
                count, newest = self.catalog.kv.newest(self.catalog.disks_prefix, endpoint=endpoint)
            except Exception as exc:  # MirenfsError; anything else must not end the probing either
                if not self._stopping.is_set():
                    self._trouble(_reason(exc))
                    self._drop_stream()  # the watch starts again, on a member that answers
                continue
            now = time.monotonic()
            with self._lock:
                if self._endpoint != endpoint:
                    continue
                behind = newest > self._watched_revision or count != len(self._watched_keys)
                if not behind:
                    self._lagging_since = None
                    self._confirmed_at = now
                    continue
                if self._lagging_since is None:
                    self._lagging_since = now  # an event on its way: give it its moment
                lagging = now - self._lagging_since > WATCH_LAG_S
            if lagging:
                host, port = self.catalog.location.endpoints[endpoint]
                self._trouble(f"the watch on {host}:{port} stopped delivering changes")
                self._drop_stream()  # listed and watched again

    # --- saying so, once per change ---

    def _trouble(self, why: str) -> None:
        """The watch broke or the probe failed: remember why; once the copy is stale, say so."""
        with self._lock:
            self._problem = why
        self._announce_if_stale()

    def _announce_if_stale(self) -> None:
        with self._lock:
            if self._current_locked() or self._reachable is False:
                return
            self._reachable = False
            problem = self._problem
        log.warning(
            "the disk catalogue at %s is unreachable (%s): the mount answers EIO for the disks until "
            "it is back (open snapshots keep reading)",
            self.catalog.location.url,
            problem,
        )

    def _found(self) -> None:
        with self._lock:
            was, self._reachable = self._reachable, True
        if was is False:
            log.info("the disk catalogue at %s is reachable again", self.catalog.location.url)


# TCP keepalive on the watch's connection: a stream that only waits for events is idle for hours,
# and a NAT or load balancer between the host and etcd may drop such a flow without a word; the
# watch then never hears of a change while the probe (on its own connection) still answers
# (review). Probes keep the flow alive, and a peer that stopped answering ends the stream within
# IDLE + INTERVAL * COUNT seconds, so the copy lists afresh.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3


def _keep_alive(response: requests.Response) -> None:
    """Turn TCP keepalive on for the connection under ``response`` (best effort: not on a
    platform without the options, nor once the connection is gone)."""
    with contextlib.suppress(Exception):
        sock = socket.socket(fileno=os.dup(response.raw.fileno()))  # the same socket: options are shared
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        finally:
            sock.close()


def _reason(exc: BaseException) -> str:
    """Why the watch or its probe failed, in a few words."""
    if isinstance(exc, Unreachable):
        return exc.why
    return str(exc) if isinstance(exc, MirenfsError) else _why(exc)


def _json_messages(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a watch stream as they arrive (one per line; a line may come in pieces)."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
        if buffer.strip():
            try:
                message = json.loads(buffer)
            except ValueError:
                continue  # the rest of it is on its way
            buffer = b""
            yield message
