"""Replication requests and replies (spec 6.4), sans-IO.

Primary -> secondary on conn A::

    {cmd: uint8, seq: uint64, offset: uint64, length: uint64, [memsync: uint8 1]}
    + payload for WRITE;  KEEPALIVE is just {cmd: 5}

Secondary -> primary on conn B::

    {seq: uint64, [received: int8 1], [error: int16 errno]} + payload for a READ

``error`` holds a FreeBSD errno (see :mod:`pyhast.wire.errnos`).
Requests are validated by :func:`parse_request`, which never raises anything
but :class:`RequestError` (answered with EINVAL, the stream stays usable).

Fixed layouts (the hot path)
============================

Every replicated write costs a request and one or two replies, so these
messages have their own codec, byte for byte the generic one's:

* The requests and replies are always laid out the same way (FreeBSD's field
  order; ``size`` is added last by the pipeline when it adds nothing else),
  so each such layout is an :class:`~pyhast.wire.nv.NVLayout`.
  :func:`encode_request`, :func:`encode_reply` and :func:`encode_read_reply`
  return the frame header and nv list as one bytes object, packed with one
  ``struct`` call (what ``encode_frame(request_nv(...) + pipeline_send(...))``
  returns as its first buffer, for :meth:`FramedConn.send_encoded
  <pyhast.transport.aio.FramedConn.send_encoded>`).  When the pipeline adds
  more than ``size`` (compression, checksum), or a value does not fit, they
  take the generic path, which builds the same bytes or raises its errors.
* The layouts are registered with :func:`~pyhast.wire.nv.register_layout`,
  so a received list that is exactly one of them is decoded by one unpack
  (:attr:`NV.shape <pyhast.wire.nv.NV.shape>`), and :func:`parse_request` /
  :func:`parse_reply` read its values directly.  Anything else (another
  order, extra fields, padding garbage, other types) is decoded and checked
  field by field, with the same results and errors.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import Final

from pyhast.defaults import HAST_PROTO_VERSION, MAXPHYS
from pyhast.enums import Checksum, Compression, HioCmd
from pyhast.errors import NVError, ProtocolError
from pyhast.wire.errnos import from_wire, to_wire
from pyhast.wire.frame import encode_frame
from pyhast.wire.nv import NV, NVLayout, NVType, register_layout
from pyhast.wire.pipeline import Payload, add_pipeline_fields, compression_send

_Data = bytes | bytearray | memoryview


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


@dataclasses.dataclass(slots=True)
class Reply:
    seq: int
    error: int  # local (Linux) errno, 0 = success
    received: bool


# --- the fixed layouts ----------------------------------------------------------

_HEADER_FIELDS: Final = (
    ("cmd", NVType.UINT8),
    ("seq", NVType.UINT64),
    ("offset", NVType.UINT64),
    ("length", NVType.UINT64),
)
_MEMSYNC: Final = ("memsync", NVType.UINT8)
_SIZE: Final = ("size", NVType.UINT32)
_SEQ: Final = ("seq", NVType.UINT64)
_RECEIVED: Final = ("received", NVType.INT8)
_ERROR: Final = ("error", NVType.INT16)

#: READ, DELETE, FLUSH; and with ``size`` after them, a WRITE.
_REQUEST: Final = NVLayout(*_HEADER_FIELDS)
_REQUEST_DATA: Final = _REQUEST.plus(*_SIZE)
#: A memsync WRITE (and a malformed memsync request without data).
_REQUEST_MEMSYNC: Final = _REQUEST.plus(*_MEMSYNC)
_REQUEST_MEMSYNC_DATA: Final = _REQUEST_MEMSYNC.plus(*_SIZE)
#: Request layout -> does values[4] hold memsync.
_REQUEST_LAYOUTS: Final = {
    _REQUEST: False,
    _REQUEST_DATA: False,
    _REQUEST_MEMSYNC: True,
    _REQUEST_MEMSYNC_DATA: True,
}

_REPLY: Final = NVLayout(_SEQ)
_REPLY_DATA: Final = _REPLY.plus(*_SIZE)  # a READ's data, neither compressed nor checksummed
_REPLY_RECEIVED: Final = _REPLY.plus(*_RECEIVED)
_REPLY_ERROR: Final = _REPLY.plus(*_ERROR)
_REPLY_RECEIVED_ERROR: Final = _REPLY_RECEIVED.plus(*_ERROR)
#: Reply layout -> positions of ``received`` and ``error`` in its values (0: absent).
_REPLY_LAYOUTS: Final = {
    _REPLY: (0, 0),
    _REPLY_DATA: (0, 0),
    _REPLY_RECEIVED: (1, 0),
    _REPLY_ERROR: (0, 1),
    _REPLY_RECEIVED_ERROR: (1, 2),
}

# Layouts of one size are tried in this order: the common one first.
for _layout in (*_REQUEST_LAYOUTS, *_REPLY_LAYOUTS):
    register_layout(_layout)


_COMMANDS: Final = {int(c): c for c in HioCmd if c is not HioCmd.UNDEF}
# Hot-path aliases: on Python 3.11 reading an enum member through its class
# costs ~70 ns.
_WRITE: Final = HioCmd.WRITE
_DELETE: Final = HioCmd.DELETE
_FLUSH: Final = HioCmd.FLUSH
_KEEPALIVE: Final = HioCmd.KEEPALIVE
_NO_CHECKSUM: Final = Checksum.NONE


# --- requests -------------------------------------------------------------------


def _request_values(
    cmd: HioCmd, seq: int, offset: int, length: int, memsync: bool
) -> tuple[int, ...]:
    if memsync:
        return (int(cmd), seq, offset, length, 1)
    return (int(cmd), seq, offset, length)


def request_nv(cmd: HioCmd, seq: int, offset: int, length: int, memsync: bool = False) -> NV:
    """Build a READ/WRITE/DELETE/FLUSH request header."""
    layout = _REQUEST_MEMSYNC if memsync else _REQUEST
    return layout.build(_request_values(cmd, seq, offset, length, memsync))


def keepalive_nv() -> NV:
    nv = NV()
    nv.add_uint8("cmd", int(HioCmd.KEEPALIVE))
    return nv


def encode_request(
    cmd: HioCmd,
    seq: int,
    offset: int,
    length: int,
    data: _Data | None = None,
    *,
    memsync: bool = False,
    compression: Compression = Compression.NONE,
    checksum: Checksum = Checksum.NONE,
    version: int = HAST_PROTO_VERSION,
) -> tuple[bytes, Payload | None]:
    """A request ready for ``send_encoded``: ``(frame header + nv list, payload or None)``.

    The bytes of ``encode_frame(nv, pipeline_send(nv, data, ...), version)``
    for ``nv = request_nv(cmd, seq, offset, length, memsync)`` (without
    ``pipeline_send`` when ``data`` is None), and the same errors.
    """
    values = _request_values(cmd, seq, offset, length, memsync)
    if data is None:
        layout = _REQUEST_MEMSYNC if memsync else _REQUEST
        return _encode_header_only(layout, values, version), None
    if memsync:
        return _encode_with_data(
            _REQUEST_MEMSYNC, _REQUEST_MEMSYNC_DATA, values, data, compression, checksum, version
        )
    return _encode_with_data(_REQUEST, _REQUEST_DATA, values, data, compression, checksum, version)


def parse_request(nv: NV, *, sectorsize: int, datasize: int) -> Request:
    """Validate a request header as a secondary must (spec 6.4, Appendix).

    Raises RequestError (reply EINVAL, carrying the request's seq or 0).
    Unlike FreeBSD, an unknown or missing ``cmd`` is answered, not fatal.
    """
    fixed = _fixed_request_fields(nv)
    seq, cmd = (fixed[1], fixed[0]) if fixed is not None else _seq_and_cmd(nv)
    hcmd = _COMMANDS.get(cmd)
    if hcmd is None:
        raise RequestError(f"Unknown command {cmd}.", seq)
    if hcmd is _KEEPALIVE:
        return Request(hcmd, 0, 0, 0)
    if seq == 0:
        raise RequestError("Request has no 'seq' field.", 0)
    offset, length, memsync = fixed[2:] if fixed is not None else _extent(nv, seq)
    if hcmd is _FLUSH:
        return Request(hcmd, seq, 0, 0)
    _check_extent(hcmd, seq, offset, length, sectorsize, datasize)
    return Request(hcmd, seq, offset, length, memsync and hcmd is _WRITE)


def _fixed_request_fields(nv: NV) -> tuple[int, int, int, int, bool] | None:
    """``(cmd, seq, offset, length, memsync)`` of a request decoded as a fixed layout."""
    shape = nv.shape
    if shape is None:
        return None
    layout, values = shape
    has_memsync = _REQUEST_LAYOUTS.get(layout)
    if has_memsync is None:
        return None
    return values[0], values[1], values[2], values[3], has_memsync and values[4] != 0


def _seq_and_cmd(nv: NV) -> tuple[int, int]:
    """``seq`` and ``cmd`` (0 when absent) of any nv list; RequestError if mistyped."""
    try:
        seq = nv.get_uint64("seq", default=0)
    except NVError as exc:
        raise RequestError(f"Invalid 'seq' field: {exc}", 0) from exc
    try:
        cmd = nv.get_uint8("cmd", default=0)
    except NVError as exc:
        raise RequestError(f"Invalid 'cmd' field: {exc}", seq) from exc
    return seq, cmd


def _extent(nv: NV, seq: int) -> tuple[int, int, bool]:
    """``offset``, ``length`` (0 when absent) and ``memsync``; RequestError if mistyped."""
    try:
        offset = nv.get_uint64("offset", default=0)
        length = nv.get_uint64("length", default=0)
        memsync = nv.get_uint8("memsync", default=0) != 0
    except NVError as exc:
        raise RequestError(f"Invalid request field: {exc}", seq) from exc
    return offset, length, memsync


def _check_extent(
    cmd: HioCmd, seq: int, offset: int, length: int, sectorsize: int, datasize: int
) -> None:
    """RequestError unless a READ/WRITE/DELETE range is one the secondary can serve."""
    if length == 0:
        raise RequestError("Request has zero length.", seq)
    if cmd is not _DELETE and length > MAXPHYS:
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


# --- replies --------------------------------------------------------------------


def _reply_layout(seq: int, err: int, received: bool) -> tuple[NVLayout, tuple[int, ...]]:
    """The layout and values of ``reply_nv(seq, err, received)``."""
    if err:
        if received:
            return _REPLY_RECEIVED_ERROR, (seq, 1, to_wire(err))
        return _REPLY_ERROR, (seq, to_wire(err))
    if received:
        return _REPLY_RECEIVED, (seq, 1)
    return _REPLY, (seq,)


def reply_nv(seq: int, err: int = 0, received: bool = False) -> NV:
    """Build a reply; ``err`` is a local (Linux) errno, translated here."""
    layout, values = _reply_layout(seq, err, received)
    return layout.build(values)


def encode_reply(
    seq: int, err: int = 0, received: bool = False, *, version: int = HAST_PROTO_VERSION
) -> bytes:
    """A reply without data, ready for ``send_encoded``: frame header + nv list.

    The bytes of ``encode_frame(reply_nv(seq, err, received), None, version)``,
    and the same errors.
    """
    layout, values = _reply_layout(seq, err, received)
    return _encode_header_only(layout, values, version)


def encode_read_reply(
    seq: int,
    data: _Data,
    *,
    compression: Compression = Compression.NONE,
    checksum: Checksum = Checksum.NONE,
    version: int = HAST_PROTO_VERSION,
) -> tuple[bytes, Payload | None]:
    """A successful READ's reply for ``send_encoded``: ``(frame header + nv list, payload)``.

    The bytes of ``encode_frame(nv, pipeline_send(nv, data, ...), version)``
    for ``nv = reply_nv(seq)``, and the same errors.
    """
    return _encode_with_data(_REPLY, _REPLY_DATA, (seq,), data, compression, checksum, version)


def parse_reply(nv: NV) -> Reply:
    """Decode a reply from conn B (ProtocolError if it is unusable)."""
    fixed = _fixed_reply_fields(nv)
    if fixed is not None:
        seq, err, received = fixed
    else:
        try:
            seq = nv.get_uint64("seq")
            err = nv.get_int16("error", default=0)
            received = nv.get_int8("received", default=0) != 0
        except NVError as exc:
            raise ProtocolError(f"Invalid reply from the secondary: {exc}") from exc
    return Reply(seq, from_wire(err) if err else 0, received)


def _fixed_reply_fields(nv: NV) -> tuple[int, int, bool] | None:
    """``(seq, error as sent, received)`` of a reply decoded as a fixed layout."""
    shape = nv.shape
    if shape is None:
        return None
    layout, values = shape
    positions = _REPLY_LAYOUTS.get(layout)
    if positions is None:
        return None
    received, error = positions
    return values[0], values[error] if error else 0, received != 0 and values[received] != 0


# --- encoding with the fixed layouts --------------------------------------------


def _encode_header_only(layout: NVLayout, values: tuple[int, ...], version: int) -> bytes:
    """Frame header + ``layout`` with ``values``; the generic encoder if they do not fit."""
    head = layout.frame(version, values)
    if head is None:
        head, _ = _split(encode_frame(layout.build(values), None, version))
    return head


def _encode_with_data(
    layout: NVLayout,
    with_size: NVLayout,
    values: tuple[int, ...],
    data: _Data,
    compression: Compression,
    checksum: Checksum,
    version: int,
) -> tuple[bytes, Payload | None]:
    """``layout`` + the pipeline's fields for ``data``, and the payload.

    ``with_size`` is ``layout`` followed by ``size``: all the pipeline adds
    when it neither compresses nor checksums.
    """
    try:
        payload, compressed = compression_send(data, compression)
    except Exception:
        layout.build(values)  # the generic path reports a bad header field first
        raise
    if compressed is None and checksum is _NO_CHECKSUM:
        size = len(payload) if isinstance(payload, bytes) else payload.nbytes
        head = with_size.frame(version, (*values, size))
        if head is not None:
            return head, payload if size else None
    nv = layout.build(values)
    add_pipeline_fields(nv, payload, compressed, checksum)
    return _split(encode_frame(nv, payload, version))


def _split(buffers: list[bytes | memoryview]) -> tuple[bytes, Payload | None]:
    """``encode_frame``'s buffers as ``(head, payload or None)``."""
    head = buffers[0]
    assert isinstance(head, bytes)
    return head, buffers[1] if len(buffers) > 1 else None
