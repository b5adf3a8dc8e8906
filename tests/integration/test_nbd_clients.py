"""The NBD server against real clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio).

The server runs in a background thread with its own event loop, over a
FileBackend on a temporary file, listening on a unix socket in a short temp
directory and on 127.0.0.1 with an ephemeral port.  Clients are separate
processes, each bounded by a subprocess timeout.  Raw-socket tests speak the
protocol by hand to inject garbage and disconnects.

Every test fails if the server logs an unexpected WARNING or worse; tests
that provoke one declare it with ``expect_warnings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyhast.frontend.nbd.backend import BlockBackend, FileBackend
from pyhast.frontend.nbd.server import NBDServer

MiB = 1024 * 1024
SIZE = 64 * MiB
TIMEOUT = 60  # seconds, for every client process
LOGGER = "pyhast.frontend.nbd"

pytestmark = pytest.mark.timeout(180)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(*args: str, timeout: float = TIMEOUT) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


# -- server fixture -------------------------------------------------------------


class ServerThread:
    """An NBDServer on its own event loop in a background thread."""

    def __init__(self, exports: Mapping[str, BlockBackend], **kwargs: Any) -> None:
        self.sockdir = tempfile.mkdtemp(prefix="nbd", dir="/tmp")  # short: sun_path limit
        self.server = NBDServer(
            exports, unix_path=os.path.join(self.sockdir, "sock"), tcp=("127.0.0.1", 0), **kwargs
        )
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="nbd-server", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        await self.server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()

    def start(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        if self._error is not None:
            raise self._error
        return self

    def call(self, func: Callable[[], Any]) -> Any:
        """Run func on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(_call(func), self.loop).result(10)

    def stop(self) -> None:
        if self._thread.is_alive():
            assert self._stop is not None
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
            assert not self._thread.is_alive(), "server did not stop"
        shutil.rmtree(self.sockdir, ignore_errors=True)
        if self._error is not None:
            raise self._error

    def uri(self, export: str = "disk", *, tcp: bool = False) -> str:
        return self.server.uri(export, tcp=tcp)

    @property
    def unix_path(self) -> str:
        assert self.server.unix_path is not None
        return self.server.unix_path


async def _call(func: Callable[[], Any]) -> Any:
    return func()


@dataclass
class Served:
    srv: ServerThread
    image: Path
    backend: FileBackend

    def uri(self, export: str = "disk", *, tcp: bool = False) -> str:
        return self.srv.uri(export, tcp=tcp)


@pytest.fixture
def expect_warnings() -> list[str]:
    """Substrings of the WARNING records a test expects (and requires)."""
    return []


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_unexpected_warnings(expect_warnings: list[str]) -> Iterator[None]:
    """Fail on WARNING+ records of the NBD code, from any thread, any phase."""
    logger = logging.getLogger(LOGGER)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield  # (torn down after the servers: set up before them)
    finally:
        logger.removeHandler(handler)
    warnings = handler.messages
    for text in expect_warnings:
        assert any(text in w for w in warnings), f"expected a warning with {text!r}: {warnings}"
    unexpected = [w for w in warnings if not any(t in w for t in expect_warnings)]
    assert not unexpected, f"unexpected warnings: {unexpected}"


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[tuple[ServerThread, list[FileBackend]]] = []

    def make(
        size: int = SIZE,
        *,
        backends: Mapping[str, BlockBackend] | None = None,
        extra: Mapping[str, BlockBackend] | None = None,
        **kwargs: Any,
    ) -> Served:
        """A server over a new sparse image as "disk" (or over ``backends``)."""
        image = tmp_path / f"disk{len(started)}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        backend = FileBackend(image)
        exports = dict(backends or {"disk": backend})
        exports.update(extra or {})
        srv = ServerThread(exports, **kwargs).start()
        started.append((srv, [backend]))
        return Served(srv, image, backend)

    yield make
    for srv, backends in started:
        srv.stop()
        for b in backends:
            b.close()


@pytest.fixture
def served(make_server: Callable[..., Served]) -> Served:
    return make_server()


# -- a minimal raw client -------------------------------------------------------

REQ = struct.Struct(">IHHQQI")
REQ_MAGIC = 0x25609513
REPLY = struct.Struct(">IIQ")
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6


class RawClient:
    """Speaks just enough NBD by hand to send arbitrary bytes."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return out

    def go(self, export: bytes = b"disk") -> tuple[int, int]:
        """Fixed newstyle + NBD_OPT_GO; returns (size, transmission flags)."""
        assert self.recv_exact(18) == b"NBDMAGICIHAVEOPT\x00\x03"
        data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, len(data)))
        self.sock.sendall(data)
        size = flags = -1
        while True:
            magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
            body = self.recv_exact(length)
            assert (magic, opt) == (0x3E889045565A9, 7)
            if rep == 3 and body[:2] == b"\x00\x00":
                size, flags = struct.unpack(">QH", body[2:])
            elif rep == 1:
                return size, flags
            elif rep != 3:
                raise AssertionError(f"reply 0x{rep:x}")

    def send(self, cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> None:
        self.sock.sendall(REQ.pack(REQ_MAGIC, flags, cmd, cookie, offset, length))

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = REPLY.unpack(self.recv_exact(16))
        assert magic == 0x67446698
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, cookie, data

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def raw_client(served: Served) -> Iterator[RawClient]:
    c = RawClient(served.srv.unix_path)
    try:
        yield c
    finally:
        c.close()


def assert_serving(served: Served) -> None:
    """The server still answers a fresh real client."""
    info = json.loads(run("nbdinfo", "--json", served.uri()))
    assert info["exports"][0]["export-size"] == served.backend.size


# -- real clients ---------------------------------------------------------------


def test_nbdinfo_json(served: Served) -> None:
    need("nbdinfo")
    for uri in (served.uri(), served.uri(tcp=True), served.uri("")):
        info = json.loads(run("nbdinfo", "--json", uri))
        (export,) = info["exports"]
        assert info["protocol"] == "newstyle-fixed"
        assert export["export-name"] == "disk" or uri == served.uri("")
        assert export["export-size"] == SIZE
        assert export["block_size_minimum"] == 1
        assert export["block_size_preferred"] == 4096
        assert export["block_size_maximum"] == 32 * MiB
        assert export["is_read_only"] is False
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
            assert export[flag] is True, flag


def test_nbdinfo_list_and_descriptions(make_server: Callable[..., Served], tmp_path: Path) -> None:
    need("nbdinfo")
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    ro = FileBackend(other, read_only=True)
    try:
        served = make_server(extra={"other": ro}, descriptions={"other": "read-only spare"})
        info = json.loads(run("nbdinfo", "--list", "--json", served.uri("")))
        exports = {e["export-name"]: e for e in info["exports"]}
        assert set(exports) == {"disk", "other"}
        assert exports["other"]["export-size"] == MiB
        assert exports["other"]["is_read_only"] is True
        assert exports["other"].get("description") == "read-only spare"
        assert exports["other"]["can_multi_conn"] is True
        # With two exports the empty name selects nothing.
        proc = subprocess.run(
            ["nbdinfo", served.uri("")], capture_output=True, text=True, timeout=TIMEOUT
        )
        assert proc.returncode != 0
    finally:
        ro.close()


def test_qemu_io_patterns(served: Served) -> None:
    need("qemu-io")
    cmds = [
        "write -P 0xab 0 1M",
        "write -f -P 0xcd 1M 64k",  # FUA
        "aio_write -f -P 0x14 3M 1M",
    ]
    # 64 writes in flight at once (4 KiB each, every other one FUA).
    cmds += [
        f"aio_write {'-f ' if i % 2 else ''}-P {0x40 + i} {2048 + 4 * i}k 4k" for i in range(64)
    ]
    cmds += [
        "aio_flush",
        "write -z 4M 1M",  # WRITE_ZEROES with NO_HOLE
        "write -P 0xee 5M 64k",
        "discard 5M 64k",  # TRIM
        "write -P 0xef 6M 128k",
        "write -z -u 6M 128k",  # WRITE_ZEROES that may punch a hole
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 64k",
        "read -P 0x14 3M 1M",
        "read -P 0 4M 1M",
        "read -P 0 6M 128k",
    ]
    cmds += [f"read -P {0x40 + i} {2048 + 4 * i}k 4k" for i in range(64)]
    out = run("qemu-io", "-f", "raw", *(a for c in cmds for a in ("-c", c)), served.uri())
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 5 + 64
    expected = bytearray(SIZE)
    expected[0 : 1 * MiB] = b"\xab" * MiB
    expected[1 * MiB : 1 * MiB + 65536] = b"\xcd" * 65536
    expected[3 * MiB : 4 * MiB] = b"\x14" * MiB
    for i in range(64):
        off = (2048 + 4 * i) * 1024
        expected[off : off + 4096] = bytes([0x40 + i]) * 4096
    actual = bytearray(served.image.read_bytes())
    # The discarded range has unspecified contents; everything else is exact.
    actual[5 * MiB : 5 * MiB + 65536] = bytes(65536)
    assert actual == expected


def test_nbdcopy_in_and_out(served: Served, tmp_path: Path) -> None:
    need("nbdcopy")
    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", str(src), served.uri())
    assert served.image.read_bytes() == src.read_bytes()
    out = tmp_path / "out.bin"
    run("nbdcopy", served.uri(tcp=True), str(out))
    assert out.read_bytes() == src.read_bytes()


def test_nbdcopy_multi_conn(served: Served, tmp_path: Path) -> None:
    need("nbdcopy")
    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", "--connections=4", "--requests=16", "--flush", str(src), served.uri())
    out = tmp_path / "out.bin"
    run("nbdcopy", "--connections=4", served.uri(), str(out))
    assert out.read_bytes() == src.read_bytes() == served.image.read_bytes()


def test_qemu_img_info_and_convert(served: Served, tmp_path: Path) -> None:
    need("qemu-img")
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", served.uri()))
    assert info["virtual-size"] == SIZE
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 4 * MiB):  # half data, half holes
            f.seek(off)
            f.write(os.urandom(2 * MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri())
    assert served.image.read_bytes() == src.read_bytes()
    qcow = tmp_path / "out.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", served.uri(tcp=True), str(qcow))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(qcow))


def test_fio_randwrite_verify(served: Served) -> None:
    need("fio")
    out = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={served.uri()}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32M",
        "--io_size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
        timeout=120,
    )
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] > 0  # the verify pass


def test_parallel_clients(served: Served) -> None:
    need("qemu-io")
    procs = [
        subprocess.Popen(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                f"write -P {0x20 + i} {i}M 1M",
                "-c",
                f"read -P {0x20 + i} {i}M 1M",
                served.uri(tcp=bool(i % 2)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
        assert "Pattern verification failed" not in out
    data = served.image.read_bytes()
    for i in range(6):
        assert data[i * MiB : (i + 1) * MiB] == bytes([0x20 + i]) * MiB


# -- raw protocol: errors, garbage, disconnects ----------------------------------


def test_invalid_requests_get_error_replies(served: Served) -> None:
    with raw_client(served) as c:
        size, flags = c.go()
        assert size == SIZE and flags & 1
        c.send(CMD_READ, 1, SIZE - 1, 2)
        assert c.reply() == (errno.EINVAL, 1, b"")
        c.send(CMD_WRITE, 2, SIZE - 1, 2)
        c.sock.sendall(b"zz")  # payload is consumed although rejected
        assert c.reply() == (errno.ENOSPC, 2, b"")
        c.send(99, 3, 0, 0)
        assert c.reply() == (errno.EINVAL, 3, b"")
        c.send(CMD_READ, 4, 0, 32 * MiB + 512)
        assert c.reply() == (errno.EINVAL, 4, b"")
        c.send(CMD_READ, 5, 0, 0)
        assert c.reply() == (errno.EINVAL, 5, b"")
        c.send(CMD_WRITE, 6, 0, 5)
        c.sock.sendall(b"hello")
        c.send(CMD_READ, 7, 0, 5)
        replies = {c.reply()[:2], c.reply(5)[:2]}
        assert replies == {(0, 6), (0, 7)}
        c.send(CMD_DISC, 8, 0, 0)
        assert c.at_eof()
    assert served.image.read_bytes()[:5] == b"hello"


def test_read_only_export(make_server: Callable[..., Served], tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"r" * MiB)
    ro = FileBackend(path, read_only=True)
    try:
        served = make_server(backends={"disk": ro})
        with raw_client(served) as c:
            _, flags = c.go()
            assert flags & 2  # READ_ONLY
            c.send(CMD_WRITE, 1, 0, 3)
            c.sock.sendall(b"abc")
            assert c.reply() == (errno.EPERM, 1, b"")
            c.send(CMD_TRIM, 2, 0, 4096)
            assert c.reply() == (errno.EPERM, 2, b"")
            c.send(CMD_READ, 3, 0, 4)
            assert c.reply(4) == (0, 3, b"rrrr")
        assert path.read_bytes() == b"r" * MiB
    finally:
        ro.close()


@pytest.mark.parametrize("expect_warnings", [["bad magic"]])
def test_garbage_in_transmission_drops_only_that_connection(
    served: Served, expect_warnings: list[str]
) -> None:
    with raw_client(served) as bystander, raw_client(served) as evil:
        bystander.go()
        evil.go()
        evil.sock.sendall(b"\xde\xad\xbe\xef" * 16)
        assert evil.at_eof()
        bystander.send(CMD_READ, 1, 0, 4)
        assert bystander.reply(4) == (0, 1, bytes(4))
    assert_serving(served)


@pytest.mark.parametrize("expect_warnings", [["magic"]])
def test_garbage_in_handshake(served: Served, expect_warnings: list[str]) -> None:
    with raw_client(served) as evil:
        evil.recv_exact(18)
        evil.sock.sendall(struct.pack(">I", 1) + b"GARBAGE!" * 4)
        assert evil.at_eof()
    assert_serving(served)


@pytest.mark.parametrize("expect_warnings", [["over the limit"]])
def test_hostile_write_length(served: Served, expect_warnings: list[str]) -> None:
    with raw_client(served) as evil:
        evil.go()
        evil.send(CMD_WRITE, 1, 0, 0xFFFFFFFF)
        assert evil.at_eof()
    assert_serving(served)


@pytest.mark.parametrize("expect_warnings", [["mid-request"]])
def test_disconnect_mid_request(served: Served, expect_warnings: list[str]) -> None:
    with raw_client(served) as c:
        c.go()
        c.send(CMD_WRITE, 1, 0, 4096)
        c.sock.sendall(b"x" * 1000)
    with raw_client(served) as c:
        c.go()
        c.sock.sendall(REQ.pack(REQ_MAGIC, 0, CMD_READ, 1, 0, 4)[:9])
    deadline = time.monotonic() + 10
    while served.srv.call(lambda: served.srv.server.connections) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.srv.call(lambda: served.srv.server.connections) == 0
    assert_serving(served)


# -- concurrency: out-of-order replies, flush ordering, backpressure -------------


class ScriptedBackend:
    """An in-memory backend whose calls can be held back and that logs its calls."""

    def __init__(self, size: int = MiB) -> None:
        self.data = bytearray(size)
        self.calls: list[tuple[str, int]] = []
        self.gates: dict[int, asyncio.Event] = {}  # offset -> released when set
        self.active = 0
        self.max_active = 0
        self.fail: dict[int, BaseException] = {}

    block_size = (1, 4096, 1 * MiB)
    read_only = False
    can_multi_conn = False

    @property
    def size(self) -> int:
        return len(self.data)

    async def _enter(self, op: str, offset: int) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            gate = self.gates.get(offset)
            if gate is not None:
                await gate.wait()
            if offset in self.fail:
                raise self.fail[offset]
        finally:
            self.active -= 1
        self.calls.append((op, offset))

    async def read(self, offset: int, length: int) -> bytes:
        await self._enter("read", offset)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        await self._enter("write+fua" if fua else "write", offset)
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        await self._enter("flush", 0)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._enter("trim", offset)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        await self._enter("zero" if may_trim else "zero-nohole", offset)
        self.data[offset : offset + length] = bytes(length)


def test_replies_out_of_order_and_flush_after_acknowledged_writes(
    make_server: Callable[..., Served],
) -> None:
    backend = ScriptedBackend()
    served = make_server(backends={"disk": backend})
    srv = served.srv
    gate = srv.call(asyncio.Event)
    backend.gates[8192] = gate
    with raw_client(served) as c:
        c.go()
        c.send(CMD_WRITE, 1, 8192, 4, flags=1)  # held back by the gate
        c.sock.sendall(b"slow")
        c.send(CMD_WRITE, 2, 0, 4)
        c.sock.sendall(b"fast")
        assert c.reply() == (0, 2, b"")  # the later request is answered first
        c.send(CMD_FLUSH, 3, 0, 0)
        assert c.reply() == (0, 3, b"")  # flush does not wait for the unacknowledged write
        assert backend.calls == [("write", 0), ("flush", 0)]
        srv.call(gate.set)
        assert c.reply() == (0, 1, b"")
        c.send(CMD_READ, 4, 8192, 4)
        assert c.reply(4) == (0, 4, b"slow")
        c.send(CMD_WRITE_ZEROES, 5, 0, 4, flags=2)
        assert c.reply() == (0, 5, b"")
    assert backend.calls[2:] == [("write+fua", 8192), ("read", 8192), ("zero-nohole", 0)]
    assert backend.data[:4] == bytes(4)


@pytest.mark.parametrize(
    "limits", [{"max_inflight": 4}, {"max_inflight_bytes": 4 * 4096}], ids=["count", "bytes"]
)
def test_backpressure_bounds_requests_in_flight(
    make_server: Callable[..., Served], limits: dict[str, int]
) -> None:
    backend = ScriptedBackend()
    served = make_server(backends={"disk": backend}, **limits)
    gate = served.srv.call(asyncio.Event)
    for i in range(20):
        backend.gates[i * 4096] = gate
    with raw_client(served) as c:
        c.go()
        for i in range(20):
            c.send(CMD_READ, i, i * 4096, 4096)
        time.sleep(0.2)  # give the server every chance to over-commit
        assert served.srv.call(lambda: backend.active) == 4
        served.srv.call(gate.set)
        cookies = {c.reply(4096)[1] for _ in range(20)}
        assert cookies == set(range(20))
    assert backend.max_active == 4


@pytest.mark.parametrize("expect_warnings", [["backend failed unexpectedly"]])
def test_backend_errors_become_nbd_errors(
    make_server: Callable[..., Served], expect_warnings: list[str]
) -> None:
    backend = ScriptedBackend()
    backend.fail = {
        0: OSError(errno.ENOSPC, "full"),
        4096: OSError(errno.ENOENT, "gone"),
        8192: RuntimeError("bug"),
        12288: OSError(errno.EDQUOT, "quota"),
    }
    served = make_server(backends={"disk": backend})
    with raw_client(served) as c:
        c.go()
        for cookie, offset in enumerate([0, 4096, 8192, 12288]):
            c.send(CMD_READ, cookie, offset, 16)
            assert c.reply(16) == ([28, 5, 5, 28][cookie], cookie, b"")
        c.send(CMD_READ, 9, 16384, 16)
        assert c.reply(16) == (0, 9, bytes(16))


def test_close_answers_requests_in_flight(make_server: Callable[..., Served]) -> None:
    backend = ScriptedBackend()
    served = make_server(backends={"disk": backend})
    srv = served.srv
    gate = srv.call(asyncio.Event)
    backend.gates[0] = gate
    with raw_client(served) as c:
        c.go()
        c.send(CMD_READ, 1, 0, 8)
        while srv.call(lambda: backend.active) == 0:
            time.sleep(0.01)
        closer = asyncio.run_coroutine_threadsafe(srv.server.close(), srv.loop)
        time.sleep(0.1)
        assert not closer.done()  # waiting for the read
        srv.call(gate.set)
        closer.result(10)
        assert c.reply(8) == (0, 1, bytes(8))
        assert c.at_eof()
    assert not os.path.exists(srv.unix_path)


def test_disc_answers_requests_in_flight_then_closes(make_server: Callable[..., Served]) -> None:
    backend = ScriptedBackend()
    served = make_server(backends={"disk": backend})
    gate = served.srv.call(asyncio.Event)
    backend.gates[4096] = gate
    with raw_client(served) as c:
        c.go()
        c.send(CMD_WRITE, 1, 4096, 2)
        c.sock.sendall(b"ok")
        c.send(CMD_DISC, 2, 0, 0)
        time.sleep(0.1)
        served.srv.call(gate.set)
        assert c.reply() == (0, 1, b"")
        assert c.at_eof()
    assert bytes(backend.data[4096:4098]) == b"ok"
