"""The header reader against Go's: what Miren's ``ReadHeader`` (``encoding/json`` into the ``Meta``
struct, ``time.Time`` for the timestamp) accepts is accepted, with the same values, and what it
refuses is refused (issue 11, "Go compatibility of the reader").

Go's ``time.Time`` decoding is ``time.Parse(time.RFC3339, …)``: the strict RFC 3339 checks of
``parseStrictRFC3339`` are disabled in every release (``case true: return t, nil``), so Go takes
a one-digit hour, a comma before the fraction and offsets up to ±24:60 (its range test is ``>``),
and refuses a second of 60, impossible dates and non-ASCII digits. One difference is deliberate
(README, "Decisions"): lowercase ``t``/``z``, which RFC 3339 allows and Go refuses, are accepted.
Another is a limit: JSON nested deeper than Python's recursion limit (about 1 000 levels; Go's is
10 000) is refused as a bad header.
"""

from __future__ import annotations

import datetime as _dt
import io
import json

import pytest

from mirenfs.errors import FormatError
from mirenfs.format.header import Meta, Timestamp, decode_header, read_header

from support.bad_snapshots import raw_header

CHECKSUM = "ab" * 32
S = 1_000_000_000  # nanoseconds per second
DAY = 86_400


def body(**fields: object) -> bytes:
    """Metadata JSON with a valid header's fields, changed or added by ``fields``."""
    values: dict[str, object] = {
        "name": "d",
        "size_bytes": 5,
        "filesystem": "ext4",
        "timestamp": "2026-06-04T12:00:00Z",
        "checksum": CHECKSUM,
        "version": 1,
    }
    values.update(fields)
    return json.dumps(values).encode()


def read(metadata: bytes, *, validate: bool = True) -> Meta:
    """The header around ``metadata`` as the reader reads it, whole and byte by byte (the same)."""
    data = raw_header(metadata)
    meta, length = decode_header(data + b"zstd", validate=validate)
    assert length == len(data)
    assert read_header(io.BytesIO(data), validate=validate) == meta
    return meta


# ---- timestamps: time.Parse(time.RFC3339, …) -------------------------------------------------

ACCEPTED_TIMES = {
    # text: (seconds since the epoch, UTC offset in seconds, nanoseconds)
    "0000-01-01T00:00:00Z": (-62167219200, 0, 0),  # year 0000: Go's time reaches it
    "0001-01-01T00:00:00Z": (-62135596800, 0, 0),  # Go's zero time
    "9999-12-31T23:59:59.999999999Z": (253402300799, 0, 999999999),
    "2000-02-29T00:00:00Z": (951782400, 0, 0),  # a leap year by the 400 rule
    "2024-02-29T12:00:00Z": (1709208000, 0, 0),
    "2026-06-04T12:00:00.5Z": (1780574400, 0, 500000000),
    "2026-06-04T12:00:00,5Z": (1780574400, 0, 500000000),  # Go takes a comma before the fraction
    "2026-06-04T12:00:00.1234567891234Z": (1780574400, 0, 123456789),  # cut, not rounded
    "2026-06-04T1:00:00Z": (1780534800, 0, 0),  # a one-digit hour
    "2026-06-04T12:00:00+05:30": (1780574400 - 19800, 19800, 0),
    "2026-06-04T12:00:00-00:00": (1780574400, 0, 0),
    "2026-06-04T12:00:00+23:59": (1780574400 - 86340, 86340, 0),
    "2026-06-04T12:00:00+24:00": (1780574400 - DAY, DAY, 0),  # Go: "some people do write 24 hours"
    "2026-06-04T12:00:00+23:60": (1780574400 - DAY, DAY, 0),  # … "or 60 minutes"
    "2026-06-04T12:00:00-24:60": (1780574400 + DAY + 3600, -(DAY + 3600), 0),
    "2026-06-04t12:00:00z": (1780574400, 0, 0),  # deliberate: RFC 3339 allows it, Go does not
}

REFUSED_TIMES = [
    "2026-06-04T12:00:00+99:99",
    "2026-06-04T12:00:00+25:00",
    "2026-06-04T12:00:00+00:61",
    "2016-12-31T23:59:60Z",  # a leap second: time.Time has no second 60
    "2026-06-04T12:00:60+01:00",
    "2026-02-30T00:00:00Z",
    "2026-02-29T00:00:00Z",  # not a leap year
    "1900-02-29T00:00:00Z",  # not a leap year by the 100 rule
    "2026-04-31T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-00-10T00:00:00Z",
    "2026-06-00T00:00:00Z",
    "2026-06-04T24:00:00Z",
    "2026-06-04T12:60:00Z",
    "2026-6-04T12:00:00Z",  # only the hour may have one digit
    "2026-06-04T12:0:00Z",
    "2026-06-04T123:00:00Z",
    "2026-06-04T12:00Z",
    "2026-06-04T12:00:00",  # no offset
    "2026-06-04T12:00:00+0200",
    "2026-06-04T12:00:00+02",
    "2026-06-04T12:00:00+00:44:30",
    "2026-06-04T12:00:00.Z",
    "2026-06-04 12:00:00Z",
    " 2026-06-04T12:00:00Z",
    "2026-06-04T12:00:00Z\n",
    "20260-06-04T12:00:00Z",
    "-0001-06-04T12:00:00Z",
    "2026-06-04",
    "\u0662\u0660\u0662\u0666-06-04T12:00:00Z",  # Arabic-Indic digits: Go reads ASCII digits only
    "2026-06-04T12:00:00\u00a0Z",
]


@pytest.mark.parametrize("text", list(ACCEPTED_TIMES))
def test_timestamps_go_accepts_are_read_to_the_same_instant(text: str) -> None:
    seconds, offset, nanoseconds = ACCEPTED_TIMES[text]
    expected = Timestamp(seconds * S + nanoseconds, offset)
    assert Timestamp.parse(text) == expected
    assert read(body(timestamp=text)).timestamp == expected


@pytest.mark.parametrize("text", REFUSED_TIMES)
def test_timestamps_go_refuses_are_refused(text: str) -> None:
    with pytest.raises(FormatError, match="timestamp"):
        Timestamp.parse(text)
    with pytest.raises(FormatError, match="timestamp"):
        read(body(timestamp=text), validate=False)


def test_offsets_of_a_day_or_more_keep_their_instant() -> None:
    """Go reads them (and writes them back only through Format); a datetime cannot hold them."""
    stamp = Timestamp.parse("2026-06-04T12:00:00+24:00")
    assert stamp.rfc3339() == "2026-06-04T12:00:00+24:00"
    assert stamp.to_datetime() == _dt.datetime(2026, 6, 3, 12, tzinfo=_dt.UTC)


def test_year_zero_round_trips() -> None:
    assert Timestamp.parse("0000-01-01T00:00:00Z").rfc3339() == "0000-01-01T00:00:00Z"
    assert Timestamp.parse("0000-12-31T23:59:59.5-01:00").rfc3339() == "0000-12-31T23:59:59.5-01:00"


# ---- strings: invalid UTF-8 and lone surrogates read as U+FFFD ------------------------------------

FFFD = "\ufffd"
INVALID_UTF8 = {
    # raw bytes in a JSON string: the name Go reads (one U+FFFD per byte that is not part of a character)
    b"a\xffb": f"a{FFFD}b",
    b"\xc0\xaf": FFFD * 2,  # an overlong "/"
    b"\xe2\x82": FFFD * 2,  # a character cut short
    b"\xed\xa0\x80": FFFD * 3,  # a UTF-16 surrogate encoded in UTF-8
    b"\xf4\x90\x80\x80": FFFD * 4,  # above U+10FFFF
    b"\x80x\xbf": f"{FFFD}x{FFFD}",  # lone continuation bytes
    b"ok\xe2\x82\xac": "ok\u20ac",  # valid UTF-8 stays as it is
}


@pytest.mark.parametrize("raw", list(INVALID_UTF8), ids=lambda raw: raw.hex())
def test_invalid_utf8_in_a_string_is_read_as_replacement_characters(raw: bytes) -> None:
    metadata = body(name="NAME").replace(b'"NAME"', b'"' + raw + b'"')
    assert read(metadata).name == INVALID_UTF8[raw]


def test_invalid_utf8_outside_a_string_is_still_malformed_json() -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        read(body()[:-1] + b', "x": \xff}')


SURROGATE_ESCAPES = {
    "\\ud800": FFFD,  # a lone high surrogate
    "\\udc00": FFFD,  # a lone low surrogate
    "a\\ud800b": f"a{FFFD}b",
    "\\ud800\\ud800": FFFD * 2,
    "\\ud83d\\ude00": "\U0001f600",  # a pair is one character
}


@pytest.mark.parametrize("escaped", list(SURROGATE_ESCAPES))
def test_lone_surrogate_escapes_are_read_as_replacement_characters(escaped: str) -> None:
    metadata = body(name="NAME").replace(b'"NAME"', f'"{escaped}"'.encode())
    meta = read(metadata)
    assert meta.name == SURROGATE_ESCAPES[escaped]
    meta.name.encode("utf-8")  # printable anywhere: no surrogate survives


def test_surrogates_in_every_string_field_are_replaced() -> None:
    metadata = (
        b'{"name":"\\ud800","filesystem":"\\udfff","timestamp":"2026-06-04T12:00:00Z",'
        b'"checksum":"\\ud800","size_bytes":0}'
    )
    meta = read(metadata, validate=False)
    assert (meta.name, meta.filesystem, meta.checksum) == (FFFD, FFFD, FFFD)


# ---- nesting --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nested",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000 + "1" + "}" * 100_000,
        "[" * 100_000,  # and never closed
        "[" * 10_001 + "]" * 10_001,  # over Go's limit too ("exceeded max depth")
    ],
    ids=["arrays", "objects", "unclosed", "go-limit"],
)
def test_deep_nesting_is_a_format_error_not_a_crash(nested: str) -> None:
    metadata = body()[:-1] + f', "deep": {nested}}}'.encode()
    with pytest.raises(FormatError, match=r"nested too deeply|not valid JSON"):
        read(metadata)
    with pytest.raises(FormatError):
        read(body(name="x").replace(b'"x"', nested.encode()))


def test_moderate_nesting_in_an_unknown_key_is_ignored_as_go_ignores_it() -> None:
    metadata = body()[:-1] + b', "deep": ' + b"[" * 500 + b"]" * 500 + b"}"
    assert read(metadata).name == "d"


# ---- encoding/json's decoding rules ------------------------------------------------------------------


def test_keys_match_fields_case_insensitively() -> None:
    meta = read(
        b'{"NAME":"pg","Size_Bytes":7,"FileSystem":"xfs","TIMESTAMP":"2026-06-04T12:00:00Z",'
        b'"Checksum":"' + CHECKSUM.encode() + b'","Version":1}'
    )
    assert (meta.name, meta.size_bytes, meta.filesystem, meta.checksum) == ("pg", 7, "xfs", CHECKSUM)
    # Unicode simple folding: the long s and the Kelvin sign fold to ASCII letters.
    assert read(body()[:-1] + ', "\u017fize_bytes": 9}'.encode()).size_bytes == 9
    assert read(body(checksum=None)[:-1] + f', "chec\u212asum": "{CHECKSUM}"}}'.encode()).checksum == CHECKSUM


def test_members_are_decoded_in_order_and_null_changes_nothing() -> None:
    assert read(body()[:-1] + b', "name": "second"}').name == "second"  # the last one wins
    assert read(body()[:-1] + b', "name": null}').name == "d"  # null leaves the field as it was
    assert read(body(size_bytes=None), validate=False).size_bytes == 0  # Go's zero value
    zero = read(b"null", validate=False)  # null for the whole struct: nothing decoded
    assert (zero.name, zero.size_bytes, zero.checksum) == ("", 0, "")
    assert zero.timestamp == Timestamp.parse("0001-01-01T00:00:00Z")
    with pytest.raises(FormatError, match="not 64 hex digits"):
        read(b"null")


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (body()[:-1] + b', "name": 5, "name": "ok"}', "'name' must be a JSON str"),  # a wrong type anywhere
        (body(size_bytes=1.0), "must be a JSON int"),
        (body(size_bytes="5"), "must be a JSON int"),
        (body(size_bytes=True), "must be a JSON int"),
        (body(size_bytes=1 << 63), "does not fit in 64 bits"),
        (body(size_bytes=-(1 << 63) - 1), "does not fit in 64 bits"),
        (body()[:-1] + b', "size_bytes": 1' + b"0" * 5000 + b"}", "does not fit in 64 bits"),
        (body(version="1"), "must be a JSON int"),
        (body(timestamp=1780574400), "must be a JSON str"),
        (body(name=["d"]), "must be a JSON str"),
        (body()[:-1] + b', "x": NaN}', "not valid JSON"),  # Python's json reads NaN; JSON has none
        (body()[:-1] + b', "x": -Infinity}', "not valid JSON"),
        (b"[" + body() + b"]", "not a JSON object"),
        (b"\xef\xbb\xbf" + body(), "not valid JSON"),  # a byte-order mark
        (body() + b" x", "not valid JSON"),
    ],
    ids=lambda value: value if isinstance(value, str) else value[-24:].decode(errors="replace"),
)
def test_what_go_refuses_is_refused(metadata: bytes, reason: str) -> None:
    with pytest.raises(FormatError, match=reason):
        read(metadata, validate=False)


def test_what_go_skips_in_unknown_keys_is_skipped() -> None:
    extra = b', "x": 1' + b"0" * 5000 + b', "y": 1e999, "z": {"a": [null, true, "\\ud800"]}}'
    assert read(body()[:-1] + extra).size_bytes == 5
    assert read(b" \t\r\n" + body() + b" \n").size_bytes == 5  # JSON whitespace around the object
