"""A loopback TCP proxy that injects network faults, controlled by the test at run time.

Put it between a primary and its secondary: point the primary's ``remote``
at :attr:`FaultProxy.url` and let the proxy connect to the secondary's
listen address from the primary's IP (``source=``), since the secondary
checks the peer's IP address::

    with FaultProxy(("127.0.0.2", port), listen=("127.0.0.5", 0), source="127.0.0.1") as px:
        ...   # nodea: remote tcp4://127.0.0.5:<px.port>
        px.partition()          # reset both connections, refuse new ones
        px.heal()               # back to a clean link

The proxy runs its own asyncio loop in a daemon thread; every control method
is thread-safe and has taken effect, for existing and new connections, when
it returns.  Directions: ``"up"`` is client -> target (for HAST: primary ->
secondary, on both connections), ``"down"`` the other way, ``"both"`` both.

Faults (each replaces the previous mode of the directions it names):

==================  ==========================================================
``heal()``          pass everything, accept connections, no delay
``delay(s)``        add ``s`` seconds of latency to every chunk (throughput kept)
``drop()``          read and discard (a black hole: connections stay open)
``stall()``         neither read nor forward: data waits (TCP back-pressure) and
                    is delivered, in order, once the mode changes
``cut(direction)``  half-close: FIN towards the receiver, later bytes discarded
``reset()``         RST every current connection (new ones still accepted)
``partition()``     ``reset()`` and refuse (RST) new connections until ``heal()``
``refuse(on)``      refuse (RST) new connections, or accept them again
``truncate(d, k)``  forward only ``k`` bytes of the next HAST frame in direction
                    ``d`` (never a whole frame), then RST that connection (one shot)
==================  ==========================================================

HAST frames are followed per connection and direction (5-byte header, nv
list, payload of the nv's ``size``) so that :meth:`FaultProxy.truncate` cuts
strictly inside a frame; with ``hast_frames=False``, or if a stream is not
HAST, it cuts ``k`` bytes after the call instead.

Every loop is bounded by the life of its connection, and :meth:`close` ends
them all (RST) within a few seconds.  :meth:`stats` counts bytes and
connections; :meth:`wait_connections` polls until the peers are connected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

from pyhast.errors import ProtocolError
from pyhast.wire.frame import HEADER_SIZE, decode_header, payload_size
from pyhast.wire.nv import NV

__all__ = ["DOWN", "UP", "Direction", "FaultProxy", "FrameTracker", "ProxyStats"]

Direction = Literal["up", "down", "both"]
UP: Literal["up"] = "up"
DOWN: Literal["down"] = "down"
_DIRS: tuple[Literal["up"], Literal["down"]] = (UP, DOWN)

#: Bytes read per chunk.
CHUNK = 64 * 1024
#: Chunks queued per direction and connection before the reader waits.
QUEUE_CHUNKS = 64
#: Seconds a control call may take.
CALL_TIMEOUT = 10.0
#: Largest nv list the frame tracker believes (else: not a HAST stream).
_MAX_TRACKED_NV = 16 * 1024 * 1024

T = TypeVar("T")


def _dirs(direction: Direction) -> tuple[Literal["up", "down"], ...]:
    if direction == "both":
        return _DIRS
    if direction in _DIRS:
        return (direction,)
    raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")


class FrameTracker:
    """Follows HAST frame boundaries in one byte stream (sans-IO).

    ``consume`` takes at most :attr:`section_left` bytes at a time.
    :attr:`in_frame` is the number of bytes of the current frame seen so far
    (0 at a boundary).  A stream that does not parse makes :attr:`broken`
    true and tracking stops.
    """

    def __init__(self) -> None:
        self.section: Literal["header", "nv", "payload"] = "header"
        self.section_left = HEADER_SIZE
        self.in_frame = 0
        self.frames = 0
        self.broken = False
        self._buf = bytearray()

    @property
    def at_boundary(self) -> bool:
        return self.in_frame == 0

    def consume(self, data: bytes | memoryview) -> None:
        n = len(data)
        if self.broken or n == 0:
            return
        if n > self.section_left:
            raise ValueError("consume() takes at most section_left bytes")
        self.section_left -= n
        self.in_frame += n
        if self.section != "payload":
            self._buf += data
        if self.section_left:
            return
        try:
            if self.section == "header":
                _, nvsize = decode_header(bytes(self._buf), max_nv_size=_MAX_TRACKED_NV)
                self.section, self.section_left = "nv", nvsize
                self._buf.clear()
                return
            if self.section == "nv":
                size = payload_size(NV.decode(bytes(self._buf)), max_payload=1 << 32)
                self._buf.clear()
                if size:
                    self.section, self.section_left = "payload", size
                    return
        except (ProtocolError, ValueError):
            self.broken = True
            return
        self.section, self.section_left = "header", HEADER_SIZE
        self._buf.clear()
        self.in_frame = 0
        self.frames += 1


@dataclass
class ProxyStats:
    """Counters since the proxy started (a snapshot)."""

    accepted: int = 0
    refused: int = 0
    active: int = 0
    resets: int = 0
    #: per direction: bytes read from the sender
    received: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    #: per direction: bytes delivered to the receiver
    delivered: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    #: per direction: bytes discarded (drop, cut, truncate)
    discarded: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})


@dataclass
class _Truncate:
    keep: int
    frames: bool
    end: Literal["reset", "close"]
    done: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)
    #: plain mode: the sender's stream offset when the first chunk was seen
    start: int | None = None
    #: frame mode: a frame boundary has been seen since the call
    started: bool = False


class _Pump:
    """One direction of one link: a reader task and a writer task joined by a queue."""

    def __init__(
        self,
        proxy: FaultProxy,
        link: _Link,
        direction: Literal["up", "down"],
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.link = link
        self.direction = direction
        self.src = src
        self.dst = dst
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        self.tracker = FrameTracker() if proxy.hast_frames else None
        self.cut_sent = False
        self.eof_sent = False
        #: stream offset of the sender (bytes consumed by the writer side)
        self.position = 0

    async def read_loop(self) -> None:
        proxy = self.proxy
        stats = proxy._stats
        while True:
            while proxy._mode[self.direction] == "stall":
                await proxy._wait_change()
            data = await self.src.read(CHUNK)
            if not data:
                await self.queue.put(None)
                return
            stats.received[self.direction] += len(data)
            await self.queue.put((time.monotonic(), data))

    async def write_loop(self) -> None:
        proxy = self.proxy
        stats = proxy._stats
        d = self.direction
        while True:
            item = await self.queue.get()
            if item is None:
                if not self.cut_sent and not self.eof_sent and self.dst.can_write_eof():
                    self.eof_sent = True
                    with contextlib.suppress(OSError, RuntimeError):
                        self.dst.write_eof()
                return
            arrived, data = item
            while True:
                mode = proxy._mode[d]
                if mode == "stall":
                    await proxy._wait_change()
                    continue
                delay = proxy._delay[d]
                wait = arrived + delay - time.monotonic()
                if delay and wait > 0:
                    await proxy._sleep_or_change(wait)
                    continue
                break
            mode = proxy._mode[d]
            if mode == "drop":
                self._advance(data)
                stats.discarded[d] += len(data)
                continue
            if mode == "cut":
                self._advance(data)
                stats.discarded[d] += len(data)
                if not self.cut_sent:
                    self.cut_sent = True
                    with contextlib.suppress(OSError, RuntimeError):
                        if self.dst.can_write_eof():
                            self.dst.write_eof()
                continue
            trunc = proxy._truncate.get(d)
            if trunc is not None:
                cut = self._cut_point(data, trunc)
                if cut is not None:
                    if proxy._truncate.get(d) is trunc:
                        del proxy._truncate[d]
                    self.dst.write(data[:cut])
                    stats.delivered[d] += cut
                    stats.discarded[d] += len(data) - cut
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.dst.drain(), 2.0)
                    trunc.done.set_result(self.position)
                    if trunc.end == "close":
                        self.link.close()
                    else:
                        self.link.reset()
                    return
            else:
                self._advance(data)
            if self.dst.transport.is_closing():
                self.link.reset()
                return
            self.dst.write(data)
            stats.delivered[d] += len(data)
            try:
                await self.dst.drain()
            except (ConnectionError, OSError):
                self.link.reset()
                return

    def _advance(self, data: bytes) -> None:
        self.position += len(data)
        tracker = self.tracker
        if tracker is None or tracker.broken:
            return
        view = memoryview(data)
        while view and not tracker.broken:
            n = min(len(view), tracker.section_left)
            tracker.consume(view[:n])
            view = view[n:]

    def _cut_point(self, data: bytes, trunc: _Truncate) -> int | None:
        """Consume ``data`` up to the cut; the cut's offset in ``data``, or None (no cut yet)."""
        tracker = self.tracker
        if not trunc.frames or tracker is None or tracker.broken:
            # Plain byte count from the first chunk seen after the call.
            if trunc.start is None:
                trunc.start = self.position
            target = trunc.start + trunc.keep
            if self.position + len(data) > target:
                cut = max(0, target - self.position)
                self._advance(data[:cut])
                return cut
            self._advance(data)
            return None
        # Frame aware: ``goal`` bytes into a frame that starts after the call.
        goal = max(trunc.keep, 1)
        view = memoryview(data)
        i = 0
        while i < len(view):
            if tracker.broken:
                self._advance(bytes(view[i:]))
                return None
            if not trunc.started and tracker.at_boundary:
                trunc.started = True
            step = min(len(view) - i, tracker.section_left)
            if trunc.started:
                step = min(step, goal - tracker.in_frame)
            tracker.consume(view[i : i + step])
            self.position += step
            i += step
            if trunc.started and not tracker.at_boundary and tracker.in_frame >= goal:
                return i
        return None


class _Link:
    """One proxied connection (client <-> target)."""

    def __init__(
        self,
        proxy: FaultProxy,
        index: int,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        treader: asyncio.StreamReader,
        twriter: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.index = index
        self.cwriter = cwriter
        self.twriter = twriter
        self.pumps = {
            UP: _Pump(proxy, self, UP, creader, twriter),
            DOWN: _Pump(proxy, self, DOWN, treader, cwriter),
        }
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for pump in self.pumps.values():
            self.tasks.append(loop.create_task(self._guard(pump.read_loop())))
            self.tasks.append(loop.create_task(self._guard(pump.write_loop())))
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.close()

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except (ConnectionError, OSError):
            # One side reset or failed: pass the reset on to the other side.
            self.reset()

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy._stats.resets += 1
        for w in (self.cwriter, self.twriter):
            _rst(w)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def close(self) -> None:
        """Close both sides gracefully (FIN after what was written)."""
        if not self.closed:
            self.closed = True
            for w in (self.cwriter, self.twriter):
                w.close()
            for task in self.tasks:
                if task is not asyncio.current_task():
                    task.cancel()
        self.proxy._links.discard(self)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A TCP proxy from ``listen`` to ``target`` with faults switchable at run time.

    ``source``: the local IP address of the outgoing connections (port 0).
    ``hast_frames``: follow HAST frames so that :meth:`truncate` cuts
    inside a frame.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.5", 0),
        source: str | None = None,
        hast_frames: bool = True,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.listen = listen
        self.source = source
        self.hast_frames = hast_frames
        self.connect_timeout = connect_timeout
        self._mode: dict[str, str] = {UP: "pass", DOWN: "pass"}
        self._delay: dict[str, float] = {UP: 0.0, DOWN: 0.0}
        self._truncate: dict[str, _Truncate] = {}
        self._refuse = False
        self._stats = ProxyStats()
        self._links: set[_Link] = set()
        self._link_ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._changed: asyncio.Event | None = None
        self._address: tuple[str, int] | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind and start serving; returns self."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"faultproxy {self.listen}", daemon=True
        )
        self._thread.start()
        ready.result(CALL_TIMEOUT)
        return self

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_server())
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _start_server(self) -> None:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(
            self._accept, self.listen[0], self.listen[1], reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])

    def close(self) -> None:
        """Reset every connection, stop listening and stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.reset()
            tasks = [t for link in list(self._links) for t in link.tasks]
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(CALL_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CALL_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the proxy listens on."""
        if self._address is None:
            raise RuntimeError("the proxy is not started")
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        """The address for hast.conf: ``tcp4://host:port``."""
        host, port = self.address
        return f"tcp4://{host}:{port}"

    # -- the loop side -------------------------------------------------------------

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        _nodelay(cwriter)
        if self._refuse:
            self._stats.refused += 1
            _rst(cwriter)
            return
        try:
            treader, twriter = await asyncio.wait_for(
                asyncio.open_connection(
                    self.target[0],
                    self.target[1],
                    local_addr=(self.source, 0) if self.source else None,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError):
            self._stats.refused += 1
            _rst(cwriter)
            return
        _nodelay(twriter)
        self._link_ids += 1
        link = _Link(self, self._link_ids, creader, cwriter, treader, twriter)
        self._links.add(link)
        self._stats.accepted += 1
        await link.run()

    async def _wait_change(self) -> None:
        ev = self._changed
        assert ev is not None
        await ev.wait()

    async def _sleep_or_change(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_change(), seconds)

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    def _call(self, func: Callable[[], T]) -> T:
        """Run ``func`` on the proxy's loop and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not started")

        async def run() -> T:
            return func()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(CALL_TIMEOUT)

    # -- faults ----------------------------------------------------------------------

    def _set_mode(self, direction: Direction, mode: str, delay: float | None = None) -> None:
        def apply() -> None:
            for d in _dirs(direction):
                self._mode[d] = mode
                if delay is not None:
                    self._delay[d] = delay
            self._notify()

        self._call(apply)

    def heal(self) -> None:
        """A clean link again: pass everything, no delay, accept connections."""

        def apply() -> None:
            for d in _DIRS:
                self._mode[d] = "pass"
                self._delay[d] = 0.0
            self._truncate.clear()
            self._refuse = False
            self._notify()

        self._call(apply)

    def delay(self, seconds: float, direction: Direction = "both") -> None:
        """Deliver every chunk ``seconds`` after it arrived (order kept)."""
        if seconds < 0:
            raise ValueError("delay must not be negative")
        self._set_mode(direction, "pass", seconds)

    def drop(self, direction: Direction = "both") -> None:
        """Read and discard: the connections stay open, nothing arrives."""
        self._set_mode(direction, "drop")

    def stall(self, direction: Direction = "both") -> None:
        """Stop reading and forwarding; the data is delivered when the mode changes."""
        self._set_mode(direction, "stall")

    def cut(self, direction: Literal["up", "down"]) -> None:
        """Half-close ``direction``: the receiver gets EOF, later bytes are discarded."""
        self._set_mode(direction, "cut")

    def passthrough(self, direction: Direction = "both") -> None:
        """Forward ``direction`` again (its delay is kept)."""
        self._set_mode(direction, "pass")

    def refuse(self, on: bool = True) -> None:
        """Reset new connections as they arrive (``on``), or accept them again."""

        def apply() -> None:
            self._refuse = on

        self._call(apply)

    def reset(self) -> int:
        """RST every current connection; how many were reset."""

        def apply() -> int:
            links = list(self._links)
            for link in links:
                link.reset()
            return len(links)

        return self._call(apply)

    def partition(self) -> int:
        """Refuse new connections and reset the current ones (until :meth:`heal`)."""

        def apply() -> int:
            self._refuse = True
            links = list(self._links)
            for link in links:
                link.reset()
            self._notify()
            return len(links)

        return self._call(apply)

    def truncate(
        self,
        direction: Literal["up", "down"],
        keep: int = 100,
        *,
        frames: bool = True,
        end: Literal["reset", "close"] = "reset",
    ) -> concurrent.futures.Future[int]:
        """Forward only ``keep`` bytes of the next frame in ``direction``, then end the link.

        One shot, on the first connection that carries such a frame.  With
        ``frames`` (and a HAST stream) the cut is strictly inside a frame
        that starts after this call, ``keep`` (at least 1) bytes into it;
        otherwise it is ``keep`` bytes after this call.  ``end``: ``"reset"``
        (RST both sides) or ``"close"`` (FIN both sides).  The future resolves
        with the sender's stream offset of the cut once it has happened.
        """
        if direction not in _DIRS:
            raise ValueError("truncate() needs 'up' or 'down'")
        if keep < 0:
            raise ValueError("keep must not be negative")
        trunc = _Truncate(keep, frames, end)

        def apply() -> None:
            self._truncate[direction] = trunc
            self._notify()

        self._call(apply)
        return trunc.done

    # -- observation -----------------------------------------------------------------

    def stats(self) -> ProxyStats:
        def snap() -> ProxyStats:
            s = self._stats
            return ProxyStats(
                accepted=s.accepted,
                refused=s.refused,
                active=len(self._links),
                resets=s.resets,
                received=dict(s.received),
                delivered=dict(s.delivered),
                discarded=dict(s.discarded),
            )

        return self._call(snap)

    def modes(self) -> dict[str, tuple[str, float]]:
        return self._call(lambda: {d: (self._mode[d], self._delay[d]) for d in _DIRS})

    def wait_connections(self, count: int, timeout: float = 20.0) -> int:
        """Poll until at least ``count`` connections are open; how many are."""
        deadline = time.monotonic() + timeout
        while True:
            active = self.stats().active
            if active >= count:
                return active
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Timed out after {timeout} s waiting for {count} proxied connections "
                    f"({active} open)."
                )
            time.sleep(0.05)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
