"""Snapshot streams for the pipeline and frame store tests, made in memory.

``one_frame_snapshot`` is shaped like Go's writer output (one zstd frame of
unknown content size); ``many_frame_snapshot`` like mirenfs's own (one frame
per chunk, with content sizes), optionally with skippable frames between;
``feed_in_pieces`` feeds a :class:`RestoreStream` in pieces of random sizes;
``hold_the_hash_lane`` keeps an index pass running (its hash lane waits).
Nothing here mounts or needs root.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import threading
from collections.abc import Callable

import pytest
import trio
import zstandard

from mirenfs.engine import produce
from mirenfs.engine.consume import RestoreStream
from mirenfs.format.header import Meta, Timestamp

SKIPPABLE = struct.pack("<II", 0x184D2A53, 3) + b"abc"


def image_bytes(size: int, seed: int = 0) -> bytes:
    """Text, random data and zero runs, so that pieces are zero, compressible or not."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.choice(["zero", "data", "text"])
        length = rng.choice([4096, 65536, 200_000, 1 << 20])
        if kind == "zero":
            out += bytes(length)
        elif kind == "data":
            out += rng.randbytes(length)
        else:
            out += (b"mirenfs pipeline %d\n" % rng.randrange(1000)) * (length // 20 + 1)
    return bytes(out[:size])


def meta_for(content: bytes, name: str = "disk") -> Meta:
    return Meta(name, len(content), "ext4", Timestamp(0), hashlib.sha256(content).hexdigest())


def one_frame_snapshot(content: bytes) -> bytes:
    """Header + one zstd frame without content size, as Go's writer makes it."""
    sink = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(sink, closefd=False) as writer:
        for start in range(0, len(content), 1 << 20):
            writer.write(content[start : start + (1 << 20)])
    return meta_for(content).header() + sink.getvalue()


def many_frame_snapshot(content: bytes, chunk: int = 256 << 10, *, skippable: bool = False) -> bytes:
    """Header + one frame per chunk with content size and checksum, skippable frames between."""
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    parts = [meta_for(content).header()]
    for start in range(0, len(content), chunk):
        if skippable:
            parts.append(SKIPPABLE)
        parts.append(compressor.compress(content[start : start + chunk]))
    if skippable:
        parts.append(SKIPPABLE)
    return b"".join(parts)


class Collect:
    """An image writer that keeps what it is given (copying: the buffer is reused)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


async def feed_until_held_back(
    stream: RestoreStream,
    snapshot: bytes,
    fed: int = 0,
    *,
    piece: int = 1 << 20,
    until: Callable[[], bool] = lambda: True,
    quiet_s: float = 0.3,
    deadline_s: float = 60,
) -> tuple[int, bool]:
    """Feed ``snapshot`` from ``fed`` in pieces of ``piece`` bytes until one feed has waited
    ``quiet_s`` for room (the stages held back, the input full) and ``until()`` holds: where the
    feeding stopped (the feed that waited does not count), and whether it was held back at all
    (False: everything went in). A slow machine makes it wait longer, never fail: polled up to
    ``deadline_s``, not a fixed time."""
    with trio.fail_after(deadline_s):
        while fed < len(snapshot):
            with trio.move_on_after(quiet_s) as waited:
                await stream.feed(snapshot[fed : fed + piece])
            if not waited.cancelled_caught:
                fed += piece
            elif until():
                return fed, True
        return fed, False


async def feed_in_pieces(stream: RestoreStream, snapshot: bytes, seed: int, largest: int = 300_000) -> None:
    rng = random.Random(seed)
    position = 0
    while position < len(snapshot):
        step = rng.choice([1, 7, 4096, 10240, rng.randrange(1, largest)])
        await stream.feed(snapshot[position : position + step])
        position += step


def restore_threads() -> list[str]:
    """Names of the restore pipeline's threads still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith("mirenfs-restore")]


def hold_the_hash_lane(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Index passes started from now on run until the event returned is set: their hash lane
    waits for it (for at most a minute, so that a failed test still ends). Set it in a
    ``finally``."""
    gate = threading.Event()
    wait = produce._Lead.wait

    def held_hash(lead: produce._Lead, offset: int) -> None:
        gate.wait(timeout=60)
        wait(lead, offset)

    monkeypatch.setattr(produce._Lead, "wait", held_hash)
    return gate
