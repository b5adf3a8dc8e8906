"""Hostile peers and clients against a real two-node cluster.

One cluster serves the whole module: ``r0`` replicates (nodea primary,
nodeb secondary) and must keep doing so; ``r1`` is the victim: secondary on
nodeb, init on nodea, with known data on both providers.  Hostile
connections come from raw sockets: to nodeb's replication listener (from
127.0.0.1, the address nodeb admits, or 127.0.0.3, which it does not), to
nodea's NBD socket, to the control socket as an unprivileged user.

After every case (the autouse ``invariants`` fixture): both hastd processes
are alive and answer status for both resources, no data area changed
(SHA-256 before and after, all four providers), and r0 still replicates (a
fresh write reaches nodeb).  Each case checks that its sentence is in the
log exactly once.  Every hostile loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhast.defaults import MAXPHYS
from pyhast.enums import HioCmd
from pyhast.frontend.nbd.protocol import REQUEST_MAGIC, Cmd
from pyhast.wire.frame import NEED_DATA, Frame, FrameDecoder, encode_frame, encode_header
from pyhast.wire.handshake import PrimaryHello, first_request
from pyhast.wire.messages import request_nv
from pyhast.wire.nv import NV
from tests.helpers import nbd
from tests.helpers.ackcheck import NBDClient, make_block
from tests.helpers.cluster import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)

BS = 4096
VICTIM = "r1"
STRANGER_IP = "127.0.0.3"
#: Another address nodeb does not admit (it warns once per address, ever).
STRANGER2_IP = "127.0.0.4"
IO_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# the cluster and the invariants


def _fill(path: Path, seed: int) -> None:
    """Known, non-zero content in the first 1 MiB of a provider's data area."""
    md = nbd.read_metadata(path)
    with path.open("r+b") as f:
        for i in range(256):
            os.pwrite(f.fileno(), make_block(seed, i, 1, BS), md.localoff + i * BS)


@pytest.fixture(scope="module")
def cl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("hostile"), resources=("r0", VICTIM))
    try:
        cluster.create()
        for node in ("nodea", "nodeb"):
            _fill(cluster.local(node, VICTIM), seed=7)
        cluster.start("nodea")
        cluster.start("nodeb")
        cluster.role("nodeb", "secondary")
        cluster.role("nodea", "primary", "r0")
        cluster.wait_complete("nodea", "r0")
        nbd_write(cluster, 0, make_block(1, 0, 1, BS))
        cluster.wait_synced("r0")
        yield cluster
    finally:
        cluster.close()


def hashes(cl: Cluster) -> dict[tuple[str, str], str]:
    return {(n, r): nbd.data_hash(cl.local(n, r)) for n in cl.nodes for r in cl.resources}


_writes = iter(range(2, 1 << 30))


@pytest.fixture(autouse=True)
def invariants(cl: Cluster) -> Iterator[None]:
    pids = {n: cl.nodes[n].proc.pid for n in cl.nodes}  # type: ignore[union-attr]
    cl.wait_synced("r0")
    before = hashes(cl)
    yield
    for node in cl.nodes:
        proc = cl.nodes[node].proc
        assert proc is not None and proc.poll() is None, f"hastd {node} died"
        assert proc.pid == pids[node]
        for res in cl.resources:
            assert cl.status(node, res)["error"] == 0
    assert cl.status("nodeb", VICTIM)["role"] == "secondary"
    assert cl.status("nodea", "r0")["status"] == "complete"
    cl.wait_synced("r0")
    assert hashes(cl) == before, "a data area changed"
    # r0 keeps replicating.
    v = next(_writes)
    nbd_write(cl, BS, make_block(1, 1, v, BS))
    cl.wait_synced("r0")
    nbd.assert_identical(cl.local("nodea", "r0"), cl.local("nodeb", "r0"))


def nbd_write(cl: Cluster, offset: int, data: bytes) -> None:
    async def run() -> None:
        c = await NBDClient.connect(cl.nbd_uri("nodea", "r0"))
        try:
            await c.write(offset, data)
        finally:
            await c.close()

    asyncio.run(run())


def count(cl: Cluster, node: str, pattern: str, since: int) -> int:
    return len(re.findall(pattern, cl.log(node)[since:]))


def logged_once(cl: Cluster, node: str, pattern: str, since: int, timeout: float = 10.0) -> str:
    """Wait for ``pattern`` in ``node``'s log after ``since``; it must be there exactly once."""
    try:
        m = cl.wait_log_re(node, pattern, timeout=timeout, since=since)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nThe log since:\n{cl.log(node)[since:]}") from None
    n = count(cl, node, pattern, since)
    assert n == 1, f"/{pattern}/ logged {n} times:\n{cl.log(node)[since:]}"
    return m.group(0)


# --------------------------------------------------------------------------
# raw replication peers


def peer(cl: Cluster, src: str = "127.0.0.1", node: str = "nodeb") -> socket.socket:
    """A TCP connection from ``src`` to ``node``'s replication listener."""
    n = cl.nodes[node]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    s.bind((src, 0))
    s.connect((n.ip, n.port))
    return s


def name_of(s: socket.socket) -> str:
    host, port = s.getsockname()
    return f"tcp4://{host}:{port}"


def frame_bytes(nv: NV, payload: bytes | None = None, version: int = 2) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(nv, payload, version))


def recv_frame(s: socket.socket, timeout: float = IO_TIMEOUT) -> Frame | None:
    """The next frame within ``timeout`` seconds, or None at end of file."""
    dec = FrameDecoder(max_payload=MAXPHYS + 64)
    deadline = time.monotonic() + timeout
    while True:
        fr = dec.next_frame()
        if fr is not NEED_DATA:
            assert isinstance(fr, Frame)
            return fr
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no complete frame within {timeout} s")
        s.settimeout(left)
        data = s.recv(65536)
        if not data:
            return None
        dec.feed(data)


def closed_by_peer(s: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    """Read until the peer closes (EOF or reset) within ``timeout``; what came."""
    deadline = time.monotonic() + timeout
    out = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the daemon did not close the connection within {timeout} s")
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return out
        except TimeoutError:
            continue
        if not data:
            return out
        out += data


def first_half(cl: Cluster, res: str = VICTIM) -> tuple[socket.socket, bytes]:
    """Step 1 on a new connection A: (A, token)."""
    a = peer(cl)
    a.sendall(frame_bytes(first_request(res), version=1))
    reply = recv_frame(a)
    assert reply is not None, "no reply to the first handshake message"
    token = reply.nv.get_uint8_array("token")
    return a, bytes(token)


def victim_counters(cl: Cluster) -> tuple[int, int, int]:
    md = nbd.read_metadata(cl.local("nodeb", VICTIM))
    return md.resuid, md.localcnt, md.remotecnt


@contextlib.contextmanager
def fake_primary(cl: Cluster) -> Iterator[tuple[socket.socket, socket.socket, int]]:
    """A complete handshake for the victim: (A, B, datasize); a secondary worker serves it."""
    a, token = first_half(cl)
    b = peer(cl)
    try:
        resuid, local, remote = victim_counters(cl)
        hello = PrimaryHello(VICTIM, token, resuid or 4242, remote, local, virgin=not resuid)
        b.sendall(frame_bytes(hello.to_nv()))
        reply = recv_frame(a)
        assert reply is not None and reply.nv.get_string("errmsg", default=None) is None, (
            reply and reply.nv
        )
        yield a, b, reply.nv.get_int64("datasize")
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------
# the listener: before the handshake completes


def test_wrong_source_address(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    for _ in range(3):
        with peer(cl, src=STRANGER_IP) as s:
            s.sendall(frame_bytes(first_request(VICTIM), version=1))
            assert closed_by_peer(s) == b""  # not a word
    logged_once(cl, "nodeb", r"Client tcp4://127\.0\.0\.3:\d+ isn't known", since)


def test_bad_token(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    a, _ = first_half(cl)
    with a, peer(cl) as b:
        b.sendall(frame_bytes(PrimaryHello(VICTIM, secrets.token_bytes(16), 1, 0, 0).to_nv()))
        reply = recv_frame(b)
        assert reply is not None and reply.nv.get_string("errmsg") == "Token doesn't match."
        assert closed_by_peer(b) == b""
        logged_once(cl, "nodeb", rf"Token received from {name_of(b)} doesn't match\.", since)


def test_token_of_the_wrong_size(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    with peer(cl) as b:
        b.sendall(frame_bytes(PrimaryHello(VICTIM, b"short", 1, 0, 0).to_nv()))
        assert closed_by_peer(b) == b""
        logged_once(
            cl,
            "nodeb",
            rf"Received token of invalid size from {name_of(b)} \(expected 16, got 5\)\.",
            since,
        )


def test_missing_token(cl: Cluster) -> None:
    """The second message without its token is a new first message (spec 6.1):
    it supersedes our half-open connection, which the daemon drops."""
    since = cl.mark("nodeb")
    a, _ = first_half(cl)
    with a, peer(cl) as b:
        resuid, local, remote = victim_counters(cl)
        nv = NV()  # the second message, less its token
        nv.add_string("resource", VICTIM)
        nv.add_uint64("resuid", resuid)
        nv.add_uint64("localcnt", remote)
        nv.add_uint64("remotecnt", local)
        b.sendall(frame_bytes(nv))
        reply = recv_frame(b)
        assert reply is not None and len(reply.nv.get_uint8_array("token")) == 16
        assert closed_by_peer(a) == b""  # the old half-open A
        logged_once(
            cl, "nodeb", rf"A new session from {name_of(b)} supersedes the half-open", since
        )


@pytest.mark.parametrize(
    ("header", "sentence"),
    [
        (encode_header(3, 40), r"Unsupported protocol version 3 \(at most 2\)"),
        (encode_header(2, 0x7FFFFFFF), r"Frame nv list of 2147483647 bytes exceeds the limit"),
        (encode_header(2, 0), r"Frame has an empty nv list"),
    ],
    ids=["version-3", "nv-over-limit", "empty-nv"],
)
def test_bad_frame_header(cl: Cluster, header: bytes, sentence: str) -> None:
    since = cl.mark("nodeb")
    with peer(cl) as s:
        s.sendall(header + bytes(40))
        assert closed_by_peer(s) == b""
        logged_once(cl, "nodeb", rf"Unable to receive header from {name_of(s)}: {sentence}", since)


def test_payload_over_the_limit(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    nv = first_request(VICTIM)
    nv.add_uint32("size", 0xFFFFFFF0)
    with peer(cl) as s:
        s.sendall(encode_header(2, len(nv.encode())) + nv.encode())
        assert closed_by_peer(s) == b""
        logged_once(
            cl,
            "nodeb",
            rf"Unable to receive header from {name_of(s)}: Payload of 4294967280 bytes "
            r"exceeds the limit",
            since,
        )


def test_payload_shorter_than_its_length(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    nv = first_request(VICTIM)
    nv.add_uint32("size", 1000)
    with peer(cl) as s:
        s.sendall(encode_header(2, len(nv.encode())) + nv.encode() + bytes(10))
        s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s) == b""
        logged_once(
            cl,
            "nodeb",
            # (FIN mid-frame is reported with ECONNRESET's text)
            rf"Unable to receive header from {name_of(s)}: Connection reset by peer\.",
            since,
        )


def test_garbage_instead_of_a_frame(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    with peer(cl) as s:
        s.sendall(b"\x02\x10\x00\x00\x00" + b"\xff" * 16)  # an nv that does not decode
        assert closed_by_peer(s) == b""
        logged_once(cl, "nodeb", rf"Unable to receive header from {name_of(s)}: ", since)


def test_one_byte_per_second_peer_does_not_block_others(cl: Cluster) -> None:
    """A frame header trickled in at one byte a second (5 s in all), then EOF."""
    since = cl.mark("nodeb")
    data = frame_bytes(first_request(VICTIM), version=1)[:5]
    slow = peer(cl)
    slow_name = name_of(slow)
    stop = threading.Event()
    sent: list[int] = []

    def trickle() -> None:
        for byte in data:
            if stop.wait(1.0):
                return
            slow.sendall(bytes([byte]))
            sent.append(byte)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        # Meanwhile other connections are served at once.
        wait_for(lambda: sent, 5, what="the trickle to start")
        start = time.monotonic()
        with peer(cl, src=STRANGER2_IP) as s:
            closed_by_peer(s, 3)
        a, token = first_half(cl)
        a.close()
        assert len(token) == 16
        assert cl.status("nodeb", VICTIM)["error"] == 0
        nbd_write(cl, 0, make_block(1, 0, 1, BS))  # the same data again
        cl.wait_synced("r0")
        assert time.monotonic() - start < 3, "others waited for the slow peer"
        assert len(sent) < len(data), "the checks above took longer than the trickle"
        t.join(len(data) + 2)
        assert len(sent) == len(data)
    finally:
        stop.set()
        t.join(len(data) + 2)
        slow.close()
    logged_once(
        cl,
        "nodeb",
        rf"Unable to receive header from {slow_name}: Connection reset by peer\.",
        since,
    )


FLOOD = 300


def accept_queue(ip: str, port: int) -> int:
    """Connections waiting in the accept queue of the listener at ip:port (/proc/net/tcp)."""
    want = "{:08X}:{:04X}".format(int.from_bytes(socket.inet_aton(ip), "little"), port)
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # LISTEN
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener at {ip}:{port}")


def flood(cl: Cluster, n: int) -> list[socket.socket]:
    """``n`` silent connections to nodeb, paced by its accept queue (backlog 8):
    never a dropped SYN and its 1 s retransmission."""
    node = cl.nodes["nodeb"]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            wait_for(lambda: accept_queue(node.ip, node.port) < 4, 5, 0.001, "the accept queue")
            socks.append(peer(cl))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def test_connection_flood(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    start = time.monotonic()
    socks = flood(cl, FLOOD)
    try:
        assert time.monotonic() - start < 20
        # All of them open and silent: the daemon still answers and replicates.
        start = time.monotonic()
        assert cl.status("nodeb", VICTIM)["role"] == "secondary"
        nbd_write(cl, 0, make_block(1, 0, 1, BS))  # the same data again
        cl.wait_synced("r0")
        a, token = first_half(cl)
        a.close()
        assert len(token) == 16
        assert time.monotonic() - start < 5
    finally:
        for s in socks:
            s.close()
    # One sentence for the whole flood (the address was logged at most once
    # more, with a count, if an earlier test's connection opened the window).
    assert count(cl, "nodeb", r"Connection from tcp4://127\.0\.0\.1:\d+", since) <= 2


def test_connection_flood_is_logged_once(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    for s in flood(cl, 50):
        s.close()
    # Every connection was accepted (flood() checks it) and the primary's
    # address is logged at most once per 10 s, however many connect.
    assert count(cl, "nodeb", r"\[INFO\] Connection from tcp4://127\.0\.0\.1:\d+", since) <= 1


# --------------------------------------------------------------------------
# the secondary worker: after the handshake


def test_garbage_after_the_handshake(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    with fake_primary(cl) as (a, b, _):
        a.sendall(b"\xde\xad\xbe\xef" * 64)
        assert closed_by_peer(a) == b""
        closed_by_peer(b)
    logged_once(cl, "nodeb", r"\[r1\] \(secondary\) Unsupported protocol version 222", since)
    cl.wait_log("nodeb", "Worker process exited", since=since)


def test_frame_over_the_limit_after_the_handshake(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    with fake_primary(cl) as (a, b, _):
        nv = request_nv(HioCmd.WRITE, 1, 0, BS)
        nv.add_uint32("size", 64 * MAXPHYS)
        a.sendall(frame_bytes(nv, bytes(64 * MAXPHYS))[: 64 * 1024])
        assert closed_by_peer(a) == b""
        closed_by_peer(b)
    logged_once(cl, "nodeb", r"\[r1\] \(secondary\) .*Payload of 67108864 bytes exceeds", since)


def test_write_payload_shorter_or_longer_than_its_length(cl: Cluster) -> None:
    since = cl.mark("nodeb")
    with fake_primary(cl) as (a, b, datasize):
        assert datasize > 2 * BS
        for seq, size in ((1, BS // 2), (2, 2 * BS)):
            nv = request_nv(HioCmd.WRITE, seq, 0, BS)
            nv.add_uint32("size", size)
            a.sendall(frame_bytes(nv, b"\x55" * size))
            reply = recv_frame(b)
            assert reply is not None
            assert reply.nv.get_uint64("seq") == seq and reply.nv.get_int16("error") == 22
        # The session goes on: a read answers with the untouched data.
        a.sendall(frame_bytes(request_nv(HioCmd.READ, 3, 0, BS)))
        reply = recv_frame(b)
        assert reply is not None and reply.payload is not None
        assert bytes(reply.payload) == make_block(7, 0, 1, BS)
    for size in (BS // 2, 2 * BS):
        logged_once(
            cl,
            "nodeb",
            rf"Write request with {size} bytes of data for length {BS} refused\.",
            since,
        )


# --------------------------------------------------------------------------
# NBD clients of the primary


def nbd_socket(cl: Cluster) -> str:
    uri = cl.nbd_uri("nodea", "r0")
    return uri.split("socket=", 1)[1]


def nbd_connect(cl: Cluster) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    s.connect(nbd_socket(cl))
    return s


def test_nbd_nonsense_in_the_handshake(cl: Cluster) -> None:
    since = cl.mark("nodea")
    with nbd_connect(cl) as s:
        assert len(s.recv(18)) == 18  # the greeting
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        closed_by_peer(s)
    logged_once(
        cl,
        "nodea",
        r"NBD connection #\d+: dropping the connection: Client sent unknown client flags",
        since,
    )


def test_nbd_nonsense_after_the_handshake(cl: Cluster) -> None:
    since = cl.mark("nodea")

    async def run() -> None:
        c = await NBDClient.connect(cl.nbd_uri("nodea", "r0"))
        c.writer.write(b"\x00" * 28)  # a request with a bad magic
        await c.writer.drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.reader.read(), IO_TIMEOUT)
        c.abort()

    asyncio.run(run())
    logged_once(
        cl, "nodea", r"NBD connection #\d+: dropping the connection: Request has bad magic", since
    )


def test_nbd_client_leaves_mid_request(cl: Cluster) -> None:
    since = cl.mark("nodea")

    async def run() -> None:
        c = await NBDClient.connect(cl.nbd_uri("nodea", "r0"))
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 64 * 1024)
        c.writer.write(header + b"\xee" * 1024)  # 1 KiB of a 64 KiB write
        await c.writer.drain()
        c.writer.write_eof()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.reader.read(), IO_TIMEOUT)
        c.abort()

    asyncio.run(run())
    logged_once(cl, "nodea", r"client disconnected mid-request", since)


# --------------------------------------------------------------------------
# hastctl as an unprivileged user


NOBODY = 65534


def _as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run hastctl's main() in a Python that drops to uid/gid 65534 first."""
    # The interpreter lives under /root, out of nobody's reach: a first run
    # as root (its output thrown away) imports every module hastctl needs.
    code = (
        "import os, sys\n"
        "from pyhast.cli.hastctl import main\n"
        "null = os.open(os.devnull, os.O_WRONLY)\n"
        "saved = os.dup(1), os.dup(2)\n"
        "os.dup2(null, 1); os.dup2(null, 2)\n"
        "main(sys.argv[1:])\n"
        "sys.stdout.flush(); sys.stderr.flush()\n"
        "os.dup2(saved[0], 1); os.dup2(saved[1], 2)\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_hastctl_as_an_unprivileged_user(cl: Cluster) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    pubdir = Path(tempfile.mkdtemp(prefix="hastpub"))
    try:
        pubdir.chmod(0o755)
        conf = pubdir / "hast.conf"
        shutil.copy(cl.conf, conf)
        conf.chmod(0o644)
        argv = ["status", "-c", str(conf), "--node", "nodea", "all"]
        since = cl.mark("nodea")
        # 1. The control socket (0600, in a 0700 directory) keeps it out.
        res = _as_nobody(argv)
        assert res.returncode != 0 and "Permission denied" in res.stderr, res
        # 2. Even with the socket reachable, hastd refuses anyone but root.
        sockdir = Path(cl.nodes["nodea"].control).parent
        ctl = Path(cl.nodes["nodea"].control)
        mode_dir, mode_ctl = sockdir.stat().st_mode & 0o7777, ctl.stat().st_mode & 0o7777
        try:
            sockdir.chmod(0o755)
            ctl.chmod(0o666)
            res = _as_nobody(argv)
        finally:
            sockdir.chmod(mode_dir)
            ctl.chmod(mode_ctl)
        assert res.returncode != 0, res
        assert "primary" not in res.stdout
        logged_once(
            cl,
            "nodea",
            rf"Control connection from uid {NOBODY} \(pid \d+\) refused: only root may "
            r"control hastd\.",
            since,
        )
    finally:
        shutil.rmtree(pubdir, ignore_errors=True)
