"""One restore of a store disk, fed in order — by FUSE writes in the mount, by a
file or a pipe in the CLI — so both take the same path through staging,
verification, install and the store's finalize or cleanup (SPEC §3).

A writer may leave a hole: bytes it skipped, as ``rsync --sparse`` seeks over
runs of zeros, read as zeros, so a write past the end (or an extending
truncate) is still in order. A hole is fed to the pipeline as the zeros it
stands for, so it is bounded (:data:`MAX_HOLE`): one seek must never make the
restore decompress gigabytes. Going back over bytes already fed is refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import trio

from mirenfs.disks.rules import RestoreTarget, catalogue_gone
from mirenfs.engine.consume import StagedRestore, check_snapshot_start
from mirenfs.engine.image import MakeRoom
from mirenfs.errors import (
    NO_SPACE,
    CatalogUnreachableError,
    FormatError,
    MirenfsError,
    OutOfOrderWrite,
    StoreError,
    TargetError,
)
from mirenfs.format.header import MAX_METADATA_LEN, PREFIX_LEN, Meta, decode_header

log = logging.getLogger(__name__)

FEED_BATCH = 1 << 20  # small writes (tar's 10 KiB records) are gathered to this size for the pipeline
# The longest run of skipped bytes taken as zeros. rsync -S skips the zeros of the data it copies,
# and in a snapshot (compressed) those runs are a few bytes; the bound keeps a hostile seek cheap.
MAX_HOLE = 4 << 20
RECORD_ROOM = 1 << 20  # asked of the frame store when a new disk's record finds the data path full
_TOO_LONG = (
    f"holes (bytes skipped by a seek, as rsync -S/--sparse and dd seek= make) longer than "
    f"{MAX_HOLE >> 20} MiB are not supported: write the snapshot in order (copy without -S/--sparse)"
)


class DiskRestore:
    """A restore into the disk ``target`` chose (an existing one, or one it creates on the header)."""

    def __init__(
        self, target: RestoreTarget, *, header_read: Meta | None = None, make_room: MakeRoom | None = None
    ) -> None:
        self.target = target
        self.next_offset = 0
        self.failure: str | None = None  # why it failed, once it has (the mount's handles ask)
        self.failure_errno = errno.EIO  # ... and the errno its writer got then
        self._pending = bytearray()
        self._make_room = make_room
        self._restore = StagedRestore(
            self._choose_image,
            header_read=header_read,
            before_install=self._before_install,
            make_room=make_room,
        )

    def image_progress(self) -> tuple[int, int] | None:
        """(bytes of the image hashed so far, the image's size), once the header is read: the
        bytes received say little of a sparse disk's restore (182 MB for 1 TiB), and those
        decompressed run ahead of the hash by whole runs of zero frames."""
        stream = self._restore.stream
        meta = stream.meta
        if meta is None and stream.bytes_in == 0:  # the header may still wait among the gathered writes
            with contextlib.suppress(FormatError):
                meta = decode_header(bytes(self._pending[: PREFIX_LEN + MAX_METADATA_LEN]))[0]
        return None if meta is None else (stream.bytes_hashed, meta.size_bytes)

    async def _choose_image(self, meta: Meta) -> str:
        open_target = partial(self.target.open, meta.size_bytes, meta.filesystem)
        try:
            return await trio.to_thread.run_sync(open_target)
        except MirenfsError as exc:  # a new disk's record found the data path full (trial T)
            if exc.errno not in NO_SPACE or not await self._made_room_in(self.target.data_path):
                raise
            return await trio.to_thread.run_sync(open_target)

    async def _made_room_in(self, directory: str) -> bool:
        """Whether the frame store gave back space on the filesystem of ``directory``."""
        if self._make_room is None:
            return False
        device = (await trio.to_thread.run_sync(os.stat, directory)).st_dev
        return await trio.to_thread.run_sync(self._make_room, device, RECORD_ROOM) > 0

    async def _before_install(self) -> None:
        await trio.to_thread.run_sync(self.target.before_install)
        # A record of the intent, before the rename: a mount killed (SIGKILL) right after it told
        # the writer its close failed, and nothing said that the disk had been replaced (trial M).
        meta = self._restore.stream.meta
        if meta is not None:
            log.info(
                "disk %s: the snapshot verified (%d bytes, checksum %s); replacing its image now",
                self.target.name,
                meta.size_bytes,
                meta.checksum,
            )

    async def write(self, offset: int, data: bytes) -> None:
        """Feed ``data`` written at ``offset``: what it skipped past the end is a hole of zeros."""
        hole = offset - self.next_offset
        if self.next_offset == 0 and offset > 0:  # a snapshot starts with its magic, never a hole
            raise OutOfOrderWrite(
                f"writes to restore/ must arrive in order: the first write came at offset {offset}, "
                "where a snapshot is written from its first byte (appended with >>, or after a seek "
                "as dd seek= makes?); copy it with cp, or write it with >"
            )
        if hole < 0 or hole > MAX_HOLE:
            if self._restore.stream.bytes_in == 0:  # what came before says more, if it is no snapshot
                check_snapshot_start(self._pending)
            beyond = f", a hole of {hole} bytes; {_TOO_LONG}" if hole > 0 else ""
            raise OutOfOrderWrite(
                f"writes to restore/ must arrive in order: got offset {offset}, expected {self.next_offset}"
                + beyond
            )
        await self._fill(hole)
        await self._gather(data)

    async def extend(self, size: int) -> None:
        """A truncate up to ``size`` (rsync -S ends a file whose last bytes are zeros that way):
        zeros up to there, as a write at ``size`` would give; shrinking is the caller's refusal."""
        hole = size - self.next_offset
        if hole > MAX_HOLE:
            raise OutOfOrderWrite(
                f"writes to restore/ must arrive in order: a truncate to {size} bytes after "
                f"{self.next_offset} received leaves a hole of {hole} bytes; {_TOO_LONG}"
            )
        await self._fill(hole)

    async def _fill(self, hole: int) -> None:
        """Gather ``hole`` zeros, at most one batch of them at a time."""
        while hole > 0:
            piece = min(hole, FEED_BATCH)
            await self._gather(bytes(piece))
            hole -= piece

    async def _gather(self, data: bytes) -> None:
        self.next_offset += len(data)
        self._pending += data
        if len(self._pending) >= FEED_BATCH:
            await self._hand_over()

    async def append(self, data: bytes) -> None:
        await self.write(self.next_offset, data)

    async def _hand_over(self) -> None:
        """Give the gathered writes to the pipeline: at once, unless its input queue is full."""
        if self._pending:
            batch, self._pending = bytes(self._pending), bytearray()
            async with self._saying_what_is_left():
                await self._restore.feed(batch)

    async def feed_pending(self) -> None:
        """Hand over the writes gathered so far and wait until they are decompressed, so that
        :attr:`complete` is exact (a close may be the end of the stream)."""
        await self._hand_over()
        async with self._saying_what_is_left():
            await self._restore.stream.settle()

    @contextlib.asynccontextmanager
    async def _saying_what_is_left(self) -> AsyncIterator[None]:
        """A full filesystem, or a catalogue gone away (failing closed), ends the restore here:
        undone at once, so that its one sentence can say what became of the disk (a person's
        next step depends on it)."""
        try:
            yield
        except CatalogUnreachableError as exc:
            with trio.CancelScope(shield=True):
                await self.abort()
            raise catalogue_gone(exc, self.target.outcome()) from None
        except TargetError as exc:
            if exc.errno not in NO_SPACE:
                raise
            with trio.CancelScope(shield=True):
                await self.abort()
            raise TargetError(f"{exc}; {self.target.outcome()}", exc.errno) from None

    @property
    def complete(self) -> bool:
        """Whether what was fed forms a whole snapshot (call :meth:`feed_pending` first)."""
        return not self._pending and self._restore.stream.complete

    async def whole_and_verified(self) -> bool:
        """Whether what was written so far is a whole snapshot matching its checksum, without
        ending the restore (a seek table may still follow); a whole one that does not match
        fails it here."""
        await self._hand_over()
        async with self._saying_what_is_left():
            return await self._restore.stream.whole_and_verified()

    async def finish(self) -> Meta:
        """Verify, install the image, and record it in the store."""
        await self._hand_over()
        async with self._saying_what_is_left():
            try:
                meta = await self._restore.finish()
            except BaseException:
                with trio.CancelScope(shield=True):  # the store describes the image in place
                    await _through_interrupts(partial(self._record_done_or, self.target.undo_record))
                raise
            # Shielded, and done by abort() too if an interrupt lands here all the same: a SIGINT
            # during the rename reaches this checkpoint, and the clean-up would remove a disk
            # whose image is already the restored one.
            with trio.CancelScope(shield=True):
                try:
                    await self._record_the_installed_image()
                except CatalogUnreachableError:
                    raise  # said with its outcome above, as a failing closed catalogue is
                except MirenfsError as exc:  # review: the disk was said "not created"
                    failed = StoreError(f"{exc}; {self.target.outcome()}")
                    failed.errno = exc.errno
                    raise failed from None
        return meta

    async def _record_done_or(self, undo: Callable[[], None]) -> None:
        """The record of a restore done once its image was replaced (interrupted after the
        rename: nothing to undo), else ``undo`` (in a worker thread)."""
        if self._restore.installed:
            with contextlib.suppress(MirenfsError):  # a record still behind: outcome() says so
                await trio.to_thread.run_sync(self.target.finalize)
        else:
            await trio.to_thread.run_sync(undo)

    async def _record_the_installed_image(self) -> None:
        """The store's record of the image now in place, tried twice: one failed write (a disk I/O
        error) made the writer fail a restore that was done, and retried by the undo, recorded
        (trial FD F4: "… disk c was not created" of a disk in service)."""
        try:
            await trio.to_thread.run_sync(self.target.finalize)
        except CatalogUnreachableError:
            raise
        except MirenfsError as exc:
            await trio.to_thread.run_sync(self.target.finalize)
            log.warning(
                "disk %s: its restored image is in place and recorded, at the second try (%s)",
                self.target.name,
                exc,
            )

    @property
    def installed(self) -> bool:
        """Whether the image was replaced (and recorded): nothing undoes the restore after that."""
        return self._restore.installed

    async def abort(self) -> None:
        """Remove the staging file and whatever the target created; safe to repeat. After the
        image was replaced there is nothing to undo: the restore is recorded as done instead.
        An interrupt meanwhile does not stop it (see :func:`_through_interrupts`)."""
        await _through_interrupts(self._undo)

    async def _undo(self) -> None:
        await self._restore.discard()
        await self._record_done_or(self.target.cleanup)


@trio.lowlevel.enable_ki_protection
async def _through_interrupts(undo: Callable[[], Awaitable[None]]) -> None:
    """Run ``undo`` (safe to repeat) to its end, then raise an interrupt that came meanwhile.

    trio raises a pending Ctrl-C in the main task at its next checkpoint, shielded or not, and
    a second one stopped the undo half-way: a disk the restore was creating stayed, left
    ``provisioning`` (trial T21 F1; ``timeout -s INT`` signals the command and then its process
    group, so it gets two). Protected here, an interrupt waits for a checkpoint, and the undo
    starts again from there.
    """
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            await undo()
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted
