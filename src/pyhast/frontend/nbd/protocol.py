"""Sans-IO codec for the server side of the NBD protocol.

Rules (h11 style):

* No sockets, no asyncio, no logging, no clock.  Bytes go in with
  ``receive_data()``/``feed()`` (or ``get_buffer()``/``buffer_updated()`` for a
  zero-copy receive), events come out of ``next_event()``/``next_request()``,
  and bytes to send come out of ``data_to_send()`` or the ``encode_*``
  functions.
* Anything a peer can cause raises :class:`~pyhast.errors.ProtocolError` and
  nothing else.  A ProtocolError means "drop the connection" (a hard
  disconnect, which the protocol allows on a violation of a MUST).  A request
  that is merely *invalid* (bad range, unknown command, bad flag) is not a
  ProtocolError: the request is decoded, :func:`validate_request` returns an
  errno, and the caller replies with an error and keeps the connection.
* Every limit is checked on the advertised length *before* anything is
  allocated or buffered (:data:`MAX_OPTION_LENGTH`, :data:`MAX_PAYLOAD`).

Theory of operation
-------------------

Handshake (fixed newstyle only; oldstyle is obsolete and not offered)::

    S: NBDMAGIC  IHAVEOPT  u16 handshake flags (FIXED_NEWSTYLE|NO_ZEROES)
    C: u32 client flags
    repeat:
      C: IHAVEOPT  u32 option  u32 length  data[length]
      S: for each reply: u64 REPLY_MAGIC  u32 option  u32 reply type  u32 len  data
    until NBD_OPT_GO is answered with NBD_REP_ACK, or NBD_OPT_EXPORT_NAME is
    answered with u64 size, u16 transmission flags (and 124 zero bytes unless
    the client set NO_ZEROES), or the client sends NBD_OPT_ABORT.

:class:`ServerHandshake` answers every option by itself from a catalog of
:class:`ExportInfo`; its caller only moves bytes and watches for
:class:`HandshakeComplete` / :class:`HandshakeAborted`.

Transmission::

    C: u32 0x25609513  u16 flags  u16 type  u64 cookie  u64 offset  u32 length
       (+ length bytes of payload for NBD_CMD_WRITE)
    S: u32 0x67446698  u32 error  u64 cookie  (+ length bytes for a good READ)

Only *simple* replies are implemented.  NBD_OPT_STRUCTURED_REPLY, the
metadata-context options (and so NBD_CMD_BLOCK_STATUS), extended headers and
STARTTLS are answered NBD_REP_ERR_UNSUP, which every client handles by falling
back to simple replies.

Payload ownership
-----------------

:class:`RequestDecoder` keeps one receive buffer and parses as many requests
out of it per call as are complete.  A WRITE payload must outlive that buffer
(the buffer is reused by the next receive), so the decoder never hands out a
view of it:

* a payload that already sits whole in the receive buffer is copied once into
  a ``bytes`` object (a 4 KiB copy costs well under a microsecond, less than
  allocating a fresh buffer per receive would);
* a payload of :data:`DIRECT_PAYLOAD_THRESHOLD` bytes or more that is not yet
  whole gets its own ``bytearray``; the bytes already received are copied into
  it and ``get_buffer()`` then points the socket straight into the rest of it,
  so a large write is received with no further copy.  The request owns that
  bytearray; the decoder keeps no reference to it once the request is out.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from pyhast.errors import ProtocolError

__all__ = [
    "CLIENT_FLAGS_KNOWN",
    "DEFAULT_BLOCK_SIZE",
    "DIRECT_PAYLOAD_THRESHOLD",
    "HANDSHAKE_FLAGS",
    "IHAVEOPT",
    "MAX_OPTIONS",
    "MAX_OPTION_LENGTH",
    "MAX_PAYLOAD",
    "NBDMAGIC",
    "NEED_DATA",
    "REPLY_MAGIC",
    "REQUEST_HEADER",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "ExportInfo",
    "HandshakeAborted",
    "HandshakeComplete",
    "HandshakeFlag",
    "InfoType",
    "NBDErr",
    "NeedData",
    "Opt",
    "OptionHandled",
    "Rep",
    "Request",
    "RequestDecoder",
    "ServerHandshake",
    "TransmissionFlag",
    "encode_simple_reply",
    "nbd_error",
    "transmission_flags",
    "validate_request",
]

# --------------------------------------------------------------------------
# Constants (values from the NBD protocol document, doc/proto.md).
# --------------------------------------------------------------------------

#: "NBDMAGIC", first 8 bytes the server sends.
NBDMAGIC: Final = 0x4E42444D41474943
#: "IHAVEOPT", sent by the server after NBDMAGIC and by the client before each option.
IHAVEOPT: Final = 0x49484156454F5054
#: Magic of every option reply (fixed newstyle).
REPLY_MAGIC: Final = 0x3E889045565A9
#: Magic of every transmission request.
REQUEST_MAGIC: Final = 0x25609513
#: Magic of a simple reply.
SIMPLE_REPLY_MAGIC: Final = 0x67446698

#: Largest option payload we accept; a larger one is treated as hostile.
MAX_OPTION_LENGTH: Final = 64 * 1024
#: Options accepted on one connection before we call it a denial of service.
MAX_OPTIONS: Final = 1024
#: Largest WRITE payload (and READ reply) we will ever carry: 2**25 bytes, the
#: size the protocol says SHOULD NOT be considered a denial of service.  A
#: WRITE header announcing more is hostile and drops the connection.
MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: Default (minimum, preferred, maximum) block size of an export.
DEFAULT_BLOCK_SIZE: Final = (1, 4096, MAX_PAYLOAD)
#: WRITE payloads at least this large and not yet whole are received directly
#: into their own buffer (see "Payload ownership").
DIRECT_PAYLOAD_THRESHOLD: Final = 64 * 1024
#: Size of the decoder's receive buffer: QD32 x 4 KiB writes fit several times.
RECEIVE_BUFFER_SIZE: Final = 512 * 1024
#: Free space below which get_buffer() compacts the receive buffer first.
MIN_RECEIVE_SPACE: Final = 64 * 1024
#: Length of an NBD string (export name, description) allowed by the spec.
MAX_STRING: Final = 4096


class HandshakeFlag(enum.IntFlag):
    """Handshake flags sent by the server (16 bits)."""

    #: Server speaks fixed newstyle.
    FIXED_NEWSTYLE = 1 << 0
    #: Server may omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (32 bits) answering the handshake flags."""

    #: Client speaks fixed newstyle.
    FIXED_NEWSTYLE = 1 << 0
    #: Server MUST NOT send the 124 zero bytes after NBD_OPT_EXPORT_NAME.
    NO_ZEROES = 1 << 1


#: The handshake flags this server always sends.
HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
#: Client flags we understand; any other bit drops the connection.
CLIENT_FLAGS_KNOWN: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class TransmissionFlag(enum.IntFlag):
    """Per-export transmission flags (16 bits)."""

    #: Always set.
    HAS_FLAGS = 1 << 0
    #: Export is read-only; writes fail with EPERM.
    READ_ONLY = 1 << 1
    #: NBD_CMD_FLUSH is supported.
    SEND_FLUSH = 1 << 2
    #: NBD_CMD_FLAG_FUA is supported.
    SEND_FUA = 1 << 3
    #: Rotational medium hint (never set by us).
    ROTATIONAL = 1 << 4
    #: NBD_CMD_TRIM is supported.
    SEND_TRIM = 1 << 5
    #: NBD_CMD_WRITE_ZEROES (and NBD_CMD_FLAG_NO_HOLE) is supported.
    SEND_WRITE_ZEROES = 1 << 6
    #: Don't-fragment for structured reads (never set: no structured replies).
    SEND_DF = 1 << 7
    #: Flush and FUA are visible across every connection to the export.
    CAN_MULTI_CONN = 1 << 8
    #: Experimental RESIZE extension (never set).
    SEND_RESIZE = 1 << 9
    #: NBD_CMD_CACHE is understood (never set).
    SEND_CACHE = 1 << 10
    #: NBD_CMD_FLAG_FAST_ZERO is understood (never set).
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    """Option types sent by the client during option haggling."""

    #: Choose an export and enter transmission; cannot report errors.
    EXPORT_NAME = 1
    #: Client wants to end the session (soft disconnect).
    ABORT = 2
    #: List the exports.
    LIST = 3
    #: Withdrawn PEEK_EXPORT extension.
    PEEK_EXPORT = 4
    #: Upgrade to TLS (unsupported: NOTLS mode).
    STARTTLS = 5
    #: Describe an export without entering transmission.
    INFO = 6
    #: Describe an export and enter transmission.
    GO = 7
    #: Use structured replies (unsupported: simple replies only).
    STRUCTURED_REPLY = 8
    #: List metadata contexts (unsupported).
    LIST_META_CONTEXT = 9
    #: Select metadata contexts (unsupported).
    SET_META_CONTEXT = 10
    #: Use extended headers (unsupported).
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    #: Option accepted / final reply of a list.
    ACK = 1
    #: One export in an NBD_OPT_LIST answer.
    SERVER = 2
    #: One piece of export information (NBD_OPT_INFO/GO).
    INFO = 3
    #: One metadata context.
    META_CONTEXT = 4
    #: Option not known to this server.
    ERR_UNSUP = (1 << 31) + 1
    #: Option forbidden by policy.
    ERR_POLICY = (1 << 31) + 2
    #: Option syntactically or semantically invalid.
    ERR_INVALID = (1 << 31) + 3
    #: Option not supported on this platform.
    ERR_PLATFORM = (1 << 31) + 4
    #: TLS required first.
    ERR_TLS_REQD = (1 << 31) + 5
    #: The requested export does not exist.
    ERR_UNKNOWN = (1 << 31) + 6
    #: The server is shutting down.
    ERR_SHUTDOWN = (1 << 31) + 7
    #: Client must request NBD_INFO_BLOCK_SIZE first.
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    #: Request or reply too large.
    ERR_TOO_BIG = (1 << 31) + 9


class InfoType(enum.IntEnum):
    """Information types in NBD_REP_INFO replies."""

    #: u64 size, u16 transmission flags (mandatory).
    EXPORT = 0
    #: Canonical export name.
    NAME = 1
    #: Human-readable description.
    DESCRIPTION = 2
    #: u32 minimum, u32 preferred, u32 maximum block size.
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """Transmission request types."""

    #: Read length bytes at offset.
    READ = 0
    #: Write the payload at offset.
    WRITE = 1
    #: Disconnect after outstanding requests (no reply).
    DISC = 2
    #: Make every acknowledged write durable.
    FLUSH = 3
    #: Discard a range (advisory).
    TRIM = 4
    #: Prefetch hint (not advertised).
    CACHE = 5
    #: Make a range read as zeroes.
    WRITE_ZEROES = 6
    #: Metadata query (needs structured replies: not supported).
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    """Command flags (16 bits) of a request."""

    #: Force unit access: reply only once the data is durable.
    FUA = 1 << 0
    #: WRITE_ZEROES must not punch a hole.
    NO_HOLE = 1 << 1
    #: Don't fragment a structured read (not advertised).
    DF = 1 << 2
    #: One extent per context in BLOCK_STATUS (not advertised).
    REQ_ONE = 1 << 3
    #: Fail WRITE_ZEROES fast unless cheap (not advertised).
    FAST_ZERO = 1 << 4


class NBDErr(enum.IntEnum):
    """Error values allowed in a reply (these happen to equal Linux errnos)."""

    #: Operation not permitted (e.g. write to a read-only export).
    EPERM = 1
    #: Input/output error.
    EIO = 5
    #: Cannot allocate memory.
    ENOMEM = 12
    #: Invalid argument (bad request).
    EINVAL = 22
    #: No space left (write beyond the end, EDQUOT, EFBIG).
    ENOSPC = 28
    #: Value too large.
    EOVERFLOW = 75
    #: Operation not supported.
    ENOTSUP = 95
    #: Server is shutting down.
    ESHUTDOWN = 108


# --------------------------------------------------------------------------
# The one errno -> NBD error mapping.
# --------------------------------------------------------------------------

_ERRNO_TO_NBD: Final[dict[int, int]] = {
    0: 0,
    _errno.EPERM: NBDErr.EPERM,
    _errno.EACCES: NBDErr.EPERM,
    _errno.EROFS: NBDErr.EPERM,
    _errno.EIO: NBDErr.EIO,
    _errno.ENOMEM: NBDErr.ENOMEM,
    _errno.EINVAL: NBDErr.EINVAL,
    _errno.ENOSPC: NBDErr.ENOSPC,
    _errno.EDQUOT: NBDErr.ENOSPC,
    _errno.EFBIG: NBDErr.ENOSPC,
    _errno.EOVERFLOW: NBDErr.EOVERFLOW,
    _errno.ENOTSUP: NBDErr.ENOTSUP,
    _errno.EOPNOTSUPP: NBDErr.ENOTSUP,
    _errno.ESHUTDOWN: NBDErr.ESHUTDOWN,
}


def nbd_error(err: int | None) -> int:
    """Map a system errno to the NBD error value to put in a reply.

    This is the only place where errnos become wire values.  ``0`` stays
    ``0``; an errno the protocol has no value for becomes ``NBD_EIO``
    (a backend failure the client cannot act on is an I/O error to it).
    """
    if err is None:
        return int(NBDErr.EIO)
    return int(_ERRNO_TO_NBD.get(err, NBDErr.EIO))


# --------------------------------------------------------------------------
# Exports.
# --------------------------------------------------------------------------


def transmission_flags(*, read_only: bool, can_multi_conn: bool) -> int:
    """The transmission flags to advertise for an export with these properties.

    FLUSH is always offered.  FUA, TRIM and WRITE_ZEROES are offered only on a
    writable export.  CAN_MULTI_CONN is set only when the backend says flush
    is global (its cache is shared by every connection).
    """
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= (
            TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
        )
    if can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export.

    ``block_size`` is (minimum, preferred, maximum) as in NBD_INFO_BLOCK_SIZE;
    the constructor checks the protocol's rules on it and on the name.
    """

    name: str
    size: int
    read_only: bool = False
    can_multi_conn: bool = False
    block_size: tuple[int, int, int] = DEFAULT_BLOCK_SIZE
    description: str = ""
    flags: int = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"Export size {self.size} is out of range.")
        for text, what in ((self.name, "name"), (self.description, "description")):
            raw = text.encode("utf-8")
            if len(raw) > MAX_STRING or "\0" in text:
                raise ValueError(f"Export {what} {text!r} is not a valid NBD string.")
        minimum, preferred, maximum = self.block_size
        if not (_is_power_of_two(minimum) and minimum <= 65536):
            raise ValueError(f"Minimum block size {minimum} is not a power of 2 <= 64 KiB.")
        if not (_is_power_of_two(preferred) and preferred >= max(minimum, 512)):
            raise ValueError(f"Preferred block size {preferred} is invalid.")
        if not (maximum % minimum == 0 and preferred <= maximum <= MAX_PAYLOAD):
            raise ValueError(f"Maximum block size {maximum} is invalid.")
        object.__setattr__(
            self,
            "flags",
            transmission_flags(read_only=self.read_only, can_multi_conn=self.can_multi_conn),
        )


# --------------------------------------------------------------------------
# Handshake.
# --------------------------------------------------------------------------


class NeedData:
    """Sentinel class: the decoder needs more bytes before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: The one NeedData instance.
NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was received and fully answered (for tracing)."""

    option: int
    reply: int
    export_name: str | None = None


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Transmission starts now on ``export``.

    ``trailing_data`` holds bytes the client sent after its final option
    (the first transmission requests, if it pipelined them).
    """

    export: ExportInfo
    trailing_data: bytes = b""


@dataclass(frozen=True, slots=True)
class HandshakeAborted:
    """The client sent NBD_OPT_ABORT (answered with ACK); close after sending."""


HandshakeEvent = OptionHandled | HandshakeComplete | HandshakeAborted | NeedData

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, type, length
_GREETING = struct.Struct(">QQH")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


class _HState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    DONE = "done"  # transmission entered or aborted


class ServerHandshake:
    """Server side of the fixed newstyle handshake, as a state machine.

    Create it, send ``data_to_send()`` (the greeting), then alternate
    ``receive_data()`` and ``next_event()`` (sending ``data_to_send()`` after
    each event) until :class:`HandshakeComplete` or :class:`HandshakeAborted`.
    ``next_event()`` raises :class:`ProtocolError` on anything that requires a
    hard disconnect; after that, and after the final event, the object must
    not be fed again.

    ``exports`` maps names to exports; ``default`` names the export chosen by
    the empty name (None: the empty name is unknown).
    """

    def __init__(self, exports: Mapping[str, ExportInfo], default: str | None = None) -> None:
        if default is not None and default not in exports:
            raise ValueError(f"Default export {default!r} is not among the exports.")
        self._exports = dict(exports)
        self._default = default
        self._buf = bytearray()
        self._out = bytearray(_GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS))
        self._state = _HState.CLIENT_FLAGS
        self._no_zeroes = False
        self._options = 0
        self._error: ProtocolError | None = None

    # -- I/O-facing API -----------------------------------------------------

    @property
    def done(self) -> bool:
        """True once transmission was entered or the client aborted."""
        return self._state is _HState.DONE

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the client."""
        if self._state is _HState.DONE:
            raise RuntimeError("The handshake is over; feed the transmission decoder.")
        self._buf += data

    def data_to_send(self) -> bytes:
        """Bytes to send to the client now (and forget them)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> HandshakeEvent:
        """Process buffered input and return the next event, or NEED_DATA."""
        if self._error is not None:
            raise self._error
        if self._state is _HState.DONE:
            raise RuntimeError("The handshake is over.")
        try:
            if self._state is _HState.CLIENT_FLAGS:
                if len(self._buf) < 4:
                    return NEED_DATA
                (flags,) = _U32.unpack_from(self._buf, 0)
                del self._buf[:4]
                if flags & ~CLIENT_FLAGS_KNOWN:
                    raise ProtocolError(f"Client sent unknown client flags 0x{flags:08x}.")
                self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
                self._state = _HState.OPTIONS
            return self._next_option()
        except ProtocolError as exc:
            self._error = exc
            raise

    # -- option haggling ----------------------------------------------------

    def _next_option(self) -> HandshakeEvent:
        buf = self._buf
        if len(buf) < _OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(buf, 0)
        if magic != IHAVEOPT:
            raise ProtocolError(f"Option has bad magic 0x{magic:016x}.")
        if length > MAX_OPTION_LENGTH:
            raise ProtocolError(f"Option {option} is {length} bytes long, over the limit.")
        end = _OPTION_HEADER.size + length
        if len(buf) < end:
            return NEED_DATA
        self._options += 1
        if self._options > MAX_OPTIONS:
            raise ProtocolError(f"Client sent more than {MAX_OPTIONS} options.")
        data = bytes(buf[_OPTION_HEADER.size : end])
        del buf[:end]
        handler = _OPTION_HANDLERS.get(option, ServerHandshake._opt_unsupported)
        return handler(self, option, data)

    def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(REPLY_MAGIC, option, rep, len(data))
        self._out += data

    def _error_reply(self, option: int, rep: Rep, message: str) -> OptionHandled:
        self._reply(option, rep, message.encode("utf-8"))
        return OptionHandled(option, int(rep))

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self._default is not None:
            return self._exports[self._default]
        return self._exports.get(name)

    def _finish(self, export: ExportInfo) -> HandshakeComplete:
        self._state = _HState.DONE
        trailing = bytes(self._buf)
        self._buf.clear()
        return HandshakeComplete(export, trailing)

    def _opt_unsupported(self, option: int, data: bytes) -> HandshakeEvent:
        return self._error_reply(option, Rep.ERR_UNSUP, f"Option {option} is not supported.")

    def _opt_abort(self, option: int, data: bytes) -> HandshakeEvent:
        # Data SHOULD be ignored rather than rejected.
        self._reply(option, Rep.ACK)
        self._state = _HState.DONE
        return HandshakeAborted()

    def _opt_list(self, option: int, data: bytes) -> HandshakeEvent:
        if data:
            return self._error_reply(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data.")
        for name, export in self._exports.items():
            raw = name.encode("utf-8")
            body = _U32.pack(len(raw)) + raw + export.description.encode("utf-8")
            self._reply(option, Rep.SERVER, body)
        self._reply(option, Rep.ACK)
        return OptionHandled(option, int(Rep.ACK))

    def _opt_export_name(self, option: int, data: bytes) -> HandshakeEvent:
        name = _decode_string(data)
        export = self._lookup(name) if name is not None else None
        if export is None:
            # This option cannot report an error: the spec mandates a hard disconnect.
            raise ProtocolError(f"Client asked for unknown export {data[:64]!r}.")
        self._out += _EXPORT_NAME_REPLY.pack(export.size, export.flags)
        if not self._no_zeroes:
            self._out += bytes(124)
        return self._finish(export)

    def _opt_info_go(self, option: int, data: bytes) -> HandshakeEvent:
        # u32 name length, name, u16 count, count x u16 info requests.
        if len(data) < 6:
            return self._error_reply(option, Rep.ERR_INVALID, "Option data is too short.")
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > len(data) - 6:
            return self._error_reply(option, Rep.ERR_INVALID, "Export name overruns option.")
        (count,) = _U16.unpack_from(data, 4 + namelen)
        if len(data) != 6 + namelen + 2 * count:
            return self._error_reply(option, Rep.ERR_INVALID, "Option length is inconsistent.")
        name = _decode_string(data[4 : 4 + namelen])
        if name is None:
            return self._error_reply(option, Rep.ERR_INVALID, "Export name is not valid.")
        requests = {
            _U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(count)
        }  # duplicates are tolerated
        export = self._lookup(name)
        if export is None:
            self._reply(option, Rep.ERR_UNKNOWN, f"Export {name!r} does not exist.".encode())
            return OptionHandled(option, int(Rep.ERR_UNKNOWN), name)
        self._reply(option, Rep.INFO, _INFO_EXPORT.pack(InfoType.EXPORT, export.size, export.flags))
        # Block size constraints are always sent: a client that did not ask
        # ignores them, one that did is bound by them.
        self._reply(
            option, Rep.INFO, _INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, *export.block_size)
        )
        if InfoType.NAME in requests:
            self._reply(option, Rep.INFO, _U16.pack(InfoType.NAME) + export.name.encode())
        if InfoType.DESCRIPTION in requests and export.description:
            self._reply(
                option, Rep.INFO, _U16.pack(InfoType.DESCRIPTION) + export.description.encode()
            )
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            return self._finish(export)
        return OptionHandled(option, int(Rep.ACK), name)


def _decode_string(raw: bytes) -> str | None:
    """An NBD string as str, or None if it is not one (bad UTF-8, NUL, too long)."""
    if len(raw) > MAX_STRING:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\0" in text:
        return None
    return text


_OPTION_HANDLERS: Final[dict[int, Callable[[ServerHandshake, int, bytes], HandshakeEvent]]] = {
    Opt.EXPORT_NAME: ServerHandshake._opt_export_name,
    Opt.ABORT: ServerHandshake._opt_abort,
    Opt.LIST: ServerHandshake._opt_list,
    Opt.INFO: ServerHandshake._opt_info_go,
    Opt.GO: ServerHandshake._opt_info_go,
}


# --------------------------------------------------------------------------
# Transmission: requests.
# --------------------------------------------------------------------------

#: magic, flags, type, cookie, offset, length
REQUEST_HEADER: Final = struct.Struct(">IHHQQI")
_REQ_SIZE: Final = REQUEST_HEADER.size  # 28
_SIMPLE_REPLY: Final = struct.Struct(">IIQ")


class Request(NamedTuple):
    """One decoded transmission request.

    ``data`` is the WRITE payload (owned by the request: see the module
    docstring), and None for every other command.
    """

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | bytearray | None = None


class RequestDecoder:
    """Buffered decoder of transmission requests.

    Feed bytes with :meth:`feed`, or receive straight into the decoder with
    :meth:`get_buffer` + :meth:`buffer_updated` (asyncio BufferedProtocol
    style); then pull requests with :meth:`next_request` (one) or
    :meth:`read_requests` (all that are complete, up to a limit).

    A bad magic or a WRITE announcing more than ``max_payload`` bytes raises
    :class:`ProtocolError` (after the requests that preceded it have been
    returned); the decoder is then broken and raises again.
    """

    __slots__ = (
        "_buf",
        "_end",
        "_error",
        "_large_writes",
        "_max_payload",
        "_payload",
        "_payload_filled",
        "_payload_header",
        "_start",
        "_view",
    )

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buf = bytearray(RECEIVE_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        # A large WRITE being received directly into its own buffer.
        self._payload: bytearray | None = None
        self._payload_filled = 0
        self._payload_header: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._error: ProtocolError | None = None
        # The last WRITE was large: the next one likely is too, so read its
        # header with a small window (what comes with it is copied once more).
        self._large_writes = False

    # -- receiving ----------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as requests."""
        return self._end - self._start + self._payload_filled

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer to receive into; call buffer_updated() after."""
        payload = self._payload
        if payload is not None and self._payload_filled < len(payload):
            return memoryview(payload)[self._payload_filled :]
        # (A completed payload not yet collected: what follows it belongs to
        # the next request, in the receive buffer.)
        if len(self._buf) - self._end < MIN_RECEIVE_SPACE:
            self._make_room(MIN_RECEIVE_SPACE)
        if self._large_writes:
            return self._view[self._end : self._end + MIN_RECEIVE_SPACE]
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last get_buffer()."""
        payload = self._payload
        if payload is not None and self._payload_filled < len(payload):
            self._payload_filled += nbytes
        else:
            self._end += nbytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copying them)."""
        mv = memoryview(data).cast("B")
        while mv:
            buf = self.get_buffer()
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            self.buffer_updated(n)
            mv = mv[n:]

    def _make_room(self, need: int) -> None:
        """Move unparsed bytes to the front, growing the buffer if needed."""
        pending = self._end - self._start
        if len(self._buf) - pending < need:
            # Replace rather than resize: a view of the old buffer may still
            # be held by the transport that is calling us.
            new = bytearray(max(len(self._buf) * 2, pending + need))
            new[:pending] = self._view[self._start : self._end]
            self._buf = new
            self._view = memoryview(new)
        elif self._start:
            self._buf[:pending] = self._view[self._start : self._end]
        self._start = 0
        self._end = pending

    # -- parsing ------------------------------------------------------------

    def next_request(self) -> Request | None:
        """The next complete request, or None if more bytes are needed."""
        requests = self.read_requests(1)
        return requests[0] if requests else None

    def read_requests(self, limit: int = 1 << 30, max_bytes: int = 1 << 62) -> list[Request]:
        """Every complete request buffered, at most ``limit`` of them.

        Stops early once the READ and WRITE lengths of the requests returned
        add up to ``max_bytes`` or more (the request that crosses it is
        included), so a caller can bound the memory its requests will pin.
        """
        if self._error is not None:
            raise self._error
        out: list[Request] = []
        if limit <= 0:
            return out
        budget = max_bytes
        payload = self._payload
        if payload is not None:
            if self._payload_filled < len(payload):
                return out
            flags, cmd, cookie, offset, length = self._payload_header
            out.append(Request(cmd, flags, cookie, offset, length, payload))
            self._payload = None
            self._payload_filled = 0
            budget -= length
        buf = self._buf
        view = self._view
        start = self._start
        end = self._end
        unpack = REQUEST_HEADER.unpack_from
        try:
            while len(out) < limit and budget > 0 and end - start >= _REQ_SIZE:
                magic, flags, cmd, cookie, offset, length = unpack(buf, start)
                if magic != REQUEST_MAGIC:
                    raise ProtocolError(f"Request has bad magic 0x{magic:08x}.")
                if cmd != _WRITE:
                    start += _REQ_SIZE
                    out.append(Request(cmd, flags, cookie, offset, length))
                    if cmd == _READ:
                        budget -= length
                    continue
                if length > self._max_payload:
                    raise ProtocolError(f"WRITE payload of {length} bytes is over the limit.")
                self._large_writes = length >= DIRECT_PAYLOAD_THRESHOLD
                body = start + _REQ_SIZE
                if end - body >= length:
                    start = body + length
                    out.append(Request(cmd, flags, cookie, offset, length, bytes(view[body:start])))
                    budget -= length
                    continue
                if length >= DIRECT_PAYLOAD_THRESHOLD:
                    # Receive the rest of this payload straight into its own buffer.
                    payload = bytearray(length)
                    have = end - body
                    payload[:have] = view[body:end]
                    self._payload = payload
                    self._payload_filled = have
                    self._payload_header = (flags, cmd, cookie, offset, length)
                    start = end = 0
                break
        except ProtocolError as exc:
            # Requests decoded before the violation are still delivered; the
            # error is raised by the next call.
            self._error = exc
            if not out:
                raise
        finally:
            if start == end:
                start = end = 0
            self._start = start
            self._end = end
        return out

    @property
    def at_boundary(self) -> bool:
        """True if no partial request is buffered (a clean place to stop)."""
        return self._payload is None and self._start == self._end


# --------------------------------------------------------------------------
# Validation (separate from execution, as in nbdkit).
# --------------------------------------------------------------------------

# Plain ints: enum member access costs a descriptor call on the hot path.
_READ: Final = int(Cmd.READ)
_WRITE: Final = int(Cmd.WRITE)
_DISC: Final = int(Cmd.DISC)
_FLUSH: Final = int(Cmd.FLUSH)
_TRIM: Final = int(Cmd.TRIM)
_WRITE_ZEROES: Final = int(Cmd.WRITE_ZEROES)
_FUA: Final = int(CmdFlag.FUA)
_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
_EINVAL: Final = _errno.EINVAL
_ENOSPC: Final = _errno.ENOSPC
_EPERM: Final = _errno.EPERM


def validate_request(req: Request, export: ExportInfo) -> int:
    """Check a request against the export; 0 if valid, else the errno to reply.

    Rules (doc/proto.md): unknown command -> EINVAL; a flag not defined for
    the command -> EINVAL (FUA is accepted on every command, NO_HOLE only on
    WRITE_ZEROES); write, trim or zero on a read-only export -> EPERM; length
    0 -> EINVAL; READ, WRITE and WRITE_ZEROES longer than the maximum block
    size -> EINVAL (TRIM is bounded only by the export size); a range past
    the end -> ENOSPC for WRITE and WRITE_ZEROES, EINVAL otherwise; offset or
    length not a multiple of the minimum block size -> EINVAL; FLUSH and DISC
    with a nonzero offset or length -> EINVAL.
    """
    cmd, flags, _, offset, length, _ = req
    if cmd in (_READ, _WRITE):  # the hot path
        if flags & ~_FUA:
            return _EINVAL
        if cmd == _WRITE and export.read_only:
            return _EPERM
        minimum, _, maximum = export.block_size
        if length == 0 or length > maximum:
            return _EINVAL
        if offset + length > export.size:
            return _ENOSPC if cmd == _WRITE else _EINVAL
    elif cmd in (_FLUSH, _DISC):
        if flags & ~_FUA or offset or length:
            return _EINVAL
        return 0
    elif cmd in (_TRIM, _WRITE_ZEROES):
        if flags & ~(_FUA | _NO_HOLE if cmd == _WRITE_ZEROES else _FUA):
            return _EINVAL
        if export.read_only:
            return _EPERM
        minimum, _, maximum = export.block_size
        if length == 0 or (length > maximum and cmd == _WRITE_ZEROES):
            return _EINVAL
        if offset + length > export.size:
            return _ENOSPC if cmd == _WRITE_ZEROES else _EINVAL
    else:
        return _EINVAL
    if minimum > 1 and (offset % minimum or length % minimum):
        return _EINVAL
    return 0


# --------------------------------------------------------------------------
# Transmission: replies.
# --------------------------------------------------------------------------


def encode_simple_reply(error: int, cookie: int) -> bytes:
    """The 16-byte simple reply header; a good READ's data follows it.

    ``error`` is an NBD error value (see :func:`nbd_error`), not an errno.
    """
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_requests(requests: Iterable[Request]) -> bytes:
    """Client-side encoding of requests (for tests and tools)."""
    out = bytearray()
    for r in requests:
        out += REQUEST_HEADER.pack(REQUEST_MAGIC, r.flags, r.type, r.cookie, r.offset, r.length)
        if r.data is not None:
            out += r.data
    return bytes(out)
