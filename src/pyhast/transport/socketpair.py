"""The socketpair transport (FreeBSD's ``proto_socketpair.c``): parent <-> worker links.

hastd links the parent and each worker with three socketpairs (spec 3.3):
``ctrl`` (parent -> worker requests), ``event`` (worker -> parent events) and,
for a primary, ``conn`` (the worker asks the parent for TCP connections,
which come back by descriptor passing, see :mod:`~pyhast.transport.fdpass`).
pyhast starts workers as new interpreters, so the worker's end has to survive
``exec``: it is made inheritable on request (``subprocess``'s ``pass_fds``
does that too, for the child only, which is preferable when it fits).

A socketpair has no address, so this transport is not in the address
registry of :mod:`~pyhast.transport.base`.
"""

from __future__ import annotations

import socket
from typing import Final

__all__ = ["PEER_ADDRESS", "socketpair"]

#: What peer-address strings say for either end of a socketpair.
PEER_ADDRESS: Final = "socketpair://"


def socketpair(*, child_inheritable: bool = False) -> tuple[socket.socket, socket.socket]:
    """A connected pair of AF_UNIX stream sockets: ``(parent_end, child_end)``.

    Both ends are blocking and close-on-exec, except that ``child_end`` is
    inheritable (close-on-exec off) when ``child_inheritable`` is true.
    """
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if child_inheritable:
        try:
            child_end.set_inheritable(True)
        except BaseException:
            parent_end.close()
            child_end.close()
            raise
    return parent_end, child_end
