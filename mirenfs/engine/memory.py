"""Giving freed memory back to the system after the few jobs that need much of it at once.

glibc keeps what a process frees for its next allocations, and after a large
block is freed it raises its threshold for serving blocks from fresh mappings,
so the next blocks of that size come from the heap and stay there when freed.
A mount that loaded or saved a 1 TiB disk's index (21 MB, with copies while it
is decoded) would hold that memory until it stops; ``malloc_trim`` returns it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

WORTH_TRIMMING = 1 << 20  # bytes a job must have handled for a trim to be worth its few ms
# The image behind a snapshot a closed handle read whole: a copy churns chunk reads, frames and
# 1 MiB replies, whose memory glibc keeps (18 MB after a copy of a 1 TiB sparse disk's snapshot);
# small disks are not worth the trim.
WORTH_TRIMMING_AFTER_READING = 256 << 20


M_ARENA_MAX = -8  # <malloc.h>: mallopt's parameter for the most heaps ("arenas") threads share
MOUNT_ARENAS = 1


def use_few_heaps(count: int = MOUNT_ARENAS) -> bool:
    """Have the C library serve every thread from at most ``count`` heaps; whether it took it.

    glibc gives threads heaps of their own (up to 8 per core), and a block
    freed by another thread goes back to the heap it came from, where it
    stays for that heap's next allocations. A mount's threads each make 4 MiB
    chunks and frames that others free: during four cold reads at once, seven
    heaps held 150 MB of the daemon's 200 MB (session 19). The large blocks
    are few (one per MiB or so), so the heap's lock costs nothing measurable.
    """
    function = getattr(_libc(), "mallopt", None)
    return bool(function is not None and function(M_ARENA_MAX, count) == 1)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, found among the symbols the interpreter already loaded (no
    ``find_library``); None where the C library has none (musl)."""
    function: Callable[[int], int] | None = getattr(_libc(), "malloc_trim", None)
    return function


def give_back_free_memory(handled: int) -> bool:
    """After a job that handled ``handled`` bytes in memory, return the process's free heap
    pages to the system; jobs under WORTH_TRIMMING are left alone. Whether a trim ran."""
    trim = _malloc_trim() if handled >= WORTH_TRIMMING else None
    if trim is None:
        return False
    trim(0)
    return True
