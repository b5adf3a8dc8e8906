"""Replication requests and replies (spec 6.4), sans-IO.

Primary -> secondary on conn A::

    {cmd: uint8, seq: uint64, offset: uint64, length: uint64, [memsync: uint8 1]}
    + payload for WRITE;  KEEPALIVE is just {cmd: 5}

Secondary -> primary on conn B::

    {seq: uint64, [received: int8 1], [error: int16 errno]} + payload for a READ

``error`` holds a FreeBSD errno (see :mod:`pyhast.wire.errnos`).
Requests are validated by :func:`parse_request`, which never raises anything
but :class:`RequestError` (answered with EINVAL, the stream stays usable).
"""

from __future__ import annotations

import dataclasses
import errno

from pyhast.defaults import MAXPHYS
from pyhast.enums import HioCmd
from pyhast.errors import NVError, ProtocolError
from pyhast.wire.errnos import from_wire, to_wire
from pyhast.wire.nv import NV


class RequestError(ProtocolError):
    """A request the secondary refuses; reply ``{seq, error}`` and go on."""

    def __init__(self, message: str, seq: int, err: int = errno.EINVAL) -> None:
        super().__init__(message, err)
        self.seq = seq


@dataclasses.dataclass(slots=True)
class Request:
    cmd: HioCmd
    seq: int
    offset: int
    length: int
    memsync: bool = False


def request_nv(cmd: HioCmd, seq: int, offset: int, length: int, memsync: bool = False) -> NV:
    """Build a READ/WRITE/DELETE/FLUSH request header."""
    nv = NV()
    nv.add_uint8("cmd", int(cmd))
    nv.add_uint64("seq", seq)
    nv.add_uint64("offset", offset)
    nv.add_uint64("length", length)
    if memsync:
        nv.add_uint8("memsync", 1)
    return nv


def keepalive_nv() -> NV:
    nv = NV()
    nv.add_uint8("cmd", int(HioCmd.KEEPALIVE))
    return nv


_VALID_CMDS = {int(c) for c in HioCmd if c is not HioCmd.UNDEF}


def parse_request(nv: NV, *, sectorsize: int, datasize: int) -> Request:
    """Validate a request header as a secondary must (spec 6.4, Appendix).

    Raises RequestError (reply EINVAL, carrying the request's seq or 0).
    Unlike FreeBSD, an unknown or missing ``cmd`` is answered, not fatal.
    """
    try:
        seq = nv.get_uint64("seq", default=0)
    except NVError as exc:
        raise RequestError(f"Invalid 'seq' field: {exc}", 0) from exc
    try:
        cmd = nv.get_uint8("cmd", default=0)
    except NVError as exc:
        raise RequestError(f"Invalid 'cmd' field: {exc}", seq) from exc
    if cmd not in _VALID_CMDS:
        raise RequestError(f"Unknown command {cmd}.", seq)
    hcmd = HioCmd(cmd)
    if hcmd is HioCmd.KEEPALIVE:
        return Request(hcmd, 0, 0, 0)
    if seq == 0:
        raise RequestError("Request has no 'seq' field.", 0)
    try:
        offset = nv.get_uint64("offset", default=0)
        length = nv.get_uint64("length", default=0)
        memsync = nv.get_uint8("memsync", default=0) != 0
    except NVError as exc:
        raise RequestError(f"Invalid request field: {exc}", seq) from exc
    if hcmd is HioCmd.FLUSH:
        return Request(hcmd, seq, 0, 0)
    if length == 0:
        raise RequestError("Request has zero length.", seq)
    if hcmd is not HioCmd.DELETE and length > MAXPHYS:
        raise RequestError(f"Request length {length} is larger than {MAXPHYS}.", seq)
    if offset % sectorsize or length % sectorsize:
        raise RequestError(
            f"Offset {offset} or length {length} is not a multiple of the sector size "
            f"{sectorsize}.",
            seq,
        )
    if offset + length > datasize:
        raise RequestError(
            f"Request {offset}+{length} goes past the end of the data ({datasize}).", seq
        )
    return Request(hcmd, seq, offset, length, memsync and hcmd is HioCmd.WRITE)


def reply_nv(seq: int, err: int = 0, received: bool = False) -> NV:
    """Build a reply; ``err`` is a local (Linux) errno, translated here."""
    nv = NV()
    nv.add_uint64("seq", seq)
    if received:
        nv.add_int8("received", 1)
    if err:
        nv.add_int16("error", to_wire(err))
    return nv


@dataclasses.dataclass(slots=True)
class Reply:
    seq: int
    error: int  # local (Linux) errno, 0 = success
    received: bool


def parse_reply(nv: NV) -> Reply:
    """Decode a reply from conn B (ProtocolError if it is unusable)."""
    try:
        seq = nv.get_uint64("seq")
        err = nv.get_int16("error", default=0)
        received = nv.get_int8("received", default=0) != 0
    except NVError as exc:
        raise ProtocolError(f"Invalid reply from the secondary: {exc}") from exc
    return Reply(seq, from_wire(err) if err else 0, received)
