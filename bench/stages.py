"""CPU cost per request of each stage of the replicated write path.

``.venv/bin/python bench/stages.py [--out bench/out] [--quick]`` writes
``<out>/stages.json`` and ``<out>/stages.md`` and prints the table.

Every stage calls the project's own functions (nothing is re-implemented),
for a 4 KiB and a 1 MiB write where the size matters:

1. NBD request decode (primary): the bytes fio sends (``encode_requests``) are
   received the way the NBD server does it: copied into
   ``RequestDecoder.get_buffer()`` (the copy a ``recv_into`` would make),
   ``buffer_updated``, ``read_requests``, ``validate_request``;
2. ``Activemap.write_start`` + ``write_complete`` on an extent already dirty;
3. ``Provider.pwrite`` to a file in ``--workdir`` (page cache);
4. request encode: ``request_nv`` + ``pipeline_send`` (hole, no checksum) +
   ``encode_frame``, on random data and on all-zero data (sent as a hole);
   and ``request_nv`` alone;
5. ``sendmsg`` of the encoded request on a blocking socket to a process that
   drains it, over TCP 127.0.0.1 and over a UNIX socketpair (CPU of the
   sending thread only);
6. secondary decode: ``FrameDecoder`` + ``parse_request`` + ``pipeline_recv``,
   fed the way ``FramedConn`` reads (copy into its read buffer then ``feed``;
   or, for a large payload, a copy straight into ``payload_window()``); and
   ``NV.decode`` of a request's nv alone;
7. reply encode: ``reply_nv`` + ``encode_frame`` (memsync ``received``, final);
8. reply decode: ``FrameDecoder`` + ``parse_reply``;
9. asyncio: create_future + set_result + the awaiting task resuming (64
   waiters per loop iteration, and one), and ``call_soon`` of a callback;
10. end to end: a ``FramedConn`` pair over TCP 127.0.0.1 in one loop, closed
    loop with a fixed queue depth: request (``request_nv`` + ``pipeline_send``
    + ``send_frame``), the other side's frame handler decodes it and answers
    with a reply frame, the first side's handler decodes the reply (QD1, and
    the queue depths of run.py's fio workloads: 32 for 4 KiB, 16 for 1 MiB);
11. the primary's write path end to end: ``PrimaryDevice.write`` in memsync
    on a real local component (a resource created in ``--workdir``, every
    extent already dirty) and a ``RemoteComponent`` on two FramedConn TCP
    pairs, answered by a responder that decodes each request and sends the
    ``received`` and the final reply as the secondary does (without its
    pwrite); fio's queue depths.  What 11 costs beyond 2 + 3 + 10 is the
    primary's own bookkeeping (range locks, futures, tasks, completion).

A repetition runs a fixed number of operations, chosen by a calibration run
(which is also the warm-up) so that one repetition takes about ``target``
seconds of CPU; the table shows the median of ``reps`` repetitions, in
microseconds of CPU per operation, with the clock used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final

from lib import report

from pyhast.address import Address
from pyhast.defaults import (
    HAST_EXTENTSIZE,
    HAST_KEEPDIRTY,
    HAST_PROTO_VERSION,
    MAXPHYS,
    METADATA_SIZE,
)
from pyhast.disk.activemap import Activemap
from pyhast.disk.metadata import metadata_create
from pyhast.disk.provider import Provider
from pyhast.enums import Checksum, Compression, HioCmd, Replication
from pyhast.frontend.nbd.protocol import Cmd, ExportInfo, RequestDecoder, encode_requests
from pyhast.frontend.nbd.protocol import Request as NbdRequest
from pyhast.frontend.nbd.protocol import validate_request as nbd_validate
from pyhast.log import ResourceAdapter
from pyhast.transport import aio, base, tcp
from pyhast.transport.aio import FramedConn
from pyhast.wire.frame import HEADER_SIZE, NEED_DATA, Frame, FrameDecoder, encode_frame
from pyhast.wire.messages import encode_reply, parse_reply, parse_request, reply_nv, request_nv
from pyhast.wire.nv import NV
from pyhast.wire.pipeline import pipeline_recv, pipeline_send
from pyhast.worker.local import LocalComponent
from pyhast.worker.primary import PrimaryDevice
from pyhast.worker.remote import RemoteComponent

KiB: Final = 1024
MiB: Final = 1024 * KiB
SIZES: Final = (4 * KiB, MiB)
#: Offsets of the requests cycle through this range (the device size).
SPAN: Final = 64 * MiB
#: Size of the scratch file of the local write stage.
FILE_SPAN: Final = 16 * MiB
SECTOR: Final = 512
VERSION: Final = HAST_PROTO_VERSION
#: Bytes of requests received per burst (one "read" of the server, roughly).
BURST_BYTES: Final = 128 * KiB
#: FramedConn reads straight into a payload while this much of it is missing.
DIRECT_READ_MIN: Final = 64 * KiB
#: Queue depths of the end-to-end stage (those of the fio workloads of run.py).
QD: Final = {4 * KiB: 32, MiB: 16}
#: Replies per burst of the reply decode stage.
REPLY_BURST: Final = 64
#: Callbacks scheduled before the call_soon stage yields to the loop.
CALL_SOON_CHUNK: Final = 1000
#: Bound on any wait for a socket or an event loop.
IO_TIMEOUT: Final = 30.0
#: Random payload bytes (fio's buffers are random, so not a hole).
_DATA: Final = os.urandom(MAXPHYS)

Clock = Callable[[], float]
#: Runs one repetition, returns the CPU seconds it measured.
Timed = Callable[[], float]
#: ``make(n, clock)``: set up a repetition of ``n`` operations (not timed).
Maker = Callable[[int, Clock], AbstractContextManager[Timed]]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One row of measurements: a stage, a variant, a payload size."""

    stage: str
    name: str
    size: int | None  # payload bytes; None when the stage does not depend on it
    clock: Clock
    make: Maker
    unit: int = 1  # the operation count is a multiple of this
    note: str = ""
    min_ops: int = 1  # fewest operations of a measured repetition


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long repetitions are."""

    target_s: float  # CPU seconds per measured repetition
    max_ops: int
    reps: int = 5


# --------------------------------------------------------------------------
# Data


def payload(size: int, zero: bool = False) -> bytes:
    return bytes(size) if zero else _DATA[:size]


def offset_of(i: int, size: int) -> int:
    return (i * size) % SPAN


def per_burst(size: int) -> int:
    """Requests of ``size`` bytes in one burst (at least one)."""
    return max(1, BURST_BYTES // size)


def encode_request(seq: int, offset: int, data: bytes) -> list[bytes | memoryview]:
    """A WRITE request as RemoteComponent sends it (memsync, hole, no checksum)."""
    nv = request_nv(HioCmd.WRITE, seq, offset, len(data), memsync=True)
    body = pipeline_send(nv, data, Compression.HOLE, Checksum.NONE)
    return encode_frame(nv, body, VERSION)


def request_stream(size: int, count: int) -> bytes:
    data = payload(size)
    frames = (encode_request(i + 1, offset_of(i, size), data) for i in range(count))
    return b"".join(buf for frame in frames for buf in frame)


def reply_stream(count: int) -> bytes:
    """Memsync replies: ``received`` then final, for count // 2 requests."""
    nvs = (reply_nv(i // 2 + 1, 0, received=i % 2 == 0) for i in range(count))
    return b"".join(buf for nv in nvs for buf in encode_frame(nv, None, VERSION))


def nbd_stream(size: int, count: int) -> bytes:
    data = payload(size)
    reqs = (
        NbdRequest(int(Cmd.WRITE), 0, i + 1, offset_of(i, size), size, data) for i in range(count)
    )
    return encode_requests(reqs)


def nbd_export() -> ExportInfo:
    return ExportInfo("bench", SPAN, block_size=(SECTOR, 4 * KiB, MAXPHYS))


# --------------------------------------------------------------------------
# Measuring


def clocked(clock: Clock, fn: Callable[[], int], n: int) -> Timed:
    """Time ``fn`` (which returns how many operations it did) with ``clock``."""

    def timed() -> float:
        start = clock()
        done = fn()
        seconds = clock() - start
        if done != n:
            raise RuntimeError(f"{done} operations done instead of {n}")
        return seconds

    return timed


def run_rep(spec: Spec, n: int) -> float:
    with spec.make(n, spec.clock) as timed:
        return timed()


def round_up(n: int, unit: int) -> int:
    return max(unit, -(-n // unit) * unit)


def calibrate(spec: Spec, budget: Budget) -> int:
    """Warm up and choose the operation count of a repetition (~target_s of CPU)."""
    n = spec.unit
    seconds = 0.0
    for _ in range(8):
        seconds = run_rep(spec, n)
        if seconds >= budget.target_s / 10 or n >= budget.max_ops:
            break
        n = round_up(n * 10, spec.unit)
    per_op = max(seconds / n, 1e-9)
    wanted = max(spec.min_ops, min(budget.max_ops, int(budget.target_s / per_op)))
    return round_up(wanted, spec.unit)


def measure(spec: Spec, budget: Budget) -> dict[str, Any]:
    n = calibrate(spec, budget)
    reps_us = [run_rep(spec, n) / n * 1e6 for _ in range(budget.reps)]
    return {
        "stage": spec.stage,
        "name": spec.name,
        "size": spec.size,
        "clock": spec.clock.__name__,
        "ops_per_rep": n,
        "reps_us": reps_us,
        "median_us": statistics.median(reps_us),
        "min_us": min(reps_us),
        "max_us": max(reps_us),
        "note": spec.note,
    }


# --------------------------------------------------------------------------
# 1. NBD request decode


def receive_nbd_burst(decoder: RequestDecoder, export: ExportInfo, stream: memoryview) -> int:
    """Receive ``stream`` as the NBD server does (recv into get_buffer, parse); return requests."""
    got = 0
    pos = 0
    while pos < len(stream):
        buf = decoder.get_buffer()
        k = min(len(buf), len(stream) - pos)
        assert k > 0
        buf[:k] = stream[pos : pos + k]
        decoder.buffer_updated(k)
        pos += k
        for req in decoder.read_requests():
            if nbd_validate(req, export) == 0:
                got += 1
    return got


@contextlib.contextmanager
def nbd_decode(size: int, n: int, clock: Clock) -> Iterator[Timed]:
    per = per_burst(size)
    stream = memoryview(nbd_stream(size, per))
    decoder = RequestDecoder()
    export = nbd_export()

    def run() -> int:
        return sum(receive_nbd_burst(decoder, export, stream) for _ in range(n // per))

    yield clocked(clock, run, n)


# --------------------------------------------------------------------------
# 2. activemap


@contextlib.contextmanager
def activemap_hit(size: int, n: int, clock: Clock) -> Iterator[Timed]:
    am = Activemap(SPAN, HAST_EXTENTSIZE, HAST_KEEPDIRTY, SECTOR)
    am.write_start(0, size)  # extent 0 becomes dirty and enters the keepdirty list
    am.write_complete(0, size)

    def run() -> int:
        hits = 0
        for _ in range(n):
            if not am.write_start(0, size):
                hits += 1
            am.write_complete(0, size)
        return hits

    yield clocked(clock, run, n)


# --------------------------------------------------------------------------
# 3. local write


@contextlib.contextmanager
def scratch_file(workdir: str, span: int) -> Iterator[str]:
    """A file of ``span`` bytes of data (in the page cache), removed afterwards."""
    fd, path = tempfile.mkstemp(prefix="pyhast-stages-", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(span // MAXPHYS):
                f.write(_DATA)
        yield path
    finally:
        os.unlink(path)


@contextlib.contextmanager
def local_pwrite(workdir: str, size: int, n: int, clock: Clock) -> Iterator[Timed]:
    data = payload(size)
    offsets = range(0, FILE_SPAN, size)
    with scratch_file(workdir, FILE_SPAN) as path, Provider.open(path) as provider:

        def run() -> int:
            for offset in itertools.islice(itertools.cycle(offsets), n):
                provider.pwrite(data, offset)
            return n

        yield clocked(clock, run, n)


# --------------------------------------------------------------------------
# 4. request encode


@contextlib.contextmanager
def request_encode(size: int, zero: bool, n: int, clock: Clock) -> Iterator[Timed]:
    data = payload(size, zero)

    def run() -> int:
        for i in range(n):
            encode_request(i + 1, offset_of(i, size), data)
        return n

    yield clocked(clock, run, n)


@contextlib.contextmanager
def nv_build(n: int, clock: Clock) -> Iterator[Timed]:
    def run() -> int:
        for i in range(n):
            request_nv(HioCmd.WRITE, i + 1, offset_of(i, SECTOR), SECTOR, memsync=True)
        return n

    yield clocked(clock, run, n)


@contextlib.contextmanager
def nv_decode(n: int, clock: Clock) -> Iterator[Timed]:
    raw = bytes(encode_request(1, 0, payload(4 * KiB))[0][HEADER_SIZE:])

    def run() -> int:
        for _ in range(n):
            NV.decode(raw)
        return n

    yield clocked(clock, run, n)


# --------------------------------------------------------------------------
# 5. send over a socket


def tcp_listener() -> tuple[socket.socket, str]:
    """A listening socket on 127.0.0.1, any free port, and its address string."""
    transport = tcp.TCPTransport()
    sock = transport.server(Address("tcp4", host="127.0.0.1", port=0))
    return sock, transport.local_address(sock)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected blocking TCP pair on 127.0.0.1 (the project's socket set-up)."""
    listener, address = tcp_listener()
    with listener:
        client = base.client(address)
        try:
            base.connect(client, address, IO_TIMEOUT)
            accepted, _ = base.accept(listener, IO_TIMEOUT)
        except BaseException:
            client.close()
            raise
    return client, accepted


def unix_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


#: The reader process of the send stage: drain argv[2] bytes from descriptor argv[1].
_DRAIN_PROGRAM: Final = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
view, want, got = memoryview(bytearray(1 << 20)), int(sys.argv[2]), 0
while got < want:
    k = sock.recv_into(view)
    if not k:
        sys.exit(f"EOF after {got} of {want} bytes")
    got += k
"""


@contextlib.contextmanager
def drain_process(sock: socket.socket, total: int) -> Iterator[None]:
    """A child process that reads and drops ``total`` bytes from ``sock`` (then closed here)."""
    with sock:
        proc = subprocess.Popen(
            [sys.executable, "-c", _DRAIN_PROGRAM, str(sock.fileno()), str(total)],
            pass_fds=[sock.fileno()],
        )
    try:
        yield
        if proc.wait(IO_TIMEOUT) != 0:
            raise RuntimeError(f"reader process failed with status {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def send_frame_blocking(sock: socket.socket, buffers: list[bytes | memoryview], total: int) -> None:
    """One sendmsg of the frame's buffers (the rest with sendall if it was partial)."""
    sent = sock.sendmsg(buffers)
    if sent < total:
        sock.sendall(memoryview(b"".join(buffers))[sent:])


@contextlib.contextmanager
def socket_send(
    pair: Callable[[], tuple[socket.socket, socket.socket]], size: int, n: int, clock: Clock
) -> Iterator[Timed]:
    frame = encode_request(1, 0, payload(size))
    total = sum(len(b) for b in frame)
    sender, receiver = pair()
    with sender, receiver:
        for sock in (sender, receiver):
            base.set_timeouts(sock, IO_TIMEOUT)  # kernel timeouts: no poll() per call
        with drain_process(receiver, n * total):

            def run() -> int:
                for _ in range(n):
                    send_frame_blocking(sender, frame, total)
                return n

            yield clocked(clock, run, n)


# --------------------------------------------------------------------------
# 6 and 8. frame decode (secondary: requests; primary: replies)


def receive_into_decoder(
    decoder: FrameDecoder, rview: memoryview, stream: memoryview, pos: int, window: bool
) -> int:
    """One emulated recv: copy the next bytes where FramedConn would read them; return them.

    With ``window``, into the payload's own buffer while enough of it is
    missing (FramedConn.get_buffer); otherwise into the read buffer, then feed.
    """
    win = decoder.payload_window(DIRECT_READ_MIN) if window else None
    if win is not None:
        k = min(len(win), len(stream) - pos)
        win[:k] = stream[pos : pos + k]
        decoder.payload_filled(k)
        return k
    k = min(len(rview), len(stream) - pos)
    rview[:k] = stream[pos : pos + k]
    decoder.feed(rview[:k])
    return k


def handle_frames(decoder: FrameDecoder, handle: Callable[[Frame], None], nbytes: int) -> int:
    """Pass every complete frame to ``handle``; return how many."""
    for count in range(nbytes + 1):  # a frame takes at least one byte of the read
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            return count
        handle(frame)
    raise RuntimeError("more frames than bytes received")


def receive_burst(
    decoder: FrameDecoder,
    rview: memoryview,
    stream: memoryview,
    handle: Callable[[Frame], None],
    window: bool,
) -> int:
    frames = 0
    pos = 0
    while pos < len(stream):
        k = receive_into_decoder(decoder, rview, stream, pos, window)
        assert k > 0
        pos += k
        frames += handle_frames(decoder, handle, k)
    return frames


def secondary_handle(frame: Frame) -> None:
    """What Secondary._on_request does with a WRITE before queueing it."""
    req = parse_request(frame.nv, sectorsize=SECTOR, datasize=SPAN)
    data = pipeline_recv(frame.nv, frame.payload or b"", max_size=MAXPHYS)
    if len(data) != req.length:
        raise RuntimeError(f"{len(data)} bytes of data for length {req.length}")


def primary_handle_reply(frame: Frame) -> None:
    parse_reply(frame.nv)


@contextlib.contextmanager
def frame_decode(
    stream: bytes, per: int, handle: Callable[[Frame], None], window: bool, n: int, clock: Clock
) -> Iterator[Timed]:
    view = memoryview(stream)
    decoder = FrameDecoder()
    rview = memoryview(bytearray(aio.DEFAULT_READ_SIZE))

    def run() -> int:
        return sum(receive_burst(decoder, rview, view, handle, window) for _ in range(n // per))

    yield clocked(clock, run, n)


def secondary_decode(
    size: int, window: bool, n: int, clock: Clock
) -> AbstractContextManager[Timed]:
    per = per_burst(size)
    return frame_decode(request_stream(size, per), per, secondary_handle, window, n, clock)


def reply_decode(n: int, clock: Clock) -> AbstractContextManager[Timed]:
    return frame_decode(
        reply_stream(REPLY_BURST), REPLY_BURST, primary_handle_reply, False, n, clock
    )


# --------------------------------------------------------------------------
# 7. reply encode


@contextlib.contextmanager
def reply_encode(received: bool, n: int, clock: Clock) -> Iterator[Timed]:
    def run() -> int:
        for i in range(n):
            encode_frame(reply_nv(i + 1, 0, received), None, VERSION)
        return n

    yield clocked(clock, run, n)


# --------------------------------------------------------------------------
# 9. asyncio


@contextlib.contextmanager
def in_loop(
    coro: Callable[[int, Clock], Coroutine[Any, Any, float]], n: int, clock: Clock
) -> Iterator[Timed]:
    """A fresh event loop; the repetition is ``coro(n, clock)``, which times itself."""

    async def bounded() -> float:
        async with asyncio.timeout(IO_TIMEOUT):
            return await coro(n, clock)

    with asyncio.Runner(debug=False) as runner:
        yield lambda: runner.run(bounded())


async def future_rounds(width: int, n: int, clock: Clock) -> float:
    """``width`` tasks each await a fresh future; one callback per loop iteration resolves them."""
    loop = asyncio.get_running_loop()
    rounds = n // width
    parked: list[asyncio.Future[None]] = []

    async def waiter() -> int:
        for _ in range(rounds):
            fut = loop.create_future()
            parked.append(fut)
            await fut
        return rounds

    def resolve(left: int) -> None:
        batch = parked[:]
        parked.clear()
        for fut in batch:
            fut.set_result(None)
        if left > 1:
            loop.call_soon(resolve, left - 1)

    tasks = [loop.create_task(waiter()) for _ in range(width)]
    await asyncio.sleep(0)  # every waiter is now parked on its first future
    start = clock()
    loop.call_soon(resolve, rounds)
    done = await asyncio.gather(*tasks)
    seconds = clock() - start
    if sum(done) != n or parked:
        raise RuntimeError(f"{sum(done)} futures resolved instead of {n}")
    return seconds


def _noop() -> None:
    pass


async def call_soon_cost(n: int, clock: Clock) -> float:
    """``call_soon`` of a no-op callback, and running it."""
    loop = asyncio.get_running_loop()
    start = clock()
    for _ in range(n // CALL_SOON_CHUNK):
        for _ in range(CALL_SOON_CHUNK):
            loop.call_soon(_noop)
        fut = loop.create_future()
        loop.call_soon(fut.set_result, None)
        await fut
    return clock() - start


# --------------------------------------------------------------------------
# 10. end to end over FramedConn


async def framed_tcp_pair() -> tuple[FramedConn, FramedConn]:
    """Two FramedConns joined by a TCP connection on 127.0.0.1."""
    listener, address = tcp_listener()
    with listener:
        client = await aio.connect(address, timeout=IO_TIMEOUT)
        try:
            accepted, _ = await aio.accept(listener, IO_TIMEOUT)
        except BaseException:
            client.close()
            raise
    primary = await FramedConn.open(client)
    try:
        secondary = await FramedConn.open(accepted)
    except BaseException:
        primary.abort()
        raise
    return primary, secondary


class RoundTrips:
    """A closed loop of ``qd`` requests in flight: each reply sends the next request."""

    def __init__(
        self, primary: FramedConn, secondary: FramedConn, size: int, n: int, qd: int
    ) -> None:
        self.primary = primary
        self.secondary = secondary
        self.size = size
        self.data = payload(size)
        self.n = n
        self.qd = qd
        self.sent = 0
        self.replies = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def install(self) -> None:
        self.primary.coalesce = True  # as RemoteComponent does on its request connection
        self.primary.set_frame_handler(self.on_reply, self.on_lost)
        self.secondary.set_frame_handler(self.on_request, self.on_lost)

    def start(self) -> None:
        for _ in range(min(self.qd, self.n)):
            self.send_next()

    def send_next(self) -> None:
        self.sent += 1
        nv = request_nv(HioCmd.WRITE, self.sent, offset_of(self.sent, self.size), self.size)
        body = pipeline_send(nv, self.data, Compression.HOLE, Checksum.NONE)
        self.primary.send_frame(nv, body, version=VERSION)

    def on_request(self, frame: Frame) -> None:
        req = parse_request(frame.nv, sectorsize=SECTOR, datasize=SPAN)
        data = pipeline_recv(frame.nv, frame.payload or b"", max_size=MAXPHYS)
        if len(data) != req.length:
            raise RuntimeError(f"{len(data)} bytes of data for length {req.length}")
        self.secondary.send_frame(reply_nv(req.seq), None, version=VERSION)

    def on_reply(self, frame: Frame) -> None:
        reply = parse_reply(frame.nv)
        if reply.error:
            raise RuntimeError(f"reply {reply.seq} has error {reply.error}")
        self.replies += 1
        if self.sent < self.n:
            self.send_next()
        elif self.replies == self.n and not self.done.done():
            self.done.set_result(None)

    def on_lost(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def round_trips(size: int, qd: int, n: int, clock: Clock) -> float:
    primary, secondary = await framed_tcp_pair()
    try:
        trips = RoundTrips(primary, secondary, size, n, qd)
        trips.install()
        start = clock()
        trips.start()
        await trips.done
        seconds = clock() - start
        if trips.replies != n:
            raise RuntimeError(f"{trips.replies} replies instead of {n}")
        return seconds
    finally:
        primary.abort()
        secondary.abort()
        await primary.wait_closed()
        await secondary.wait_closed()


# --------------------------------------------------------------------------
# 11. the primary's write path


@contextlib.contextmanager
def scratch_resource(workdir: str) -> Iterator[LocalComponent]:
    """A resource of SPAN bytes in ``workdir``, opened as the primary's local component."""
    fd, path = tempfile.mkstemp(prefix="pyhast-stages-res-", dir=workdir)
    os.ftruncate(fd, METADATA_SIZE + MiB + SPAN)
    os.close(fd)
    try:
        with Provider.open(path) as provider:
            metadata_create(provider, "stages")
        adapter = ResourceAdapter(logging.getLogger("stages"), "stages", "primary")
        local = LocalComponent.open(path, "stages", metaflush=True, log=adapter)
        try:
            yield local
        finally:
            local.close()
    finally:
        os.unlink(path)


class Responder:
    """The secondary's side of the protocol for stage 11: decode, answer twice."""

    def __init__(self, inc: FramedConn, out: FramedConn) -> None:
        self.out = out
        inc.set_frame_handler(self.on_request, self.on_lost)
        out.set_frame_handler(self.on_lost_frame, self.on_lost)
        self.error: BaseException | None = None

    def on_request(self, frame: Frame) -> None:
        req = parse_request(frame.nv, sectorsize=SECTOR, datasize=SPAN)
        data = pipeline_recv(frame.nv, frame.payload or b"", max_size=MAXPHYS)
        if len(data) != req.length:
            raise RuntimeError(f"{len(data)} bytes of data for length {req.length}")
        self.out.send_encoded(encode_reply(req.seq, 0, True, version=VERSION))
        self.out.send_encoded(encode_reply(req.seq, 0, False, version=VERSION))

    def on_lost_frame(self, frame: Frame) -> None:
        raise RuntimeError("unexpected frame on the reply connection")

    def on_lost(self, exc: BaseException | None) -> None:
        self.error = exc or ConnectionError("closed")


async def primary_writes(workdir: str, size: int, qd: int, n: int, clock: Clock) -> float:
    """``qd`` writers, each awaiting PrimaryDevice.write in turn, ``n`` writes in all."""
    a_primary, a_secondary = await framed_tcp_pair()
    b_primary, b_secondary = await framed_tcp_pair()
    conns = (a_primary, a_secondary, b_primary, b_secondary)
    try:
        with scratch_resource(workdir) as local:
            adapter = ResourceAdapter(logging.getLogger("stages"), "stages", "primary")
            dev = PrimaryDevice(local, replication=Replication.MEMSYNC, log=adapter)
            lost: list[str] = []
            dev.remote = RemoteComponent(
                a_primary,
                b_primary,
                version=VERSION,
                checksum=Checksum.NONE,
                compression=Compression.HOLE,
                on_disconnect=lost.append,
                log=adapter,
            )
            responder = Responder(a_secondary, b_secondary)
            data = payload(size)
            # Every extent dirty before the clock starts (the write-ahead
            # bitmap write is stage-independent and not measured here).
            for offset in range(0, SPAN, HAST_EXTENTSIZE):
                await dev.write(offset, data[:SECTOR], False)
            counter = itertools.count()

            async def writer() -> None:
                for i in iter(counter.__next__, None):
                    if i >= n:
                        return
                    await dev.write(offset_of(i, size), data, False)

            start = clock()
            await asyncio.gather(*(writer() for _ in range(qd)))
            # Every final reply settled (memsync acknowledges on "received").
            while dev.remote_inflight and not lost:
                await asyncio.sleep(0)
            seconds = clock() - start
            if lost or responder.error:
                raise RuntimeError(f"connection lost: {lost or responder.error}")
            return seconds
    finally:
        for conn in conns:
            conn.abort()
        for conn in conns:
            await conn.wait_closed()


# --------------------------------------------------------------------------
# The stages


def bind(fn: Callable[..., AbstractContextManager[Timed]], *args: Any) -> Maker:
    """``fn`` with its leading arguments bound: a Maker."""

    def make(n: int, clock: Clock) -> AbstractContextManager[Timed]:
        return fn(*args, n, clock)

    return make


def async_maker(coro: Callable[..., Coroutine[Any, Any, float]], *args: Any) -> Maker:
    def bound(n: int, clock: Clock) -> Coroutine[Any, Any, float]:
        return coro(*args, n, clock)

    return bind(in_loop, bound)


def sized_specs(workdir: str, size: int) -> list[Spec]:
    t = time.thread_time
    per = per_burst(size)
    out = [
        Spec("1", "NBD request decode (primary)", size, t, bind(nbd_decode, size), per),
        Spec("2", "activemap write_start+write_complete, hit", size, t, bind(activemap_hit, size)),
        Spec(
            "3",
            "local pwrite via Provider (page cache)",
            size,
            t,
            bind(local_pwrite, workdir, size),
        ),
        Spec("4", "request encode, random data", size, t, bind(request_encode, size, False)),
        Spec(
            "4", "request encode, all-zero data (hole)", size, t, bind(request_encode, size, True)
        ),
        Spec("5", "sendmsg, TCP 127.0.0.1", size, t, bind(socket_send, tcp_pair, size)),
        Spec("5", "sendmsg, UNIX socketpair", size, t, bind(socket_send, unix_pair, size)),
        Spec("6", "secondary decode, feed()", size, t, bind(secondary_decode, size, False), per),
    ]
    if size >= DIRECT_READ_MIN:
        out.append(
            Spec(
                "6",
                "secondary decode, payload_window()",
                size,
                t,
                bind(secondary_decode, size, True),
            )
        )
    return out


def shared_specs() -> list[Spec]:
    t = time.thread_time
    return [
        Spec("4", "request_nv alone (nv of a WRITE)", None, t, bind(nv_build)),
        Spec("6", "NV.decode alone (nv of a WRITE)", None, t, bind(nv_decode)),
        Spec("7", "reply encode, memsync received", None, t, bind(reply_encode, True)),
        Spec("7", "reply encode, final", None, t, bind(reply_encode, False)),
        Spec("8", "reply decode (primary)", None, t, bind(reply_decode), REPLY_BURST),
        Spec(
            "9",
            "future set_result + resume, 64 waiters/iter",
            None,
            t,
            async_maker(future_rounds, 64),
            64,
        ),
        Spec(
            "9", "future set_result + resume, 1 waiter/iter", None, t, async_maker(future_rounds, 1)
        ),
        Spec(
            "9",
            "loop.call_soon + run callback",
            None,
            t,
            async_maker(call_soon_cost),
            CALL_SOON_CHUNK,
        ),
    ]


def e2e_specs() -> list[Spec]:
    return [
        Spec(
            "10",
            f"e2e FramedConn TCP round trip, both sides, {label}",
            size,
            time.process_time,
            async_maker(round_trips, size, qd),
            note=f"QD{qd}",
            min_ops=10 * qd,  # mostly the steady state, not the first window
        )
        for label, depth in (("QD1", None), ("fio's QD", QD))
        for size in SIZES
        for qd in [1 if depth is None else depth[size]]
    ]


def primary_specs(workdir: str) -> list[Spec]:
    return [
        Spec(
            "11",
            "e2e PrimaryDevice.write memsync, responder, both sides",
            size,
            time.process_time,
            async_maker(primary_writes, workdir, size, QD[size]),
            note=f"QD{QD[size]}",
            min_ops=10 * QD[size],
        )
        for size in SIZES
    ]


def all_specs(workdir: str) -> list[Spec]:
    sized = [spec for size in SIZES for spec in sized_specs(workdir, size)]
    return sized + shared_specs() + e2e_specs() + primary_specs(workdir)


# --------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "loadavg_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def fmt_us(v: float) -> str:
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def cell(res: dict[str, Any] | None) -> str:
    if res is None:
        return "-"
    spread = (res["max_us"] - res["min_us"]) / res["median_us"] * 50 if res["median_us"] else 0.0
    return f"{fmt_us(res['median_us'])} ±{spread:.0f}%"


def table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per stage variant; 4 KiB and 1 MiB side by side."""
    rows: dict[tuple[str, str], dict[int | None, dict[str, Any]]] = {}
    for res in results:
        rows.setdefault((res["stage"], res["name"]), {})[res["size"]] = res
    header = ["#", "stage", "4 KiB us/op", "1 MiB us/op", "clock", "ops/rep", "note"]
    out = []
    for (stage, name), by_size in sorted(rows.items(), key=lambda item: int(item[0][0])):
        small = by_size.get(SIZES[0], by_size.get(None))
        large = by_size.get(SIZES[1])
        clock = next(iter(by_size.values()))["clock"]
        ops = " / ".join(str(r["ops_per_rep"]) for r in by_size.values())
        notes = " / ".join(dict.fromkeys(r["note"] for r in by_size.values() if r["note"]))
        out.append([stage, name, cell(small), cell(large), clock, ops, notes])
    return header, out


LEGEND: Final = (
    "us/op: median of the repetitions, microseconds of CPU per operation; "
    "± half the min-max spread of the repetitions, in % of the median.",
    "thread_time: the measuring thread only (user + system); process_time: the whole process.",
    "Rows without a 1 MiB figure do not depend on the payload size.",
    "1, 6, 8: include the copy a recv_into would make into the parser's buffer "
    "(emulated in user space, no syscall).",
    "5: the sending thread only; the reader is another process.  On loopback the "
    "sender also pays most of the receiving side's kernel work (softirq).",
    "10: both ends, their kernel work and the event loop, in one process; QD = requests in flight.",
    "11: as 10, with the primary's write path (PrimaryDevice.write, memsync) on the sending "
    "side and a responder that answers like the secondary (received + final, no pwrite).",
)


def render_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    header, rows = table(doc["results"])
    lines = [
        "# pyhast: CPU per request, stage by stage",
        "",
        f"{m['date']}, {m['cpu_count']} CPUs ({m['cpu_model']}), {m['platform']}, "
        f"Python {m['python']}, load average {m['loadavg_start'][0]:.2f} at start; "
        f"{doc['config']['reps']} repetitions of ~{doc['config']['target_s']} s CPU"
        f"{' (--quick)' if doc['config']['quick'] else ''}.",
        "",
        *report._md_table(header, rows),
        "",
        *(f"* {line}" for line in LEGEND),
        "",
    ]
    return "\n".join(lines)


def write_outputs(out: Path, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "stages.md").write_text(render_markdown(doc))


# --------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--quick", action="store_true", help="short repetitions (under 30 s)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the local write stage writes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stages", default="", help="only these stage numbers, comma-separated")
    return ap.parse_args(argv)


def run_all(specs: list[Spec], budget: Budget) -> list[dict[str, Any]]:
    results = []
    for spec in specs:
        size = "" if spec.size is None else f" {spec.size // KiB} KiB"
        print(f"  {spec.stage:>2}. {spec.name}{size} ...", file=sys.stderr, flush=True)
        results.append(measure(spec, budget))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.pop("PYHAST_FAULTS", None)  # never let Provider.open inject test faults
    budget = (
        Budget(target_s=0.03, max_ops=200_000, reps=args.reps)
        if args.quick
        else Budget(target_s=0.2, max_ops=2_000_000, reps=args.reps)
    )
    machine = machine_info()
    wall = time.monotonic()
    specs = all_specs(args.workdir)
    if args.stages:
        wanted = set(args.stages.split(","))
        specs = [spec for spec in specs if spec.stage in wanted]
    results = run_all(specs, budget)
    machine["loadavg_end"] = os.getloadavg()
    doc = {
        "machine": machine,
        "config": {**dataclasses.asdict(budget), "quick": args.quick, "workdir": args.workdir},
        "wall_s": round(time.monotonic() - wall, 1),
        "legend": LEGEND,
        "results": results,
    }
    write_outputs(args.out, doc)
    print("\n".join(report._text_table(*table(results))))
    print("", *LEGEND, sep="\n")
    print(f"wall {doc['wall_s']} s; wrote {args.out}/stages.json and {args.out}/stages.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
