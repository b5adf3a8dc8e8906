"""The worker's side of the socketpairs to the hastd parent (docs/architecture.md).

* ctrl: the parent asks for status or pushes a reload; we answer each frame.
* event: we report connect/disconnect/sync events and wait for the ack, so
  the parent has seen an event before the worker can exit.
* conn (primary only): we ask the parent to open a TCP connection to the
  remote node and receive the connected descriptor (SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable

from pyhast.enums import Event
from pyhast.errors import ProtocolError
from pyhast.transport.aio import FramedConn
from pyhast.transport.fdpass import close_fds, recv_frame_fds
from pyhast.wire.frame import Frame, encode_frame
from pyhast.wire.nv import NV

CONTROL_STATUS = 10
CONTROL_RELOAD = 11
CONN_REQUEST = 1

#: How long an event may wait for the parent's acknowledgement.
EVENT_ACK_TIMEOUT = 30.0


class ParentLink:
    """ctrl + event (+ conn) channels of one worker."""

    def __init__(
        self,
        ctrl: FramedConn,
        event: FramedConn,
        conn_sock: socket.socket | None,
    ) -> None:
        self.ctrl = ctrl
        self.event = event
        self.conn_sock = conn_sock
        self._event_lock = asyncio.Lock()
        self._conn_lock = asyncio.Lock()

    @classmethod
    async def open(cls, ctrl_fd: int, event_fd: int, conn_fd: int | None) -> ParentLink:
        ctrl = await FramedConn.open(socket.socket(fileno=ctrl_fd))
        event = await FramedConn.open(socket.socket(fileno=event_fd))
        conn = None
        if conn_fd is not None:
            conn = socket.socket(fileno=conn_fd)
            conn.setblocking(True)
        return cls(ctrl, event, conn)

    def serve_ctrl(
        self, handler: Callable[[NV], NV], on_lost: Callable[[BaseException | None], None]
    ) -> None:
        """Answer every ctrl request with ``handler(request)``."""

        def on_frame(frame: Frame) -> None:
            try:
                reply = handler(frame.nv)
            except Exception as exc:
                reply = NV()
                reply.add_int16("error", errno.EINVAL)
                reply.add_string("errmsg", f"{type(exc).__name__}: {exc}")
            self.ctrl.send_frame(reply)

        self.ctrl.set_frame_handler(on_frame, on_lost)

    async def send_event(self, event: Event) -> None:
        """Report an event and wait until the parent has handled it."""
        nv = NV()
        nv.add_uint8("event", int(event))
        async with self._event_lock:
            try:
                self.event.send_frame(nv)
                await self.event.recv_frame(EVENT_ACK_TIMEOUT)
            except Exception:
                # The parent is gone (the ctrl channel's loss stops us) or
                # slow: an event must never break the caller.
                pass

    async def request_connection(self) -> socket.socket:
        """Ask the parent for a TCP connection to the remote node."""
        if self.conn_sock is None:
            raise OSError(errno.EINVAL, "This worker has no connection channel")
        async with self._conn_lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._request_connection_blocking)

    def _request_connection_blocking(self) -> socket.socket:
        assert self.conn_sock is not None
        nv = NV()
        nv.add_uint8("cmd", CONN_REQUEST)
        for buf in encode_frame(nv):
            self.conn_sock.sendall(buf)
        frame, fds = recv_frame_fds(self.conn_sock, 1)
        try:
            err = frame.nv.get_int16("error", default=0)
        except ProtocolError:
            err = errno.EPROTO
        if err or not fds:
            close_fds(fds)
            if not err:
                raise OSError(errno.EPROTO, "The parent sent no descriptor")
            raise OSError(err, os.strerror(err))
        return socket.socket(fileno=fds[0])
