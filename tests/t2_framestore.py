"""The frame store in the engine: the same bytes with and without it, nothing compressed twice,
a corrupt or torn entry recompressed (never served), a bound kept, private files."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio

from mirenfs.engine import framestore, sha256
from mirenfs.engine.framestore import FrameStore
from mirenfs.engine.image import FdImageSource, OpenImage
from mirenfs.engine.produce import (
    FrameCache,
    Settings,
    SnapshotIndex,
    SnapshotProducer,
    StaleIndexError,
    build_index,
    snapshot_meta,
)
from mirenfs.format.frames import compress_frame
from mirenfs.mount.versions import IndexCache, header_names

from support.data import write_image

SMALL = Settings(chunk_size=64 * 1024)
SEGMENTS = [("text", 300_000), ("hole", 200_000), ("data", 150_000), ("zero", 70_000), ("text", 12_345)]


def new_store(tmp_path: Path, limit: int = 1 << 30) -> FrameStore:
    return FrameStore(str(tmp_path / "state" / "frames"), limit, SMALL.key())


def snapshot_of(image: Path, store: FrameStore | None) -> tuple[bytes, SnapshotIndex]:
    """The whole snapshot of ``image`` read through a producer, and its index."""

    async def run() -> tuple[bytes, SnapshotIndex]:
        handle = OpenImage.open(str(image))
        try:
            source = handle.source(SMALL)
            index = await build_index(source, SMALL, store=store)
            meta = snapshot_meta("d", "ext4", handle.size, handle.mtime_ns, index.checksum)
            producer = SnapshotProducer(source, SMALL, meta, index, store=store)
            return await producer.read(0, producer.size), index
        finally:
            handle.close()

    return trio.run(run)


def data_chunks(index: SnapshotIndex) -> int:
    return index.frame_count - sum(index.zero_chunks)


def stored_files(store: FrameStore) -> Iterator[Path]:
    return (path for path in Path(store.directory).rglob("*") if path.is_file())


def test_bytes_are_identical_with_and_without_the_store(tmp_path: Path, compressions: list[int]) -> None:
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    plain, plain_index = snapshot_of(image, None)
    store = new_store(tmp_path)
    stored, index = snapshot_of(image, store)
    assert stored == plain
    assert (index.checksum, index.frame_sizes, index.frame_checksums) == (
        plain_index.checksum,
        plain_index.frame_sizes,
        plain_index.frame_checksums,
    )
    assert len(index.fingerprints) == 32 * index.frame_count
    again, _ = snapshot_of(image, new_store(tmp_path))  # another mount: the store on disk answers
    assert again == plain


def test_fingerprints_are_blake3_of_each_data_chunk(tmp_path: Path, compressions: list[int]) -> None:
    """The index records BLAKE3 of every data chunk (none for zero chunks), each compressed once."""
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    raw = image.read_bytes()
    chunk = SMALL.chunk_size
    _, index = snapshot_of(image, new_store(tmp_path))
    for k in range(index.frame_count):
        piece = raw[k * chunk : (k + 1) * chunk]
        expected = None if index.zero_chunks[k] else blake3.blake3(piece).digest()
        assert index.fingerprint(k) == expected
    assert len(compressions) == data_chunks(index)


def test_a_second_pass_compresses_nothing(tmp_path: Path, compressions: list[int]) -> None:
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    snapshot_of(image, new_store(tmp_path))
    compressions.clear()
    store = new_store(tmp_path)
    snapshot_of(image, store)
    assert compressions == []
    assert store.hits > 0 and store.corrupt == 0


def test_a_remount_serves_every_frame_from_the_store_without_reading_the_image(tmp_path: Path) -> None:
    """With the index's fingerprints (the persisted index after a remount), no chunk is read."""
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    expected, index = snapshot_of(image, new_store(tmp_path))

    class Unreadable(FdImageSource):
        def read_chunk(self, index: int) -> bytearray | None:
            raise AssertionError(f"chunk {index} was read")

    async def run() -> bytes:
        handle = OpenImage.open(str(image))
        try:
            source = Unreadable(handle.fd, handle.size, SMALL.chunk_size)
            meta = snapshot_meta("d", "ext4", handle.size, handle.mtime_ns, index.checksum)
            decoded = SnapshotIndex.from_bytes(index.to_bytes())
            producer = SnapshotProducer(source, SMALL, meta, decoded, store=new_store(tmp_path))
            return await producer.read(0, producer.size)
        finally:
            handle.close()

    assert trio.run(run) == expected


def test_after_a_small_change_only_the_changed_chunk_compresses(
    tmp_path: Path, compressions: list[int]
) -> None:
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    snapshot_of(image, new_store(tmp_path))
    with open(image, "r+b") as f:
        f.seek(SMALL.chunk_size * 2 + 100)
        f.write(b"a small change")
    compressions.clear()
    changed, _ = snapshot_of(image, new_store(tmp_path))
    assert compressions == [SMALL.chunk_size]
    assert changed == snapshot_of(image, None)[0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # a flipped bit in the frame
        lambda data: data[: len(data) // 2],  # a torn write
        lambda data: b"",  # an empty file after a crash
        lambda data: data[:8] + bytes(32) + data[40:],  # another entry's name
    ],
    ids=["bit flip", "torn", "empty", "wrong name"],
)
def test_a_damaged_entry_is_recompressed_never_served(
    tmp_path: Path, compressions: list[int], damage: Callable[[bytes], bytes]
) -> None:
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    expected, index = snapshot_of(image, new_store(tmp_path))
    victim = max(stored_files(new_store(tmp_path)), key=lambda path: path.stat().st_size)
    victim.write_bytes(damage(victim.read_bytes()))
    compressions.clear()
    store = new_store(tmp_path)
    again, _ = snapshot_of(image, store)
    assert again == expected
    assert len(compressions) == 1 and store.corrupt == 1
    store = new_store(tmp_path)  # the entry was written again, whole
    snapshot_of(image, store)
    assert store.corrupt == 0 and store.hits == 2 * data_chunks(index)


def test_a_frame_the_store_does_not_hold_is_one_miss(tmp_path: Path) -> None:
    """Trial S22 S10: a read after a remount (its index saved, its frames gone) asked the store
    twice for each frame it did not hold, and `mirenfs status` counted two misses each."""
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    expected, index = snapshot_of(image, new_store(tmp_path))
    for entry in list(stored_files(new_store(tmp_path))):
        entry.unlink()
    store = new_store(tmp_path)

    async def read_with_the_saved_index() -> bytes:
        handle = OpenImage.open(str(image))
        try:
            meta = snapshot_meta("d", "ext4", handle.size, handle.mtime_ns, index.checksum)
            producer = SnapshotProducer(handle.source(SMALL), SMALL, meta, index, store=store)
            return await producer.read(0, producer.size)
        finally:
            handle.close()

    assert trio.run(read_with_the_saved_index) == expected
    assert (store.hits, store.misses) == (0, data_chunks(index))


def test_an_entry_an_older_mirenfs_wrote_is_recompressed_without_a_warning(
    tmp_path: Path, compressions: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """Trial UP F1: entries of the layout before BLAKE3 checked frames (same magic, CRC-32) were
    each "frame store entry … does not verify" at WARNING after an upgrade, and counted corrupt."""
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    expected, _ = snapshot_of(image, new_store(tmp_path))
    for entry in stored_files(new_store(tmp_path)):
        data = entry.read_bytes()
        magic, name, _digest, length, checksum = framestore._FIELDS.unpack_from(data)
        fields = framestore._OLDER_FIELDS.pack(
            magic, name, zlib.crc32(data[framestore._HEADER :]), length, checksum
        )
        entry.write_bytes(fields + hashlib.sha256(fields).digest()[:16] + data[framestore._HEADER :])
    compressions.clear()
    caplog.set_level(logging.INFO, logger="mirenfs")
    store = new_store(tmp_path)
    again, _ = snapshot_of(image, store)
    assert again == expected and compressions and (store.corrupt, store.older) == (0, len(compressions))
    assert "does not verify" not in caplog.text
    assert caplog.text.count("holds frames an older mirenfs wrote") == 1


def test_the_store_keeps_its_bound_least_recently_used_first(tmp_path: Path) -> None:
    store = new_store(tmp_path, limit=10_000)
    frames = {bytes([n]) * 32: os.urandom(3000) for n in range(5)}
    for fingerprint, frame in frames.items():
        store.put(fingerprint, frame)
        if fingerprint == bytes([1]) * 32:
            assert store.get(bytes([0]) * 32) is not None  # 0 is used: 1 is now the oldest
    assert store.bytes <= 10_000
    assert store.get(bytes([1]) * 32) is None
    assert store.get(bytes([4]) * 32) == frames[bytes([4]) * 32]
    reopened = new_store(tmp_path, limit=4_000)  # a smaller bound at the next mount
    assert reopened.get(bytes([4]) * 32) == frames[bytes([4]) * 32]
    assert reopened.bytes <= 4_000 and len(list(stored_files(reopened))) == 1


def test_the_store_gives_back_its_oldest_frames_to_a_full_filesystem_once_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore that finds the data path full takes the frames' space back, least recently used
    first and at least a step at a time; a store on another filesystem frees nothing there."""
    monkeypatch.setattr("mirenfs.engine.framestore.GIVE_BACK_STEP", 5_000)
    store = new_store(tmp_path)
    frames = {bytes([n]) * 32: os.urandom(3000) for n in range(5)}
    for fingerprint, frame in frames.items():
        store.put(fingerprint, frame)
        if fingerprint == bytes([1]) * 32:
            assert store.get(bytes([0]) * 32) is not None  # 0 is used: 1 is now the oldest
    device = os.stat(store.directory).st_dev
    assert store.give_back(device + 1, 1 << 30) == 0 and len(list(stored_files(store))) == 5
    with caplog.at_level(logging.WARNING):
        freed = store.give_back(device, 1)
        left = {fingerprint for fingerprint in frames if store.get(fingerprint) is not None}
        assert left == {bytes([n]) * 32 for n in (2, 3, 4)}  # 1, then 0 (used before 2 came): 5000 or more
        assert freed >= 5_000 and store.bytes == sum(path.stat().st_size for path in stored_files(store))
        assert store.give_back(device, 7_000) >= 7_000 and len(list(stored_files(store))) == 0
        assert store.give_back(device, 1) == 0  # nothing left to give
    said = [record.getMessage() for record in caplog.records if "gave" in record.getMessage()]
    assert len(said) == 1 and "to a restore that found its filesystem full" in said[0], said


def test_frames_another_process_removed_are_not_counted_as_given_back(tmp_path: Path) -> None:
    """Trial T: after ``mirenfs restore`` took the store's space back, a mount's store still
    counted those frames, and said it gave back 65.5 MiB where 11 MiB came free."""
    store = new_store(tmp_path)
    for n in range(4):
        store.put(bytes([n]) * 32, os.urandom(3000))
    sizes = {path: path.stat().st_size for path in stored_files(store)}
    elsewhere = new_store(tmp_path)  # another mount of the data path, or the CLI
    device = os.stat(store.directory).st_dev
    assert elsewhere.give_back(device, 1) == sum(sizes.values())
    assert store.give_back(device, 1) == 0 and store.bytes == 0


def test_an_entry_that_cannot_be_opened_now_stays_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: any error opening an entry (out of descriptors) dropped it from the store's count
    but left its file, so the store could grow past its bound. Only a file that is gone is
    forgotten; one that cannot be read now is compressed again this time, and kept."""
    store = new_store(tmp_path)
    frame, other = os.urandom(3000), os.urandom(3000)
    store.put(bytes(32), frame)
    store.put(bytes([1]) * 32, other)
    counted = store.bytes
    real_open = open

    def out_of_descriptors(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith(store.directory):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", out_of_descriptors)
    assert store.get(bytes(32)) is None
    monkeypatch.setattr("builtins.open", real_open)
    assert store.bytes == counted and store.get(bytes(32)) == frame
    gone = [path for path in stored_files(store) if path.read_bytes().endswith(other)]
    gone[0].unlink()  # removed behind the store's back: no longer counted
    assert store.get(bytes([1]) * 32) is None and store.bytes < counted


def test_store_files_are_private_and_leftovers_of_a_crash_go(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    store.put(bytes(32), b"frame")
    files = list(stored_files(store))
    assert [stat.S_IMODE(path.stat().st_mode) for path in files] == [0o600]
    directories = [Path(store.directory), files[0].parent]
    assert [stat.S_IMODE(path.stat().st_mode) for path in directories] == [0o700, 0o700]
    gone = subprocess.Popen(["true"])  # a process that has ended: its pid names no writer
    gone.wait()
    leftover = files[0].parent / (files[0].name + f".{gone.pid}.456.tmp")
    leftover.write_bytes(b"half a frame")
    # Trial N: a second mount of the data path, starting, removed the first one's writes in
    # progress. A temporary whose writer still runs is left alone.
    in_progress = files[0].parent / (files[0].name + f".{os.getpid()}.789.tmp")
    in_progress.write_bytes(b"being written")
    new_store(tmp_path).get(bytes(32))
    assert not leftover.exists() and in_progress.exists()


def test_a_store_may_not_keep_a_pass_bigger_than_its_bound_or_while_held_back(tmp_path: Path) -> None:
    """Trial N: with a bound below a disk's frames each put evicted the one before, and the read
    after the pass compressed everything again. Such a pass spills its frames too."""
    store = new_store(tmp_path, limit=10_000)
    assert store.may_not_keep(20_000) and not store.may_not_keep(10_000)
    store._held_back = True  # the filesystem is short of space: frames are given back as they come
    assert store.may_not_keep(1)


def test_two_passes_short_of_space_at_once_say_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial N: the "stops growing" warning came twice in the same millisecond."""
    store = new_store(tmp_path)
    store.put(bytes(32), b"frame")  # loaded, so both threads go straight to the room check
    both_looked = threading.Barrier(2, timeout=10)
    real_statvfs = os.statvfs

    def statvfs(path: str) -> os.statvfs_result:
        shown = list(real_statvfs(path))
        if str(path).startswith(store.directory):
            both_looked.wait()  # both threads see a full filesystem at the same moment
            shown[4] = 0  # f_bavail
        return os.statvfs_result(shown)

    both_warned = threading.Barrier(2, timeout=0.5)

    class SlowToSay(logging.Handler):
        """The first warning waits (up to 0.5 s) for a second one: the moment a check outside
        the lock lets the other thread warn too."""

        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_warned.wait()

    monkeypatch.setattr(os, "statvfs", statvfs)
    caplog.set_level(logging.WARNING, logger="mirenfs")
    slow = SlowToSay(logging.WARNING)
    logging.getLogger("mirenfs").addHandler(slow)
    try:
        threads = [threading.Thread(target=store.put, args=(bytes([n]) * 32, b"f" * 100)) for n in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    finally:
        logging.getLogger("mirenfs").removeHandler(slow)
    assert [r.getMessage() for r in caplog.records if "stops growing" in r.getMessage()] == [
        f"frame store {store.directory} stops growing: its filesystem has less than 10% free; "
        "snapshots are still served, but compressed again"
    ]


def test_settings_are_part_of_the_key(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    store.put(bytes(32), b"frame")
    other = FrameStore(store.directory, 1 << 30, Settings(chunk_size=64 * 1024, level=5).key())
    assert other.get(bytes(32)) is None


# 2 had SHA-256 fingerprints, which no store entry is named by now
@pytest.mark.parametrize("older", [1, 2])
def test_an_index_of_an_older_format_is_stale_not_corrupt(tmp_path: Path, older: int) -> None:
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    _, index = snapshot_of(image, new_store(tmp_path))
    assert SnapshotIndex.from_bytes(index.to_bytes()) == index
    body = json.dumps({**json_index(index), "format": older}).encode()  # as formats 1 to 3 were: all JSON
    with pytest.raises(StaleIndexError):
        SnapshotIndex.from_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def json_index(index: SnapshotIndex) -> dict[str, object]:
    """``index`` as format 3 wrote it: one JSON object, its arrays in base64."""

    def pack(values: bytes | bytearray | memoryview) -> str:
        return base64.b64encode(bytes(values)).decode("ascii")

    return {
        "format": 3,
        "size_bytes": index.size_bytes,
        "chunk_size": index.chunk_size,
        "settings": index.settings_key,
        "checksum": index.checksum,
        "frame_sizes": pack(memoryview(index.frame_sizes).cast("B")),
        "frame_checksums": pack(memoryview(index.frame_checksums).cast("B")),
        "zero_chunks": pack(index.zero_chunks),
        "fingerprints": pack(index.fingerprints),
        "midstates": pack(index.midstates),
    }


def test_an_index_of_format_3_is_read_and_written_back_in_the_current_format(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 3 (all JSON) is still read: a new mirenfs does not hash every disk again. The
    cache rewrites the entry in the current format as it reads it."""
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    _, index = snapshot_of(image, new_store(tmp_path))
    body = json.dumps(json_index(index), sort_keys=True).encode()
    legacy = hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    decoded = SnapshotIndex.from_bytes(legacy)
    assert decoded == index and decoded.read_format == 3
    cache = IndexCache(str(tmp_path / "index"))
    entry = Path(cache.path_for(str(image)))
    entry.write_bytes(b"identity\n-\n" + legacy)
    with caplog.at_level(logging.INFO):
        assert cache.load(str(image), "identity") == (index, None)
    assert not [record for record in caplog.records if record.levelno >= logging.INFO], caplog.text
    rewritten = entry.read_bytes()
    assert rewritten == b"identity\n-\n" + index.to_bytes()
    assert cache.load(str(image), "identity") == (index, None)
    assert entry.read_bytes() == rewritten  # read in the current format: left as it is


def test_the_sidecar_line_of_an_index_cache_entry_is_checked_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trial N: the index verified, but a flipped digit in the snapshot's SHA-256 kept beside it
    was served as NAME.mirn.sha256 on every remount, so `sha256sum -c` said FAILED of good
    copies. Now the line carries its own check: a flip costs that checksum, computed again."""
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    _, index = snapshot_of(image, new_store(tmp_path))
    cache = IndexCache(str(tmp_path / "index"))
    entry = Path(cache.path_for(str(image)))
    digest = hashlib.sha256(b"the snapshot").hexdigest()
    names = header_names("pg", "ext4")
    cache.save(str(image), "identity", index, digest, names)
    assert cache.load(str(image), "identity", names) == (index, digest)
    key, line, body = entry.read_bytes().split(b"\n", 2)
    assert line.split(b" ")[0] == digest.encode() and len(line) == 64 + 1 + 16 + 1 + 16
    flipped = (b"0" if line[:1] != b"0" else b"1") + line[1:]
    entry.write_bytes(b"\n".join([key, flipped, body]))
    caplog.set_level(logging.WARNING, logger="mirenfs")
    assert cache.load(str(image), "identity", names) == (index, None)  # the index kept, the digest not
    assert f"index cache {entry} has a corrupt sidecar line; its checksum is computed again" in caplog.text
    assert cache.load(str(image), "identity", names) == (index, None)  # said once: the entry was rewritten
    assert caplog.text.count("corrupt sidecar line") == 1
    # Lines older versions wrote (the digest alone; the digest and its check, without the names)
    # do not say which disk's snapshot the digest is of (trial UP: after `disk remove pg` and
    # `disk add pg2` of the same image, pg2.mirn.sha256 said pg's checksum): the index is kept,
    # the digest is computed again.
    for older in (digest.encode(), b" ".join(line.split(b" ")[:1]) + b" " + older_check(digest)):
        entry.write_bytes(b"\n".join([key, older, body]))
        assert cache.load(str(image), "identity", names) == (index, None)
        assert entry.read_bytes().split(b"\n", 2)[1] == b"-"
    # The same image under another name or filesystem is another snapshot file: its checksum is
    # computed again, without a word (review: pg2.mirn.sha256 said pg's checksum).
    for other in (header_names("pg2", "ext4"), header_names("pg", "xfs")):
        assert cache.load(str(image), "identity", other) == (index, None)
    assert caplog.text.count("corrupt sidecar line") == 1 and "another" not in caplog.text


def older_check(digest: str) -> bytes:
    """The check of a sidecar line as mirenfs wrote it before the line named its snapshot."""
    return hashlib.sha256(f"identity\n{digest}".encode()).hexdigest()[:16].encode()


# ---- hashing resumes after the unchanged chunks -------------------------------------------


def pass_over(image: Path, store: FrameStore, basis: SnapshotIndex | None) -> SnapshotIndex:
    async def run() -> SnapshotIndex:
        handle = OpenImage.open(str(image))
        try:
            return await build_index(handle.source(SMALL), SMALL, store=store, basis=basis)
        finally:
            handle.close()

    return trio.run(run)


# Resuming needs libcrypto's SHA256_* functions (engine/sha256.py); without them it is skipped.
needs_libcrypto = pytest.mark.skipif(not sha256.AVAILABLE, reason="libcrypto's SHA256 functions are missing")


@needs_libcrypto
@pytest.mark.parametrize(
    ("offset", "first_hashed"),
    [(10, 0), (SMALL.chunk_size * 3 + 5, 3), (300_000 + 200_000 + 150_000 + 70_000 + 12_000, 11), (None, 12)],
    ids=["first chunk", "a middle chunk", "the last chunk", "nothing (touch)"],
)
def test_a_pass_with_a_basis_hashes_from_the_first_changed_chunk(
    tmp_path: Path, offset: int | None, first_hashed: int
) -> None:
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    store = new_store(tmp_path)
    basis = pass_over(image, store, None)
    assert basis.frame_count == 12 and basis.hashed_from == 0
    with open(image, "r+b") as f:
        if offset is not None:
            f.seek(offset)
            f.write(b"changed")
    index = pass_over(image, store, basis)
    assert index.hashed_from == first_hashed
    assert index.checksum == hashlib.sha256(image.read_bytes()).hexdigest()
    assert index.midstates == pass_over(image, new_store(tmp_path / "other"), None).midstates


def test_a_basis_of_another_shape_is_not_used(tmp_path: Path) -> None:
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    store = new_store(tmp_path)
    basis = pass_over(image, store, None)
    with open(image, "ab") as f:
        f.write(b"grown")
    index = pass_over(image, store, basis)
    assert index.hashed_from == 0
    assert index.checksum == hashlib.sha256(image.read_bytes()).hexdigest()


def test_without_libcrypto_every_pass_hashes_everything_and_stays_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review F: the fallback where libcrypto's SHA256_* are missing had no test: hashlib from
    the first byte on each pass, no states kept, the same checksums."""
    monkeypatch.setattr(sha256, "AVAILABLE", False)
    monkeypatch.setattr(sha256, "_LIBCRYPTO", None)
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    store = new_store(tmp_path)
    basis = pass_over(image, store, None)
    with open(image, "r+b") as f:
        f.seek(SMALL.chunk_size * 3 + 5)
        f.write(b"changed")
    index = pass_over(image, store, basis)
    assert (basis.midstates, index.midstates, index.hashed_from) == (b"", b"", 0)
    assert index.checksum == hashlib.sha256(image.read_bytes()).hexdigest()


@needs_libcrypto
def test_resumable_sha256_hashes_bytes_whatever_the_buffer_items() -> None:
    """Review F: ``len()`` of a view counts items, so a view of 8-byte items hashed an eighth."""
    data = bytearray(os.urandom(8192))
    for view in (memoryview(data).cast("Q"), memoryview(data).cast("I")[:1000]):
        hashed = sha256.ResumableSha256()
        hashed.update(view)
        assert hashed.hexdigest() == hashlib.sha256(view.tobytes()).hexdigest()


@needs_libcrypto
def test_resumable_sha256_matches_hashlib_and_resumes() -> None:
    data = os.urandom(1 << 20)
    whole = sha256.ResumableSha256()
    for start, stop in [(0, 1), (1, 4096), (4096, 4096), (4096, 700_001), (700_001, 1 << 20)]:
        whole.update(bytearray(data[start:stop]))
    assert whole.hexdigest() == hashlib.sha256(data).hexdigest()
    first = sha256.ResumableSha256()
    first.update(memoryview(data)[:65536])  # read-only: copied, still right
    resumed = sha256.ResumableSha256(first.midstate())
    resumed.update(bytearray(data[65536:]))
    assert resumed.digest() == hashlib.sha256(data).digest()
    first.update(b"x")
    with pytest.raises(ValueError):
        first.midstate()


def test_a_reader_of_the_old_version_gets_its_bytes_from_the_store_after_a_change(tmp_path: Path) -> None:
    """SPEC §5: a reader of the old version gets consistent old bytes or EIO; with the store, the
    old frames are still there, so it gets the old bytes."""
    image = tmp_path / "img"
    write_image(image, SEGMENTS)
    store = new_store(tmp_path)

    async def run() -> tuple[bytes, bytes]:
        handle = OpenImage.open(str(image))
        try:
            source = handle.source(SMALL)
            index = await build_index(source, SMALL, store=store)
            meta = snapshot_meta("d", "ext4", handle.size, handle.mtime_ns, index.checksum)
            producer = SnapshotProducer(source, SMALL, meta, index, store=store, cache=FrameCache(0))
            before = await producer.read(0, producer.size)
            write_image(image, SEGMENTS, seed=9)  # every data chunk changes, in place
            return before, await producer.read(0, producer.size)
        finally:
            handle.close()

    before, after = trio.run(run)
    assert after == before


def test_the_store_leaves_a_tenth_of_its_filesystem_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store shares the data path with disk images that grow as their machines write: it gives
    back its oldest frames rather than take the last tenth of the filesystem, and stops storing
    (saying so once) when that is not enough."""
    store = new_store(tmp_path)
    frames = {bytes([n]) * 32: compress_frame(os.urandom(100_000), 1) for n in range(4)}
    total, free = 1000 << 20, [300 << 20]  # a filesystem of 1000 MiB, as the store sees it
    real_statvfs = os.statvfs

    def statvfs(path: str) -> os.statvfs_result:
        if not str(path).startswith(store.directory):
            return real_statvfs(path)
        shown = list(real_statvfs(path))
        shown[1], shown[2], shown[4] = 1, total, free[0]  # f_frsize, f_blocks, f_bavail
        return os.statvfs_result(shown)

    monkeypatch.setattr(os, "statvfs", statvfs)
    first, second, third, fourth = frames
    store.put(first, frames[first])
    store.put(second, frames[second])
    assert store.get(first) == frames[first] and store.get(second) == frames[second]
    free[0] = 100 << 20  # exactly the tenth kept: a new frame needs an old one's room
    caplog.set_level(logging.INFO, logger="mirenfs")
    store.put(third, frames[third])
    assert store.get(first) is None and store.get(third) == frames[third]  # the least recently used went
    assert store.get(second) == frames[second]
    gave = [r.getMessage() for r in caplog.records if "oldest frames to keep" in r.getMessage()]
    assert gave and gave[0].startswith(  # trial S22 S4: said, once
        f"frame store {store.directory} gave back its 1 oldest frames to keep 10% of its filesystem free"
    )
    free[0] = 10 << 20  # far below: everything is given back, and nothing new is kept
    store.put(fourth, frames[fourth])
    store.put(fourth, frames[fourth])
    assert store.bytes == 0 and all(store.get(key) is None for key in frames)
    assert len([r for r in caplog.records if "oldest frames to keep" in r.getMessage()]) == 1
    assert [r.getMessage() for r in caplog.records if "stops growing" in r.getMessage()] == [
        f"frame store {store.directory} stops growing: its filesystem has less than 10% free; "
        "snapshots are still served, but compressed again"
    ]
    assert not any(name for _dir, _subdirs, names in os.walk(store.directory) for name in names)
