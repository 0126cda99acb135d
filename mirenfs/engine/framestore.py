"""The frame store: compressed frames kept across mounts, found by what they compress.

A frame is stored under a name derived from the BLAKE3 fingerprint of its
chunk's bytes and the compression settings (which include the zstd library
version), so the same chunk compressed with the same settings is never
compressed twice, whichever disk, version or mount it belongs to: an
unchanged disk after a remount, or the 99% of a disk a nightly change left
alone, is served from here.

Each entry is one file, ``<directory>/<name[:2]>/<name>``: a header (magic,
the name, a digest of the frame, its length and seek-table checksum, and a
SHA-256 digest of those) and the frame. It is written under a temporary name
and renamed into place, and every read checks the header and the frame's
digest before the frame is served, so a torn write after a crash, a flipped
bit or a file in the wrong place is never trusted: it is removed and the
caller compresses the chunk again. (The frame's digest is 128 bits of
BLAKE3, which runs at 4.8 GB/s here, twice zlib's CRC-32; the name comes
from a 256-bit BLAKE3 hash of the chunk's bytes, so what an entry stands for
is never a weak guess.) An index pass needs only a frame's length and
checksum, which :meth:`FrameStore.describe` takes from a header that
verifies; the frame itself is verified when it is served (and compressed
again then if it fails, which gives the same length and checksum). The store
is bounded: past its limit the least recently used entries go (their mtime
is the use clock, so the order survives a restart).

Never: serve a frame that did not verify; store a frame under a fingerprint
other than that of the bytes it was compressed from (the caller's duty);
raise for a store problem (a full or read-only state directory only costs
compression, it is logged once).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import logging
import os
import struct
import sys
import threading

import blake3

from mirenfs.engine.image import make_directories, make_private_directory, temporary_writer_runs
from mirenfs.errors import size_in_words
from mirenfs.format.frames import frame_checksum

log = logging.getLogger(__name__)

MAGIC = b"MIRNFRM4"  # 4: entries named by BLAKE3 fingerprints, frames checked by BLAKE3 (3: SHA-256, CRC-32)
FINGERPRINT_ALGORITHM = "blake3"
# magic, entry name, BLAKE3 digest of the frame, frame length, the frame's seek-table checksum
_FRAME_DIGEST = 16  # bytes of BLAKE3 over the frame
_FIELDS = struct.Struct(f"<8s32s{_FRAME_DIGEST}sQI")
_DIGEST = 16  # bytes of SHA-256 over the fields, closing the header
_HEADER = _FIELDS.size + _DIGEST
_TEMPORARY = ".tmp"
FREE_SPACE_KEPT = 0.10  # of its filesystem: the store never takes the space disk images grow into
GIVE_BACK_STEP = 64 << 20  # a write that found the filesystem full is given at least this much


def fingerprint(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's identity in the store: BLAKE3 of its bytes (256 bits; at least 128 are needed).

    BLAKE3 rather than SHA-256 because the index pass computes it beside the
    image's own SHA-256 on the same two cores: it is as collision-resistant
    and about four times cheaper here (0.17 s against 0.66 s of CPU for the
    704 MiB of the benchmark's data chunks).
    """
    return blake3.blake3(data).digest()


def frames_to_give_back(directory: str, settings_key: str) -> FrameStore:
    """The frames kept in ``directory``, under no bound of their own: read only to give their
    space back to a restore that finds the filesystem full (the CLI's restore, and a mount with
    the store off: trial S22 S2). Such a store only shrinks."""
    return FrameStore(directory, sys.maxsize, settings_key)


def room_above_kept(directory: str) -> int | None:
    """The bytes a cache may still take in ``directory``'s filesystem while FREE_SPACE_KEPT of
    it stays free (0 if none; None if it cannot be told): the spill file of an index pass is
    held to it as the store is (trial S22 S1: a spill took the last free space of a full data
    path, and a restore there failed)."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    return max(0, _above_kept(fs))


def _above_kept(fs: os.statvfs_result) -> int:
    """The free bytes over FREE_SPACE_KEPT of the filesystem (negative when short of it)."""
    return fs.f_bavail * fs.f_frsize - int(fs.f_blocks * fs.f_frsize * FREE_SPACE_KEPT)


class FrameStore:
    """Frames by chunk fingerprint, for one set of compression settings (``settings_key``).

    Thread-safe: the index pass and the readers call it from worker threads.
    """

    def __init__(self, directory: str, limit: int, settings_key: str) -> None:
        self.directory = directory
        self.limit = limit
        # The fingerprint's algorithm is part of every name: entries named by another one never match.
        self._settings = hashlib.sha256(f"{FINGERPRINT_ALGORITHM}\0{settings_key}".encode()).digest()
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # LRU first
        self.bytes = 0
        self._loaded = False
        self._failed_write = False
        self._held_back = False  # the filesystem is short of space: said once, until it is not
        self._gave_back = False  # frames were given back to a full filesystem: said once, until it grows
        self._evicted_for_space = False  # frames went to keep the filesystem's tenth free: said once
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.older = 0  # entries an older mirenfs wrote in another layout: removed without a warning

    def summary(self) -> dict[str, object]:
        """For ``mirenfs status``: what it holds against its bound, and how it served since the
        mount started (``loaded`` is False until its first use reads the directory)."""
        with self._lock:
            return {
                "directory": self.directory,
                "loaded": self._loaded,
                "bytes": self.bytes,
                "limit": self.limit,
                "hits": self.hits,
                "misses": self.misses,
                "corrupt": self.corrupt,
                "held_back": self._held_back,
            }

    # ---- reading ------------------------------------------------------------

    def get(self, chunk_fingerprint: bytes) -> bytes | None:
        """The stored frame of that chunk, verified; None when absent or not trustworthy."""
        found = self._lookup(chunk_fingerprint, whole=True)
        return found[2] if found is not None else None

    def describe(self, chunk_fingerprint: bytes) -> tuple[int, int] | None:
        """The stored frame's length and seek-table checksum, from a header that verifies,
        without reading the frame (an index pass needs no more); None when absent."""
        found = self._lookup(chunk_fingerprint, whole=False)
        return (found[0], found[1]) if found is not None else None

    def _lookup(self, chunk_fingerprint: bytes, *, whole: bool) -> tuple[int, int, bytes | None] | None:
        self._load()
        name = self._name(chunk_fingerprint)
        with self._lock:
            known = name in self._entries
        found = self._read_verified(name, whole=whole) if known else None
        with self._lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        if found is not None:
            self._touch(name)
        return found

    def _read_verified(self, name: bytes, *, whole: bool) -> tuple[int, int, bytes | None] | None:
        """(length, checksum, frame or None) of an entry that verifies; a bad one is removed."""
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                header = f.read(_HEADER)
                size = os.fstat(f.fileno()).st_size
                frame = f.read() if whole else None
        except FileNotFoundError:  # removed behind the store's back (a restore's give_back, by hand)
            self._forget(name, remove=False)
            return None
        except OSError:  # out of descriptors, an I/O error: still there, still counted in the bound
            return None
        fields = _check_header(header, name, size)
        if fields is not None and (frame is None or _frame_digest(frame) == fields[0]):
            return fields[1], fields[2], frame
        if fields is None and _in_an_older_layout(header):  # trial UP F1: one warning per frame
            with self._lock:
                self.older += 1
                first = self.older == 1
            if first:
                log.info(
                    "frame store %s holds frames an older mirenfs wrote: compressed again",
                    self.directory,
                )
            self._forget(name, remove=True)
            return None
        with self._lock:
            self.corrupt += 1
        log.warning("frame store entry %s does not verify; it is removed and compressed again", path)
        self._forget(name, remove=True)
        return None

    def _touch(self, name: bytes) -> None:
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
        with contextlib.suppress(OSError):
            os.utime(self._path(name))  # the use clock a restart orders by

    # ---- writing ------------------------------------------------------------

    def put(self, chunk_fingerprint: bytes, frame: bytes) -> None:
        """Keep ``frame``, the compression of the chunk with that fingerprint (crash-safe)."""
        if self.limit <= 0:
            return
        self._load()
        name = self._name(chunk_fingerprint)
        with self._lock:
            if name in self._entries:
                return
        if not self._room_for(len(frame) + _HEADER):
            return
        size = self._write(name, frame)
        if size is None:
            return
        with self._lock:
            if name not in self._entries:  # another thread may have stored the same chunk meanwhile
                self._entries[name] = size
                self.bytes += size
            victims = self._over_limit()
        for victim in victims:
            _unlink_quietly(self._path(victim))

    def _room_for(self, length: int) -> bool:
        """Whether ``length`` more bytes leave FREE_SPACE_KEPT of the filesystem free, giving
        back least recently used frames for it: the store shares the data path with the disk
        images, whose sparse files grow as their machines write, and restores; a cache must
        never be what fills it."""
        try:
            fs = os.statvfs(self.directory)
        except OSError:
            return True  # not known: _write says what fails
        short = length - _above_kept(fs)
        victims = []
        with self._lock:
            while short > 0 and self._entries:
                victim, size = self._entries.popitem(last=False)
                self.bytes -= size
                short -= size
                victims.append(victim)
        for victim in victims:
            _unlink_quietly(self._path(victim))
        room = short <= 0
        with self._lock:  # two passes at once: said once all the same
            said, self._held_back = self._held_back, not room
            self._gave_back = self._gave_back and not room
            evicted_said, self._evicted_for_space = (
                self._evicted_for_space,
                self._evicted_for_space or bool(victims),
            )
        if victims and not evicted_said:  # trial S22 S4: frames went without a word
            log.info(
                "frame store %s gave back its %d oldest frames to keep %d%% of its filesystem free "
                "(said once per mount; on XFS, space its own recent writes reserve counts too until "
                "they are written back)",
                self.directory,
                len(victims),
                round(FREE_SPACE_KEPT * 100),
            )
        if not room and not said:
            log.warning(
                "frame store %s stops growing: its filesystem has less than %d%% free; snapshots are "
                "still served, but compressed again",
                self.directory,
                round(FREE_SPACE_KEPT * 100),
            )
        return room

    def give_back(self, device: int, needed: int) -> int:
        """Remove least recently used frames worth ``needed`` bytes (at least GIVE_BACK_STEP),
        for a write that found the filesystem ``device`` full: a restore must not fail for the
        sake of a cache. Returns the bytes freed: 0 when the store holds nothing, or lives on
        another filesystem (removing frames there frees nothing here)."""
        try:
            if os.stat(self.directory).st_dev != device:
                return 0
        except OSError:
            return 0
        self._load()
        freed = 0
        while freed < max(needed, GIVE_BACK_STEP):
            with self._lock:
                if not self._entries:
                    break
                victim, size = self._entries.popitem(last=False)
                self.bytes -= size
            if _unlink_quietly(self._path(victim)):  # not one another process removed (trial T)
                freed += size
        with self._lock:
            said, self._gave_back = self._gave_back, self._gave_back or freed > 0
            left = self.bytes
        if freed and not said:
            log.warning(
                "frame store %s gave back %s to a restore that found its filesystem full; %s; "
                "snapshots read later compress those frames again",
                self.directory,
                size_in_words(freed),
                "it is empty now"
                if not left
                else f"it holds {size_in_words(left)} now, and gives back more as restores need it",
            )
        return freed

    def may_not_keep(self, data_bytes: int) -> bool:
        """Whether a pass over ``data_bytes`` of allocated image may find its frames gone by the
        time they are read: more than the bound holds, or a filesystem short of space already.
        Such a pass keeps its frames in a spill file too, or the read compresses them again."""
        with self._lock:
            held_back = self._held_back
        return held_back or data_bytes > self.limit

    def _write(self, name: bytes, frame: bytes) -> int | None:
        """Write under a temporary name, then rename: a crash never leaves a half entry in place."""
        path = self._path(name)
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}{_TEMPORARY}"
        fields = _FIELDS.pack(MAGIC, name, _frame_digest(frame), len(frame), frame_checksum(frame))
        record = fields + hashlib.sha256(fields).digest()[:_DIGEST]
        try:
            make_directories(os.path.dirname(path), 0o700)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, record)
                _write_all(fd, frame)
            finally:
                os.close(fd)
            os.rename(temporary, path)
        except OSError as exc:
            _unlink_quietly(temporary)
            self._write_failed(exc)
            return None
        self._failed_write = False
        return len(record) + len(frame)

    def _write_failed(self, exc: OSError) -> None:
        if not self._failed_write:
            log.warning(
                "cannot keep frames in %s (%s); snapshots are still served, but compressed again",
                self.directory,
                exc.strerror or errno.errorcode.get(exc.errno or 0, "error"),
            )
        self._failed_write = True

    def _over_limit(self) -> list[bytes]:
        """Drop least recently used entries until the store fits its limit (lock held)."""
        victims = []
        while self.bytes > self.limit and self._entries:
            victim, size = self._entries.popitem(last=False)
            self.bytes -= size
            victims.append(victim)
        return victims

    def _forget(self, name: bytes, *, remove: bool) -> None:
        with self._lock:
            size = self._entries.pop(name, None)
            if size is not None:
                self.bytes -= size
        if remove:
            _unlink_quietly(self._path(name))

    # ---- the directory --------------------------------------------------------

    def _load(self) -> None:
        """Learn what a previous mount left (once): entries by their use clock, leftovers removed."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            try:
                make_private_directory(self.directory)
                found = _scan(self.directory)
            except OSError as exc:
                self._write_failed(exc)
                return
            for _mtime, name, size in sorted(found):
                self._entries[name] = size
                self.bytes += size
            victims = self._over_limit()  # the limit may be smaller than last time
        for victim in victims:
            _unlink_quietly(self._path(victim))

    def _name(self, chunk_fingerprint: bytes) -> bytes:
        return hashlib.sha256(self._settings + chunk_fingerprint).digest()

    def _path(self, name: bytes) -> str:
        text = name.hex()
        return os.path.join(self.directory, text[:2], text)


def _frame_digest(frame: bytes) -> bytes:
    """What a served frame must hash to: 128 bits of BLAKE3 (a torn or flipped frame never matches)."""
    return blake3.blake3(frame).digest(length=_FRAME_DIGEST)


def _check_header(header: bytes, name: bytes, file_size: int) -> tuple[bytes, int, int] | None:
    """(frame digest, length, checksum) from an entry's header, if it is whole and its own."""
    if (
        len(header) != _HEADER
        or hashlib.sha256(header[: _FIELDS.size]).digest()[:_DIGEST] != header[_FIELDS.size :]
    ):
        return None
    magic, stored_name, frame_digest, length, checksum = _FIELDS.unpack_from(header)
    if magic != MAGIC or stored_name != name or not length or file_size != _HEADER + length:
        return None
    return frame_digest, length, checksum


_OLDER_FIELDS = struct.Struct("<8s32sIQI")  # before BLAKE3 checked the frame: zlib's CRC-32 did


def _in_an_older_layout(header: bytes) -> bool:
    """Whether an entry's header is a whole one of the layout an older mirenfs wrote under the same
    magic (its frame checked by CRC-32): not corrupt, just of another version."""
    fields = header[: _OLDER_FIELDS.size]
    closing = header[_OLDER_FIELDS.size : _OLDER_FIELDS.size + _DIGEST]
    return (
        len(closing) == _DIGEST
        and fields[:8] == MAGIC
        and hashlib.sha256(fields).digest()[:_DIGEST] == closing
    )


def _scan(directory: str) -> list[tuple[int, bytes, int]]:
    """(mtime, name, size) of every entry; temporary files of an interrupted write are removed
    (those of a process still running are another mount's writes in progress: left alone)."""
    found: list[tuple[int, bytes, int]] = []
    for sub in os.scandir(directory):
        if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
            continue
        for entry in os.scandir(sub.path):
            if entry.name.endswith(_TEMPORARY):
                if not _writer_runs(entry.name):
                    _unlink_quietly(entry.path)
                continue
            try:
                name = bytes.fromhex(entry.name)
                info = entry.stat(follow_symlinks=False)
            except (ValueError, OSError):
                continue
            if len(name) == 32 and entry.is_file(follow_symlinks=False):
                found.append((info.st_mtime_ns, name, info.st_size))
    return found


def _writer_runs(temporary_name: str) -> bool:
    """Whether the process that names itself in ``NAME.PID.THREAD.tmp`` still runs."""
    return temporary_writer_runs(temporary_name) is True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: str) -> bool:
    """Remove ``path``; whether it was there to remove."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
