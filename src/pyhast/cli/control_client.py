"""hastctl's side of the control socket (spec 2.3): one request, one reply.

The client connects to the configured control address (timeout 20 s),
sends one framed nv request and reads one framed reply with the same codec
hastd uses.  Failures become :class:`ControlClientError` carrying hastctl's
exit code (spec 2.5): 71 when the control socket cannot be created or
connected, 69 when sending or receiving fails.
"""

from __future__ import annotations

import socket

from pyhast.defaults import HAST_TIMEOUT
from pyhast.enums import ControlCmd
from pyhast.errors import ExitCode, HastError, ProtocolError
from pyhast.log import errno_text
from pyhast.transport import base as transport
from pyhast.wire.control import ControlReply, ControlRequest, parse_reply
from pyhast.wire.frame import NEED_DATA, FrameDecoder, encode_frame
from pyhast.wire.nv import NV

__all__ = ["ControlClientError", "exchange", "request"]


class ControlClientError(HastError):
    """Talking to hastd failed; ``exit_code`` is hastctl's (71 or 69)."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exchange(address: str, nv: NV, timeout: float = HAST_TIMEOUT) -> NV:
    """Send ``nv`` to hastd at ``address`` and return its reply."""
    try:
        sock = transport.client(address)
    except (OSError, ValueError) as exc:
        raise ControlClientError(
            errno_text(f"Unable to setup control connection to {address}", exc), ExitCode.OSERR
        ) from exc
    with sock:
        try:
            transport.connect(sock, address, timeout)
        except OSError as exc:
            raise ControlClientError(
                errno_text(f"Unable to connect to hastd via {address}", exc), ExitCode.OSERR
            ) from exc
        try:
            transport.set_timeouts(sock, timeout)
            sock.sendall(b"".join(encode_frame(nv)))
        except OSError as exc:
            raise ControlClientError(
                errno_text(f"Unable to send command to hastd via {address}", exc),
                ExitCode.UNAVAILABLE,
            ) from exc
        try:
            return _recv_nv(sock)
        except (OSError, ProtocolError) as exc:
            raise ControlClientError(
                errno_text(f"Unable to receive reply from hastd via {address}", exc),
                ExitCode.UNAVAILABLE,
            ) from exc


def request(address: str, req: ControlRequest, timeout: float = HAST_TIMEOUT) -> ControlReply:
    """Send a control request and parse the reply (ControlClientError on failure)."""
    nv = exchange(address, req.to_nv(), timeout)
    try:
        return parse_reply(nv, req.cmd if req.cmd is ControlCmd.SETROLE else ControlCmd.STATUS)
    except ProtocolError as exc:
        raise ControlClientError(
            f"Unable to understand the reply from hastd via {address}: {exc}",
            ExitCode.UNAVAILABLE,
        ) from exc


def _recv_nv(sock: socket.socket) -> NV:
    decoder = FrameDecoder()
    while True:
        frame = decoder.next_frame()
        if frame is not NEED_DATA:
            return frame.nv
        try:
            data = sock.recv(65536)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("Timed out waiting for the reply") from None
        if not data:
            raise ConnectionResetError("hastd closed the connection without replying")
        decoder.feed(data)
