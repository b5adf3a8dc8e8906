"""Accepting replication connections: the secondary parent's side of the handshake.

Spec 6.1 steps 2 and 5, with the observed facts of the spec's appendix:

1. A connection whose peer IP is no resource's ``remote`` is closed without
   a word (logged once per address at WARNING, then at debug level).
2. One frame is read within :data:`ACCEPT_TIMEOUT` seconds.  Junk, a frame
   version above 2, a missing ``resource`` field, a ``token`` that is not a
   uint8 array of 16 bytes: the connection is closed without a reply.
3. Refusals are ``{errmsg}`` (frame version 2) and the connection is closed:
   ``Resource not configured.`` / ``No access to the resource.`` /
   ``Remote node acts as <role> for the resource and not as secondary.``
   (plus ``wait: uint8 1`` when primary) / ``Token doesn't match.``.
4. No token: an existing secondary worker is stopped (SIGINT, waited for)
   and a previous half-open connection is dropped; the version is
   min(peer's, 2) (no field: 1); the reply is ``{version, token[16]}`` with
   the negotiated version in the frame header; the connection is kept as A.
5. Matching token: this connection is B; the secondary worker starts with
   A, B and the hex of B's nv list; the parent's copies are closed.

Each accepted connection is its own task, so a silent peer only delays
itself; steps 4 and 5 run under the resource's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import signal
import socket

from pyhast.daemon.supervisor import FramedSocket, ResourceState, Supervisor
from pyhast.defaults import HAST_PROTO_VERSION, HAST_TIMEOUT, HAST_TOKEN_SIZE
from pyhast.enums import Role
from pyhast.errors import NVError, ProtocolError
from pyhast.log import errno_text
from pyhast.transport import base as transport
from pyhast.transport.tcp import peer_ip, same_ip
from pyhast.wire import handshake
from pyhast.wire.nv import NV

__all__ = ["ACCEPT_TIMEOUT", "Listener"]

log = logging.getLogger(__name__)

#: Seconds a new connection has to deliver its first frame.
ACCEPT_TIMEOUT = float(HAST_TIMEOUT)
#: Largest nv list accepted on a connection that has not identified itself.
MAX_HANDSHAKE_NV = 64 * 1024
#: Errnos of accept() that mean "out of descriptors or memory": wait, retry.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


#: Seconds during which further connections from one address are not logged.
LOG_INTERVAL = 10.0


class Listener:
    """Serves the listen sockets of hastd for one :class:`Supervisor`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        #: address string -> (socket, accept task)
        self._sockets: dict[str, tuple[socket.socket, asyncio.Task[None]]] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._warned: set[str] = set()
        #: peer ip -> (time of the last INFO line, connections not logged since)
        self._seen: dict[str, tuple[float, int]] = {}

    def _log_connection(self, sock: socket.socket, peer: str) -> None:
        """ "Connection from X." at most once per LOG_INTERVAL per peer address.

        A flood of connections from one address is one sentence, followed by
        a count when that address is next logged.
        """
        key = _peer_key(sock, peer)
        now = asyncio.get_running_loop().time()
        last, quiet = self._seen.get(key, (float("-inf"), 0))
        if now - last < LOG_INTERVAL:
            self._seen[key] = (last, quiet + 1)
            log.debug("Another connection from %s.", peer)
            return
        self._seen[key] = (now, 0)
        if quiet:
            log.info("Connection from %s (%d more from this address were not logged).", peer, quiet)
        else:
            log.info("Connection from %s.", peer)

    @property
    def addresses(self) -> list[str]:
        return list(self._sockets)

    @staticmethod
    def open(address: str) -> socket.socket:
        """Bind a listen socket (OSError/ValueError on failure); not yet served."""
        sock = transport.server(address)
        sock.setblocking(False)
        return sock

    def serve(self, address: str, sock: socket.socket) -> None:
        """Start accepting on ``sock`` (from :meth:`open`)."""
        task = asyncio.get_running_loop().create_task(
            self._accept_loop(address, sock), name=f"listen {address}"
        )
        self._sockets[address] = (sock, task)

    def close(self, address: str) -> None:
        """Stop listening on ``address``."""
        entry = self._sockets.pop(address, None)
        if entry is None:
            return
        sock, task = entry
        task.cancel()
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        sock.close()

    def close_all(self) -> None:
        for address in list(self._sockets):
            self.close(address)
        for task in list(self._connections):
            task.cancel()

    async def _accept_loop(self, address: str, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                log.error("%s", errno_text(f"Unable to accept connection to {address}", exc))
                if exc.errno in _RESOURCE_ERRNOS:
                    await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._handle(sock), name=f"accept {address}")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handle(self, sock: socket.socket) -> None:
        keep = False
        try:
            keep = await self._handshake(sock)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Unexpected error while accepting a connection.")
        finally:
            if not keep:
                _close(sock)

    async def _handshake(self, sock: socket.socket) -> bool:
        """Handle one connection; True if it was kept (as A) or handed to a worker."""
        try:
            peer = transport.transport_for_socket(sock).peer_address(sock)
            transport.transport_for_socket(sock).prepare_accepted(sock)
        except (OSError, ValueError):
            return False
        resources = list(self.supervisor.resources.values())
        allowed = await asyncio.to_thread(_allowed, sock, resources)
        if not any(allowed.values()):
            key = _peer_key(sock, peer)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("Client %s isn't known; its connections are closed.", peer)
            else:
                log.debug("Client %s isn't known.", peer)
            return False
        self._log_connection(sock, peer)
        chan = FramedSocket(sock, max_nv_size=MAX_HANDSHAKE_NV)
        try:
            frame = await asyncio.wait_for(chan.recv(), ACCEPT_TIMEOUT)
        except TimeoutError:
            log.error("Timed out waiting for the header from %s.", peer)
            return False
        except (OSError, ProtocolError) as exc:
            log.error("%s", errno_text(f"Unable to receive header from {peer}", exc))
            return False
        if frame is None:
            log.debug("%s closed the connection before sending a header.", peer)
            return False
        nv = frame.nv
        try:
            name = nv.get_string("resource")
        except NVError:
            log.error("No 'resource' field in the header received from %s.", peer)
            return False
        try:
            token = nv.get_uint8_array("token", default=None)
        except NVError:
            log.error("Invalid 'token' field in the header received from %s.", peer)
            return False
        if token is not None and len(token) != HAST_TOKEN_SIZE:
            log.error(
                "Received token of invalid size from %s (expected %d, got %d).",
                peer,
                HAST_TOKEN_SIZE,
                len(token),
            )
            return False
        res = self.supervisor.resources.get(name)
        if res is None:
            log.error("No resource '%s' as requested by %s.", name, peer)
            await _refuse(chan, handshake.ERR_NOT_CONFIGURED)
            return False
        access = allowed.get(name)
        if access is None:  # added by a reload meanwhile
            access = await asyncio.to_thread(_may_access, sock, res.config.remoteaddr)
        if not access:
            res.log.error("Client %s has no access to the resource.", peer)
            await _refuse(chan, handshake.ERR_NO_ACCESS)
            return False
        async with res.lock:
            if self.supervisor.resources.get(name) is not res:
                await _refuse(chan, handshake.ERR_NOT_CONFIGURED)
                return False
            if res.role is not Role.SECONDARY:
                res.log.error(
                    "We act as %s for the resource and not as secondary as requested by %s.",
                    res.role.label,
                    peer,
                )
                await _refuse(
                    chan, handshake.err_role(res.role.label), wait=res.role is Role.PRIMARY
                )
                return False
            if token is None:
                return await self._first(res, chan, nv, peer)
            return await self._second(res, chan, nv, token, peer)

    async def _first(self, res: ResourceState, chan: FramedSocket, nv: NV, peer: str) -> bool:
        """Step 2 without a token: answer with the version and a new token; keep A."""
        res.log.debug("Initial connection from %s.", peer)
        if res.worker is not None:
            res.log.debug("Worker process exists (pid=%d), stopping it.", res.worker.pid)
            await self.supervisor.stop_worker(res, signal.SIGINT)
        if res.half_open is not None:
            res.log.info(
                "A new session from %s supersedes the half-open connection of the last one.",
                peer,
            )
        res.drop_half_open()
        try:
            version = handshake.negotiate_version(nv)
        except NVError:
            version = 1
        token = secrets.token_bytes(HAST_TOKEN_SIZE)
        try:
            await asyncio.wait_for(
                chan.send(handshake.first_reply(version, token), version=version), ACCEPT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            res.log.error("%s", errno_text(f"Unable to send response to {peer}", exc))
            return False
        res.half_open = chan.sock
        res.token = token
        res.version = version
        res.log.debug("Incoming connection from %s configured.", peer)
        return True

    async def _second(
        self, res: ResourceState, chan: FramedSocket, nv: NV, token: bytes, peer: str
    ) -> bool:
        """Step 5: the token binds this connection (B) to the half-open A."""
        if (
            res.token is None
            or res.half_open is None
            or not secrets.compare_digest(token, res.token)
        ):
            res.log.error("Token received from %s doesn't match.", peer)
            await _refuse(chan, handshake.ERR_TOKEN)
            return False
        res.log.debug("Outgoing connection to %s configured.", peer)
        # start_secondary closes the parent's copies of A and B.
        self.supervisor.start_secondary(res, chan.sock, nv)
        return True


def _may_access(sock: socket.socket, remoteaddr: str) -> bool:
    """Whether ``sock``'s peer is ``remoteaddr`` (IP only; may resolve a host name)."""
    return remoteaddr != "none" and same_ip(sock, remoteaddr)


def _allowed(sock: socket.socket, resources: list[ResourceState]) -> dict[str, bool]:
    """Which resources the peer of ``sock`` may access (runs in a thread: may resolve)."""
    return {res.name: _may_access(sock, res.config.remoteaddr) for res in resources}


def _peer_key(sock: socket.socket, peer: str) -> str:
    """The peer's IP address (its whole address for non-TCP sockets)."""
    try:
        return peer_ip(sock)
    except (OSError, ValueError):
        return peer


async def _refuse(chan: FramedSocket, text: str, *, wait: bool = False) -> None:
    try:
        await asyncio.wait_for(
            chan.send(handshake.errmsg_reply(text, wait), version=HAST_PROTO_VERSION),
            ACCEPT_TIMEOUT,
        )
    except (OSError, TimeoutError) as exc:
        log.debug("%s", errno_text("Unable to send error", exc))


def _close(sock: socket.socket) -> None:
    if sock.fileno() < 0:
        return
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().remove_reader(sock.fileno())
    sock.close()
