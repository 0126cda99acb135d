"""Which disk catalogue a command or a mount uses, and copying one catalogue into another.

A catalogue is named by ``--catalog`` or ``$MIRENFS_CATALOG``:

- nothing (the default), ``sqlite:`` or ``sqlite:///DIR``: the SQLite store of the data
  path (``DIR/mirenfs.db``); a plain directory means the same;
- ``etcd://HOST:PORT[,HOST:PORT…][/PREFIX]``: the fleet's catalogue on etcd v3
  (:mod:`mirenfs.disks.etcd`), keys under ``/PREFIX/`` (default ``/mirenfs/``);
  ``etcds://…`` the same over TLS, etcd's certificate checked against
  ``$MIRENFS_ETCD_CACERT`` (else the public authorities ``requests`` trusts), with a client certificate
  from ``$MIRENFS_ETCD_CERT`` and ``$MIRENFS_ETCD_KEY`` where etcd asks for one.

Each host also has a node name (``--node``, ``$MIRENFS_NODE``, else the
hostname): on etcd a volume records the node whose data path holds its image.

The etcd module, and with it the HTTP client, is imported only when an etcd
catalogue is opened: every other command starts without paying for it.
Nothing here talks to a catalogue except :func:`copy_catalog`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mirenfs.disks.model import (
    DB_FILE_NAME,
    IMAGE_FILE_NAME,
    Catalog,
    DiskRecord,
    DiskState,
    etcd_catalogue_hint,
    state_directory,
    validate_node_name,
    volumes_dir,
)
from mirenfs.disks.store import Store
from mirenfs.engine.image import make_private_directory, replace_private_file
from mirenfs.errors import DiskExistsError, MirenfsError

log = logging.getLogger(__name__)

CATALOG_ENV = "MIRENFS_CATALOG"
NODE_ENV = "MIRENFS_NODE"
DEFAULT_ETCD_PREFIX = "mirenfs"
ETCD_SCHEME = "etcd://"
ETCD_TLS_SCHEME = "etcds://"
# etcdctl's --cacert, --cert and --key, for etcds:// (a mount's daemon inherits them)
ETCD_CACERT_ENV = "MIRENFS_ETCD_CACERT"
ETCD_CERT_ENV = "MIRENFS_ETCD_CERT"
ETCD_KEY_ENV = "MIRENFS_ETCD_KEY"
ETCD_TLS_ENVS = (ETCD_CACERT_ENV, ETCD_CERT_ENV, ETCD_KEY_ENV)
SQLITE_SCHEME = "sqlite:"


@dataclass(frozen=True)
class EtcdTls:
    """How an ``etcds://`` catalogue is spoken to: the authority etcd's certificate must be signed
    by (None: the public ones ``requests`` trusts), and this host's certificate and key if etcd
    asks for one."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class EtcdLocation:
    """Where an etcd catalogue lives: its client endpoints and the key prefix under which it keeps disks."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_ETCD_PREFIX
    # None: plain HTTP (etcd://). Not compared: etcd:// and etcds:// of one cluster and prefix are one
    # catalogue, whatever files this host speaks TLS with.
    tls: EtcdTls | None = field(default=None, compare=False)

    @property
    def url(self) -> str:
        hosts = ",".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.endpoints
        )
        return f"{ETCD_SCHEME if self.tls is None else ETCD_TLS_SCHEME}{hosts}/{self.prefix}"

    @property
    def root(self) -> str:
        """The key every key of this catalogue starts with: ``/PREFIX/``."""
        return f"/{self.prefix}/"


@dataclass(frozen=True)
class CatalogSpec:
    """A parsed ``--catalog``: the SQLite store of a data path (``data_path`` None: the command's
    own), or an etcd location."""

    text: str
    data_path: str | None = None
    etcd: EtcdLocation | None = None

    @property
    def is_etcd(self) -> bool:
        return self.etcd is not None


def parse_catalog(text: str, *, read_tls: bool = True, tls_elsewhere: bool = False) -> CatalogSpec:
    """``etcd[s]://HOST:PORT[,…][/PREFIX]``, ``sqlite:[//DIR]`` or a directory; else one clear line.

    ``read_tls``: take the TLS settings from the environment (and check them); without, an
    etcds:// location has none (to compare locations). ``tls_elsewhere``: another catalogue of
    the same command is etcds://, so the settings may be meant for it (``catalog copy`` from
    etcd:// to etcds://), and an etcd:// one is not refused for them."""
    cleaned, etcd_schemes = text.strip(), (ETCD_SCHEME, ETCD_TLS_SCHEME)
    for scheme in etcd_schemes:  # trial W: ETCD://… got "two slashes" advice
        if cleaned[: len(scheme)].lower() == scheme:
            cleaned = scheme + cleaned[len(scheme) :]
    if cleaned.lower().startswith(("etcd:", "etcds:")) and not cleaned.startswith(etcd_schemes):
        # etcd:/HOST… or etcd:HOST… would otherwise be a data path of that odd name, in the cwd
        scheme = cleaned.partition(":")[0].lower()
        raise MirenfsError(
            f"catalogue {text!r} is not a well-formed etcd URL; did you mean "
            f"{scheme}://HOST:PORT[,HOST:PORT…][/PREFIX] (two slashes after {scheme}:)?"
        )
    if cleaned.startswith(etcd_schemes):
        return CatalogSpec(cleaned, etcd=_parse_etcd(cleaned, read_tls=read_tls, tls_elsewhere=tls_elsewhere))
    if cleaned.startswith(SQLITE_SCHEME):
        path = cleaned[len(SQLITE_SCHEME) :]
        if path.startswith("//"):
            path = path[2:]
        if path and not path.startswith("/"):
            raise MirenfsError(f"catalogue {text!r}: write a SQLite data path as sqlite:///ABSOLUTE/DIR")
        return CatalogSpec(cleaned, data_path=_absolute(path) if path else None)
    if "://" in cleaned or not cleaned:
        raise MirenfsError(
            f"{text!r} is not a disk catalogue; use etcd://HOST:PORT[,HOST:PORT…][/PREFIX] "
            "(etcds:// for TLS), sqlite:///DATA-PATH or a data path"
        )
    return CatalogSpec(cleaned, data_path=_absolute(cleaned))


def _absolute(path: str) -> str:
    """``os.path.abspath``, without the two leading slashes POSIX lets it keep (trial E22 E9:
    ``sqlite:////var/d`` was "the store of data path //var/d, not of /var/d")."""
    absolute = os.path.abspath(path)
    return "/" + absolute.lstrip("/") if absolute.startswith("//") else absolute


def _parse_etcd(text: str, *, read_tls: bool, tls_elsewhere: bool) -> EtcdLocation:
    scheme = ETCD_TLS_SCHEME if text.startswith(ETCD_TLS_SCHEME) else ETCD_SCHEME
    rest = text[len(scheme) :]
    if "@" in rest:  # USER:PASSWORD@HOST: refused before anything echoes the text
        shown = f"{scheme}…@{rest.rsplit('@', 1)[1]}"
        raise MirenfsError(
            f"catalogue {shown}: a user name or password in the URL is not supported (mirenfs talks to "
            "etcd without passwords); give etcds://HOST:PORT[,HOST:PORT…][/PREFIX] with a client "
            f"certificate (${ETCD_CERT_ENV} and ${ETCD_KEY_ENV}) if etcd must know who asks"
        )
    hosts, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not prefix:
        prefix = DEFAULT_ETCD_PREFIX
    if any(not part or part in (".", "..") for part in prefix.split("/")) or any(
        c.isspace() or c in "\\?#" for c in prefix
    ):
        raise MirenfsError(f"catalogue {text!r}: the prefix {prefix!r} must be plain words separated by /")
    endpoints = []
    for item in hosts.split(","):
        endpoints.append(_parse_endpoint(item.strip(), text))
    tls = scheme == ETCD_TLS_SCHEME
    if not read_tls:
        return EtcdLocation(tuple(endpoints), prefix, EtcdTls() if tls else None)
    return EtcdLocation(tuple(endpoints), prefix, _tls_from_environment(text, tls, tls_elsewhere))


def _tls_from_environment(text: str, tls: bool, tls_elsewhere: bool) -> EtcdTls | None:
    """The TLS files ``$MIRENFS_ETCD_*`` name, for an etcds:// catalogue; refused for an etcd://
    one, whose requests would go in the clear while the operator meant them not to."""
    given = {name: os.environ.get(name, "") for name in ETCD_TLS_ENVS if os.environ.get(name, "")}
    if not tls:
        if given and not tls_elsewhere:
            raise MirenfsError(
                f"catalogue {text!r} is plain HTTP, but ${next(iter(given))} is set for TLS; write "
                f"{ETCD_TLS_SCHEME}… to speak TLS to etcd, or unset {', '.join('$' + n for n in given)}"
            )
        return None
    if (ETCD_CERT_ENV in given) != (ETCD_KEY_ENV in given):
        missing = ETCD_KEY_ENV if ETCD_CERT_ENV in given else ETCD_CERT_ENV
        raise MirenfsError(
            f"catalogue {text!r}: a client certificate needs its key and the key its certificate; "
            f"set ${missing} too"
        )
    for name, path in given.items():
        if not os.path.isfile(path):
            what = "is not a file" if os.path.lexists(path) else "does not exist"
            raise MirenfsError(f"catalogue {text!r}: ${name} names {_shown_path(path)}, which {what}")
    absolute = {name: os.path.abspath(path) for name, path in given.items()}
    files = EtcdTls(absolute.get(ETCD_CACERT_ENV), absolute.get(ETCD_CERT_ENV), absolute.get(ETCD_KEY_ENV))
    _check_tls_files(text, files)
    return files


def _shown_path(path: str) -> str:
    """``path``, and where it is when it is relative (a daemon started elsewhere would look there)."""
    return path if os.path.isabs(path) else f"{path} ({os.path.abspath(path)})"


def _check_tls_files(text: str, tls: EtcdTls) -> None:
    """Load the files as the client will, so that a wrong one is named now, not taken for an
    outage of etcd at the first request (review S20: "unreachable (… PEM lib)")."""

    def openssl_words(exc: BaseException) -> str:
        said = getattr(exc, "strerror", None) or str(exc)
        return said.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]

    if tls.ca_file is not None:
        try:
            ssl.create_default_context(cafile=tls.ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise MirenfsError(
                f"catalogue {text!r}: ${ETCD_CACERT_ENV} ({tls.ca_file}) is not a PEM file of the authority "
                f"that signed etcd's certificate ({openssl_words(exc)})"
            ) from None
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            with open(tls.key_file, "rb") as key:
                encrypted = b"ENCRYPTED" in key.read(1 << 16)
            if encrypted:
                raise ValueError("the key is encrypted, and mirenfs asks nobody for its password")
            ssl.create_default_context().load_cert_chain(tls.cert_file, tls.key_file, password=b"")
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise MirenfsError(
                f"catalogue {text!r}: ${ETCD_CERT_ENV} ({tls.cert_file}) and ${ETCD_KEY_ENV} "
                f"({tls.key_file}) are not a PEM certificate and its unencrypted key ({openssl_words(exc)})"
            ) from None


def _parse_endpoint(item: str, text: str) -> tuple[str, int]:
    problem = (
        f"catalogue {text!r}: {item!r} is not HOST:PORT"
        if item
        else f"catalogue {text!r}: its list of endpoints has an empty entry (a comma too many?)"
    )
    if item.startswith("["):  # [IPv6]:PORT
        host, _, port_text = item[1:].partition("]:")
    else:
        host, _, port_text = item.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MirenfsError(problem)
    return host, int(port_text)


def catalog_spec_from(arg: str | None) -> CatalogSpec | None:
    """``--catalog`` if given, else ``$MIRENFS_CATALOG``, else None (the data path's SQLite store)."""
    text = arg or os.environ.get(CATALOG_ENV) or ""
    return parse_catalog(text) if text.strip() else None


def node_from(arg: str | None) -> str:
    """``--node`` if given, else ``$MIRENFS_NODE``, else this host's name."""
    return validate_node_name(arg or os.environ.get(NODE_ENV) or socket.gethostname())


def open_catalog(spec: CatalogSpec | str | None, data_path: str, *, node: str | None = None) -> Catalog:
    """The catalogue ``spec`` names (None: the data path's SQLite store), for this host: its data
    path and node name (None: ``$MIRENFS_NODE``, else the hostname). Nothing is contacted yet.

    A SQLite catalogue is the store of its own data path: one named by
    ``sqlite:///DIR`` must be the data path itself.
    """
    if isinstance(spec, str):
        spec = parse_catalog(spec)
    if spec is None or spec.etcd is None:
        here = _absolute(data_path)
        if spec is not None and spec.data_path is not None and spec.data_path != here:
            raise MirenfsError(
                f"the SQLite catalogue {spec.text} is the store of data path {spec.data_path}, not of "
                f"{here}; pass --data-path {spec.data_path} instead"
            )
        refused = None
        if spec is None:  # named explicitly (sqlite://DATA): used as asked
            try:
                move = read_move(data_path)
            except MirenfsError as exc:  # trial W2: a damaged mark was taken for none
                refused = str(exc)
            else:
                refused = move.refusal(data_path) if move is not None else _etcd_data_path_refusal(data_path)
        return Store(data_path, refused=refused)
    # Lazy on purpose: the etcd client (requests, futurist) costs ~0.1 s to import, and only
    # commands on an etcd catalogue need it.
    from mirenfs.disks.etcd import EtcdCatalog

    return EtcdCatalog(spec.etcd, data_path, node=node_from(node))


def _etcd_data_path_refusal(data_path: str) -> str | None:
    """Why a data path that keeps its disks in an etcd catalogue and has no SQLite store is not
    given a new, empty one: a command without ``--catalog`` (cron, sudo, a new shell) restored
    into one beside the fleet's disks, exit 0, and a mount served it (trial E22 E1)."""
    here = _absolute(data_path)
    hint = etcd_catalogue_hint(here)
    if hint is None:
        return None
    if os.path.lexists(os.path.join(here, DB_FILE_NAME)):
        # One left empty counts as none (review D22 D6: one such a restore had made, its disk
        # removed since, took the next restore without a word); one that holds disks is used.
        try:
            if Store(here).list_disks():
                return None
        except MirenfsError:
            return None  # said by the command that reads it
    return (
        f"the data path {here} has no disks in a SQLite store of its own, and it has talked to {hint}; "
        f"to use a SQLite store there instead, pass --catalog sqlite://{here}"
    )


MOVE_FILE = "catalog-moved.json"  # under <data-path>/mirenfs/: where `catalog copy` moved its disks


def move_mark(data_path: str) -> str:
    """The file that says where ``catalog copy`` moved a data path's disks."""
    return os.path.join(state_directory(os.path.abspath(data_path)), MOVE_FILE)


@dataclass(frozen=True)
class CatalogMove:
    """A data path's SQLite store was copied to a shared catalogue (trial W: a command without
    --catalog then went back to that stale store and replaced a leased, attached disk's image
    there). The ids copied, so that a copy run again does not bring back a disk removed since."""

    url: str
    node: str
    at: str  # when, as the operator reads it
    copied_ids: tuple[str, ...]

    def refusal(self, data_path: str) -> str:
        here = os.path.abspath(data_path)
        return (
            f"the disks of data path {here} were copied to the disk catalogue {self.url} (node "
            f"{self.node}) by `mirenfs catalog copy` on {self.at}, and its SQLite store is no longer "
            f"kept up to date: pass --catalog {self.url} --node {self.node} (or set ${CATALOG_ENV} and "
            f"${NODE_ENV}{self._tls_settings()}); to move the disks back, `mirenfs catalog copy --from "
            f"{self.url} --to {here} --node {self.node}` (a copy that leaves the two alike lifts this mark)"
        )

    def _tls_settings(self) -> str:
        """The TLS settings an etcds:// catalogue also needs, which a new shell lacks (trial T20)."""
        tls = self.url.startswith(ETCD_TLS_SCHEME)
        return f", and ${ETCD_CACERT_ENV}, ${ETCD_CERT_ENV} and ${ETCD_KEY_ENV} for TLS" if tls else ""


def read_move(data_path: str) -> CatalogMove | None:
    """Where ``catalog copy`` moved the data path's disks, or None (never moved); MirenfsError if
    the mark cannot be read (a stale store must not be used on the strength of a damaged one)."""
    path = move_mark(data_path)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return CatalogMove(
            str(saved["url"]),
            str(saved["node"]),
            str(saved["at"]),
            tuple(str(i) for i in saved["copied_ids"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else f"it is not what catalog copy writes ({exc!r})"
        raise MirenfsError(
            f"cannot read {path}, the mark `catalog copy` left when this data path's disks were copied "
            f"to a shared catalogue ({why}): pass --catalog (the catalogue the disks are in, or "
            f"sqlite://{os.path.abspath(data_path)} for this store), or fix the file"
        ) from None


def same_catalogue(one: str, other: str) -> bool:
    """Whether two etcd catalogue URLs name one catalogue: one prefix, and endpoints in common
    (a list may have been edited since; review S: a suffix was taken for one; review S2: a
    cluster of other endpoints under the same prefix was taken for one)."""
    try:
        first, second = parse_catalog(one, read_tls=False).etcd, parse_catalog(other, read_tls=False).etcd
    except MirenfsError:
        return False
    if first is None or second is None or first.prefix != second.prefix:
        return False
    return bool(set(first.endpoints) & set(second.endpoints))


def note_move(data_path: str, url: str, node: str, copied_ids: list[str]) -> None:
    """Record that the data path's disks were copied to ``url`` (ids added to an earlier move's)."""
    earlier = read_move(data_path)
    kept = earlier is not None and same_catalogue(earlier.url, url)
    ids = set(copied_ids) | (set(earlier.copied_ids) if earlier is not None and kept else set())
    at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    saved = {"url": url, "node": node, "at": at, "copied_ids": sorted(ids)}
    mark = move_mark(data_path)
    try:
        make_private_directory(state_directory(os.path.abspath(data_path)))
        replace_private_file(mark, json.dumps(saved).encode(), durable=True)
    except OSError as exc:  # trial FI2 G5: "Input/output error", naming nothing, after a copy that was done
        written = read_move(data_path)
        if written is not None and written.url == url and set(written.copied_ids) == ids:
            log.warning(  # renamed into place; only its directory's sync failed
                "marked the SQLite store of %s as moved (%s), but its directory could not be synced (%s): "
                "run the same catalog copy again to be sure the mark survives a crash",
                data_path,
                mark,
                exc.strerror,
            )
            return
        raise MirenfsError(
            f"the disks were copied to {url}, but the SQLite store of {data_path} could not be marked as "
            f"moved ({exc.filename or mark}: {exc.strerror}); run the same catalog copy again"
        ) from None


def forget_move(data_path: str) -> bool:
    """The data path's SQLite store is in use again (disks copied back into it): True if a move
    was recorded."""
    try:
        os.unlink(move_mark(data_path))
    except FileNotFoundError:
        return False
    return True


def none_on_this_node(records: list[DiskRecord], *, url: str, node: str) -> str | None:
    """Why a host of an etcd catalogue sees no disks, or None when some are on its node: a typo'd
    ``--node`` (or a hostname that is not the node name) and a forgotten ``/PREFIX`` look alike
    from the host (no disks), so the sentence names what was looked for and what is there."""
    if any(record.local for record in records):
        return None
    others = sorted({record.volume.node for record in records if record.volume and record.volume.node})
    if others:
        return (
            f"no disk in the disk catalogue at {url} is on node {node}; its disks are on "
            f"{'node' if len(others) == 1 else 'nodes'} {', '.join(others)}: if this host is one of "
            f"them, pass --node NAME (or set ${NODE_ENV}; the default is the hostname)"
        )
    if records:
        return f"no disk in the disk catalogue at {url} is on node {node} (none records a node)"
    return f"the disk catalogue at {url} holds no disks (is its /PREFIX right?)"


def images_no_disk_has(records: list[DiskRecord], *, data_path: str) -> str | None:
    """Why a host should be looked at when managed images under its data path belong to no disk
    of the catalogue, or None: an etcd wiped and made again with the same flags has the same
    cluster id, so nothing else tells (trial E22 E4: every mount empty, the nightly rsync exit 0
    with nothing copied, restores making new disks beside the old images)."""
    named = {record.volume.id for record in records if record.volume is not None}
    here = os.path.abspath(data_path)
    if os.path.lexists(os.path.join(here, DB_FILE_NAME)):  # a moved store's disks left there (E6)
        with contextlib.suppress(MirenfsError):
            named |= {record.volume.id for record in Store(here).list_disks() if record.volume is not None}
    volumes = volumes_dir(here)
    try:
        entries = os.listdir(volumes)
    except OSError:
        return None
    orphans = sorted(
        entry
        for entry in entries
        if entry not in named and os.path.isfile(os.path.join(volumes, entry, IMAGE_FILE_NAME))
    )
    if not orphans:
        return None
    listed = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    return (
        f"{len(orphans)} disk image(s) under {volumes} belong to no disk of the catalogue ({listed}): if "
        "the catalogue was wiped or restored from an older copy, its records of them are gone; put "
        "those back (restore the catalogue) before restoring disks here, or the restores make new "
        "disks beside them (with no copy of it, back each image up with mirenfs backup --image PATH "
        "--name NAME -o FILE and restore FILE under its name)"
    )


def images_missing_here(records: list[DiskRecord], *, data_path: str) -> str | None:
    """Why a mount should be looked at when disks of its host have no image under its data path
    (a mistyped data path, or a node name two hosts share), or None. A restore into such a disk
    is no overwrite: it writes the image here and changes the disk's record for every host.
    Disks being created or deleted are left out: their images come and go."""
    missing = sorted(
        record.disk.name
        for record in records
        if record.local
        and record.image_path is not None
        and record.volume is not None
        and not record.volume.image_path  # a managed image, under the data path
        and record.disk.status not in (DiskState.PROVISIONING, DiskState.DELETING)
        and not os.path.lexists(record.image_path)
    )
    if not missing:
        return None
    named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (
        f"{len(missing)} of this host's disks {'has' if len(missing) == 1 else 'have'} no image under the "
        f"data path {os.path.abspath(data_path)} "
        f"({named}): if the data path (or the node name) is wrong, stop this mount, since a restore into "
        "one of them would write its image here and change its record (on a fleet, only with "
        "--allow-overwrite)"
    )


# --- what the mount lists disks from ---


class DiskListing(Protocol):
    """Where the mount's root listing comes from: ``list_disks`` answered by a catalogue."""

    @property
    def data_path(self) -> str: ...

    def list_disks(self) -> list[DiskRecord]: ...

    def close(self) -> None: ...


@runtime_checkable
class ImageAdopting(Protocol):
    """A shared catalogue (etcd) whose records may name images this host must register first."""

    def adopt_image(self, name: str, image_path: str) -> bool: ...


@runtime_checkable
class WatchableCatalog(Protocol):
    """A remote catalogue that can keep a local copy of itself current (the etcd one)."""

    def watch(self) -> DiskListing: ...


@dataclass
class _AskEachTime:
    """A local catalogue (SQLite) is listed by asking it: there is no round trip to save."""

    catalog: Catalog

    @property
    def data_path(self) -> str:
        return self.catalog.data_path

    def list_disks(self) -> list[DiskRecord]:
        return self.catalog.list_disks()

    def close(self) -> None:
        return None


def mount_listing(catalog: Catalog) -> DiskListing:
    """What the mount lists from: a remote catalogue's local copy fed by a watch (started
    here; close it when the mount ends), or the local catalogue itself."""
    if isinstance(catalog, WatchableCatalog):
        return catalog.watch()
    return _AskEachTime(catalog)


# --- catalog copy ---


@dataclass
class CopyReport:
    """What ``catalog copy`` did, disk by disk."""

    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)  # there already as something else: left alone
    skipped: list[str] = field(default_factory=list)  # on another node: not for a one-host catalogue
    conflicts: list[str] = field(default_factory=list)  # the name belongs to another disk there
    unusable: list[str] = field(default_factory=list)  # an image path this host does not use (warned)
    removed_since: list[str] = field(default_factory=list)  # copied before, gone there now: not again
    copied_ids: list[str] = field(default_factory=list)  # the disks there now, as the source's


def copy_catalog(
    source: Catalog,
    destination: Catalog,
    *,
    one_host: bool,
    on_disk: Callable[[str, str], None] | None = None,
    copied_before: frozenset[str] = frozenset(),
) -> CopyReport:
    """Copy every disk of ``source`` into ``destination``, ids kept, idempotently: a disk already
    there is never changed (as it is, or differing: it may hold a newer lease or status than the
    source, and a copy run again must not undo it); a name held by another disk there is
    reported, not replaced.

    ``one_host``: the destination is one host's catalogue (SQLite), so only
    the disks on this node go there. ``copied_before``: the ids an earlier copy
    put there; one of them that is no longer there was removed since, and is
    not brought back (trial W: a copy run again resurrected removed disks).
    """
    report = CopyReport()
    there = {record.disk.id for record in destination.list_disks()} if copied_before else set()
    for record in source.list_disks():
        name = record.disk.name
        if record.disk.id in copied_before and record.disk.id not in there:
            report.removed_since.append(name)
            continue
        if one_host and not record.local:
            report.skipped.append(name)
            continue
        if one_host and record.volume is not None and record.volume.image_path and record.image_path is None:
            # A one-host store trusts the paths it holds: one this host refused (never registered,
            # or relative) must not become trusted by being copied there.
            report.unusable.append(name)
            continue
        try:
            outcome = destination.put_record(record)
        except DiskExistsError as exc:
            log.warning("%s", exc)
            report.conflicts.append(name)
            continue
        report.copied_ids.append(record.disk.id)
        if outcome == "added":
            report.added.append(name)
        elif outcome == "differs":
            report.differing.append(name)
        else:
            report.unchanged.append(name)
        if on_disk is not None:
            on_disk(name, outcome)
    return report
