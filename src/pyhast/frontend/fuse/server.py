"""Serve a BlockBackend as the one file of a FUSE mount, from the running event loop.

:class:`FuseServer` speaks the kernel protocol on a ``/dev/fuse`` descriptor
directly (no libfuse, no threads): the descriptor is non-blocking and
watched with ``loop.add_reader``; each readable event reads up to a batch of
requests, one ``read(2)`` each, into one reusable buffer.

* Each request runs as a coroutine started *eagerly*: when the backend call
  completes without suspending (page-cache reads and writes of the file
  backend do), the reply is written before the next request is read and no
  task is created; otherwise the rest runs as an asyncio task.  So the
  event loop that owns the backend serves the kernel with no thread hop,
  and as many requests are in flight as the kernel sends (``max_background``
  for asynchronous I/O, which INIT raises; see :mod:`.protocol`).
* A reply is one ``writev(2)`` (header, payload), written the moment the
  request completes.  Writing to /dev/fuse never blocks.  ENOENT on a reply
  means the kernel dropped the request (interrupted or aborted): ignored.
* Backpressure: while more than ``max_inflight_bytes`` of READ/WRITE payload
  are in flight the server stops reading requests; the kernel queues them.
* Mapping (one place, :meth:`FuseServer._run`): READ -> ``backend.read``,
  WRITE -> ``backend.write(fua=False)``, FSYNC (fsync and fdatasync, hence
  a loop device's FLUSH) -> ``backend.flush``, FALLOCATE punch-hole ->
  ``backend.trim`` (hence a loop device's DISCARD), zero-range ->
  ``backend.write_zeroes``.  FLUSH (close(2)) is not a data flush.
  SETATTR is accepted (chmod, chown, utimes; a size change is ignored: the
  file keeps exactly the backend's size, as a block device would).  An
  OSError from the backend becomes its errno; any other exception is
  logged once with its traceback and answered with EIO.
* The session ends when ``read(2)`` fails with ENODEV: the file was
  unmounted, or the connection aborted (``/sys/fs/fuse/connections/N/abort``
  or :meth:`FuseServer.close`).  :attr:`FuseServer.ended` then resolves.
  Closing the descriptor aborts the connection: every pending and later
  request of the kernel fails (ENOTCONN for processes, EIO through a loop
  device).  Nothing is written to a closed descriptor, even by requests
  still running in the backend.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pyhast.errors import ProtocolError
from pyhast.frontend.eager import start_eager
from pyhast.frontend.fuse import protocol as proto
from pyhast.frontend.fuse.protocol import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Attr,
    InitReply,
    Opcode,
    Request,
    SetattrValid,
)
from pyhast.frontend.nbd.backend import BlockBackend

__all__ = ["FuseServer", "FuseStats"]

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

#: Default number of asynchronous requests the kernel may keep in flight.
MAX_BACKGROUND = 256
#: Default largest READ/WRITE the kernel sends (needs FUSE_MAX_PAGES).
MAX_WRITE = 1024 * 1024
#: Default limit of READ/WRITE payload in flight before reading pauses.
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
#: Requests read per readable event before yielding to the loop.
_BATCH = 64
#: Seconds attributes may be cached by the kernel (they change only through us).
_ATTR_VALID = 3600

_READ = int(Opcode.READ)
_WRITE = int(Opcode.WRITE)
_ALLOC_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE


@dataclass
class FuseStats:
    """Counters of requests served (successful or not)."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0  #: FSYNC requests (fsync, fdatasync, loop FLUSH)
    trims: int = 0  #: punch-hole FALLOCATE requests (loop DISCARD)
    zeroes: int = 0  #: zero-range FALLOCATE requests
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0  #: requests answered with an error


def _errno_of(exc: OSError) -> int:
    err = exc.errno
    return err if isinstance(err, int) and 0 < err < 4096 else errno.EIO


class FuseServer:
    """Serve ``backend`` as the root file of a FUSE mount (see the module docstring).

    Call :meth:`open` (opens /dev/fuse; the descriptor goes into the mount
    options), mount, then :meth:`start` from the event loop that owns the
    backend (reading /dev/fuse before the mount fails with EPERM).
    :attr:`initialized` resolves when the kernel's INIT is answered,
    :attr:`ended` when the session is over (with None, or with the reason if
    it ended on an error).  :meth:`close` aborts the session
    and :meth:`drain` waits for requests still running in the backend.
    """

    def __init__(
        self,
        backend: BlockBackend,
        *,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
        max_background: int = MAX_BACKGROUND,
        max_write: int = MAX_WRITE,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        log: Logger | None = None,
    ) -> None:
        now = time.time_ns()
        self.backend = backend
        self.size = backend.size
        self.read_only = backend.read_only
        self.attr = Attr(backend.size, stat.S_IFREG | (mode & 0o7777), uid, gid, now, now, now)
        self.max_background = max_background
        self.max_write = max_write
        self.max_inflight_bytes = max_inflight_bytes
        self.stats = FuseStats()
        self.negotiated: InitReply | None = None
        self._log: Logger = log or logging.getLogger(__name__)
        self._fd = -1
        self._buf = bytearray(proto.read_buffer_size(max_write))
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._inflight_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: dict[int, Callable[[Request], Coroutine[Any, Any, None] | None]] = {
            _READ: self._read,
            _WRITE: self._write,
            int(Opcode.FSYNC): self._fsync,
            int(Opcode.FALLOCATE): self._fallocate,
            int(Opcode.GETATTR): self._getattr,
            int(Opcode.SETATTR): self._setattr,
            int(Opcode.OPEN): self._open,
            int(Opcode.FLUSH): self._ok,
            int(Opcode.RELEASE): self._ok,
            int(Opcode.DESTROY): self._ok,
            int(Opcode.STATFS): self._statfs,
            int(Opcode.INIT): self._init,
        }
        self.initialized: asyncio.Future[InitReply] | None = None
        self.ended: asyncio.Future[str | None] | None = None

    # -- lifecycle ----------------------------------------------------------

    @property
    def fd(self) -> int:
        """The /dev/fuse descriptor (-1 when closed)."""
        return self._fd

    @property
    def inflight(self) -> int:
        """Requests suspended in the backend."""
        return len(self._tasks)

    def open(self, device: str = "/dev/fuse") -> int:
        """Open the FUSE device (non-blocking, close-on-exec) and return its descriptor."""
        if self._fd >= 0:
            raise RuntimeError("FuseServer is already open.")
        self._fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return self._fd

    def start(self) -> None:
        """Start serving from the running loop (after the mount)."""
        if self._fd < 0:
            raise RuntimeError("FuseServer.open() must come first.")
        self._loop = asyncio.get_running_loop()
        self.initialized = self._loop.create_future()
        self.ended = self._loop.create_future()
        self._resume_reading()

    def close(self) -> None:
        """Stop serving and close the descriptor (aborts the connection if mounted)."""
        self._pause_reading()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._end(None)

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for requests running in the backend; cancel the rest.

        Returns how many had to be cancelled.
        """
        if not self._tasks:
            return 0
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    def _end(self, reason: str | None) -> None:
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(reason)
        if self.initialized is not None and not self.initialized.done():
            self.initialized.set_exception(
                ConnectionError(reason or "The FUSE session ended before INIT.")
            )
            self.initialized.exception()  # retrieved: whoever awaits it still gets it

    def _pause_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _resume_reading(self) -> None:
        if not self._reading and self._fd >= 0 and self._loop is not None:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    # -- reading ------------------------------------------------------------

    def _on_readable(self) -> None:
        buf = [self._buf]
        for _ in range(_BATCH):
            if self._inflight_bytes >= self.max_inflight_bytes:
                self._pause_reading()
                return
            try:
                nbytes = os.readv(self._fd, buf)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                self._pause_reading()
                self._end(
                    None if exc.errno == errno.ENODEV else f"Reading /dev/fuse failed: {exc}."
                )
                return
            try:
                req = proto.decode_request(self._view, nbytes)
            except ProtocolError as exc:
                self._pause_reading()
                self._end(str(exc))
                return
            self._dispatch(req)
            if self._fd < 0:
                return

    def _dispatch(self, req: Request) -> None:
        handler = self._handlers.get(req.opcode)
        if handler is None:
            if req.opcode not in proto.NO_REPLY:
                self._send_error(req.unique, errno.ENOSYS, count=False)
            return
        coro = handler(req)
        if coro is None:
            return
        assert self._loop is not None
        start_eager(self._loop, coro, self._tasks)

    # -- replies ------------------------------------------------------------

    def _send(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if self._fd < 0:
            return
        try:
            os.writev(self._fd, parts)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
                return  # the kernel dropped the request or the connection
            self._log.error("Writing a FUSE reply failed: %s.", exc)

    def _send_error(self, unique: int, err: int, *, count: bool = True) -> None:
        if count:
            self.stats.errors += 1
        self._send([proto.encode_error(unique, err)])

    def _fail(self, req: Request, exc: BaseException) -> None:
        """Answer a request whose backend call raised."""
        if isinstance(exc, OSError):
            err = _errno_of(exc)
            self._log.debug(
                "FUSE request %s at %d failed: %s.", Opcode(req.opcode).name, req.offset, exc
            )
        else:
            err = errno.EIO
            self._log.error(
                "The backend failed unexpectedly on FUSE request %s.",
                Opcode(req.opcode).name,
                exc_info=exc,
            )
        self._send_error(req.unique, err)

    def _ok(self, req: Request) -> None:
        self._send([proto.encode_error(req.unique, 0)])

    # -- data requests ------------------------------------------------------

    def _io_done(self, nbytes: int) -> None:
        self._inflight_bytes -= nbytes
        if not self._reading and self._inflight_bytes < self.max_inflight_bytes:
            self._resume_reading()

    async def _read(self, req: Request) -> None:
        self.stats.reads += 1
        offset = req.offset
        length = min(req.length, self.size - offset) if offset < self.size else 0
        if length <= 0:
            self._send(proto.encode_reply(req.unique))
            return
        self._inflight_bytes += length
        try:
            data = await self.backend.read(offset, length)
            if len(data) != length:
                raise OSError(errno.EIO, f"backend returned {len(data)} of {length} bytes")
        except Exception as exc:
            self._fail(req, exc)
        else:
            self.stats.bytes_read += length
            self._send(proto.encode_reply(req.unique, data))
        finally:
            self._io_done(length)

    async def _write(self, req: Request) -> None:
        self.stats.writes += 1
        if self.read_only:
            self._send_error(req.unique, errno.EROFS)
            return
        offset = req.offset
        if offset >= self.size:
            self._send_error(req.unique, errno.ENOSPC)
            return
        data = req.data
        assert data is not None
        length = min(len(data), self.size - offset)
        payload = data if length == len(data) else memoryview(data)[:length]
        self._inflight_bytes += length
        try:
            await self.backend.write(offset, payload, False)
        except Exception as exc:
            self._fail(req, exc)
        else:
            self.stats.bytes_written += length
            self._send([proto.encode_write(req.unique, length)])
        finally:
            self._io_done(length)

    async def _fsync(self, req: Request) -> None:
        self.stats.flushes += 1
        if self.read_only:
            self._ok(req)
            return
        try:
            await self.backend.flush()
        except Exception as exc:
            self._fail(req, exc)
        else:
            self._ok(req)

    async def _fallocate(self, req: Request) -> None:
        mode = req.flags
        if mode & ~_ALLOC_MODES:
            self._send_error(req.unique, errno.EOPNOTSUPP)
            return
        if self.read_only:
            self._send_error(req.unique, errno.EROFS)
            return
        offset = req.offset
        end = offset + req.length
        if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            # Preallocation: every byte already exists; growing is impossible.
            if end > self.size and not mode & FALLOC_FL_KEEP_SIZE:
                self._send_error(req.unique, errno.ENOSPC)
            else:
                self._ok(req)
            return
        length = min(end, self.size) - offset
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                self.stats.trims += 1
                if length > 0:
                    await self.backend.trim(offset, length, False)
            else:
                self.stats.zeroes += 1
                if end > self.size and not mode & FALLOC_FL_KEEP_SIZE:
                    raise OSError(errno.ENOSPC, "cannot grow the device")
                if length > 0:
                    await self.backend.write_zeroes(offset, length, False, False)
        except Exception as exc:
            self._fail(req, exc)
        else:
            self._ok(req)

    # -- metadata requests --------------------------------------------------

    def _getattr(self, req: Request) -> None:
        self._send([proto.encode_attr(req.unique, self.attr, _ATTR_VALID)])

    def _setattr(self, req: Request) -> None:
        valid = req.flags
        mode, uid, gid, atime, mtime = req.extra
        attr = self.attr
        now = time.time_ns()
        if valid & SetattrValid.MODE:
            attr = attr._replace(mode=stat.S_IFREG | (mode & 0o7777))
        if valid & SetattrValid.UID:
            attr = attr._replace(uid=uid)
        if valid & SetattrValid.GID:
            attr = attr._replace(gid=gid)
        if valid & SetattrValid.ATIME_NOW:
            attr = attr._replace(atime_ns=now)
        elif valid & SetattrValid.ATIME:
            attr = attr._replace(atime_ns=atime * 1_000_000_000)
        if valid & SetattrValid.MTIME_NOW:
            attr = attr._replace(mtime_ns=now)
        elif valid & SetattrValid.MTIME:
            attr = attr._replace(mtime_ns=mtime * 1_000_000_000)
        # SIZE is ignored: the device keeps its size (O_TRUNC and ftruncate are no-ops).
        self.attr = attr._replace(ctime_ns=now)
        self._send([proto.encode_attr(req.unique, self.attr, _ATTR_VALID)])

    def _open(self, req: Request) -> None:
        if self.read_only and req.flags & os.O_ACCMODE != os.O_RDONLY:
            self._send_error(req.unique, errno.EROFS)
            return
        self._send([proto.encode_open(req.unique)])

    def _statfs(self, req: Request) -> None:
        self._send([proto.encode_statfs(req.unique, self.size)])

    def _init(self, req: Request) -> None:
        major, minor, max_readahead = req.extra
        if major != proto.FUSE_MAJOR or minor < proto.FUSE_MIN_KERNEL_MINOR:
            self._send_error(req.unique, errno.EPROTO, count=False)
            self._end(
                f"The kernel speaks FUSE {major}.{minor}; {proto.FUSE_MAJOR}."
                f"{proto.FUSE_MIN_KERNEL_MINOR} or later is needed."
            )
            return
        reply, negotiated = proto.encode_init(
            req.unique,
            minor,
            max_readahead,
            req.flags,
            max_background=self.max_background,
            max_write=self.max_write,
        )
        self._send([reply])
        self.negotiated = negotiated
        self._log.debug(
            "FUSE session started: protocol 7.%d, flags 0x%x, max_background %d, max_write %d.",
            negotiated.minor,
            negotiated.flags,
            negotiated.max_background,
            negotiated.max_write,
        )
        if self.initialized is not None and not self.initialized.done():
            self.initialized.set_result(negotiated)
