"""Long-lived worker threads joined by bounded hand-offs: the plumbing of the restore pipeline.

A *stage* is a plain thread that runs one loop for the life of a restore.
Work moves between stages through :class:`Handoff` queues and a
:class:`BufferPool`, so memory stays bounded and a slow stage holds back the
ones before it, up to the event loop, which puts into the first hand-off
without blocking and awaits room (cancellably) only when it is full. The
first error of any stage stops every stage; the owner sees it on its next call.

Never: block the event loop; give a stage a reference to the object that owns
the stages (the owner's finalizer is what stops an abandoned pipeline, and a
stage holding its owner would keep it, and its zstd context, alive for
ever); let a stage outlive :meth:`Stages.stop` followed by :meth:`Stages.join`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import mmap
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


FAST_SWITCH_S = 0.0005  # the GIL hand-over interval while stages run (Python's default: 5 ms)


class _SwitchInterval:
    """Hands the GIL over every ``FAST_SWITCH_S`` while any user holds it, then restores it.

    A stage that comes back from a long C call (hashing a piece) must take the
    GIL back before it can start the next one; when another thread holds it,
    the interpreter makes it wait up to the switch interval, and at 5 ms that
    would leave the hash stage, which sets the pace, idle most of the time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, FAST_SWITCH_S))
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


SWITCH_INTERVAL = _SwitchInterval()


@contextlib.contextmanager
def fast_gil_handoff() -> Iterator[None]:
    """While the block runs, threads coming back from C calls get the GIL within half a millisecond."""
    SWITCH_INTERVAL.enter()
    try:
        yield
    finally:
        SWITCH_INTERVAL.exit()


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()
_PR_SET_NAME = 15


def _name_native_thread(name: str) -> None:
    """Show the stage's name in ``top -H`` and /proc (the kernel keeps 15 bytes of it)."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _run_as_batch_work() -> None:
    """Mark the calling thread as throughput work (``SCHED_BATCH``: the same share of the CPU,
    but its wake-ups do not preempt a running thread).

    A stage wakes for every piece. When both cores are busy, each such
    wake-up could push aside the event loop, which answers FUSE writes one at
    a time, or the writer waiting for each answer: ``tar`` writes 10 KiB
    records, and waits of over 0.4 ms between two of its writes added up to
    0.5-1 s of a restore. Only a hint: where the scheduler refuses it,
    nothing changes.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _clear_frames_of_chain(error: BaseException) -> None:
    """Clear the frames of ``error``'s traceback and of every error it was raised from or in."""
    seen: set[int] = set()
    chained: BaseException | None = error
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__


class Stopped(Exception):
    """The stages were stopped (another stage failed, or the owner gave up): leave the loop."""


class LoopWaker:
    """Wakes the trio loop that built the pipeline from any thread, without blocking."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()

    def set(self, event: trio.Event) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # nobody is left to wake
            self._token.run_sync_soon(event.set)


class Handoff(Generic[T]):
    """A queue between two stages, bounded in bytes (at least one item always fits).

    Threads :meth:`put` and :meth:`get` blocking; the event loop :meth:`offer`\\s
    and, when the queue is full, awaits the event it is given.
    """

    def __init__(self, limit: int | Callable[[], int], waker: LoopWaker | None = None) -> None:
        self._limit = limit if callable(limit) else partial(int, limit)  # read at every put: a share may move
        self._waker = waker
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self._bytes = 0
        self._closed = False
        self._stopped = False
        self._cond = threading.Condition()
        self._room: trio.Event | None = None  # the event loop waits on it for room

    def offer(self, item: T, size: int) -> trio.Event | None:
        """Event loop: queue ``item`` if there is room (None), else return the event to await."""
        with self._cond:
            self._check_open()
            if size and self._bytes and self._bytes + size > self._limit():
                if self._room is None:
                    self._room = trio.Event()
                return self._room
            self._append(item, size)
            return None

    def put(self, item: T, size: int) -> None:
        """Thread: queue ``item``, waiting for room."""
        with self._cond:
            while not self._stopped and self._bytes and self._bytes + size > self._limit():
                self._cond.wait()
            self._check_open()
            self._append(item, size)

    def get(self, before_waiting: Callable[[], object] | None = None) -> T | None:
        """Thread: the next item, or None once the queue is closed and empty. ``before_waiting``
        runs first (outside the lock) when the queue is empty: the thread may wait a long time."""
        if before_waiting is not None:
            with self._cond:
                empty = not self._items and not self._closed and not self._stopped
            if empty:
                before_waiting()
        with self._cond:
            while not self._items and not self._closed and not self._stopped:
                self._cond.wait()
            if self._stopped:
                raise Stopped
            if not self._items:
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            self._cond.notify_all()
            room, self._room = self._room, None
        if room is not None and self._waker is not None:
            self._waker.set(room)
        return item

    def close(self) -> None:
        """No more items: :meth:`get` returns None once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Wake every waiter: threads raise :class:`Stopped`, the event loop rechecks. What was
        queued is dropped (nobody gets it now): a failed restore's pieces and input are not
        kept as long as its writer keeps the stream (the handle open in restore/)."""
        with self._cond:
            self._stopped = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
            room, self._room = self._room, None
        if room is not None and self._waker is not None:
            self._waker.set(room)

    def _append(self, item: T, size: int) -> None:
        self._items.append((item, size))
        self._bytes += size
        self._cond.notify_all()

    def _check_open(self) -> None:
        if self._stopped:
            raise Stopped
        if self._closed:
            raise RuntimeError("put into a closed hand-off")


class Piece:
    """A filled pool buffer shared by the stages that read it; back in the pool after the last.

    A piece may be handed on before it is filled (another thread decompresses
    into it meanwhile): its readers :meth:`wait_filled` first.
    """

    __slots__ = ("_buffer", "_pool", "_readers", "filled", "view")

    def __init__(
        self, pool: BufferPool, buffer: Buffer, length: int, readers: int, *, filled: bool = True
    ) -> None:
        self._pool = pool
        self._buffer = buffer
        self._readers = readers
        self.filled = filled
        self.view = memoryview(buffer)[:length]

    def wait_filled(self) -> None:
        """Block until the bytes are there; raise :class:`Stopped` if the pool stops first."""
        if not self.filled:
            self._pool.wait_filled(self)

    def mark_filled(self) -> None:
        """The bytes are there: wake the readers waiting for them."""
        self._pool.mark_filled(self)

    def done(self) -> None:
        """One reader is finished with the bytes (they must not be used after this)."""
        self._pool.finished(self)

    def last_reader_done(self) -> Buffer | None:
        """Count one reader out (the pool's lock is held); the buffer once none is left."""
        self._readers -= 1
        if self._readers:
            return None
        self.view.release()
        return self._buffer


Buffer = bytearray | mmap.mmap


class BufferPool:
    """A bounded set of reusable buffers: bounds the pieces in flight, and keeps them warm in
    the caches (a fresh buffer per piece would cost a page fault per 4 KiB). They are
    anonymous mappings, so page-aligned: a write stage may hand them to O_DIRECT.

    ``most`` is read at every acquire and give-back: a buffer is made when one
    is needed and the pool holds fewer, and unmapped when it comes back to a
    pool that holds more (its share shrank), so the memory follows the share.
    """

    def __init__(self, most: int | Callable[[], int], size: int) -> None:
        self.size = size
        self._most = most if callable(most) else partial(int, most)
        self._free: list[Buffer] = []
        self._made = 0  # buffers this pool holds, free or in a piece
        self._stopped = False
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # a buffer is free
        self._filled = threading.Condition(lock)  # a piece is filled

    @property
    def buffers(self) -> int:
        """The buffers this pool holds now (free or in a piece): what its memory is."""
        with self._cond:
            return self._made

    def acquire(self) -> Buffer:
        with self._cond:
            while True:
                if self._stopped:
                    raise Stopped
                most = self._unmap_free_over_share()
                if self._free:
                    return self._free.pop()
                if self._made < most:
                    self._made += 1
                    break
                self._cond.wait()
        # Made outside the lock: an allocation may run the garbage collector, whose finalizer of
        # an abandoned pipeline stops its pool, taking this lock (review S5).
        try:
            return mmap.mmap(-1, self.size)
        except BaseException:
            with self._cond:
                self._made -= 1
                self._cond.notify()
            raise

    def trim(self) -> None:
        """Unmap the free buffers over the share now, not at this pool's next acquire or
        give-back: a restore whose writer stopped has neither (review S5 F2)."""
        with self._cond:
            self._unmap_free_over_share()

    def _unmap_free_over_share(self) -> int:
        """Unmap free buffers while the pool holds more than its share (the lock is held); the
        share, at least one."""
        most = max(1, self._most())
        while self._free and self._made > most:
            self._unmap(self._free.pop())
        return most

    def give_back(self, buffer: Buffer) -> None:
        """Return a buffer that was acquired but never filled."""
        with self._cond:
            self._put_back(buffer)

    def finished(self, piece: Piece) -> None:
        with self._cond:
            buffer = piece.last_reader_done()
            if buffer is not None:
                self._put_back(buffer)

    def _put_back(self, buffer: Buffer) -> None:
        if self._stopped or self._made > max(1, self._most()):
            self._unmap(buffer)
        else:
            self._free.append(buffer)
        self._cond.notify()

    def _unmap(self, buffer: Buffer) -> None:
        """Let one buffer go now (the pool's lock is held)."""
        self._made -= 1
        if isinstance(buffer, mmap.mmap):
            try:  # noqa: SIM105 (no context manager: nothing that may run the garbage collector here)
                buffer.close()
            except BufferError:  # a view still open: unmapped once it goes
                pass

    def wait_filled(self, piece: Piece) -> None:
        with self._cond:
            while not piece.filled and not self._stopped:
                self._filled.wait()
            if not piece.filled:
                raise Stopped

    def mark_filled(self, piece: Piece) -> None:
        with self._cond:
            piece.filled = True
            self._filled.notify_all()

    def stop(self) -> None:
        """Wake every waiter and let the free buffers go, and the others as they come back: a
        failed restore whose writer stalls makes no next call to free them (review P22 F3)."""
        with self._cond:
            self._stopped = True
            while self._free:
                self._unmap(self._free.pop())
            self._cond.notify_all()
            self._filled.notify_all()


class FairShare:
    """Amounts bounded for the whole process, split evenly between the members running at once.

    A mount serves many restores together, and each pipeline's queues and
    pool were bounded on their own: ten restores at once took the daemon to
    340 MB (trial M, session 18). A pipeline joins while its stages
    run; its hand-offs and pool read their share at every put and acquire, so
    when another starts, the running ones drain down to their new share
    (never below one item: each keeps moving, whoever else holds memory).
    A member may also hold a fixed amount of its own (an index pass): it joins
    with nothing to trim, and counting it makes the others' shares smaller.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trims: dict[int, Callable[[], None]] = {}  # each member's: let go of what is over its share
        self._leaving: collections.deque[int] = collections.deque()  # left, not yet taken out
        self._tickets = itertools.count()

    @property
    def running(self) -> int:
        return max(0, len(self._trims) - len(self._leaving))

    def join(self, trim: Callable[[], None] | None = None) -> int:
        """One more member runs: every member's share shrinks, and each gives back at once
        what it holds free over it (``trim``; it must not hold the pipeline). The ticket to
        :meth:`leave` with."""
        with self._lock:
            self._take_out_who_left()
            ticket = next(self._tickets)
            self._trims[ticket] = trim if trim is not None else _nothing_to_trim
            trims = list(self._trims.values())
        for member_trim in trims:
            member_trim()
        return ticket

    def leave(self, ticket: int) -> None:
        """One member ends. This never waits for the lock: an abandoned restore's finalizer
        leaves, and the garbage collector runs finalizers at any allocation, also one in
        :meth:`join` under the lock, on the same thread (review S20: the mount hung)."""
        self._leaving.append(ticket)  # atomic: counted out of ``running`` at once
        if self._lock.acquire(blocking=False):
            try:
                self._take_out_who_left()
            finally:
                self._lock.release()

    def _take_out_who_left(self) -> None:
        """Under the lock: forget the members that left."""
        while self._leaving:
            self._trims.pop(self._leaving.popleft(), None)

    def share(self, total: int, most: int, least: int) -> int:
        """One pipeline's part of ``total``: at most ``most``, at least ``least``."""
        return max(least, min(most, total // max(1, self.running)))


def _nothing_to_trim() -> None:
    return None


# The work in this process that holds large buffers: every running restore pipeline and every
# running index pass. Restores take a share of their totals; a pass holds its own window of chunks,
# and counting it shrinks the restores' share (four restores beside four cold reads took a mount to
# 203-219 MB, and 162-172 MB with the passes counted: session 20).
BULK_WORK = FairShare()


class Stages:
    """The threads of one pipeline: started together, stopped together on the first failure.

    ``stop_all`` is what stopping means for this pipeline (stop its hand-offs
    and pools); it must not hold the pipeline's owner.
    """

    def __init__(self, stop_all: Callable[[], None], waker: LoopWaker) -> None:
        self._stop_all = stop_all
        self._waker = waker
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._running = 0
        self.failure: BaseException | None = None
        self.stopped = False
        self.done = trio.Event()

    def start(self, loops: dict[str, Callable[[], None]]) -> None:
        """Start one thread per loop, all counted before any runs (so ``done`` waits for all)."""
        with self._lock:
            self._running += len(loops)
        SWITCH_INTERVAL.enter()
        for started, (name, loop) in enumerate(loops.items()):
            thread = threading.Thread(target=self._run, args=(loop,), name=f"mirenfs-{name}", daemon=True)
            try:
                thread.start()
            except BaseException:  # "can't start new thread": the loops not started end here
                self._count_out(len(loops) - started)
                raise
            self._threads.append(thread)

    def _run(self, loop: Callable[[], None]) -> None:
        _name_native_thread(threading.current_thread().name.removeprefix("mirenfs-"))
        _run_as_batch_work()
        try:
            loop()
        except Stopped:
            pass
        except BaseException as exc:  # any failure ends the pipeline; its owner reports it
            # The traceback is kept for the report, not the stage's locals: the piece it held
            # (a 4 MiB buffer) would live as long as the failure is kept; so would the frame and
            # piece zstd's error, the failure's context, holds (review S5 F5).
            _clear_frames_of_chain(exc)
            self.fail(exc)
        finally:
            self._count_out(1)

    def _count_out(self, loops: int) -> None:
        """``loops`` ended (or never started): after the last, the GIL hand-over interval is put
        back and the owner hears that every stage is done (review S5 F1: a thread that could
        not start left the interval at 0.5 ms for the life of the mount)."""
        with self._lock:
            self._running -= loops
            last = self._running == 0
        if last:
            SWITCH_INTERVAL.exit()
            self._waker.set(self.done)

    def fail(self, error: BaseException) -> None:
        """Record the first failure and stop every stage."""
        with self._lock:
            if self.failure is None:
                self.failure = error
        self.stop()

    def stop(self) -> None:
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        self._stop_all()

    def join(self) -> None:
        """Wait for every thread to end (call after the input ended, or after :meth:`stop`)."""
        for thread in self._threads:
            thread.join()
        self._threads = []

    @property
    def running(self) -> bool:
        with self._lock:
            return self._running > 0
