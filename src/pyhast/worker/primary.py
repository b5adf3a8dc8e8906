"""The primary worker's data path: what the NBD server (and FUSE) call.

A write, in order (spec 5 and 7, with FreeBSD's gaps fixed):

1. wait while a synchronisation chunk holds an overlapping range, then lock
   the range as a regular write (regular writes never exclude each other);
2. ``activemap.write_start``: when the on-disk bitmap changes it is written
   (and flushed with metaflush) *before* the data goes anywhere;
3. the local write and the remote send happen back to back with no await in
   between, so both components see the same FIFO order;
4. completion by mode: fullsync waits for the local write and the remote's
   final reply; memsync for the local write and the remote's ``received``;
   async for the local write only;
5. when the remote outcome is known: a failure or an unknown outcome
   (disconnect) marks the range for synchronisation; only then does
   ``write_complete`` run and the range lock go.

A failed local write with a successful remote one marks its byte range
stale locally (:class:`~pyhast.disk.stale.StaleRanges`, persisted in the
metadata block before the write is acknowledged): that range is copied back
from the secondary and read from it meanwhile.  A later successful local write
to the range makes it current again (also persisted before the ack).  Only
the range, never the whole extent: other blocks of the extent may hold
acknowledged data that only the primary has.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections.abc import Awaitable, Callable

from pyhast.defaults import MAXPHYS
from pyhast.disk.rangelock import RangeLocks
from pyhast.disk.stale import StaleRanges
from pyhast.enums import Replication, SyncSrc
from pyhast.worker.local import LocalComponent
from pyhast.worker.remote import RemoteComponent, RemoteRequest

_ZEROS = bytes(MAXPHYS)
#: Writes that may await the secondary at once (FreeBSD's request pool) ...
MAX_REMOTE_INFLIGHT = 256
#: ... and their bytes (256 MAXPHYS writes would hold 256 MiB in memory).
MAX_REMOTE_INFLIGHT_BYTES = 64 * 1024 * 1024


class Stats:
    """The counters ``hastctl list`` shows (spec 2.3)."""

    __slots__ = (
        "delete",
        "delete_error",
        "flush",
        "flush_error",
        "read",
        "read_error",
        "write",
        "write_error",
    )

    def __init__(self) -> None:
        self.read = self.write = self.delete = self.flush = 0
        self.read_error = self.write_error = self.delete_error = self.flush_error = 0


class PrimaryDevice:
    """The replicated device of one resource, as the primary serves it.

    Implements the NBD server's BlockBackend protocol.
    """

    def __init__(
        self,
        local: LocalComponent,
        *,
        replication: Replication,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.local = local
        self.am = local.activemap
        self.replication = replication
        self.log = log
        self.remote: RemoteComponent | None = None
        self.syncsrc = SyncSrc.UNDEF
        self.stats = Stats()
        # Counters of the peer, as last seen in a handshake.
        self.secondary_localcnt = 0
        self.secondary_remotecnt = 0
        self._regular = _Ranges()
        self._sync = _Ranges()
        self._changed = asyncio.Event()
        #: byte ranges whose local copy is stale (a local write failed)
        self.local_stale = StaleRanges()
        self.inflight = 0
        self.remote_inflight = 0
        self.remote_inflight_bytes = 0
        self._room = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        #: called when extents are marked for synchronisation while connected
        self.on_need_sync: Callable[[], None] | None = None
        self.closed = False

    # -- BlockBackend properties ----------------------------------------------

    @property
    def size(self) -> int:
        return self.local.datasize

    @property
    def block_size(self) -> tuple[int, int, int]:
        return (self.local.sectorsize, max(4096, self.local.sectorsize), MAXPHYS)

    @property
    def read_only(self) -> bool:
        return False

    @property
    def can_multi_conn(self) -> bool:
        return True

    @property
    def connected(self) -> bool:
        return self.remote is not None and self.remote.connected

    # -- helpers -----------------------------------------------------------------

    def _extents(self, offset: int, length: int) -> range:
        first = self.am.offset_to_extent(offset)
        last = self.am.offset_to_extent(offset + length - 1)
        return range(first, last + 1)

    def _read_from_remote(self, offset: int, length: int) -> bool:
        return (
            self.connected
            and self.syncsrc is SyncSrc.SECONDARY
            and self.am.in_syncmap(offset, length)
        )

    async def _write_start(self, offset: int, length: int) -> None:
        """Write-ahead rule: the extent is dirty on disk before any data moves.

        Also when this write added nothing to the image: an earlier write to
        the same extent may have asked for the bitmap write that covers it
        and still be waiting for it to complete.
        """
        if self.am.write_start(offset, length):
            await self._bitmap_flush_logged(extents=self._extents(offset, length))
        else:
            await self.local.bitmap_settled(self._extents(offset, length))

    async def _mark_need_sync(self, offset: int, length: int) -> None:
        if self.am.need_sync(offset, length):
            await self._bitmap_flush_logged()
        if self.connected and self.on_need_sync is not None:
            # A remote write failed while the link is up: copy it now, not at
            # the next reconnect.
            self.on_need_sync()

    async def _bitmap_flush_logged(self, *, extents: range | None = None) -> None:
        try:
            await self.local.bitmap_flush(extents=extents)
        except OSError:
            pass  # logged by bitmap_flush; the in-memory map still tracks it

    def _bump_localcnt_if_degraded(self) -> None:
        """FreeBSD: the first write without the peer bumps localcnt once."""
        md = self.local.md
        if not self.connected and md.localcnt == self.secondary_remotecnt:
            md.localcnt += 1
            self.log.debug("Increasing localcnt to %d.", md.localcnt)
            try:
                self.local.metadata_write()
            except Exception as exc:
                self.log.error("Unable to write metadata: %s", exc)

    # -- reads -------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self.stats.read += 1
        if self.local_stale.overlaps(offset, length):
            return await self._read_around_stale(offset, length)
        if self._read_from_remote(offset, length):
            try:
                return await self._remote_read(offset, length)
            except OSError:
                self.stats.read_error += 1
                raise
        try:
            return self.local.read(offset, length)
        except OSError as exc:
            self.stats.read_error += 1
            if not self.connected or self.am.in_syncmap(offset, length):
                # The secondary's copy of a marked extent may be older than
                # what was acknowledged: an error beats stale data.
                raise
            self.log.warning("Local read failed (%s); reading from the secondary.", exc.strerror)
            return await self._remote_read(offset, length)

    async def _read_around_stale(self, offset: int, length: int) -> bytes:
        """Stale pieces from the peer (only it has them), the rest from here.

        The rest must not come from the peer: it may lack acknowledged writes
        whose remote outcome was unknown (marked for synchronisation).
        """
        if not self.connected:
            # Only the peer has the acknowledged data, and it is not here.
            self.stats.read_error += 1
            raise OSError(errno.EIO, "The local copy is stale and the secondary is away")
        parts: list[bytes | bytearray | memoryview] = []
        try:
            for off, n, stale in list(self.local_stale.split(offset, length)):
                if stale:
                    parts.append(await self._remote_read(off, n))
                else:
                    parts.append(self.local.read(off, n))
        except OSError:
            self.stats.read_error += 1
            raise
        return b"".join(parts)

    async def _remote_read(self, offset: int, length: int) -> bytes | memoryview:
        assert self.remote is not None
        req = self.remote.read(offset, length)
        err = await req.done
        if err:
            raise OSError(err, f"Remote read failed: {errno.errorcode.get(err, err)}")
        assert req.data is not None
        return req.data

    # -- writes ------------------------------------------------------------------

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        length = len(data)
        mask = self.local.sectorsize - 1
        if (offset | length) & mask:
            # Only whole sectors travel (the secondary refuses the rest, as
            # FreeBSD's does): read, modify, write the covering sectors.
            start = offset & ~mask
            end = (offset + length + mask) & ~mask
            buf = bytearray(await self.read(start, end - start))
            buf[offset - start : offset - start + length] = data
            await self.write(start, buf, fua)
            return
        self.stats.write += 1
        if (
            self.remote_inflight >= MAX_REMOTE_INFLIGHT
            or self.remote_inflight_bytes >= MAX_REMOTE_INFLIGHT_BYTES
        ):
            await self._wait_remote_room()
        await self._lock_regular(offset, length)
        released = False
        try:
            await self._write_start(offset, length)
            mode = self.replication
            # Local and remote dispatch back to back: same order on both.
            try:
                self.local.write(offset, data)
                lerr = 0
            except OSError as exc:
                lerr = exc.errno or errno.EIO
            remote = self.remote if self.connected else None
            req = remote.write(offset, data, mode is Replication.MEMSYNC) if remote else None
            perr = 0
            if not lerr and self.local_stale.overlaps(offset, length):
                # The peer no longer knows better (its copy of this write may
                # yet fail).  Checked here too: no coroutine on the hot path.
                try:
                    await self.mark_local_current(offset, length)
                except OSError as exc:
                    perr = exc.errno or errno.EIO
            if req is None:
                await self._mark_need_sync(offset, length)
                self._bump_localcnt_if_degraded()
            if lerr:
                self.stats.write_error += 1
                self.log.error(
                    "Local write of %d bytes at %d failed: %s.",
                    length,
                    offset,
                    errno.errorcode.get(lerr),
                )
            if req is not None:
                self.remote_inflight += 1
                self.remote_inflight_bytes += length
                if lerr or mode is Replication.FULLSYNC:
                    rerr = await req.done
                elif mode is Replication.MEMSYNC:
                    rerr = await req.received
                else:
                    rerr = 0
                if req.done.done():
                    if await self._remote_write_done(req, offset, length, lerr):
                        rerr = rerr or errno.EIO  # the stale range could not be recorded
                else:
                    released = True
                    req.done.add_done_callback(
                        functools.partial(self._remote_write_settled, req, offset, length, lerr)
                    )
                if lerr and rerr:
                    raise OSError(lerr, "Write failed on both components")
            else:
                # Marked for synchronisation above, so releasing it is safe
                # even when the write failed.
                self._complete(offset, length)
                if lerr:
                    raise OSError(lerr, "Local write failed")
            if perr:
                raise OSError(perr, "Unable to record that the range is current")
        finally:
            if not released:
                self._unlock_regular(offset, length)
        if fua:
            await self.flush()

    def _remote_write_settled(
        self, req: RemoteRequest, offset: int, length: int, lerr: int, _: object
    ) -> None:
        """The final reply of a write acknowledged earlier (memsync, async).

        The common case completes right here, without a task; a failure needs
        the bitmap written, so it continues in one.
        """
        if lerr or req.done.result():
            task = asyncio.get_running_loop().create_task(
                self._finish_in_background(req, offset, length, lerr)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        self._remote_settled(length)
        self._complete(offset, length)
        self._unlock_regular(offset, length)

    async def _finish_in_background(
        self, req: RemoteRequest, offset: int, length: int, lerr: int
    ) -> None:
        try:
            await req.done
            await self._remote_write_done(req, offset, length, lerr)
        finally:
            self._unlock_regular(offset, length)

    async def _wait_remote_room(self) -> None:
        """Bounded replication: at most MAX_REMOTE_INFLIGHT writes await the secondary.

        This is what bounds async mode's loss window (FreeBSD: its pool of
        256 requests); in the other modes the clients' queue depth does.
        """
        while self.connected and (
            self.remote_inflight >= MAX_REMOTE_INFLIGHT
            or self.remote_inflight_bytes >= MAX_REMOTE_INFLIGHT_BYTES
        ):
            self._room.clear()
            await self._room.wait()

    def _remote_settled(self, length: int) -> None:
        """One write no longer awaits the secondary: make room for the next."""
        self.remote_inflight -= 1
        self.remote_inflight_bytes -= length
        if (
            self.remote_inflight < MAX_REMOTE_INFLIGHT
            and self.remote_inflight_bytes < MAX_REMOTE_INFLIGHT_BYTES
        ):
            self._room.set()

    async def _remote_write_done(
        self, req: RemoteRequest, offset: int, length: int, lerr: int
    ) -> int:
        """Settle a write's remote outcome; nonzero: it must not be acknowledged."""
        self._remote_settled(length)
        werr = 0
        rerr = req.done.result()
        if rerr:
            # Failed or unknown outcome: the secondary may hold stale data.
            if rerr != errno.ENOTCONN:
                self.log.warning(
                    "Remote write of %d bytes at %d failed: %s; marked for synchronization.",
                    length,
                    offset,
                    errno.errorcode.get(rerr, rerr),
                )
            await self._mark_need_sync(offset, length)
        elif lerr:
            # The remote copy is good, the local one is not: remember it on
            # disk before the write is acknowledged, so that a restart copies
            # the range from the peer and not the other way round.
            try:
                await self.mark_local_stale(offset, length)
            except OSError as exc:
                werr = exc.errno or errno.EIO
        # Marked first, so the extent never looks clean in between.
        self._complete(offset, length)
        return werr

    async def mark_local_stale(self, offset: int, length: int) -> None:
        """Record a range whose local copy is stale, durably, and mark it for
        synchronisation (both in memory in one step: a synchronisation ending
        in between would otherwise forget it)."""
        changed = self.am.need_sync(offset, length)
        self.local_stale.add(offset, length)
        await self.persist_stale()
        if changed:
            await self._bitmap_flush_logged()
        if self.connected and self.on_need_sync is not None:
            self.on_need_sync()

    async def mark_local_current(self, offset: int, length: int) -> None:
        """The range's local copy is current again: recorded durably (OSError
        on failure).  Free when nothing in it was stale.  Removed from the list
        before the first await, so reads of it stay local from now on."""
        if self.local_stale.overlaps(offset, length):
            self.local_stale.remove(offset, length)
            await self.persist_stale()

    async def persist_stale(self) -> None:
        """Store the stale ranges in the metadata block, durably (OSError on failure)."""
        try:
            await self.local.metadata_write_durable(localstale=self.local_stale.to_array())
        except Exception as exc:
            self.log.error("Unable to store the stale ranges in the metadata: %s", exc)
            raise OSError(errno.EIO, "Unable to store the stale ranges") from exc

    def _complete(self, offset: int, length: int) -> None:
        if self.am.write_complete(offset, length):
            self.local.bitmap_lost_bits()

    # -- delete, zeroes, flush -------------------------------------------------

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        if not self.connected and self.local_stale.overlaps(offset, length):
            # Discard is advisory; refused rather than guessed at.
            raise OSError(errno.EIO, "The local copy is stale and the secondary is away")
        mask = self.local.sectorsize - 1
        if (offset | length) & mask:
            # Discard is advisory: drop the partial sectors at both ends.
            start = (offset + mask) & ~mask
            end = (offset + length) & ~mask
            if end <= start:
                return
            offset, length = start, end - start
        self.stats.delete += 1
        await self._lock_regular(offset, length)
        try:
            await self._write_start(offset, length)
            try:
                self.local.delete(offset, length)
                lerr = 0
            except OSError as exc:
                lerr = exc.errno or errno.EIO
            req = self.remote.delete(offset, length) if self.connected and self.remote else None
            if not lerr:
                try:
                    await self.mark_local_current(offset, length)
                except OSError as exc:
                    lerr = exc.errno or errno.EIO
            if req is None:
                await self._mark_need_sync(offset, length)
                self._bump_localcnt_if_degraded()
                rerr = errno.ENOTCONN
            else:
                rerr = await req.done
                if rerr:
                    await self._mark_need_sync(offset, length)
            if lerr and lerr != errno.EOPNOTSUPP:
                self.stats.delete_error += 1
            self._complete(offset, length)
        finally:
            self._unlock_regular(offset, length)
        if lerr and rerr:
            # Discard is advisory: "not supported" on both sides is not an error.
            if lerr == errno.EOPNOTSUPP:
                return
            raise OSError(lerr, "Delete failed")
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        end = offset + length
        pos = offset
        while pos < end:
            n = min(MAXPHYS, end - pos)
            await self.write(pos, memoryview(_ZEROS)[:n], False)
            pos += n
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """Durable on every component the mode promises (async: local only)."""
        self.stats.flush += 1
        waits: list[Awaitable[object]] = [self.local.flush()]
        req = None
        if self.connected and self.remote and self.replication is not Replication.ASYNC:
            req = self.remote.flush()
            waits.append(req.done)
        results = await asyncio.gather(*waits, return_exceptions=True)
        lres = results[0]
        if isinstance(lres, BaseException):
            self.stats.flush_error += 1
            if req is None or req.done.result():
                raise lres
        if req is not None and req.done.result() and req.done.result() != errno.ENOTCONN:
            self.log.warning("Remote flush failed: %s.", errno.errorcode.get(req.done.result()))

    # -- range locks between regular writes and synchronisation ----------------

    async def _lock_regular(self, offset: int, length: int) -> None:
        while self._sync.islocked(offset, length):
            await self._wait_change()
        self._regular.lock(offset, length)

    def _unlock_regular(self, offset: int, length: int) -> None:
        self._regular.unlock(offset, length)
        self._signal_change()

    async def lock_sync(self, offset: int, length: int) -> None:
        while self._regular.islocked(offset, length) or self._sync.islocked(offset, length):
            await self._wait_change()
        self._sync.lock(offset, length)

    def unlock_sync(self, offset: int, length: int) -> None:
        self._sync.unlock(offset, length)
        self._signal_change()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _signal_change(self) -> None:
        self._changed.set()

    # -- status ------------------------------------------------------------------

    def queue_sizes(self) -> dict[str, int]:
        return {
            "local_queue_size": 0,
            "send_queue_size": self.remote_inflight if self.remote else 0,
            "recv_queue_size": len(self.remote.pending) if self.remote else 0,
            "done_queue_size": 0,
            "idle_queue_size": 0,
        }


class _Ranges:
    """RangeLocks with a tiny fast path for the common empty case."""

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        self._locks = RangeLocks()

    def islocked(self, offset: int, length: int) -> bool:
        return len(self._locks) > 0 and self._locks.islocked(offset, length)

    def lock(self, offset: int, length: int) -> None:
        self._locks.lock(offset, length)

    def unlock(self, offset: int, length: int) -> None:
        self._locks.unlock(offset, length)
