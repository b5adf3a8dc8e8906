"""tests.helpers.faultproxy: the fault-injecting loopback TCP proxy."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pyhast.wire.frame import encode_frame
from pyhast.wire.nv import NV
from tests.helpers.faultproxy import DOWN, UP, FaultProxy, FrameTracker

pytestmark = pytest.mark.timeout(60)

TARGET_IP = "127.0.0.2"
PROXY_IP = "127.0.0.5"
SOURCE_IP = "127.0.0.1"


def wait_for(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class Conn:
    sock: socket.socket
    peer: tuple[str, int]
    data: bytearray = field(default_factory=bytearray)
    eof: bool = False
    error: str | None = None


class Server:
    """A target: records what each connection sent; echoes if asked."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((TARGET_IP, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.conns: list[Conn] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                s, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = Conn(s, peer)
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: Conn) -> None:
        conn.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = conn.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                conn.error = type(exc).__name__
                return
            if not data:
                conn.eof = True
                return
            conn.data += data
            if self.echo:
                with contextlib.suppress(OSError):
                    conn.sock.sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)
        for c in self.conns:
            c.sock.close()


@pytest.fixture
def echo() -> Iterator[Server]:
    srv = Server(echo=True)
    yield srv
    srv.close()


@pytest.fixture
def sink() -> Iterator[Server]:
    srv = Server(echo=False)
    yield srv
    srv.close()


def proxy_for(srv: Server, **kw: object) -> FaultProxy:
    return FaultProxy(srv.address, listen=(PROXY_IP, 0), source=SOURCE_IP, **kw)  # type: ignore[arg-type]


def connect(px: FaultProxy) -> socket.socket:
    s = socket.create_connection(px.address, timeout=5)
    s.settimeout(5)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_passthrough_from_the_source_address(echo: Server) -> None:
    with proxy_for(echo) as px, connect(px) as c:
        assert px.url == f"tcp4://{PROXY_IP}:{px.port}"
        c.sendall(b"hello" * 1000)
        assert recv_exactly(c, 5000) == b"hello" * 1000
        wait_for(lambda: echo.conns, what="the target's connection")
        assert echo.conns[0].peer[0] == SOURCE_IP
        st = px.stats()
        assert st.accepted == 1 and st.active == 1
        assert st.delivered == {UP: 5000, DOWN: 5000}


def test_delay_adds_latency(echo: Server) -> None:
    with proxy_for(echo) as px, connect(px) as c:
        px.delay(0.15, "up")
        start = time.monotonic()
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        assert time.monotonic() - start >= 0.14
        px.heal()
        start = time.monotonic()
        c.sendall(b"y")
        assert recv_exactly(c, 1) == b"y"
        assert time.monotonic() - start < 0.14


def test_drop_is_a_black_hole_until_healed(sink: Server) -> None:
    with proxy_for(sink) as px, connect(px) as c:
        c.sendall(b"a")
        wait_for(lambda: sink.conns and sink.conns[0].data == b"a", what="first byte")
        px.drop("up")
        c.sendall(b"lost" * 100)
        wait_for(lambda: px.stats().discarded[UP] == 400, what="discarded bytes")
        px.heal()
        c.sendall(b"b")
        wait_for(lambda: sink.conns[0].data == b"ab", what="bytes after heal")
        assert not sink.conns[0].eof


def test_stall_holds_data_and_delivers_it_in_order(sink: Server) -> None:
    with proxy_for(sink) as px, connect(px) as c:
        c.sendall(b"1")
        wait_for(lambda: sink.conns and sink.conns[0].data == b"1", what="first byte")
        px.stall()
        c.sendall(b"2345")
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # bounded: nothing may arrive while stalled
            assert sink.conns[0].data == b"1"
            time.sleep(0.02)
        assert px.stats().delivered[UP] == 1
        px.heal()
        wait_for(lambda: sink.conns[0].data == b"12345", what="held bytes")


def test_cut_one_direction_half_closes(echo: Server) -> None:
    with proxy_for(echo) as px, connect(px) as c:
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
        px.cut(DOWN)
        c.sendall(b"more")
        wait_for(lambda: echo.conns[0].data == b"pingmore", what="up still flowing")
        assert c.recv(10) == b""  # EOF towards the client, the echo is discarded
        wait_for(lambda: px.stats().discarded[DOWN] == 4, what="echo discarded")


def test_reset_and_partition(echo: Server) -> None:
    with proxy_for(echo) as px:
        c = connect(px)
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        assert px.partition() == 1
        with pytest.raises(ConnectionResetError):
            c.recv(1)
        c.close()
        wait_for(lambda: echo.conns[0].error or echo.conns[0].eof, what="target side reset")
        # Refused while partitioned.
        assert refused(px)
        assert px.stats().refused >= 1
        px.heal()
        with connect(px) as c3:
            c3.sendall(b"z")
            assert recv_exactly(c3, 1) == b"z"
        assert px.reset() <= 1


def refused(px: FaultProxy) -> bool:
    """True if a new connection through ``px`` is reset (or closed) at once."""
    try:
        with connect(px) as c:
            c.sendall(b"?")
            return c.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def frame(i: int, payload: bytes) -> bytes:
    nv = NV()
    nv.add_uint64("seq", i)
    nv.add_uint32("size", len(payload))
    return b"".join(bytes(b) for b in encode_frame(nv, payload))


def test_frame_tracker_counts_frames_fed_byte_by_byte() -> None:
    stream = b"".join(frame(i, bytes([i]) * (100 * i)) for i in range(1, 6))
    tr = FrameTracker()
    boundaries = 0
    for i in range(len(stream)):
        tr.consume(stream[i : i + 1])
        boundaries += tr.at_boundary
    assert tr.frames == 5 == boundaries and not tr.broken
    junk = FrameTracker()
    junk.consume(b"\x07" + bytes(4))  # version 7
    assert junk.broken


@pytest.mark.parametrize("end", ["reset", "close"])
def test_truncate_cuts_inside_the_next_frame(sink: Server, end: str) -> None:
    with proxy_for(sink) as px, connect(px) as c:
        first = frame(1, b"a" * 3000)
        c.sendall(first)
        wait_for(lambda: sink.conns and len(sink.conns[0].data) == len(first), what="frame 1")
        done = px.truncate(UP, keep=40, end=end)  # type: ignore[arg-type]
        second = frame(2, b"b" * 5000)
        c.sendall(second + frame(3, b"c"))
        assert done.result(5) == len(first) + 40
        wait_for(lambda: sink.conns[0].eof or sink.conns[0].error, what="the cut")
        assert bytes(sink.conns[0].data) == first + second[:40]
        if end == "reset":
            with pytest.raises(ConnectionResetError):
                c.recv(1)
        else:
            assert c.recv(1) == b""


def test_truncate_skips_frames_shorter_than_keep(sink: Server) -> None:
    with proxy_for(sink) as px, connect(px) as c:
        small, big = frame(1, b"s"), frame(2, b"B" * 1000)
        done = px.truncate(UP, keep=len(small) + 10)
        c.sendall(small + big)
        assert done.result(5) == 2 * len(small) + 10
        wait_for(lambda: sink.conns and (sink.conns[0].eof or sink.conns[0].error), what="cut")
        assert bytes(sink.conns[0].data) == small + big[: len(small) + 10]


def test_truncate_plain_bytes(sink: Server) -> None:
    with proxy_for(sink, hast_frames=False) as px, connect(px) as c:
        done = px.truncate(UP, keep=7, frames=False)
        c.sendall(b"0123456789")
        assert done.result(5) == 7
        wait_for(lambda: sink.conns and (sink.conns[0].eof or sink.conns[0].error), what="cut")
        assert bytes(sink.conns[0].data) == b"0123456"


def test_close_ends_everything_quickly(echo: Server) -> None:
    px = proxy_for(echo).start()
    socks = [connect(px) for _ in range(5)]
    px.wait_connections(5)
    px.stall()
    start = time.monotonic()
    px.close()
    assert time.monotonic() - start < 5
    for s in socks:
        with pytest.raises((ConnectionResetError, OSError)):
            s.sendall(b"x")
            if s.recv(1) == b"":
                raise ConnectionResetError
        s.close()
    assert px._thread is not None and not px._thread.is_alive()
