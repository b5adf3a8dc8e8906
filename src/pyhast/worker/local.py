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
        #: Generation of the last write that added bits (see bitmap_settled).
        self._map_need = 0
        self._map_lock = asyncio.Lock()
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
        self.provider.close()

    # -- data ------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes of user data (OSError on failure)."""
        return self.provider.pread(length, self.localoff + offset)

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
        """Store the stale-extent list in the metadata block, durably."""
        self.md.localstale = localstale
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.provider.pwrite_durable, self.md.encode(), 0)

    def load_bitmap(self) -> None:
        """Start-up: every extent dirty on disk will be synchronised."""
        self.activemap.load(bitmap_read(self.provider, self.md)[: self.activemap.mapsize])

    async def bitmap_settled(self) -> None:
        """Return once every bitmap write that adds bits, asked for so far, has
        completed (or failed).

        A write whose ``write_start`` added nothing to the image may still
        depend on a bitmap write another request started and has not
        finished (same extent): it must not be dispatched before that one.
        Free when no such write is outstanding (lazy ones do not count).
        """
        if self._map_written >= self._map_need:
            return
        # Every writer that asked before us is queued on (or holds) the lock,
        # which is FIFO: once we hold it, they are done.
        async with self._map_lock:
            pass

    async def bitmap_flush(self, *, lazy: bool = False) -> None:
        """Write the activemap image (and flush it with metaflush) before returning.

        Concurrent callers share writes: a caller returns once a write that
        began after its own change has completed.  ``lazy``: the image only
        lost bits (nothing waits for this write, see :meth:`bitmap_settled`).
        """
        self._map_gen += 1
        want = self._map_gen
        if not lazy:
            self._map_need = want
        async with self._map_lock:
            if self._map_written >= want:
                return
            gen = self._map_gen
            image = self.activemap.bitmap()
            self.stat_activemap_update += 1
            if self.metaflush:
                # Durable before any data of the extent moves (write-ahead);
                # only the bitmap's pages are written back (RWF_DSYNC), in a
                # thread: a device flush may take milliseconds.
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(
                        None, self.provider.pwrite_durable, image, METADATA_SIZE
                    )
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        self.stat_write_error += 1
                        self.log.error(errno_text("Unable to write the activemap", exc))
                        raise
                    self.log.warning(
                        "The local provider does not support flushing; metaflush disabled."
                    )
                    self.metaflush = False
            if not self.metaflush:
                try:
                    self.provider.pwrite(image, METADATA_SIZE)
                except OSError as exc:
                    self.stat_write_error += 1
                    self.log.error(errno_text("Unable to write the activemap", exc))
                    raise
            self._map_written = gen
