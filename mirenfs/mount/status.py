"""The status contract between a mount and ``mirenfs status``: xattr names and the JSON shape.

No pyfuse3: the CLI imports the names from here to ask a running mount.
The JSON is ``{"pid", "index_passes", "disks": {NAME: {"index": "building",
"done", "total"} | {"index": "ready", "snapshot_bytes", "checksum",
"consistency"[, "frozen_ms"]} | {"index": "refused", "reason"} | {"index": "queued"}
(``--index-at-mount`` will build it) | {"index": "not built"}}, "restores": [{"name",
"disk", "state", "bytes"[, "image_done", "image_total"]}], "refused": [{"name", "errno",
"reason", "tries"}]}``; ``image_done`` and ``image_total`` (the image decompressed so far, and
its size by the header) are there while a restore has a header; a file written below
``restore/restore/`` is listed there too, as ``{"name", "state": "ignored: …"}``;
``refused`` holds the latest refusals in ``restore/`` (and of files made in the root),
newest first (a refused create leaves no entry to read the reason from); ``tries`` counts
one process's retries of the same refusal, as rsync makes under new temporary names.
``catalog`` is the disk catalogue the mount uses (``etcd[s]://…`` or ``sqlite:///DATA-PATH``) and
``node`` its node name in it (null with SQLite): a wrong ``--node`` shows no disks, and says so here.
``catalog_error`` is null, or the sentence saying why the disk catalogue could not be listed (etcd
unreachable): then ``disks`` is the mount's last listing, ``listing_age_s`` seconds old (null if
there never was one), and everything else is what the mount knows itself. ``consistency``
is how the snapshot was taken (``offline``, ``frozen``, ``crash-consistent``,
``live``), as the xattr ``user.mirenfs.consistency`` on ``NAME.mirn`` says. ``frame_store`` is
null (``-o frame_store_size=0``) or ``{"directory", "loaded", "bytes", "limit", "hits", "misses",
"corrupt", "held_back"}``: what it holds against its bound, frames served from it and not found
since the mount started, entries that did not verify, and whether it stopped growing for space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from mirenfs.mount.versions import SnapshotService

STATUS_XATTR = "user.mirenfs.status"  # on the mount's root: the JSON above
# The kernel refuses an attribute value over 64 KiB (E2BIG): the status is cut down to this.
STATUS_LIMIT = 63 << 10
INDEX_PASSES_XATTR = "user.mirenfs.index_passes"  # on the mount's root: a count
STATE_XATTR = "user.mirenfs.state"  # on an entry of restore/: receiving, installed, failed: REASON
CONSISTENCY_XATTR = "user.mirenfs.consistency"  # on NAME.mirn: offline, frozen, crash-consistent, live
SNAPSHOT_XATTRS = (  # on NAME.mirn: the header's fields
    "user.mirn.name",
    "user.mirn.size_bytes",
    "user.mirn.filesystem",
    "user.mirn.timestamp",
    "user.mirn.checksum",
)


def mount_status(
    disk_names: Iterable[str],
    service: SnapshotService,
    restores: list[dict[str, object]],
    refused: list[dict[str, object]] | None = None,
    *,
    catalog_error: str | None = None,
    listing_age_s: float | None = None,
    catalog: str | None = None,
    node: str | None = None,
    without_image_here: list[str] | None = None,
) -> dict[str, Any]:
    """What ``mirenfs status`` shows: per disk, index state and progress; the restores; and
    whether the disk catalogue answered (``catalog_error``: why not)."""
    disks: dict[str, dict[str, Any]] = {}
    for name in sorted(disk_names):
        progress = service.progress.get(name)
        version = service.current(name)
        if progress is not None:
            disks[name] = {"index": "building", "done": progress.done, "total": progress.total}
        elif version is not None:
            checksum = version.meta.checksum
            disks[name] = {
                "index": "ready",
                "snapshot_bytes": version.size,
                "checksum": checksum,
                "consistency": str(version.consistency),
            }
            if version.frozen_s is not None:
                disks[name]["frozen_ms"] = round(version.frozen_s * 1000, 1)
        elif name in service.refused:
            disks[name] = {"index": "refused", "reason": str(service.refused[name][1])}
        elif name in service.queued:
            disks[name] = {"index": "queued"}
        else:
            disks[name] = {"index": "not built"}
    status: dict[str, Any] = {
        "pid": os.getpid(),
        "index_passes": service.index_passes,
        "catalog": catalog,
        "node": node,
        "catalog_error": catalog_error,
        "disks": disks,
        "restores": restores,
        "refused": refused or [],
        "frame_store": None if service.frame_store is None else service.frame_store.summary(),
        "without_image_here": without_image_here or [],
    }
    if catalog_error is not None:
        status["listing_age_s"] = None if listing_age_s is None else round(listing_age_s, 1)
    return status


def status_json(status: dict[str, Any], limit: int = STATUS_LIMIT) -> bytes:
    """``status`` as JSON of at most ``limit`` bytes (review: on a host of 400 disks, or after
    400 restores, ``mirenfs status`` got "Argument list too long"). What does not fit goes, and
    ``omitted`` counts it: first the restores that ended (the oldest first), then the oldest
    refusals, then disks at rest (not built, then ready: from the end of the names). Restores
    receiving, and disks being indexed or refused, always stay."""
    encoded = json.dumps(status).encode()
    if len(encoded) <= limit:
        return encoded
    status = {**status, "restores": list(status["restores"]), "refused": list(status["refused"])}
    status["disks"] = dict(status["disks"])
    omitted = {"restores": 0, "refused": 0, "disks": 0}
    status["omitted"] = omitted

    def removable() -> tuple[str, list[Any]] | None:
        waiting = ("receiving", "created")  # at work, or made by mknod and waiting for its open
        ended = [
            i for i, item in enumerate(status["restores"]) if not str(item.get("state")).startswith(waiting)
        ]
        if ended:
            return "restores", ended
        if status["refused"]:
            return "refused", list(range(len(status["refused"]) - 1, -1, -1))  # newest first: oldest last
        for at_rest in ("not built", "queued", "ready"):
            names = [name for name, disk in sorted(status["disks"].items()) if disk.get("index") == at_rest]
            if names:
                return "disks", names[::-1]
        return None

    while len(encoded) > limit and (found := removable()) is not None:
        kind, candidates = found
        cut = candidates[: max(1, len(candidates) // 2)]
        if kind == "disks":
            for name in cut:
                del status["disks"][name]
        else:
            keep = set(range(len(status[kind]))) - set(cut)
            status[kind] = [item for i, item in enumerate(status[kind]) if i in keep]
        omitted[kind] += len(cut)
        encoded = json.dumps(status).encode()
    return encoded
