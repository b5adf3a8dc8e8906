"""Synchronisation of dirty extents after every (re)connect (spec 5).

The walk follows the activemap's syncmap in chunks of at most MAXPHYS that
never cross an extent boundary.  Unlike FreeBSD's strictly serial loop,
up to ``window`` chunks are in flight, which keeps the link busy.  Each chunk
locks its range against regular writes, reads the source and writes the
target; an extent is marked clean only once all its chunks succeeded
(``extent_complete``), so an interrupted or failed pass resumes where the
map says.

Direction: from the secondary when the handshake said so (``syncsrc``
secondary); otherwise from the primary, except the byte ranges whose local
copy is known stale (a local write failed), which come from the secondary.

The pass ends, and the bookkeeping of a completed synchronisation happens,
only when the map is empty with no await in between: an extent marked while
the completion is being announced starts another pass.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable

from pyhast.defaults import MAXPHYS
from pyhast.disk.activemap import SyncChunk
from pyhast.disk.units import humanize_number
from pyhast.enums import Event, SyncSrc
from pyhast.worker.primary import PrimaryDevice

SYNC_WINDOW = 8
RETRY_DELAY = 2.0


class Synchronizer:
    """Copies dirty extents for one connected session."""

    def __init__(
        self,
        dev: PrimaryDevice,
        *,
        send_event: Callable[[Event], Awaitable[None]],
        log: logging.LoggerAdapter[logging.Logger],
        window: int = SYNC_WINDOW,
    ) -> None:
        self.dev = dev
        self.am = dev.am
        self.send_event = send_event
        self.log = log
        self.window = window
        self.synced = 0
        self.started_at = 0.0
        self.active = False
        self._rate_mark = (0.0, 0)
        self.rate = 0
        #: Read buffers of chunks copied to the secondary, reused: a fresh
        #: MAXPHYS buffer per chunk costs an allocation and its page faults.
        #: A buffer returns here only once the chunk's final reply came back,
        #: so nothing still sends from it.
        self._buffers: list[bytearray] = []

    # -- progress, for status ----------------------------------------------------

    @property
    def bytes_left(self) -> int:
        return self.am.nsync * self.am.extentsize

    def update_rate(self) -> int:
        now = time.monotonic()
        then, synced = self._rate_mark
        if now - then >= 1.0:
            if then:
                self.rate = int((self.synced - synced) / (now - then))
            self._rate_mark = (now, self.synced)
        return self.rate

    # -- the walk ----------------------------------------------------------------

    async def run(self) -> None:
        """One session's synchronisation; cancelled on disconnect."""
        dev = self.dev
        self.synced = 0
        try:
            while dev.connected:
                self.am.sync_rewind()
                if self.am.nsync == 0:
                    self._settle()  # no await since the check
                    await self._complete()
                    if self.am.nsync == 0 or not dev.connected:
                        return
                    continue
                if not self.active:
                    self.active = True
                    self.started_at = time.monotonic()
                    self.log.info(
                        "Synchronization started. %s (%d bytes) to go.",
                        humanize_number(self.bytes_left),
                        self.bytes_left,
                    )
                    await self.send_event(Event.SYNCSTART)
                failures = await self._pass()
                if failures and dev.connected:
                    self.log.warning(
                        "%d synchronization chunks failed; retrying in %.0f s.",
                        failures,
                        RETRY_DELAY,
                    )
                    await asyncio.sleep(RETRY_DELAY)
        except asyncio.CancelledError:
            if self.active:
                self._interrupted()
                await asyncio.shield(self.send_event(Event.SYNCINTR))
            raise
        if self.active:
            self._interrupted()
            await self.send_event(Event.SYNCINTR)

    def _interrupted(self) -> None:
        self.active = False
        elapsed = time.monotonic() - self.started_at
        self.log.info(
            "Synchronization interrupted after %.0f s. %s (%d bytes) synchronized so far.",
            elapsed,
            humanize_number(self.synced),
            self.synced,
        )

    def _settle(self) -> None:
        """The nodes are in sync: counters and stale ranges say so (synchronous)."""
        dev = self.dev
        md = dev.local.md
        dev.syncsrc = SyncSrc.UNDEF
        # Every stale range was in the map and has been copied (and removed).
        dev.local_stale.clear()
        md.localstale = ()
        md.localcnt = dev.secondary_remotecnt
        md.remotecnt = dev.secondary_localcnt
        self.log.debug("Setting localcnt to %d and remotecnt to %d.", md.localcnt, md.remotecnt)
        dev.local.metadata_write()

    async def _complete(self) -> None:
        if self.active:
            elapsed = max(time.monotonic() - self.started_at, 1e-6)
            self.log.info(
                "Synchronization complete. %s (%d bytes) synchronized in %.1f s (%s/sec).",
                humanize_number(self.synced),
                self.synced,
                elapsed,
                humanize_number(int(self.synced / elapsed)),
            )
            self.active = False
            if self.synced:
                await self.send_event(Event.SYNCDONE)
        else:
            self.log.info("Nodes are in sync.")

    async def _pass(self) -> int:
        """Copy every chunk of this pass; returns the number of failed chunks."""
        sem = asyncio.Semaphore(self.window)
        failed_extents: set[int] = set()
        outstanding: dict[int, int] = {}
        last_of: dict[int, bool] = {}
        failures = 0
        tasks: set[asyncio.Task[None]] = set()

        async def copy(chunk: SyncChunk, ext: int) -> None:
            nonlocal failures
            try:
                ok = await self._copy_chunk(chunk, ext)
            finally:
                sem.release()
            if not ok:
                failures += 1
                failed_extents.add(ext)
            outstanding[ext] -= 1
            if outstanding[ext] == 0 and last_of.get(ext):
                del outstanding[ext]
                last_of.pop(ext, None)
                if ext in failed_extents:
                    failed_extents.discard(ext)
                elif self.am.extent_complete(ext):
                    self.dev.local.bitmap_lost_bits()

        try:
            while self.dev.connected:
                chunk = self.am.sync_offset()
                if chunk is None:
                    break
                ext = self.am.offset_to_extent(chunk.offset)
                outstanding[ext] = outstanding.get(ext, 0) + 1
                if chunk.syncext >= 0:
                    last_of[ext] = True
                await sem.acquire()
                task = asyncio.get_running_loop().create_task(copy(chunk, ext))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return failures

    async def _copy_chunk(self, chunk: SyncChunk, ext: int) -> bool:
        dev = self.dev
        offset, length = chunk.offset, chunk.length
        await dev.lock_sync(offset, length)
        try:
            remote = dev.remote
            if remote is None or not remote.connected:
                return False
            if dev.syncsrc is SyncSrc.SECONDARY:
                pieces = [(offset, length, True)]
            else:
                pieces = list(dev.local_stale.split(offset, length))
            for off, n, from_secondary in pieces:
                if from_secondary:
                    if not await self._copy_from_secondary(off, n):
                        return False
                elif not await self._copy_to_secondary(off, n):
                    return False
            self.synced += length
            return True
        finally:
            dev.unlock_sync(offset, length)

    async def _copy_from_secondary(self, offset: int, length: int) -> bool:
        dev = self.dev
        assert dev.remote is not None
        req = dev.remote.read(offset, length)
        err = await req.done
        if err:
            self._chunk_error("read", offset, length, err)
            return False
        assert req.data is not None
        try:
            dev.local.write(offset, req.data)
        except OSError as exc:
            self._chunk_error("write", offset, length, exc.errno or errno.EIO)
            return False
        try:
            # Recorded before the range lock goes, so that a later write of
            # it is not undone by a restart.
            await dev.mark_local_current(offset, length)
        except OSError:
            return False
        return True

    async def _copy_to_secondary(self, offset: int, length: int) -> bool:
        dev = self.dev
        assert dev.remote is not None
        buf = self._buffers.pop() if self._buffers else bytearray(MAXPHYS)
        data = memoryview(buf)[:length]
        try:
            dev.local.read_into(offset, data)
        except OSError as exc:
            self._buffers.append(buf)
            self._chunk_error("read", offset, length, exc.errno or errno.EIO)
            return False
        req = dev.remote.write(offset, data, memsync=False)
        err = await req.done
        # Answered (or the connection is gone): no frame refers to it any more.
        self._buffers.append(buf)
        if err:
            self._chunk_error("write", offset, length, err)
            return False
        return True

    def _chunk_error(self, what: str, offset: int, length: int, err: int) -> None:
        if err == errno.ENOTCONN:
            return
        self.log.error(
            "Unable to %s synchronization data (offset %d, length %d): %s.",
            what,
            offset,
            length,
            errno.errorcode.get(err, str(err)),
        )
