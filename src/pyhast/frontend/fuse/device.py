"""``/dev/hast/<provname>``: the primary's replicated device as a regular file.

On FreeBSD the primary's device is a GEOM Gate provider.  On Linux,
:class:`HastDevice` mounts a one-file FUSE filesystem *over* a regular file
``<devdir>/<provname>`` (the mount's root is the file itself), served in
this process by :class:`~pyhast.frontend.fuse.server.FuseServer` from the
event loop that owns the backend.  The file has exactly ``backend.size``
bytes and is what ``losetup --direct-io=on``, ``mkfs`` and ``mount -o loop``
take.  Why this and not nbdfuse or a libfuse binding: docs/device.md.

Lifecycle (both methods run on the backend's event loop):

``start()``
    Marks the serving thread PR_SET_IO_FLUSHER where allowed; creates the
    directory and an empty placeholder file; lazily unmounts a *stale* mount
    left on the path by a dead worker (its stat fails with ENOTCONN) but
    refuses to cover a live one; opens /dev/fuse, mounts, answers INIT and
    polls ``stat`` until the file is a regular file of the right size, all
    within ``start_timeout``.
``stop(force=False)``
    Refuses with :class:`DeviceBusy` while anything holds the file (a loop
    device, a process, a bind mount: see :mod:`.holders`), naming the
    holders.  Otherwise unmounts, waits for the session to end, waits for
    requests still in the backend and removes the placeholder.
``stop(force=True)``
    Logs the holders, unmounts lazily and closes /dev/fuse, which aborts the
    connection: every later request of a holder fails (ENOTCONN for a
    process, EIO through a loop device; a filesystem mounted on that loop
    device sees I/O errors and must be unmounted by hand).  Nothing reaches
    the backend after ``stop()`` returns.

If the session ends without ``stop()`` (somebody unmounted the file or
aborted its connection), the device logs it as an error, sets :attr:`lost`
and resolves :meth:`wait_closed`; I/O on a file left mounted fails.  If the
worker process dies, the kernel aborts the connection itself (I/O fails,
never hangs) and the next ``start()`` clears the stale mount.

Blocking system calls that may touch the FUSE file (stat, mount, umount)
run in short-lived daemon threads: the event loop must stay free to answer
the kernel, and a call stuck on a hung mount cannot be cancelled, only
abandoned after its deadline.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from pyhast.errors import ExitCode, HastError
from pyhast.frontend.fuse import kernel
from pyhast.frontend.fuse.holders import Holders, busy_message, find_holders
from pyhast.frontend.fuse.server import (
    MAX_BACKGROUND,
    MAX_INFLIGHT_BYTES,
    MAX_WRITE,
    FuseServer,
    FuseStats,
)
from pyhast.frontend.nbd.backend import BlockBackend

__all__ = ["DEFAULT_DEVDIR", "DeviceBusy", "DeviceError", "HastDevice"]

T = TypeVar("T")
Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

#: Where device files appear by default.
DEFAULT_DEVDIR = "/dev/hast"
#: Filesystem type shown by findmnt (fuse.<subtype>).
FSTYPE = "fuse.hast"
_POLL_INTERVAL = 0.02
_STALE_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})

_io_flusher_logged = False


class DeviceError(HastError):
    """The device file cannot be created, served or removed."""

    exit_code = ExitCode.OSERR


class DeviceBusy(DeviceError):
    """``stop()`` without force while the file is held; ``holders`` says by what."""

    exit_code = ExitCode.TEMPFAIL

    def __init__(self, holders: Holders) -> None:
        super().__init__(busy_message(holders))
        self.holders = holders


async def _in_thread(func: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking call in a daemon thread; DeviceError if it outlives ``timeout``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = func()
        except BaseException as exc:
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name=f"hastdev-{what}", daemon=True).start()
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise DeviceError(f"{what} did not finish within {timeout:g} s.") from None


def _mark_io_flusher(log: Logger) -> bool:
    """PR_SET_IO_FLUSHER on the calling (serving) thread; False where not allowed."""
    global _io_flusher_logged
    try:
        kernel.set_io_flusher()
    except OSError as exc:
        if not _io_flusher_logged:
            _io_flusher_logged = True
            log.debug(
                "Cannot mark the FUSE server as an I/O flusher (%s); "
                "loop devices over it may deadlock under memory pressure.",
                os.strerror(exc.errno or errno.EPERM),
            )
        return False
    return True


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 255:
        raise ValueError(f"{name!r} is not a valid device name.")


class HastDevice:
    """``<devdir>/<name>``: a regular file of ``backend.size`` bytes serving ``backend``.

    ``mode`` is the file's permission bits (owner: this process's uid/gid).
    ``max_background`` is how many asynchronous requests (a loop device's
    I/O) the kernel may keep in flight; ``max_write`` the largest request;
    past ``max_inflight_bytes`` of READ/WRITE payload in the backend, the
    server stops reading requests until some complete.
    ``log`` may be a :class:`~pyhast.log.ResourceAdapter`.
    """

    def __init__(
        self,
        backend: BlockBackend,
        name: str,
        *,
        devdir: str | os.PathLike[str] = DEFAULT_DEVDIR,
        mode: int = 0o600,
        max_background: int = MAX_BACKGROUND,
        max_write: int = MAX_WRITE,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        log: Logger | None = None,
    ) -> None:
        _check_name(name)
        self.backend = backend
        self.name = name
        # realpath of the directory only: resolving the file would stat the mount.
        self.devdir = os.path.realpath(os.fspath(devdir))
        self.path = os.path.join(self.devdir, name)
        self.mode = mode
        self.max_background = max_background
        self.max_write = max_write
        self.max_inflight_bytes = max_inflight_bytes
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log: Logger = log or logging.getLogger(__name__)
        #: Whether PR_SET_IO_FLUSHER could be set (None before start()).
        self.io_flusher: bool | None = None
        #: Why the session ended without stop(), if it did.
        self.lost: str | None = None
        self._server: FuseServer | None = None
        self._dev: tuple[int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = asyncio.Event()
        self._closed.set()

    def __repr__(self) -> str:
        return f"HastDevice({self.path!r}, size={self.backend.size})"

    # -- state --------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between a successful start() and stop() (or loss of the session)."""
        return not self._closed.is_set()

    @property
    def stats(self) -> FuseStats:
        """Request counters of the current (or last) session."""
        return self._server.stats if self._server is not None else FuseStats()

    @property
    def dev(self) -> tuple[int, int] | None:
        """(major, minor) of the mounted file; its FUSE connection is named by the minor."""
        return self._dev

    def holders(self) -> Holders:
        """What holds the file now (loop devices, processes, bind mounts)."""
        return find_holders(self.path, dev=self._dev)

    async def wait_closed(self) -> None:
        """Return once the device is stopped or its session was lost."""
        await self._closed.wait()

    # -- start --------------------------------------------------------------

    async def start(self) -> None:
        """Mount the file and serve it; DeviceError if it cannot be done in time."""
        if self.running:
            raise RuntimeError(f"{self.path} is already started.")
        self.io_flusher = _mark_io_flusher(self.log)
        self.lost = None
        self._stopping = False
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        await self._prepare_mountpoint(deadline)
        server = FuseServer(
            self.backend,
            mode=self.mode,
            uid=os.geteuid(),
            gid=os.getegid(),
            max_background=self.max_background,
            max_write=self.max_write,
            max_inflight_bytes=self.max_inflight_bytes,
            log=self.log,
        )
        try:
            fd = server.open()
        except OSError as exc:
            self._remove_placeholder()
            raise DeviceError(f"Unable to open /dev/fuse: {exc.strerror}.") from exc
        self._server = server
        try:
            await self._mount(fd, deadline)
            server.start()  # reading an unmounted /dev/fuse fails with EPERM
            await self._wait_ready(server, deadline)
        except BaseException:
            server.close()
            await self._abandon_mount()
            await server.drain(self.stop_timeout)
            self._server = None
            self._remove_placeholder()
            raise
        self._closed.clear()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(server), name=f"hastdev-{self.name}"
        )
        self.log.debug(
            "%s is up (%d bytes, FUSE connection %s).",
            self.path,
            self.backend.size,
            self._dev[1] if self._dev else "?",
        )

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - asyncio.get_running_loop().time())

    async def _prepare_mountpoint(self, deadline: float) -> None:
        """Clear stale mounts on the path and make the placeholder file."""
        for _ in range(8):  # stacked stale mounts are cleared one by one
            if not any(m.mountpoint == self.path for m in kernel.mountinfo()):
                break
            try:
                # An open, not a stat: the kernel answers stat from its
                # attribute cache even when the server is long dead, while an
                # open always asks the server (ENOTCONN once it is gone).
                await _in_thread(
                    lambda: os.close(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)),
                    self._remaining(deadline),
                    f"open {self.path}",
                )
            except OSError as exc:
                if exc.errno not in _STALE_ERRNOS:
                    raise DeviceError(
                        f"{self.path} is mounted and unusable: {exc.strerror}."
                    ) from exc
                self.log.warning(
                    "Removing the stale mount on %s left by a server that died.", self.path
                )
                try:
                    kernel.umount(self.path, detach=True)
                except OSError as uexc:
                    raise DeviceError(f"Unable to remove the stale mount: {uexc}.") from uexc
                continue
            raise DeviceError(f"{self.path} is already mounted and served by another process.")
        else:
            raise DeviceError(f"Too many mounts stacked on {self.path}.")

        def make() -> None:
            os.makedirs(self.devdir, mode=0o755, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                st = os.lstat(self.path)
                if not stat.S_ISREG(st.st_mode):
                    raise DeviceError(f"{self.path} exists and is not a regular file.") from None
            else:
                os.close(fd)

        try:
            make()
        except OSError as exc:
            raise DeviceError(f"Unable to create {self.path}: {exc.strerror}.") from exc

    async def _mount(self, fd: int, deadline: float) -> None:
        flags = kernel.MS_NOSUID | kernel.MS_NODEV
        if self.backend.read_only:
            flags |= kernel.MS_RDONLY
        data = (
            f"fd={fd},rootmode={stat.S_IFREG:o},user_id={os.geteuid()},"
            f"group_id={os.getegid()},allow_other,default_permissions"
        )
        try:
            await _in_thread(
                lambda: kernel.mount(f"hast/{self.name}", self.path, FSTYPE, flags, data),
                self._remaining(deadline),
                f"mount {self.path}",
            )
        except OSError as exc:
            raise DeviceError(f"Unable to mount {self.path}: {exc.strerror}.") from exc

    async def _wait_ready(self, server: FuseServer, deadline: float) -> None:
        """Wait for INIT, then poll stat until the file has the backend's size."""
        assert server.initialized is not None
        try:
            await asyncio.wait_for(asyncio.shield(server.initialized), self._remaining(deadline))
        except TimeoutError:
            raise DeviceError(f"The kernel did not initialise {self.path} in time.") from None
        except ConnectionError as exc:
            raise DeviceError(f"{self.path}: {exc}") from exc
        size = self.backend.size
        last = "no answer"
        while True:
            try:
                st = await _in_thread(
                    lambda: os.stat(self.path), self._remaining(deadline), f"stat {self.path}"
                )
            except OSError as exc:
                last = exc.strerror or str(exc)
            else:
                if stat.S_ISREG(st.st_mode) and st.st_size == size:
                    self._dev = (os.major(st.st_dev), os.minor(st.st_dev))
                    return
                last = f"mode {st.st_mode:o}, size {st.st_size}"
            if self._remaining(deadline) <= 0:
                raise DeviceError(
                    f"{self.path} did not become a {size}-byte file in time ({last})."
                )
            await asyncio.sleep(_POLL_INTERVAL)

    # -- stop ---------------------------------------------------------------

    async def stop(self, force: bool = False) -> None:
        """Unmount and stop serving (see the module docstring); idempotent."""
        server = self._server
        if server is None or not self.running:
            return
        loop = asyncio.get_running_loop()
        holders = await loop.run_in_executor(None, self.holders)
        if holders and not force:
            raise DeviceBusy(holders)
        if holders:
            self.log.warning(
                "Forcing %s away while it is in use by %s; their I/O will fail.",
                self.path,
                holders.describe(),
            )
        self._stopping = True
        try:
            await _in_thread(
                lambda: kernel.umount(self.path, detach=force),
                self.stop_timeout,
                f"umount {self.path}",
            )
        except OSError as exc:
            if exc.errno == errno.EBUSY and not force:
                self._stopping = False
                holders = await loop.run_in_executor(None, self.holders)
                if holders:
                    raise DeviceBusy(holders) from None
                raise DeviceError(f"{self.path} is busy (holder unknown); use force.") from None
            if exc.errno != errno.EINVAL:  # EINVAL: no longer mounted
                self.log.warning("Unable to unmount %s: %s.", self.path, exc.strerror)
        except DeviceError:
            self.log.warning("Unmounting %s hangs; aborting its connection.", self.path)
        if not force and server.ended is not None:
            try:
                await asyncio.wait_for(asyncio.shield(server.ended), self.stop_timeout)
            except TimeoutError:
                self.log.warning("The FUSE session of %s did not end; aborting it.", self.path)
        await self._finish(server)

    async def _finish(self, server: FuseServer) -> None:
        server.close()
        cancelled = await server.drain(self.stop_timeout)
        if cancelled:
            self.log.warning(
                "%d requests on %s were still in the backend after %g s; cancelled them.",
                cancelled,
                self.path,
                self.stop_timeout,
            )
        self._remove_placeholder()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        self._closed.set()
        self.log.debug("%s is down.", self.path)

    async def _watch(self, server: FuseServer) -> None:
        """Report a session that ends while nobody is stopping it."""
        assert server.ended is not None
        reason = await asyncio.shield(server.ended)
        if self._stopping:
            return
        self.lost = reason or "unmounted or aborted from outside"
        self.log.error(
            "%s lost its FUSE session (%s); I/O on it fails until the device is restarted.",
            self.path,
            self.lost,
        )
        self._stopping = True
        server.close()
        await self._abandon_mount()
        await self._finish(server)

    async def _abandon_mount(self) -> None:
        """Lazily unmount the path if something is still mounted there."""
        if any(m.mountpoint == self.path for m in kernel.mountinfo()):
            try:
                await _in_thread(
                    lambda: kernel.umount(self.path, detach=True),
                    self.stop_timeout,
                    f"umount {self.path}",
                )
            except (OSError, DeviceError) as exc:
                self.log.warning("Unable to detach %s: %s", self.path, exc)

    def _remove_placeholder(self) -> None:
        """Remove the placeholder file, unless something is still mounted on it."""
        if any(m.mountpoint == self.path for m in kernel.mountinfo()):
            return
        try:
            if stat.S_ISREG(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.warning("Unable to remove %s: %s.", self.path, exc.strerror)

    async def __aenter__(self) -> HastDevice:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
