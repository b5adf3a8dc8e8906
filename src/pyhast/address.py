"""Address strings of hast.conf and hastd (spec 1.6), parsed without any I/O.

Accepted forms::

    uds://PATH   unix://PATH   /absolute/path          UNIX-domain socket
    tcp://HOST[:PORT]   tcp4://...   tcp6://...   HOST[:PORT]   TCP

Rules (FreeBSD's ``proto_uds.c`` / ``proto_tcp.c``, with one fix):

* Scheme prefixes are case-insensitive; no prefix means ``tcp``. A bare path is
  a UNIX socket only if it is absolute and contains no ``://``.
* A host name or IPv4 address with one colon takes the text after the colon as
  the port, which must be a decimal number in 1..65535.
* Two or more colons mean IPv6. A port is recognised only in the bracketed form
  ``[addr]:port``; a bare IPv6 address takes the default port. ``[addr]``
  without a port is accepted and takes the default port (FreeBSD mistakes the
  address's last colon for the port separator there).
* ``tcp4://`` with an IPv6 literal, or ``tcp6://`` with an IPv4 literal, is an
  error. Host names are only checked for shape here; they are resolved when a
  socket is made (getaddrinfo, first result).
* The default port is 8457 for ``listen``/``remote``/``control`` and 0 ("any")
  for ``source``; an explicit port is always 1..65535.

The value ``none`` of ``remote`` is not an address; the configuration handles
it. Errors are ``ValueError`` with a one-sentence message; the configuration
parser turns them into ``ConfigError`` with a file position.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Literal

from pyhast.defaults import HASTD_PORT

__all__ = ["Address", "Scheme", "parse_address"]

Scheme = Literal["tcp", "tcp4", "tcp6", "uds"]

#: Longest UNIX socket path in bytes (Linux sun_path is 108 bytes with the NUL).
UDS_PATH_MAX = 107

_UDS_PREFIXES = ("uds://", "unix://")
_TCP_PREFIXES: tuple[tuple[str, Scheme], ...] = (
    ("tcp://", "tcp"),
    ("tcp4://", "tcp4"),
    ("tcp6://", "tcp6"),
)
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC_HOST = re.compile(r"[0-9.]*[0-9][0-9.]*")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Address:
    """One parsed address, in canonical form.

    For ``uds`` only ``path`` is set (``host`` is "" and ``port`` 0). For TCP,
    ``host`` is an IP literal (normalised, IPv6 without brackets) or a host
    name as written, and ``port`` is 0 only for a source address without an
    explicit port. A TCP address whose host is an IP literal always has the
    scheme of its family (``tcp4``/``tcp6``), so two spellings of the same
    address compare equal and ``parse_address(str(a), p) == a`` for the same
    default port ``p``.
    """

    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET, AF_INET6, AF_UNIX, or AF_UNSPEC for ``tcp`` with a host name."""
        if self.scheme == "uds":
            return socket.AF_UNIX
        if self.scheme == "tcp4":
            return socket.AF_INET
        if self.scheme == "tcp6":
            return socket.AF_INET6
        return socket.AF_UNSPEC

    @property
    def is_unix(self) -> bool:
        """True for a UNIX-domain socket address."""
        return self.scheme == "uds"

    def __str__(self) -> str:
        """Canonical spelling: ``uds:///path``, ``tcp4://1.2.3.4:8457``, ``tcp6://[::1]:8457``.

        The port is left out when it is 0 (a source address binding any port).
        """
        if self.scheme == "uds":
            return f"uds://{self.path}"
        host = f"[{self.host}]" if self.scheme == "tcp6" and ":" in self.host else self.host
        if self.port == 0:
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(text: str, default_port: int = HASTD_PORT) -> Address:
    """Parse ``text`` (see the module docstring); raise ValueError if it is invalid.

    ``default_port`` is used when the address has no port (0 for source
    addresses).
    """
    if not 0 <= default_port <= 65535:
        raise ValueError(f"Default port {default_port} is out of range (0-65535).")
    if not text:
        raise ValueError("The address is empty.")
    lower = text.lower()
    for prefix in _UDS_PREFIXES:
        if lower.startswith(prefix):
            return _parse_uds(text[len(prefix) :])
    if text.startswith("/") and "://" not in text:
        return _parse_uds(text)
    scheme: Scheme = "tcp"
    rest = text
    for prefix, name in _TCP_PREFIXES:
        if lower.startswith(prefix):
            scheme, rest = name, text[len(prefix) :]
            break
    else:
        if "://" in text:
            raise ValueError(
                f"Unknown address scheme '{text.split('://', 1)[0]}://'; "
                "use tcp://, tcp4://, tcp6://, uds:// or unix://."
            )
    return _parse_tcp(scheme, rest, default_port)


def _parse_uds(path: str) -> Address:
    if not path:
        raise ValueError("The UNIX socket address has no path.")
    if "\0" in path:
        raise ValueError("The UNIX socket path contains a NUL character.")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > UDS_PATH_MAX:
        raise ValueError(
            f"The UNIX socket path is too long ({size} bytes; at most {UDS_PATH_MAX})."
        )
    return Address("uds", path=path)


def _parse_tcp(scheme: Scheme, rest: str, default_port: int) -> Address:
    if not rest:
        raise ValueError("The address has no host.")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise ValueError("The IPv6 address has no closing ']'.")
        inner, after = rest[1:close], rest[close + 1 :]
        if after and not after.startswith(":"):
            raise ValueError(f"Unexpected text '{after}' after the IPv6 address; expected ':port'.")
        port = _parse_port(after[1:]) if after else default_port
        ip = _parse_ipv6(inner)
    elif rest.count(":") >= 2:
        port = default_port
        ip = _parse_ipv6(rest)
    else:
        host, sep, port_text = rest.partition(":")
        port = _parse_port(port_text) if sep else default_port
        ip = _parse_host(host)
        if ip is None:
            return Address(scheme, host=host, port=port)
    if isinstance(ip, ipaddress.IPv6Address):
        if scheme == "tcp4":
            raise ValueError(f"tcp4:// cannot be used with the IPv6 address '{ip}'.")
        return Address("tcp6", host=str(ip), port=port)
    if scheme == "tcp6":
        raise ValueError(f"tcp6:// cannot be used with the IPv4 address '{ip}'.")
    return Address("tcp4", host=str(ip), port=port)


def _parse_port(text: str) -> int:
    if not text:
        raise ValueError("The port number after ':' is missing.")
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"Port '{text}' is not a decimal number.")
    if len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError(f"Port {text} is out of range (1-65535).")
    return int(text)


def _parse_ipv6(text: str) -> ipaddress.IPv6Address:
    if not text:
        raise ValueError("The IPv6 address between '[' and ']' is empty.")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a valid IPv6 address.") from None


def _parse_host(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 literal, or None for a well-formed host name."""
    if not host:
        raise ValueError("The address has no host.")
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"'{host}' is not a valid IPv4 address.") from None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"'{host}' is not a valid host name or IPv4 address.")
    return None
