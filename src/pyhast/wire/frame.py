"""HAST message framing, sans-IO (spec 6.2).

Every message on every HAST socket is::

    +---------+---------------+---------------------+----------------------+
    | version | nvsize LE u32 | nv list (nvsize B)  | payload (nv "size" B) |
    +---------+---------------+---------------------+----------------------+

The payload is present only when the nv list has a ``size`` field (uint32)
greater than zero.

Sending
=======

:func:`encode_frame` returns the buffers to hand to ``writelines``/``sendmsg``:
``[header + nv]`` or ``[header + nv, payload]``.  Header and nv are one bytes
object (one concatenation of the packed header and the nv list's encoding);
the payload object is passed through untouched.  The ``size`` field must
already be in the nv list (:func:`pyhast.wire.pipeline.pipeline_send` adds
it) and must match the payload.  The replication messages have faster
encoders that produce the same bytes (:mod:`pyhast.wire.messages`).

Receiving
=========

:class:`FrameDecoder` is a push parser in the h11/wsproto style: the I/O layer
calls :meth:`FrameDecoder.feed` with whatever bytes arrived and then calls
:meth:`FrameDecoder.next_frame` until it returns :data:`NEED_DATA`.  The
state machine::

             +--------------------------------------------------+
             v                                                  |
        +--------+  5 bytes: version ok,     +------+  nv ok,   |
        | HEADER | ------------------------> |  NV  | size == 0 |--> Frame(payload=None)
        +--------+  0 < nvsize <= max_nv     +------+ ----------+
             ^                                  | nv ok, 0 < size <= max_payload
             |                                  v
             |   size bytes received       +---------+
             +---------------------------- | PAYLOAD | --> Frame(payload=view)
                                           +---------+
        any violation (in any state) --> ERROR (sticky: every later call raises)

Limits are checked on the *advertised* sizes, before anything is allocated
or waited for: a version of 0 or above ``max_version`` (errno 73, FreeBSD's
ERPCMISMATCH), an nv size of 0 or above ``max_nv_size``, a ``size`` field of
the wrong type or above ``max_payload`` all raise
:class:`~pyhast.errors.FrameError` as soon as the header (or nv list) is
complete.  nv decoding errors raise :class:`~pyhast.errors.NVError`.  Both are
:class:`~pyhast.errors.ProtocolError`; nothing else escapes.

Buffering: header and nv bytes accumulate in one bytearray with a read
offset that is compacted only when the consumed part is large and at least
half of the buffer, so feeding one byte at a time or many frames at once is
linear.  A payload that is already in that buffer is copied out once, into
a bytes object (the frame's payload is a view of it).  Otherwise, once its
size is known, a bytearray of exactly that size is allocated and later
:meth:`~FrameDecoder.feed` calls copy straight into it; the frame's payload
is a read-only memoryview of it (no further copy).

The nv list is first matched, in place, against the fixed layouts of the
replication messages (:func:`pyhast.wire.nv.decode_fixed`); anything else
goes through :meth:`NV.decode <pyhast.wire.nv.NV.decode>`.  Either way the
result, and every error, is the same.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

from pyhast.defaults import HAST_PROTO_VERSION, MAXPHYS
from pyhast.errors import FrameError, NVTypeError, ProtocolError

from .nv import NV, NVType, decode_fixed

__all__ = [
    "DEFAULT_MAX_NV_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "ERPCMISMATCH",
    "HEADER_SIZE",
    "NEED_DATA",
    "DecoderState",
    "Frame",
    "FrameDecoder",
    "NeedData",
    "decode_header",
    "encode_frame",
    "encode_header",
    "payload_size",
]

#: Frame header length: version (u8) + nv size (LE u32).
HEADER_SIZE: Final = 5
#: Default limit on the nv list of one frame (control replies can be large).
DEFAULT_MAX_NV_SIZE: Final = 1024 * 1024
#: Default limit on a payload: MAXPHYS plus room for a compression header
#: (an LZF payload is at most original + 4 bytes).
DEFAULT_MAX_PAYLOAD: Final = MAXPHYS + 64
#: FreeBSD's ERPCMISMATCH ("RPC version wrong"), 73 in FreeBSD's sys/errno.h.
#: Stored raw in FrameError.errno; pyhast.wire.errnos translates (on Linux 73
#: is EDOTDOT, so never pass it to os.strerror()).
ERPCMISMATCH: Final = 73

_HEADER: Final = struct.Struct("<BI")
_U32_MAX: Final = 0xFFFFFFFF


class NeedData(enum.Enum):
    """Sentinel type returned by :meth:`FrameDecoder.next_frame`."""

    NEED_DATA = "NEED_DATA"


#: More bytes are needed before the next frame is complete.
NEED_DATA: Final = NeedData.NEED_DATA


class DecoderState(enum.Enum):
    """Where :class:`FrameDecoder` is in the current frame."""

    HEADER = "header"
    NV = "nv"
    PAYLOAD = "payload"
    ERROR = "error"


class Frame(NamedTuple):
    """One received message."""

    #: Version byte of the frame header.
    version: int
    #: The decoded nv list.
    nv: NV
    #: The raw (still compressed/checksummed) payload, or None when ``size``
    #: is absent or 0.  A read-only view owned by this frame alone.
    payload: memoryview | None


# Hot-path aliases: on Python 3.11 reading an enum member through its class
# costs ~70 ns, and a NamedTuple's __new__ is a Python function.
_HEADER_STATE: Final = DecoderState.HEADER
_NV_STATE: Final = DecoderState.NV
_PAYLOAD_STATE: Final = DecoderState.PAYLOAD
_ERROR_STATE: Final = DecoderState.ERROR
_UINT32: Final = NVType.UINT32


def _frame(version: int, nv: NV, payload: memoryview | None) -> Frame:
    """``Frame(version, nv, payload)`` without the NamedTuple constructor's Python call."""
    return tuple.__new__(Frame, (version, nv, payload))


def encode_header(version: int, nvsize: int) -> bytes:
    """The 5-byte frame header."""
    if not 0 <= version <= 0xFF or not 0 <= nvsize <= _U32_MAX:
        raise ValueError(f"Invalid frame header (version {version}, nv size {nvsize}).")
    return _HEADER.pack(version, nvsize)


def decode_header(
    b: bytes | bytearray | memoryview,
    *,
    max_version: int = HAST_PROTO_VERSION,
    max_nv_size: int = DEFAULT_MAX_NV_SIZE,
) -> tuple[int, int]:
    """Parse and check a 5-byte frame header; return ``(version, nvsize)``.

    Raises FrameError (errno ERPCMISMATCH for a bad version).
    """
    if len(b) != HEADER_SIZE:
        raise FrameError(f"Frame header is {len(b)} bytes, expected {HEADER_SIZE}.")
    version, nvsize = _HEADER.unpack(b)
    _check_header(version, nvsize, max_version, max_nv_size)
    return version, nvsize


def _check_header(version: int, nvsize: int, max_version: int, max_nv_size: int) -> None:
    if version == 0 or version > max_version:
        raise FrameError(
            f"Unsupported protocol version {version} (at most {max_version}).",
            ERPCMISMATCH,
        )
    if nvsize == 0:
        raise FrameError("Frame has an empty nv list.")
    if nvsize > max_nv_size:
        raise FrameError(f"Frame nv list of {nvsize} bytes exceeds the limit of {max_nv_size}.")


def payload_size(nv: NV, max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """Length of the payload that follows ``nv`` (0 if none); FrameError if invalid."""
    t, size = _size_field(nv)
    if t is None:
        return 0
    if t is not _UINT32:
        raise FrameError(f"Field 'size' is {t.label}, expected uint32.")
    if size > max_payload:
        raise FrameError(f"Payload of {size} bytes exceeds the limit of {max_payload}.")
    return size


def _size_field(nv: NV) -> tuple[NVType | None, int]:
    """Type and value of ``size``: (None, 0) if absent, value 0 unless a uint32."""
    shape = nv.shape
    if shape is not None:  # a fixed layout: read the value directly
        layout, values = shape
        i = layout.index.get("size")
        return (None, 0) if i is None else (layout.types[i], values[i])
    t = nv.type_of("size")
    return t, nv.get_uint32("size") if t is _UINT32 else 0


def encode_frame(
    nv: NV,
    payload: bytes | bytearray | memoryview | None = None,
    version: int = HAST_PROTO_VERSION,
) -> list[bytes | memoryview]:
    """Buffers to send for one message: ``[header+nv]`` or ``[header+nv, payload]``.

    ``nv`` must carry ``size`` = len(payload) when a non-empty payload is
    given, and no positive ``size`` otherwise (ValueError).  The payload is
    returned as is, never copied.
    """
    if payload is not None:
        plen = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    else:
        plen = 0
    try:
        declared = nv.get_uint32("size", default=0)
    except NVTypeError:
        raise ValueError("Field 'size' must be a uint32.") from None
    if declared != plen:
        raise ValueError(f"nv says size {declared} but the payload has {plen} bytes.")
    if not 0 <= version <= 0xFF:
        raise ValueError(f"Invalid frame version {version}.")
    body = nv.encode()
    head = _HEADER.pack(version, len(body)) + body
    if plen == 0:
        return [head]
    assert payload is not None
    return [head, payload if not isinstance(payload, bytearray) else memoryview(payload)]


class FrameDecoder:
    """Incremental, sans-IO decoder of HAST frames (see the module docstring).

    ``max_payload`` may be changed between frames (e.g. raised by the
    handshake code before receiving a bitmap).
    """

    __slots__ = (
        "_buf",
        "_nv",
        "_nvsize",
        "_pbuf",
        "_pfill",
        "_pos",
        "_state",
        "_version",
        "max_nv_size",
        "max_payload",
        "max_version",
    )

    #: Compact the receive buffer once this many consumed bytes precede the
    #: read offset (and they are at least half of the buffer).
    COMPACT_THRESHOLD: Final = 64 * 1024

    def __init__(
        self,
        max_version: int = HAST_PROTO_VERSION,
        max_nv_size: int = DEFAULT_MAX_NV_SIZE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.max_version = max_version
        self.max_nv_size = max_nv_size
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0
        self._state = DecoderState.HEADER
        self._version = 0
        self._nvsize = 0
        self._nv: NV | None = None
        self._pbuf: bytearray | None = None
        self._pfill = 0

    @property
    def state(self) -> DecoderState:
        """Current state of the receive state machine."""
        return self._state

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf) - self._pos + self._pfill

    @property
    def at_frame_boundary(self) -> bool:
        """True if no partial frame is pending (an EOF now would be clean)."""
        return self._state is DecoderState.HEADER and self._pos == len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes.  Cheap: parsing happens in :meth:`next_frame`."""
        if self._state is DecoderState.ERROR:
            raise FrameError("Frame decoder is in the error state.")
        pbuf = self._pbuf
        if pbuf is not None:
            # PAYLOAD state: the receive buffer is empty; copy straight in.
            need = len(pbuf) - self._pfill
            with memoryview(data) as view:
                mv = view.cast("B") if view.ndim != 1 or view.itemsize != 1 else view
                n = mv.nbytes
                if n <= need:
                    pbuf[self._pfill : self._pfill + n] = mv
                    self._pfill += n
                    return
                pbuf[self._pfill :] = mv[:need]
                self._pfill += need
                self._buf += mv[need:]
            return
        self._buf += data

    def payload_window(self, minimum: int = 1) -> memoryview | None:
        """Where the rest of the current payload goes, for a zero-copy read.

        In the PAYLOAD state with at least ``minimum`` bytes still missing,
        a writable view of exactly those bytes (receive into it, then call
        :meth:`payload_filled`); otherwise None (use :meth:`feed`).  Bytes
        past the payload never belong in it, so a read into the window can
        never swallow the next frame.
        """
        pbuf = self._pbuf
        if pbuf is None or len(pbuf) - self._pfill < minimum:
            return None
        return memoryview(pbuf)[self._pfill :]

    def payload_filled(self, nbytes: int) -> None:
        """``nbytes`` were received into the last :meth:`payload_window`."""
        pbuf = self._pbuf
        if pbuf is None or not 0 <= nbytes <= len(pbuf) - self._pfill:
            raise ValueError("payload_filled() without a matching payload_window()")
        self._pfill += nbytes

    def next_frame(self) -> Frame | NeedData:
        """Return the next complete frame, or NEED_DATA.  Raises ProtocolError."""
        try:
            if self._state is not _HEADER_STATE:
                return self._resume()
            buf = self._buf
            pos = self._pos
            if len(buf) - pos < HEADER_SIZE:
                return NEED_DATA
            version, nvsize = _HEADER.unpack_from(buf, pos)
            if not (0 < version <= self.max_version and 0 < nvsize <= self.max_nv_size):
                _check_header(version, nvsize, self.max_version, self.max_nv_size)
            pos += HEADER_SIZE
            if len(buf) < pos + nvsize:
                self._pos = pos
                self._version = version
                self._nvsize = nvsize
                self._state = _NV_STATE
                return NEED_DATA
            # The usual case: the whole nv list is here (no state to keep).
            return self._after_header(version, pos, pos + nvsize)
        except ProtocolError:
            self._state = _ERROR_STATE
            raise

    def _resume(self) -> Frame | NeedData:
        """next_frame() in the middle of a frame: NV or PAYLOAD state (or ERROR)."""
        state = self._state
        if state is _ERROR_STATE:
            raise FrameError("Frame decoder is in the error state.")
        if state is _NV_STATE:
            pos = self._pos
            end = pos + self._nvsize
            if len(self._buf) < end:
                return NEED_DATA
            return self._after_header(self._version, pos, end)
        pbuf = self._pbuf
        assert pbuf is not None and self._nv is not None
        if self._pfill < len(pbuf):
            return NEED_DATA
        frame = _frame(self._version, self._nv, memoryview(pbuf).toreadonly())
        self._nv = None
        self._pbuf = None
        self._pfill = 0
        return self._finish(frame)

    def _after_header(self, version: int, pos: int, end: int) -> Frame | NeedData:
        """Decode the nv list at ``_buf[pos:end]``, then the frame or the PAYLOAD state."""
        self._pos = end
        nv = decode_fixed(self._buf, pos, end - pos)  # in place, no copy
        if nv is None:
            with memoryview(self._buf) as view:
                raw = bytes(view[pos:end])
            nv = NV.decode(raw)
        size = payload_size(nv, self.max_payload)
        if size == 0:
            return self._finish(_frame(version, nv, None))
        if len(self._buf) - end >= size:
            return self._finish(_frame(version, nv, self._take_payload(size)))
        self._version = version
        self._nv = nv
        self._start_payload(size)  # not all here: NEED_DATA
        return NEED_DATA

    def _take_payload(self, size: int) -> memoryview:
        """A payload that is entirely in the receive buffer: one copy, read-only view."""
        pos = self._pos
        end = pos + size
        with memoryview(self._buf) as view:
            payload = bytes(view[pos:end])
        self._pos = end
        return memoryview(payload)

    def _start_payload(self, size: int) -> None:
        pbuf = bytearray(size)
        pos = self._pos
        take = min(size, len(self._buf) - pos)
        if take:
            with memoryview(self._buf) as view:
                pbuf[:take] = view[pos : pos + take]
            self._pos = pos + take
        self._pbuf = pbuf
        self._pfill = take
        self._state = _PAYLOAD_STATE
        self._compact()

    def _finish(self, frame: Frame) -> Frame:
        self._state = _HEADER_STATE
        if self._pos == len(self._buf) or self._pos >= self.COMPACT_THRESHOLD:
            self._compact()
        return frame

    def _compact(self) -> None:
        pos = self._pos
        buf = self._buf
        if pos == len(buf):
            if pos:
                buf.clear()
                self._pos = 0
        elif pos >= self.COMPACT_THRESHOLD and 2 * pos >= len(buf):
            del buf[:pos]
            self._pos = 0
