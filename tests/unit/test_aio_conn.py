"""FramedConn (asyncio framed connections) and the async socket helpers.

Real sockets on 127.0.0.1 and socketpairs; every test runs under a global
asyncio timeout, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from pyhast.address import Address
from pyhast.errors import FrameError, ProtocolError
from pyhast.transport import aio, base, socketpair, tcp
from pyhast.transport.aio import FramedConn
from pyhast.transport.base import (
    ConnBrokenError,
    ConnBusyError,
    ConnClosedError,
    ConnEOFError,
    ConnError,
    ConnTimeoutError,
)
from pyhast.wire.frame import DEFAULT_MAX_PAYLOAD, ERPCMISMATCH, Frame, encode_frame
from pyhast.wire.nv import NV

T = TypeVar("T")
TIMEOUT = 10.0


def run(coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def listen_tcp(backlog: int = 8) -> tuple[socket.socket, str]:
    transport = tcp.TCPTransport()
    sock = transport.server(Address("tcp4", host="127.0.0.1", port=0), backlog=backlog)
    return sock, transport.local_address(sock)


async def raw_tcp_pair(
    rcvbuf: int | None = None, sndbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """(client, accepted), both non-blocking; optional small buffers (set before connect)."""
    listener, address = listen_tcp()
    with listener:
        if rcvbuf is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client = base.client(address)
        if sndbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        client.setblocking(False)
        if not base.connect_start(client, address):
            await aio.wait_connected(client, 5.0)
        accepted, _ = await aio.accept(listener, 5.0)
    accepted.setblocking(False)
    return client, accepted


async def conn_pair(
    *, max_payload: int = DEFAULT_MAX_PAYLOAD, max_queued: int = aio.DEFAULT_MAX_QUEUED
) -> tuple[FramedConn, FramedConn]:
    client, accepted = await raw_tcp_pair()
    a = await FramedConn.open(client, max_payload=max_payload, max_queued=max_queued)
    b = await FramedConn.open(accepted, max_payload=max_payload, max_queued=max_queued)
    return a, b


async def conn_and_raw() -> tuple[FramedConn, socket.socket]:
    """A FramedConn and the raw socket at its other end."""
    client, accepted = await raw_tcp_pair()
    return await FramedConn.open(accepted), client


def msg(seq: int, payload: bytes | None = None) -> tuple[NV, bytes | None]:
    nv = NV()
    nv.add_uint64("seq", seq)
    if payload:
        nv.add_uint32("size", len(payload))
    return nv, payload


def frame_bytes(seq: int, payload: bytes | None = None, version: int = 2) -> bytes:
    nv, data = msg(seq, payload)
    return b"".join(bytes(b) for b in encode_frame(nv, data, version))


def seq_of(frame: Frame) -> int:
    return frame.nv.get_uint64("seq")


def payload_of(frame: Frame) -> bytes | None:
    return None if frame.payload is None else bytes(frame.payload)


async def closed_or_reset(sock: socket.socket) -> bool:
    """Whether the raw peer sees the connection end (EOF or reset)."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                return True
    except ConnectionResetError:
        return True


# --------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("size", [0, 1, 4096, 16 * 1024 + 1, 1024 * 1024])
def test_round_trip_both_directions(size: int) -> None:
    async def main() -> None:
        a, b = await conn_pair()
        payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        for sender, receiver in ((a, b), (b, a)):
            for seq in (1, 2):
                sender.send_frame(*msg(seq, payload or None))
            await sender.drain(5.0)
            for seq in (1, 2):
                frame = await receiver.recv_frame(5.0)
                assert seq_of(frame) == seq
                assert frame.version == 2
                assert payload_of(frame) == (payload or None)
        await a.aclose()
        await b.aclose()

    run(main())


def test_large_and_small_frames_interleaved_arrive_intact() -> None:
    """Large payloads are read straight into their buffers, small ones are not:
    the boundary between the two never loses or shifts a byte."""
    sizes = [1024 * 1024, 4096, 64 * 1024, 64 * 1024 + 1, 200_000, 0, 1024 * 1024 - 7, 512]

    async def main() -> None:
        a, b = await conn_pair()
        payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
        for seq, payload in enumerate(payloads, 1):
            a.send_frame(*msg(seq, payload or None))
        await a.drain(5.0)
        for seq, payload in enumerate(payloads, 1):
            frame = await b.recv_frame(5.0)
            assert seq_of(frame) == seq
            assert payload_of(frame) == (payload or None)
        await a.aclose()
        await b.aclose()

    run(main())


def test_frames_queued_behind_a_slow_reader_arrive_in_order_and_close_flushes_them() -> None:
    """Far more than the socket buffers: queued (uncopied on 3.11), counted,
    drained, and a close() with frames still queued delivers them all."""
    n, size = 48, 1024 * 1024

    async def main() -> None:
        a, raw = await conn_and_raw()
        raw.setblocking(False)
        payloads = [bytes([i]) * size for i in range(n)]
        for seq, payload in enumerate(payloads, 1):
            a.send_frame(*msg(seq, payload))
        assert a.write_buffer_size > 8 * size  # the kernel cannot hold 48 MiB
        if not aio._WRITELINES_ZERO_COPY:
            # 3.11: the transport holds a small hand-off; the rest waits uncopied.
            assert a.write_buffer_size - a._txq_bytes <= aio._TX_HANDOFF
        drained = asyncio.ensure_future(a.drain(10.0))
        await asyncio.sleep(0.1)
        assert not drained.done()  # nobody reads
        a.close()  # with frames still queued
        with pytest.raises(ConnClosedError):
            await asyncio.wait_for(drained, 1)  # woken: the connection is closed
        loop = asyncio.get_running_loop()
        received = bytearray()
        while True:
            chunk = await loop.sock_recv(raw, 1 << 20)
            if not chunk:
                break
            received += chunk
        raw.close()
        assert received == b"".join(frame_bytes(seq, p) for seq, p in enumerate(payloads, 1))

    run(main())


def test_direct_writes_keep_order_while_a_slow_reader_drains_them() -> None:
    """Many pause/resume rounds: frames written straight to the socket and the
    small pieces handed to the transport interleave without losing order, and
    the transport never holds more than the hand-off (3.11)."""
    sizes = [1024 * 1024, 100, 300_000, 1024 * 1024 - 3, 20_000] * 6

    async def main() -> None:
        a, raw = await conn_and_raw()
        raw.setblocking(False)
        payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
        a.coalesce = True  # half of them batched into one write per iteration
        for seq, payload in enumerate(payloads, 1):
            a.send_frame(*msg(seq, payload))
            if seq % 2 == 0:
                await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        expected = b"".join(frame_bytes(seq, p) for seq, p in enumerate(payloads, 1))
        received = bytearray()
        held = 0
        deadline = loop.time() + 20
        while len(received) < len(expected) and loop.time() < deadline:
            received += await loop.sock_recv(raw, 48 * 1024)  # a slow reader
            transport = a._transport
            assert transport is not None
            held = max(held, transport.get_write_buffer_size())
        assert received == expected
        if not aio._WRITELINES_ZERO_COPY:
            assert held <= aio._TX_HANDOFF
        await a.drain(5.0)
        assert a.write_buffer_size == 0
        await a.aclose()
        raw.close()

    run(main())


def test_drain_waits_for_the_queue_and_returns_once_it_is_read() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        for seq in range(1, 33):
            a.send_frame(*msg(seq, bytes([seq]) * (1024 * 1024)))
        drained = asyncio.ensure_future(a.drain(10.0))
        await asyncio.sleep(0.05)
        for seq in range(1, 33):
            frame = await b.recv_frame(5.0)
            assert seq_of(frame) == seq and payload_of(frame) == bytes([seq]) * (1024 * 1024)
        await asyncio.wait_for(drained, 5)
        assert a.write_buffer_size <= aio.DEFAULT_WRITE_LOW
        await a.aclose()
        await b.aclose()

    run(main())


def test_version_is_passed_through() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        a.send_frame(*msg(1), version=1)
        assert (await b.recv_frame(5.0)).version == 1
        a.abort()
        b.abort()

    run(main())


def test_socketpair_conn() -> None:
    async def main() -> None:
        left, right = socketpair.socketpair()
        a = await aio.open_framed(left)
        b = await aio.open_framed(right)
        assert a.peer == "socketpair://" and b.peer == "socketpair://"
        a.send_frame(*msg(7, b"data"))
        frame = await b.recv_frame(5.0)
        assert seq_of(frame) == 7 and payload_of(frame) == b"data"
        a.close()
        with pytest.raises(ConnEOFError):
            await b.recv_frame(5.0)

    run(main())


def test_peer_string() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        assert a.peer.startswith("tcp4://127.0.0.1:")
        assert b.peer.startswith("tcp4://127.0.0.1:")
        assert a.get_extra_info("peername")[0] == "127.0.0.1"
        assert "open" in repr(a)
        a.abort()
        b.abort()

    run(main())


def test_many_frames_in_one_write() -> None:
    async def main() -> None:
        conn, raw = await conn_and_raw()
        count = 2000
        blob = b"".join(frame_bytes(i, b"p%d" % i if i % 3 == 0 else None) for i in range(1, count))
        await asyncio.get_running_loop().sock_sendall(raw, blob)
        for i in range(1, count):
            frame = await conn.recv_frame(5.0)
            assert seq_of(frame) == i
            assert payload_of(frame) == (b"p%d" % i if i % 3 == 0 else None)
        raw.close()
        with pytest.raises(ConnEOFError):
            await conn.recv_frame(5.0)

    run(main())


def test_frames_one_byte_at_a_time() -> None:
    async def main() -> None:
        conn, raw = await conn_and_raw()
        loop = asyncio.get_running_loop()
        blob = frame_bytes(1, b"payload!") + frame_bytes(2)
        receive = asyncio.create_task(conn.recv_frame(5.0))
        for i in range(len(blob)):
            await loop.sock_sendall(raw, blob[i : i + 1])
            await asyncio.sleep(0.001)
        frame = await receive
        assert seq_of(frame) == 1 and payload_of(frame) == b"payload!"
        assert seq_of(await conn.recv_frame(5.0)) == 2
        raw.close()
        conn.abort()

    run(main())


def test_recv_frame_does_not_suspend_when_frames_are_queued() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        for i in range(1, 50):
            a.send_frame(*msg(i))
        await a.drain(5.0)
        first = await b.recv_frame(5.0)
        assert seq_of(first) == 1
        await asyncio.sleep(0.1)  # let the rest arrive

        # A coroutine that never yields to the loop completes in one send().
        coro = b.recv_frame(5.0)
        try:
            coro.send(None)
        except StopIteration as done:
            assert seq_of(done.value) == 2
        else:  # pragma: no cover - would mean a task switch per frame
            coro.close()
            pytest.fail("recv_frame suspended although a frame was queued")
        a.abort()
        b.abort()

    run(main())


# --------------------------------------------------------------------------
# Hostile input


def test_future_version_is_rejected_and_connection_closed() -> None:
    async def main() -> None:
        conn, raw = await conn_and_raw()
        loop = asyncio.get_running_loop()
        # A good frame first, then a version 3 header in the same write.
        await loop.sock_sendall(raw, frame_bytes(1) + frame_bytes(2, version=3))
        assert seq_of(await conn.recv_frame(5.0)) == 1  # delivered before the error
        with pytest.raises(ProtocolError) as info:
            await conn.recv_frame(5.0)
        assert isinstance(info.value, FrameError)
        assert info.value.errno == ERPCMISMATCH
        assert conn.is_closing()
        assert await closed_or_reset(raw)
        with pytest.raises(FrameError):  # sticky
            await conn.recv_frame(5.0)
        with pytest.raises(ConnClosedError):
            conn.send_frame(*msg(3))
        raw.close()

    run(main())


def test_oversize_nv_is_rejected_before_the_body_arrives() -> None:
    async def main() -> None:
        conn, raw = await conn_and_raw()
        await asyncio.get_running_loop().sock_sendall(raw, struct.pack("<BI", 2, 0xFFFFFFFF))
        with pytest.raises(FrameError, match="exceeds"):
            await conn.recv_frame(5.0)
        assert await closed_or_reset(raw)
        raw.close()

    run(main())


def test_garbage_nv_is_a_protocol_error() -> None:
    async def main() -> None:
        conn, raw = await conn_and_raw()
        await asyncio.get_running_loop().sock_sendall(raw, struct.pack("<BI", 2, 8) + b"\x7f" * 8)
        with pytest.raises(ProtocolError):
            await conn.recv_frame(5.0)
        raw.close()

    run(main())


def test_max_payload_can_be_raised_and_restored() -> None:
    async def main() -> None:
        a, b = await conn_pair(max_payload=1000)
        assert b.max_payload == 1000
        b.set_max_payload(5000)
        a.send_frame(*msg(1, b"m" * 4000))
        assert payload_of(await b.recv_frame(5.0)) == b"m" * 4000
        b.set_max_payload(None)
        assert b.max_payload == 1000
        b.max_nv_size = 4096
        assert b.max_nv_size == 4096
        a.send_frame(*msg(2, b"m" * 1001))
        with pytest.raises(FrameError, match="exceeds"):
            await b.recv_frame(5.0)
        a.abort()

    run(main())


# --------------------------------------------------------------------------
# End of connection and timeouts


def test_peer_reset_while_frames_are_queued_ends_the_connection_cleanly() -> None:
    """The socket written directly (3.11) fails mid-queue: the connection
    reports the reset like any other, nothing is raised out of send_frame
    until then, and later sends raise the connection's error."""

    async def main() -> None:
        a, raw = await conn_and_raw()
        lost: list[BaseException | None] = []
        a.set_frame_handler(lambda frame: None, lost.append)
        for seq in range(1, 17):
            a.send_frame(*msg(seq, bytes([seq]) * (1024 * 1024)))
        assert a.write_buffer_size > 0  # far more than the socket holds
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # RST
        for _ in range(200):
            if lost:
                break
            await asyncio.sleep(0.01)
        assert lost and isinstance(lost[0], ConnError), lost
        with pytest.raises(ConnError):
            a.send_frame(*msg(99, b"x" * 100_000))
        await a.wait_closed()

    run(main())


def test_eof_between_frames() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        a.send_frame(*msg(1))
        a.close()
        assert seq_of(await b.recv_frame(5.0)) == 1  # frames before EOF first
        with pytest.raises(ConnEOFError):
            await b.recv_frame(5.0)
        with pytest.raises(ConnEOFError):  # sticky
            await b.recv_frame(5.0)
        with pytest.raises(ConnClosedError):
            b.send_frame(*msg(2))
        await b.wait_closed()
        await a.wait_closed()

    run(main())


def test_eof_inside_a_frame_is_broken() -> None:
    async def main() -> None:
        conn, raw = await conn_and_raw()
        await asyncio.get_running_loop().sock_sendall(raw, frame_bytes(1, b"x" * 100)[:-10])
        raw.close()
        with pytest.raises(ConnBrokenError) as info:
            await conn.recv_frame(5.0)
        assert not isinstance(info.value, ConnClosedError)

    run(main())


def test_reset_is_broken_with_the_oserror_as_cause() -> None:
    async def main() -> None:
        conn, raw = await conn_and_raw()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # RST
        with pytest.raises(ConnBrokenError) as info:
            await conn.recv_frame(5.0)
        assert info.value.errno == errno.ECONNRESET
        assert isinstance(info.value.__cause__, OSError)

    run(main())


def test_recv_timeout() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        start = time.monotonic()
        with pytest.raises(ConnTimeoutError) as info:
            await b.recv_frame(0.3)
        assert 0.25 <= time.monotonic() - start < 2.0
        assert info.value.errno == errno.ETIMEDOUT
        assert b.is_closing()
        with pytest.raises(ConnTimeoutError):  # the connection is gone
            b.send_frame(*msg(1))
        with pytest.raises(ConnEOFError):
            await a.recv_frame(5.0)

    run(main())


def test_recv_timeout_is_an_inactivity_timeout() -> None:
    # A frame trickling in slower than the timeout as a whole, but with data
    # every 0.1 s, must not time out (SO_RCVTIMEO semantics).
    async def main() -> None:
        conn, raw = await conn_and_raw()
        loop = asyncio.get_running_loop()
        blob = frame_bytes(1, b"q" * 10)
        receive = asyncio.create_task(conn.recv_frame(0.3))
        for i in range(len(blob)):
            await loop.sock_sendall(raw, blob[i : i + 1])
            await asyncio.sleep(0.1 if i % 8 == 0 else 0)
        frame = await receive
        assert payload_of(frame) == b"q" * 10
        raw.close()
        conn.abort()

    run(main())


def test_cancelled_recv_keeps_the_connection() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await b.recv_frame()
        assert not b.is_closing()
        a.send_frame(*msg(5))
        assert seq_of(await b.recv_frame(5.0)) == 5
        a.abort()
        b.abort()

    run(main())


def test_concurrent_receivers_are_a_bug() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        first = asyncio.create_task(b.recv_frame())
        await asyncio.sleep(0.01)
        with pytest.raises(ConnBusyError):
            await b.recv_frame()
        a.send_frame(*msg(1))
        assert seq_of(await first) == 1
        a.abort()
        b.abort()

    run(main())


def test_close_wakes_a_pending_receiver() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        receive = asyncio.create_task(b.recv_frame())
        await asyncio.sleep(0.01)
        b.close()
        with pytest.raises(ConnClosedError) as info:
            await receive
        assert not isinstance(info.value, ConnEOFError)
        with pytest.raises(ConnClosedError):
            b.send_frame(*msg(1))
        with pytest.raises(ConnClosedError):
            await b.drain(1.0)
        b.close()  # idempotent
        b.abort()
        await b.wait_closed()
        with pytest.raises(ConnEOFError):
            await a.recv_frame(5.0)

    run(main())


def test_local_close_drops_queued_frames() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        a.send_frame(*msg(1))
        await asyncio.sleep(0.05)
        async with b:
            pass  # aclose()
        with pytest.raises(ConnClosedError):
            await b.recv_frame()
        a.abort()

    run(main())


# --------------------------------------------------------------------------
# Sending: backpressure and the send timeout


def test_drain_times_out_when_the_peer_never_reads() -> None:
    async def main() -> None:
        client, accepted = await raw_tcp_pair(rcvbuf=16 * 1024, sndbuf=16 * 1024)
        conn = await FramedConn.open(client, write_high=64 * 1024, write_low=16 * 1024)
        payload = b"w" * (256 * 1024)
        start = time.monotonic()
        with pytest.raises(ConnTimeoutError) as info:
            for seq in range(1, 10_000):
                conn.send_frame(*msg(seq, payload))
                start = time.monotonic()
                await conn.drain(1.0)
        elapsed = time.monotonic() - start
        assert 0.95 <= elapsed < 3.0  # between 1 and 1.25 timeouts after the last progress
        assert "Unable to send" in str(info.value)
        assert conn.is_closing()
        with pytest.raises(ConnTimeoutError):
            conn.send_frame(*msg(1))
        await conn.wait_closed()
        accepted.close()

    run(main())


def test_drain_keeps_going_while_the_peer_reads_slowly() -> None:
    async def main() -> None:
        client, accepted = await raw_tcp_pair(rcvbuf=16 * 1024, sndbuf=16 * 1024)
        conn = await FramedConn.open(client, write_high=64 * 1024, write_low=16 * 1024)
        loop = asyncio.get_running_loop()
        total = 0
        stop = False

        async def slow_reader() -> None:
            nonlocal total
            while not stop:
                await asyncio.sleep(0.05)
                with contextlib.suppress(BlockingIOError):
                    total += len(accepted.recv(8192))

        reader = loop.create_task(slow_reader())
        payload = b"s" * (32 * 1024)
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:  # 1.2 s of sending with a 0.4 s timeout
            conn.send_frame(*msg(1, payload))
            await conn.drain(0.4)
        stop = True
        await reader
        assert total > 0
        conn.abort()
        accepted.close()

    run(main())


def test_drain_returns_at_once_below_the_high_water_mark() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        a.send_frame(*msg(1, b"x" * 100))
        await a.drain(0.001)
        assert a.write_buffer_size == 0
        a.abort()
        b.abort()

    run(main())


def test_bulk_transfer_with_flow_control_both_ways() -> None:
    async def main() -> None:
        a, b = await conn_pair(max_queued=256 * 1024)
        payload = bytes(range(256)) * 256  # 64 KiB
        count = 200

        async def sender() -> None:
            for seq in range(1, count + 1):
                a.send_frame(*msg(seq, payload))
                await a.drain(5.0)

        task = asyncio.create_task(sender())
        await asyncio.sleep(0.2)
        # Nobody has read yet: the receiver's queue stays bounded.
        assert b._queued <= 256 * 1024 + 256 * 1024 + 64 * 1024
        for seq in range(1, count + 1):
            frame = await b.recv_frame(5.0)
            assert seq_of(frame) == seq and payload_of(frame) == payload
        await task
        a.abort()
        b.abort()

    run(main())


# --------------------------------------------------------------------------
# Frame handlers (the workers' hot path)


def test_frame_handler_gets_frames_synchronously() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        a.send_frame(*msg(1))
        await asyncio.sleep(0.05)  # frame 1 is queued before the handler is set
        seen: list[int] = []
        lost: list[BaseException] = []
        b.set_frame_handler(lambda f: seen.append(seq_of(f)), lost.append)
        assert seen == [1]  # delivered from set_frame_handler itself
        with pytest.raises(ConnBusyError):
            await b.recv_frame()
        for i in range(2, 500):
            a.send_frame(*msg(i, b"d" if i % 2 else None))
        a.close()
        await b.wait_closed()
        await asyncio.sleep(0)
        assert seen == list(range(1, 500))
        assert len(lost) == 1 and isinstance(lost[0], ConnEOFError)
        b.set_frame_handler(None)

    run(main())


def test_frame_handler_errors_end_the_connection() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        lost: list[BaseException] = []

        def handler(frame: Frame) -> None:
            raise KeyError("bad reply")

        b.set_frame_handler(handler, lost.append)
        a.send_frame(*msg(1))
        with pytest.raises(ConnEOFError):
            await a.recv_frame(5.0)
        await asyncio.sleep(0)
        assert len(lost) == 1 and isinstance(lost[0], KeyError)
        with pytest.raises(ConnClosedError):
            b.send_frame(*msg(2))

    run(main())


def test_frame_handler_on_lost_not_called_on_local_close() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        lost: list[BaseException] = []
        b.set_frame_handler(lambda f: None, lost.append)
        b.close()
        await b.wait_closed()
        await asyncio.sleep(0.01)
        assert lost == []
        a.abort()

    run(main())


def test_frame_handler_idle_timeout() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        lost: list[BaseException] = []
        b.set_frame_handler(lambda f: None, lost.append, idle_timeout=0.3)
        for i in range(5):  # keepalives every 0.1 s keep it up
            a.send_frame(*msg(i + 1))
            await asyncio.sleep(0.1)
        assert lost == []
        await asyncio.sleep(0.6)
        assert len(lost) == 1 and isinstance(lost[0], ConnTimeoutError)
        a.abort()

    run(main())


def test_replies_sent_from_handlers_are_batched() -> None:
    # The secondary's pattern: requests arrive on one connection, the handler
    # answers each on another; the answers of one read go out in one write.
    async def main() -> None:
        req_out, req_in = await conn_pair()
        rep_out, rep_in = await conn_pair()
        count = 300

        def on_request(frame: Frame) -> None:
            rep_out.send_frame(*msg(seq_of(frame), b"r" * 100 if seq_of(frame) % 2 else None))
            if seq_of(frame) % 50 == 0:
                rep_out.send_frame(*msg(0, b"L" * 20_000))  # a large payload in between

        transport = rep_out._transport
        assert transport is not None
        writes: list[int] = []
        original_write = transport.write

        def counting_write(data: bytes | bytearray | memoryview) -> None:
            writes.append(len(data))
            original_write(data)

        transport.write = counting_write  # type: ignore[method-assign]
        req_in.set_frame_handler(on_request)
        blob = b"".join(frame_bytes(i) for i in range(1, count + 1))
        req_out._transport.write(blob)  # type: ignore[union-attr]  # one write, few reads
        expected = []
        for i in range(1, count + 1):
            expected.append((i, b"r" * 100 if i % 2 else None))
            if i % 50 == 0:
                expected.append((0, b"L" * 20_000))
        for seq, data in expected:
            frame = await rep_in.recv_frame(5.0)
            assert (seq_of(frame), payload_of(frame)) == (seq, data)
        # Far fewer writes than frames: one per read, plus the large payloads.
        assert len(writes) < count // 4
        for conn in (req_out, req_in, rep_out, rep_in):
            conn.abort()

    run(main())


def test_close_flushes_frames_batched_by_a_handler() -> None:
    async def main() -> None:
        a, b = await conn_pair()

        def on_frame(frame: Frame) -> None:
            b.send_frame(*msg(seq_of(frame) + 100))
            b.close()

        b.set_frame_handler(on_frame)
        a.send_frame(*msg(1))
        assert seq_of(await a.recv_frame(5.0)) == 101
        with pytest.raises(ConnEOFError):
            await a.recv_frame(5.0)

    run(main())


def test_run_handler() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        seen: list[int] = []
        task = asyncio.create_task(b.run_handler(lambda f: seen.append(seq_of(f))))
        for i in range(1, 100):
            a.send_frame(*msg(i))
        await a.drain(5.0)
        a.close()
        with pytest.raises(ConnEOFError):
            await task
        assert seen == list(range(1, 100))

    run(main())


def test_run_handler_idle_timeout_and_cancellation() -> None:
    async def main() -> None:
        a, b = await conn_pair()
        task = asyncio.create_task(b.run_handler(lambda f: None, idle_timeout=5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The connection survives and works in queue mode again.
        a.send_frame(*msg(9))
        assert seq_of(await b.recv_frame(5.0)) == 9
        start = time.monotonic()
        with pytest.raises(ConnTimeoutError):
            await b.run_handler(lambda f: None, idle_timeout=0.2)
        assert time.monotonic() - start < 2.0
        a.abort()

    run(main())


# --------------------------------------------------------------------------
# Async socket set-up


def test_async_connect_and_accept() -> None:
    async def main() -> None:
        listener, address = listen_tcp()
        with listener:
            accept = asyncio.create_task(aio.accept(listener, 5.0))
            sock = await aio.connect(address, timeout=5.0)
            accepted, peer = await accept
            assert peer == f"tcp4://127.0.0.1:{sock.getsockname()[1]}"
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            a = await FramedConn.open(sock)
            b = await FramedConn.open(accepted, peer=peer)
            assert b.peer == peer
            a.send_frame(*msg(1))
            assert seq_of(await b.recv_frame(5.0)) == 1
            a.abort()
            b.abort()

    run(main())


def test_async_accept_timeout() -> None:
    async def main() -> None:
        listener, _ = listen_tcp()
        with listener:
            with pytest.raises(TimeoutError) as info:
                await aio.accept(listener, 0.2)
            assert info.value.errno == errno.ETIMEDOUT

    run(main())


def test_async_connect_refused_and_timeout() -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            await aio.connect(f"127.0.0.1:{port}", timeout=5.0)

        listener, address = listen_tcp(backlog=0)
        held: list[socket.socket] = []
        try:
            for _ in range(32):
                try:
                    held.append(await aio.connect(address, timeout=0.2))
                except TimeoutError as exc:
                    assert exc.errno == errno.ETIMEDOUT
                    break
            else:
                pytest.skip("the listener's backlog never filled up")
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                await aio.connect(address, timeout=0.3)
            assert 0.25 <= time.monotonic() - start < 3.0
        finally:
            for sock in held:
                sock.close()
            listener.close()

    run(main())


def test_wait_connected_for_a_parent_started_socket() -> None:
    async def main() -> None:
        listener, address = listen_tcp()
        with listener:
            sock = base.client(address)  # as the parent does, then passes the fd
            base.connect_start(sock, address)
            sock.setblocking(False)
            await aio.wait_connected(sock, 5.0)
            accepted, _ = await aio.accept(listener, 5.0)
            sock.close()
            accepted.close()

    run(main())


def test_wait_ready() -> None:
    async def main() -> None:
        left, right = socketpair.socketpair()
        with left, right:
            waiter = asyncio.create_task(aio.wait_ready(right, write=False))
            await asyncio.sleep(0.02)
            assert not waiter.done()
            left.send(b"x")
            await waiter
            await aio.wait_ready(right, write=True)

    run(main())
