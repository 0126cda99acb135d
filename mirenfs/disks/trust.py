"""Which images outside its data path this host agreed to read and replace.

A volume may name its own image (``disk add --image PATH``). In the data
path's SQLite store only this host writes that path; in a fleet's etcd
catalogue anyone who can write the prefix can, and mirenfs reads images
(backup) and replaces them (restore) as root. So a record on this node whose
image lies outside the data path is used only when this host registered that
path itself: ``disk add --image`` and ``catalog copy`` into the catalogue,
run here, record it in ``<data-path>/mirenfs/trusted-images.json`` (0600).
Images under the data path are this host's by where they are.

Never: trust a path because a record says so; follow ``..`` out of the data
path (paths are compared normalised).
"""

from __future__ import annotations

import json
import os
import threading

from mirenfs.disks.model import state_directory
from mirenfs.engine.image import make_private_directory, replace_private_file

TRUSTED_IMAGES = "trusted-images.json"


class TrustedImages:
    """The image paths this host registered, read again whenever the file changes."""

    def __init__(self, data_path: str) -> None:
        self.data_path = os.path.abspath(data_path)
        self.path = os.path.join(state_directory(self.data_path), TRUSTED_IMAGES)
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._paths: frozenset[str] = frozenset()

    def allows(self, image_path: str) -> bool:
        """Whether this host may read and replace ``image_path``: under the data path, or registered."""
        path = os.path.normpath(image_path)
        return path.startswith(self.data_path + os.sep) or path in self._registered()

    def registered(self, image_path: str) -> bool:
        """Whether ``image_path`` (by its path, or where it leads) was registered here."""
        paths = self._registered()
        return os.path.normpath(image_path) in paths or os.path.realpath(image_path) in paths

    def register(self, image_path: str) -> None:
        """Record ``image_path`` as this host's (kept across runs; written atomically)."""
        path = os.path.normpath(image_path)
        if self.allows(path):
            return
        with self._lock:
            self._save(self._read() | {path})

    def unregister(self, image_path: str) -> None:
        """No disk of this host names ``image_path`` any more: a record written later that names
        it is not trusted by this registration (trial W: it outlived `disk remove`)."""
        path = os.path.normpath(image_path)
        with self._lock:
            paths = self._read()
            if path in paths:
                self._save(paths - {path})

    def _save(self, paths: frozenset[str]) -> None:
        """Write the registered paths (the lock is held), atomically and durably."""
        make_private_directory(os.path.dirname(self.path))
        text = json.dumps({"images": sorted(paths)}, indent=1) + "\n"
        replace_private_file(self.path, text.encode(), durable=True)
        self._seen = None

    def _registered(self) -> frozenset[str]:
        with self._lock:
            return self._read()

    def _read(self) -> frozenset[str]:
        """The registered paths (the lock is held); a missing or unreadable file registers none."""
        try:
            info = os.stat(self.path)
        except OSError:
            self._seen, self._paths = None, frozenset()
            return self._paths
        if self._seen != (info.st_mtime_ns, info.st_size):
            try:
                with open(self.path, encoding="utf-8") as file:
                    images = json.load(file)["images"]
                if not isinstance(images, list):
                    raise TypeError("images is not a list")
                self._paths = frozenset(os.path.normpath(p) for p in images if isinstance(p, str))
            except (OSError, ValueError, KeyError, TypeError):
                self._paths = frozenset()  # damaged: nothing outside the data path is trusted
            self._seen = (info.st_mtime_ns, info.st_size)
        return self._paths
