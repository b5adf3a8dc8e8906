"""Transport registry, TCP/UDS/socketpair sockets and descriptor passing.

Every socket here is on 127.0.0.0/8, ::1 or a temporary directory; every
blocking call is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from pyhast.address import Address
from pyhast.errors import FrameError
from pyhast.transport import base, fdpass, socketpair, tcp, uds
from pyhast.transport.base import ConnBrokenError, ConnEOFError, ConnTimeoutError
from pyhast.wire.frame import encode_frame
from pyhast.wire.nv import NV

T = TypeVar("T")
TIMEOUT = 5.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _second_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(
    not _ipv6_loopback(), reason="IPv6 is not configured (cannot bind ::1)"
)
needs_127_0_0_2 = pytest.mark.skipif(
    not _second_loopback(), reason="127.0.0.2 is not usable as a source address"
)


def run(coro: Awaitable[T], timeout: float = TIMEOUT) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def listen_tcp(host: str = "127.0.0.1", backlog: int = 8) -> tuple[socket.socket, str]:
    """A TCP listener on an ephemeral port and its address string."""
    address = Address("tcp6" if ":" in host else "tcp4", host=host, port=0)
    sock = tcp.TCPTransport().server(address, backlog=backlog)
    return sock, tcp.TCPTransport().local_address(sock)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def open_fds() -> set[int]:
    """Our open descriptors (without the one listdir used for the directory)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


@pytest.fixture
def tcp_listener() -> Iterator[tuple[socket.socket, str]]:
    sock, address = listen_tcp()
    with sock:
        yield sock, address


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    # Keep paths short: sun_path is 108 bytes.
    return tmp_path


def connected_tcp_pair(
    address: str, listener: socket.socket
) -> tuple[socket.socket, socket.socket]:
    client = base.client(address)
    try:
        base.connect(client, address, TIMEOUT)
        accepted, _ = base.accept(listener, TIMEOUT)
    except BaseException:
        client.close()
        raise
    return client, accepted


# --------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("tcp://127.0.0.1:1234", "tcp", Address("tcp4", "127.0.0.1", 1234)),
        ("TCP4://127.0.0.1", "tcp", Address("tcp4", "127.0.0.1", 8457)),
        ("tcp4://10.0.0.1:99", "tcp", Address("tcp4", "10.0.0.1", 99)),
        ("tcp6://[::1]:99", "tcp", Address("tcp6", "::1", 99)),
        ("tcp6://::1", "tcp", Address("tcp6", "::1", 8457)),
        ("[fd00::2]:8000", "tcp", Address("tcp6", "fd00::2", 8000)),
        ("fd00::2", "tcp", Address("tcp6", "fd00::2", 8457)),
        ("127.0.0.1", "tcp", Address("tcp4", "127.0.0.1", 8457)),
        ("nodeb:7000", "tcp", Address("tcp", "nodeb", 7000)),
        ("tcp://nodeb", "tcp", Address("tcp", "nodeb", 8457)),
        ("uds:///var/run/hastctl", "uds", Address("uds", path="/var/run/hastctl")),
        ("UNIX:///tmp/x", "uds", Address("uds", path="/tmp/x")),
        ("/var/run/hastctl", "uds", Address("uds", path="/var/run/hastctl")),
    ],
)
def test_lookup_picks_the_transport(text: str, name: str, expected: Address) -> None:
    transport, address = base.lookup(text)
    assert transport.name == name
    assert address == expected


@pytest.mark.parametrize("text", ["socketpair://", "http://x", "ftp://127.0.0.1"])
def test_lookup_not_my_address(text: str) -> None:
    with pytest.raises(ValueError, match="No transport handles the address"):
        base.lookup(text)


@pytest.mark.parametrize("text", ["tcp://", "tcp4://[::1]", "127.0.0.1:0", "uds://", "a b"])
def test_lookup_mine_but_malformed(text: str) -> None:
    with pytest.raises(ValueError) as info:
        base.lookup(text)
    assert "No transport" not in str(info.value)


def test_source_default_port_is_zero() -> None:
    _, address = base.lookup("127.0.0.2", 0)
    assert address.port == 0


def test_transport_for_socket() -> None:
    with socket.socket(socket.AF_INET) as s4, socket.socket(socket.AF_UNIX) as su:
        assert base.transport_for_socket(s4).name == "tcp"
        assert base.transport_for_socket(su).name == "uds"


def test_family_supported() -> None:
    assert base.family_supported(socket.AF_INET)
    assert base.family_supported(socket.AF_UNIX)
    try:
        socket.socket(socket.AF_INET6).close()
        v6 = True
    except OSError:
        v6 = False
    assert base.family_supported(socket.AF_INET6) is v6


# --------------------------------------------------------------------------
# TCP


def test_tcp_connect_accept(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    client, accepted = connected_tcp_pair(address, listener)
    with client, accepted:
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert accepted.gettimeout() is None  # blocking
        client.sendall(b"ping")
        accepted.settimeout(TIMEOUT)
        assert accepted.recv(4) == b"ping"


def test_tcp_accept_reports_peer_address(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    client = base.client(address)
    with client:
        base.connect(client, address, TIMEOUT)
        accepted, peer = base.accept(listener, TIMEOUT)
        with accepted:
            assert peer == f"tcp4://127.0.0.1:{client.getsockname()[1]}"
            assert tcp.peer_ip(accepted) == "127.0.0.1"


def test_tcp_server_from_address_string() -> None:
    for _ in range(5):  # the free port may be taken in between
        port = free_port()
        try:
            listener = base.server(f"tcp4://127.0.0.1:{port}", backlog=3)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        with listener:
            assert listener.getsockname() == ("127.0.0.1", port)
            client, accepted = connected_tcp_pair(f"127.0.0.1:{port}", listener)
            client.close()
            accepted.close()
        return
    pytest.fail("no free port")


def test_tcp_split_connect_like_the_parent(tcp_listener: tuple[socket.socket, str]) -> None:
    # The parent starts a non-blocking connect; the worker finishes it.
    listener, address = tcp_listener
    sock = base.client(address)
    with sock:
        connected = base.connect_start(sock, address)
        assert sock.gettimeout() is None  # blocking mode restored
        if not connected:
            base.connect_wait(sock, TIMEOUT)
        accepted, _ = base.accept(listener, TIMEOUT)
        accepted.close()
        # connect() on an established socket is a no-op.
        base.connect(sock, address, TIMEOUT)


def test_tcp_connect_refused() -> None:
    address = f"127.0.0.1:{free_port()}"
    sock = base.client(address)
    with sock, pytest.raises(ConnectionRefusedError) as info:
        base.connect(sock, address, TIMEOUT)
    assert info.value.errno == errno.ECONNREFUSED


def test_connect_wait_without_connect() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(OSError) as info:
            base.connect_wait(sock, 1.0)
        assert info.value.errno == errno.ENOTCONN


def _fill_backlog(listener: socket.socket, address: str) -> list[socket.socket]:
    """Connect until the (never accepted) backlog is full: a connect then times out."""
    extra: list[socket.socket] = []
    for _ in range(32):
        sock = base.client(address)
        extra.append(sock)
        try:
            base.connect(sock, address, 0.2)
        except TimeoutError:
            return extra
    for sock in extra:
        sock.close()
    pytest.skip("the listener's backlog never filled up")


def test_tcp_connect_timeout_on_full_backlog() -> None:
    listener, address = listen_tcp(backlog=0)
    extra: list[socket.socket] = []
    try:
        extra = _fill_backlog(listener, address)
        sock = base.client(address)
        extra.append(sock)
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            base.connect(sock, address, 0.3)
        elapsed = time.monotonic() - start
        assert info.value.errno == errno.ETIMEDOUT
        assert 0.25 <= elapsed < 3.0
    finally:
        for sock in extra:
            sock.close()
        listener.close()


def test_accept_timeout(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, _ = tcp_listener
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        base.accept(listener, 0.2)
    assert info.value.errno == errno.ETIMEDOUT
    assert 0.15 <= time.monotonic() - start < 3.0


def test_accept_on_nonblocking_listener(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    listener.setblocking(False)
    client, accepted = connected_tcp_pair(address, listener)
    client.close()
    accepted.close()


@needs_127_0_0_2
def test_tcp_source_binding_and_same_ip(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    client = base.client(address, source="127.0.0.2")
    with client:
        assert client.getsockname()[0] == "127.0.0.2"
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        base.connect(client, address, TIMEOUT)
        accepted, peer = base.accept(listener, TIMEOUT)
        with accepted:
            assert peer.startswith("tcp4://127.0.0.2:")
            assert tcp.peer_ip(accepted) == "127.0.0.2"
            assert tcp.same_ip(accepted, "127.0.0.2")
            assert tcp.same_ip(accepted, "tcp://127.0.0.2:1")  # port ignored
            assert tcp.same_ip(accepted, "tcp4://127.0.0.2")
            assert not tcp.same_ip(accepted, "127.0.0.1")
            assert not tcp.same_ip(accepted, "tcp6://[::ffff:127.0.0.2]")  # family differs
            assert not tcp.same_ip(accepted, "uds:///tmp/x")
            assert not tcp.same_ip(accepted, "not an address")


@needs_127_0_0_2
def test_tcp_source_with_port(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    port = free_port("127.0.0.2")
    client = base.client(address, source=f"127.0.0.2:{port}")
    with client:
        base.connect(client, address, TIMEOUT)
        accepted, peer = base.accept(listener, TIMEOUT)
        accepted.close()
        assert peer == f"tcp4://127.0.0.2:{port}"


def test_same_ip_with_a_host_name(tcp_listener: tuple[socket.socket, str]) -> None:
    try:
        names = {info[4][0] for info in socket.getaddrinfo("localhost", 1, socket.AF_INET)}
    except OSError:
        pytest.skip("localhost does not resolve")
    if "127.0.0.1" not in names:
        pytest.skip("localhost does not resolve to 127.0.0.1")
    listener, address = tcp_listener
    client, accepted = connected_tcp_pair(address, listener)
    with client, accepted:
        assert tcp.same_ip(accepted, "localhost")
        assert tcp.same_ip(accepted, "tcp://localhost:9")


def test_same_ip_of_non_tcp_sockets() -> None:
    a, b = socketpair.socketpair()
    with a, b:
        assert not tcp.same_ip(a, "127.0.0.1")
        with pytest.raises(ValueError):
            tcp.peer_ip(a)
    with socket.socket(socket.AF_INET) as unconnected:
        assert not tcp.same_ip(unconnected, "127.0.0.1")


@needs_ipv6
def test_source_family_mismatch(tcp_listener: tuple[socket.socket, str]) -> None:
    _, address = tcp_listener
    with pytest.raises(ValueError, match="same family"):
        base.client(address, source="::1")


@needs_ipv6
def test_tcp6_connect_accept_same_ip() -> None:
    listener, address = listen_tcp("::1")
    with listener:
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert address.startswith("tcp6://[::1]:")
        client, accepted = connected_tcp_pair(address, listener)
        with client, accepted:
            assert tcp.peer_ip(accepted) == "::1"
            assert tcp.same_ip(accepted, "tcp6://[::1]:1")
            assert tcp.same_ip(accepted, "::1")
            assert tcp.same_ip(accepted, "[0:0::1]:8457")
            assert not tcp.same_ip(accepted, "127.0.0.1")


@needs_ipv6
def test_tcp4_and_tcp6_listeners_share_a_port() -> None:
    for _ in range(5):
        port = free_port()
        try:
            v4 = base.server(f"tcp4://127.0.0.1:{port}")
        except OSError:
            continue
        with v4:
            try:
                v6 = base.server(f"tcp6://[::]:{port}")
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue  # someone else took the v6 port in between
                raise
            with v6:
                assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
                for address, listener in ((f"127.0.0.1:{port}", v4), (f"[::1]:{port}", v6)):
                    client, accepted = connected_tcp_pair(address, listener)
                    client.close()
                    accepted.close()
            return
    pytest.fail("no port free on both families")


def test_set_timeouts_bounds_blocking_io() -> None:
    a, b = socketpair.socketpair()
    with a, b:
        base.set_timeouts(a, 0.2)
        assert base.get_timeouts(a) == pytest.approx((0.2, 0.2))
        start = time.monotonic()
        with pytest.raises(BlockingIOError):  # EAGAIN, which callers report as ETIMEDOUT
            a.recv(1)
        assert 0.15 <= time.monotonic() - start < 3.0
        base.set_timeouts(a, None)
        assert base.get_timeouts(a) == (0.0, 0.0)
        base.set_timeouts(a, 1e-9)  # tiny, but still a timeout
        assert base.get_timeouts(a)[1] > 0


# --------------------------------------------------------------------------
# UNIX-domain sockets


def test_uds_server_mode_connect_accept(sockdir: Path) -> None:
    path = str(sockdir / "ctl")
    old_umask = os.umask(0o022)
    try:
        listener = base.server(f"uds://{path}")
    finally:
        os.umask(old_umask)
    with listener:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        client = base.client(path)
        with client:
            base.connect(client, f"unix://{path}", TIMEOUT)
            accepted, peer = base.accept(listener, TIMEOUT)
            with accepted:
                assert peer == f"uds://{path}"
                creds = uds.peer_credentials(accepted)
                assert creds == (os.getpid(), os.getuid(), os.getgid())
                assert creds.uid == os.getuid()
                assert uds.peer_credentials(client).pid == os.getpid()
                client.sendall(b"x")
                accepted.settimeout(TIMEOUT)
                assert accepted.recv(1) == b"x"
    assert not os.path.exists(path)  # unlinked on close


def test_uds_custom_mode(sockdir: Path) -> None:
    path = str(sockdir / "s")
    with base.server(path, mode=0o660):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660


def test_uds_stale_socket_is_replaced(sockdir: Path) -> None:
    path = str(sockdir / "stale")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # leaves the file behind, nobody listening
    assert os.path.exists(path)
    with base.server(path) as listener:
        client = base.client(path)
        with client:
            base.connect(client, path, TIMEOUT)
            accepted, _ = base.accept(listener, TIMEOUT)
            accepted.close()


def test_uds_live_socket_is_not_stolen(sockdir: Path) -> None:
    path = str(sockdir / "live")
    with base.server(path):
        with pytest.raises(OSError) as info:
            base.server(path)
        assert info.value.errno == errno.EADDRINUSE
        assert os.path.exists(path)  # the failed attempt did not unlink it
    assert not os.path.exists(path)


def test_uds_regular_file_is_left_alone(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_text("precious")
    with pytest.raises(OSError) as info:
        base.server(str(path))
    assert info.value.errno == errno.EADDRINUSE
    assert path.read_text() == "precious"


def test_uds_only_the_creator_unlinks(sockdir: Path) -> None:
    path = str(sockdir / "fork")
    listener = base.server(path)
    pid = os.fork()
    if pid == 0:  # child: closing its copy must not remove the parent's socket
        try:
            listener.close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.path.exists(path)
    listener.close()
    assert not os.path.exists(path)


def test_uds_replaced_file_is_not_unlinked(sockdir: Path) -> None:
    path = str(sockdir / "replaced")
    listener = base.server(path)
    os.unlink(path)
    Path(path).write_text("someone else's")
    listener.close()
    assert Path(path).read_text() == "someone else's"


def test_uds_errors(sockdir: Path) -> None:
    path = str(sockdir / "none")
    with pytest.raises(ValueError, match="source"):
        base.client(path, source="/tmp/src")
    sock = base.client(path)
    with sock, pytest.raises(FileNotFoundError):
        base.connect(sock, path, TIMEOUT)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    sock = base.client(path)
    with sock, pytest.raises(ConnectionRefusedError):
        base.connect(sock, path, TIMEOUT)


def test_uds_connect_timeout_on_full_backlog(sockdir: Path) -> None:
    path = str(sockdir / "full")
    with base.server(path, backlog=0) as listener:
        extra = _fill_backlog(listener, path)
        try:
            sock = base.client(path)
            extra.append(sock)
            start = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                base.connect(sock, path, 0.3)
            assert info.value.errno == errno.ETIMEDOUT
            assert 0.25 <= time.monotonic() - start < 3.0
            assert base.get_timeouts(sock) == (0.0, 0.0)  # restored
        finally:
            for sock in extra:
                sock.close()


def test_peer_credentials_needs_unix_socket(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    client, accepted = connected_tcp_pair(address, listener)
    with client, accepted, pytest.raises(ValueError):
        uds.peer_credentials(accepted)


# --------------------------------------------------------------------------
# socketpair


def test_socketpair() -> None:
    parent, child = socketpair.socketpair()
    with parent, child:
        assert parent.family == socket.AF_UNIX and parent.type == socket.SOCK_STREAM
        assert not parent.get_inheritable() and not child.get_inheritable()
        assert uds.UDSTransport().peer_address(parent) == socketpair.PEER_ADDRESS
        parent.sendall(b"a")
        child.settimeout(TIMEOUT)
        assert child.recv(1) == b"a"
    parent, child = socketpair.socketpair(child_inheritable=True)
    with parent, child:
        assert not parent.get_inheritable()
        assert child.get_inheritable()


# --------------------------------------------------------------------------
# Descriptor passing


def test_pass_a_connected_tcp_socket(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    parent, child = socketpair.socketpair()
    with parent, child:
        child.settimeout(TIMEOUT)
        client, accepted = connected_tcp_pair(address, listener)
        with accepted:
            with client:
                fdpass.send_fds(parent, b"\x00\x00", [client.fileno()])
            # The sender closed its copy; the receiver's copy keeps the connection.
            data, fds = fdpass.recv_fds(child, 16, 1)
            assert data == b"\x00\x00"
            assert len(fds) == 1
            assert not os.get_inheritable(fds[0])  # received close-on-exec
            with socket.socket(fileno=fds[0]) as passed:
                assert passed.family == socket.AF_INET
                passed.settimeout(TIMEOUT)
                passed.sendall(b"hello")
                accepted.settimeout(TIMEOUT)
                assert accepted.recv(5) == b"hello"
                accepted.sendall(b"back")
                assert passed.recv(4) == b"back"


def test_surplus_descriptors_are_closed() -> None:
    parent, child = socketpair.socketpair()
    with parent, child:
        child.settimeout(TIMEOUT)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        try:
            before = open_fds()
            fdpass.send_fds(parent, b"x", [r1, r2, w1])
            data, fds = fdpass.recv_fds(child, 16, 1)
            assert data == b"x" and len(fds) == 1
            assert open_fds() - before == set(fds)  # nothing else arrived
            os.close(fds[0])
            assert open_fds() == before
        finally:
            for fd in (r1, w1, r2, w2):
                os.close(fd)


def test_recv_fds_eof_and_plain_data() -> None:
    parent, child = socketpair.socketpair()
    with child:
        child.settimeout(TIMEOUT)
        with parent:
            fdpass.send_fds(parent, b"no fds", [])
        assert fdpass.recv_fds(child, 16, 1) == (b"no fds", [])
        assert fdpass.recv_fds(child, 16, 1) == (b"", [])
    with pytest.raises(ValueError):
        fdpass.send_fds(child, b"", [0])


def test_fd_passing_async() -> None:
    async def main() -> None:
        parent, child = socketpair.socketpair()
        with parent, child:
            parent.setblocking(False)
            child.setblocking(False)
            r, w = os.pipe()
            try:
                receive = asyncio.create_task(fdpass.recv_fds_async(child, 16, 1))
                await asyncio.sleep(0.05)
                assert not receive.done()
                send = asyncio.create_task(fdpass.send_fds_async(parent, b"big" * 100_000, [w]))
                data, fds = await receive
                assert data.startswith(b"big") and len(fds) == 1
                os.write(fds[0], b"!")
                os.close(fds[0])
                assert os.read(r, 1) == b"!"
                # The rest of the data arrives without descriptors.
                rest = bytearray(data)
                while len(rest) < 300_000:
                    more, none = await fdpass.recv_fds_async(child, 1 << 20, 1)
                    assert more and none == []
                    rest += more
                assert bytes(rest) == b"big" * 100_000
                await send
            finally:
                os.close(r)
                os.close(w)
            with pytest.raises(ValueError, match="non-blocking"):
                child.setblocking(True)
                await fdpass.recv_fds_async(child, 1, 1)

    run(main())


def test_fd_receive_cancellation_leaks_nothing() -> None:
    async def main() -> None:
        parent, child = socketpair.socketpair()
        with parent, child:
            child.setblocking(False)
            before = open_fds()
            task = asyncio.create_task(fdpass.recv_fds_async(child, 16, 1))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert open_fds() == before
            # The socket is still usable afterwards.
            fdpass.send_fds(parent, b"y", [parent.fileno()])
            data, fds = await fdpass.recv_fds_async(child, 16, 1)
            assert data == b"y" and len(fds) == 1
            os.close(fds[0])

    run(main())


def _frame_nv(error: int) -> NV:
    nv = NV()
    nv.add_int16("error", error)
    return nv


def test_frame_with_descriptor_sync_and_async(tcp_listener: tuple[socket.socket, str]) -> None:
    listener, address = tcp_listener
    client, accepted = connected_tcp_pair(address, listener)
    with client, accepted:
        parent, child = socketpair.socketpair()
        with parent, child:
            child.settimeout(TIMEOUT)
            # Two messages back to back: each keeps its own descriptor.
            fdpass.send_frame_fds(parent, _frame_nv(0), [client.fileno()])
            fdpass.send_frame_fds(parent, _frame_nv(5), [])
            frame, fds = fdpass.recv_frame_fds(child)
            assert frame.nv.get_int16("error") == 0 and len(fds) == 1
            os.close(fds[0])
            frame, fds = fdpass.recv_frame_fds(child)
            assert frame.nv.get_int16("error") == 5 and fds == []

            async def main() -> None:
                parent.setblocking(False)
                child.setblocking(False)
                payload = b"p" * 3000
                nv = _frame_nv(0)
                nv.add_uint32("size", len(payload))
                await fdpass.send_frame_fds_async(parent, nv, [client.fileno()], payload)
                frame, fds = await fdpass.recv_frame_fds_async(child)
                assert frame.payload is not None and bytes(frame.payload) == payload
                assert len(fds) == 1
                os.close(fds[0])

            run(main())


def test_frame_with_descriptor_errors_close_descriptors() -> None:
    parent, child = socketpair.socketpair()
    r, w = os.pipe()
    try:
        child.settimeout(TIMEOUT)
        before = open_fds()
        # A header with a bad version, with a descriptor attached.
        fdpass.send_fds(parent, struct.pack("<BI", 9, 8), [r])
        with pytest.raises(FrameError):
            fdpass.recv_frame_fds(child)
        assert open_fds() == before
        # Half a frame, then EOF.
        head = b"".join(encode_frame(_frame_nv(0)))
        fdpass.send_fds(parent, head[:7], [r, w])
        before.discard(parent.fileno())
        parent.close()
        start = time.monotonic()
        with pytest.raises(ConnBrokenError) as info:
            fdpass.recv_frame_fds(child, 2)
        assert type(info.value) is ConnBrokenError
        assert open_fds() == before
        with pytest.raises(ConnEOFError):
            fdpass.recv_frame_fds(child)
        assert time.monotonic() - start < 1.0
    finally:
        for sock in (parent, child):
            sock.close()
        os.close(r)
        os.close(w)


def test_frame_with_descriptor_timeout() -> None:
    parent, child = socketpair.socketpair()
    with parent, child:
        base.set_timeouts(child, 0.2)
        with pytest.raises(ConnTimeoutError):
            fdpass.recv_frame_fds(child)
