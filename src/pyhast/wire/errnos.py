"""FreeBSD errno numbers on the wire, translated to and from Linux in one place.

HAST puts the sender's raw errno in the ``error`` field of replies.  FreeBSD
and Linux agree on 1..34 (EPERM..ERANGE) and disagree above, so every error
that crosses the wire goes through :func:`to_wire` and :func:`from_wire`.
An error with no FreeBSD counterpart goes out as EIO; an unknown FreeBSD
number comes in as EIO.
"""

from __future__ import annotations

import errno as _e
from typing import Final

#: FreeBSD's numbers for the errors above ERANGE (sys/errno.h).
_FREEBSD: Final[dict[str, int]] = {
    "EAGAIN": 35,
    "EINPROGRESS": 36,
    "EALREADY": 37,
    "ENOTSOCK": 38,
    "EDESTADDRREQ": 39,
    "EMSGSIZE": 40,
    "EPROTOTYPE": 41,
    "ENOPROTOOPT": 42,
    "EPROTONOSUPPORT": 43,
    "ESOCKTNOSUPPORT": 44,
    "EOPNOTSUPP": 45,
    "EPFNOSUPPORT": 46,
    "EAFNOSUPPORT": 47,
    "EADDRINUSE": 48,
    "EADDRNOTAVAIL": 49,
    "ENETDOWN": 50,
    "ENETUNREACH": 51,
    "ENETRESET": 52,
    "ECONNABORTED": 53,
    "ECONNRESET": 54,
    "ENOBUFS": 55,
    "EISCONN": 56,
    "ENOTCONN": 57,
    "ESHUTDOWN": 58,
    "ETOOMANYREFS": 59,
    "ETIMEDOUT": 60,
    "ECONNREFUSED": 61,
    "ELOOP": 62,
    "ENAMETOOLONG": 63,
    "EHOSTDOWN": 64,
    "EHOSTUNREACH": 65,
    "ENOTEMPTY": 66,
    "EUSERS": 68,
    "EDQUOT": 69,
    "ESTALE": 70,
    "EREMOTE": 71,
    "ENOLCK": 77,
    "ENOSYS": 78,
    "EIDRM": 82,
    "ENOMSG": 83,
    "EOVERFLOW": 84,
    "ECANCELED": 85,
    "EILSEQ": 86,
    "EBADMSG": 89,
    "EMULTIHOP": 90,
    "ENOLINK": 91,
    "EPROTO": 92,
    "ENOTRECOVERABLE": 95,
    "EOWNERDEAD": 96,
}

#: FreeBSD-only numbers that have no Linux name but appear in HAST.
FREEBSD_ERPCMISMATCH: Final = 73  # same as pyhast.wire.frame.ERPCMISMATCH
FREEBSD_EOPNOTSUPP: Final = 45
FREEBSD_ENOTCONN: Final = 57

_LAST_COMMON = 34  # ERANGE: 1..34 are the same on both systems

_TO_WIRE: dict[int, int] = {}
_FROM_WIRE: dict[int, int] = {}
for _name, _bsd in _FREEBSD.items():
    _linux = getattr(_e, _name, None)
    if _linux is not None:
        _TO_WIRE[_linux] = _bsd
        _FROM_WIRE[_bsd] = _linux
# Linux aliases (ENOTSUP == EOPNOTSUPP, EWOULDBLOCK == EAGAIN) share numbers.
_FROM_WIRE[FREEBSD_ERPCMISMATCH] = _e.EPROTO


def to_wire(linux_errno: int) -> int:
    """The FreeBSD number to send for a local (Linux) errno."""
    if 0 <= linux_errno <= _LAST_COMMON:
        return linux_errno
    return _TO_WIRE.get(linux_errno, _e.EIO)


def from_wire(bsd_errno: int) -> int:
    """The local (Linux) errno for a number received from a peer."""
    if 0 <= bsd_errno <= _LAST_COMMON:
        return bsd_errno
    return _FROM_WIRE.get(bsd_errno, _e.EIO)
