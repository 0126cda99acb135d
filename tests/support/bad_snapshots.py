"""The bad snapshots of issue 2, made from a good one: each with the reason a refusal must give.

Shared by the CLI tests (restore and verify refuse them) and the kernel tests
(``cp`` into restore/ fails with them). Builds bytes only; never restores.
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

from mirenfs.format.header import Meta, decode_header

from support.data import write_image
from support.runners import run_mirenfs

FORGED_LOG_LINE = "2026-11-27 00:00:00,000 mirenfs[1]: INFO: FAKE LINE"  # what a header may try to log
CASES = [
    "bad magic",
    "version 2",
    "metadata over 1 MiB",
    "malformed JSON",
    "checksum not 64 hex",
    "negative size",
    "filesystem ntfs",
    "filesystem a path",
    "filesystem with a log line",
    "truncated header",
    "truncated data",
    "flipped byte in a frame",
    "checksum mismatch",
    "longer than size_bytes",
    "shorter than size_bytes",
    "garbage",
]


def make_good_snapshot(work: Path, segments: list[tuple[str, int]], *extra: str) -> tuple[bytes, Meta, int]:
    """Back up an image of ``segments`` with the CLI; its bytes, header and header length."""
    image, snapshot = work / "src.img", work / "good.mirn"
    write_image(image, segments)
    result = run_mirenfs("backup", "--image", str(image), "--filesystem", "ext4", "-o", str(snapshot), *extra)
    assert result.returncode == 0, result.stderr
    data = snapshot.read_bytes()
    meta, header_len = decode_header(data)
    return data, meta, header_len


def _with_meta(meta: Meta, data: bytes, header_len: int, **changes: object) -> bytes:
    fields = {**meta.__dict__, **changes}
    return Meta(**fields).header() + data[header_len:]  # type: ignore[arg-type]


def raw_header(body: bytes, *, version: int = 1, length: int | None = None) -> bytes:
    """A header around any metadata bytes, valid JSON or not; the length field is the body's
    unless ``length`` says otherwise."""
    return struct.pack(">4sII", b"MIRN", version, len(body) if length is None else length) + body


def _with_body(body: bytes, data: bytes, header_len: int) -> bytes:
    return raw_header(body) + data[header_len:]


def _flip(data: bytes, offset: int) -> bytes:
    flipped = bytearray(data)
    flipped[offset] ^= 0x5A
    return bytes(flipped)


def bad_inputs(data: bytes, meta: Meta, h: int) -> dict[str, tuple[bytes, str]]:
    """Every case of :data:`CASES`: (the bad snapshot's bytes, a regex the refusal must match)."""
    other = hashlib.sha256(b"something else").hexdigest()
    return {
        "bad magic": (b"MIRX" + data[4:], "bad magic"),
        "version 2": (data[:4] + struct.pack(">I", 2) + data[8:], "version 2"),
        "metadata over 1 MiB": (data[:8] + struct.pack(">I", (1 << 20) + 1) + data[12:], "1 MiB limit"),
        "malformed JSON": (_with_body(meta.to_json()[:-7], data, h), "not valid JSON"),
        "checksum not 64 hex": (_with_meta(meta, data, h, checksum="abc123"), "not 64 hex digits"),
        "negative size": (_with_meta(meta, data, h, size_bytes=-5), "negative size_bytes"),
        # Restores record the filesystem with the disk and say it in logs: one of disk create's only,
        # and repeated escaped (a raw newline would forge a log line, or break `disk list`).
        "filesystem ntfs": (_with_meta(meta, data, h, filesystem="ntfs"), "filesystem 'ntfs'.*only ext4"),
        "filesystem a path": (
            _with_meta(meta, data, h, filesystem="../../etc"),
            r"filesystem '\.\./\.\./etc'",
        ),
        "filesystem with a log line": (
            _with_meta(meta, data, h, filesystem=f"ext4\n{FORGED_LOG_LINE}"),
            r"filesystem 'ext4\\n2026-11-27 .*FAKE LINE'",
        ),
        "truncated header": (data[: h - 10], "header is truncated"),
        "truncated data": (data[: h + (len(data) - h) // 2], "truncated"),
        "flipped byte in a frame": (_flip(data, h + 1000), "corrupt|checksum"),
        "checksum mismatch": (_with_meta(meta, data, h, checksum=other), "checksum mismatch"),
        "longer than size_bytes": (_with_meta(meta, data, h, size_bytes=meta.size_bytes - 1), "longer than"),
        "shorter than size_bytes": (_with_meta(meta, data, h, size_bytes=meta.size_bytes + 1), "short"),
        "garbage": (random.Random(7).randbytes(100_000), "bad magic"),
    }
