"""asyncio NBD server: the front door of a primary's replicated device.

:class:`NBDServer` serves named exports (export name = provider name) over a
unix socket and/or TCP.  All protocol logic lives in the sans-IO
:mod:`pyhast.frontend.nbd.protocol`; this module only moves bytes, runs
requests against a :class:`~pyhast.frontend.nbd.backend.BlockBackend` and
writes replies.

Per connection (``_Connection``, an ``asyncio.BufferedProtocol``):

* The socket is read straight into the decoder's buffer (or into a large
  WRITE's own buffer), and every complete request in it is parsed in one go.
* Each request runs as its own coroutine.  It is started *eagerly*: if the
  backend call completes without suspending (the file backend's page-cache
  reads and writes do), the reply is produced with no task at all; if it
  suspends, the rest runs as an asyncio task (the idea of Python 3.12's
  eager task factory).  So many requests are in flight and replies go out in
  completion order.
* Replies are collected and written with one ``transport.write`` per loop
  iteration (at the end of each receive, or from one ``call_soon`` callback
  for replies of suspended requests).
* Backpressure: at most ``max_inflight`` requests (and about
  ``max_inflight_bytes`` of payload) are in flight; beyond that the server
  stops parsing and pauses reading.  It also pauses reading while the
  transport's write buffer is over its high-water mark.
* FLUSH calls ``backend.flush()`` as soon as it is received.  A write is
  acknowledged only after ``backend.write()`` returned, and the backend
  contract says flush covers every write that had returned, so every write
  acknowledged before the FLUSH was received is durable when it is answered.
  FUA is passed down as ``fua=True``.
* Anything that requires a hard disconnect (bad magic, hostile lengths,
  unknown export with NBD_OPT_EXPORT_NAME, a client leaving mid-request)
  loses only that connection and is logged as one WARNING sentence.

Lifecycle messages go to DEBUG; an unexpected backend exception is logged
once with its traceback and answered with EIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Mapping
from urllib.parse import quote

from pyhast.errors import ProtocolError
from pyhast.frontend.eager import start_eager
from pyhast.frontend.nbd.backend import BlockBackend
from pyhast.frontend.nbd.protocol import (
    NEED_DATA,
    Cmd,
    CmdFlag,
    ExportInfo,
    HandshakeAborted,
    HandshakeComplete,
    OptionHandled,
    Request,
    RequestDecoder,
    ServerHandshake,
    encode_simple_reply,
    nbd_error,
    validate_request,
)

__all__ = ["NBDServer"]

log = logging.getLogger(__name__)

#: Default limit of requests in flight on one connection.
MAX_INFLIGHT = 128
#: Default limit of payload bytes (reads and writes) in flight on one connection.
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
#: Requests parsed per batch before the limits are checked again.
_BATCH = 32
#: Reply pieces at least this large are written without joining.
_LARGE_REPLY = 64 * 1024
#: Seconds close() waits for a connection to drain before aborting it.
CLOSE_TIMEOUT = 10.0

_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)
_FLUSH = int(Cmd.FLUSH)
_TRIM = int(Cmd.TRIM)
_WRITE_ZEROES = int(Cmd.WRITE_ZEROES)
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: handshake, then transmission."""

    _ids = itertools.count(1)

    def __init__(self, server: NBDServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._id = next(self._ids)
        self._name = f"NBD connection #{self._id}"
        self._transport: asyncio.Transport | None = None
        self._handshake: ServerHandshake | None = ServerHandshake(
            server.export_infos, server.default_export
        )
        self._scratch = bytearray(16 * 1024)
        self._handshake_bytes = 0
        self._decoder: RequestDecoder | None = None
        self._export: ExportInfo | None = None
        self._backend: BlockBackend | None = None
        self._max_inflight = server.max_inflight
        self._max_inflight_bytes = server.max_inflight_bytes
        self._inflight = 0
        self._inflight_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes | bytearray | memoryview] = []
        self._flush_pending = False
        self._processing = False
        self._process_pending = False
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False  # no more requests will be read
        self._lost = False
        self._closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio.BufferedProtocol -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self._name += f" from {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f" ({peer})"
        self._server._connections.add(self)
        log.debug("%s: accepted.", self._name)
        assert self._handshake is not None
        transport.write(self._handshake.data_to_send())
        if self._server.closing:
            self.shutdown()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._decoder is not None:
            return self._decoder.get_buffer(sizehint)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._decoder is not None:
            self._decoder.buffer_updated(nbytes)
            self._process()
        elif self._handshake is not None:
            self._handshake_bytes += nbytes
            self._handshake.receive_data(memoryview(self._scratch)[:nbytes])
            self._negotiate()

    def eof_received(self) -> bool:
        if self._decoder is None:
            if self._handshake is None:
                pass  # after NBD_OPT_ABORT, or dropped
            elif self._handshake_bytes:
                log.warning("%s: client disconnected during the handshake.", self._name)
            else:
                log.debug("%s: client closed the connection without a word.", self._name)
            return False
        if not self._decoder.at_boundary:
            log.warning(
                "%s: client disconnected mid-request (%d bytes of a request unread).",
                self._name,
                self._decoder.buffered,
            )
        elif self._inflight and not self._closing:
            log.warning(
                "%s: client disconnected with %d requests in flight.", self._name, self._inflight
            )
        elif not self._closing:
            log.debug("%s: client closed the connection without NBD_CMD_DISC.", self._name)
        self._begin_close()
        return True  # keep the write side open until in-flight requests are answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        self._out.clear()
        self._server._connections.discard(self)
        if exc is not None and not isinstance(exc, ConnectionError):
            log.warning("%s: connection failed: %s.", self._name, exc)
        log.debug("%s: closed.", self._name)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._process()

    # -- handshake ----------------------------------------------------------

    def _negotiate(self) -> None:
        hs = self._handshake
        transport = self._transport
        assert hs is not None and transport is not None
        try:
            while True:
                event = hs.next_event()
                out = hs.data_to_send()
                if out:
                    transport.write(out)
                if event is NEED_DATA:
                    return
                if isinstance(event, OptionHandled):
                    log.debug(
                        "%s: answered option %d with reply 0x%x.",
                        self._name,
                        event.option,
                        event.reply,
                    )
                elif isinstance(event, HandshakeComplete):
                    self._start_transmission(event)
                    return
                elif isinstance(event, HandshakeAborted):
                    log.debug("%s: client aborted the handshake.", self._name)
                    self._handshake = None
                    transport.close()
                    return
        except ProtocolError as exc:
            self._drop(str(exc))

    def _start_transmission(self, event: HandshakeComplete) -> None:
        export = event.export
        self._handshake = None
        self._scratch = bytearray()
        self._export = export
        self._backend = self._server.exports[export.name]
        self._decoder = RequestDecoder()
        log.debug(
            "%s: transmission on export %r (size %d, flags 0x%x).",
            self._name,
            export.name,
            export.size,
            export.flags,
        )
        if event.trailing_data:
            self._decoder.feed(event.trailing_data)
            self._process()

    # -- transmission -------------------------------------------------------

    def _process(self) -> None:
        """Parse and start every buffered request the limits allow."""
        decoder = self._decoder
        if decoder is None or self._processing:
            return
        self._processing = True
        try:
            while (
                not self._closing
                and not self._writing_paused
                and self._inflight < self._max_inflight
                and self._inflight_bytes < self._max_inflight_bytes
            ):
                try:
                    requests = decoder.read_requests(
                        min(self._max_inflight - self._inflight, _BATCH),
                        self._max_inflight_bytes - self._inflight_bytes,
                    )
                except ProtocolError as exc:
                    self._drop(str(exc))
                    return
                if not requests:
                    break
                for req in requests:
                    if self._closing:  # NBD_CMD_DISC: nothing may follow it
                        break
                    self._dispatch(req)
        finally:
            self._processing = False
        self._update_reading()
        if self._out:
            self._flush_out()

    def _dispatch(self, req: Request) -> None:
        if req.type == _DISC:
            log.debug("%s: client sent NBD_CMD_DISC.", self._name)
            self._begin_close()
            return
        assert self._export is not None
        err = validate_request(req, self._export)
        if err:
            log.debug(
                "%s: invalid request (type %d, offset %d, length %d): %s.",
                self._name,
                req.type,
                req.offset,
                req.length,
                os.strerror(err),
            )
            self._reply(req.cookie, nbd_error(err), None)
            return
        nbytes = req.length if req.type == _READ or req.type == _WRITE else 0
        self._inflight += 1
        self._inflight_bytes += nbytes
        start_eager(self._loop, self._execute(req, nbytes), self._tasks)

    async def _execute(self, req: Request, nbytes: int) -> None:
        """Run one validated request on the backend and queue its reply."""
        backend = self._backend
        assert backend is not None
        cmd = req.type
        data: bytes | bytearray | memoryview | None = None
        try:
            try:
                if cmd == _READ:
                    data = await backend.read(req.offset, req.length)
                    if len(data) != req.length:
                        raise OSError(errno.EIO, f"backend returned {len(data)} bytes")
                elif cmd == _WRITE:
                    assert req.data is not None
                    await backend.write(req.offset, req.data, bool(req.flags & _FUA))
                elif cmd == _FLUSH:
                    await backend.flush()
                elif cmd == _TRIM:
                    await backend.trim(req.offset, req.length, bool(req.flags & _FUA))
                else:  # WRITE_ZEROES (validate_request let nothing else through)
                    await backend.write_zeroes(
                        req.offset,
                        req.length,
                        bool(req.flags & _FUA),
                        not req.flags & _NO_HOLE,
                    )
                error = 0
            except OSError as exc:
                error = nbd_error(exc.errno)
                data = None
                log.debug("%s: request type %d failed: %s.", self._name, cmd, exc)
            except Exception:
                log.exception(
                    "%s: backend failed unexpectedly on request type %d.", self._name, cmd
                )
                error = nbd_error(errno.EIO)
                data = None
            self._reply(req.cookie, error, data)
        finally:  # (also when cancelled at loop shutdown: no reply then)
            self._request_done(nbytes)

    def _reply(self, cookie: int, error: int, data: bytes | bytearray | memoryview | None) -> None:
        if self._lost:
            return
        out = self._out
        out.append(encode_simple_reply(error, cookie))
        if data is not None:
            out.append(data)
        if not self._flush_pending and not self._processing:
            self._flush_pending = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        """Write every queued reply: small pieces joined, large ones as they are."""
        self._flush_pending = False
        out = self._out
        transport = self._transport
        if not out or transport is None or self._lost:
            out.clear()
            return
        if len(out) == 1:
            transport.write(out[0])
        else:
            # One write per run of small pieces; a large READ payload is
            # handed over without first being copied into a joined buffer.
            small: list[bytes | bytearray | memoryview] = []
            for piece in out:
                if len(piece) < _LARGE_REPLY:
                    small.append(piece)
                    continue
                if small:
                    transport.write(b"".join(small))
                    small.clear()
                transport.write(piece)
            if small:
                transport.write(b"".join(small) if len(small) > 1 else small[0])
        out.clear()

    def _request_done(self, nbytes: int) -> None:
        self._inflight -= 1
        self._inflight_bytes -= nbytes
        if self._processing:
            return
        if self._closing:
            if self._inflight == 0:
                self._close_when_idle()
        elif self._reading_paused and not self._process_pending:
            # Parsing stopped at a limit: resume once per loop iteration, so
            # that the replies of every request completing now go out in one
            # write (they are flushed by _process or the pending _flush_out).
            self._process_pending = True
            self._loop.call_soon(self._resume_processing)

    def _resume_processing(self) -> None:
        self._process_pending = False
        self._process()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._lost:
            return
        pause = (
            self._closing
            or self._writing_paused
            or self._inflight >= self._max_inflight
            or self._inflight_bytes >= self._max_inflight_bytes
        )
        if pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    # -- closing ------------------------------------------------------------

    def _begin_close(self) -> None:
        """Read no more; close once every in-flight request is answered."""
        self._closing = True
        self._update_reading()
        if self._inflight == 0:
            self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self._out:
            self._flush_out()
        if self._transport is not None and not self._lost:
            self._transport.close()

    def _drop(self, reason: str) -> None:
        """Hard disconnect after a protocol violation."""
        log.warning("%s: dropping the connection: %s", self._name, reason)
        self._closing = True
        self._out.clear()
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        """Server shutdown: stop reading, answer in-flight requests, close."""
        if self._decoder is None:
            self._handshake = None
            if self._transport is not None:
                self._transport.close()
            return
        self._begin_close()

    async def wait_closed(self, timeout: float) -> None:
        """Wait until in-flight requests finished and the socket is closed."""
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except TimeoutError:
            log.warning("%s: did not drain in %.0f s; aborting it.", self._name, timeout)
            if self._transport is not None:
                self._transport.abort()
            await self._closed
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class NBDServer:
    """Serve ``exports`` (name -> backend) over NBD.

    ``unix_path`` and/or ``tcp=(host, port)`` choose the listeners (port 0
    picks a free port; see :attr:`tcp_address`).  The empty export name
    selects the only export when there is exactly one.  ``descriptions``
    optionally gives a human-readable description per export (shown by
    NBD_OPT_LIST and NBD_INFO_DESCRIPTION).

    Use ``await start()`` ... ``await close()``, or ``async with``.  The
    backends are not closed by the server: their owner closes them.
    """

    def __init__(
        self,
        exports: Mapping[str, BlockBackend],
        *,
        unix_path: str | os.PathLike[str] | None = None,
        tcp: tuple[str, int] | None = None,
        descriptions: Mapping[str, str] | None = None,
        max_inflight: int = MAX_INFLIGHT,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        if not exports:
            raise ValueError("NBDServer needs at least one export.")
        if unix_path is None and tcp is None:
            raise ValueError("NBDServer needs a unix socket path or a TCP address.")
        if max_inflight < 1 or max_inflight_bytes < 1:
            raise ValueError("In-flight limits must be positive.")
        descriptions = descriptions or {}
        self.exports: dict[str, BlockBackend] = dict(exports)
        self.export_infos: dict[str, ExportInfo] = {
            name: ExportInfo(
                name=name,
                size=backend.size,
                read_only=backend.read_only,
                can_multi_conn=backend.can_multi_conn,
                block_size=backend.block_size,
                description=descriptions.get(name, ""),
            )
            for name, backend in self.exports.items()
        }
        self.default_export: str | None = (
            next(iter(self.exports)) if len(self.exports) == 1 else None
        )
        self.unix_path = os.fspath(unix_path) if unix_path is not None else None
        self._tcp = tcp
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.close_timeout = close_timeout
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._tcp_address: tuple[str, int] | None = None

    async def start(self) -> None:
        """Start listening (returns once the sockets accept connections)."""
        if self._servers:
            raise RuntimeError("NBDServer is already started.")
        loop = asyncio.get_running_loop()
        try:
            if self.unix_path is not None:
                srv = await loop.create_unix_server(
                    lambda: _Connection(self), self.unix_path, backlog=128
                )
                self._servers.append(srv)
            if self._tcp is not None:
                host, port = self._tcp
                srv = await loop.create_server(
                    lambda: _Connection(self), host, port, backlog=128, reuse_address=True
                )
                self._servers.append(srv)
                sockname = srv.sockets[0].getsockname()
                self._tcp_address = (sockname[0], sockname[1])
        except BaseException:
            await self.close()
            raise
        log.debug(
            "NBD server listening on %s with exports %s.",
            ", ".join(filter(None, [self.unix_path, self._tcp_text()])),
            ", ".join(map(repr, self.exports)),
        )

    def _tcp_text(self) -> str | None:
        if self._tcp_address is None:
            return None
        return f"{self._tcp_address[0]}:{self._tcp_address[1]}"

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound (host, port), once started with TCP."""
        return self._tcp_address

    @property
    def connections(self) -> int:
        """Number of open client connections."""
        return len(self._connections)

    def uri(self, export: str = "", *, tcp: bool = False) -> str:
        """The NBD URI of ``export``: unix socket by default, TCP if asked or only."""
        path = quote(export, safe="")
        if tcp or self.unix_path is None:
            if self._tcp_address is None:
                raise RuntimeError("The server has no TCP listener (or is not started).")
            host, port = self._tcp_address
            if ":" in host:
                host = f"[{host}]"
            return f"nbd://{host}:{port}/{path}"
        return f"nbd+unix:///{path}?socket={quote(self.unix_path, safe='/')}"

    async def close(self) -> None:
        """Stop listening, answer in-flight requests, close every connection."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        conns = list(self._connections)
        for conn in conns:
            conn.shutdown()
        if conns:
            await asyncio.gather(*(c.wait_closed(self.close_timeout) for c in conns))
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if _is_socket(self.unix_path):
                    os.unlink(self.unix_path)
        log.debug("NBD server closed.")

    async def __aenter__(self) -> NBDServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.stat(path).st_mode)
