"""Every bad snapshot of issue 2 is refused, and the existing image is left exactly as it was."""

from __future__ import annotations

import itertools
import os
import re
import struct
from pathlib import Path

import pytest
import zstandard

from mirenfs.errors import FormatError
from mirenfs.format import frames
from mirenfs.format.header import Meta

from support.bad_snapshots import CASES, bad_inputs, make_good_snapshot
from support.data import sha256_file, staging_files, write_image
from support.runners import run_cli_as_process_would, run_mirenfs
from support.vectors import GO_VECTORS


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Meta, int]:
    """A valid snapshot of a small image with text, random data and a hole."""
    return make_good_snapshot(
        tmp_path_factory.mktemp("good"),
        [("text", 200_000), ("data", 150_000), ("hole", 300_000), ("text", 5)],
        "--name",
        "good",
    )


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
        result = run_cli_as_process_would("restore", str(bad), "--image", str(image), "--force")
    else:  # a real standard input: a process
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
    result = run_cli_as_process_would("restore", str(bad), "--image", str(tmp_path / "new.img"))
    assert result.returncode == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.mirn"]


def test_bad_snapshot_fails_verify(good: tuple[bytes, Meta, int], tmp_path: Path) -> None:
    data, meta, header_len = good
    cases = bad_inputs(data, meta, header_len)
    assert sorted(cases) == sorted(CASES)
    for case, (snapshot, _reason) in cases.items():
        bad = tmp_path / "bad.mirn"
        bad.write_bytes(snapshot)
        result = run_cli_as_process_would("verify", str(bad))
        assert result.returncode == 1, case
        assert b"OK" not in result.stdout, case


# ---- the seek table: verify checks it against the frames; a restore ignores it (SPEC §2) -------------


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Meta, int]:
    """A snapshot of five 128 KiB frames (text, data, hole) and its seek table."""
    segments = [("text", 200_000), ("data", 150_000), ("hole", 300_000)]
    return make_good_snapshot(tmp_path_factory.mktemp("chunked"), segments, "--chunk-size", "131072")


def _table(data: bytes) -> tuple[int, int]:
    """Where the seek table's entries start, and how many it has."""
    count = struct.unpack("<I", data[-9:-5])[0]
    return len(data) - 9 - 12 * count, count


def _changed(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def seek_table_cases(data: bytes) -> dict[str, tuple[bytes, str]]:
    start, count = _table(data)
    entry = struct.unpack_from("<III", data, start)
    first, second = data[start : start + 12], data[start + 12 : start + 24]
    return {
        "flipped compressed size": (_changed(data, start, struct.pack("<I", entry[0] ^ 4)), "does not match"),
        "flipped decompressed size": (
            _changed(data, start + 4, struct.pack("<I", entry[1] - 1)),
            "does not match",
        ),
        "entries swapped": (
            _changed(data, start, second + first),
            "the sizes it lists .* differ from theirs",
        ),
        "damaged footer magic": (data[:-1] + bytes([data[-1] ^ 0x40]), "damaged: it does not end in"),
        "frame count plus one": (
            _changed(data, len(data) - 9, struct.pack("<I", count + 1)),
            "footer counts",
        ),
        "frame count minus one": (
            _changed(data, len(data) - 9, struct.pack("<I", count - 1)),
            "footer counts",
        ),
        # Review P22 F1: the seekable format tells readers to refuse them.
        "reserved descriptor bits": (
            _changed(data, len(data) - 5, bytes([data[len(data) - 5] | 0x7C])),
            r"damaged: its descriptor 0xFC sets reserved bits",
        ),
    }


SEEK_TABLE_CASES = [
    "flipped compressed size",
    "flipped decompressed size",
    "entries swapped",
    "damaged footer magic",
    "frame count plus one",
    "frame count minus one",
    "reserved descriptor bits",
]


@pytest.mark.parametrize("case", SEEK_TABLE_CASES)
def test_verify_refuses_a_seek_table_that_does_not_match_the_frames(
    case: str, chunked: tuple[bytes, Meta, int], tmp_path: Path
) -> None:
    data, meta, _header_len = chunked
    start, count = _table(data)
    assert (
        count == 5
        and struct.unpack_from("<III", data, start)[0] != struct.unpack_from("<III", data, start + 12)[0]
    )
    snapshot, reason = seek_table_cases(data)[case]
    bad = tmp_path / "bad.mirn"
    bad.write_bytes(snapshot)
    result = run_cli_as_process_would("verify", str(bad))
    message = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b"", message
    assert message.startswith(f"mirenfs: error: {bad}: the seek table at the end of the zstd data ")
    assert re.search(reason, message) and "a restore works" in message and message.count("\n") == 1, message
    # A restore does not need the seek table (readers ignore skippable frames): the image comes out whole.
    image = tmp_path / "restored.img"
    done = run_cli_as_process_would("restore", str(bad), "--image", str(image))
    assert done.returncode == 0, done.stderr
    assert sha256_file(image) == meta.checksum


def test_verify_holds_frames_without_a_content_size_to_the_sizes_their_seek_table_lists(
    chunked: tuple[bytes, Meta, int], tmp_path: Path
) -> None:
    """Review P22 F1: such frames (zstd's contrib seekable compressor writes them) were held to
    the table's total only: a table with the right total and wrong sizes per frame, which sends
    a seekable reader to the wrong offsets, passed."""
    data, _meta, header_len = chunked
    start, _count = _table(data)
    content = (
        zstandard.ZstdDecompressor()
        .decompressobj(read_across_frames=True)
        .decompress(data[header_len : start - 8])
    )
    cuts = [0, 70_000, 200_000, len(content)]
    no_size = zstandard.ZstdCompressor(write_content_size=False)
    parts = [no_size.compress(content[a:b]) for a, b in itertools.pairwise(cuts)]
    sizes = [b - a for a, b in itertools.pairwise(cuts)]
    lying = [sizes[0] + 1000, sizes[1] - 1000, sizes[2]]  # the same total
    outcomes = {}
    for label, listed in (("honest", sizes), ("lying", lying)):
        table = frames.seek_table([(len(part), size, 0) for part, size in zip(parts, listed, strict=True)])
        path = tmp_path / f"{label}.mirn"
        path.write_bytes(data[:header_len] + b"".join(parts) + table)
        result = run_cli_as_process_would("verify", str(path))
        outcomes[label] = (result.returncode, result.stderr.decode())
    assert outcomes["honest"] == (0, ""), outcomes
    assert outcomes["lying"][0] == 1 and "the sizes it lists for the 3 frames differ" in outcomes["lying"][1]


@pytest.mark.parametrize("entries", [6, 7, 1 << 20])
def test_a_seek_table_too_large_to_read_is_still_held_to_its_length(
    entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify keeps at most MAX_SEEK_TABLE bytes of a seek table (here made small); one larger
    than that must still have the length that lists the data's frames, or it is refused."""
    monkeypatch.setattr(frames, "MAX_SEEK_TABLE", 64)
    check = frames.SeekTableCheck()
    for _ in range(6):
        check.data_frame(1000, 4096)
    length = 12 * entries + frames.SEEK_TABLE_FOOTER_LEN
    check.skippable_frame(frames.SEEK_TABLE_SKIPPABLE_MAGIC, length)
    check.skippable_bytes(memoryview(bytes(length)))
    if entries == 6:
        check.check(6 * 4096)  # the right length: its entries are not read, nothing to refuse
    else:
        with pytest.raises(FormatError, match=f"its {length} bytes cannot list the data's 6 frames"):
            check.check(6 * 4096)


def test_verify_takes_data_without_a_seek_table_or_with_one_not_at_the_end(
    chunked: tuple[bytes, Meta, int], tmp_path: Path
) -> None:
    """Go's snapshots have none; a skippable frame after the table makes it not the seek table."""
    data, _meta, header_len = chunked
    start, _count = _table(data)
    table_frame = data[start - 8 :]
    variants = {
        "none": data[: start - 8],
        "followed by a skippable frame": data + struct.pack("<II", 0x184D2A53, 3) + b"abc",
        "moved to the front": data[:header_len] + table_frame + data[header_len : start - 8],
    }
    for label, snapshot in variants.items():
        path = tmp_path / "ok.mirn"
        path.write_bytes(snapshot)
        result = run_cli_as_process_would("verify", str(path))
        assert result.returncode == 0 and b": OK (" in result.stdout, (label, result.stderr)
    for vector in GO_VECTORS:
        assert run_cli_as_process_would("verify", str(vector.path)).returncode == 0, vector.file
