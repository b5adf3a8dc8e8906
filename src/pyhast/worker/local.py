"""The local component of a resource: its provider, metadata and activemap.

Data I/O on the page cache takes microseconds, so reads and writes run inline
on the worker's event loop: that keeps the local component's FIFO order equal
to the order in which requests were issued (the order the remote component
sees too).  Anything that sleeps on the disk (fdatasync) runs in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from pyhast.defaults import METADATA_SIZE
from pyhast.disk.activemap import Activemap
from pyhast.disk.metadata import Metadata, bitmap_read, metadata_read, metadata_write
from pyhast.disk.provider import Provider
from pyhast.log import errno_text

#: Seconds after which bits the activemap lost are written (without a flush)
#: when no other bitmap write has carried them.
LAZY_BITMAP_DELAY = 1.0


class LocalComponent:
    """Provider + metadata + activemap of one resource on this node."""

    def __init__(
        self,
        provider: Provider,
        md: Metadata,
        *,
        metaflush: bool,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.provider = provider
        self.md = md
        self.log = log
        self.fd = provider.fd
        self.localoff = md.localoff
        self.datasize = md.datasize
        self.sectorsize = provider.sectorsize
        self.metaflush = metaflush
        self.flush_supported = True
        self.activemap = Activemap(md.datasize, md.extentsize, md.keepdirty, provider.sectorsize)
        # Coalescing of bitmap writes: a writer that needs generation g waits
        # until a write that started at or after g has completed.
        self._map_gen = 0
        self._map_written = 0
        #: Highest generation whose write has ended (completed or failed).
        self._map_done = 0
        #: Extent -> generation of the bitmap write that makes its bit durable,
        #: for extents whose write may still be in flight (see bitmap_settled).
        self._extent_gen: dict[int, int] = {}
        #: Requests waiting for a generation to end: (generation, future).
        self._map_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._map_lock = asyncio.Lock()
        self._md_lock = asyncio.Lock()
        #: The image lost bits that are not on disk yet (see bitmap_flush).
        self._lazy_dirty = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._lazy_tasks: set[asyncio.Task[None]] = set()
        self.stat_activemap_update = 0
        self.stat_write_error = 0
        self.stat_flush_error = 0

    @classmethod
    def open(
        cls,
        path: str,
        resource: str,
        *,
        metaflush: bool,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> LocalComponent:
        provider = Provider.open(path)
        try:
            md = metadata_read(provider, resource)
        except BaseException:
            provider.close()
            raise
        return cls(provider, md, metaflush=metaflush, log=log)

    def close(self) -> None:
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self.provider.close()

    # -- data ------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes of user data (OSError on failure)."""
        return self.provider.pread(length, self.localoff + offset)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with user data from ``offset`` (OSError on failure)."""
        self.provider.pread_into(buf, self.localoff + offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write user data (OSError on failure)."""
        self.provider.pwrite(data, self.localoff + offset)

    def delete(self, offset: int, length: int) -> None:
        """Discard user data (punch hole / BLKDISCARD)."""
        self.provider.delete(self.localoff + offset, length)

    async def flush(self) -> None:
        """Make completed writes durable (fdatasync in a thread)."""
        if not self.flush_supported:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.provider.flush)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.flush_supported = False
                self.log.warning("The local provider does not support flushing; disabled.")
                return
            raise

    # -- metadata and activemap -----------------------------------------------

    def metadata_write(self) -> None:
        metadata_write(self.provider, self.md)

    async def metadata_write_durable(self, *, localstale: tuple[int, ...]) -> None:
        """Store the stale ranges in the metadata block, durably.

        One write at a time, each encoding the metadata as it is when it
        starts: an older image never lands after a newer one.
        """
        self.md.localstale = localstale
        loop = asyncio.get_running_loop()
        async with self._md_lock:
            await loop.run_in_executor(None, self._write_md_durable)

    def _write_md_durable(self) -> None:
        self.provider.pwrite_durable(self.md.encode(), 0)

    def load_bitmap(self) -> None:
        """Start-up: every extent dirty on disk will be synchronised."""
        self.activemap.load(bitmap_read(self.provider, self.md)[: self.activemap.mapsize])

    async def bitmap_settled(self, extents: range) -> None:
        """Return once the bitmap writes that make ``extents`` dirty on disk
        have ended (completed or failed).

        A write whose ``write_start`` added nothing to the image may still
        depend on a bitmap write another request asked for and that has not
        finished (same extent): it must not be dispatched before that one.
        Writes to other extents do not wait for it.  Free in the common case.
        """
        egen = self._extent_gen
        if not egen:
            return
        need = max((egen.get(e, 0) for e in extents), default=0)
        if need > self._map_done:
            fut = asyncio.get_running_loop().create_future()
            self._map_waiters.append((need, fut))
            await fut

    def _map_ended(self, gen: int) -> None:
        """Bitmap writes up to ``gen`` have ended: wake who waited for them."""
        if gen <= self._map_done:
            return
        self._map_done = gen
        if gen >= self._map_gen:
            self._extent_gen.clear()
        waiters = self._map_waiters
        if waiters:
            still = []
            for need, fut in waiters:
                if need <= gen:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((need, fut))
            self._map_waiters = still

    async def bitmap_flush(self, *, extents: range | None = None) -> None:
        """Write the activemap image (and flush it with metaflush) before returning.

        Concurrent callers share writes: a caller returns once a write that
        began after its own change has completed.  ``extents``: the extents
        whose bits this change added (writes to them wait for this one, see
        :meth:`bitmap_settled`).  When the image only lost bits, call
        :meth:`bitmap_lost_bits` instead.
        """
        self._map_gen += 1
        want = self._map_gen
        if extents is not None:
            egen = self._extent_gen
            for e in extents:
                egen[e] = want
        try:
            async with self._map_lock:
                if self._map_written >= want:
                    return
                gen = self._map_gen
                try:
                    await self._write_image(durable=self.metaflush)
                finally:
                    self._map_ended(gen)
                self._map_written = gen
        except asyncio.CancelledError:
            if self._map_done < want:
                # Others may wait for ``want``: write it for them.
                task = asyncio.get_running_loop().create_task(self._bitmap_flush_quiet())
                self._lazy_tasks.add(task)
                task.add_done_callback(self._lazy_tasks.discard)
            raise

    async def _bitmap_flush_quiet(self) -> None:
        try:
            await self.bitmap_flush()
        except OSError:
            pass  # logged

    def bitmap_lost_bits(self) -> None:
        """The image only lost bits: write it later.

        Nothing depends on that reaching the disk (a crash before it only
        synchronises more), so it is not written now: the next bitmap write
        carries it, or a plain write after :data:`LAZY_BITMAP_DELAY` seconds
        of no other bitmap write (FreeBSD writes and flushes the bitmap for
        every lost bit too: half of its bitmap writes under random load).
        """
        self._lazy_dirty = True
        if self._lazy_timer is None:
            loop = asyncio.get_running_loop()
            self._lazy_timer = loop.call_later(LAZY_BITMAP_DELAY, self._lazy_due)

    def _lazy_due(self) -> None:
        self._lazy_timer = None
        if self._lazy_dirty:
            task = asyncio.get_running_loop().create_task(self._lazy_write())
            self._lazy_tasks.add(task)
            task.add_done_callback(self._lazy_tasks.discard)

    async def _lazy_write(self) -> None:
        async with self._map_lock:
            if not self._lazy_dirty:
                return  # a bitmap write carried it meanwhile
            try:
                await self._write_image(durable=False)
            except OSError:
                pass  # logged; the next bitmap write tries again

    async def _write_image(self, *, durable: bool) -> None:
        """Write the current image (caller holds the lock); logs and raises OSError."""
        image = self.activemap.bitmap()
        self._lazy_dirty = False
        self.stat_activemap_update += 1
        if durable:
            # Durable before any data of the extent moves (write-ahead);
            # only the bitmap's pages are written back (RWF_DSYNC), in a
            # thread: a device flush may take milliseconds.
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.provider.pwrite_durable, image, METADATA_SIZE)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._lazy_dirty = True
                    self.stat_write_error += 1
                    self.log.error(errno_text("Unable to write the activemap", exc))
                    raise
                self.log.warning(
                    "The local provider does not support flushing; metaflush disabled."
                )
                self.metaflush = False
        try:
            self.provider.pwrite(image, METADATA_SIZE)
        except OSError as exc:
            self._lazy_dirty = True
            self.stat_write_error += 1
            self.log.error(errno_text("Unable to write the activemap", exc))
            raise
