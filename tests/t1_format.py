"""The header: byte-exact with Go's vectors, and every bad header refused with a reason."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import struct
import tracemalloc
from array import array

import pytest
import zstandard

from mirenfs import FORMAT_VERSION, MAGIC, Meta, Timestamp, read_header, write_header
from mirenfs.errors import FormatError, printable
from mirenfs.format.frames import (
    FrameScanner,
    parse_seek_table,
    seek_table,
    seek_table_frame_count,
    seek_table_of_arrays,
)
from mirenfs.format.header import MAX_METADATA_LEN, HeaderParser, decode_header, go_json_string

from support.bad_snapshots import raw_header
from support.fuzz import streamed_frame
from support.vectors import VECTORS_DIR

CASES = [json.loads(line) for line in (VECTORS_DIR / "headers.jsonl").read_text().splitlines()]
CHECKSUM = "ab" * 32


def meta_of(case: dict) -> Meta:
    return Meta(
        case["name"],
        case["size_bytes"],
        case["filesystem"],
        Timestamp.parse(case["timestamp"]),
        case["checksum"],
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] or "zero-value" for c in CASES])
def test_writer_matches_go_byte_for_byte(case: dict) -> None:
    out = io.BytesIO()
    written = write_header(out, meta_of(case))
    assert out.getvalue().hex() == case["header_hex"]
    assert written == len(out.getvalue())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] or "zero-value" for c in CASES])
def test_reader_parses_go_headers_back(case: dict) -> None:
    data = bytes.fromhex(case["header_hex"])
    meta = read_header(io.BytesIO(data + b"rest"), validate=False)
    assert meta == meta_of(case)
    assert meta.timestamp.rfc3339() == Timestamp.parse(case["timestamp"]).rfc3339()
    if len(case["checksum"]) == 64:
        assert read_header(io.BytesIO(data)) == meta
    else:  # Go's zero-value struct: decodes, but no restore may use it
        with pytest.raises(FormatError, match="not 64 hex digits"):
            read_header(io.BytesIO(data))


@pytest.mark.parametrize("case", CASES[:6], ids=[c["name"] for c in CASES[:6]])
@pytest.mark.parametrize("piece", [1, 3, 13, 1000])
def test_incremental_reader_accepts_any_piece_size(case: dict, piece: int) -> None:
    data = bytes.fromhex(case["header_hex"]) + b"ZSTD-DATA"
    parser = HeaderParser(validate=False)
    rest = b""
    for i in range(0, len(data), piece):
        rest += bytes(parser.feed(data[i : i + piece]))
    assert parser.meta == meta_of(case)
    assert rest == b"ZSTD-DATA"
    assert parser.bytes_needed() == 0


def test_constants() -> None:
    assert MAGIC == b"MIRN" and FORMAT_VERSION == 1


def test_timestamps_trim_fraction_and_keep_offset() -> None:
    assert Timestamp.parse("2026-06-04T12:00:00.120000000Z").rfc3339() == "2026-06-04T12:00:00.12Z"
    assert Timestamp.parse("2026-06-04T12:00:00+05:30").rfc3339() == "2026-06-04T12:00:00+05:30"
    assert Timestamp.parse("2026-06-04t12:00:00z").rfc3339() == "2026-06-04T12:00:00Z"
    ts = Timestamp.from_unix_ns(1_700_000_000_123_456_789)
    assert ts.rfc3339() == "2023-11-14T22:13:20.123456789Z"
    assert Timestamp.from_datetime(ts.to_datetime()).unix_ns == 1_700_000_000_123_456_000
    assert Timestamp.parse("2026-06-04T12:00:00+05:30") < Timestamp.parse("2026-06-04T12:00:00Z")


def test_an_aware_datetime_is_taken_at_its_instant() -> None:
    """Review MT: ``from_datetime`` of 12:00+05:30 must be 06:30Z (a caller's zone ignored would
    shift the header's time, and a restored image's mtime, by the offset)."""
    india = _dt.timezone(_dt.timedelta(hours=5, minutes=30))
    converted = Timestamp.from_datetime(_dt.datetime(2026, 6, 4, 12, tzinfo=india))
    assert converted.unix_ns == Timestamp.parse("2026-06-04T06:30:00Z").unix_ns
    assert converted.rfc3339() == "2026-06-04T12:00:00+05:30"


def test_go_string_escaping_of_every_control_character() -> None:
    assert go_json_string("\b\f\x7f") == '"\\u0008\\u000c\x7f"'
    # Invalid UTF-8 for Go, which writes the escape text per byte (encoding/json appendString):
    # a byte of a file name (surrogateescape), and a surrogate's own three bytes.
    assert go_json_string("disk-\udcff") == '"disk-\\ufffd"'
    assert go_json_string(b"a\xff\xfeb".decode(errors="surrogateescape")) == '"a\\ufffd\\ufffdb"'
    assert go_json_string("\ud800") == '"\\ufffd\\ufffd\\ufffd"'


def _body(**changes: object) -> bytes:
    fields = {
        "name": "d",
        "size_bytes": 5,
        "filesystem": "ext4",
        "timestamp": "2026-06-04T12:00:00Z",
        "checksum": CHECKSUM,
        "version": 1,
    }
    fields.update(changes)
    return json.dumps(fields).encode()


BAD_HEADERS = {
    "bad magic": (b"MIRX" + raw_header(_body())[4:], "bad magic"),
    "version 2": (raw_header(_body(), version=2), "version 2"),
    "metadata too long": (raw_header(b"{}", length=(1 << 20) + 1), "more than the 1 MiB limit"),
    "malformed json": (
        raw_header(b'{"name": "d", "size_bytes":'),
        "not valid JSON: Expecting value at character 28$",
    ),
    "unterminated json string": (  # Python's message ends in "at" itself: said once (trial R)
        raw_header(b'{"name": "d'),
        "not valid JSON: Unterminated string starting at character 10$",
    ),
    "json not an object": (raw_header(b"[1, 2]"), "not a JSON object"),
    "short checksum": (raw_header(_body(checksum="abc")), r"not 64 hex digits \(it has 3 characters\)"),
    "checksum a digit short": (
        raw_header(_body(checksum="a" * 63)),
        r"not 64 hex digits \(it has 63 characters\)",
    ),
    "checksum a digit long": (
        raw_header(_body(checksum="a" * 65)),
        r"not 64 hex digits \(it has 65 characters\)",
    ),
    "non-hex checksum": (
        raw_header(_body(checksum="ab" * 8 + "g" + "a" * 47)),
        r"not 64 hex digits \(character 17, 'g', is not a hex digit\)",
    ),
    "negative size": (raw_header(_body(size_bytes=-1)), "negative size_bytes"),
    "fractional size": (raw_header(_body(size_bytes=1.5)), "must be a JSON int"),
    "bad timestamp": (raw_header(_body(timestamp="yesterday")), "not an RFC 3339 time"),
    "json version 2": (raw_header(_body(version=2)), "metadata version 2"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_bad_headers_are_refused_with_the_reason(name: str) -> None:
    data, reason = BAD_HEADERS[name]
    with pytest.raises(FormatError, match=reason):
        read_header(io.BytesIO(data + b"\0" * 64))


def test_bad_magic_is_refused_at_its_first_byte() -> None:
    parser = HeaderParser()
    parser.feed(b"MI")
    with pytest.raises(FormatError, match="bad magic"):
        parser.feed(b"X")


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    with pytest.raises(FormatError, match="1 MiB"):
        HeaderParser().feed(raw_header(b"", length=1 << 24)[:12])


def test_the_writer_refuses_metadata_no_reader_would_open() -> None:
    """Review F: ``Meta.header`` packed any length, so the Python API wrote a snapshot with a
    long name (``<>&`` take 6 bytes each) that every reader, this one included, refuses."""
    ts = Timestamp.parse("2026-06-04T12:00:00Z")
    meta = Meta("<" * 200_000, 5, "ext4", ts, "0" * 64)
    with pytest.raises(
        FormatError, match=r"would take 1200\d+ bytes, more than the 1 MiB a snapshot may hold"
    ):
        meta.header()
    longest = Meta(
        "n" * (MAX_METADATA_LEN - len(Meta("", 5, "ext4", ts, "0" * 64).to_json())), 5, "ext4", ts, "0" * 64
    )
    assert decode_header(longest.header())[0] == longest  # the limit itself is allowed
    with pytest.raises(FormatError, match=f"would take {MAX_METADATA_LEN + 1} bytes"):  # one past it is not
        dataclasses.replace(longest, name=longest.name + "n").header()


def test_truncatedraw_header() -> None:
    full = raw_header(_body())
    for cut in (3, 11, 12, len(full) - 1):
        with pytest.raises(FormatError, match=f"header is truncated: the stream ended after {cut} bytes$"):
            read_header(io.BytesIO(full[:cut]))
    with pytest.raises(FormatError, match=r"header is truncated: the stream ended after 1 byte$"):
        read_header(io.BytesIO(full[:1]))
    with pytest.raises(FormatError, match="truncated"):
        decode_header(full[:-1])
    for empty in (lambda: read_header(io.BytesIO(b"")), lambda: decode_header(b"")):
        with pytest.raises(FormatError, match=r"^the snapshot is empty \(0 bytes\)$"):
            empty()


def test_unknown_keys_are_ignored() -> None:
    meta = read_header(io.BytesIO(raw_header(_body(extra={"x": 1}, compression="zstd"))))
    assert meta.name == "d" and meta.size_bytes == 5


@pytest.mark.parametrize("window_log", [10, 20, 27, 28, 31])
def test_the_frame_scanner_reads_the_window_each_frame_asks_for(window_log: int) -> None:
    """What a frame needs to decode, read from its header as zstd reads it (fed a byte at a time)."""
    frames = [
        streamed_frame(b"x" * 5000, window_log=window_log),  # a window descriptor
        zstandard.ZstdCompressor(write_content_size=True).compress(b"y" * 300),  # single segment: its content
    ]
    for frame in frames:
        scanner = FrameScanner()
        for n in range(len(frame)):
            scanner.feed(frame[n : n + 1])
        assert scanner.at_boundary and scanner.frames == 1
        assert scanner.window_size == zstandard.get_frame_parameters(frame).window_size


def _events(stream: bytes, piece: int) -> list[tuple[int, bool, int | None]]:
    """(offset, in a zstd frame, content size) at each event ``feed_to_event`` stops at."""
    scanner, found, position = FrameScanner(), [], 0
    while position < len(stream):
        taken, event = scanner.feed_to_event(stream[position : position + piece])
        assert 0 < taken <= piece
        position += taken
        if event:
            found.append(
                (position, scanner.in_zstd_frame, scanner.content_size if scanner.in_zstd_frame else None)
            )
    assert scanner.at_boundary
    return found


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_the_frame_scanner_stops_at_each_header_and_each_frame_end(piece: int) -> None:
    """A restore cuts its input into frames with ``feed_to_event``: it stops after each frame's
    header (saying whether a zstd frame's data follows, and its content size) and at each frame's
    end, whatever the sizes of the pieces it is fed."""
    sized = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(b"a" * 70000)
    unsized = streamed_frame(b"b" * 5000, window_log=20)
    skippable = struct.pack("<II", 0x184D2A51, 5) + b"12345"
    empty_skippable = struct.pack("<II", 0x184D2A52, 0)
    stream = sized + skippable + unsized + empty_skippable
    ends = [len(sized), len(sized) + len(skippable), len(sized) + len(skippable) + len(unsized), len(stream)]
    events = _events(stream, piece)
    assert [offset for offset, _, _ in events if offset in ends] == ends
    headers = [event for event in events if event[0] not in ends]
    assert [(in_frame, size) for _, in_frame, size in headers] == [(True, 70000), (False, None), (True, None)]
    assert headers[0][0] < 20 and headers[1][0] == len(sized) + 8 and headers[2][0] < ends[1] + 20


def test_a_name_in_a_line_is_quoted_when_it_could_pass_for_another() -> None:
    """Status and log lines show names as they are, unless a control character or a space at an
    end would hide what the name is: ``restore/pg.mirn `` must not read as ``restore/pg.mirn``."""
    assert printable("my disk.mirn") == "my disk.mirn"
    assert printable("pg.mirn ") == "'pg.mirn '"
    assert printable(" pg.mirn") == "' pg.mirn'"
    assert printable("a\nb.mirn") == "'a\\nb.mirn'"
    assert printable("") == "''"


# ---- the seek table, built from columns -----------------------------------------------------------


def test_the_seek_table_is_the_seekable_formats_bytes() -> None:
    entries = [(10, 4 << 20, 0), (0xFFFF_FFFF, 1, 0x89AB_CDEF), (7, 0, 0xFFFF_FFFF)]
    expected_entries = b"".join(struct.pack("<III", *entry) for entry in entries)
    footer = struct.pack("<IBI", 3, 0x80, 0x8F92EAB1)
    expected = struct.pack("<II", 0x184D2A5E, len(expected_entries) + len(footer)) + expected_entries + footer
    assert seek_table(entries) == expected
    columns = [array("I", column) for column in zip(*entries, strict=True)]
    assert seek_table_of_arrays(*columns) == expected
    assert parse_seek_table(expected) == entries
    assert seek_table([]) == struct.pack("<II", 0x184D2A5E, 9) + struct.pack("<IBI", 0, 0x80, 0x8F92EAB1)
    with pytest.raises(ValueError, match="columns differ in length"):
        seek_table_of_arrays(columns[0], columns[1][:2], columns[2])


def test_the_frame_count_of_a_seek_table_is_checked_whole_without_an_object_per_entry() -> None:
    """Review F: ``inspect`` made a tuple per entry, 700 MB for a crafted 64 MiB table, and did
    not check the skippable frame that holds the table."""
    frames = 1_000_000
    column = array("I", bytes(4 * frames))
    table = seek_table_of_arrays(column, column, column)
    tracemalloc.start()
    try:
        count = seek_table_frame_count(table)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == frames and peak < 1 << 20, peak
    other_magic = struct.pack("<I", 0x184D2A50) + table[4:]
    wrong_length = table[:4] + struct.pack("<I", 12 * frames) + table[8:]
    for bad in (other_magic, wrong_length, b"\0" * 8 + table[8:]):
        with pytest.raises(FormatError, match="the seek table's skippable frame does not hold it"):
            seek_table_frame_count(bad)
