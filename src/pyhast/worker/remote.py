"""The remote component seen from the primary: two connections and the requests in flight.

Requests go out on conn A in the order they are issued (``send_*`` never
awaits before the frame is handed to the transport), replies come back on
conn B in any order and are matched by ``seq``, a private 64-bit counter
(FreeBSD reused the GEOM Gate sequence number and seq 1 for all sync
requests).  Each request is parked in ``pending`` before it is sent, so a
fast reply always finds it.

When either connection breaks, every pending request completes with
ENOTCONN: its outcome is *unknown*, and the primary marks its extents for
synchronisation (FreeBSD treated it as success).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable

from pyhast.enums import Checksum, Compression, HioCmd
from pyhast.errors import ProtocolError
from pyhast.transport.aio import FramedConn
from pyhast.transport.base import ConnError
from pyhast.wire.frame import Frame
from pyhast.wire.messages import encode_request, keepalive_nv, parse_reply
from pyhast.wire.pipeline import pipeline_recv


class RemoteRequest:
    """One request in flight to the secondary.

    ``received`` resolves on the memsync early reply (or with the final
    one); ``done`` resolves on the final reply with the errno (0 = success)
    and, for READ, ``data`` holds the payload.
    """

    __slots__ = ("cmd", "data", "done", "length", "offset", "received", "sent", "seq")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seq: int, cmd: HioCmd, offset: int, length: int
    ) -> None:
        self.seq = seq
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.received: asyncio.Future[int] = loop.create_future()
        self.done: asyncio.Future[int] = loop.create_future()
        self.data: bytes | memoryview | None = None
        self.sent = time.monotonic()

    def finish(self, err: int) -> None:
        if not self.received.done():
            self.received.set_result(err)
        if not self.done.done():
            self.done.set_result(err)


class RemoteComponent:
    """A connected session with the secondary (conn A out, conn B in)."""

    def __init__(
        self,
        out_conn: FramedConn,
        in_conn: FramedConn,
        *,
        version: int,
        checksum: Checksum,
        compression: Compression,
        on_disconnect: Callable[[str], None],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.out = out_conn
        self.inc = in_conn
        self.version = version
        self.checksum = checksum
        self.compression = compression
        self.log = log
        self._on_disconnect = on_disconnect
        self.pending: dict[int, RemoteRequest] = {}
        self._seq = 0
        self.connected = True
        self.last_send = time.monotonic()
        out_conn.coalesce = True
        in_conn.set_frame_handler(self._on_reply, self._on_lost)
        out_conn.set_frame_handler(self._on_unexpected, self._on_lost)

    # -- sending -----------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFFFFFFFFFF or 1
        return self._seq

    def _send(
        self,
        cmd: HioCmd,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview | None = None,
        memsync: bool = False,
    ) -> RemoteRequest:
        req = RemoteRequest(self.loop, self._next_seq(), cmd, offset, length)
        if not self.connected:
            req.finish(errno.ENOTCONN)
            return req
        # One struct call for the usual request (see pyhast.wire.messages).
        head, payload = encode_request(
            cmd,
            req.seq,
            offset,
            length,
            data,
            memsync=memsync,
            compression=self.compression,
            checksum=self.checksum,
            version=self.version,
        )
        self.pending[req.seq] = req
        try:
            self.out.send_encoded(head, payload)
        except (OSError, ConnError, ProtocolError) as exc:
            self.disconnect(f"Unable to send a request: {exc}")
        self.last_send = time.monotonic()
        return req

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, memsync: bool
    ) -> RemoteRequest:
        return self._send(HioCmd.WRITE, offset, len(data), data, memsync)

    def read(self, offset: int, length: int) -> RemoteRequest:
        return self._send(HioCmd.READ, offset, length)

    def delete(self, offset: int, length: int) -> RemoteRequest:
        return self._send(HioCmd.DELETE, offset, length)

    def flush(self) -> RemoteRequest:
        return self._send(HioCmd.FLUSH, 0, 0)

    def keepalive(self) -> None:
        if not self.connected:
            return
        try:
            self.out.send_frame(keepalive_nv(), None, version=self.version)
        except (OSError, ConnError, ProtocolError) as exc:
            self.disconnect(f"Unable to send keepalive: {exc}")
        self.last_send = time.monotonic()

    async def drain(self, timeout: float) -> None:
        """Apply back-pressure: wait while the send buffer is full."""
        if self.connected:
            try:
                await self.out.drain(timeout)
            except Exception as exc:
                self.disconnect(f"Unable to send to the secondary: {exc}")

    def oldest_age(self) -> float:
        """Seconds the oldest request in flight has waited for its final reply."""
        for req in self.pending.values():  # insertion order: the first is the oldest
            return time.monotonic() - req.sent
        return 0.0

    # -- receiving ---------------------------------------------------------------

    def _on_reply(self, frame: Frame) -> None:
        try:
            reply = parse_reply(frame.nv)
        except ProtocolError as exc:
            self.disconnect(f"Invalid reply from the secondary: {exc}")
            return
        req = self.pending.get(reply.seq)
        if req is None:
            self.log.warning("Reply with unknown seq %d ignored.", reply.seq)
            return
        if reply.received and not reply.error:
            if not req.received.done():
                req.received.set_result(0)
            return
        del self.pending[reply.seq]
        if req.cmd is HioCmd.READ and not reply.error:
            try:
                req.data = pipeline_recv(frame.nv, frame.payload or b"", max_size=req.length)
            except ProtocolError as exc:
                req.finish(errno.EIO)
                self.disconnect(f"Invalid read data from the secondary: {exc}")
                return
            if len(req.data) != req.length:
                req.finish(errno.EIO)
                self.disconnect("Short read data from the secondary.")
                return
        req.finish(reply.error)

    def _on_unexpected(self, frame: Frame) -> None:
        self.disconnect("Unexpected message from the secondary on the request connection.")

    def _on_lost(self, exc: BaseException | None) -> None:
        reason = "Connection closed by the secondary." if exc is None else str(exc)
        self.disconnect(reason)

    def disconnect(self, reason: str) -> None:
        """Close both connections and fail every pending request with ENOTCONN."""
        if not self.connected:
            return
        self.connected = False
        self.out.abort()
        self.inc.abort()
        pending, self.pending = self.pending, {}
        for req in pending.values():
            req.finish(errno.ENOTCONN)
        self._on_disconnect(reason)
