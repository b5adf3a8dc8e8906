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
* ``hastd -F --node X -c conf -P pidfile --rundir DIR --devdir DIR`` started
  as a real process, stdout and stderr captured to ``<tmp>/<node>.log``; each
  node has its own device directory (:meth:`Cluster.devdir`, ``<tmp>/<node>.dev``),
  so a primary's ``<devdir>/<provname>`` never touches /dev/hast (pass
  another ``--devdir`` in ``extra`` to override it);
* readiness is polled on the control socket (a status request must be
  answered), never slept for;
* :meth:`Cluster.close` stops every hastd (SIGTERM, then SIGKILL) and prints
  every log, which pytest shows for failing tests only.  Used as a context
  manager, an exception also dumps the logs to stderr.  Workers that outlive
  their hastd are killed there (and reported), and a device file left
  mounted by a killed worker (a dead FUSE mount in a node's devdir) is
  lazily unmounted.

For replication tests:

* ``resource_options`` adds lines to a resource's block (``replication
  async``, ``checksum sha256``...); ``reconnect_interval`` (default 0.5 s)
  is passed as PYHAST_RECONNECT_INTERVAL to both daemons;
* :meth:`Cluster.start_pair` creates, starts, sets roles and waits for
  'complete' on both nodes;
* :meth:`Cluster.status` asks the control socket directly (cheap enough to
  poll) and returns the ``hastctl status --json`` entry;
  :meth:`Cluster.wait_status`, :meth:`Cluster.wait_complete`,
  :meth:`Cluster.wait_synced` poll it with a deadline;
* :meth:`Cluster.kill9` SIGKILLs a node's hastd and its workers;
  :meth:`Cluster.kill_worker` signals one worker; :meth:`Cluster.worker_pids`
  lists a node's workers (from /proc);
* :meth:`Cluster.mark` + ``since=`` in :meth:`Cluster.wait_log` /
  :meth:`Cluster.wait_log_re` look only at what a node logged after a point;
* :func:`make_hook` / :func:`hook_lines`: an ``exec`` hook writing
  ``<node> <args>`` lines (hastd's environment has HAST_TEST_NODE).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

import pytest

from pyhast.cli.control_client import request as control_request
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
    #: Where the node's primaries put their device files (hastd --devdir).
    devdir: str = ""

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
        resource_options: Mapping[str, Sequence[str]] | None = None,
        reconnect_interval: float | None = 0.5,
    ) -> None:
        self.tmp = tmp
        #: Extra lines for a resource's block (``replication async``, ...).
        self.resource_options: dict[str, list[str]] = {
            k: list(v) for k, v in (resource_options or {}).items()
        }
        #: PYHAST_RECONNECT_INTERVAL for the daemons (None: the 10 s default).
        self.reconnect_interval = reconnect_interval
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
                devdir=str(tmp / f"{name}.dev"),
            )
        self.resources = list(resources)
        self.size = size
        self._all_workers: set[int] = set()
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
            lines += [f"        {opt}" for opt in self.resource_options.get(res, ())]
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

    def devdir(self, node: str) -> Path:
        """``node``'s device directory (hastd ``--devdir``)."""
        return Path(self.nodes[node].devdir)

    def device(self, node: str, resource: str) -> Path:
        """``<devdir>/<provname>`` of ``resource`` on ``node`` (the provname is the
        resource name unless ``resource_options`` set another)."""
        provname = resource
        for opt in self.resource_options.get(resource, ()):
            words = opt.split()
            if len(words) == 2 and words[0] == "name":
                provname = words[1]
        return self.devdir(node) / provname

    def hastd_argv(self, node: str, *extra: str) -> list[str]:
        n = self.nodes[node]
        given = any(a == "--devdir" or a.startswith("--devdir=") for a in extra)
        devdir = [] if given else ["--devdir", n.devdir]
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
            *devdir,
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
                env=self.env(node),
            )
        self.wait_ready(node, timeout)
        return n.proc

    def env(self, node: str) -> dict[str, str]:
        """hastd's environment (hooks inherit it: ``HAST_TEST_NODE`` names the node)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HAST_TEST_NODE": node}
        env.pop("PYHAST_RECONNECT_INTERVAL", None)
        if self.reconnect_interval is not None:
            env["PYHAST_RECONNECT_INTERVAL"] = str(self.reconnect_interval)
        return env

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
        """SIGTERM hastd (SIGKILL after ``timeout``); its exit status (None: not started).

        Workers that outlive their parent (they should not) are killed and
        reported by :meth:`close`.
        """
        proc = self.nodes[node].proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._remember_workers(node)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def worker_pids(self, node: str) -> dict[int, tuple[str, str]]:
        """The running worker processes of ``node``'s hastd: pid -> (resource, role)."""
        proc = self.nodes[node].proc
        if proc is None or proc.poll() is not None:
            return {}
        out: dict[int, tuple[str, str]] = {}
        for pid in _children(proc.pid):
            argv = _cmdline(pid)
            # A worker sets its title to "hastd: <resource> (<role>)" (which
            # replaces its command line) early in its start-up.
            m = re.fullmatch(r"hastd: (\S+) \((primary|secondary)\)", " ".join(argv))
            if m is not None:
                out[pid] = (m.group(1), m.group(2))
                continue
            if "pyhast.worker" not in argv:
                continue
            try:
                role = argv[argv.index("--role") + 1]
                resource = json.loads(argv[argv.index("--resource") + 1])["name"]
            except (ValueError, IndexError, KeyError, json.JSONDecodeError):
                continue
            out[pid] = (str(resource), role)
        return out

    def _remember_workers(self, node: str) -> None:
        for pid in self.worker_pids(node):
            self._all_workers.add(pid)

    def kill9(self, node: str, *, workers: bool = True) -> list[int]:
        """SIGKILL ``node``'s hastd and (``workers``) every worker it runs; their pids."""
        n = self.nodes[node]
        assert n.proc is not None and n.proc.poll() is None, f"hastd {node} is not running"
        pids = list(self.worker_pids(node)) if workers else []
        self._remember_workers(node)
        # Workers first, so that none sees its parent go and exits cleanly.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        n.proc.kill()
        n.proc.wait(10)
        for pid in pids:
            wait_for(_dead(pid), 10, what=f"worker {pid} to die")
        return pids

    def kill_worker(self, node: str, resource: str, signo: int | None = None) -> int:
        """Send ``signo`` (default SIGKILL) to ``resource``'s worker on ``node``; its pid."""
        pid = self.status(node, resource)["workerpid"]
        assert pid, f"{resource} has no worker on {node}"
        os.kill(pid, signal.SIGKILL if signo is None else signo)
        return int(pid)

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

    def start_pair(
        self, *resources: str, primary: str = "nodea", create_args: Sequence[str] = ()
    ) -> None:
        """The usual start: ``hastctl create [create_args]`` on both nodes, both
        hastd, the other node secondary, ``primary`` primary, then 'complete'
        on both."""
        secondary = "nodeb" if primary == "nodea" else "nodea"
        names = list(resources) or self.resources
        self.create(*create_args)
        self.start("nodea")
        self.start("nodeb")
        self.role(secondary, "secondary", *names)
        self.role(primary, "primary", *names)
        for res in names:
            self.wait_complete(primary, res)
            self.wait_complete(secondary, res)

    def role(self, node: str, role: str, *resources: str) -> None:
        """``hastctl role <role> <resources>`` (default: all); must succeed."""
        res = self.hastctl(node, "role", role, *(resources or ("all",)))
        assert res.returncode == 0, f"hastctl role {role} on {node} failed:\n{res.stderr}"

    def status(self, node: str, resource: str) -> dict[str, Any]:
        """``resource``'s status on ``node``, as ``hastctl status --json`` prints it.

        Asked on the control socket from this process (no interpreter start),
        so it is cheap enough to poll.
        """
        reply = control_request(
            f"uds://{self.nodes[node].control}", ControlRequest.status([resource]), timeout=10
        )
        assert len(reply.statuses) == 1, reply
        doc = reply.statuses[0].to_json()
        assert doc["error"] == 0, doc
        return doc

    def wait_status(
        self,
        node: str,
        resource: str,
        predicate: Callable[[dict[str, Any]], object],
        timeout: float = 30.0,
        what: str = "status",
    ) -> dict[str, Any]:
        """Poll ``resource``'s status on ``node`` until ``predicate(status)``; the status."""
        last: list[dict[str, Any]] = []

        def check() -> dict[str, Any] | None:
            st = self.status(node, resource)
            last[:] = [st]
            return st if predicate(st) else None

        try:
            return wait_for(check, timeout, what=f"{what} of {resource} on {node}")
        except AssertionError as exc:
            raise AssertionError(f"{exc} Last status: {last[0] if last else None}") from None

    def wait_complete(self, node: str, resource: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(
            node, resource, lambda st: st["status"] == "complete", timeout, "'complete'"
        )

    def wait_synced(
        self, resource: str, timeout: float = 60.0, node: str = "nodea"
    ) -> dict[str, Any]:
        """Wait until ``node``'s primary is connected, nothing dirty, nothing in flight."""
        return self.wait_status(
            node,
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

    def nbd_uri(self, node: str, resource: str) -> str:
        """Where ``node``'s primary serves ``resource`` (waits until it does)."""
        st = self.wait_status(node, resource, lambda st: st["nbd_uri"], 30, "an nbd_uri")
        return str(st["nbd_uri"])

    def local(self, node: str, resource: str) -> Path:
        return self.provider(node, resource)

    def create(self, *extra: str) -> None:
        """``hastctl create`` every resource on both nodes (``extra``: -e/-k/-m options)."""
        for node in self.nodes:
            res = self.hastctl(node, "create", *extra, *self.resources)
            assert res.returncode == 0, f"hastctl create on {node} failed:\n{res.stderr}"

    # --- logs ----------------------------------------------------------------

    def log(self, node: str) -> str:
        path = self.nodes[node].log
        return path.read_text(errors="replace") if path.exists() else ""

    def mark(self, node: str) -> int:
        """The current length of ``node``'s log (for ``since=`` below)."""
        return len(self.log(node))

    def wait_log(
        self, node: str, text: str, timeout: float = 20.0, count: int = 1, since: int = 0
    ) -> str:
        """Poll ``node``'s log (from offset ``since``) until ``text`` appears ``count``
        times; that part of the log."""
        return wait_for(
            lambda: log if (log := self.log(node)[since:]).count(text) >= count else None,
            timeout,
            what=f"{text!r} in the log of {node}",
        )

    def wait_log_re(
        self, node: str, pattern: str, timeout: float = 20.0, since: int = 0
    ) -> re.Match[str]:
        """Poll ``node``'s log (from ``since``) for the regular expression; the match."""
        rx = re.compile(pattern)
        return wait_for(
            lambda: rx.search(self.log(node)[since:]),
            timeout,
            what=f"/{pattern}/ in the log of {node}",
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
            leftovers = [pid for pid in sorted(self._all_workers) if _alive(pid)]
            for pid in leftovers:
                print(f"worker {pid} outlived its hastd: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for name in self.nodes:
                for mnt in _mounts_under(self.nodes[name].devdir):
                    print(f"device {mnt} of {name} was still mounted: lazily unmounted")
                    _lazy_umount(mnt)
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


# A script cannot see its argv[0] (the kernel hands the interpreter the
# path); each line is "<node> <argv[1:]>", the node from hastd's environment.
HOOK_SCRIPT = """#!/bin/sh
echo "$HAST_TEST_NODE $*" >> {out}
"""


def make_hook(tmp: Path) -> tuple[Path, Path]:
    """An ``exec`` hook that appends ``<node> <args>`` lines to a file: (script, file)."""
    out = tmp / "hook.out"
    script = tmp / "hook.sh"
    script.write_text(HOOK_SCRIPT.format(out=out))
    script.chmod(0o755)
    return script, out


def hook_lines(out: Path, node: str | None = None) -> list[str]:
    """The hook's lines so far (of ``node`` only, without the node name, if given)."""
    lines = out.read_text().splitlines() if out.exists() else []
    if node is None:
        return lines
    prefix = f"{node} "
    return [line[len(prefix) :] for line in lines if line.startswith(prefix)]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _mounts_under(directory: str) -> list[str]:
    """Mount points at or below ``directory`` (from /proc/self/mountinfo)."""
    if not directory:
        return []
    prefix = directory.rstrip("/") + "/"
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if mnt == directory or mnt.startswith(prefix):
                    out.append(mnt)
    except OSError:
        return []
    return out


def _lazy_umount(path: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["umount", "-l", path],
            capture_output=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )


def _dead(pid: int) -> Callable[[], bool]:
    return lambda: not _alive(pid)


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


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
