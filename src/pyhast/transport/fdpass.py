"""Passing descriptors over UNIX sockets (SCM_RIGHTS), blocking and asyncio.

hastd's parent opens the replication connections for the primary worker and
hands over the descriptors on the ``conn`` socketpair; the secondary's parent
does the same with the two accepted connections (spec 3.3, 6.1).

Rules
=====

* Descriptors travel with at least one byte of ordinary data, attached to
  the *first* byte of what :func:`send_fds` sends.  A receiver must not read
  past a message boundary expecting descriptors to come later, which is why
  :func:`recv_frame_fds` reads exactly one frame, stage by stage.
* The sender keeps its descriptors: they are duplicated into the receiver, so
  close yours after sending if you are done with them.
* The receiver owns what it gets.  Descriptors are received close-on-exec
  (``MSG_CMSG_CLOEXEC``), so a hook started later does not inherit them.
  Descriptors beyond ``maxfds`` are closed (the kernel already discards what
  does not fit in the control buffer; anything that still gets through is
  closed here), and every function closes what it received before raising,
  so no path leaks a descriptor.

asyncio
=======

``loop.sock_*`` has no descriptor passing, so the asyncio variants wait for
readiness with ``loop.add_reader``/``add_writer`` and then call the same
non-blocking ``recvmsg``/``sendmsg`` as the blocking versions.  We do not run
the blocking call in a thread: a thread stuck in ``recvmsg`` cannot be
cancelled (a worker shutting down would have to close the socket under it),
and a cancellation racing with a completed receive in the thread would lose
the received descriptors.  With readiness callbacks, ``recvmsg`` runs in the
task itself and its result is returned with no ``await`` in between, so a
cancelled receive never has descriptors in flight.  The socket must be
non-blocking and not owned by an asyncio transport, and only one task may
receive (or send) on it at a time, as with ``loop.sock_recv``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence

from pyhast.defaults import HAST_PROTO_VERSION
from pyhast.transport.aio import wait_ready
from pyhast.transport.base import ConnBrokenError, ConnEOFError, ConnTimeoutError
from pyhast.wire.frame import (
    DEFAULT_MAX_NV_SIZE,
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    Frame,
    decode_header,
    encode_frame,
    payload_size,
)
from pyhast.wire.nv import NV

__all__ = [
    "close_fds",
    "recv_fds",
    "recv_fds_async",
    "recv_frame_fds",
    "recv_frame_fds_async",
    "send_fds",
    "send_fds_async",
    "send_frame_fds",
    "send_frame_fds_async",
]

_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_FD_SIZE = array.array("i").itemsize


def close_fds(fds: Sequence[int]) -> None:
    """Close every descriptor in ``fds``, ignoring errors (cleanup paths)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _sendmsg(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int]) -> int:
    if not len(data):
        raise ValueError("Descriptors must be sent with at least one byte of data.")
    if not fds:
        return sock.sendmsg([data])
    return socket.send_fds(sock, [data], list(fds))


def send_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send all of ``data`` with ``fds`` attached to its first byte.

    Blocks according to the socket's mode and timeouts; OSErrors propagate
    with their errno.  The caller keeps (and eventually closes) ``fds``.
    """
    sent = _sendmsg(sock, data, fds)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: up to ``bufsize`` bytes and up to ``maxfds`` descriptors.

    Returns ``(b"", [])`` at EOF.  Surplus descriptors are closed; the ones
    returned belong to the caller and are close-on-exec.  On a non-blocking
    socket with nothing to read this raises BlockingIOError, like ``recv``.

    (``socket.recv_fds`` would do, but it ignores its ``flags`` argument, so
    it cannot ask for ``MSG_CMSG_CLOEXEC``.)
    """
    data, ancdata, _flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_SPACE(max(maxfds, 1) * _FD_SIZE), _RECV_FLAGS
    )
    fds = array.array("i")
    for level, kind, cmsg in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cmsg[: len(cmsg) - len(cmsg) % _FD_SIZE])
    received = fds.tolist()
    if not _RECV_FLAGS:  # pragma: no cover - platforms without MSG_CMSG_CLOEXEC
        for fd in received:
            os.set_inheritable(fd, False)
    close_fds(received[maxfds:])
    return data, received[:maxfds]


async def send_fds_async(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """:func:`send_fds` for a non-blocking socket, waiting with the running loop."""
    _check_nonblocking(sock)
    while True:
        try:
            sent = _sendmsg(sock, data, fds)
            break
        except (BlockingIOError, InterruptedError):
            await wait_ready(sock, write=True)
    if sent < len(data):
        # The descriptors went with the first chunk; the rest is plain data.
        await asyncio.get_running_loop().sock_sendall(sock, memoryview(data)[sent:])


async def recv_fds_async(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """:func:`recv_fds` for a non-blocking socket, waiting with the running loop.

    Cancellation-safe: if the call is cancelled, no descriptor was received.
    """
    _check_nonblocking(sock)
    while True:
        try:
            return recv_fds(sock, bufsize, maxfds)
        except (BlockingIOError, InterruptedError):
            await wait_ready(sock, write=False)


def _check_nonblocking(sock: socket.socket) -> None:
    if sock.gettimeout() != 0.0:
        raise ValueError("The socket must be non-blocking (sock.setblocking(False)).")


# --------------------------------------------------------------------------
# One frame with descriptors (the conn channel: "{error: int16}" + a socket)


def send_frame_fds(
    sock: socket.socket,
    nv: NV,
    fds: Sequence[int] = (),
    payload: bytes | None = None,
    version: int = HAST_PROTO_VERSION,
) -> None:
    """Send one frame with ``fds`` attached (blocking); OSErrors propagate."""
    send_fds(sock, _frame_bytes(nv, payload, version), fds)


async def send_frame_fds_async(
    sock: socket.socket,
    nv: NV,
    fds: Sequence[int] = (),
    payload: bytes | None = None,
    version: int = HAST_PROTO_VERSION,
) -> None:
    """:func:`send_frame_fds` for a non-blocking socket."""
    await send_fds_async(sock, _frame_bytes(nv, payload, version), fds)


def _frame_bytes(nv: NV, payload: bytes | None, version: int) -> bytes:
    # Messages with descriptors are tiny; one buffer keeps the descriptors on
    # the frame's first byte.
    return b"".join(encode_frame(nv, payload, version))


class _FrameReader:
    """Collects one frame and its descriptors from exact-size reads."""

    def __init__(self, maxfds: int, max_nv_size: int, max_payload: int) -> None:
        self.maxfds = maxfds
        self.max_nv_size = max_nv_size
        self.max_payload = max_payload
        self.fds: list[int] = []
        self._buf = bytearray()
        self._stage_size = HEADER_SIZE
        self._stage = 0  # 0 header, 1 nv, 2 payload
        self._version = 0
        self._nv: NV | None = None
        self.frame: Frame | None = None

    def want(self) -> int:
        """Bytes still needed by the current stage (0 when the frame is complete)."""
        return 0 if self.frame is not None else self._stage_size - len(self._buf)

    def add(self, data: bytes, fds: list[int]) -> None:
        room = self.maxfds - len(self.fds)
        self.fds.extend(fds[:room])
        close_fds(fds[room:])
        if not data:
            if self._stage == 0 and not self._buf:
                raise ConnEOFError("Connection closed by the peer.")
            raise ConnBrokenError("Connection closed by the peer in the middle of a frame.")
        self._buf += data
        if len(self._buf) < self._stage_size:
            return
        if self._stage == 0:
            self._version, nvsize = decode_header(
                self._buf, max_version=HAST_PROTO_VERSION, max_nv_size=self.max_nv_size
            )
            self._stage, self._stage_size = 1, nvsize
        elif self._stage == 1:
            nv = NV.decode(self._buf)
            size = payload_size(nv, self.max_payload)
            if size == 0:
                self.frame = Frame(self._version, nv, None)
                return
            self._nv = nv
            self._stage, self._stage_size = 2, size
        else:
            assert self._nv is not None
            self.frame = Frame(self._version, self._nv, memoryview(bytes(self._buf)))
            return
        self._buf = bytearray()


def recv_frame_fds(
    sock: socket.socket,
    maxfds: int = 1,
    *,
    max_nv_size: int = DEFAULT_MAX_NV_SIZE,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> tuple[Frame, list[int]]:
    """Receive exactly one frame and the descriptors sent with it (blocking).

    Raises ConnEOFError (EOF before the frame), ConnBrokenError (EOF inside
    it, or an OSError as cause), ConnTimeoutError (the socket's timeout or
    SO_RCVTIMEO expired) or ProtocolError; the descriptors received so far
    are closed first.
    """
    reader = _FrameReader(maxfds, max_nv_size, max_payload)
    try:
        while want := reader.want():
            try:
                data, fds = recv_fds(sock, want, maxfds - len(reader.fds))
            except (BlockingIOError, TimeoutError):
                # SO_RCVTIMEO on a blocking socket (EAGAIN) or Python's timeout.
                raise ConnTimeoutError("Timed out receiving a frame.") from None
            except OSError as exc:
                raise ConnBrokenError.from_oserror(exc, "Receiving a frame failed") from exc
            reader.add(data, fds)
    except BaseException:
        close_fds(reader.fds)
        raise
    assert reader.frame is not None
    return reader.frame, reader.fds


async def recv_frame_fds_async(
    sock: socket.socket,
    maxfds: int = 1,
    *,
    max_nv_size: int = DEFAULT_MAX_NV_SIZE,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> tuple[Frame, list[int]]:
    """:func:`recv_frame_fds` for a non-blocking socket.

    Bound it with ``asyncio.timeout()``; a cancelled call closes the
    descriptors it had already received (the partial frame is lost, so the
    channel should be considered broken).
    """
    reader = _FrameReader(maxfds, max_nv_size, max_payload)
    try:
        while want := reader.want():
            try:
                data, fds = await recv_fds_async(sock, want, maxfds - len(reader.fds))
            except OSError as exc:
                raise ConnBrokenError.from_oserror(exc, "Receiving a frame failed") from exc
            reader.add(data, fds)
    except BaseException:
        close_fds(reader.fds)
        raise
    assert reader.frame is not None
    return reader.frame, reader.fds
