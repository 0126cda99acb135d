"""SHA-256 whose state can be kept at a chunk boundary and taken up again later.

A snapshot's header holds the SHA-256 of the whole image, so every pass
hashes every byte — unless the pass before it kept the hash state at each
chunk boundary: if the first ``j`` chunks are byte for byte what they were
(their fingerprints say so), hashing resumes from the state before chunk
``j``. After a nightly change, that skips everything before the first changed
chunk.

hashlib can neither export nor import its state, so this calls libcrypto's
``SHA256_Init/Update/Final`` through ctypes, which releases the GIL during
each call. They are looked up through hashlib's own extension module, so
they are the libcrypto hashlib uses (SHA-NI included), found without
``ctypes.util.find_library`` (which runs ``ldconfig``: ~4 ms of every command's start).
Where those functions are missing, :data:`AVAILABLE` is False and callers
hash everything with hashlib.

Never: give a digest hashlib would not give for the same bytes; export a
state in the middle of a 64-byte block (only chunk boundaries are exported,
and chunk sizes are multiples of 4 KiB).
"""

from __future__ import annotations

import ctypes
import struct

MIDSTATE = 40  # bytes of a kept state: the eight words, then the bit count (low, high)
_STATE = struct.Struct("<8III")


class _Context(ctypes.Structure):
    """OpenSSL's SHA256_CTX (``SHA256state_st``)."""

    _fields_ = [
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint),
        ("md_len", ctypes.c_uint),
    ]


try:
    import _hashlib  # hashlib's OpenSSL binding: symbols resolve in the libcrypto it links
except ImportError:  # a Python built without OpenSSL: hashlib hashes with its own code
    _HASHLIB_FILE: str | None = None
else:
    _HASHLIB_FILE = _hashlib.__file__


def _load() -> ctypes.CDLL | None:
    if _HASHLIB_FILE is None:
        return None
    try:
        library = ctypes.CDLL(_HASHLIB_FILE)
        context = ctypes.POINTER(_Context)
        library.SHA256_Init.argtypes = [context]
        library.SHA256_Update.argtypes = [context, ctypes.c_void_p, ctypes.c_size_t]
        library.SHA256_Final.argtypes = [ctypes.c_char_p, context]
    except (OSError, AttributeError):
        return None
    return library


_LIBCRYPTO = _load()
AVAILABLE = _LIBCRYPTO is not None
_EMPTY = bytearray(1)  # something to point at for an empty update


class ResumableSha256:
    """A SHA-256 that starts from the initial state or from a kept ``midstate``."""

    def __init__(self, midstate: bytes | None = None) -> None:
        if _LIBCRYPTO is None:
            raise RuntimeError("libcrypto's SHA256 functions are not available")
        self._context = _Context()
        _LIBCRYPTO.SHA256_Init(ctypes.byref(self._context))
        if midstate is not None:
            *words, low, high = _STATE.unpack(midstate)
            self._context.h[:] = words
            self._context.Nl, self._context.Nh = low, high

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        """Hash ``data``: a writable buffer (bytearray, or a view of one) is passed without a copy."""
        assert _LIBCRYPTO is not None
        view = memoryview(data).cast("B")  # bytes, whatever its items (review: len() counted items)
        if view.readonly:
            view = memoryview(bytearray(view))
        length = view.nbytes
        pointer = (ctypes.c_char * max(length, 1)).from_buffer(view if length else _EMPTY)
        _LIBCRYPTO.SHA256_Update(ctypes.byref(self._context), pointer, length)

    def midstate(self) -> bytes:
        """The state after the bytes so far, which must end on a 64-byte block boundary."""
        if self._context.num:
            raise ValueError("a SHA-256 state can only be kept at a 64-byte boundary")
        return _STATE.pack(*self._context.h, self._context.Nl, self._context.Nh)

    def digest(self) -> bytes:
        assert _LIBCRYPTO is not None
        final = _Context()
        ctypes.memmove(ctypes.byref(final), ctypes.byref(self._context), ctypes.sizeof(_Context))
        out = ctypes.create_string_buffer(32)
        _LIBCRYPTO.SHA256_Final(out, ctypes.byref(final))
        return out.raw

    def hexdigest(self) -> str:
        return self.digest().hex()
