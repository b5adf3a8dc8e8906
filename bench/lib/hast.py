"""A light two-node hastd launcher for the benchmark (no pytest, no log dumps).

Like ``tests/helpers/cluster.py``: one shared hast.conf, nodea on 127.0.0.1
and nodeb on 127.0.0.2, ``hastd -F --node X -c conf -P pidfile --rundir DIR``;
readiness is polled on the control socket.  Differences: several resources
with their own replication mode (or ``remote none``) in one file, each node's
hastd pinned to a CPU with taskset (its workers inherit the affinity), and
the daemons' output is tapped with arrival times (see :mod:`.procs`).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyhast.cli.control_client import ControlClientError
from pyhast.cli.control_client import request as control_request
from pyhast.wire.control import ControlRequest

from .procs import Proc, Procs, descendants, wait_until

NODE_IPS = {"nodea": "127.0.0.1", "nodeb": "127.0.0.2"}
PEER = {"nodea": "nodeb", "nodeb": "nodea"}


def free_port(ip: str) -> int:
    """A TCP port nobody listens on at ``ip`` right now (loopback only)."""
    assert ip.startswith("127."), ip
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@dataclass
class ResourceSpec:
    """One resource: its name, replication mode, and whether nodeb is its peer."""

    name: str
    replication: str = "memsync"
    replicated: bool = True
    options: Sequence[str] = ()


@dataclass
class NodeSpec:
    name: str
    ip: str
    port: int
    control: str
    pidfile: str
    rundir: str
    proc: Proc | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def listen(self) -> str:
        return f"tcp4://{self.ip}:{self.port}"


class HastCluster:
    def __init__(
        self,
        procs: Procs,
        workdir: Path,
        sockdir: Path,
        resources: Sequence[ResourceSpec],
        provider_files: Mapping[tuple[str, str], Path],
        *,
        reconnect_interval: float = 0.5,
        hastd_args: Sequence[str] = (),
    ) -> None:
        self.procs = procs
        self.workdir = workdir
        self.conf = workdir / "hast.conf"
        self.resources = {r.name: r for r in resources}
        self.reconnect_interval = reconnect_interval
        self.hastd_args = list(hastd_args)
        self.nodes: dict[str, NodeSpec] = {}
        for name, ip in NODE_IPS.items():
            self.nodes[name] = NodeSpec(
                name=name,
                ip=ip,
                port=free_port(ip),
                control=str(sockdir / f"{name}.ctl"),
                pidfile=str(workdir / f"{name}.pid"),
                rundir=str(sockdir / f"{name}.run"),
            )
        for (node, res), path in provider_files.items():
            self.nodes[node].files[res] = path
        self.conf.write_text(self.config_text())

    # -- configuration ---------------------------------------------------------------

    def config_text(self) -> str:
        a, b = self.nodes["nodea"], self.nodes["nodeb"]
        lines: list[str] = []
        for n in (a, b):
            lines += [
                f"on {n.name} {{",
                f"        control uds://{n.control}",
                f"        pidfile {n.pidfile}",
                f"        listen {n.listen}",
                "}",
            ]
        for res in self.resources.values():
            lines.append(f"resource {res.name} {{")
            lines.append(f"        replication {res.replication}")
            lines += [f"        {opt}" for opt in res.options]
            for n, peer in ((a, b), (b, a)):
                remote = peer.listen if res.replicated else "none"
                lines += [
                    f"        on {n.name} {{",
                    f"                local {n.files[res.name]}",
                    f"                remote {remote}",
                    f"                source tcp4://{n.ip}",
                    "        }",
                ]
            lines.append("}")
        return "\n".join(lines) + "\n"

    # -- processes ---------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYHAST_RECONNECT_INTERVAL"] = str(self.reconnect_interval)
        return env

    def hastctl(self, node: str, *args: str, timeout: float = 60.0) -> str:
        argv = [sys.executable, "-m", "pyhast.cli.hastctl", args[0], "-c", str(self.conf)]
        argv += ["--node", node, *args[1:]]
        return self.procs.run(argv, timeout=timeout, env=self.env()).stdout

    def create(self, node: str, *resources: str) -> None:
        self.hastctl(node, "create", *resources)

    def start(self, node: str, cpu: int | None, timeout: float = 30.0) -> Proc:
        n = self.nodes[node]
        argv = [sys.executable, "-m", "pyhast.daemon.main", "-F", "--node", node]
        argv += ["-c", str(self.conf), "-P", n.pidfile, "--rundir", n.rundir, *self.hastd_args]
        n.proc = self.procs.spawn_server(f"hastd-{node}", argv, cpu=cpu, env=self.env())
        proc = n.proc

        def ready() -> bool:
            if not proc.running():
                raise RuntimeError(
                    f"hastd {node} exited with {proc.popen.returncode}:\n"
                    + (proc.tap.text() if proc.tap else "")
                )
            try:
                self.status_all(node, timeout=2.0)
            except (ControlClientError, OSError):
                return False
            return True

        wait_until(ready, timeout, f"hastd {node} to answer on its control socket", 0.05)
        return proc

    def stop(self, node: str) -> None:
        n = self.nodes[node]
        if n.proc is not None:
            self.procs.stop(n.proc, timeout=30.0)
            n.proc = None

    def role(self, node: str, role: str, *resources: str) -> None:
        self.hastctl(node, "role", role, *resources)
        # Every worker that hastd starts is killed at cleanup if it outlives hastd.
        proc = self.nodes[node].proc
        if proc is not None:
            for pid in descendants(proc.pid):
                self.procs.remember(pid)

    # -- status -------------------------------------------------------------------------

    def status_all(self, node: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        reply = control_request(
            f"uds://{self.nodes[node].control}", ControlRequest.status(), timeout=timeout
        )
        return [st.to_json() for st in reply.statuses]

    def status(self, node: str, resource: str) -> dict[str, Any]:
        reply = control_request(
            f"uds://{self.nodes[node].control}", ControlRequest.status([resource]), timeout=10
        )
        (st,) = reply.statuses
        doc = st.to_json()
        if doc["error"]:
            raise RuntimeError(f"status of {resource} on {node}: error {doc['error']}")
        return doc

    def wait_status(
        self,
        node: str,
        resource: str,
        predicate: Callable[[dict[str, Any]], object],
        timeout: float,
        what: str,
        interval: float = 0.05,
    ) -> dict[str, Any]:
        last: list[dict[str, Any]] = []

        def check() -> dict[str, Any] | None:
            st = self.status(node, resource)
            last[:] = [st]
            return st if predicate(st) else None

        try:
            found: dict[str, Any] = wait_until(check, timeout, f"{what} of {resource}", interval)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last status: {last[0] if last else None}") from None
        return found

    def nbd_uri(self, resource: str, timeout: float = 30.0) -> str:
        st = self.wait_status("nodea", resource, lambda s: s["nbd_uri"], timeout, "an nbd_uri")
        return str(st["nbd_uri"])

    def worker_pid(self, node: str, resource: str) -> int:
        pid = int(self.status(node, resource)["workerpid"] or 0)
        if pid:
            self.procs.remember(pid)
        return pid

    def wait_synced(self, resource: str, timeout: float) -> dict[str, Any]:
        """nodea's primary connected, nothing dirty, nothing syncing, queues empty."""
        return self.wait_status(
            "nodea",
            resource,
            lambda st: (
                st["status"] == "complete"
                and st["dirty"] == 0
                and not st["sync_left"]
                and not st["send_queue_size"]
                and not st["recv_queue_size"]
            ),
            timeout,
            "in sync",
        )

    def log_tap(self, node: str) -> Any:
        proc = self.nodes[node].proc
        assert proc is not None and proc.tap is not None
        return proc.tap


def settle(seconds: float) -> None:
    """A short pause between phases (lets writeback and the other CPU calm down)."""
    time.sleep(seconds)
