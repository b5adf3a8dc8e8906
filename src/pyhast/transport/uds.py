"""The UNIX-domain socket transport (FreeBSD's ``proto_uds.c``).

Claims ``uds://PATH``, ``unix://PATH`` and bare absolute paths.  Used for the
control socket (``uds:///var/run/hastctl``) and accepted for ``listen``.

Server side:

* A *stale* socket file is removed before bind: the path is unlinked only if
  it is a socket nobody listens on (connect gives ECONNREFUSED).  A live
  socket gives EADDRINUSE, so a second daemon cannot steal the control socket;
  any other file is left alone and bind() reports EADDRINUSE.  (FreeBSD
  unlinks whatever is there.)
* The socket file gets ``mode`` (0600 by default).  The mode is put on the
  socket *before* bind (Linux applies a socket's inode mode, minus the umask,
  to the file bind creates), so the file is never more open than asked, then
  set exactly with chmod().
* The listener is a :class:`UnixListener`: it remembers the path and the pid
  that created it, and only that process unlinks the file on close(), so a
  forked child closing its copy does not remove the parent's socket.  The
  file is also left alone if it has been replaced by another one since.

:func:`peer_credentials` returns ``SO_PEERCRED`` (pid, uid, gid of the peer
at connect time); the control socket accepts root only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from typing import ClassVar, NamedTuple

from pyhast.address import Address, parse_address
from pyhast.defaults import HASTD_PORT
from pyhast.transport.base import LISTEN_BACKLOG, Transport, register, set_timeouts
from pyhast.transport.socketpair import PEER_ADDRESS as SOCKETPAIR_ADDRESS

__all__ = ["PeerCredentials", "UDSTransport", "UnixListener", "peer_credentials"]

#: Mode of a UNIX server socket when the caller does not choose one.
DEFAULT_MODE = 0o600

_PREFIXES = ("uds://", "unix://")
_UCRED = struct.Struct("@iII")
_TIMEVAL_SIZE = struct.calcsize("@ll")


class PeerCredentials(NamedTuple):
    """Credentials of the process at the other end of a UNIX socket."""

    pid: int
    uid: int
    gid: int


class UnixListener(socket.socket):
    """A listening UNIX socket that unlinks its path on close() in its creator only."""

    _unlink_path: str | None = None
    _unlink_owner: int = -1
    _unlink_inode: tuple[int, int] = (-1, -1)

    def _own_path(self, path: str) -> None:
        st = os.lstat(path)
        self._unlink_path = path
        self._unlink_owner = os.getpid()
        self._unlink_inode = (st.st_dev, st.st_ino)

    @property
    def path(self) -> str | None:
        """The socket file this listener will remove on close, if any."""
        return self._unlink_path

    def close(self) -> None:
        path, self._unlink_path = self._unlink_path, None
        try:
            super().close()
        finally:
            if path is not None and os.getpid() == self._unlink_owner:
                _unlink_if_same(path, self._unlink_inode)


def _unlink_if_same(path: str, inode: tuple[int, int]) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)


def _remove_stale(path: str) -> None:
    """Unlink ``path`` if it is a socket file nobody listens on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        return  # not ours to remove; bind() will report EADDRINUSE
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        error = probe.connect_ex(path)
    if error == errno.ECONNREFUSED:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    elif error in (0, errno.EAGAIN):
        raise OSError(errno.EADDRINUSE, "Another process is listening on the socket", path)


class UDSTransport(Transport):
    """Stream sockets in the file system namespace."""

    name = "uds"
    families: ClassVar[tuple[socket.AddressFamily, ...]] = (socket.AF_UNIX,)

    def claims(self, text: str) -> bool:
        if text.lower().startswith(_PREFIXES):
            return True
        return text.startswith("/") and "://" not in text

    def parse(self, text: str, default_port: int = HASTD_PORT) -> Address:
        address = parse_address(text, default_port)
        if address.scheme != "uds":  # cannot happen for a claimed address
            raise ValueError(f"'{text}' is not a UNIX socket address.")
        return address

    def client(self, address: Address, source: Address | None = None) -> socket.socket:
        if source is not None:
            raise ValueError(f"A source address makes no sense for the UNIX socket {address}.")
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def connect_start(self, sock: socket.socket, address: Address) -> bool:
        previous = sock.gettimeout()
        sock.setblocking(False)
        try:
            error = sock.connect_ex(address.path)
        finally:
            sock.settimeout(previous)
        if error in (0, errno.EISCONN):
            return True
        # A UNIX connect either completes at once or fails; EAGAIN means the
        # listener's backlog is full.
        raise OSError(error, os.strerror(error), address.path)

    def connect(self, sock: socket.socket, address: Address, timeout: float | None) -> None:
        # A UNIX connect never is "in progress": with a full backlog a
        # non-blocking one fails with EAGAIN and a blocking one sleeps up to
        # SO_SNDTIMEO.  So connect blocking with that option set.
        if timeout is not None and timeout <= 0:
            self.connect_start(sock, address)
            return
        previous = sock.gettimeout()
        saved = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL_SIZE)
        saved_rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL_SIZE)
        try:
            sock.setblocking(True)
            set_timeouts(sock, timeout)
            try:
                sock.connect(address.path)
            except BlockingIOError:
                raise TimeoutError(errno.ETIMEDOUT, "Connection timed out", address.path) from None
            except OSError as exc:
                if exc.errno != errno.EISCONN:
                    raise
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, saved)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, saved_rcv)
            sock.settimeout(previous)

    def server(
        self, address: Address, *, backlog: int = LISTEN_BACKLOG, mode: int | None = None
    ) -> socket.socket:
        path = address.path
        if mode is None:
            mode = DEFAULT_MODE
        _remove_stale(path)
        sock = UnixListener(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), mode)
            sock.bind(path)
            sock._own_path(path)
            os.chmod(path, mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()  # unlinks the file if bind() created it
            raise
        return sock

    def prepare_accepted(self, sock: socket.socket) -> None:
        pass

    def peer_address(self, sock: socket.socket) -> str:
        # Clients rarely bind, so name the socket file they connected to;
        # neither end of a socketpair has a name.
        name = sock.getpeername() or sock.getsockname()
        if not name:
            return SOCKETPAIR_ADDRESS
        if isinstance(name, bytes):  # abstract namespace
            name = name.decode("utf-8", "backslashreplace")
        return f"uds://{name}"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """``(pid, uid, gid)`` of the peer of a connected UNIX socket (SO_PEERCRED).

    Raises ValueError for a socket that is not a UNIX socket, OSError
    (EOPNOTSUPP) where the platform has no SO_PEERCRED.
    """
    if sock.family != socket.AF_UNIX:
        raise ValueError(f"A {sock.family.name} socket has no peer credentials.")
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        raise OSError(errno.EOPNOTSUPP, "SO_PEERCRED is not supported on this platform")
    raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


register(UDSTransport())
