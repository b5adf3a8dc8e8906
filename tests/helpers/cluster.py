"""Two real hastd processes on one host: ``nodea`` (127.0.0.1) and ``nodeb`` (127.0.0.2).

Usage::

    with Cluster(tmp_path, resources=("r0",)) as cl:
        cl.start("nodea")
        res = cl.hastctl("nodea", "status")

or through the ``cluster`` fixture a test module defines with
:func:`cluster_fixture`.

What it sets up:

* one shared ``hast.conf`` (both nodes read the same file, as HAST intends):
  per-node control socket, pidfile and listen address (free ports), and for
  every resource a file-backed provider per node, ``remote`` pointing at the
  other node and ``source`` pinned to the node's own address;
* ``hastd -F --node X -c conf -P pidfile --rundir DIR`` started as a real
  process, stdout and stderr captured to ``<tmp>/<node>.log``;
* readiness is polled on the control socket (a status request must be
  answered), never slept for;
* :meth:`Cluster.close` stops every hastd (SIGTERM, then SIGKILL) and prints
  every log, which pytest shows for failing tests only.  Used as a context
  manager, an exception also dumps the logs to stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TextIO, TypeVar

import pytest

from pyhast.wire.control import ControlRequest
from pyhast.wire.frame import NEED_DATA, FrameDecoder, encode_frame

MiB = 1024 * 1024
NODE_IPS = {"nodea": "127.0.0.1", "nodeb": "127.0.0.2"}

T = TypeVar("T")


def free_port(ip: str) -> int:
    """A TCP port nobody listens on at ``ip`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(interval)


def control_status(path: str, timeout: float = 2.0) -> bool:
    """True if a hastd answers a status request on the UNIX socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"".join(encode_frame(ControlRequest.status().to_nv())))
            decoder = FrameDecoder()
            while True:
                data = s.recv(65536)
                if not data:
                    return False
                decoder.feed(data)
                if decoder.next_frame() is not NEED_DATA:
                    return True
    except OSError:
        return False


@dataclass
class Node:
    """One node of the cluster and its files."""

    name: str
    ip: str
    port: int
    control: str
    pidfile: str
    rundir: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    locals: dict[str, Path] = field(default_factory=dict)

    @property
    def listen(self) -> str:
        return f"tcp4://{self.ip}:{self.port}"


class Cluster:
    """Configuration, processes and logs of a two-node test cluster."""

    def __init__(
        self,
        tmp: Path,
        *,
        resources: Sequence[str] = ("r0",),
        exec_path: str | None = None,
        size: int = 16 * MiB,
        extra_global: str = "",
    ) -> None:
        self.tmp = tmp
        # UNIX socket paths are limited to 107 bytes: keep them short.
        self.sockdir = Path(tempfile.mkdtemp(prefix="hast", dir="/tmp"))
        self.conf = tmp / "hast.conf"
        self.exec_path = exec_path
        self.extra_global = extra_global
        self.nodes: dict[str, Node] = {}
        for name, ip in NODE_IPS.items():
            self.nodes[name] = Node(
                name=name,
                ip=ip,
                port=free_port(ip),
                control=str(self.sockdir / f"{name}.ctl"),
                pidfile=str(tmp / f"{name}.pid"),
                rundir=str(self.sockdir / f"{name}.run"),
                log=tmp / f"{name}.log",
            )
        self.resources = list(resources)
        self.size = size
        self.write_config()

    # --- configuration -------------------------------------------------------

    def provider(self, node: str, resource: str) -> Path:
        """The file-backed local component of ``resource`` on ``node`` (created sparse)."""
        path = self.tmp / f"{resource}-{node}.img"
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(self.size)
        self.nodes[node].locals[resource] = path
        return path

    def config_text(self, resources: Sequence[str] | None = None) -> str:
        """hast.conf for both nodes with ``resources`` (default: the cluster's)."""
        a, b = self.nodes["nodea"], self.nodes["nodeb"]
        lines = []
        if self.exec_path:
            lines.append(f"exec {self.exec_path}")
        if self.extra_global:
            lines.append(self.extra_global)
        for node in (a, b):
            lines += [
                f"on {node.name} {{",
                f"        control uds://{node.control}",
                f"        pidfile {node.pidfile}",
                f"        listen {node.listen}",
                "}",
            ]
        for res in self.resources if resources is None else resources:
            lines.append(f"resource {res} {{")
            for node, peer in ((a, b), (b, a)):
                lines += [
                    f"        on {node.name} {{",
                    f"                local {self.provider(node.name, res)}",
                    f"                remote {peer.listen}",
                    f"                source tcp4://{node.ip}",
                    "        }",
                ]
            lines.append("}")
        return "\n".join(lines) + "\n"

    def write_config(self, text: str | None = None) -> None:
        """Write hast.conf (the generated one unless ``text`` is given)."""
        self.conf.write_text(self.config_text() if text is None else text)

    # --- processes -----------------------------------------------------------

    def hastd_argv(self, node: str, *extra: str) -> list[str]:
        n = self.nodes[node]
        return [
            sys.executable,
            "-m",
            "pyhast.daemon.main",
            "-F",
            "--node",
            node,
            "-c",
            str(self.conf),
            "-P",
            n.pidfile,
            "--rundir",
            n.rundir,
            *extra,
        ]

    def start(self, node: str, *extra: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """Start hastd for ``node`` and wait until its control socket answers."""
        n = self.nodes[node]
        with open(n.log, "ab") as logf:
            n.proc = subprocess.Popen(
                self.hastd_argv(node, *extra),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.wait_ready(node, timeout)
        return n.proc

    def wait_ready(self, node: str, timeout: float = 30.0) -> None:
        n = self.nodes[node]

        def ready() -> bool:
            if n.proc is not None and n.proc.poll() is not None:
                raise AssertionError(
                    f"hastd {node} exited with {n.proc.returncode}:\n{self.log(node)}"
                )
            return control_status(n.control)

        wait_for(ready, timeout, what=f"hastd {node} to answer on its control socket")

    def signal(self, node: str, signo: int) -> None:
        proc = self.nodes[node].proc
        assert proc is not None and proc.poll() is None, f"hastd {node} is not running"
        proc.send_signal(signo)

    def stop(self, node: str, timeout: float = 30.0) -> int | None:
        """SIGTERM hastd (SIGKILL after ``timeout``); its exit status (None: not started)."""
        proc = self.nodes[node].proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def hastctl(
        self, node: str, command: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``hastctl <command> -c conf --node <node> <args>``; output captured."""
        argv = [
            sys.executable,
            "-m",
            "pyhast.cli.hastctl",
            command,
            "-c",
            str(self.conf),
            "--node",
            node,
            *args,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def create(self, *extra: str) -> None:
        """``hastctl create`` every resource on both nodes (``extra``: -e/-k/-m options)."""
        for node in self.nodes:
            res = self.hastctl(node, "create", *extra, *self.resources)
            assert res.returncode == 0, f"hastctl create on {node} failed:\n{res.stderr}"

    # --- logs ----------------------------------------------------------------

    def log(self, node: str) -> str:
        path = self.nodes[node].log
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, node: str, text: str, timeout: float = 20.0, count: int = 1) -> str:
        """Poll ``node``'s log until ``text`` appears ``count`` times; the log."""
        return wait_for(
            lambda: log if (log := self.log(node)).count(text) >= count else None,
            timeout,
            what=f"{text!r} in the log of {node}",
        )

    def dump_logs(self, out: TextIO | None = None) -> None:
        stream = sys.stdout if out is None else out
        for name in self.nodes:
            print(f"----- hastd {name} log -----\n{self.log(name)}", file=stream)

    # --- teardown ------------------------------------------------------------

    def close(self) -> None:
        """Stop every hastd and remove the socket directory; print the logs."""
        try:
            for name in self.nodes:
                self.stop(name)
        finally:
            self.dump_logs()
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.dump_logs(sys.stderr)
        self.close()


def cluster_fixture(**kwargs: object) -> Callable[..., Iterator[Cluster]]:
    """Make a pytest fixture yielding a :class:`Cluster` built with ``kwargs``."""

    @pytest.fixture
    def _cluster(tmp_path: Path) -> Iterator[Cluster]:
        cl = Cluster(tmp_path, **kwargs)  # type: ignore[arg-type]
        try:
            yield cl
        finally:
            cl.close()

    return _cluster
