"""The hastd parent as a real process: control socket, hastctl role/status/list,
hooks, pidfile, signals, reload, and the secondary side of the handshake.

Tests that need a running worker (role primary, a connected secondary) live
with the worker's tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhast.wire.frame import NEED_DATA, Frame, FrameDecoder, encode_frame
from pyhast.wire.nv import NV
from tests.helpers.cluster import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)

# A script cannot see its argv[0] (the kernel hands the interpreter the
# path); tests/unit/test_hooks.py checks argv[0].
HOOK = """#!/bin/sh
echo "$*" >> {out}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cl = Cluster(tmp_path, resources=("r0", "r1"))
    try:
        yield cl
    finally:
        cl.close()


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    out = tmp_path / "hook.out"
    script = tmp_path / "hook.sh"
    script.write_text(HOOK.format(out=out))
    script.chmod(0o755)
    cl = Cluster(tmp_path, resources=("r0", "r1"), exec_path=str(script))
    try:
        yield cl, out
    finally:
        cl.close()


def hook_lines(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


# --------------------------------------------------------------------------
# hastctl status / list / --json


def test_status_list_json_show_init_on_both_nodes(cluster: Cluster) -> None:
    cluster.start("nodea")
    cluster.start("nodeb")
    for node, peer in (("nodea", "nodeb"), ("nodeb", "nodea")):
        res = cluster.hastctl(node, "status")
        assert res.returncode == 0, res.stderr
        peer_addr = cluster.nodes[peer].listen
        local0 = cluster.nodes[node].locals["r0"]
        local1 = cluster.nodes[node].locals["r1"]
        assert res.stdout == (
            "Name\tStatus\t Role\t\tComponents\n"
            f"r0\t-        init           {local0}\t{peer_addr}\n"
            f"r1\t-        init           {local1}\t{peer_addr}\n"
        )

        res = cluster.hastctl(node, "list", "r1")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[:8] == [
            "r1:",
            "  role: init",
            "  provname: r1",
            f"  localpath: {local1}",
            "  extentsize: 0 (0B)",
            "  keepdirty: 0",
            f"  remoteaddr: {peer_addr}",
            f"  sourceaddr: tcp4://{cluster.nodes[node].ip}",
        ]
        assert "  replication: memsync" in lines
        assert not any(line.startswith("  status:") for line in lines)

        res = cluster.hastctl(node, "status", "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert [r["name"] for r in doc["resources"]] == ["r0", "r1"]
        for r in doc["resources"]:
            assert r["role"] == "init"
            assert r["status"] is None
            assert r["workerpid"] == 0
            assert r["nbd_uri"] is None
            assert r["error"] == 0

        res = cluster.hastctl(node, "list", "--json", "r0")
        assert res.returncode == 0, res.stderr
        assert [r["name"] for r in json.loads(res.stdout)["resources"]] == ["r0"]


def test_unknown_resource(cluster: Cluster) -> None:
    cluster.start("nodea")
    res = cluster.hastctl("nodea", "role", "init", "nope")
    assert res.returncode == 1
    assert res.stdout == ""
    assert "[nope] Received error 1 from hastd." in res.stderr

    res = cluster.hastctl("nodea", "status", "r0", "nope")
    assert res.returncode == 1
    assert res.stdout.splitlines()[2] == "nope\tERR1"

    res = cluster.hastctl("nodea", "list", "nope")
    assert res.returncode == 1
    assert res.stdout == "nope:\n  error: 1\n"


def test_hastctl_without_hastd(cluster: Cluster) -> None:
    res = cluster.hastctl("nodea", "status")
    assert res.returncode == 71
    assert "Unable to connect to hastd via" in res.stderr


def test_hastctl_usage(cluster: Cluster) -> None:
    assert cluster.hastctl("nodea", "role", "bogus", "r0").returncode == 64
    assert cluster.hastctl("nodea", "role", "init").returncode == 64


# --------------------------------------------------------------------------
# Roles and hooks


def test_role_secondary_then_init_runs_role_hook(hooked: tuple[Cluster, Path]) -> None:
    cl, out = hooked
    cl.start("nodea")
    res = cl.hastctl("nodea", "role", "secondary", "r0")
    assert (res.returncode, res.stdout) == (0, ""), res.stderr
    res = cl.hastctl("nodea", "status", "r0")
    assert res.stdout.splitlines()[1].startswith("r0\t-        secondary      ")
    wait_for(lambda: len(hook_lines(out)) >= 1, what="the first role hook")

    # Unchanged role: nothing happens, no hook.
    res = cl.hastctl("nodea", "role", "secondary", "r0")
    assert res.returncode == 0, res.stderr

    res = cl.hastctl("nodea", "role", "init", "all")
    assert (res.returncode, res.stdout) == (0, ""), res.stderr
    wait_for(lambda: len(hook_lines(out)) >= 2, what="the second role hook")
    res = cl.hastctl("nodea", "status")
    assert [line.split("\t")[1].split()[1] for line in res.stdout.splitlines()[1:]] == [
        "init",
        "init",
    ]
    assert hook_lines(out) == ["role r0 init secondary", "role r0 secondary init"]
    assert "[r0] (init) Role changed to secondary." in cl.log("nodea")


def test_failing_hook_is_logged(tmp_path: Path) -> None:
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    with Cluster(tmp_path, exec_path=str(script)) as cl:
        cl.start("nodea")
        assert cl.hastctl("nodea", "role", "secondary", "r0").returncode == 0
        cl.wait_log("nodea", "Hook exited ungracefully (pid=")
        assert f"exitcode=3, cmd=[{script} role r0 init secondary])." in cl.log("nodea")


# --------------------------------------------------------------------------
# Pidfile, privileges, signals


def test_second_hastd_with_same_pidfile_exits_75(cluster: Cluster) -> None:
    first = cluster.start("nodea")
    pidfile = cluster.nodes["nodea"].pidfile
    assert Path(pidfile).read_text().strip() == str(first.pid)
    assert stat.S_IMODE(os.stat(pidfile).st_mode) == 0o600
    res = subprocess.run(
        cluster.hastd_argv("nodea"), capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 75
    assert f"Another hastd is already running, pidfile: {pidfile}, pid: {first.pid}." in res.stderr
    assert first.poll() is None
    assert cluster.hastctl("nodea", "status").returncode == 0


def test_control_socket_mode_and_non_root_refused(cluster: Cluster) -> None:
    cluster.start("nodea")
    path = cluster.nodes["nodea"].control
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Open the way to the socket for everyone, then knock as uid 65534.
    os.chmod(cluster.sockdir, 0o755)
    os.chmod(path, 0o666)
    request = b"".join(encode_frame(_status_request()))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 4
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(20)
                s.connect(path)
                try:
                    s.sendall(request)
                    code = 0 if s.recv(1024) else 3
                except (ConnectionResetError, BrokenPipeError):
                    code = 3  # refused before or after the request went out
        except BaseException as exc:
            os.write(2, f"child: {exc!r}\n".encode())
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3  # connected, then closed without a reply
    cluster.wait_log("nodea", "Control connection from uid 65534")
    assert "only root may control hastd." in cluster.log("nodea")
    assert cluster.hastctl("nodea", "status").returncode == 0


def test_sigterm_exits_0_and_cleans_up(cluster: Cluster) -> None:
    proc = cluster.start("nodea")
    node = cluster.nodes["nodea"]
    assert os.path.exists(node.control) and os.path.exists(node.pidfile)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not os.path.exists(node.control)
    assert not os.path.exists(node.pidfile)
    assert "Termination signal received, exiting." in cluster.log("nodea")


def test_sigint_with_a_secondary_role_exits_0(cluster: Cluster) -> None:
    proc = cluster.start("nodea")
    assert cluster.hastctl("nodea", "role", "secondary", "all").returncode == 0
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


# --------------------------------------------------------------------------
# SIGHUP reload


def test_sighup_reload_remove_add_and_malformed(hooked: tuple[Cluster, Path]) -> None:
    cl, out = hooked
    cl.start("nodea")
    assert cl.hastctl("nodea", "role", "secondary", "r1").returncode == 0

    cl.write_config(cl.config_text(("r0", "r2")))
    cl.signal("nodea", signal.SIGHUP)
    cl.wait_log("nodea", "Configuration reloaded successfully.")

    def names() -> list[str]:
        res = cl.hastctl("nodea", "status")
        return [line.split("\t")[0] for line in res.stdout.splitlines()[1:]]

    assert names() == ["r0", "r2"]
    log = cl.log("nodea")
    assert "Resource r1 removed." in log
    assert "Resource r2 added." in log
    # The removed resource went through init (and its role hook fired).
    wait_for(lambda: "role r1 secondary init" in hook_lines(out), what="r1's hook")
    res = cl.hastctl("nodea", "status", "r2")
    assert res.stdout.splitlines()[1].startswith("r2\t-        init ")

    cl.write_config("resource r0 {\n  on nodea {\n")  # malformed
    cl.signal("nodea", signal.SIGHUP)
    cl.wait_log("nodea", "Configuration not reloaded.")
    assert "Unexpected end of file" in cl.log("nodea")
    # hastctl reads the file too: give it a valid one the daemon has not loaded.
    cl.write_config(cl.config_text(("r0", "r1", "r2")))
    assert names() == ["r0", "r2"]
    assert cl.nodes["nodea"].proc is not None and cl.nodes["nodea"].proc.poll() is None


def test_sighup_restarts_a_changed_secondary(hooked: tuple[Cluster, Path]) -> None:
    cl, out = hooked
    cl.start("nodea")
    assert cl.hastctl("nodea", "role", "secondary", "r0").returncode == 0
    cl.extra_global = "timeout 7"
    cl.write_config()
    cl.signal("nodea", signal.SIGHUP)
    cl.wait_log("nodea", "Configuration reloaded successfully.")
    assert "Resource r0 configuration was modified, restarting it." in cl.log("nodea")
    assert "Resource r1 configuration was modified, restarting it." in cl.log("nodea")
    wait_for(lambda: len(hook_lines(out)) >= 3, what="the restart's role hooks")
    # Hooks run concurrently: their lines may land in either order.
    assert sorted(hook_lines(out)[1:]) == [
        "role r0 init secondary",
        "role r0 secondary init",
    ]
    res = cl.hastctl("nodea", "status", "r0")
    assert "secondary" in res.stdout


# --------------------------------------------------------------------------
# Replication connections (the secondary parent's side of the handshake)


def _status_request() -> NV:
    from pyhast.wire.control import ControlRequest

    return ControlRequest.status().to_nv()


def connect_from(source_ip: str, cl: Cluster, node: str = "nodea") -> socket.socket:
    n = cl.nodes[node]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source_ip, 0))
    s.settimeout(20)
    s.connect((n.ip, n.port))
    return s


def send_nv(s: socket.socket, nv: NV, version: int = 1) -> None:
    s.sendall(b"".join(encode_frame(nv, version=version)))


def recv_frame(s: socket.socket) -> Frame | None:
    """One frame, or None if the peer closed (or reset) the connection first.

    hastd closing a socket with unread data in it sends a reset.
    """
    decoder = FrameDecoder()
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return None
        if not data:
            return None
        decoder.feed(data)
        frame = decoder.next_frame()
        if frame is not NEED_DATA:
            assert isinstance(frame, Frame)
            return frame


def first_message(resource: str, version: int | None = 2) -> NV:
    nv = NV()
    nv.add_string("resource", resource)
    if version is not None:
        nv.add_uint8("version", version)
    return nv


def second_message(resource: str, token: bytes) -> NV:
    nv = NV()
    nv.add_string("resource", resource)
    nv.add_uint8_array("token", token)
    nv.add_uint64("resuid", 1)
    nv.add_uint64("localcnt", 0)
    nv.add_uint64("remotecnt", 0)
    return nv


def test_connection_from_unknown_address_is_closed_silently(cluster: Cluster) -> None:
    cluster.start("nodea")
    for _ in range(2):
        with connect_from("127.0.0.3", cluster) as s:
            send_nv(s, first_message("r0"))
            assert recv_frame(s) is None
    log = cluster.wait_log("nodea", "Client tcp4://127.0.0.3:")
    assert log.count("isn't known; its connections are closed.") == 1


def test_handshake_refusals(cluster: Cluster) -> None:
    cluster.start("nodea")
    with connect_from("127.0.0.2", cluster) as s:
        send_nv(s, first_message("nope"))
        frame = recv_frame(s)
        assert frame is not None and frame.version == 2
        assert frame.nv.get_string("errmsg") == "Resource not configured."
        assert recv_frame(s) is None
    with connect_from("127.0.0.2", cluster) as s:
        send_nv(s, first_message("r0"))
        frame = recv_frame(s)
        assert frame is not None
        assert (
            frame.nv.get_string("errmsg")
            == "Remote node acts as init for the resource and not as secondary."
        )
        assert "wait" not in frame.nv


def test_handshake_no_access(tmp_path: Path) -> None:
    with Cluster(tmp_path, resources=("r0", "r1")) as cl:
        # nodea's r1 takes its peer at 127.0.0.9: 127.0.0.2 may reach r0 only.
        lines = cl.config_text().splitlines()
        idx = lines.index("resource r1 {")
        remote = next(i for i in range(idx, len(lines)) if lines[i].strip().startswith("remote"))
        lines[remote] = "                remote tcp4://127.0.0.9"
        cl.write_config("\n".join(lines) + "\n")
        cl.start("nodea")
        with connect_from("127.0.0.2", cl) as s:
            send_nv(s, first_message("r1"))
            frame = recv_frame(s)
            assert frame is not None
            assert frame.nv.get_string("errmsg") == "No access to the resource."


@pytest.mark.parametrize(("asked", "expected"), [(2, 2), (None, 1), (1, 1), (3, 2)])
def test_first_message_gets_version_and_token(
    cluster: Cluster, asked: int | None, expected: int
) -> None:
    cluster.start("nodea")
    assert cluster.hastctl("nodea", "role", "secondary", "r0").returncode == 0
    with connect_from("127.0.0.2", cluster) as s:
        send_nv(s, first_message("r0", asked))
        frame = recv_frame(s)
        assert frame is not None
        assert frame.version == expected
        assert frame.nv.get_uint8("version") == expected
        token = frame.nv.get_uint8_array("token")
        assert len(token) == 16
        assert "errmsg" not in frame.nv


def test_second_message_with_wrong_token(cluster: Cluster) -> None:
    cluster.start("nodea")
    assert cluster.hastctl("nodea", "role", "secondary", "r0").returncode == 0
    with connect_from("127.0.0.2", cluster) as a:
        send_nv(a, first_message("r0"))
        frame = recv_frame(a)
        assert frame is not None
        token = frame.nv.get_uint8_array("token")
        wrong = bytes(b ^ 0xFF for b in token)
        with connect_from("127.0.0.2", cluster) as b:
            send_nv(b, second_message("r0", wrong), version=2)
            reply = recv_frame(b)
            assert reply is not None
            assert reply.nv.get_string("errmsg") == "Token doesn't match."
            assert recv_frame(b) is None
        # A token of the wrong size is closed without a word.
        with connect_from("127.0.0.2", cluster) as b:
            send_nv(b, second_message("r0", token[:8]), version=2)
            assert recv_frame(b) is None
    assert "doesn't match." in cluster.log("nodea")


def test_silent_or_junk_peers_do_not_block_others(cluster: Cluster) -> None:
    cluster.start("nodea")
    assert cluster.hastctl("nodea", "role", "secondary", "r0").returncode == 0
    silent = connect_from("127.0.0.2", cluster)
    junk = connect_from("127.0.0.2", cluster)
    try:
        junk.sendall(b"\x07" + b"\xff" * 64)  # version 7: refused
        assert recv_frame(junk) is None
        started = time.monotonic()
        with connect_from("127.0.0.2", cluster) as s:
            send_nv(s, first_message("r0"))
            frame = recv_frame(s)
            assert frame is not None and len(frame.nv.get_uint8_array("token")) == 16
        assert time.monotonic() - started < 5
        assert cluster.hastctl("nodea", "status").returncode == 0
    finally:
        silent.close()
        junk.close()
