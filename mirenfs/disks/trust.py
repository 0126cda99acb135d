"""Which images at their own paths this host agreed to read and replace, and for which disk.

A volume may name its own image (``disk add --image PATH``). In the data
path's SQLite store only this host writes that path; in a fleet's etcd
catalogue anyone who can write the prefix can, and mirenfs reads images
(backup) and replaces them (restore) as root. So a record on this node that
names its own image is used only when this host registered that path for
that very disk: ``disk add --image`` and ``catalog copy`` into the
catalogue, run here, record it in ``<data-path>/mirenfs/trusted-images.json``
(0600, this user's, never read through a link).

Never: trust a path because a record says so, or because it lies under the
data path (review Sec F4: a record named a secret kept there, or a link
there leading out); let a record of another disk use a registration (F6: a
record written first squatted an image the operator then registered).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator

from mirenfs.disks.model import state_directory
from mirenfs.engine.image import make_private_directory, replace_private_file, written_by_this_user_alone

log = logging.getLogger(__name__)

TRUSTED_IMAGES = "trusted-images.json"
ANY_DISK = ""  # a path an older mirenfs registered, before registrations named their disk


def disk_key(disk_id: str, name: str) -> str:
    """Which disk a registration is for: its id and its name. Ids are no secret (any record shows
    them), so a record copying pg's id under another name must not pass for pg (review S3 F5)."""
    return f"{disk_id} {name}"


class TrustedImages:
    """The image paths this host registered, each for one disk (its :func:`disk_key`), read again
    whenever the file changes. The file keeps ``images`` (the paths, as older versions read it)
    and ``disks`` (path to disk)."""

    def __init__(self, data_path: str) -> None:
        self.data_path = os.path.abspath(data_path)
        self.path = os.path.join(state_directory(self.data_path), TRUSTED_IMAGES)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int, int] | None = None  # inode, mtime, ctime, size at the last read
        self._paths: dict[str, str] = {}
        self._said_unsafe = False

    def allows(self, image_path: str, disk: str) -> bool:
        """Whether this host may read and replace ``image_path`` as disk ``disk``'s image."""
        registered = self._registered().get(os.path.normpath(image_path))
        return registered is not None and registered in (disk, ANY_DISK)

    def bound_to(self, image_path: str) -> str | None:
        """The disk (its :func:`disk_key`) ``image_path`` is registered for; None if not registered."""
        return self._registered().get(os.path.normpath(image_path))

    def registered(self, image_path: str) -> bool:
        """Whether ``image_path`` (by its path, or where it leads) was registered here, for any disk."""
        paths = self._registered()
        return os.path.normpath(image_path) in paths or os.path.realpath(image_path) in paths

    def register(self, image_path: str, disk: str) -> None:
        """Record ``image_path`` as disk ``disk``'s on this host (kept across runs; written
        atomically): another disk's record naming it is not trusted."""
        path = os.path.normpath(image_path)
        with self._lock:
            paths = self._read()
            if paths.get(path) != disk:
                self._save({**paths, path: disk})

    @contextlib.contextmanager
    def registering(self, image_path: str, disk: str) -> Iterator[None]:
        """:meth:`register` for a change that may fail (the record's insert): set back as it was
        if it does, so a refused second disk on an image does not take the first one's."""
        path = os.path.normpath(image_path)
        with self._lock:
            before = self._read().get(path)
        self.register(path, disk)
        try:
            yield
        except BaseException:
            with self._lock:
                paths = self._read()
                if paths.get(path) == disk:
                    restored = {p: d for p, d in paths.items() if p != path}
                    if before is not None:
                        restored[path] = before
                    self._save(restored)
            raise

    def unregister(self, image_path: str) -> None:
        """No disk of this host names ``image_path`` any more: a record written later that names
        it is not trusted by this registration (trial W: it outlived `disk remove`)."""
        path = os.path.normpath(image_path)
        with self._lock:
            paths = self._read()
            if path in paths:
                self._save({p: d for p, d in paths.items() if p != path})

    def _save(self, paths: dict[str, str]) -> None:
        """Write the registered paths (the lock is held), atomically and durably."""
        make_private_directory(os.path.dirname(self.path))
        bound = {path: disk for path, disk in sorted(paths.items()) if disk != ANY_DISK}
        text = json.dumps({"images": sorted(paths), "disks": bound}, indent=1) + "\n"
        replace_private_file(self.path, text.encode(), durable=True)
        self._seen = None

    def _registered(self) -> dict[str, str]:
        with self._lock:
            return self._read()

    def _read(self) -> dict[str, str]:
        """The registered paths (the lock is held); a missing, unreadable or unsafe file (a link,
        another user's, writable by others: review Sec F7) registers none."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._seen, self._paths = None, {}
            return self._paths
        try:
            info = os.fstat(fd)
            seen = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
            if self._seen == seen:
                return self._paths
            self._seen, self._paths = seen, {}
            if not written_by_this_user_alone(info):
                if not self._said_unsafe:
                    log.warning(
                        "%s is not a file of this user that only it may change, so no image it lists is "
                        "trusted: remove it, and register each image again (mirenfs disk add NAME --image "
                        "PATH)",
                        self.path,
                    )
                    self._said_unsafe = True
                return self._paths
            with os.fdopen(os.dup(fd), encoding="utf-8") as file:
                kept = json.load(file)
            self._paths = _registrations(kept)
        except (OSError, ValueError, KeyError, TypeError):
            self._paths = {}  # damaged: nothing is trusted
        finally:
            os.close(fd)
        return self._paths


def _registrations(kept: object) -> dict[str, str]:
    """Path to disk id from the file's content; a path without one (an older mirenfs's) is any disk's."""
    if not isinstance(kept, dict) or not isinstance(kept["images"], list):
        raise TypeError("images is not a list")
    disks = kept.get("disks", {})
    if not isinstance(disks, dict):
        raise TypeError("disks is not a mapping")
    paths = {os.path.normpath(p): ANY_DISK for p in kept["images"] if isinstance(p, str)}
    for path, disk in disks.items():
        if isinstance(path, str) and isinstance(disk, str) and os.path.normpath(path) in paths:
            paths[os.path.normpath(path)] = disk
    return paths
