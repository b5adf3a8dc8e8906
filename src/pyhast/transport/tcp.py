"""The TCP transport (FreeBSD's ``proto_tcp.c``): ``tcp://``, ``tcp4://``, ``tcp6://``.

Claims every address with one of those prefixes, and every address without
``://`` that is not an absolute path (``10.0.0.2``, ``nodeb:8457``,
``[fd00::2]:8457``).

* Names are resolved with getaddrinfo and the first result is used (spec
  1.6); ``tcp4``/``tcp6`` restrict the family.  Numeric hosts are resolved
  with ``AI_NUMERICHOST`` (no DNS, and no ``AI_ADDRCONFIG``, which would make
  ``127.0.0.1`` unusable on a host with only a loopback interface); names
  with ``AI_ADDRCONFIG``.
* Every socket gets ``TCP_NODELAY``.  A ``source`` address is bound with
  ``SO_REUSEADDR`` (port 0 unless given) and must be of the remote's family.
* Listeners get ``SO_REUSEADDR``, backlog 8, and ``IPV6_V6ONLY`` on IPv6, so
  ``tcp4://0.0.0.0:8457`` and ``tcp6://[::]:8457`` can both listen (Linux
  defaults to dual-stack sockets, FreeBSD to IPv6-only ones; we pick
  FreeBSD's behaviour).
* :func:`same_ip` is the secondary's peer check: the connecting socket's IP
  must equal an address the configured ``remote`` resolves to, in the same
  family; the port is ignored.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import ClassVar

from pyhast.address import Address, Scheme, parse_address
from pyhast.defaults import HASTD_PORT
from pyhast.transport.base import LISTEN_BACKLOG, Transport, register

__all__ = ["TCPTransport", "peer_ip", "resolve", "same_ip"]

_PREFIXES = ("tcp://", "tcp4://", "tcp6://")
_SCHEMES = frozenset({"tcp", "tcp4", "tcp6"})
_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EINTR})

_SockAddr = tuple[str, int] | tuple[str, int, int, int]


def resolve(
    address: Address, family: socket.AddressFamily = socket.AF_UNSPEC, *, passive: bool = False
) -> list[tuple[socket.AddressFamily, _SockAddr]]:
    """Every ``(family, sockaddr)`` ``address`` resolves to, in getaddrinfo's order.

    ``family`` narrows the lookup further than the address's scheme does; a
    contradiction (``tcp6://`` asked for AF_INET) raises ``socket.gaierror``
    like any failed lookup.  The result is never empty.
    """
    wanted = address.family
    if family != socket.AF_UNSPEC:
        if wanted not in (socket.AF_UNSPEC, family):
            raise socket.gaierror(socket.EAI_FAMILY, f"{address} is not an {family.name} address")
        wanted = family
    flags = socket.AI_NUMERICSERV
    if passive:
        flags |= socket.AI_PASSIVE
    if _is_ip_literal(address.host):
        flags |= socket.AI_NUMERICHOST
    else:
        flags |= socket.AI_ADDRCONFIG
    infos = socket.getaddrinfo(
        address.host, address.port, wanted, socket.SOCK_STREAM, socket.IPPROTO_TCP, flags
    )
    result: list[tuple[socket.AddressFamily, _SockAddr]] = []
    for info_family, _type, _proto, _name, sockaddr in infos:
        if info_family in (socket.AF_INET, socket.AF_INET6):
            result.append((info_family, sockaddr))  # type: ignore[arg-type]
    if not result:
        raise socket.gaierror(socket.EAI_NONAME, f"{address} has no IPv4 or IPv6 address")
    return result


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address_of(family: int, sockaddr: _SockAddr) -> str:
    scheme: Scheme = "tcp6" if family == socket.AF_INET6 else "tcp4"
    return str(Address(scheme, host=sockaddr[0], port=sockaddr[1]))


class TCPTransport(Transport):
    """TCP over IPv4 and IPv6."""

    name = "tcp"
    families: ClassVar[tuple[socket.AddressFamily, ...]] = (socket.AF_INET, socket.AF_INET6)

    def claims(self, text: str) -> bool:
        lower = text.lower()
        if "://" in lower:
            return lower.startswith(_PREFIXES)
        return not text.startswith("/")

    def parse(self, text: str, default_port: int = HASTD_PORT) -> Address:
        address = parse_address(text, default_port)
        if address.scheme not in _SCHEMES:  # cannot happen for a claimed address
            raise ValueError(f"'{text}' is not a TCP address.")
        return address

    def client(self, address: Address, source: Address | None = None) -> socket.socket:
        family, _ = resolve(address)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source is not None:
                try:
                    _, local = resolve(source, family, passive=True)[0]
                except socket.gaierror as exc:
                    if exc.errno not in (socket.EAI_FAMILY, socket.EAI_ADDRFAMILY):
                        raise
                    raise ValueError(
                        f"The source address {source} is not of the same family as {address}."
                    ) from None
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(local)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect_start(self, sock: socket.socket, address: Address) -> bool:
        _, remote = resolve(address, sock.family)[0]
        previous = sock.gettimeout()
        sock.setblocking(False)
        try:
            error = sock.connect_ex(remote)
        finally:
            sock.settimeout(previous)
        if error in (0, errno.EISCONN):
            return True
        if error in _IN_PROGRESS:
            return False
        raise OSError(error, os.strerror(error))

    def server(
        self, address: Address, *, backlog: int = LISTEN_BACKLOG, mode: int | None = None
    ) -> socket.socket:
        family, local = resolve(address, passive=True)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(local)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def prepare_accepted(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def peer_address(self, sock: socket.socket) -> str:
        return _address_of(sock.family, sock.getpeername())

    def local_address(self, sock: socket.socket) -> str:
        """The canonical address string ``sock`` is bound to."""
        return _address_of(sock.family, sock.getsockname())


def peer_ip(sock: socket.socket) -> str:
    """The IP address of ``sock``'s peer, normalised (``127.0.0.2``, ``::1``).

    Raises ValueError for a socket that is not TCP, OSError (ENOTCONN) for one
    that is not connected.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"A {sock.family.name} socket has no peer IP address.")
    return str(ipaddress.ip_address(sock.getpeername()[0]))


def same_ip(sock: socket.socket, address: str) -> bool:
    """Whether ``sock``'s peer has the IP address ``address`` resolves to.

    hastd's secondary uses this to decide whether a connection comes from a
    resource's ``remote``: only the IP is compared, the family must match and
    the port is ignored.  A host name matches if *any* of its addresses of
    the peer's family does (FreeBSD compares with the first result only,
    which makes a name with both AAAA and A records fail by the order of the
    answers).  Anything that cannot match (a UNIX socket, an unconnected
    socket, an unparsable or unresolvable address) gives False.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        peer = ipaddress.ip_address(sock.getpeername()[0])
        parsed = parse_address(address)
    except (OSError, ValueError):
        return False
    if parsed.scheme not in _SCHEMES or parsed.family not in (socket.AF_UNSPEC, sock.family):
        return False
    try:
        candidates = resolve(parsed, sock.family)
    except OSError:
        return False
    for _, sockaddr in candidates:
        try:
            if ipaddress.ip_address(sockaddr[0]) == peer:
                return True
        except ValueError:
            continue
    return False


register(TCPTransport())
