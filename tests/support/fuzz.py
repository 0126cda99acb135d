"""The fuzz corpus of issue 11 and the independent oracle every case is judged by.

:func:`corpus` builds, from a seed and nothing else, a few hundred mutated
snapshots in families: header bit flips, every JSON field with wrong types
and extreme values, length fields at 0 / N±1 / 1 MiB±1 / 2^32-1, truncations
at random points and at every frame boundary, duplicated / swapped / deleted
frames, appended garbage, RLE bombs, huge ``size_bytes`` with short data,
and exotic zstd (large window logs, dictionaries, reserved and unused bits,
legacy magics, 100 000 tiny frames, skippable frames everywhere). The same
seed always gives the same bytes.

:class:`Oracle` says what a correct reader must do with each case without
sharing a line of code with mirenfs: its own header check (Go's
``encoding/json`` typing and ``time.Parse(time.RFC3339)`` rules, written
again here), then the zstd command line tool (``zstd -dc --format=zstd``,
with zstd's default 128 MiB window limit, the one python-zstandard applies
too), the exact size and the SHA-256. A data part with no bytes at all
decompresses to nothing (Go's decoder reads an empty stream as empty; the
CLI alone calls it an error). The corpus is built with zstandard and the
oracle judges with no mirenfs code at all; nothing here mounts.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import json
import random
import re
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zstandard

from support.streams import image_bytes
from support.vectors import GO_ODD

MAGIC = b"MIRN"
MIB = 1 << 20
ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
LEGACY_MAGICS = [struct.pack("<I", 0xFD2FB522 + n) for n in range(6)]  # zstd v0.2 … v0.7
ORACLE_TIMEOUT_S = 60
SEED = 11  # the corpus every run uses
FAMILIES = [
    "valid",
    "header-bits",
    "json-fields",
    "length-fields",
    "truncations",
    "frames",
    "appended",
    "bombs",
    "huge-size",
    "exotic",
    "data-bytes",
]


# ---- the oracle -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What restoring a case must give: refused (with why), or exactly this image."""

    accepted: bool
    reason: str
    size_bytes: int = 0
    sha256: str = ""
    seek_table: str = ""  # why verify refuses an accepted case: its seek table does not list its frames


class Refused(Exception):
    """The oracle refuses the case; the message says why."""


class _Members(list[tuple[str, object]]):
    """A JSON object's members in their order (Go decodes them one after the other)."""


def _refuse_constant(text: str) -> object:
    raise ValueError(f"{text} is not JSON")


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{1,2}):([0-9]{2}):([0-9]{2})(?:[.,][0-9]+)?"
    r"(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)


def go_time_ok(text: str) -> bool:
    """Whether Go's ``time.Parse(time.RFC3339, text)`` takes it (lowercase t/z: mirenfs's decision)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(match.group(n)) for n in range(1, 7))
    if not 1 <= month <= 12:
        return False
    days = [31, 29 if calendar.isleap(year) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1]
    if not 1 <= day <= days or hour > 23 or minute > 59 or second > 59:
        return False
    zone_hours, zone_minutes = match.group(7), match.group(8)
    return zone_hours is None or (int(zone_hours) <= 24 and int(zone_minutes) <= 60)


def check_header(data: bytes) -> tuple[dict[str, object], int]:
    """The metadata a correct reader takes from ``data`` and the header's length; :class:`Refused`."""
    if len(data) < 12:
        raise Refused("header truncated")
    magic, version, length = struct.unpack(">4sII", data[:12])
    if magic != MAGIC:
        raise Refused("bad magic")
    if version != 1:
        raise Refused("format version")
    if length > MIB:
        raise Refused("metadata over 1 MiB")
    if len(data) < 12 + length:
        raise Refused("header truncated")
    try:
        document = json.loads(
            data[12 : 12 + length].decode("utf-8", errors="replace"),
            object_pairs_hook=_Members,
            parse_constant=_refuse_constant,
            parse_int=lambda text: int(text) if len(text) < 100 else float("inf"),  # Go skips huge ones
        )
    except (ValueError, RecursionError) as exc:
        raise Refused(f"malformed JSON ({type(exc).__name__})") from None
    if document is None:
        document = _Members()  # Go decodes null into a struct as nothing
    if not isinstance(document, _Members):
        raise Refused("metadata not an object")
    kinds = {
        "name": str,
        "filesystem": str,
        "timestamp": str,
        "checksum": str,
        "size_bytes": int,
        "version": int,
    }
    fields: dict[str, object] = {"name": "", "filesystem": "", "checksum": "", "size_bytes": 0, "version": 1}
    for member, value in document:
        # Go matches keys to fields ignoring case (the long s folds to s, the Kelvin sign to k).
        key = member.replace("\u017f", "s").replace("\u212a", "k")
        key = "".join(char.lower() if char.isascii() else char for char in key)
        kind = kinds.get(key)
        if kind is None or value is None:  # unknown, or null: the field stays as it was
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise Refused(f"{key} not an integer")
        if kind is int and not -(1 << 63) <= int(value) < 1 << 63:  # type: ignore[call-overload]
            raise Refused(f"{key} overflows int64")
        if kind is str and not isinstance(value, str):
            raise Refused(f"{key} not a string")
        if key == "timestamp" and not go_time_ok(str(value)):
            raise Refused("timestamp")
        fields[key] = value
    size = int(fields["size_bytes"])  # type: ignore[call-overload]
    if size < 0:
        raise Refused("negative size_bytes")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", str(fields["checksum"])):
        raise Refused("checksum not 64 hex digits")
    if fields["version"] != 1:
        raise Refused("metadata version")
    if fields["filesystem"] not in ("ext4", "xfs", "btrfs"):  # a restore records it with the disk
        raise Refused("filesystem")
    return fields, 12 + length


def zstd_output(data: bytes, limit: int) -> tuple[int, str] | str:
    """``zstd -dc`` of ``data``: (bytes out, SHA-256), or why it failed. Stops past ``limit`` bytes."""
    if not data:
        return 0, hashlib.sha256().hexdigest()
    with tempfile.NamedTemporaryFile(prefix="mirenfs-fuzz-", suffix=".zst") as source:
        source.write(data)
        source.flush()
        process = subprocess.Popen(
            ["zstd", "-dc", "-q", "--format=zstd", "--memory=128MB", source.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        digest, produced = hashlib.sha256(), 0
        try:
            while piece := process.stdout.read(MIB):
                produced += len(piece)
                if produced > limit:
                    return "longer than size_bytes"
                digest.update(piece)
            code = process.wait(timeout=ORACLE_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=ORACLE_TIMEOUT_S)
            process.stdout.close()
    if code != 0:
        return f"zstd -dc failed ({code})"
    return produced, digest.hexdigest()


class Oracle:
    """Judges cases; remembers the zstd verdict of data parts it has seen (header mutations share them)."""

    def __init__(self) -> None:
        self._zstd: dict[tuple[str, int], tuple[int, str] | str] = {}

    def __call__(self, data: bytes) -> Verdict:
        try:
            fields, header_len = check_header(data)
        except Refused as exc:
            return Verdict(False, str(exc))
        size = int(fields["size_bytes"])  # type: ignore[call-overload]
        payload = data[header_len:]
        key = (hashlib.sha256(payload).hexdigest(), size)
        if key not in self._zstd:
            self._zstd[key] = zstd_output(payload, size)
        out = self._zstd[key]
        if isinstance(out, str):
            return Verdict(False, out)
        produced, sha = out
        if produced != size:
            return Verdict(False, f"decompresses to {produced} bytes, not {size}")
        if sha != str(fields["checksum"]).lower():
            return Verdict(False, "checksum mismatch")
        return Verdict(True, "whole and verified", size, sha, seek_table_problem(payload))


_DECOMPRESSOR = zstandard.ZstdDecompressor()


def _one_frame(data: memoryview) -> tuple[int, int]:
    """The length of the zstd frame ``data`` starts with, and of its content, decoded on its own.
    Fed in growing pieces: what comes after a frame is copied only up to the last piece's end
    (thousands of tiny frames, each handed the whole rest, took the corpus quadratic time)."""
    reader = _DECOMPRESSOR.decompressobj()  # a context made per frame cost more than the frame
    fed = produced = 0
    step = 4096
    while not reader.eof and fed < len(data):
        piece = data[fed : fed + step]
        produced += len(reader.decompress(piece))
        fed += len(piece)
        step *= 4
    return fed - len(reader.unused_data), produced


def seek_table_problem(payload: bytes) -> str:
    """Whether zstd data that decodes ends in a seek table (a skippable frame with magic 0x184D2A5E)
    that does not list its zstd frames, each decoded on its own to learn its sizes; "" when not."""
    frames, last, position = [], None, 0
    while position < len(payload):
        magic, length = struct.unpack("<II", payload[position : position + 8].ljust(8, b"\0"))
        if 0x184D2A50 <= magic <= 0x184D2A5F:
            last = (magic, payload[position + 8 : position + 8 + length])
            position += 8 + length
            continue
        used, produced = _one_frame(memoryview(payload)[position:])
        frames.append((used, produced))
        last, position = None, position + used
    if last is None or last[0] != 0x184D2A5E:
        return ""
    table = last[1]
    if len(table) < 9 or table[-4:] != struct.pack("<I", 0x8F92EAB1):
        return "seek table without its magic"
    count, descriptor = struct.unpack_from("<IB", table, len(table) - 9)
    size = 12 if descriptor & 0x80 else 8
    if len(table) != 9 + size * count:
        return "seek table of another length than its count"
    entries = [struct.unpack_from("<II", table, n * size) for n in range(count)]
    return "" if entries == frames else "seek table not listing the frames"


# ---- building snapshots ---------------------------------------------------------------------------


def metadata(**fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def header(body: bytes, *, version: int = 1, length: int | None = None, magic: bytes = MAGIC) -> bytes:
    return struct.pack(">4sII", magic, version, len(body) if length is None else length) + body


def skippable(payload: bytes, nibble: int = 0xE, *, declared: int | None = None) -> bytes:
    """A skippable frame (magic 0x184D2A5X) around ``payload``, its length field ``declared`` if given."""
    length = len(payload) if declared is None else declared
    return struct.pack("<II", 0x184D2A50 + nibble, length) + payload


def frames_of(
    content: bytes, chunk: int, *, checksum: bool = True, content_size: bool = True, level: int = 3
) -> list[bytes]:
    compressor = zstandard.ZstdCompressor(
        level=level, write_checksum=checksum, write_content_size=content_size
    )
    return [compressor.compress(content[start : start + chunk]) for start in range(0, len(content), chunk)]


def streamed_frame(content: bytes, **parameters: int) -> bytes:
    """One frame written by a streaming compressor: no content size, the window it was given."""
    params = zstandard.ZstdCompressionParameters(**parameters)
    sink = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(sink, closefd=False) as writer:
        writer.write(content)
    return sink.getvalue()


def seek_table_frame(frames: list[bytes], sizes: list[int]) -> bytes:
    """The zstd seekable format's seek table for ``frames`` (checksums zero: readers ignore them)."""
    entries = b"".join(struct.pack("<III", len(f), s, 0) for f, s in zip(frames, sizes, strict=True))
    return skippable(entries + struct.pack("<IBI", len(frames), 0x80, 0x8F92EAB1))


@dataclass
class Base:
    """A valid snapshot as fields and frames, to mutate."""

    name: str
    fields: dict[str, object]
    frames: list[bytes]
    size: int

    def body(self, **changes: object) -> bytes:
        fields = {**self.fields, **changes}
        return metadata(**{k: v for k, v in fields.items() if v is not _MISSING})

    def snapshot(self, frames: list[bytes] | None = None, **changes: object) -> bytes:
        return header(self.body(**changes)) + b"".join(self.frames if frames is None else frames)


_MISSING = object()  # a field left out of the JSON


def _fields(content: bytes, name: str) -> dict[str, object]:
    return {
        "name": name,
        "size_bytes": len(content),
        "filesystem": "ext4",
        "timestamp": "2026-06-04T12:00:00.123456789Z",
        "checksum": hashlib.sha256(content).hexdigest(),
        "version": 1,
    }


def mirenfs_like_base(seed: int) -> Base:
    """Many frames with content sizes and checksums, then a seek table, as mirenfs writes."""
    content = image_bytes(1 << 20, seed=seed)
    frames = frames_of(content, 128 << 10)
    sizes = [len(content[i : i + (128 << 10)]) for i in range(0, len(content), 128 << 10)]
    frames.append(seek_table_frame(frames, sizes))
    return Base("mirenfs", _fields(content, "fuzz"), frames, len(content))


def go_base() -> Base:
    """Go's own snapshot (one frame, no content size) of an odd-sized xfs image."""
    data = GO_ODD.path.read_bytes()
    length = struct.unpack(">I", data[8:12])[0]
    fields = json.loads(data[12 : 12 + length])
    return Base("go", fields, [data[12 + length :]], GO_ODD.size_bytes)


# ---- the corpus -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str
    label: str
    data: bytes

    @property
    def id(self) -> str:
        return f"{self.family}:{self.label}"


@dataclass
class _Corpus:
    rng: random.Random
    cases: list[Case] = field(default_factory=list)

    def add(self, family: str, label: str, data: bytes) -> None:
        self.cases.append(Case(family, label, data))


def _flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _header_bit_flips(c: _Corpus, bases: list[Base]) -> None:
    for base in bases:
        data = base.snapshot()
        header_len = 12 + len(base.body())
        for bit in sorted(c.rng.sample(range(header_len * 8), 24)):
            c.add("header-bits", f"{base.name}-bit{bit}", _flip_bit(data, bit))


FIELD_VALUES: dict[str, list[object]] = {
    "name": [None, _MISSING, 5, True, [], {}, "", "x" * 100_000, "\u0000", "../../etc/passwd", "\ud800"],
    "size_bytes": [
        None,
        _MISSING,
        "N",
        -1,
        0,
        1.5,
        1e3,
        1 << 31,
        (1 << 32) - 1,
        (1 << 53) + 1,
        (1 << 63) - 1,
        1 << 63,
        -(1 << 63),
        True,
        [],
        "size-1",
        "size+1",
    ],
    "filesystem": [None, _MISSING, 7, "", "zfs", "x" * 1000, {"a": 1}],
    "timestamp": [
        None,
        _MISSING,
        "",
        "yesterday",
        0,
        "0000-01-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2016-12-31T23:59:60Z",
        "2026-06-04T12:00:00+24:00",
        "2026-06-04T12:00:00+99:99",
        "9999-12-31T23:59:59.999999999Z",
        "2026-06-04T1:00:00,5Z",
        "\u0662026-06-04T12:00:00Z",
    ],
    "checksum": [None, _MISSING, "", "abc", "UPPER", "short", "long", "other", 5, "zz" * 32, ["x"]],
    "version": [0, 2, "1", 1.0, True, -1, 1 << 63, None],
}


def _json_fields(c: _Corpus, bases: list[Base]) -> None:
    for base in bases:
        checksum = str(base.fields["checksum"])
        special = {
            "size-1": base.size - 1,
            "size+1": base.size + 1,
            "UPPER": checksum.upper(),
            "short": checksum[:-1],
            "long": checksum + "0",
            "other": hashlib.sha256(b"other").hexdigest(),
        }
        for key, values in FIELD_VALUES.items():
            for n, value in enumerate(values):
                real = special.get(value, value) if isinstance(value, str) else value
                shown = "missing" if value is _MISSING else repr(value)[:24]
                c.add("json-fields", f"{base.name}-{key}-{n}={shown}", base.snapshot(**{key: real}))
        body = base.body()
        c.add(
            "json-fields",
            f"{base.name}-nested-100k",
            header(body[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}") + b"".join(base.frames),
        )
        c.add("json-fields", f"{base.name}-nan", header(body[:-1] + b',"x":NaN}') + b"".join(base.frames))
        c.add("json-fields", f"{base.name}-array", header(b"[" + body + b"]") + b"".join(base.frames))
        c.add("json-fields", f"{base.name}-null", header(b"null") + b"".join(base.frames))
        c.add(
            "json-fields",
            f"{base.name}-huge-int-unknown",
            header(body[:-1] + b',"x":1' + b"0" * 5000 + b"}") + b"".join(base.frames),
        )


def _length_fields(c: _Corpus, base: Base) -> None:
    body, rest = base.body(), b"".join(base.frames)
    n = len(body)
    for label, length in [
        ("0", 0),
        ("N-1", n - 1),
        ("N+1", n + 1),
        ("1MiB-1", MIB - 1),
        ("1MiB", MIB),
        ("1MiB+1", MIB + 1),
        ("2^32-1", (1 << 32) - 1),
    ]:
        c.add("length-fields", f"metadata-{label}", header(body, length=length) + rest)
    c.add(
        "length-fields", "metadata-1MiB-real", header(body + b" " * (MIB - n)) + rest
    )  # JSON may end in spaces
    c.add("length-fields", "metadata-1MiB+1-real", header(body + b" " * (MIB + 1 - n)) + rest)
    for version in (0, 2, (1 << 32) - 1):
        c.add("length-fields", f"version-{version}", header(body, version=version) + rest)
    for magic in (b"MIRn", b"\0\0\0\0", b"NRIM", ZSTD_MAGIC):
        c.add("length-fields", f"magic-{magic.hex()}", header(body, magic=magic) + rest)
    # Skippable frames whose length field says 0, N±1, 1 MiB±1 or 2^32-1 around N bytes of payload.
    payload = bytes(range(256)) * 4
    head = header(body)
    for label, declared, actual in [
        ("0", 0, b""),
        ("N", None, payload),
        ("N-1", len(payload) - 1, payload),
        ("N+1", len(payload) + 1, payload),
        ("1MiB-1", MIB - 1, bytes(MIB - 1)),
        ("1MiB+1", MIB + 1, bytes(MIB + 1)),
        ("1MiB+1-short", MIB + 1, bytes(MIB)),
        ("2^32-1", (1 << 32) - 1, payload),
    ]:
        c.add("length-fields", f"skippable-{label}", head + skippable(actual, declared=declared) + rest)
    # The frame content size field of the first frame, off by one either way.
    first = base.frames[0]
    params = zstandard.get_frame_parameters(first)
    if params.content_size > 0:
        descriptor = first[4]
        fcs_len = (1 if descriptor & 0x20 else 0, 2, 4, 8)[descriptor >> 6]
        start = 5 + (0 if descriptor & 0x20 else 1)
        for delta in (-1, 1):
            value = params.content_size + delta - (256 if fcs_len == 2 else 0)
            changed = first[:start] + value.to_bytes(fcs_len, "little") + first[start + fcs_len :]
            c.add(
                "length-fields", f"frame-content-size{delta:+d}", head + changed + b"".join(base.frames[1:])
            )
    # A block size field past the block's maximum (128 KiB).
    block_at = 5 + (0 if first[4] & 0x20 else 1) + (1 if first[4] & 0x20 else 0, 2, 4, 8)[first[4] >> 6]
    block = int.from_bytes(first[block_at : block_at + 3], "little")
    huge = (block & 7) | ((1 << 18) << 3)
    c.add(
        "length-fields",
        "block-size-256KiB",
        head
        + first[:block_at]
        + huge.to_bytes(3, "little")
        + first[block_at + 3 :]
        + b"".join(base.frames[1:]),
    )


def _truncations(c: _Corpus, bases: list[Base]) -> None:
    for base in bases:
        data = base.snapshot()
        header_len = 12 + len(base.body())
        for cut in sorted(c.rng.sample(range(1, len(data)), 16)):
            c.add("truncations", f"{base.name}-at-{cut}", data[:cut])
        for cut in (0, 4, 11, 12, header_len - 1, header_len):
            c.add("truncations", f"{base.name}-header-{cut}", data[:cut])
        position = header_len
        for n, frame in enumerate(base.frames[:-1]):
            position += len(frame)
            c.add("truncations", f"{base.name}-after-frame-{n}", data[:position])
            c.add("truncations", f"{base.name}-frame-{n}-less-one", data[: position - 1])


def _frame_shuffles(c: _Corpus, base: Base) -> None:
    data_frames = base.frames[:-1]  # the seek table stays last
    table = base.frames[-1:]
    for n in range(len(data_frames)):
        c.add("frames", f"duplicate-{n}", base.snapshot(data_frames[: n + 1] + data_frames[n:] + table))
        c.add("frames", f"delete-{n}", base.snapshot(data_frames[:n] + data_frames[n + 1 :] + table))
    for n in range(len(data_frames) - 1):
        swapped = list(data_frames)
        swapped[n], swapped[n + 1] = swapped[n + 1], swapped[n]
        c.add("frames", f"swap-{n}-{n + 1}", base.snapshot(swapped + table))
    c.add("frames", "no-seek-table", base.snapshot(data_frames))
    c.add("frames", "seek-table-first", base.snapshot(table + data_frames))
    c.add("frames", "reversed", base.snapshot(data_frames[::-1] + table))


def _appended(c: _Corpus, bases: list[Base]) -> None:
    for base in bases:
        data = base.snapshot()
        for label, tail in [
            ("1-random", c.rng.randbytes(1)),
            ("4-zeros", bytes(4)),
            ("100-random", c.rng.randbytes(100)),
            ("64KiB-random", c.rng.randbytes(64 << 10)),
            ("mirn-header", header(base.body())),
            ("zstd-magic-only", ZSTD_MAGIC),
            ("empty-frame", zstandard.ZstdCompressor(write_content_size=True).compress(b"")),
            ("data-frame", zstandard.ZstdCompressor().compress(b"more")),
            ("skippable", skippable(b"trailing", 0x3)),
            ("skippable-truncated", skippable(b"trailing", 0x3)[:-1]),
            ("whole-snapshot-again", data),
        ]:
            c.add("appended", f"{base.name}-{label}", data + tail)


def _bombs(c: _Corpus) -> None:
    zeros_64m = streamed_frame(bytes(64 * MIB), window_log=20)
    sha_64m = hashlib.sha256(bytes(64 * MIB)).hexdigest()
    sha_1m = hashlib.sha256(bytes(MIB)).hexdigest()
    gib = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(gib, closefd=False) as writer:
        block = bytes(16 * MIB)
        for _ in range(64):
            writer.write(block)
    bomb_1g = gib.getvalue()
    fields = _fields(bytes(MIB), "bomb")
    c.add(
        "bombs",
        "64MiB-zeros-exact",
        header(metadata(**{**fields, "size_bytes": 64 * MIB, "checksum": sha_64m})) + zeros_64m,
    )
    c.add("bombs", "64MiB-zeros-as-1MiB", header(metadata(**{**fields, "checksum": sha_1m})) + zeros_64m)
    c.add("bombs", "1GiB-zeros-as-1MiB", header(metadata(**fields)) + bomb_1g)
    c.add(
        "bombs",
        "1GiB-zeros-as-0",
        header(metadata(**{**fields, "size_bytes": 0, "checksum": hashlib.sha256().hexdigest()})) + bomb_1g,
    )
    rle = zstandard.ZstdCompressor(write_content_size=True).compress(b"\xaa" * (8 * MIB))
    c.add(
        "bombs",
        "8MiB-rle-exact",
        header(
            metadata(
                **{
                    **fields,
                    "size_bytes": 8 * MIB,
                    "checksum": hashlib.sha256(b"\xaa" * (8 * MIB)).hexdigest(),
                }
            )
        )
        + rle,
    )
    c.add("bombs", "8MiB-rle-x100-as-8MiB", header(metadata(**{**fields, "size_bytes": 8 * MIB})) + rle * 100)


def _huge_sizes(c: _Corpus, base: Base) -> None:
    for label, size in [
        ("2^40", 1 << 40),
        ("2^62", 1 << 62),
        ("2^63-1", (1 << 63) - 1),
        ("size+4096", base.size + 4096),
    ]:
        c.add("huge-size", label, base.snapshot(size_bytes=size))
        c.add("huge-size", f"{label}-no-data", base.snapshot([], size_bytes=size))
    c.add("huge-size", "0-no-data", base.snapshot([], size_bytes=0, checksum=hashlib.sha256().hexdigest()))
    c.add(
        "huge-size",
        "0-empty-frame",
        base.snapshot(
            [zstandard.ZstdCompressor().compress(b"")], size_bytes=0, checksum=hashlib.sha256().hexdigest()
        ),
    )


def _exotic(c: _Corpus, seed: int) -> None:
    content = image_bytes(600_000, seed=seed + 1)
    fields = _fields(content, "exotic")

    def snap(*frames: bytes, **changes: object) -> bytes:
        return header(metadata(**{**fields, **changes})) + b"".join(frames)

    for window_log in (10, 20, 27, 28, 31):
        c.add("exotic", f"window-log-{window_log}", snap(streamed_frame(content, window_log=window_log)))
    samples = [content[i : i + 2048] for i in range(0, 400_000, 2048)]
    dictionary = zstandard.train_dictionary(4096, samples)
    with_dict = zstandard.ZstdCompressor(dict_data=dictionary, write_content_size=True).compress(content)
    c.add("exotic", "dictionary-id", snap(with_dict))
    no_id = zstandard.ZstdCompressor(dict_data=dictionary, write_dict_id=False).compress(content)
    c.add("exotic", "dictionary-without-id", snap(no_id))
    raw = zstandard.ZstdCompressionDict(content[:65536], dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    c.add("exotic", "raw-content-dictionary", snap(zstandard.ZstdCompressor(dict_data=raw).compress(content)))
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(content)
    for bit, label in ((0x08, "reserved-bit"), (0x10, "unused-bit")):
        c.add("exotic", label, snap(frame[:4] + bytes([frame[4] | bit]) + frame[5:]))
    for magic in LEGACY_MAGICS:
        c.add("exotic", f"legacy-magic-{magic.hex()}", snap(magic + frame[4:]))
    c.add("exotic", "bad-content-checksum", snap(frame[:-4] + bytes(b ^ 0xFF for b in frame[-4:])))
    block_at = 5 + (1 if frame[4] & 0x20 else 0) + (1 if frame[4] & 0x20 else 0, 2, 4, 8)[frame[4] >> 6]
    block = int.from_bytes(frame[block_at : block_at + 3], "little")
    c.add(
        "exotic",
        "reserved-block-type",
        snap(frame[:block_at] + (block | 6).to_bytes(3, "little") + frame[block_at + 3 :]),
    )
    mixed = [
        zstandard.ZstdCompressor(write_checksum=bool(n % 2), write_content_size=bool(n % 3)).compress(
            content[s : s + 50_000]
        )
        for n, s in enumerate(range(0, len(content), 50_000))
    ]
    c.add("exotic", "mixed-frame-flags", snap(*mixed))
    everywhere = [skippable(b"", n % 16) for n in range(len(mixed) + 1)]
    interleaved = [piece for pair in zip(everywhere, [*mixed, b""], strict=True) for piece in pair]
    c.add("exotic", "skippable-everywhere", snap(*interleaved))
    # Frames in tens of thousands (each costs a restore ~60 µs however small, which is why not
    # more: a pass over 100 000 of them took 6 s of the fast tier).
    tiny_content = image_bytes(20_000, seed=seed + 2)
    tiny = zstandard.ZstdCompressor(level=1, write_content_size=True)
    tiny_frames = [tiny.compress(tiny_content[i : i + 1]) for i in range(len(tiny_content))]
    c.add(
        "exotic",
        "20k-tiny-frames",
        header(metadata(**_fields(tiny_content, "tiny"))) + b"".join(tiny_frames),
    )
    empty = zstandard.ZstdCompressor(write_content_size=True).compress(b"")
    c.add("exotic", "20k-empty-frames-then-data", snap(empty * 20_000, frame))
    c.add("exotic", "level-22", snap(zstandard.ZstdCompressor(level=22).compress(content)))
    c.add("exotic", "level-negative", snap(zstandard.ZstdCompressor(level=-5).compress(content)))


def _data_flips(c: _Corpus, bases: list[Base]) -> None:
    for base in bases:
        data = base.snapshot()
        header_len = 12 + len(base.body())
        for offset in sorted(c.rng.sample(range(header_len, len(data)), 20)):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << c.rng.randrange(8)
            c.add("data-bytes", f"{base.name}-at-{offset}", bytes(flipped))


def corpus(seed: int = SEED) -> list[Case]:
    """Every case, in a fixed order: the same seed gives the same bytes."""
    c = _Corpus(random.Random(seed))
    mirenfs_base, go = mirenfs_like_base(seed), go_base()
    bases = [mirenfs_base, go]
    c.add("valid", "mirenfs", mirenfs_base.snapshot())
    c.add("valid", "go", go.snapshot())
    _header_bit_flips(c, bases)
    _json_fields(c, bases)
    _length_fields(c, mirenfs_base)
    _truncations(c, bases)
    _frame_shuffles(c, mirenfs_base)
    _appended(c, bases)
    _bombs(c)
    _huge_sizes(c, mirenfs_base)
    _exotic(c, seed)
    _data_flips(c, bases)
    return c.cases


def sample(
    cases: list[Case], count: int, seed: int, *, keep: Callable[[Case], bool] = lambda _c: True
) -> list[Case]:
    """``count`` cases spread over every family (for the kernel tier, where each costs a ``cp``)."""
    rng = random.Random(seed)
    chosen = [case for case in cases if keep(case)]
    by_family: dict[str, list[Case]] = {}
    for case in chosen:
        by_family.setdefault(case.family, []).append(case)
    picked: list[Case] = []
    while len(picked) < count and any(by_family.values()):
        for family in list(by_family):
            if by_family[family] and len(picked) < count:
                picked.append(by_family[family].pop(rng.randrange(len(by_family[family]))))
    return picked


def pieces(data: bytes, rng: random.Random) -> Iterator[bytes]:
    """``data`` in pieces of random sizes (1 byte to 300 KB), as pipes and FUSE deliver it."""
    position = 0
    while position < len(data):
        step = rng.choice([1, 7, 4096, 131072, rng.randrange(1, 300_000)])
        yield data[position : position + step]
        position += step
