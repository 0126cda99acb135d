"""Every bad snapshot of issue 2 is refused, and the existing image is left exactly as it was."""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
from pathlib import Path

import pytest

from mirenfs.format.header import Meta, decode_header

from conftest import run_mirenfs, sha256_file, staging_files, write_image


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Meta, int]:
    """A valid snapshot of a small image with text, random data and a hole."""
    work = tmp_path_factory.mktemp("good")
    image = work / "src.img"
    write_image(image, [("text", 200_000), ("data", 150_000), ("hole", 300_000), ("text", 5)])
    snap = work / "good.mirn"
    result = run_mirenfs("backup", "--image", str(image), "-o", str(snap), "--name", "good")
    assert result.returncode == 0, result.stderr
    data = snap.read_bytes()
    meta, header_len = decode_header(data)
    return data, meta, header_len


def _with_meta(meta: Meta, data: bytes, header_len: int, **changes: object) -> bytes:
    fields = {**meta.__dict__, **changes}
    return Meta(**fields).header() + data[header_len:]  # type: ignore[arg-type]


def _with_body(body: bytes, data: bytes, header_len: int) -> bytes:
    return struct.pack(">4sII", b"MIRN", 1, len(body)) + body + data[header_len:]


def _flip(data: bytes, offset: int) -> bytes:
    flipped = bytearray(data)
    flipped[offset] ^= 0x5A
    return bytes(flipped)


def bad_inputs(data: bytes, meta: Meta, h: int) -> dict[str, tuple[bytes, str]]:
    other = hashlib.sha256(b"something else").hexdigest()
    return {
        "bad magic": (b"MIRX" + data[4:], "bad magic"),
        "version 2": (data[:4] + struct.pack(">I", 2) + data[8:], "version 2"),
        "metadata over 1 MiB": (data[:8] + struct.pack(">I", (1 << 20) + 1) + data[12:], "1 MiB limit"),
        "malformed JSON": (_with_body(meta.to_json()[:-7], data, h), "not valid JSON"),
        "checksum not 64 hex": (_with_meta(meta, data, h, checksum="abc123"), "not 64 hex digits"),
        "negative size": (_with_meta(meta, data, h, size_bytes=-5), "negative size_bytes"),
        "truncated header": (data[: h - 10], "header is truncated"),
        "truncated data": (data[: h + (len(data) - h) // 2], "truncated"),
        "flipped byte in a frame": (_flip(data, h + 1000), "corrupt|checksum"),
        "checksum mismatch": (_with_meta(meta, data, h, checksum=other), "checksum mismatch"),
        "longer than size_bytes": (_with_meta(meta, data, h, size_bytes=meta.size_bytes - 1), "longer than"),
        "shorter than size_bytes": (_with_meta(meta, data, h, size_bytes=meta.size_bytes + 1), "short"),
        "garbage": (random.Random(7).randbytes(100_000), "bad magic"),
    }


CASES = [
    "bad magic",
    "version 2",
    "metadata over 1 MiB",
    "malformed JSON",
    "checksum not 64 hex",
    "negative size",
    "truncated header",
    "truncated data",
    "flipped byte in a frame",
    "checksum mismatch",
    "longer than size_bytes",
    "shorter than size_bytes",
    "garbage",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("via", ["file", "stdin"])
def test_bad_snapshot_is_refused_and_image_untouched(
    case: str, via: str, good: tuple[bytes, Meta, int], tmp_path: Path
) -> None:
    data, meta, header_len = good
    snapshot, reason = bad_inputs(data, meta, header_len)[case]
    bad = tmp_path / "bad.mirn"
    bad.write_bytes(snapshot)
    image = tmp_path / "disk.img"
    write_image(image, [("text", 100_000), ("hole", 50_000)], seed=3)
    before, before_stat = sha256_file(image), image.stat()

    if via == "file":
        result = run_mirenfs("restore", str(bad), "--image", str(image), "--force")
    else:
        result = run_mirenfs("restore", "-", "--image", str(image), "--force", input=snapshot)

    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.startswith("mirenfs: error: ") and message.count("\n") == 1, message
    assert re.search(reason, message), message
    assert sha256_file(image) == before
    assert image.stat().st_mtime_ns == before_stat.st_mtime_ns and image.stat().st_ino == before_stat.st_ino
    assert staging_files(tmp_path) == []
    assert result.stdout == b""


@pytest.mark.parametrize("case", CASES)
def test_bad_snapshot_into_a_new_image_creates_nothing(
    case: str, good: tuple[bytes, Meta, int], tmp_path: Path
) -> None:
    data, meta, header_len = good
    snapshot, _reason = bad_inputs(data, meta, header_len)[case]
    bad = tmp_path / "bad.mirn"
    bad.write_bytes(snapshot)
    result = run_mirenfs("restore", str(bad), "--image", str(tmp_path / "new.img"))
    assert result.returncode == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.mirn"]


def test_bad_snapshot_fails_verify(good: tuple[bytes, Meta, int], tmp_path: Path) -> None:
    data, meta, header_len = good
    cases = bad_inputs(data, meta, header_len)
    assert sorted(cases) == sorted(CASES)
    for case, (snapshot, _reason) in cases.items():
        bad = tmp_path / "bad.mirn"
        bad.write_bytes(snapshot)
        result = run_mirenfs("verify", str(bad))
        assert result.returncode == 1, case
        assert b"OK" not in result.stdout, case
