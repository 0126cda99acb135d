"""The streaming engine: Go vectors restore, round trips are exact, ranges match the stream."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import stat
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirenfs import Meta, Timestamp, backup, read_header, restore_image
from mirenfs.disks.live import image_in_use
from mirenfs.engine import files as files_module
from mirenfs.engine import produce as produce_module
from mirenfs.engine.consume import RestoreStream
from mirenfs.engine.files import (
    OpenImage,
    SnapshotOf,
    backup_image,
    reading_rules,
    restore_file,
    verify_file,
    write_snapshot,
)
from mirenfs.engine.image import FdImageSource, FileObjectSource, ImageIdentity, ensure_unchanged
from mirenfs.engine.pipeline import BULK_WORK
from mirenfs.engine.produce import Settings, SnapshotIndex, SnapshotProducer, build_index, snapshot_meta
from mirenfs.errors import FormatError, ImageChangedError
from mirenfs.format.frames import compress_frame, parse_seek_table
from mirenfs.format.header import decode_header
from mirenfs.mount import versions

from support.data import sha256_file, staging_files, write_image
from support.streams import hold_the_hash_lane
from support.vectors import GO_VECTORS, GoVector

SMALL = Settings(chunk_size=64 * 1024)  # small chunks so small images have many frames


@pytest.mark.parametrize("vector", GO_VECTORS, ids=lambda v: v.file)
def test_go_vector_restores_to_listed_checksum(vector: GoVector, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    meta = trio.run(lambda: restore_file(str(vector.path), str(image), overwrite=False))
    assert (meta.name, meta.size_bytes, meta.filesystem) == (
        vector.name,
        vector.size_bytes,
        vector.filesystem,
    )
    assert image.stat().st_size == vector.size_bytes
    assert sha256_file(image) == vector.sha256
    assert staging_files(tmp_path) == []
    assert image.stat().st_mtime_ns == meta.timestamp.unix_ns  # so a backup reproduces the timestamp


def test_restored_sparse_vector_is_sparse(tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    trio.run(lambda: restore_file(str(GO_VECTORS[1].path), str(image), overwrite=False))
    assert image.stat().st_size == 67110872
    assert image.stat().st_blocks * 512 < 1_000_000


def test_restored_ext4_vector_passes_e2fsck(tmp_path: Path, need_tool) -> None:
    image = tmp_path / "ext4.img"
    trio.run(lambda: restore_file(str(GO_VECTORS[0].path), str(image), overwrite=False))
    result = subprocess.run([need_tool("e2fsck"), "-fn", str(image)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


SEGMENT = st.tuples(
    st.sampled_from(["hole", "zero", "data", "text"]),
    st.one_of(st.integers(1, 5000), st.sampled_from([4096, 65536, 65535, 65537, 131072, 200_000])),
)


def _snapshot(image: Path, out: Path, name: str = "disk") -> Meta:
    return trio.run(lambda: backup_image(str(image), str(out), name=name, filesystem="ext4", settings=SMALL))


def test_a_backup_to_a_file_has_no_name_until_it_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing named exists while it is written, so a SIGKILL (no handler runs) leaves nothing:
    the trial found a hidden ``.FILE.xxxx.tmp`` of 64 MiB after a ``kill -9``. A replaced
    backup is replaced whole; the new one is private (0600)."""
    image, output = tmp_path / "disk.img", tmp_path / "out.mirn"
    write_image(image, [("text", 1 << 20), ("hole", 1 << 20)])
    output.write_bytes(b"last night's backup")
    seen_while_writing: list[list[str]] = []
    write_snapshot = files_module.write_snapshot

    async def watched(*args: Any, **kwargs: Any) -> Meta:
        meta = await write_snapshot(*args, **kwargs)
        seen_while_writing.append(sorted(os.listdir(tmp_path)))
        return meta

    monkeypatch.setattr(files_module, "write_snapshot", watched)
    meta = _snapshot(image, output)
    assert seen_while_writing == [["disk.img", "out.mirn"]]
    assert sorted(os.listdir(tmp_path)) == ["disk.img", "out.mirn"]
    assert read_header(io.BytesIO(output.read_bytes())) == meta
    assert stat.S_IMODE(output.stat().st_mode) == 0o600


def test_a_backup_to_a_file_is_durable_under_its_name_before_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: the file was fsynced, but not its directory after the rename, so a crash right
    after "backed up" could leave the old backup, or none, under the name."""
    image, output = tmp_path / "disk.img", tmp_path / "out.mirn"
    write_image(image, [("text", 1 << 20)])
    steps: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            steps.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def rename(old: str, new: str, **at: int) -> None:
        real_rename(old, new, **at)
        steps.append(f"rename to {os.path.basename(new)}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    _snapshot(image, output)
    assert steps == ["rename to out.mirn", f"fsync {tmp_path}"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(SEGMENT, max_size=8), seed=st.integers(0, 2**32))
def test_round_trip_is_exact(tmp_path: Path, segments: list[tuple[str, int]], seed: int) -> None:
    ranges = random.Random(seed)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    image, snap, restored = work / "img", work / "snap.mirn", work / "restored"
    content = write_image(image, segments, seed=len(segments))
    meta = _snapshot(image, snap)
    data = snap.read_bytes()

    # The header is right and zstd itself decompresses the data section.
    header_meta, header_len = decode_header(data)
    assert header_meta == meta and meta.size_bytes == len(content)
    assert meta.checksum == hashlib.sha256(content).hexdigest()
    unzstd = subprocess.run(["zstd", "-d", "-c"], input=data[header_len:], capture_output=True, timeout=60)
    assert unzstd.returncode == 0, unzstd.stderr
    assert unzstd.stdout == content

    # The seek table describes every frame.
    if content:
        entries = parse_seek_table(data[header_len:])
        assert sum(d for _, d, _ in entries) == len(content)
        assert len(entries) == -(-len(content) // SMALL.chunk_size)

    # Restore reproduces the image; a second backup gives the same bytes.
    trio.run(lambda: restore_file(str(snap), str(restored), overwrite=False))
    assert restored.read_bytes() == content
    again = work / "again.mirn"
    _snapshot(image, again)
    assert again.read_bytes() == data

    # Any byte range produced from the index equals the same slice of the stream.
    async def check_ranges() -> None:
        handle = OpenImage.open(str(image))
        try:
            source = FdImageSource(handle.fd, handle.size, SMALL.chunk_size)
            index = await build_index(source, SMALL)
            producer = SnapshotProducer(source, SMALL, meta, index)
            assert producer.size == len(data)
            for _ in range(12):
                offset = ranges.randrange(0, len(data) + 100)
                size = ranges.choice([1, 7, 4096, 65536, 200_000, len(data)])
                assert await producer.read(offset, size) == data[offset : offset + size]
        finally:
            handle.close()

    trio.run(check_ranges)


def test_holes_are_never_read(tmp_path: Path) -> None:
    """A chunk inside a hole must come from the precomputed frame, without a read."""
    image = tmp_path / "img"
    write_image(image, [("data", 5000), ("hole", 10 * 65536), ("data", 100)])
    handle = OpenImage.open(str(image))
    reads: list[int] = []
    source = FdImageSource(handle.fd, handle.size, SMALL.chunk_size)
    original = os.preadv

    def counting_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append(offset)
        return original(fd, buffers, offset)

    try:
        os.preadv = counting_preadv  # type: ignore[assignment]
        index = trio.run(build_index, source, SMALL)
    finally:
        os.preadv = original  # type: ignore[assignment]
        handle.close()
    assert all(offset < 65536 or offset >= 10 * 65536 for offset in reads), reads
    assert sum(index.zero_chunks) >= 9


def test_chunks_wholly_in_holes_are_settled_without_a_read(tmp_path: Path) -> None:
    """Only chunks that hold data go to a worker thread to be read; the index is the one a
    source that knows no holes (every chunk read and found zero) gives."""
    image = tmp_path / "img"
    write_image(image, [("data", 5000), ("hole", 10 * 65536), ("data", 70_000), ("hole", 3 * 65536 + 11)])
    asked: list[int] = []

    class Recording(FdImageSource):
        def read_chunk(self, index: int) -> bytearray | None:
            asked.append(index)
            return super().read_chunk(index)

    handle = OpenImage.open(str(image))
    try:
        index = trio.run(build_index, Recording(handle.fd, handle.size, SMALL.chunk_size), SMALL)
        with open(image, "rb") as fileobj:
            unaware = trio.run(build_index, FileObjectSource(fileobj, handle.size, SMALL.chunk_size), SMALL)
    finally:
        handle.close()
    assert sorted(asked) == [0, 10, 11]  # the data: [0, 5000) and [660360, 730360)
    assert index == unaware
    assert sum(index.zero_chunks) == index.frame_count - 3


def small_index(tmp_path: Path) -> tuple[Path, SnapshotIndex]:
    """An image of data then a hole, and its index (no frame store: no fingerprints or states)."""
    image = tmp_path / "img"
    write_image(image, [("data", 300_000), ("hole", 300_000)])
    handle = OpenImage.open(str(image))
    try:
        return image, trio.run(build_index, handle.source(SMALL), SMALL)
    finally:
        handle.close()


def test_index_survives_encoding_and_rejects_corruption(tmp_path: Path) -> None:
    _, index = small_index(tmp_path)
    encoded = index.to_bytes()
    assert type(index).from_bytes(encoded) == index
    corrupt = bytearray(encoded)
    corrupt[-10] ^= 1
    with pytest.raises(ValueError):
        type(index).from_bytes(bytes(corrupt))


def _reencoded(index_bytes: bytes, head_change: Callable[[dict[str, Any]], object], cut: int = 0) -> bytes:
    """An index entry whose JSON head ``head_change`` edited (and whose arrays lost ``cut``
    bytes), with its digest made right again, so only the decoder's own checks can refuse it."""
    _digest, _, rest = index_bytes.partition(b"\n")
    head_line, _, arrays = rest.partition(b"\n")
    head = json.loads(head_line)
    replaced = head_change(head)
    arrays = arrays[: len(arrays) - cut] if cut >= 0 else arrays + bytes(-cut)  # cut short, or grown
    body = json.dumps(head if replaced is None else replaced).encode() + b"\n" + arrays
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


@pytest.mark.parametrize(
    ("change", "cut", "reason"),
    [
        (lambda head: None, 1, "arrays do not match the image size"),
        (lambda head: head.update(size_bytes=head["size_bytes"] * 2), 0, "arrays do not match"),
        (lambda head: head.update(fingerprints=32), 0, "arrays do not match the image size"),
        (lambda head: head.update(fingerprints=7), -7, "fingerprints do not match the image size"),
        (lambda head: head.update(midstates=40), -40, "hash states do not match the image size"),
        (lambda head: [head], 0, "index head is not an object"),
    ],
    ids=[
        "arrays-cut-short",
        "bigger-image",
        "arrays-missing",
        "fingerprint-count",
        "state-count",
        "head-a-list",
    ],
)
def test_index_decoding_checks_the_arrays_against_the_head(
    tmp_path: Path, change: Callable[[dict[str, Any]], object], cut: int, reason: str
) -> None:
    _, index = small_index(tmp_path)
    assert SnapshotIndex.from_bytes(_reencoded(index.to_bytes(), lambda head: None)) == index
    with pytest.raises(ValueError, match=reason):
        SnapshotIndex.from_bytes(_reencoded(index.to_bytes(), change, cut))


def test_index_encoding_shares_the_arrays_instead_of_copying_them(tmp_path: Path) -> None:
    """A 1 TiB disk's index is 21 MB: saving it must not make copies of it (format 3 made six)."""
    _, index = small_index(tmp_path)
    pieces = index.encoded()
    assert sum(len(memoryview(piece).cast("B")) for piece in pieces) == len(index.to_bytes())
    arrays = [piece for piece in pieces if isinstance(piece, memoryview)]
    assert [array.obj for array in arrays] == [index.frame_sizes, index.frame_checksums]
    assert any(piece is index.zero_chunks for piece in pieces)
    assert index.nbytes == 9 * index.frame_count  # no fingerprints or states without a store


def test_index_cache_gives_back_what_loading_and_saving_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, index = small_index(tmp_path)
    trims: list[int] = []
    monkeypatch.setattr(versions, "give_back_free_memory", trims.append)
    cache = versions.IndexCache(str(tmp_path / "index"))
    cache.save(str(image), "identity-1", index, None)
    assert trims == [index.nbytes]  # the pass that built it is over
    assert cache.load(str(image), "identity-1") == (index, None)
    assert trims[1:] == [len(index.to_bytes())]  # the file's bytes, freed once decoded
    assert cache.load(str(image), "identity-2") is None
    assert len(trims) == 2  # another identity's entry: its arrays are not even read
    assert cache.load_basis(str(image)) == index
    assert len(trims) == 3


def test_freed_heap_is_given_back_to_the_system() -> None:
    """A process that freed much of its heap holds it until the trim; a small job trims nothing."""
    program = """
import sys
from mirenfs.engine.memory import give_back_free_memory
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
blocks = [bytearray(65536) for _ in range(1024)]  # 64 MiB of heap, below mmap's threshold
for block in blocks:
    block[::4096] = b"x" * 16  # every page touched, so it is resident
pin = blocks.pop()  # the last block stays, so free() cannot shrink the heap from its top
del blocks, block
held = rss()
assert give_back_free_memory(1 << 10) is False
print(held, rss(), give_back_free_memory(64 << 20), rss())
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    held, after_small, trimmed, after_trim = result.stdout.split()
    assert trimmed == "True"
    assert int(held) - int(after_small) < 8 << 10  # kB: a small job leaves the heap as it is
    assert int(held) - int(after_trim) > 48 << 10  # kB: most of the 64 MiB went back


HEAPS_PROBE = """
import ctypes, sys, threading
from mirenfs.engine.memory import use_few_heaps
if sys.argv[1] == "few":
    assert use_few_heaps(1)
libc = ctypes.CDLL(None)
barrier = threading.Barrier(6)
held = []
def work():
    held.append(bytearray(65536))  # below mmap's threshold: from this thread's heap
    barrier.wait()  # all alive at once, so none finds another's heap free
threads = [threading.Thread(target=work) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
text, size = ctypes.c_char_p(), ctypes.c_size_t()
libc.open_memstream.restype = ctypes.c_void_p
stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(ctypes.string_at(text, size.value).decode().count("<heap nr="))
"""


@pytest.mark.parametrize("mode", ["few", "default"])
def test_a_mount_serves_its_threads_from_one_heap(mode: str) -> None:
    """Session 19: each thread had a heap of its own, where the 4 MiB chunks and frames others
    freed stayed: four cold reads at once took a mount to 200 MB (7 heaps), 150 MB with one."""
    result = subprocess.run(
        [sys.executable, "-c", HEAPS_PROBE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    heaps = int(result.stdout)
    assert heaps == 1 if mode == "few" else heaps > 1, heaps


def test_the_mount_daemon_asks_for_one_heap_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from mirenfs.cli import mount_cmds

    calls: list[str] = []
    monkeypatch.setattr(mount_cmds, "use_few_heaps", lambda: calls.append("one heap"))
    monkeypatch.setattr(mount_cmds.trio, "run", lambda *_args, **_kwargs: calls.append("serve"))
    mount_cmds.serve_mount(None)  # type: ignore[arg-type]
    assert calls == ["one heap", "serve"]


def test_changed_image_gives_an_error_not_mixed_bytes(tmp_path: Path) -> None:

    image = tmp_path / "img"
    write_image(image, [("data", 200_000)])

    async def run() -> None:
        async with producer_over(image) as producer:
            with open(image, "r+b") as f:
                f.seek(70_000)
                f.write(b"changed!")
            await producer.read(0, 100)  # the header and first frame are unaffected
            with pytest.raises(ImageChangedError):
                await producer.read(0, producer.size)

    trio.run(run)


@pytest.mark.parametrize("mtime_s", [400_000_000_000, -70_000_000_000], ids=["year 14645", "before year 0"])
def test_an_image_time_no_header_can_hold_is_clamped_to_one_it_can(
    mtime_s: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: an image whose modification time lies outside the years 0000 to 9999 (btrfs and
    tmpfs keep any) gave a header neither Go nor mirenfs reads ("not an RFC 3339 time"): a
    backup that no restore takes. The header holds the nearest time it can, said in a warning."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as scratch:  # tmpfs: keeps such a time
        image = Path(scratch) / "img"
        write_image(image, [("data", 70_000)])
        os.utime(image, ns=(mtime_s * 10**9, mtime_s * 10**9))
        assert os.stat(image).st_mtime_ns == mtime_s * 10**9
        output = Path(scratch) / "img.mirn"
        trio.run(partial(backup_image, str(image), str(output), name="pg", filesystem="ext4", settings=SMALL))
        meta = read_header(io.BytesIO(output.read_bytes()))
        expected = "9999-12-31T23:59:59.999999999Z" if mtime_s > 0 else "0000-01-01T00:00:00Z"
        assert meta.timestamp.rfc3339() == expected
        trio.run(verify_file, str(output))
    assert (
        f"disk pg: its image's modification time ({mtime_s * 10**9} ns after 1970) is outside" in caplog.text
    )


@contextlib.asynccontextmanager
async def producer_over(image: Path) -> AsyncIterator[SnapshotProducer]:
    """A producer of ``image``'s snapshot (indexed now), the image open until the block ends."""
    handle = OpenImage.open(str(image))
    try:
        source = handle.source(SMALL)
        index = await build_index(source, SMALL)
        meta = snapshot_meta("d", "ext4", handle.size, handle.mtime_ns, index.checksum)
        yield SnapshotProducer(source, SMALL, meta, index)
    finally:
        handle.close()


def test_a_random_read_compresses_only_the_chunks_whose_frames_it_touches(
    tmp_path: Path, compressions: list[int]
) -> None:
    """SPEC §5, untested until review S21 G10: a random 128 KiB read of a snapshot whose frames
    are kept nowhere compresses at most the chunks of the frames its range touches."""
    image = tmp_path / "img"
    content = write_image(
        image, [("data", 600_000), ("text", 900_000), ("zero", 300_000), ("data", 5)], seed=3
    )
    chunk = SMALL.chunk_size

    async def run() -> None:
        async with producer_over(image) as whole:
            data = await whole.read(0, whole.size)
        _meta, header_len = decode_header(data)
        starts, at = [], header_len  # where each chunk's frame begins and ends in the snapshot
        for compressed, _content, _check in parse_seek_table(data):
            starts.append((at, at + compressed))
            at += compressed
        zero = [not any(content[n * chunk : (n + 1) * chunk]) for n in range(len(starts))]
        rng = random.Random(7)
        async with producer_over(image) as producer:
            compressions.clear()  # the index pass's
            made = 0
            for _ in range(40):
                offset = rng.randrange(0, len(data) - (128 << 10))
                assert await producer.read(offset, 128 << 10) == data[offset : offset + (128 << 10)]
                touched = [
                    n
                    for n, (begin, end) in enumerate(starts)
                    if begin < offset + (128 << 10) and end > offset
                ]
                assert len(compressions) <= sum(not zero[n] for n in touched), (offset, touched, compressions)
                made += len(compressions)
                compressions.clear()
            assert made > 0  # the reads did compress: the bound was put to the test

    trio.run(run)


def test_a_reader_waiting_for_a_frame_whose_producer_was_cancelled_makes_it_itself(tmp_path: Path) -> None:
    """Review: a frame's production cancelled while it waited for a worker (a read-ahead of a
    sidecar's copy, say) failed every reader waiting for that frame with "cancelled", an EIO,
    although nothing was wrong with it. They now produce it themselves."""
    image = tmp_path / "img"
    write_image(image, [("data", 200_000)])

    async def run() -> None:
        async with producer_over(image) as producer:
            expected = producer._make_frame(1)  # made here, not cached
            got: list[bytes] = []
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    busy = [object() for _ in range(int(producer._limiter.total_tokens))]
                    for borrower in busy:  # every worker busy
                        await producer._limiter.acquire_on_behalf_of(borrower)
                    first = trio.CancelScope()

                    async def produce_then_cancelled() -> None:
                        with first:
                            await producer.frame(1)

                    async def wait_for_it() -> None:
                        got.append(await producer.frame(1))

                    nursery.start_soon(produce_then_cancelled)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(wait_for_it)
                    await trio.testing.wait_all_tasks_blocked()
                    first.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                    for borrower in busy:  # the workers come free
                        producer._limiter.release_on_behalf_of(borrower)
            assert got == [expected]

    trio.run(run)


def _zero_frame_bomb(size: int) -> bytes:
    """A Go-style single frame without content size holding ``size`` zero bytes."""
    compressor = zstandard.ZstdCompressor(level=1)
    sink = io.BytesIO()
    with compressor.stream_writer(sink, closefd=False) as writer:
        block = bytes(8 << 20)
        for _ in range(size // len(block)):
            writer.write(block)
    return sink.getvalue()


def test_memory_stays_bounded_for_a_huge_zero_frame() -> None:
    size = 1 << 30
    data = _zero_frame_bomb(size)
    assert len(data) < 200_000  # 1 GiB compresses to almost nothing
    meta = Meta("z", size, "ext4", Timestamp(0), hashlib.sha256(bytes(size)).hexdigest())

    class Discard:
        written = 0

        def write(self, data: bytes) -> None:
            Discard.written += len(data)

    async def run() -> None:
        async def open_target(_meta: Meta) -> Discard:
            return Discard()

        stream = RestoreStream(open_target)
        await stream.feed(meta.header() + data)  # all at once: the worst case for buffering
        await stream.finish()

    tracemalloc.start()
    try:
        trio.run(run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert Discard.written == size
    assert peak < 64 << 20, f"peak {peak >> 20} MiB"


def test_longer_stream_is_refused_the_moment_it_appears() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    frame = zstandard.ZstdCompressor().compress(payload)
    meta = Meta("d", len(payload) - 1, "ext4", Timestamp(0), hashlib.sha256(payload).hexdigest())

    async def run() -> None:
        async def open_target(_meta: Meta) -> io.BytesIO:
            return io.BytesIO()

        stream = RestoreStream(open_target)
        try:
            # The pipeline decompresses behind the writer: the refusal comes from the feed that
            # brings the extra bytes or, at the latest, once what was fed has been decompressed
            # (the next write, or settle) — never only at finish.
            with pytest.raises(FormatError, match="longer than"):
                await stream.feed(meta.header() + frame)
                await stream.settle()
            with pytest.raises(FormatError, match="longer than"):
                await stream.finish()  # and it stays failed
        finally:
            await stream.close()

    trio.run(run)


def test_go_style_api_round_trip(tmp_path: Path) -> None:
    image = tmp_path / "img"
    content = write_image(image, [("text", 70_000), ("hole", 100_000), ("data", 3)])
    out = io.BytesIO()
    with open(image, "rb") as src:
        checksum = backup(out, src, "api-disk", len(content), "xfs")
    assert checksum == hashlib.sha256(content).hexdigest()

    out.seek(0)
    meta = read_header(out)
    assert (meta.name, meta.filesystem, meta.checksum) == ("api-disk", "xfs", checksum)
    assert meta.timestamp.unix_ns == image.stat().st_mtime_ns
    restore_image(tmp_path / "restored", out, meta)
    assert (tmp_path / "restored").read_bytes() == content

    # A non-seekable destination and an in-memory source take the two-pass path.
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
            self.data += b
            return len(b)

    pipe = Pipe()
    assert (
        backup(
            pipe,
            io.BytesIO(content),
            "api-disk",
            len(content),
            "xfs",  # type: ignore[arg-type]
            timestamp=meta.timestamp,
        )
        == checksum
    )
    assert bytes(pipe.data) == out.getvalue()

    target = io.BytesIO()
    restore_image(target, io.BytesIO(bytes(pipe.data)[len(meta.header()) :]), meta)
    assert target.getvalue() == content


def test_single_read_and_two_read_passes_agree(tmp_path: Path) -> None:
    image = tmp_path / "img"
    write_image(image, [("text", 300_000), ("hole", 1 << 20), ("data", 70_000), ("zero", 200_000)])
    handle = OpenImage.open(str(image))
    try:
        indexes = [
            trio.run(lambda r=r: build_index(handle.source(SMALL), SMALL, single_read=r)) for r in (0, 1)
        ]
    finally:
        handle.close()
    assert indexes[0] == indexes[1]
    assert indexes[0].checksum == hashlib.sha256(image.read_bytes()).hexdigest()


def test_a_single_read_pass_hashes_runs_of_holes_in_one_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live image's pass hashes what it read; a run of hole chunks goes to the hash thread
    with the data chunk after it, not one trip per chunk (a large sparse disk is mostly holes)."""
    image = tmp_path / "img"
    write_image(image, [("data", 5000), ("hole", 40 * 65536), ("data", 70_000), ("hole", 20 * 65536 + 11)])
    trips: list[int] = []
    hash_all = produce_module._hash_all

    def counting(sha: Any, pieces: list[Any]) -> None:
        trips.append(len(pieces))
        hash_all(sha, pieces)

    monkeypatch.setattr(produce_module, "_hash_all", counting)
    handle = OpenImage.open(str(image))
    try:
        index = trio.run(lambda: build_index(handle.source(SMALL), SMALL, single_read=True))
    finally:
        handle.close()
    assert index.checksum == hashlib.sha256(image.read_bytes()).hexdigest()
    assert sum(trips) == index.frame_count  # every chunk hashed once, in order (the checksum)
    # 62 chunks, 4 of them holding data: runs of at most LIVE_HASH_BATCH, ended by data
    assert max(trips) == produce_module.LIVE_HASH_BATCH and len(trips) <= 8, trips


def test_a_header_time_the_filesystem_cannot_store_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The header's timestamp becomes the image's mtime, which a backup puts back in its header.
    A filesystem that cannot store it (ext4 ends in 2446) breaks that round trip: a warning says
    so, naming both times."""
    vector = GO_VECTORS[0]
    meta, header_len = decode_header(vector.path.read_bytes())
    far = Timestamp.parse("9999-12-31T23:59:59.5Z")
    snapshot = tmp_path / "far.mirn"
    snapshot.write_bytes(replace(meta, timestamp=far).header() + vector.path.read_bytes()[header_len:])
    ext4_end = 15032385535 * 10**9  # 2446-05-10T22:38:55Z, the latest time ext4 stores
    real_utime = os.utime

    def clamping_utime(path: int, *, ns: tuple[int, int]) -> None:
        real_utime(path, ns=(min(ns[0], ext4_end), min(ns[1], ext4_end)))

    monkeypatch.setattr(os, "utime", clamping_utime)
    caplog.set_level(logging.WARNING, logger="mirenfs")
    image = tmp_path / "far.img"
    trio.run(lambda: restore_file(str(snapshot), str(image), overwrite=False))
    assert image.stat().st_mtime_ns == ext4_end and sha256_file(image) == meta.checksum
    (warned,) = [r.getMessage() for r in caplog.records]
    assert warned.startswith(f"restored {image} with the time 2446-05-10T22:38:55Z: ") and (
        "cannot store the header's 9999-12-31T23:59:59.5Z" in warned
    ), warned
    caplog.clear()
    trio.run(lambda: restore_file(str(vector.path), str(tmp_path / "near.img"), overwrite=False))
    assert caplog.records == []  # a time the filesystem holds: nothing to say


def test_progress_waits_for_the_hash_not_only_the_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hole's frames are ready at once, its hash takes ~1 s per GiB: the progress a pass tells
    (what `mirenfs status` shows) is where both lanes are, never 100 % while the hash runs."""
    image = tmp_path / "img"
    write_image(image, [("data", 5000), ("hole", 40 * 65536)])
    size = image.stat().st_size
    held_at = 8 * 65536
    gate = threading.Event()
    wait = produce_module._Lead.wait

    def slow_hash(lead: Any, offset: int) -> None:
        if offset >= held_at:
            gate.wait(timeout=60)
        wait(lead, offset)

    monkeypatch.setattr(produce_module._Lead, "wait", slow_hash)
    monkeypatch.setattr(produce_module, "PROGRESS_INTERVAL_S", 0.05)
    told: list[int] = []

    async def main() -> None:
        handle = OpenImage.open(str(image))
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: build_index(handle.source(SMALL), SMALL, progress=told.append))
                    # every frame is made (holes: at once) while the hash thread is held
                    try:
                        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                        assert told and max(told) <= held_at < size, told
                    finally:
                        gate.set()  # the hash thread goes on, whatever happened
        finally:
            handle.close()

    trio.run(main)
    assert told[-1] == size and told == sorted(told), told


def test_an_index_pass_counts_against_what_restores_share_until_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four restores beside four cold reads took a mount to 203-219 MB: the restores split their
    bound among themselves while the passes' chunks were not counted. A pass is one of the bulk
    work's members while it runs, and leaves when it ends, also when it is cancelled."""
    image = tmp_path / "img"
    write_image(image, [("data", 5000), ("hole", 4 * 65536)])
    gate = hold_the_hash_lane(monkeypatch)
    running: list[int] = []

    async def main(cancel: bool) -> None:
        handle = OpenImage.open(str(image))
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for _ in range(2):
                        nursery.start_soon(build_index, handle.source(SMALL), SMALL)
                    try:
                        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                        running.append(BULK_WORK.running)
                        if cancel:
                            nursery.cancel_scope.cancel()
                    finally:
                        gate.set()  # the hash threads go on, whatever happened
        finally:
            handle.close()

    for cancel in (False, True):
        gate.clear()
        trio.run(main, cancel)
        assert BULK_WORK.running == 0, f"a pass {'cancelled' if cancel else 'done'} kept its place"
    assert running == [2, 2]


def test_an_image_changed_during_a_two_read_backup_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "img"
    write_image(image, [("text", 200_000)])
    handle = OpenImage.open(str(image))
    try:
        single_read, check = reading_rules(handle, live=image_in_use(str(image)))
        assert not single_read and check is not None  # not live: the fast two-read pass
        with open(image, "r+b") as f:  # the image changes while it is being read
            f.write(b"changed")
        of = SnapshotOf("d", "ext4", handle.mtime_ns, single_read, check)
        with pytest.raises(ImageChangedError, match="changed while it was being read"):
            trio.run(lambda: write_snapshot(io.BytesIO(), handle.source(SMALL), SMALL, of))
    finally:
        handle.close()


def test_a_small_frame_holds_only_its_own_bytes() -> None:
    """python-zstandard's output keeps ZSTD_compressBound bytes of memory whatever its length:
    a frame cache counting len() held 4 MiB for each 1 KiB frame of a mostly empty chunk."""
    chunk = bytearray(4 << 20)
    chunk[:1000] = random.Random(7).randbytes(1000)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        frames = [compress_frame(chunk, 3) for _ in range(8)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frames[0]) < 2000
    assert held - before < 64 << 10, f"{held - before} bytes held for 8 frames of {len(frames[0])} bytes"
    dense = random.Random(8).randbytes(1 << 20)
    assert zstandard.ZstdDecompressor().decompress(compress_frame(dense, 3)) == dense


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "it is empty"), (b"\xff\xfe garbage\n-\n", "its first lines are not text")],
    ids=["empty", "garbage"],
)
def test_an_index_cache_file_that_is_empty_or_garbage_is_corrupt_naming_the_image(
    tmp_path: Path, content: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    image, index = small_index(tmp_path)
    cache = versions.IndexCache(str(tmp_path / "index"))
    cache.save(str(image), "identity", index, None)
    Path(cache.path_for(str(image))).write_bytes(content)
    with caplog.at_level(logging.INFO):
        assert cache.load(str(image), "identity") is None
        assert cache.load_basis(str(image)) is None
    assert [record.getMessage() for record in caplog.records] == [
        f"index cache {cache.path_for(str(image))} for {image} is corrupt ({reason}); rebuilding it"
    ]


# ---- an image replaced by a rename kept its bytes -----------------------------------------------


def test_an_image_renamed_over_is_unchanged_but_a_write_or_a_chmod_is_not(tmp_path: Path) -> None:
    """A restore installs by renaming a new image over the old: a pass still reading the old one
    (an open waiting for it) must finish and serve the old snapshot, not fail as 'changed'
    (trial 11: EIO, and a log line that advised detaching the disk). Its link count and ctime
    change; its bytes do not. A write, even to the unlinked image, or a chmod of a linked one
    (a ctime change that may hide a write) still counts."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"a" * 8192)
    fd = os.open(image, os.O_RDWR)
    try:
        opened = ImageIdentity.from_stat(os.fstat(fd))
        before = replace(opened, ctime_ns=opened.ctime_ns - 1)  # the unlink moves the ctime on
        replacement = tmp_path / "disk.img.restore.tmp"
        replacement.write_bytes(b"b" * 4096)
        os.rename(replacement, image)
        assert os.fstat(fd).st_nlink == 0
        ensure_unchanged(fd, before, str(image))  # renamed over: no error
        os.pwrite(fd, b"x", 8192)  # a process that still had it open writes (and grows it)
        with pytest.raises(ImageChangedError, match="changed while it was being read"):
            ensure_unchanged(fd, before, str(image))
    finally:
        os.close(fd)
    kept = tmp_path / "kept.img"
    kept.write_bytes(b"c" * 8192)
    fd = os.open(kept, os.O_RDWR)
    try:
        now = ImageIdentity.from_stat(os.fstat(fd))
        ensure_unchanged(fd, now, str(kept))
        before_a_chmod = replace(now, ctime_ns=now.ctime_ns - 1)  # what a chmod since would show
        with pytest.raises(ImageChangedError):
            ensure_unchanged(fd, before_a_chmod, str(kept))
    finally:
        os.close(fd)
