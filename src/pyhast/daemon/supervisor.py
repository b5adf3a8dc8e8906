"""The parent's resources and their workers (spec 3.2, 3.3; docs/architecture.md).

One :class:`ResourceState` per configured resource holds its role, its
running :class:`Worker` (if any) and, for a secondary, the half-open first
replication connection.  The :class:`Supervisor` owns them all.

Rules:

* Everything that changes a resource's role or its worker (hastctl role
  changes, reload, the replication handshake, restarts) runs under that
  resource's ``lock``, so those steps never interleave for one resource while
  other resources go on being served.
* A worker is a fresh interpreter, ``python -m pyhast.worker ...``, started
  with :class:`subprocess.Popen` and linked by socketpairs passed with
  ``pass_fds``; the parent closes the worker's ends right after the start.
* Child processes are reaped by :meth:`Supervisor.reap` (called on SIGCHLD
  and from a periodic tick) with ``Popen.poll()``, never ``waitpid(-1)``.
* Restart policy: a primary worker that dies by a signal or exits 75 is
  restarted after 1 s; any other exit puts the resource back to init
  ("Changing resource role back to init.").  A secondary worker's exit leaves
  the resource secondary, waiting for the next primary.  A worker the parent
  stopped on purpose gets no policy.
* Stopping a worker: the signal, then at most :data:`STOP_TIMEOUT` seconds of
  waiting, then SIGKILL (logged) and at most :data:`KILL_TIMEOUT` more.
* Every channel to a worker is served by its own task; a worker that does not
  answer a ctrl request within the caller's timeout only loses that answer
  (replies are matched to requests in order, so a late one is discarded).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

from pyhast.config import ResourceConfig
from pyhast.daemon.hooks import HookRunner, event_args, role_args
from pyhast.daemon.resource_json import resource_to_json
from pyhast.defaults import HAST_DEVDIR, HAST_PROTO_VERSION
from pyhast.enums import Role
from pyhast.errors import ExitCode, HastError, ProtocolError
from pyhast.frontend.fuse.holders import find_holders
from pyhast.log import ResourceAdapter, errno_text
from pyhast.transport import base as transport
from pyhast.wire.control import (
    ResourceStatus,
    conn_reply,
    copy_fields,
    event_ack,
    parse_conn_request,
    parse_error,
    parse_event,
    worker_status_request,
)
from pyhast.wire.frame import (
    DEFAULT_MAX_NV_SIZE,
    HEADER_SIZE,
    Frame,
    decode_header,
    encode_frame,
    payload_size,
)
from pyhast.wire.nv import NV

__all__ = [
    "KILL_TIMEOUT",
    "STATUS_TIMEOUT",
    "STOP_TIMEOUT",
    "FramedSocket",
    "ResourceState",
    "Supervisor",
    "Worker",
]

log = logging.getLogger(__name__)

#: Seconds a worker gets to exit after SIGTERM/SIGINT before SIGKILL.
STOP_TIMEOUT = 10.0
#: Seconds to wait for a worker after SIGKILL.
KILL_TIMEOUT = 5.0
#: Seconds a worker gets to answer a status request.
STATUS_TIMEOUT = 3.0
#: Delay before a primary worker is restarted.
RESTART_DELAY = 1.0


# --------------------------------------------------------------------------
# Framed I/O on a raw non-blocking socket


class FramedSocket:
    """Frames over a plain socket, driven by the running loop.

    Reads are exact (header, nv list, payload: never a byte more), so the
    socket can be handed to a worker after a frame has been read from it.
    """

    def __init__(self, sock: socket.socket, *, max_nv_size: int = DEFAULT_MAX_NV_SIZE) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_nv_size = max_nv_size
        self._loop = asyncio.get_running_loop()

    def fileno(self) -> int:
        return self.sock.fileno()

    async def _recv_exact(self, size: int, *, eof_ok: bool = False) -> bytes | None:
        buf = bytearray()
        while len(buf) < size:
            chunk = await self._loop.sock_recv(self.sock, size - len(buf))
            if not chunk:
                if eof_ok and not buf:
                    return None
                raise ConnectionResetError(
                    errno.ECONNRESET, "The peer closed the connection in the middle of a frame"
                )
            buf += chunk
        return bytes(buf)

    async def recv(self) -> Frame | None:
        """The next frame, or None at a clean end of file.

        Raises ProtocolError for malformed data and OSError for I/O errors.
        """
        header = await self._recv_exact(HEADER_SIZE, eof_ok=True)
        if header is None:
            return None
        version, nvsize = decode_header(header, max_nv_size=self.max_nv_size)
        raw = await self._recv_exact(nvsize)
        assert raw is not None
        nv = NV.decode(raw)
        size = payload_size(nv)
        payload = None
        if size:
            data = await self._recv_exact(size)
            assert data is not None
            payload = memoryview(data)
        return Frame(version, nv, payload)

    async def send(
        self, nv: NV, *, version: int = HAST_PROTO_VERSION, fds: Sequence[int] = ()
    ) -> None:
        """Send one frame; ``fds`` travel as SCM_RIGHTS with its first bytes."""
        data = b"".join(encode_frame(nv, version=version))
        if not fds:
            await self._loop.sock_sendall(self.sock, data)
            return
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            try:
                sent = self.sock.sendmsg([data], ancillary)
                break
            except (BlockingIOError, InterruptedError):
                await self._writable()
        if sent < len(data):
            await self._loop.sock_sendall(self.sock, data[sent:])

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_writer(fd, _wake, fut)
        try:
            await fut
        finally:
            self._loop.remove_writer(fd)

    def close(self) -> None:
        """Close the socket, first removing it from the loop's selector."""
        fd = self.sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self.sock.close()


# --------------------------------------------------------------------------
# Workers


class Worker:
    """One worker process and the parent's ends of its socketpairs."""

    def __init__(
        self,
        role: Role,
        proc: subprocess.Popen[bytes],
        ctrl: FramedSocket,
        event: FramedSocket,
        conn: FramedSocket | None,
    ) -> None:
        self.role = role
        self.proc = proc
        self.ctrl = ctrl
        self.event = event
        self.conn = conn
        #: Set when the parent stops the worker on purpose (no restart policy).
        self.stopping = False
        #: The exit status (Popen.returncode) once reaped.
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.tasks: list[asyncio.Task[None]] = []
        self._ctrl_pending: collections.deque[asyncio.Future[NV]] = collections.deque()
        self._ctrl_send_lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def request(self, nv: NV, timeout: float) -> NV:
        """Send a ctrl request and return the reply.

        Raises TimeoutError when no reply came within ``timeout`` seconds and
        OSError when the channel is broken.
        """
        fut: asyncio.Future[NV] = asyncio.get_running_loop().create_future()
        try:
            async with self._ctrl_send_lock:
                self._ctrl_pending.append(fut)
                await asyncio.wait_for(self.ctrl.send(nv), timeout)
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            fut.cancel()

    async def serve_ctrl_replies(self) -> None:
        """Match ctrl replies to requests, in order, until the channel closes."""
        try:
            while True:
                frame = await self.ctrl.recv()
                if frame is None:
                    break
                if not self._ctrl_pending:
                    log.warning("Unexpected control reply from worker %d ignored.", self.pid)
                    continue
                fut = self._ctrl_pending.popleft()
                if not fut.done():
                    fut.set_result(frame.nv)
        except (OSError, ProtocolError) as exc:
            log.debug("%s", errno_text(f"Control channel of worker {self.pid} failed", exc))
        finally:
            while self._ctrl_pending:
                fut = self._ctrl_pending.popleft()
                if not fut.done():
                    fut.set_exception(ConnectionResetError(errno.ECONNRESET, "Worker gone"))

    def close_channels(self) -> None:
        for task in self.tasks:
            task.cancel()
        for channel in (self.ctrl, self.event, self.conn):
            if channel is not None:
                channel.close()


class RoleRefused(HastError):
    """A role change hastd refused; ``errno`` goes back to hastctl."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


def exit_sentence(pid: int, returncode: int) -> str:
    """FreeBSD's child_exit_log() sentence for a worker's exit status."""
    if returncode == 0:
        return f"Worker process exited gracefully (pid={pid})."
    if returncode < 0:
        return f"Worker process killed (pid={pid}, signal={-returncode})."
    return f"Worker process exited ungracefully (pid={pid}, exitcode={returncode})."


class ResourceState:
    """One configured resource as the parent runs it."""

    def __init__(self, config: ResourceConfig) -> None:
        self.config = config
        self.role = Role.INIT
        self.worker: Worker | None = None
        #: Secondary: the first replication connection (A), waiting for B.
        self.half_open: socket.socket | None = None
        self.token: bytes | None = None
        self.version = HAST_PROTO_VERSION
        self.lock = asyncio.Lock()
        self.restart: asyncio.TimerHandle | None = None
        self.log = ResourceAdapter(log, config.name, self.role.label)

    @property
    def name(self) -> str:
        return self.config.name

    def set_role(self, role: Role) -> None:
        self.role = role
        self.log.role = role.label

    def drop_half_open(self) -> None:
        if self.half_open is not None:
            self.half_open.close()
            self.half_open = None
        self.token = None


class Supervisor:
    """All resources of this node, their workers and the hooks.

    ``node`` is passed to workers for their logs; ``debug``/``foreground``
    likewise; ``rundir`` is where a primary puts its NBD socket.
    """

    def __init__(
        self,
        resources: Iterable[ResourceConfig],
        *,
        hooks: HookRunner,
        node: str,
        debug: int = 0,
        foreground: bool = True,
        rundir: str = "/var/run/hast",
        devdir: str = HAST_DEVDIR,
    ) -> None:
        self.resources: dict[str, ResourceState] = {r.name: ResourceState(r) for r in resources}
        self.hooks = hooks
        self.node = node
        self.debug = debug
        self.foreground = foreground
        self.rundir = rundir
        self.devdir = devdir
        self._workers: dict[int, tuple[ResourceState, Worker]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- bookkeeping ---------------------------------------------------------

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("Task %s failed.", task.get_name(), exc_info=task.exception())

    def reap(self) -> None:
        """Collect every exited child (workers and hooks); never blocks."""
        for pid, (res, worker) in list(self._workers.items()):
            try:
                returncode = worker.proc.poll()
            except OSError:
                continue
            if returncode is None:
                continue
            del self._workers[pid]
            self._worker_exited(res, worker, returncode)
        self.hooks.reap()

    def _worker_exited(self, res: ResourceState, worker: Worker, returncode: int) -> None:
        level = logging.DEBUG if returncode == 0 else logging.ERROR
        res.log.log(level, "%s", exit_sentence(worker.pid, returncode))
        worker.close_channels()
        if not worker.exited.done():
            worker.exited.set_result(returncode)
        if res.worker is worker:
            res.worker = None
        if worker.stopping or res.worker is not None:
            return
        if res.role is Role.PRIMARY and worker.role is Role.PRIMARY:
            if returncode < 0 or returncode == ExitCode.TEMPFAIL:
                loop = asyncio.get_running_loop()
                res.restart = loop.call_later(RESTART_DELAY, self._restart_later, res)
            else:
                res.set_role(Role.INIT)
                res.log.info("Changing resource role back to init.")

    def _restart_later(self, res: ResourceState) -> None:
        res.restart = None
        self._spawn_task(self._restart_primary(res), f"restart {res.name}")

    async def _restart_primary(self, res: ResourceState) -> None:
        async with res.lock:
            if res.role is not Role.PRIMARY or res.worker is not None:
                return
            if self.resources.get(res.name) is not res:
                return
            res.log.info("Restarting worker process.")
            self._start_primary(res)

    # --- starting and stopping workers ---------------------------------------

    def _spawn(
        self,
        res: ResourceState,
        role: Role,
        extra_args: Sequence[str] = (),
        extra_fds: Sequence[int] = (),
    ) -> Worker | None:
        """Start a worker for ``res`` (its lock held); None if it could not start."""
        pairs: list[tuple[socket.socket, socket.socket]] = []
        try:
            for _ in range(3 if role is Role.PRIMARY else 2):
                pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
        except OSError as exc:
            res.log.error("%s", errno_text("Unable to create socketpairs for the worker", exc))
            for a, b in pairs:
                a.close()
                b.close()
            return None
        child = [b for _, b in pairs]
        argv = [
            sys.executable,
            "-m",
            "pyhast.worker",
            "--role",
            role.label,
            "--resource",
            resource_to_json(res.config),
            "--node",
            self.node,
            "--debug",
            str(self.debug),
            "--ctrl-fd",
            str(child[0].fileno()),
            "--event-fd",
            str(child[1].fileno()),
            "--rundir",
            self.rundir,
            "--devdir",
            self.devdir,
        ]
        if role is Role.PRIMARY:
            argv += ["--conn-fd", str(child[2].fileno())]
        if self.foreground:
            argv.append("--foreground")
        argv += extra_args
        stdio = None if self.foreground else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=[s.fileno() for s in child] + list(extra_fds),
                close_fds=True,
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=stdio,
            )
        except OSError as exc:
            res.log.error("%s", errno_text("Unable to start the worker process", exc))
            for a, b in pairs:
                a.close()
                b.close()
            return None
        finally:
            for s in child:
                s.close()
        parent = [FramedSocket(a) for a, _ in pairs]
        worker = Worker(role, proc, parent[0], parent[1], parent[2] if len(parent) > 2 else None)
        self._workers[proc.pid] = (res, worker)
        res.worker = worker
        worker.tasks.append(
            asyncio.get_running_loop().create_task(
                worker.serve_ctrl_replies(), name=f"ctrl {res.name}"
            )
        )
        worker.tasks.append(
            asyncio.get_running_loop().create_task(
                self._serve_events(res, worker), name=f"event {res.name}"
            )
        )
        if worker.conn is not None:
            worker.tasks.append(
                asyncio.get_running_loop().create_task(
                    self._serve_conn(res, worker, worker.conn), name=f"conn {res.name}"
                )
            )
        res.log.debug("Worker process started (pid=%d).", proc.pid)
        return worker

    def _start_primary(self, res: ResourceState) -> None:
        if self._spawn(res, Role.PRIMARY) is None:
            res.set_role(Role.INIT)
            res.log.info("Changing resource role back to init.")

    def start_secondary(self, res: ResourceState, conn_in: socket.socket, handshake: NV) -> None:
        """Start the secondary worker on conn A (``res.half_open``) and ``conn_in`` (B).

        Call with ``res.lock`` held; the parent's copies of both sockets are
        closed afterwards whatever happens.
        """
        conn_a = res.half_open
        res.half_open = None
        res.token = None
        assert conn_a is not None
        try:
            for s in (conn_a, conn_in):
                s.setblocking(True)
            self._spawn(
                res,
                Role.SECONDARY,
                [
                    "--in-fd",
                    str(conn_a.fileno()),
                    "--out-fd",
                    str(conn_in.fileno()),
                    "--handshake",
                    handshake.encode().hex(),
                    "--version",
                    str(res.version),
                ],
                [conn_a.fileno(), conn_in.fileno()],
            )
        finally:
            conn_a.close()
            conn_in.close()

    async def stop_worker(self, res: ResourceState, sig: int = signal.SIGTERM) -> None:
        """Stop ``res``'s worker (lock held) and wait for it, bounded; then SIGKILL."""
        worker = res.worker
        if worker is None:
            return
        worker.stopping = True
        res.worker = None
        await self._terminate(res, worker, sig)

    async def _terminate(self, res: ResourceState, worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(sig)
        if await self._wait_exit(worker, STOP_TIMEOUT):
            return
        res.log.warning(
            "Worker process (pid=%d) did not exit within %d seconds; killing it.",
            worker.pid,
            int(STOP_TIMEOUT),
        )
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        if not await self._wait_exit(worker, KILL_TIMEOUT):
            res.log.error("Worker process (pid=%d) survived SIGKILL.", worker.pid)

    async def _wait_exit(self, worker: Worker, timeout: float) -> bool:
        self.reap()
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), timeout)
        except TimeoutError:
            self.reap()
            return worker.exited.done()
        return True

    async def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM every worker and wait for them, at most ``timeout`` seconds."""
        workers = list(self._workers.values())
        for res, worker in workers:
            worker.stopping = True
            res.log.info(
                "Terminating worker process (resource=%s, role=%s, pid=%d).",
                res.name,
                worker.role.label,
                worker.pid,
            )
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        for res in self.resources.values():
            if res.restart is not None:
                res.restart.cancel()
            res.drop_half_open()
        if workers:
            self.reap()
            pending = [w.exited for _, w in workers if not w.exited.done()]
            if pending:
                await asyncio.wait(pending, timeout=timeout)
            self.reap()
        for res, worker in workers:
            if not worker.exited.done():
                res.log.warning("Worker process (pid=%d) did not exit in time.", worker.pid)
        for task in list(self._tasks):
            task.cancel()

    # --- role changes --------------------------------------------------------

    async def set_role(self, name: str, role: Role, *, force: bool = False) -> Role | None:
        """Change ``name``'s role; returns the previous role (None: no such resource).

        Leaving primary while ``<devdir>/<provname>`` is held open (a loop
        device, a mount, a process) raises RoleRefused naming the holders,
        unless ``force``: then the holders get I/O errors, as FreeBSD's
        forcible destruction of the GEOM Gate device does.
        """
        res = self.resources.get(name)
        if res is None:
            return None
        async with res.lock:
            if res.role is Role.PRIMARY and role is not Role.PRIMARY:
                path = os.path.join(self.devdir, res.config.provname)
                holders = await asyncio.to_thread(find_holders, path)
                if holders:
                    if not force:
                        raise RoleRefused(
                            f"{path} is in use by {holders.describe()}; "
                            "unmount and detach it, or use -f.",
                            errno.EBUSY,
                        )
                    res.log.warning(
                        "Forcing role %s while %s is in use by %s.",
                        role.label,
                        path,
                        holders.describe(),
                    )
            return await self._set_role_locked(res, role)

    async def _set_role_locked(self, res: ResourceState, role: Role) -> Role:
        old = res.role
        if role is old:
            return old
        res.log.info("Role changed to %s.", role.label)
        res.set_role(role)
        if res.restart is not None:
            res.restart.cancel()
            res.restart = None
        res.drop_half_open()
        await self.stop_worker(res)
        if role is Role.PRIMARY:
            self._start_primary(res)
        self.hooks.run(res.config.exec, role_args(res.name, old, role))
        return old

    # --- reload --------------------------------------------------------------

    async def remove_resource(self, name: str) -> None:
        """Set ``name`` to init and forget it."""
        res = self.resources.get(name)
        if res is None:
            return
        async with res.lock:
            await self._set_role_locked(res, Role.INIT)
            del self.resources[name]
        log.info("Resource %s removed.", name)

    def add_resource(self, config: ResourceConfig) -> None:
        """Add a new resource in role init."""
        self.resources[config.name] = ResourceState(config)
        log.info("Resource %s added.", config.name)

    async def restart_resource(self, config: ResourceConfig) -> None:
        """Role init, new configuration, previous role (spec 3.5)."""
        res = self.resources[config.name]
        log.info("Resource %s configuration was modified, restarting it.", config.name)
        async with res.lock:
            role = res.role
            await self._set_role_locked(res, Role.INIT)
            res.config = config
            await self._set_role_locked(res, role)

    async def reload_resource(self, config: ResourceConfig, message: NV) -> None:
        """Take the new settings and push ``message`` (CONTROL_RELOAD) to the primary."""
        res = self.resources[config.name]
        log.info("Resource %s configuration was modified, reloading it.", config.name)
        async with res.lock:
            res.config = config
            worker = res.worker
            if worker is None:
                return
            try:
                reply = await worker.request(message, STATUS_TIMEOUT)
                error = parse_error(reply)
            except (OSError, TimeoutError, ProtocolError) as exc:
                res.log.error("%s", errno_text("Unable to receive reload reply", exc))
                return
            if error:
                res.log.error("%s", errno_text("Reload failed", error))

    def update_config(self, config: ResourceConfig) -> None:
        """Take a configuration that needs neither restart nor reload."""
        res = self.resources.get(config.name)
        if res is not None:
            res.config = config

    # --- status --------------------------------------------------------------

    async def status_into(self, out: NV, index: int, name: str) -> None:
        """Append resource ``name``'s status as entry ``index`` of a control reply."""
        res = self.resources.get(name)
        if res is None:
            ResourceStatus(name, error=1).add_to(out, index)
            return
        cfg = res.config
        worker = res.worker
        ResourceStatus(
            name=name,
            provname=cfg.provname,
            localpath=cfg.localpath,
            remoteaddr=cfg.remoteaddr,
            sourceaddr=cfg.sourceaddr,
            replication=cfg.replication.label,
            checksum=cfg.checksum.label,
            compression=cfg.compression.label,
            role=res.role.label,
            workerpid=worker.pid if worker is not None else 0,
        ).add_to(out, index)
        if worker is None:
            return
        try:
            reply = await worker.request(worker_status_request(), STATUS_TIMEOUT)
            error = parse_error(reply)
        except TimeoutError:
            res.log.error(
                "Worker process (pid=%d) did not answer the status request in time.", worker.pid
            )
            return
        except (OSError, ProtocolError) as exc:
            res.log.error("%s", errno_text("Unable to get the worker's status", exc))
            return
        if error:
            res.log.error("%s", errno_text("The worker could not report its status", error))
            return
        copy_fields(out, reply, suffix=str(index), skip=("error",))

    # --- worker channels -----------------------------------------------------

    async def _serve_events(self, res: ResourceState, worker: Worker) -> None:
        """Launch the hook of every event the worker reports, then acknowledge it."""
        try:
            while True:
                frame = await worker.event.recv()
                if frame is None:
                    return
                try:
                    event = parse_event(frame.nv)
                except ProtocolError as exc:
                    res.log.error("Invalid event from the worker: %s", exc)
                    await worker.event.send(event_ack(errno.EINVAL))
                    continue
                res.log.debug("Event %s received.", event.hook_name)
                self.hooks.run(res.config.exec, event_args(res.name, event))
                await worker.event.send(event_ack(0))
        except (OSError, ProtocolError) as exc:
            res.log.debug("%s", errno_text("Event channel failed", exc))

    async def _serve_conn(self, res: ResourceState, worker: Worker, chan: FramedSocket) -> None:
        """Open a connection to the remote node whenever the primary worker asks."""
        try:
            while True:
                frame = await chan.recv()
                if frame is None:
                    return
                try:
                    parse_conn_request(frame.nv)
                except ProtocolError as exc:
                    res.log.error("Invalid connection request from the worker: %s", exc)
                    await chan.send(conn_reply(errno.EINVAL))
                    continue
                error, sock = await self._connect_remote(res)
                try:
                    fds = [sock.fileno()] if sock is not None else []
                    await chan.send(conn_reply(error), fds=fds)
                finally:
                    if sock is not None:
                        sock.close()
        except (OSError, ProtocolError) as exc:
            res.log.debug("%s", errno_text("Connection channel failed", exc))

    async def _connect_remote(self, res: ResourceState) -> tuple[int, socket.socket | None]:
        """Connect to the resource's remote within its timeout: ``(errno, socket)``."""
        cfg = res.config
        if cfg.remoteaddr == "none":
            return errno.EDESTADDRREQ, None
        try:
            sock, connected = await asyncio.to_thread(
                _connect_start, cfg.remoteaddr, cfg.sourceaddr
            )
        except socket.gaierror as exc:
            res.log.debug("Unable to resolve %s: %s.", cfg.remoteaddr, exc)
            return errno.EHOSTUNREACH, None
        except OSError as exc:
            res.log.debug("%s", errno_text(f"Unable to connect to {cfg.remoteaddr}", exc))
            return exc.errno or errno.EIO, None
        except ValueError as exc:
            res.log.error("Unable to connect to %s: %s", cfg.remoteaddr, exc)
            return errno.EINVAL, None
        try:
            if not connected:
                await asyncio.wait_for(_writable(sock), cfg.timeout)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error == 0:
                sock.getpeername()
        except TimeoutError:
            error = errno.ETIMEDOUT
        except OSError as exc:
            error = exc.errno or errno.EIO
        if error:
            sock.close()
            res.log.debug("%s", errno_text(f"Unable to connect to {cfg.remoteaddr}", error))
            return error, None
        sock.setblocking(True)
        return 0, sock


def _connect_start(remote: str, source: str | None) -> tuple[socket.socket, bool]:
    """Create, bind and start connecting a socket (runs in a thread: may resolve names)."""
    sock = transport.client(remote, source)
    try:
        connected = transport.connect_start(sock, remote)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, connected


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
