"""The asyncio side of the transport: framed connections and async socket set-up.

hastd's parent and the workers each run one asyncio loop.  Every HAST socket
(replication, control, parent <-> worker) carries frames (spec 6.2), so the
unit of I/O here is the frame: :class:`FramedConn` wraps a connected stream
socket, decodes incoming bytes with the sans-IO
:class:`~pyhast.wire.frame.FrameDecoder` and encodes outgoing messages with
:func:`~pyhast.wire.frame.encode_frame`.

Theory of operation
===================

Receiving.  :class:`FramedConn` is its own ``asyncio.BufferedProtocol``: the
event loop reads straight into one preallocated buffer (256 KiB), the decoder
is fed once per read and drained of every complete frame.  While a large
payload is still missing at least 64 KiB, the loop reads into the payload's
own buffer instead (:meth:`FrameDecoder.payload_window`), so the bytes of a
1 MiB write are copied once, by the kernel.  Frames then go
either to a queue served by :meth:`FramedConn.recv_frame` (one wake-up per
*read*, and ``recv_frame`` returns without suspending while frames are
queued), or, in handler mode (:meth:`~FramedConn.set_frame_handler`,
:meth:`~FramedConn.run_handler`), straight to a callback inside the read
callback, with no queue and no task switch at all: the workers match replies
to requests there.  The queue is bounded in bytes: past ``max_queued`` the
socket is no longer read (TCP flow control pushes back on the peer) until
the consumer catches up.

Sending.  :meth:`~FramedConn.send_frame` is synchronous: it hands the
buffers of ``encode_frame`` to the transport, so a frame is never
interleaved with another.  A payload is never concatenated with the header:
on Python 3.12+ ``writelines`` sends the buffers with one ``sendmsg``;
Python 3.11's ``writelines`` would join them, so there header and payload
are written separately (the payload is sent straight from the caller's
buffer when the socket takes it, and only small payloads are coalesced with
their header into one write).  On 3.11 the transport copies whatever the
kernel does not take into its own buffer, and grows that buffer by copying
again: at a few MiB in flight that cost more than the rest of a 1 MiB write.
So there the transport's high-water mark is 0 (it pauses us as soon as it
holds a byte) and what comes next waits in our own queue of buffer views.
While the transport is empty, the queue is written straight to the socket
with ``os.writev`` (up to 64 views per call, nothing copied in userland);
of what the kernel refuses, only the first few KiB are handed to the
transport, so that it watches the socket and resumes us when it drained
them.  Once sent, a payload buffer must not be modified (it may still be
queued).  :meth:`~FramedConn.drain` waits until what is
buffered (both queues) is below the low-water mark.

Batching.  Frames sent from inside a frame handler (the secondary answering
the requests of one read, a worker answering its parent) are not written one
by one: they are collected per connection and written when the read callback
returns, one write (one ``send()``) per connection per read, which is what
many requests per read should cost.  Outside handlers, send_frame() writes at
once; order is kept either way, and close() writes collected frames first.

Timeouts (FreeBSD's SO_RCVTIMEO/SO_SNDTIMEO, spec 6.5).  Both are
*inactivity* timeouts, not deadlines, as in hastd where each blocking
send()/recv() may wait ``timeout`` seconds for progress:

* ``recv_frame(timeout)`` fails when no byte at all has arrived for
  ``timeout`` seconds while it waits; a large payload trickling in slowly
  does not time out.  The loop records the time of every read (one float
  store) and a single ``call_at`` timer re-arms itself at "last data +
  timeout", so data arriving costs no timer operations.
  ``run_handler(idle_timeout=...)`` applies the same rule for its whole run.
* ``drain(timeout)`` fails when the transport could not hand a single byte
  to the kernel for ``timeout`` seconds: a peer that stops reading breaks the
  connection.  asyncio reports no partial writes, so progress is sampled
  every ``timeout / 4`` (the failure comes between 1 and 1.25 times ``timeout``
  after the last progress).

An expired timeout is fatal, as in hastd where every caller drops the
connection on it: the connection is aborted and :class:`ConnTimeoutError`
raised.  To wait for a frame *without* breaking the connection, cancel the
call instead (``asyncio.timeout()`` around ``recv_frame``): cancellation
leaves the connection usable and loses no frame.

Errors and states.  Every failure is sticky (h11): once the connection has
ended, each later receive raises the error that ended it and each later send
raises :class:`ConnClosedError` (or that error, if it is a :class:`ConnError`).
Frames decoded before the failure are still delivered first.

==========================  =================================================
receive raises              when
==========================  =================================================
ConnEOFError                the peer closed cleanly at a frame boundary
ConnBrokenError             reset/EPIPE (``__cause__`` is the OSError), or EOF
                            inside a frame
ConnTimeoutError            no data for ``timeout`` s (receive or send)
ProtocolError (FrameError,  the peer sent a malformed frame; the connection
NVError)                    is aborted
ConnClosedError             we called close()/abort()
ConnBusyError               another task is receiving, or a frame handler is
                            set (a bug in the caller, not a ConnError)
==========================  =================================================

In handler mode the same exception is passed to the ``on_lost`` callback
(or raised by :meth:`FramedConn.run_handler`), and an exception raised by the
handler itself ends the connection the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import os
import socket
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from pyhast.defaults import HAST_PROTO_VERSION
from pyhast.transport import base
from pyhast.transport.base import (
    ConflictDetector,
    ConnBrokenError,
    ConnBusyError,
    ConnClosedError,
    ConnEOFError,
    ConnError,
    ConnTimeoutError,
)
from pyhast.wire.frame import (
    DEFAULT_MAX_NV_SIZE,
    DEFAULT_MAX_PAYLOAD,
    NEED_DATA,
    Frame,
    FrameDecoder,
    encode_frame,
)
from pyhast.wire.nv import NV

__all__ = [
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_READ_SIZE",
    "DEFAULT_WRITE_HIGH",
    "DEFAULT_WRITE_LOW",
    "FrameHandler",
    "FramedConn",
    "LostHandler",
    "accept",
    "connect",
    "open_framed",
    "wait_connected",
    "wait_ready",
]

#: Called with each received frame, inside the loop's read callback.
FrameHandler = Callable[[Frame], None]
#: Called (soon) with the exception that ended a connection.
LostHandler = Callable[[BaseException], None]

#: Size of the buffer the loop reads into.
DEFAULT_READ_SIZE: Final = 256 * 1024
#: Transport write buffer high/low-water marks (drain() waits above high
#: until below low).  Room for a MAXPHYS write plus some requests.
DEFAULT_WRITE_HIGH: Final = 1024 * 1024 + 64 * 1024
DEFAULT_WRITE_LOW: Final = 256 * 1024
#: Received frames (payload bytes plus a per-frame overhead) queued for
#: recv_frame() before the connection stops reading.
DEFAULT_MAX_QUEUED: Final = 4 * 1024 * 1024

#: Python 3.12 made the selector transport's writelines() a sendmsg() of the
#: buffers; before that it joins them.
_WRITELINES_ZERO_COPY: Final = sys.version_info >= (3, 12)
#: On 3.11, a payload up to this size is joined with its header (one send()
#: beats two for small buffers); a larger one is written on its own.
_COALESCE_LIMIT: Final = 16 * 1024
#: On 3.11, the largest piece handed to the transport at once when the
#: socket cannot be written directly (what the kernel does not take is copied).
_TX_SLICE: Final = 256 * 1024
#: On 3.11, views written with one os.writev (Linux takes up to 1024).
_TX_IOV: Final = 64
#: On 3.11, what the transport gets of a refused remainder: enough for it to
#: wait for the socket and resume us, little to copy.
_TX_HANDOFF: Final = 4096
#: Payload bytes still missing from which the next read goes straight into
#: the payload's buffer instead of the read buffer (saves a copy per byte).
_DIRECT_READ_MIN: Final = 64 * 1024
#: Accounting overhead of one queued frame (nv list and bookkeeping).
_FRAME_OVERHEAD: Final = 256
#: A timer firing this close to its deadline counts as expired.
_TIMER_SLACK: Final = 0.001


class _HandlerBatch(threading.local):
    """Connections with frames sent from frame handlers during the current read callback.

    ``conns`` is a list only while a read callback runs frame handlers (one
    event loop per thread, so per-thread state is per-loop state).
    """

    conns: list[FramedConn] | None = None


_handler_batch = _HandlerBatch()


def _payload_len(buf: bytes | bytearray | memoryview) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _frame_cost(frame: Frame) -> int:
    payload = frame.payload
    return _FRAME_OVERHEAD + (payload.nbytes if payload is not None else 0)


class FramedConn(asyncio.BufferedProtocol):
    """A connected stream socket carrying HAST frames (see the module docstring).

    Create with :meth:`open`; the connection then owns the socket.  The
    ``asyncio.BufferedProtocol`` methods (``connection_made``,
    ``get_buffer``, ``buffer_updated``, ...) are callbacks for the event loop,
    not for users.
    """

    def __init__(
        self,
        *,
        peer: str = "",
        max_version: int = HAST_PROTO_VERSION,
        max_nv_size: int = DEFAULT_MAX_NV_SIZE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        read_size: int = DEFAULT_READ_SIZE,
        write_high: int = DEFAULT_WRITE_HIGH,
        write_low: int = DEFAULT_WRITE_LOW,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._peer = peer
        self._decoder = FrameDecoder(max_version, max_nv_size, max_payload)
        self._default_max_payload = max_payload
        self._rbuf = bytearray(read_size)
        self._rview = memoryview(self._rbuf)
        #: the last get_buffer() handed out a payload window (see there)
        self._direct = False
        self._write_limits = (write_high, write_low)
        self._max_queued = max_queued
        self._transport: asyncio.Transport | None = None
        # Receive side.
        self._frames: collections.deque[Frame] = collections.deque()
        self._queued = 0  # cost of the queued frames
        self._reading_paused = False
        self._handler: FrameHandler | None = None
        self._on_lost: LostHandler | None = None
        self._recv_guard = ConflictDetector("Another task is already receiving on this connection.")
        self._recv_waiter: asyncio.Future[None] | None = None
        self._recv_timer: asyncio.TimerHandle | None = None
        self._recv_timeout = 0.0
        self._recv_since = 0.0
        self._last_data = 0.0
        # Send side.
        self._written = 0  # bytes handed to the transport
        self._pending: list[bytes | memoryview] | None = None  # batched by handlers
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Python 3.11: our own queue behind the transport (module docstring).
        self._txq: collections.deque[memoryview] = collections.deque()
        self._txq_bytes = 0
        self._tx_blocked = False  # the transport holds unsent bytes
        self._tx_fd = -1  # the socket, written directly while the transport is empty
        # End of life: the first error wins, except that our own close wins
        # over everything.
        self._exc: BaseException | None = None
        self._closed_locally = False
        self._lost: asyncio.Future[None] = self._loop.create_future()
        #: Coalesce the frames sent in one loop iteration into one write
        #: (the primary's request connection: many requests per iteration).
        self.coalesce = False

    @classmethod
    async def open(
        cls,
        sock: socket.socket,
        *,
        peer: str | None = None,
        max_version: int = HAST_PROTO_VERSION,
        max_nv_size: int = DEFAULT_MAX_NV_SIZE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        read_size: int = DEFAULT_READ_SIZE,
        write_high: int = DEFAULT_WRITE_HIGH,
        write_low: int = DEFAULT_WRITE_LOW,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> FramedConn:
        """Wrap the connected stream socket ``sock``, which the connection now owns.

        The socket is made non-blocking; if this fails, it is closed.  ``peer``
        names the other end in messages (derived from the socket when None).
        The limits are those of :class:`~pyhast.wire.frame.FrameDecoder` and
        of the module docstring.
        """
        try:
            if peer is None:
                peer = _describe_peer(sock)
            conn = cls(
                peer=peer,
                max_version=max_version,
                max_nv_size=max_nv_size,
                max_payload=max_payload,
                read_size=read_size,
                write_high=write_high,
                write_low=write_low,
                max_queued=max_queued,
            )
            await conn._loop.connect_accepted_socket(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise
        return conn

    # ------------------------------------------------------------------
    # Properties

    @property
    def peer(self) -> str:
        """The other end's address (``tcp4://10.0.0.2:41234``, ``socketpair://``)."""
        return self._peer

    @property
    def max_payload(self) -> int:
        """Largest payload accepted from the peer; may be changed between frames.

        The handshake raises it before the secondary sends its bitmap.
        """
        return self._decoder.max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self._decoder.max_payload = value

    @property
    def max_nv_size(self) -> int:
        """Largest nv list accepted from the peer; may be changed between frames."""
        return self._decoder.max_nv_size

    @max_nv_size.setter
    def max_nv_size(self, value: int) -> None:
        self._decoder.max_nv_size = value

    @property
    def write_buffer_size(self) -> int:
        """Bytes written with send_frame() that the kernel has not taken yet."""
        return self._buffered()

    def _buffered(self) -> int:
        transport = self._transport
        held = transport.get_write_buffer_size() if transport is not None else 0
        return held + self._txq_bytes

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra information (``"socket"``, ``"peername"``, ...)."""
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    # ------------------------------------------------------------------
    # Receiving

    async def recv_frame(self, timeout: float | None = None) -> Frame:
        """The next frame from the peer.

        Waits at most ``timeout`` seconds *without any data arriving* (None:
        forever); then the connection is aborted and ConnTimeoutError raised.
        Returns at once, without suspending, while frames are queued.  Raises
        the errors of the module docstring's table; ConnBusyError if another
        task is receiving or a frame handler is set.
        """
        with self._recv_guard:
            if self._handler is not None:
                raise ConnBusyError("The frames of this connection go to a frame handler.")
            frames = self._frames
            if not frames and self._exc is None:
                await self._wait_recv(timeout)
            if frames:
                frame = frames.popleft()
                self._queued -= _frame_cost(frame)
                if self._reading_paused and self._queued <= self._max_queued // 2:
                    self._resume_reading()
                return frame
            assert self._exc is not None
            raise self._exc

    def set_frame_handler(
        self,
        handler: FrameHandler | None,
        on_lost: LostHandler | None = None,
        *,
        idle_timeout: float | None = None,
    ) -> None:
        """Deliver each received frame to ``handler`` instead of the queue (None: stop).

        ``handler`` runs synchronously inside the loop's read callback, once
        per frame, in order; frames already queued are passed to it right
        away, from this call.  It must not block or await.  An exception it
        raises (even from this call) is not propagated: it ends the connection
        (aborted) and is reported to ``on_lost``.

        ``on_lost`` is called once, soon after the connection ends for any
        reason but our own close()/abort(), with the exception a receive
        would raise (ConnEOFError, ConnBrokenError, ConnTimeoutError,
        ProtocolError, or what ``handler`` raised).  ``idle_timeout`` is the
        receive timeout while the handler is set: no data for that long
        aborts the connection with ConnTimeoutError.

        While a handler is set, recv_frame() raises ConnBusyError.
        :meth:`run_handler` is the task-shaped alternative.
        """
        if self._recv_guard.held:
            raise ConnBusyError("Another task is receiving on this connection.")
        self._install_handler(handler, on_lost, idle_timeout)

    def set_max_payload(self, size: int | None) -> None:
        """Accept payloads up to ``size`` bytes from now on (None: the limit given to open()).

        See :attr:`max_payload`; the handshake raises the limit for the
        secondary's bitmap and puts it back afterwards.
        """
        self._decoder.max_payload = self._default_max_payload if size is None else size

    async def run_handler(
        self, handler: FrameHandler, *, idle_timeout: float | None = None
    ) -> NoReturn:
        """Feed every frame to ``handler`` until the connection ends; raise how it ended.

        This is the receiving task of a hot path (the workers' reply path):
        frames never leave the read callback.  ``idle_timeout`` is the receive
        timeout: if no data arrives for that long the connection is aborted
        and ConnTimeoutError raised.  Otherwise raises what recv_frame()
        would (ConnEOFError, ConnBrokenError, ProtocolError, ConnClosedError
        after our own close()), or the exception ``handler`` raised.
        Cancelling the call removes the handler and leaves the connection
        usable.
        """
        with self._recv_guard:
            self._install_handler(handler, None, idle_timeout)
            try:
                while self._exc is None:
                    await self._wait_recv(None)
            finally:
                if self._handler is handler:
                    self._install_handler(None, None, None)
            raise self._exc

    def _install_handler(
        self,
        handler: FrameHandler | None,
        on_lost: LostHandler | None,
        idle_timeout: float | None,
    ) -> None:
        self._handler = handler
        self._on_lost = on_lost if handler is not None else None
        self._disarm_idle()
        if handler is None:
            return
        if self._exc is None and idle_timeout is not None:
            self._arm_idle(idle_timeout)
        frames = self._frames
        try:
            while frames and self._handler is handler:
                frame = frames.popleft()
                self._queued -= _frame_cost(frame)
                handler(frame)
        except Exception as exc:  # reported like an error in the read callback
            self._fail(exc)
            return
        if self._reading_paused and self._queued <= self._max_queued // 2:
            self._resume_reading()
        if self._exc is not None:
            self._report_lost()  # the connection had already ended

    async def _wait_recv(self, timeout: float | None) -> None:
        """Wait until a frame is queued (queue mode) or the connection ends."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._recv_waiter = waiter
        if timeout is not None:
            self._arm_idle(timeout)
        try:
            await waiter
        finally:
            self._recv_waiter = None
            if timeout is not None:
                self._disarm_idle()

    def _arm_idle(self, timeout: float) -> None:
        """Start the receive timeout: fail after ``timeout`` s without data."""
        self._recv_timeout = timeout
        self._recv_since = self._loop.time()
        self._recv_timer = self._loop.call_at(self._recv_since + timeout, self._on_recv_timer)

    def _disarm_idle(self) -> None:
        if self._recv_timer is not None:
            self._recv_timer.cancel()
            self._recv_timer = None

    def _on_recv_timer(self) -> None:
        self._recv_timer = None
        if self._exc is not None:
            return
        deadline = max(self._last_data, self._recv_since) + self._recv_timeout
        if self._loop.time() + _TIMER_SLACK < deadline:
            self._recv_timer = self._loop.call_at(deadline, self._on_recv_timer)
            return
        self._fail(
            ConnTimeoutError(
                f"No data received from {self._peer} for {self._recv_timeout:g} seconds."
            )
        )

    def _report_lost(self) -> None:
        """Schedule the on_lost callback once, unless we closed the connection ourselves."""
        on_lost, self._on_lost = self._on_lost, None
        exc = self._exc
        if on_lost is None or exc is None or self._closed_locally:
            return
        self._loop.call_soon(on_lost, exc)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    # ------------------------------------------------------------------
    # Sending

    def send_frame(
        self,
        nv: NV,
        payload: bytes | bytearray | memoryview | None = None,
        version: int = HAST_PROTO_VERSION,
    ) -> None:
        """Queue one frame for sending (never blocks; see :meth:`drain`).

        ``nv`` must already carry ``size`` for a payload (ValueError from
        encode_frame otherwise).  The payload is not copied when it can be
        avoided, so it must not be modified afterwards.  Raises
        ConnClosedError (or the ConnError that ended the connection) if the
        connection is no longer usable.
        """
        self._check_send()
        self._send_buffers(encode_frame(nv, payload, version))

    def send_encoded(self, head: bytes, payload: bytes | memoryview | None = None) -> None:
        """Queue one frame that the caller has encoded: :meth:`send_frame` without the nv.

        ``head`` is the frame header and nv list (the first buffer of
        ``encode_frame``; :func:`~pyhast.wire.messages.encode_request` and
        :func:`~pyhast.wire.messages.encode_reply` make it with one ``struct``
        call), ``payload`` the non-empty payload its ``size`` announces, or
        None.  Not checked here: the encoders guarantee it.  Same batching,
        ordering and errors as :meth:`send_frame`.
        """
        self._check_send()
        self._send_buffers([head] if payload is None else [head, payload])

    def _send_buffers(self, buffers: list[bytes | memoryview]) -> None:
        """Write one encoded frame now, or collect it (handler batch, coalescing)."""
        pending = self._pending
        if pending is not None:
            pending.extend(buffers)
            return
        batch: list[FramedConn] | None = _handler_batch.conns
        if batch is not None:
            self._pending = buffers
            batch.append(self)
            return
        if self.coalesce:
            # Frames sent during this loop iteration go out in one write.
            self._pending = buffers
            self._loop.call_soon(self._flush_pending)
            return
        transport = self._transport
        assert transport is not None
        if _WRITELINES_ZERO_COPY:  # pragma: no cover - Python 3.12+
            transport.writelines(buffers)
            self._written += sum(_payload_len(b) for b in buffers)
            return
        if len(buffers) == 1:
            head = buffers[0]
            self._emit(head)
            self._written += len(head)
            return
        head, body = buffers
        size = _payload_len(body)
        if size <= _COALESCE_LIMIT:
            self._emit(b"".join(buffers))
        else:
            self._emit_many(buffers)
        self._written += len(head) + size

    def _emit(self, buf: bytes | bytearray | memoryview) -> None:
        """Python 3.11: hand ``buf`` to the transport, or queue a view of it."""
        if not self._txq and not self._tx_blocked and _payload_len(buf) <= _COALESCE_LIMIT:
            transport = self._transport
            assert transport is not None
            transport.write(buf)  # the common case: nothing queued, a small piece
            return
        self._emit_many((buf,))

    def _emit_many(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        """Python 3.11: queue views of ``bufs`` and write what the socket takes."""
        txq = self._txq
        for buf in bufs:
            view = buf if isinstance(buf, memoryview) else memoryview(buf)
            txq.append(view)
            self._txq_bytes += view.nbytes
        self._tx_flush()

    def _tx_flush(self) -> None:
        """Python 3.11: the transport is empty: write what we queued."""
        transport = self._transport
        txq = self._txq
        fd = self._tx_fd
        while txq and not self._tx_blocked:
            if transport is None or transport.is_closing():
                self._txq_drop()
                break
            if fd >= 0:
                try:
                    sent = os.writev(fd, list(itertools.islice(txq, _TX_IOV)))
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    # The transport meets the same error and reports it.
                    sent = 0
                    fd = self._tx_fd = -1
                self._tx_consume(sent)
                if not txq:
                    break
                limit = _TX_HANDOFF if fd >= 0 else _TX_SLICE
            else:
                limit = _TX_SLICE
            # The kernel refused the rest (or no direct write): the transport
            # gets a small piece and resumes us once it has sent it.
            view = txq.popleft()
            self._txq_bytes -= view.nbytes
            piece, rest = view[:limit], view[limit:]
            if rest.nbytes:
                txq.appendleft(rest)
                self._txq_bytes += rest.nbytes
            transport.write(piece)

    def _tx_consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the front of the send queue."""
        txq = self._txq
        self._txq_bytes -= sent
        while sent:
            view = txq[0]
            if view.nbytes > sent:
                txq[0] = view[sent:]
                return
            sent -= view.nbytes
            txq.popleft()

    def _txq_drop(self) -> None:
        self._txq.clear()
        self._txq_bytes = 0

    def _flush_pending(self) -> None:
        """Write the frames sent while frame handlers ran (see the module docstring)."""
        buffers = self._pending
        if buffers is None:
            return
        self._pending = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # aborted meanwhile; the error surfaces on the next operation
        if _WRITELINES_ZERO_COPY:  # pragma: no cover - Python 3.12+
            transport.writelines(buffers)
            self._written += sum(_payload_len(b) for b in buffers)
            return
        # Python 3.11: small buffers are joined, large payloads written as
        # they are, all of it with as few writes as the socket allows.
        pieces: list[bytes | memoryview] = []
        chunk: list[bytes | memoryview] = []
        for buf in buffers:
            size = _payload_len(buf)
            self._written += size
            if size <= _COALESCE_LIMIT:
                chunk.append(buf)
                continue
            if chunk:
                pieces.append(b"".join(chunk) if len(chunk) > 1 else chunk[0])
                chunk = []
            pieces.append(buf)
        if chunk:
            pieces.append(b"".join(chunk) if len(chunk) > 1 else chunk[0])
        if len(pieces) == 1:
            self._emit(pieces[0])
        else:
            self._emit_many(pieces)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the send buffer is below its low-water mark.

        Returns at once when it is not above the high-water mark.  If for
        ``timeout`` seconds not a single byte can be handed to the kernel
        (the peer stopped reading), the connection is aborted and
        ConnTimeoutError raised.  Several tasks may drain at once.
        """
        self._check_send()
        if not self._must_drain():
            return
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._drain_waiters.append(waiter)
        handle: asyncio.TimerHandle | None = None
        if timeout is not None:
            step = max(timeout / 4, 0.001)
            last_sent = self._sent_bytes()
            last_progress = loop.time()

            def check() -> None:
                nonlocal handle, last_sent, last_progress
                handle = None
                if waiter.done():
                    return
                now = loop.time()
                sent = self._sent_bytes()
                if sent != last_sent:
                    last_sent, last_progress = sent, now
                elif now + _TIMER_SLACK >= last_progress + timeout:
                    self._fail(
                        ConnTimeoutError(
                            f"Unable to send data to {self._peer} for {timeout:g} seconds."
                        )
                    )
                    return
                handle = loop.call_at(min(now + step, last_progress + timeout), check)

            handle = loop.call_later(step, check)
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            with contextlib.suppress(ValueError):
                self._drain_waiters.remove(waiter)
        self._check_send()

    def _sent_bytes(self) -> int:
        return self._written - self._buffered()

    def _must_drain(self) -> bool:
        if _WRITELINES_ZERO_COPY:  # pragma: no cover - Python 3.12+
            return self._writing_paused
        return self._buffered() > self._write_limits[0]

    def _check_send(self) -> None:
        exc = self._exc
        if exc is not None:
            if isinstance(exc, ConnError):
                raise exc
            raise ConnClosedError(f"The connection with {self._peer} was closed after an error.")
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnClosedError(f"The connection with {self._peer} is closing.")

    # ------------------------------------------------------------------
    # Closing

    def close(self) -> None:
        """Close: queued frames are dropped, data not yet sent is still flushed.

        Pending and later operations raise ConnClosedError.  Idempotent.
        """
        self._flush_pending()
        transport = self._transport
        if transport is not None and self._txq and not transport.is_closing():
            # Closing flushes what the transport holds: hand it the rest.
            for view in self._txq:
                transport.write(view)
        self._txq_drop()
        self._close_locally()
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Close at once, discarding data not yet sent.  Idempotent."""
        self._pending = None
        self._txq_drop()
        self._close_locally()
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self, linger: float = 1.0) -> None:
        """close(), wait up to ``linger`` seconds for the flush, then abort()."""
        self.close()
        try:
            async with asyncio.timeout(linger):
                await self.wait_closed()
        except TimeoutError:
            self.abort()
            await self.wait_closed()

    def is_closing(self) -> bool:
        """True once the connection is closed, closing or has failed."""
        transport = self._transport
        return self._exc is not None or transport is None or transport.is_closing()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (after close(), abort() or a failure)."""
        await asyncio.shield(self._lost)

    async def __aenter__(self) -> FramedConn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.aclose()

    def _close_locally(self) -> None:
        if self._closed_locally:
            return
        self._closed_locally = True
        self._exc = ConnClosedError(f"The connection with {self._peer} was closed.")
        self._frames.clear()
        self._queued = 0
        self._wake_all()

    def _set_error(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc

    def _fail(self, exc: BaseException) -> None:
        """End the connection because of ``exc`` (which receivers will see)."""
        self._pending = None
        self._txq_drop()
        self._set_error(exc)
        if self._transport is not None:
            self._transport.abort()
        self._wake_all()

    def _wake_all(self) -> None:
        self._disarm_idle()
        self._report_lost()
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------
    # asyncio.BufferedProtocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if _WRITELINES_ZERO_COPY:  # pragma: no cover - Python 3.12+
            high, low = self._write_limits
            transport.set_write_buffer_limits(high=high, low=low)
        else:
            # Paused as soon as it holds a byte; resumed once it is empty.
            transport.set_write_buffer_limits(high=0, low=0)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self._tx_fd = sock.fileno()
        self._last_data = self._loop.time()

    def get_buffer(self, sizehint: int) -> memoryview:
        # A large payload is read straight into its own buffer (no copy);
        # headers, nv lists and small payloads go through the read buffer.
        window = self._decoder.payload_window(_DIRECT_READ_MIN)
        if window is not None:
            self._direct = True
            return window
        self._direct = False
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self._last_data = self._loop.time()
        if self._exc is not None:
            return  # aborted; the transport may still deliver one read
        if self._handler is not None and _handler_batch.conns is None:
            # Frames sent by the handlers (on any connection) are written
            # once this read is processed: one write per connection per read.
            batch: list[FramedConn] = []
            _handler_batch.conns = batch
            try:
                self._process(nbytes)
            finally:
                _handler_batch.conns = None
                for conn in batch:
                    conn._flush_pending()
        else:
            self._process(nbytes)

    def _process(self, nbytes: int) -> None:
        decoder = self._decoder
        frames = self._frames
        queued = False
        try:
            if self._direct:
                self._direct = False
                decoder.payload_filled(nbytes)
            else:
                decoder.feed(self._rview[:nbytes])
            handler = self._handler
            while True:
                frame = decoder.next_frame()
                if frame is NEED_DATA:
                    break
                if handler is not None:
                    handler(frame)
                    handler = self._handler
                else:
                    frames.append(frame)
                    self._queued += _frame_cost(frame)
                    queued = True
        except Exception as exc:  # ProtocolError, or whatever the handler raised
            self._fail(exc)
            return
        if queued:
            waiter = self._recv_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._queued > self._max_queued and not self._reading_paused:
                self._reading_paused = True
                assert self._transport is not None
                self._transport.pause_reading()

    def eof_received(self) -> bool:
        if self._decoder.at_frame_boundary:
            self._set_error(ConnEOFError(f"{self._peer} closed the connection."))
        else:
            self._set_error(
                ConnBrokenError(f"{self._peer} closed the connection in the middle of a frame.")
            )
        self._wake_all()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._set_error(ConnClosedError(f"The connection with {self._peer} was closed."))
        elif isinstance(exc, OSError):
            self._set_error(
                ConnBrokenError.from_oserror(exc, f"Connection with {self._peer} failed")
            )
        else:
            error = ConnBrokenError(f"Connection with {self._peer} failed: {exc}")
            error.__cause__ = exc
            self._set_error(error)
        self._wake_all()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._tx_blocked = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._tx_blocked = False
        if not _WRITELINES_ZERO_COPY:
            self._tx_flush()
            if self._buffered() > self._write_limits[1]:
                return
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def __repr__(self) -> str:
        state = "open" if self._exc is None else type(self._exc).__name__
        return f"<FramedConn {self._peer} {state}>"


async def open_framed(
    sock: socket.socket,
    *,
    peer: str | None = None,
    max_version: int = HAST_PROTO_VERSION,
    max_nv_size: int = DEFAULT_MAX_NV_SIZE,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> FramedConn:
    """:meth:`FramedConn.open` with the default buffer sizes."""
    return await FramedConn.open(
        sock, peer=peer, max_version=max_version, max_nv_size=max_nv_size, max_payload=max_payload
    )


def _describe_peer(sock: socket.socket) -> str:
    try:
        return base.transport_for_socket(sock).peer_address(sock)
    except (OSError, ValueError):
        return "<unknown peer>"


# --------------------------------------------------------------------------
# Socket set-up without blocking the loop


async def wait_ready(sock: socket.socket, *, write: bool) -> None:
    """Wait until ``sock`` is readable (or writable if ``write``).

    The socket must not be owned by an asyncio transport; one waiter per
    direction at a time.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def wait_connected(sock: socket.socket, timeout: float | None) -> None:
    """:func:`~pyhast.transport.base.connect_wait` without blocking the loop.

    For a socket whose connection was started elsewhere (the parent, before
    passing the descriptor).  Raises TimeoutError (ETIMEDOUT) or the
    connection's OSError.
    """
    try:
        async with asyncio.timeout(timeout):
            await wait_ready(sock, write=True)
    except TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out") from None
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
    sock.getpeername()  # ENOTCONN if no connect() was ever started


async def connect(
    address: str, *, source: str | None = None, timeout: float | None
) -> socket.socket:
    """A socket connected to ``address`` (bound to ``source``) within ``timeout`` seconds.

    The socket is left non-blocking, ready for :meth:`FramedConn.open`.
    Name resolution (numeric addresses need none) is done synchronously.
    """
    sock = base.client(address, source)
    try:
        sock.setblocking(False)
        if not base.connect_start(sock, address):
            await wait_connected(sock, timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def accept(listener: socket.socket, timeout: float | None) -> tuple[socket.socket, str]:
    """:func:`~pyhast.transport.base.accept` without blocking the loop.

    The listener is made non-blocking; the accepted socket is returned
    blocking with TCP_NODELAY set, with its peer address string.
    """
    transport = base.transport_for_socket(listener)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            sock, _ = await loop.sock_accept(listener)
    except TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, "No connection to accept in time") from None
    try:
        sock.setblocking(True)
        transport.prepare_accepted(sock)
        return sock, transport.peer_address(sock)
    except BaseException:
        sock.close()
        raise
