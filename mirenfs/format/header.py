"""The `.mirn` header: byte-exact with Miren's Go writer (SPEC §2).

The header is ``MIRN`` + u32 BE version + u32 BE length + JSON metadata.
The JSON must match Go's ``encoding/json`` output byte for byte, so it is
built here by hand (key order, escaping, RFC 3339 nanosecond timestamps)
rather than left to :mod:`json`'s defaults.
"""

from __future__ import annotations

import codecs
import datetime as _dt
import json
import re
import string
import struct
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

from mirenfs.errors import FormatError, quoted
from mirenfs.format.frames import ZSTD_MAGIC

FILESYSTEMS = ("ext4", "xfs", "btrfs")  # SPEC §2: what a snapshot's filesystem is, and a disk holds
MAGIC = b"MIRN"
_ZSTD_MAGIC_BYTES = ZSTD_MAGIC.to_bytes(4, "little")  # what a plain .zst file starts with
FORMAT_VERSION = 1
MAX_METADATA_LEN = 1 << 20
PREFIX_LEN = 12  # magic + version + metadata length
_PREFIX = struct.Struct(">4sII")
_CHECKSUM_RE = re.compile(r"[0-9a-fA-F]{64}")
_EPOCH = _dt.datetime(1970, 1, 1)
_NS = 1_000_000_000
# The instants a header holds: Go writes and reads the years 0000 to 9999 only (RFC 3339), as
# Timestamp.parse does.
EARLIEST_HEADER_NS = -62_167_219_200 * _NS  # 0000-01-01T00:00:00Z
LATEST_HEADER_NS = 253_402_300_800 * _NS - 1  # 9999-12-31T23:59:59.999999999Z


@dataclass(frozen=True, order=True)
class Timestamp:
    """An instant with nanosecond precision and the UTC offset it was written with.

    :class:`datetime.datetime` stops at microseconds, but Go's RFC 3339 output
    carries nanoseconds and a header must round-trip exactly.
    """

    unix_ns: int
    utc_offset_s: int = 0

    @classmethod
    def from_datetime(cls, value: _dt.datetime) -> Timestamp:
        """Convert an aware datetime (naive ones are taken as UTC)."""
        offset = value.utcoffset() or _dt.timedelta(0)
        naive_utc = value.replace(tzinfo=None) - offset
        delta = naive_utc - _EPOCH
        unix_ns = (delta.days * 86400 + delta.seconds) * _NS + delta.microseconds * 1000
        return cls(unix_ns, int(offset.total_seconds()))

    def to_datetime(self) -> _dt.datetime:
        """The instant as an aware datetime (nanoseconds truncated to microseconds). An offset of
        24 hours or more (Go reads up to ±24:60) cannot be a ``datetime`` zone: that one is in UTC.
        Years before 1 raise :class:`OverflowError`, as ``datetime`` stops there."""
        offset = self.utc_offset_s if abs(self.utc_offset_s) < 86400 else 0
        tz = _dt.timezone(_dt.timedelta(seconds=offset))
        seconds, ns = divmod(self.unix_ns, _NS)
        local = _EPOCH + _dt.timedelta(seconds=seconds + offset, microseconds=ns // 1000)
        return local.replace(tzinfo=tz)

    def rfc3339(self) -> str:
        """Go's ``time.RFC3339Nano``: trailing fraction zeros trimmed, ``Z`` for UTC."""
        seconds, ns = divmod(self.unix_ns, _NS)
        days, second_of_day = divmod(seconds + self.utc_offset_s, 86400)
        year, month, day = _civil_from_days(days)
        hour, rest = divmod(second_of_day, 3600)
        text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{rest // 60:02d}:{rest % 60:02d}"
        if ns:
            text += "." + f"{ns:09d}".rstrip("0")
        if self.utc_offset_s == 0:
            return text + "Z"
        sign = "-" if self.utc_offset_s < 0 else "+"
        hours, minutes = divmod(abs(self.utc_offset_s) // 60, 60)
        return f"{text}{sign}{hours:02d}:{minutes:02d}"

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        """Parse an RFC 3339 timestamp exactly as Go's ``time.Time`` JSON decoding does.

        That is ``time.Parse(time.RFC3339, …)`` (its strict RFC 3339 checks are
        disabled in every Go release): ASCII digits only, years 0000-9999, a
        one- or two-digit hour, a fraction after ``.`` or ``,`` (cut to
        nanoseconds), UTC offsets up to ``±24:60`` (Go's range test is ``>``,
        "as some people do write offsets of 24 hours or 60 minutes"); a second
        of 60 and impossible dates are refused. Lowercase ``t`` and ``z``, which
        RFC 3339 allows and Go refuses, are accepted. Raise :class:`FormatError`
        otherwise.
        """
        match = _RFC3339_RE.fullmatch(text)
        if not match:
            raise FormatError(f"timestamp {text!r} is not an RFC 3339 time")
        year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
        fraction, zone = match.group(7) or "", match.group(8)
        if not (1 <= month <= 12 and 1 <= day <= _days_in_month(year, month)):
            raise FormatError(f"timestamp {text!r} is not a valid date")
        if hour > 23 or minute > 59 or second > 59:
            raise FormatError(f"timestamp {text!r} is not a valid time of day")
        ns = int((fraction + "000000000")[:9]) if fraction else 0
        offset = 0
        if zone not in ("Z", "z"):
            zone_hours, zone_minutes = int(zone[1:3]), int(zone[4:6])
            if zone_hours > 24 or zone_minutes > 60:
                raise FormatError(f"timestamp {text!r} has an impossible UTC offset")
            offset = (-1 if zone[0] == "-" else 1) * (zone_hours * 3600 + zone_minutes * 60)
        days = _days_from_civil(year, month, day)
        seconds = days * 86400 + hour * 3600 + minute * 60 + second - offset
        return cls(seconds * _NS + ns, offset)

    @classmethod
    def from_unix_ns(cls, unix_ns: int) -> Timestamp:
        """A UTC timestamp, as mirenfs writes for an image's mtime."""
        return cls(unix_ns, 0)


_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{1,2}):([0-9]{2}):([0-9]{2})(?:[.,]([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if _is_leap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar, year 0 included
    (``datetime`` stops at year 1; Go's times go back to year 0)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """The inverse of :func:`_days_from_civil`."""
    days += 719468
    era = days // 146097
    day_of_era = days - era * 146097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_index = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_index + 2) // 5 + 1
    month = month_index + (3 if month_index < 10 else -9)
    return year_of_era + era * 400 + (month <= 2), month, day


@dataclass(frozen=True)
class Meta:
    """A snapshot's metadata, as in Miren's Go ``Meta`` struct."""

    name: str
    size_bytes: int
    filesystem: str
    timestamp: Timestamp
    checksum: str
    version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        """The metadata exactly as Go's ``encoding/json`` writes it."""
        fields = (
            f'"name":{go_json_string(self.name)}',
            f'"size_bytes":{self.size_bytes}',
            f'"filesystem":{go_json_string(self.filesystem)}',
            f'"timestamp":{go_json_string(self.timestamp.rfc3339())}',
            f'"checksum":{go_json_string(self.checksum)}',
            f'"version":{self.version}',
        )
        body = ("{" + ",".join(fields) + "}").encode("utf-8")
        if len(body) > MAX_METADATA_LEN:  # no reader, this one included, would open the file
            raise FormatError(
                f"the metadata of a snapshot named {quoted(self.name)} would take {len(body)} bytes, "
                "more than the 1 MiB a snapshot may hold; give a shorter name"
            )
        return body

    def header(self) -> bytes:
        """The complete header: magic, version, length and metadata."""
        body = self.to_json()
        return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body

    def header_len(self) -> int:
        return PREFIX_LEN + len(self.to_json())


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_HEX_ESCAPED = frozenset("<>&\u2028\u2029")


def go_json_string(value: str) -> str:
    """Quote a string the way Go's ``encoding/json`` does (HTML-safe escaping).

    Control characters other than \\n, \\r, \\t become ``\\u00XX``; ``<``, ``>``,
    ``&``, U+2028 and U+2029 are escaped; a lone surrogate (invalid UTF-8 to Go) becomes
    the text ``\\ufffd`` once per byte Go would see: one for a byte a file name held
    (``surrogateescape``), three for a surrogate's own UTF-8; everything else is raw UTF-8.
    """
    out = ['"']
    for char in value:
        short = _SHORT_ESCAPES.get(char)
        if short is not None:
            out.append(short)
        elif char < " " or char in _HEX_ESCAPED:
            out.append(f"\\u{ord(char):04x}")
        elif "\udc80" <= char <= "\udcff":  # one undecodable byte (review F: Go escapes it)
            out.append("\\ufffd")
        elif "\ud800" <= char <= "\udfff":
            out.append("\\ufffd" * 3)
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def write_header(dst: BinaryIO, meta: Meta) -> int:
    """Write the header of ``meta`` to ``dst``; return the number of bytes written."""
    header = meta.header()
    dst.write(header)
    return len(header)


def truncated_header(length: int) -> str:
    """What to say of a stream that ended after ``length`` bytes, before its header did."""
    if length == 0:
        return "the snapshot is empty (0 bytes)"
    unit = "byte" if length == 1 else "bytes"
    return f"the snapshot header is truncated: the stream ended after {length} {unit}"


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def read_header(src: Readable, *, validate: bool = True) -> Meta:
    """Read a header from a blocking file-like object, validated unless told not to."""
    parser = HeaderParser(validate=validate)
    while parser.meta is None:
        need = parser.bytes_needed()
        piece = src.read(need)
        if not piece:
            raise FormatError(truncated_header(parser.bytes_taken))
        leftover = parser.feed(piece)
        assert not leftover  # we never read past what the parser asked for
    return parser.meta


def decode_header(data: bytes, *, validate: bool = True) -> tuple[Meta, int]:
    """Parse a header at the start of ``data``; return it and its length in bytes."""
    parser = HeaderParser(validate=validate)
    rest = parser.feed(data)
    if parser.meta is None:
        raise FormatError(truncated_header(len(data)))
    return parser.meta, len(data) - len(rest)


class HeaderParser:
    """Parses a header from pieces of any size, as FUSE writes or pipes deliver them.

    Each problem is reported as soon as the bytes that show it arrive: a bad
    magic after its first wrong byte, an oversized length after 12 bytes.
    """

    def __init__(self, *, validate: bool = True) -> None:
        self._validate = validate
        self._buffer = bytearray()
        self._body_len: int | None = None
        self.meta: Meta | None = None

    @property
    def bytes_taken(self) -> int:
        """Header bytes fed so far, until the header is complete."""
        return len(self._buffer)

    def bytes_needed(self) -> int:
        """How many more bytes complete the header (0 once it is parsed)."""
        if self.meta is not None:
            return 0
        total = PREFIX_LEN if self._body_len is None else PREFIX_LEN + self._body_len
        return total - len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Consume header bytes; return what follows the header (the zstd data)."""
        view = memoryview(data)
        if self.meta is not None:
            return view
        take = self.bytes_needed()
        self._buffer += view[:take]
        rest = view[take:]
        self._check_prefix()
        if self._body_len is not None and len(self._buffer) == PREFIX_LEN + self._body_len:
            meta = parse_metadata(bytes(self._buffer[PREFIX_LEN:]))
            self.meta = validate_meta(meta) if self._validate else meta
            self._buffer = bytearray()
            return rest
        if self.meta is None and len(rest):
            # The prefix just completed: the rest belongs to the metadata.
            return self.feed(rest)
        return rest

    def _check_prefix(self) -> None:
        got = bytes(self._buffer[:4])
        if got != MAGIC[: len(got)]:
            shown = " ".join(f"{byte:02x}" for byte in got)
            what = "a plain zstd stream, " if got == _ZSTD_MAGIC_BYTES else ""
            raise FormatError(
                f"not a .mirn snapshot: bad magic (it starts with the bytes {shown}, {what}"
                "where a snapshot starts with MIRN)"
            )
        if self._body_len is None and len(self._buffer) >= PREFIX_LEN:
            _, version, body_len = _PREFIX.unpack(self._buffer[:PREFIX_LEN])
            if version != FORMAT_VERSION:
                raise FormatError(
                    f"unsupported snapshot format version {version}; "
                    f"this mirenfs reads version {FORMAT_VERSION}"
                )
            if body_len > MAX_METADATA_LEN:
                raise FormatError(
                    f"snapshot metadata claims {body_len} bytes, "
                    "more than the 1 MiB limit: not a valid snapshot"
                )
            self._body_len = body_len


def validate_meta(meta: Meta) -> Meta:
    """Refuse metadata no restore can use (SPEC §2 reader rules); return it unchanged."""
    if meta.size_bytes < 0:
        raise FormatError(f"snapshot metadata has a negative size_bytes ({meta.size_bytes})")
    if not _CHECKSUM_RE.fullmatch(meta.checksum):
        raise FormatError(f"the snapshot checksum is not 64 hex digits ({_not_hex(meta.checksum)})")
    if meta.version != FORMAT_VERSION:
        raise FormatError(f"unsupported snapshot metadata version {meta.version}")
    return meta


def _not_hex(checksum: str) -> str:
    """Where a checksum that is not 64 hex digits goes wrong: its length, or its first bad character."""
    if len(checksum) != 64:
        return f"it has {len(checksum)} characters"
    at = next(i for i, c in enumerate(checksum) if c not in string.hexdigits)
    return f"character {at + 1}, {quoted(checksum[at])}, is not a hex digit"


def validate_restorable(meta: Meta) -> Meta:
    """:func:`validate_meta`, and what a restore needs besides: a filesystem a disk can hold.

    Reading and inspecting take any string there, as Go's reader does (its
    zero-value header has none); a restore records it with the disk, so only
    the filesystems ``disk create`` makes are accepted, before anything is created.
    """
    validate_meta(meta)
    if meta.filesystem not in FILESYSTEMS:
        accepted = ", ".join(FILESYSTEMS[:-1]) + f" or {FILESYSTEMS[-1]}"
        raise FormatError(
            f"the snapshot's header gives the filesystem {quoted(meta.filesystem)}, and a restore "
            f"accepts only {accepted}: it is not a snapshot of a Miren disk"
        )
    return meta


def _each_byte_replaced(error: UnicodeError) -> tuple[str, int]:
    """Like Go's UTF-8 decoding: one U+FFFD for every byte that is not part of a valid character."""
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd" * (error.end - error.start), error.end


_GO_UTF8 = "mirenfs-go-utf8"
codecs.register_error(_GO_UTF8, _each_byte_replaced)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> str:
    """A JSON ``\\ud800`` escape alone is a lone surrogate; Go decodes it as U+FFFD."""
    return _SURROGATE_RE.sub("\ufffd", text)


_GO_ZERO_TIME = Timestamp.parse("0001-01-01T00:00:00Z")  # what Go leaves in a timestamp no header sets


class _JsonObject(list[tuple[str, object]]):
    """A JSON object's members in their order: Go decodes them one after the other."""


class _HugeInteger:
    """A JSON integer too long for :func:`int` (Python refuses over 4 300 digits; Go skips it in an
    unknown key and refuses it as overflowing in a known one)."""


def _json_integer(text: str) -> int | _HugeInteger:
    return int(text) if len(text) <= 40 else _HugeInteger()


def _no_constants(text: str) -> object:
    raise ValueError(f"{text} is not JSON")  # Python reads NaN and Infinity; Go (and JSON) refuse them


_FIELD_KINDS: dict[str, type] = {
    "name": str,
    "size_bytes": int,
    "filesystem": str,
    "timestamp": str,
    "checksum": str,
    "version": int,
}
# Go's encoding/json matches keys to fields case-insensitively, folding as Unicode does:
# the long s is an s, the Kelvin sign a k.
_GO_FOLD = str.maketrans({"\u017f": "S", "\u212a": "K"})
_FIELDS_FOLDED = {key.upper(): key for key in _FIELD_KINDS}


def _field_of(key: str) -> str | None:
    if key in _FIELD_KINDS:
        return key
    return _FIELDS_FOLDED.get("".join(c.upper() if c.isascii() else c for c in key.translate(_GO_FOLD)))


def _decode_field(key: str, value: object) -> object:
    """One member's value as Go decodes it into the field ``key``, or the refusal Go gives."""
    kind = _FIELD_KINDS[key]
    if kind is int and (
        isinstance(value, _HugeInteger)
        or (isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 63)
    ):
        raise FormatError(f"snapshot metadata {key} does not fit in 64 bits")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"snapshot metadata field {key!r} must be a JSON {kind.__name__}")
    if key == "timestamp":
        return Timestamp.parse(str(value))
    return _without_surrogates(value) if isinstance(value, str) else value


def parse_metadata(body: bytes) -> Meta:
    """Decode the JSON metadata with Go's rules; unknown keys are ignored.

    As Go's ``encoding/json`` into the ``Meta`` struct: members are decoded in
    order (the last one of a field wins, a ``null`` leaves it as it was, a
    wrong type anywhere refuses the header), keys match fields
    case-insensitively, and invalid UTF-8 reads as U+FFFD. This checks
    structure only; :func:`validate_meta` applies the reader's refusals, so
    that Go's zero-value header still decodes to its values.
    """
    try:
        # Go reads invalid UTF-8 (and lone UTF-16 surrogates) as U+FFFD instead of failing.
        document = json.loads(
            body.decode("utf-8", errors=_GO_UTF8),
            object_pairs_hook=_JsonObject,
            parse_int=_json_integer,
            parse_constant=_no_constants,
        )
    except json.JSONDecodeError as exc:  # Python's "line 1 column 191 (char 190)": the metadata is one line
        # Some messages end in "at" themselves ("Unterminated string starting at").
        where = f"character {exc.pos + 1}" if exc.msg.endswith(" at") else f"at character {exc.pos + 1}"
        raise FormatError(f"snapshot metadata is not valid JSON: {exc.msg} {where}") from None
    except ValueError as exc:
        raise FormatError(f"snapshot metadata is not valid JSON: {exc}") from None
    except RecursionError:
        raise FormatError("snapshot metadata is not valid JSON: it is nested too deeply") from None
    if document is None:
        document = _JsonObject()  # Go decodes null into a struct as nothing: the zero value
    if not isinstance(document, _JsonObject):
        raise FormatError("snapshot metadata is not a JSON object")
    fields: dict[str, object] = {}
    for key, value in document:
        field = _field_of(key)
        if field is not None and value is not None:
            fields[field] = _decode_field(field, value)
    return Meta(
        name=str(fields.get("name", "")),
        size_bytes=int(fields.get("size_bytes", 0)),  # type: ignore[call-overload]
        filesystem=str(fields.get("filesystem", "")),
        timestamp=cast(Timestamp, fields.get("timestamp", _GO_ZERO_TIME)),
        checksum=str(fields.get("checksum", "")),
        version=int(fields.get("version", FORMAT_VERSION)),  # type: ignore[call-overload]
    )
