"""The transport interface: one set of socket operations, several implementations.

This is FreeBSD's ``proto.c``: a registry of transports, each claiming the
addresses it understands by their prefix, so that callers deal in address
strings (``tcp4://10.0.0.2:8457``, ``uds:///var/run/hastctl``) and never in
socket families.

Rules
=====

* **"Not my address" vs "mine, but it failed."**  A transport's
  :meth:`Transport.claims` only looks at the prefix (FreeBSD's ``-1``).  Once a
  transport has claimed an address, every problem is that transport's error:
  a malformed address raises ``ValueError`` with a sentence, a failing system
  call raises the ``OSError`` with its errno intact (``socket.gaierror`` for a
  name that does not resolve).  An address no transport claims raises
  ``ValueError("No transport handles the address ...")``.
* **Sockets are plain ``socket.socket`` objects**, blocking unless said
  otherwise, close-on-exec (Python's default).  Ownership stays with the
  caller: no function here closes a socket it did not create, and a function
  that fails after creating one closes it before raising.
* **Connecting is split in two** as in hastd (spec 6.1): the parent calls
  :func:`client` and :func:`connect_start` (a non-blocking ``connect()``),
  passes the descriptor to the primary worker, and the worker finishes with
  :func:`connect_wait` within ``timeout`` seconds.  :func:`connect` does both.
* **Timeouts are seconds** (float); ``None`` means "wait forever".  A timeout
  is reported as ``TimeoutError`` (an OSError with errno ETIMEDOUT), which is
  what hastd returns from an expired ``SO_RCVTIMEO``/connect.
* Blocking users (hastctl, the worker's handshake helpers) bound every send
  and receive with :func:`set_timeouts` (``SO_SNDTIMEO``/``SO_RCVTIMEO``);
  asyncio users get the same semantics from :mod:`pyhast.transport.aio`.

The built-in transports are :mod:`~pyhast.transport.tcp` and
:mod:`~pyhast.transport.uds`; they register themselves when imported, which
:func:`lookup` makes sure of.  :mod:`~pyhast.transport.socketpair` is not in
the registry: a socketpair has no address and is created in one call.

Connection errors
=================

The asyncio connection (:class:`~pyhast.transport.aio.FramedConn`) reports
failures with the classes below, after trio's taxonomy:

* :class:`ConnClosedError`: the connection is closed and it is nobody's fault:
  *we* closed it (trio's ClosedResourceError) or, as the subclass
  :class:`ConnEOFError`, the peer closed it cleanly between two frames.
* :class:`ConnBrokenError`: something external failed; the ``OSError`` is the
  ``__cause__`` and its errno is copied to :attr:`ConnBrokenError.errno`.
  :class:`ConnTimeoutError` is the subclass for an expired send or receive
  timeout (errno ETIMEDOUT).
* :class:`ConnBusyError`: two tasks used the same direction of a connection
  at once. That is a bug in the caller, so it is not a :class:`ConnError`.

Malformed data raises :class:`~pyhast.errors.ProtocolError` (from the frame
decoder), never one of these.
"""

from __future__ import annotations

import abc
import errno
import math
import os
import select
import socket
import struct
import time
import types
from typing import ClassVar, Final

from pyhast.address import Address
from pyhast.defaults import HASTD_PORT
from pyhast.errors import ExitCode, HastError

__all__ = [
    "LISTEN_BACKLOG",
    "ConflictDetector",
    "ConnBrokenError",
    "ConnBusyError",
    "ConnClosedError",
    "ConnEOFError",
    "ConnError",
    "ConnTimeoutError",
    "Transport",
    "accept",
    "client",
    "connect",
    "connect_start",
    "connect_wait",
    "family_supported",
    "get_timeouts",
    "lookup",
    "register",
    "server",
    "set_timeouts",
    "transport_for_socket",
]

#: listen() backlog of every server socket, as in FreeBSD's proto_tcp.c/proto_uds.c.
LISTEN_BACKLOG: Final = 8

_TIMEVAL = struct.Struct("@ll")


# --------------------------------------------------------------------------
# Errors


class ConnError(HastError):
    """A connection can no longer be used; the worker drops it and reconnects."""

    exit_code = ExitCode.TEMPFAIL


class ConnClosedError(ConnError):
    """The connection was closed by us (close()/abort(), or after an earlier error)."""


class ConnEOFError(ConnClosedError):
    """The peer closed the connection cleanly, at a frame boundary."""


class ConnBrokenError(ConnError):
    """The connection failed: reset, broken pipe, truncated frame, timeout.

    ``errno`` is the error number (from the ``OSError`` in ``__cause__`` when
    there is one), or None when the failure has no errno (a peer closing in
    the middle of a frame).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @classmethod
    def from_oserror(cls, exc: OSError, what: str = "Connection failed") -> ConnBrokenError:
        """Wrap ``exc``: the message ends with its reason, ``errno`` is copied.

        The caller raises the result ``from exc`` (or sets ``__cause__``).
        """
        reason = exc.strerror or str(exc) or type(exc).__name__
        error = cls(f"{what}: {reason}.", exc.errno)
        error.__cause__ = exc
        return error


class ConnTimeoutError(ConnBrokenError):
    """A send or receive made no progress for the configured timeout (ETIMEDOUT)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.ETIMEDOUT)


class ConnBusyError(HastError, RuntimeError):
    """Two tasks tried to use the same direction of a connection at the same time."""


class ConflictDetector:
    """A guard against concurrent use where concurrent use would be a bug (trio).

    Cheaper than a lock and louder: the second task to enter gets
    :class:`ConnBusyError` instead of silently waiting its turn::

        with self._recv_guard:
            ...
    """

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    @property
    def held(self) -> bool:
        """Whether some task is inside the guarded section."""
        return self._held

    def __enter__(self) -> None:
        if self._held:
            raise ConnBusyError(self._message)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._held = False


# --------------------------------------------------------------------------
# The transport interface and its registry


class Transport(abc.ABC):
    """One kind of socket (a FreeBSD ``struct proto``).

    Subclasses implement the abstract methods for their address family; the
    module-level functions of this module pick the transport by address
    prefix (or by the family of an existing socket) and call them.
    """

    #: Short name for messages ("tcp", "uds").
    name: ClassVar[str]
    #: Socket families whose sockets this transport manages.
    families: ClassVar[tuple[socket.AddressFamily, ...]]

    @abc.abstractmethod
    def claims(self, text: str) -> bool:
        """Whether ``text`` is this transport's kind of address (prefix only)."""

    @abc.abstractmethod
    def parse(self, text: str, default_port: int = HASTD_PORT) -> Address:
        """Parse an address this transport claims (ValueError if it is malformed)."""

    @abc.abstractmethod
    def client(self, address: Address, source: Address | None = None) -> socket.socket:
        """A new, unconnected socket able to reach ``address``, bound to ``source`` if given."""

    @abc.abstractmethod
    def connect_start(self, sock: socket.socket, address: Address) -> bool:
        """Start connecting ``sock`` without blocking; True if it is already connected.

        A connection that cannot even be started raises the OSError.
        """

    def connect(self, sock: socket.socket, address: Address, timeout: float | None) -> None:
        """Connect ``sock`` to ``address`` within ``timeout`` seconds."""
        if not self.connect_start(sock, address):
            connect_wait(sock, timeout)

    @abc.abstractmethod
    def server(
        self, address: Address, *, backlog: int = LISTEN_BACKLOG, mode: int | None = None
    ) -> socket.socket:
        """A listening socket bound to ``address``.

        ``mode`` (file permissions) only means something for UNIX sockets.
        """

    @abc.abstractmethod
    def prepare_accepted(self, sock: socket.socket) -> None:
        """Set the options every accepted socket of this transport needs."""

    @abc.abstractmethod
    def peer_address(self, sock: socket.socket) -> str:
        """The canonical address string of ``sock``'s peer, for messages."""


_registry: list[Transport] = []
_builtin_loaded = False


def register(transport: Transport) -> None:
    """Add ``transport`` to the registry (idempotent per transport name)."""
    for i, known in enumerate(_registry):
        if known.name == transport.name:
            _registry[i] = transport
            return
    _registry.append(transport)


def _transports() -> list[Transport]:
    global _builtin_loaded
    if not _builtin_loaded:
        # The built-in transports import this module, so they are imported
        # lazily here; importing them registers them.
        from pyhast.transport import tcp, uds  # noqa: F401

        _builtin_loaded = True
    return _registry


def lookup(text: str, default_port: int = HASTD_PORT) -> tuple[Transport, Address]:
    """The transport claiming ``text`` and the parsed address.

    Raises ValueError if no transport claims the address, or if the claiming
    transport finds it malformed.
    """
    for transport in _transports():
        if transport.claims(text):
            return transport, transport.parse(text, default_port)
    raise ValueError(f"No transport handles the address '{text}'.")


def transport_for_socket(sock: socket.socket) -> Transport:
    """The transport managing sockets of ``sock``'s family (ValueError if none)."""
    for transport in _transports():
        if sock.family in transport.families:
            return transport
    raise ValueError(f"No transport handles sockets of family {sock.family.name}.")


# --------------------------------------------------------------------------
# Address-string API (what hastd and hastctl call)


def client(address: str, source: str | None = None) -> socket.socket:
    """A new unconnected socket for ``address``, bound to ``source`` if given.

    ``address`` defaults to port 8457, ``source`` to port 0 (any).
    """
    transport, remote = lookup(address)
    local = None
    if source is not None:
        source_transport, local = lookup(source, 0)
        if source_transport is not transport:
            raise ValueError(
                f"The source address '{source}' is not of the same kind as '{address}'."
            )
    return transport.client(remote, local)


def connect_start(sock: socket.socket, address: str) -> bool:
    """Start connecting ``sock`` to ``address`` without blocking (hastd's parent side).

    Returns True if the connection is already established; otherwise finish
    with :func:`connect_wait` (possibly in another process, after passing the
    descriptor).  Immediate failures (ECONNREFUSED, ...) raise the OSError.
    """
    transport, remote = lookup(address)
    return transport.connect_start(sock, remote)


def connect(sock: socket.socket, address: str, timeout: float | None) -> None:
    """Connect ``sock`` (from :func:`client`) to ``address`` within ``timeout`` seconds.

    Works on a socket whose connection was already started; raises
    ``TimeoutError`` (errno ETIMEDOUT) or the OSError of the failed connection.
    The socket is left in the blocking mode it had.
    """
    transport, remote = lookup(address)
    transport.connect(sock, remote, timeout)


def connect_wait(sock: socket.socket, timeout: float | None) -> None:
    """Wait until the connection started on ``sock`` is established (hastd's
    ``proto_connect_wait``).

    Raises ``TimeoutError`` (ETIMEDOUT) when ``timeout`` seconds pass first,
    the connection's own error (ECONNREFUSED, EHOSTUNREACH, ...) when it
    failed, and ENOTCONN if no connection was ever started.
    """
    if not _wait_for(sock, select.POLLOUT, timeout):
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
    sock.getpeername()  # ENOTCONN if no connect() was ever started


def server(
    address: str, *, backlog: int = LISTEN_BACKLOG, mode: int | None = None
) -> socket.socket:
    """A listening socket for ``address`` (see the transports for the options set).

    ``mode`` sets the permissions of a UNIX socket (0600 when None); it is
    ignored for TCP.
    """
    transport, local = lookup(address)
    return transport.server(local, backlog=backlog, mode=mode)


def accept(listener: socket.socket, timeout: float | None) -> tuple[socket.socket, str]:
    """Accept one connection within ``timeout`` seconds: ``(socket, peer address)``.

    The new socket is blocking with its transport's options set (TCP_NODELAY).
    Works with blocking and non-blocking listeners; raises ``TimeoutError``
    (ETIMEDOUT) if nobody connects in time.
    """
    transport = transport_for_socket(listener)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not _wait_for(listener, select.POLLIN, remaining):
            raise TimeoutError(errno.ETIMEDOUT, "No connection to accept in time")
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue  # the connection went away between poll() and accept()
        try:
            sock.setblocking(True)
            transport.prepare_accepted(sock)
            return sock, transport.peer_address(sock)
        except BaseException:
            sock.close()
            raise


# --------------------------------------------------------------------------
# Socket helpers shared by every transport


def set_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """Set ``SO_SNDTIMEO`` and ``SO_RCVTIMEO`` (None or 0: no timeout).

    Only meaningful for blocking sockets: an expired timeout makes
    send()/recv() fail with EAGAIN, which callers report as ETIMEDOUT
    (hastd does the same).
    """
    if seconds is None or seconds <= 0:
        sec, usec = 0, 0
    else:
        sec = int(seconds)
        usec = round((seconds - sec) * 1_000_000)
        if usec >= 1_000_000:
            sec, usec = sec + 1, 0
        if sec == 0 and usec == 0:
            usec = 1  # a tiny positive timeout must not mean "none"
    value = _TIMEVAL.pack(sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)


def get_timeouts(sock: socket.socket) -> tuple[float, float]:
    """``(SO_SNDTIMEO, SO_RCVTIMEO)`` in seconds (0.0 is "none")."""
    result = []
    for option in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
        sec, usec = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size))
        result.append(sec + usec / 1_000_000)
    return result[0], result[1]


def family_supported(family: socket.AddressFamily) -> bool:
    """Whether the kernel can create stream sockets of ``family``.

    hastd only puts ``tcp6://[::]:8457`` in the default listen list when this
    is true for AF_INET6 (and likewise for AF_INET).
    """
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False
    probe.close()
    return True


def _wait_for(sock: socket.socket, events: int, timeout: float | None) -> bool:
    """poll() ``sock`` for ``events``; False if ``timeout`` seconds passed first."""
    poller = select.poll()
    poller.register(sock.fileno(), events)
    # Round up so that a short positive timeout does not become a zero one.
    milliseconds = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return bool(poller.poll(milliseconds))
