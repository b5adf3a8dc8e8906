"""hastd's control socket: hastctl's requests (spec 2.3).

Rules:

* Only root may talk to hastd: the peer's uid (``SO_PEERCRED``) must be 0,
  anyone else has the connection closed and one log line written.
* One request, one reply, then the connection is closed.  Each connection is
  its own task; the request must arrive within :data:`REQUEST_TIMEOUT`
  seconds.
* A request hastd cannot take as a whole gets ``{error: 2}`` (invalid) or
  ``{error: 4}`` (unimplemented command).  Otherwise every named resource
  (``all``: every configured one) gets an entry: ``resource<i>``,
  ``error<i>`` (1: no such resource) and, for set-role, ``role<i>`` = the role
  before the change; for status the fields of
  :meth:`~pyhast.daemon.supervisor.Supervisor.status_into`.
* The resources of one request are handled concurrently (role changes each
  under its resource's lock); results are reported in request order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from pyhast.daemon.supervisor import FramedSocket, RoleRefused, Supervisor
from pyhast.defaults import HAST_TIMEOUT
from pyhast.enums import ControlCmd
from pyhast.errors import ProtocolError
from pyhast.log import errno_text
from pyhast.transport import base as transport
from pyhast.transport.uds import peer_credentials
from pyhast.wire.control import ControlRequest, ControlRequestError, RoleResult, error_reply
from pyhast.wire.nv import NV

__all__ = ["REQUEST_TIMEOUT", "ControlServer"]

log = logging.getLogger(__name__)

#: Seconds a client has to send its request.
REQUEST_TIMEOUT = float(HAST_TIMEOUT)
#: Seconds allowed for sending the reply.
REPLY_TIMEOUT = float(HAST_TIMEOUT)


class ControlServer:
    """Accepts hastctl connections on one control socket."""

    def __init__(self, supervisor: Supervisor, address: str, sock: socket.socket) -> None:
        self.supervisor = supervisor
        self.address = address
        self.sock = sock
        self._path = getattr(sock, "path", None)
        self._inode = _inode(self._path)
        self._task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @staticmethod
    def open(address: str) -> socket.socket:
        """Bind the control socket (mode 0600); OSError/ValueError on failure."""
        sock = transport.server(address, mode=0o600)
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._accept_loop(), name=f"control {self.address}"
        )

    def close(self, *, unlink: bool = True) -> None:
        """Stop serving, close the socket and (``unlink``) remove its file."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._connections):
            task.cancel()
        if self.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        # The listener only unlinks its file in the process that bound it,
        # and a daemonised hastd is not that process: remove it here.
        if unlink and self._path is not None and _inode(self._path) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                log.error("%s", errno_text("Unable to accept control connection", exc))
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._handle(conn), name="control connection")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handle(self, conn: socket.socket) -> None:
        chan = FramedSocket(conn)
        try:
            await self._serve(chan)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Unexpected error while serving a control connection.")
        finally:
            chan.close()

    async def _serve(self, chan: FramedSocket) -> None:
        try:
            cred = peer_credentials(chan.sock)
        except OSError as exc:
            log.error("%s", errno_text("Unable to get the credentials of a control client", exc))
            return
        if cred.uid != 0:
            log.warning(
                "Control connection from uid %d (pid %d) refused: only root may control hastd.",
                cred.uid,
                cred.pid,
            )
            return
        try:
            frame = await asyncio.wait_for(chan.recv(), REQUEST_TIMEOUT)
        except TimeoutError:
            log.error("Timed out waiting for a control request.")
            return
        except (OSError, ProtocolError) as exc:
            log.error("%s", errno_text("Unable to receive control header", exc))
            return
        if frame is None:
            return
        reply = await self.handle_request(frame.nv)
        try:
            await asyncio.wait_for(chan.send(reply), REPLY_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.error("%s", errno_text("Unable to send control response", exc))

    async def handle_request(self, nv: NV) -> NV:
        """Execute one request and build the reply."""
        try:
            req = ControlRequest.from_nv(nv)
        except ControlRequestError as exc:
            log.error("%s", exc)
            return error_reply(int(exc.code))
        sup = self.supervisor
        names = list(sup.resources) if req.all else list(req.resources)
        out = NV()
        if req.cmd is ControlCmd.SETROLE:
            assert req.role is not None
            role = req.role
            previous = await asyncio.gather(
                *(sup.set_role(name, role, force=req.force) for name in names),
                return_exceptions=True,
            )
            for i, (name, old) in enumerate(zip(names, previous, strict=True)):
                if isinstance(old, RoleRefused):
                    RoleResult(name, error=old.errno, errmsg=str(old)).add_to(out, i)
                elif isinstance(old, BaseException):
                    raise old
                elif old is None:
                    RoleResult(name, error=1).add_to(out, i)
                else:
                    RoleResult(name, role=old.label).add_to(out, i)
            return out
        # Entries are independent (every field is suffixed), so the workers
        # are asked concurrently and a slow one delays the reply only once.
        await asyncio.gather(*(sup.status_into(out, i, name) for i, name in enumerate(names)))
        return out


def _inode(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
