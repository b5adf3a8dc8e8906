"""The randomized fault driver: a seed, a scenario, a run, a verdict (issue 5, item 4).

Every run is decided by one integer seed.  :func:`generate` turns the seed
into a :class:`Scenario`: the replication mode, wire checksum and
compression, device and extent size, the workload's shape, and a sequence
of 2 to 6 fault steps drawn from :data:`KINDS`:

=========================  ====================================================
``kill_primary_worker``    SIGKILL the primary's worker (hastd restarts it)
``kill_secondary_worker``  SIGKILL the secondary's worker (the primary reconnects)
``kill_primary_hastd``     SIGKILL the primary's hastd and its workers, restart it
``kill_secondary_hastd``   SIGKILL the secondary's hastd and its workers, restart it
``restart_primary``        SIGTERM the primary's hastd, start it, role primary
``restart_secondary``      SIGTERM the secondary's hastd, start it, role secondary
``link_delay``             latency on the replication link (one or both directions)
``link_drop``              black hole (the connections stay open)
``link_stall``             no byte moves (TCP back-pressure) until healed
``link_cut``               half-close one direction
``link_reset``             RST every replication connection
``link_truncate``          cut strictly inside the next frame of one direction
``link_partition``         RST and refuse connections until healed
``disk_secondary_eio``     EIO on some of the secondary's data writes
``disk_secondary_slow``    slow writes on the secondary
``disk_primary_eio``       EIO on some of the primary's local data writes
``disk_primary_torn``      torn (ENOSPC, half-written) local writes on the primary
``disk_primary_read_eio``  EIO on the primary's local reads
``failover``               kill -9 the primary's hastd with writes in flight, promote
                           the secondary, check the device at once, bring the old
                           primary back as secondary
``failback``               graceful switch of roles (writes in flight unless async)
``sighup``                 edit a reloadable setting and SIGHUP one or both hastd
                           while writing
=========================  ====================================================

The run: a two-node :class:`~tests.helpers.cluster.Cluster` whose nodes reach
each other only through two :class:`~tests.helpers.faultproxy.FaultProxy`
instances (one per direction of the primary role, so failover keeps link
faults possible), with ``PYHAST_FAULTS`` control files for both nodes.  A
:class:`Writer` thread runs the acknowledged-write workload of
:mod:`tests.helpers.ackcheck` (versioned blocks, ``depth`` writes in flight,
periodic flushes, plus reads that must never go back in time) against the
current primary, reconnecting when its connection is lost; one
:class:`~tests.helpers.ackcheck.Journal` spans every connection.

Checks, counted in the :class:`RunResult`:

* at every role change (failover, failback) the whole device is read on the
  new primary before anything else is written and judged against the
  journal; async may lose the writes acknowledged in the last
  :data:`ASYNC_WINDOW` seconds before a failover (at most
  :data:`ASYNC_POOL`), anything else is a *lost acknowledged write*;
* every read returns a version at least as new as the newest one
  acknowledged when the read was issued (a *stale read* otherwise);
* at the end every fault is healed, the pair must reach 'in sync', the
  device is judged once more and both providers' data areas must be equal
  block for block (*divergent blocks* otherwise);
* liveness: after every step the workload must make progress again, and
  the pair must become healthy when the scenario waits for it;
* the hastd logs must hold no Python traceback and no split-brain (and,
  once its bug is fixed, no "Unable to create device").

Open product bugs the driver found are listed in :data:`KNOWN_BUGS` (each
with its strict-xfail regression test); while there are any, and unless
``--include-known-bugs``, the runs steer clear of them, so that a red run
means something new.  None is open now: every run draws every fault freely.

Replay: ``python -m tests.fault.driver --runs 1 --seed SEED [--profile long]``
runs exactly the scenario of SEED again (the faults and their order are the
same; the timing is real time, so the interleaving may differ).

CLI::

    python -m tests.fault.driver --runs N --seed S --out results.json
        [--profile ci|long] [--time-budget SECONDS] [--artifacts DIR] [-v]

Run ``i`` uses seed ``S + i``.  The results file holds the counts: runs,
faults by kind, modes, acknowledged writes checked, lost, divergent blocks
and the rest, and one entry per run.  A failed run's logs, scenario, event
timeline and journal are kept under ``--artifacts``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyhast.cli.control_client import request as control_request
from pyhast.disk.faults import FAULTS_ENV, write_rules
from pyhast.enums import Role
from pyhast.wire.control import ControlRequest
from tests.helpers import nbd
from tests.helpers.ackcheck import (
    CORRUPT,
    ZERO,
    CheckReport,
    Journal,
    NBDClient,
    NBDDisconnected,
    NBDError,
    Workload,
    check,
    decode_block,
    read_image,
)
from tests.helpers.cluster import NODE_IPS, Cluster
from tests.helpers.faultproxy import FaultProxy

__all__ = [
    "KINDS",
    "MODES",
    "FaultCluster",
    "RunResult",
    "Runner",
    "Scenario",
    "Step",
    "Writer",
    "aggregate",
    "generate",
    "main",
    "replay_command",
    "run_scenario",
]

MiB = 1024 * 1024
KiB = 1024
BS = 4096
RESOURCE = "r0"

KINDS: tuple[str, ...] = (
    "kill_primary_worker",
    "kill_secondary_worker",
    "kill_primary_hastd",
    "kill_secondary_hastd",
    "restart_primary",
    "restart_secondary",
    "link_delay",
    "link_drop",
    "link_stall",
    "link_cut",
    "link_reset",
    "link_truncate",
    "link_partition",
    "disk_secondary_eio",
    "disk_secondary_slow",
    "disk_primary_eio",
    "disk_primary_torn",
    "disk_primary_read_eio",
    "failover",
    "failback",
    "sighup",
)
MODES: tuple[str, ...] = ("memsync", "fullsync", "async")
PROFILES: tuple[str, ...] = ("ci", "long")

#: Seconds of acknowledgements async may lose in a failover (the link is
#: healthy and in sync when the primary is killed: only the tail in flight).
ASYNC_WINDOW = 2.0
#: ... and never more writes than FreeBSD's request pool (spec 7).
ASYNC_POOL = 256
#: The resource's ``timeout`` (seconds without a reply before degrading).
LINK_TIMEOUT = 2
#: Where each node's outgoing replication connections enter their proxy.
PROXY_IPS = {"nodea": "127.0.0.5", "nodeb": "127.0.0.6"}

#: Open product bugs this driver found (tests/fault/test_regressions.py has a strict
#: xfail for each).  Unless ``--include-known-bugs``, the runs stay clear of them:
#: a local write fault on the primary starts on a healthy pair (connected,
#: secondary up to date), never outlasts its step, and the pair is healthy again
#: (its extents repaired from the secondary) before the next step, so that no
#: extent is locally stale while the secondary is away; and "Unable to create
#: device" in a log is counted (``device_errors``) but not held against the run.
#: Every kind of fault is still drawn and run.
KNOWN_BUGS: dict[str, str] = {}
#: Found by this driver and fixed since (their regression tests pass).
FIXED_BUGS: dict[str, str] = {
    "a write acknowledged while degraded into a locally stale extent is lost at resync": (
        "tests/fault/test_regressions.py::"
        "test_regression_write_while_degraded_to_a_locally_stale_extent_is_not_lost"
    ),
    "a restarted primary worker does not recreate its device file": (
        "tests/fault/test_regressions.py::"
        "test_regression_restarted_primary_worker_recreates_its_device"
    ),
    "a local read error was served from a stale secondary": (
        "tests/fault/test_regressions.py::"
        "test_regression_local_read_error_is_not_served_from_a_stale_secondary"
    ),
    "an acknowledged write was lost when the primary restarted after a local write error": (
        "tests/fault/test_regressions.py::"
        "test_regression_acknowledged_write_survives_primary_restart_after_local_write_error"
    ),
    "a failed local write while degraded left its extent dirty forever": (
        "tests/fault/test_regressions.py::"
        "test_regression_failed_local_write_while_degraded_does_not_leave_its_extent_dirty"
    ),
    "a locally stale extent copied back whole lost a write the secondary had missed": (
        "tests/fault/test_regressions.py::"
        "test_regression_stale_extent_copied_back_whole_loses_a_write_the_secondary_missed"
    ),
    "an extent marked while a synchronisation was completing was never synchronised": (
        "replay: python -m tests.fault.driver --runs 1 --seed 15 --profile long"
        " (a race: no deterministic test)"
    ),
}
PRIMARY_WRITE_FAULTS = frozenset({"disk_primary_eio", "disk_primary_torn"})
DEVICE_ERROR = "Unable to create device"

#: Bounds of every wait (seconds).
HEALTH_TIMEOUT = 45.0
PROGRESS_TIMEOUT = 30.0
ROLE_TIMEOUT = 60.0


def other(node: str) -> str:
    return "nodeb" if node == "nodea" else "nodea"


# --------------------------------------------------------------------------
# Scenarios


@dataclass
class Step:
    """One fault: its kind, its parameters, how long it is held (seconds)."""

    kind: str
    hold: float
    params: dict[str, Any] = field(default_factory=dict)
    #: wait until the pair is healthy again before the next step
    settle: bool = True

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.kind}({extra}) hold {self.hold:.2f} s{'' if self.settle else ', no settle'}"


@dataclass
class Scenario:
    seed: int
    profile: str
    mode: str
    checksum: str
    compression: str
    size_mib: int
    extentsize: int
    keepdirty: int
    nblocks: int
    depth: int
    read_interval: float
    warmup_writes: int
    steps: list[Step]

    def describe(self) -> str:
        head = (
            f"seed {self.seed} ({self.profile}): {self.mode}, checksum {self.checksum}, "
            f"compression {self.compression}, {self.size_mib} MiB, extent "
            f"{self.extentsize // KiB} KiB, keepdirty {self.keepdirty}, {self.nblocks} blocks, "
            f"depth {self.depth}"
        )
        return "\n".join([head, *(f"  {i + 1}. {s.describe()}" for i, s in enumerate(self.steps))])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _step_params(kind: str, rng: random.Random, mode: str) -> dict[str, Any]:
    direction = rng.choice(["up", "down", "both"])
    if kind == "link_delay":
        return {"delay": round(rng.uniform(0.005, 0.15), 3), "direction": direction}
    if kind in ("link_drop", "link_stall"):
        return {"direction": direction}
    if kind == "link_cut":
        return {"direction": rng.choice(["up", "down"])}
    if kind == "link_truncate":
        return {
            "direction": rng.choice(["up", "down"]),
            "keep": rng.choice([1, 3, 5, 17, 100, 300]),
        }
    if kind.startswith("disk_"):
        params: dict[str, Any] = {
            "start": round(rng.uniform(0.0, 0.8), 3),
            "span": rng.choice([0.05, 0.2, 0.5, 1.0]),
            # None: a bad region, every call in it fails until the rule is cleared
            "count": rng.choice([1, 3, 10, 50, None]),
            # the rule stays in force through the next step too
            "linger": rng.random() < 0.3,
        }
        if kind == "disk_secondary_slow":
            params["delay_ms"] = rng.choice([2, 10, 40])
            params["rate"] = rng.choice([0.2, 0.5, 1.0])
            params["count"] = rng.choice([20, 100, 300])
        elif kind == "disk_primary_torn":
            params["count"] = rng.choice([1, 2, 5, None])
        else:
            params["rate"] = rng.choice([0.05, 0.2, 0.5, 1.0])
        return params
    if kind == "sighup":
        changes = ["none", "checksum", "compression", "timeout", "metaflush"]
        if mode != "async":
            changes.append("replication")
        return {
            "nodes": rng.choice(["primary", "secondary", "both"]),
            "change": rng.choice(changes),
        }
    if kind == "failback":
        return {"inflight": mode != "async" and rng.random() < 0.6}
    return {}


def generate(seed: int, profile: str = "ci") -> Scenario:
    """The scenario of ``seed``: everything but the timing is decided here."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}")
    rng = random.Random(seed)
    ci = profile == "ci"
    mode = rng.choice(MODES)
    size_mib = rng.choice([16, 24, 32])
    depth = rng.choice([4, 8, 16, 32])
    nblocks = rng.choice([256, 1024, 2048])
    sc = Scenario(
        seed=seed,
        profile=profile,
        mode=mode,
        checksum=rng.choice(["none", "crc32", "sha256"]),
        compression=rng.choice(["none", "hole", "lzf"]),
        size_mib=size_mib,
        extentsize=rng.choice([64, 128, 256, 1024]) * KiB,
        keepdirty=rng.choice([2, 8, 64]),
        nblocks=nblocks,
        depth=depth,
        read_interval=rng.choice([0.005, 0.02, 0.05]),
        warmup_writes=rng.choice([50, 200]),
        steps=[],
    )
    nsteps = rng.randint(2, 3) if ci else rng.randint(3, 6)
    max_hold = 1.0 if ci else 2.5
    primary = "nodea"
    for _ in range(nsteps):
        kinds = [k for k in KINDS if k != "failback" or primary == "nodeb"]
        kind = rng.choice(kinds)
        hold = round(rng.uniform(0.2, max_hold), 2)
        if kind in ("link_drop", "link_stall") and not ci and rng.random() < 0.3:
            hold = round(LINK_TIMEOUT + rng.uniform(0.5, 2.0), 2)  # degrade by timeout
        step = Step(kind, hold, _step_params(kind, rng, mode), settle=rng.random() < 0.6)
        if kind in ("failover", "failback"):
            primary = other(primary)
        sc.steps.append(step)
    if primary == "nodeb" and rng.random() < 0.5:
        sc.steps.append(
            Step(
                "failback",
                round(rng.uniform(0.2, max_hold), 2),
                _step_params("failback", rng, mode),
            )
        )
    return sc


def replay_command(seed: int, profile: str = "ci", include_known_bugs: bool = False) -> str:
    extra = "" if profile == "ci" else f" --profile {profile}"
    if include_known_bugs:
        extra += " --include-known-bugs"
    return f"python -m tests.fault.driver --runs 1 --seed {seed}{extra} --out /tmp/replay.json -v"


# --------------------------------------------------------------------------
# The workload thread


@dataclass
class ReadStats:
    checked: int = 0
    errors: int = 0
    stale: int = 0
    corrupt: int = 0
    #: torn data read from a block whose latest write was not acknowledged
    #: (allowed when the run simulates a disk that tears writes)
    torn_unacked: int = 0
    details: list[str] = field(default_factory=list)


class Writer:
    """The versioned-block workload against whatever the current primary is.

    One journal spans every connection.  :meth:`set_target` names the NBD
    URI to use (None: do not connect); a lost connection is re-opened to the
    target as long as there is one.  :meth:`pause` stops writing (every
    answer awaited) and leaves it idle; :meth:`wait_idle` waits until no
    connection is open.  Reads of random blocks run beside the writes: a
    read must return a version at least as new as the newest acknowledged
    when it was issued.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        depth: int,
        seed: int,
        read_interval: float,
        flush_interval: float = 0.2,
        allow_torn: bool = False,
    ) -> None:
        self.journal = journal
        self.allow_torn = allow_torn
        self.depth = depth
        self.rng = random.Random(seed)
        self.read_interval = read_interval
        self.flush_interval = flush_interval
        self.reads = ReadStats()
        self.connections = 0
        self.lost_connections = 0
        self.connect_failures = 0
        self.errors: list[str] = []
        self._target: str | None = None
        self._closing = False
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workload: Workload | None = None
        self._lock = threading.Lock()

    # -- control, from the driver's thread ------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="fault-writer", daemon=True
        )
        self._thread.start()

    def set_target(self, uri: str | None) -> None:
        with self._lock:
            self._target = uri

    @property
    def acked(self) -> int:
        return self.journal.acked

    def _stop_workload(self) -> None:
        loop, wl = self._loop, self._workload
        if loop is not None and wl is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wl.stop)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until the writer has no connection (call after set_target(None))."""
        if not self._idle.wait(timeout):
            raise AssertionError(f"the writer still has a connection after {timeout} s")

    def pause(self, timeout: float = 60.0) -> None:
        """Stop writing, await every answer, stay idle until the next target."""
        with self._lock:
            self._target = None
            self._idle.clear()
        self._stop_workload()
        self.wait_idle(timeout)

    def wait_progress(self, count: int, timeout: float) -> None:
        """Poll until ``count`` more writes were acknowledged."""
        goal = self.acked + count
        deadline = time.monotonic() + timeout
        while self.acked < goal:
            if self._thread is None or not self._thread.is_alive():
                raise AssertionError(f"the writer thread died: {self.errors}")
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no progress: {self.acked} acknowledged writes, {goal} expected within "
                    f"{timeout:.0f} s (target {self._target})"
                )
            time.sleep(0.02)

    def close(self, timeout: float = 60.0) -> None:
        with self._lock:
            self._closing = True
            self._target = None
        self._stop_workload()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError(f"the writer thread did not end within {timeout} s")

    # -- the thread ------------------------------------------------------------

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._closing:
                    self._idle.set()
                    return
                uri = self._target
                if uri is None:
                    self._idle.set()
            if uri is None:
                await asyncio.sleep(0.01)
                continue
            try:
                client = await NBDClient.connect(uri, timeout=5.0)
            except Exception:
                self.connect_failures += 1
                await asyncio.sleep(0.05)
                continue
            with self._lock:
                if self._target != uri:
                    client.abort()
                    continue
                self._idle.clear()
            await self._session(client)

    async def _session(self, client: NBDClient) -> None:
        j = self.journal
        self.connections += 1
        wl = Workload(
            client,
            nblocks=j.nblocks,
            bs=j.bs,
            base=j.base,
            depth=self.depth,
            flush_interval=self.flush_interval,
            seed=self.rng.getrandbits(32),
            run=j.run,
        )
        wl.journal = j  # one journal across connections
        j.end = ""
        self._workload = wl
        reader = asyncio.get_running_loop().create_task(self._reads(client))
        try:
            await wl.run()
        except Exception as exc:
            self.errors.append(f"workload: {exc!r}")
        finally:
            self._workload = None
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if client.lost is None:
                with contextlib.suppress(Exception):
                    await client.close(timeout=10)
            else:
                client.abort()
        if j.end == "connection lost":
            self.lost_connections += 1

    async def _reads(self, client: NBDClient) -> None:
        if self.read_interval <= 0:
            return
        j = self.journal
        rng = random.Random(self.rng.getrandbits(32))
        rs = self.reads
        while True:
            await asyncio.sleep(self.read_interval)
            i = rng.randrange(j.nblocks)
            st = j.blocks.get(i)
            floor = st.acked if st is not None else 0
            try:
                data = await client.read(j.offset(i), j.bs)
            except NBDDisconnected:
                return
            except NBDError:
                rs.errors += 1
                continue
            rs.checked += 1
            found = decode_block(data, j.run, i)
            st = j.blocks.get(i)
            if found == CORRUPT and self.allow_torn and st is not None and st.issued > st.acked:
                rs.torn_unacked += 1
                continue
            if found == CORRUPT:
                rs.corrupt += 1
                if len(rs.details) < 20:
                    rs.details.append(f"read of block {i}: corrupt data")
                continue
            version = 0 if found == ZERO else int(found)
            known = {0}
            if st is not None:
                known |= {v for v, _ in st.acks} | st.unresolved
            if version < floor or version not in known:
                rs.stale += 1
                if len(rs.details) < 20:
                    rs.details.append(
                        f"read of block {i}: version {version}, but v{floor} was acknowledged "
                        f"before the read (known {sorted(known)[-4:]})"
                    )


# --------------------------------------------------------------------------
# The cluster behind two fault proxies


class FaultCluster(Cluster):
    """A :class:`Cluster` whose nodes meet only through fault proxies, with disk faults.

    ``proxy[node]`` carries the connections ``node`` opens as primary: it
    listens on PROXY_IPS[node] and connects to the peer from PROXY_IPS of the
    peer, which is the peer's configured ``remote`` (the secondary admits
    only that IP).  Both hastd get ``PYHAST_FAULTS=<tmp>/faults-<node>.json``.
    """

    def __init__(self, tmp: Path, **kwargs: Any) -> None:
        self.remote_urls: dict[str, str] = {}
        self.fault_files = {n: tmp / f"faults-{n}.json" for n in NODE_IPS}
        self.proxy: dict[str, FaultProxy] = {}
        super().__init__(tmp, **kwargs)

    def start_proxies(self) -> None:
        for node in NODE_IPS:
            peer = self.nodes[other(node)]
            px = FaultProxy(
                (peer.ip, peer.port), listen=(PROXY_IPS[node], 0), source=PROXY_IPS[other(node)]
            ).start()
            self.proxy[node] = px
            self.remote_urls[node] = px.url
        for path in self.fault_files.values():
            write_rules(path, [])
        self.write_config()

    def env(self, node: str) -> dict[str, str]:
        env = super().env(node)
        env[FAULTS_ENV] = str(self.fault_files[node])
        return env

    def config_text(self, resources: Sequence[str] | None = None) -> str:
        text = super().config_text(resources)
        for node, url in self.remote_urls.items():
            direct = f"remote {self.nodes[other(node)].listen}"
            assert text.count(direct) == len(self.resources), text
            text = text.replace(direct, f"remote {url}")
        return text

    def running(self, node: str) -> bool:
        proc = self.nodes[node].proc
        return proc is not None and proc.poll() is None

    def close_proxies(self) -> None:
        for px in self.proxy.values():
            with contextlib.suppress(Exception):
                px.close()


# --------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    seed: int
    profile: str
    mode: str
    faults: list[str]
    ok: bool = False
    error: str | None = None
    duration: float = 0.0
    writes_issued: int = 0
    acked_writes: int = 0
    #: acknowledged writes judged by the final check
    acked_checked: int = 0
    write_errors: int = 0
    lost: int = 0
    lost_blocks: int = 0
    lost_in_window: int = 0
    window_needed: float = 0.0
    corrupt_blocks: int = 0
    divergent_blocks: int = 0
    reads_checked: int = 0
    read_errors: int = 0
    stale_reads: int = 0
    corrupt_reads: int = 0
    #: blocks (final checks) and reads (during the run) holding torn data of a
    #: write that was never acknowledged: allowed with simulated torn writes
    torn_unacked_blocks: int = 0
    torn_unacked_reads: int = 0
    transitions_checked: int = 0
    connections: int = 0
    tracebacks: int = 0
    splitbrains: int = 0
    #: "Unable to create device" in the logs (a known bug while KNOWN_BUGS lists it)
    device_errors: int = 0
    known_bugs_avoided: bool = True
    details: list[str] = field(default_factory=list)
    artifacts: str | None = None

    def verdict(self) -> list[str]:
        """What is wrong with this run (empty: it passed)."""
        bad = []
        if self.error:
            bad.append(f"error: {self.error}")
        for name in (
            "lost",
            "corrupt_blocks",
            "divergent_blocks",
            "stale_reads",
            "corrupt_reads",
            "tracebacks",
            "splitbrains",
        ):
            if getattr(self, name):
                bad.append(f"{name}: {getattr(self, name)}")
        if self.device_errors and not self.known_bugs_avoided:
            bad.append(f"device_errors: {self.device_errors}")
        if self.lost_in_window > ASYNC_POOL:
            bad.append(f"lost_in_window: {self.lost_in_window} > {ASYNC_POOL}")
        return bad

    def summary(self) -> str:
        state = "ok" if self.ok else "FAILED"
        return (
            f"seed {self.seed} {state} in {self.duration:.1f} s: {self.mode}, "
            f"{' '.join(self.faults)}; {self.acked_checked} acknowledged writes checked, "
            f"{self.lost} lost ({self.lost_in_window} in the async window), "
            f"{self.divergent_blocks} divergent blocks, {self.stale_reads} stale of "
            f"{self.reads_checked} reads, {self.transitions_checked} role changes checked"
        )


class RunError(AssertionError):
    """The run could not go on (a step failed, a wait timed out)."""


class Runner:
    """Executes one :class:`Scenario` in ``workdir``."""

    def __init__(
        self,
        sc: Scenario,
        workdir: Path,
        *,
        verbose: bool = False,
        include_known_bugs: bool = False,
    ) -> None:
        self.sc = sc
        # Steer clear of open bugs only while there are some (none are open now).
        self.avoid = bool(KNOWN_BUGS) and not include_known_bugs
        #: cleanups of faults that outlast their step (run after the next one)
        self.lingering: list[Callable[[], None]] = []
        #: the previous step's lingering faults, while the current step runs
        self.pending: list[Callable[[], None]] = []
        self.workdir = workdir
        self.verbose = verbose
        self.result = RunResult(sc.seed, sc.profile, sc.mode, [s.kind for s in sc.steps])
        self.result.known_bugs_avoided = self.avoid
        self.events: list[str] = []
        self.t0 = time.monotonic()
        self.cl: FaultCluster | None = None
        self.writer: Writer | None = None
        self.journal: Journal | None = None
        self.primary = "nodea"
        self.secondary = "nodeb"
        self.options = {
            "replication": sc.mode,
            "checksum": sc.checksum,
            "compression": sc.compression,
            "timeout": str(LINK_TIMEOUT),
            "metaflush": "on",
        }
        self.localoff = 0
        self.datasize = 0
        self.uris: dict[str, str] = {}
        self.rng = random.Random(sc.seed ^ 0x5EED)

    # -- bookkeeping -------------------------------------------------------------

    def event(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:7.2f} {text}"
        self.events.append(line)
        if self.verbose:
            print(f"  [{self.sc.seed}] {line}", flush=True)

    @property
    def c(self) -> FaultCluster:
        assert self.cl is not None
        return self.cl

    @property
    def w(self) -> Writer:
        assert self.writer is not None
        return self.writer

    @property
    def j(self) -> Journal:
        assert self.journal is not None
        return self.journal

    # -- cluster operations ---------------------------------------------------------

    def resource_options(self) -> list[str]:
        return [f"{k} {v}" for k, v in self.options.items()]

    def role(self, node: str, role: str) -> None:
        self.event(f"role {role} on {node}")
        reply = control_request(
            f"uds://{self.c.nodes[node].control}",
            ControlRequest.set_role(Role.from_label(role), [RESOURCE]),
            timeout=ROLE_TIMEOUT,
        )
        if reply.error or reply.first_error:
            raise RunError(f"role {role} on {node} refused: {reply}")

    def status(self, node: str) -> dict[str, Any] | None:
        if not self.c.running(node):
            return None
        try:
            return self.c.status(node, RESOURCE)
        except Exception:
            return None

    def poll(
        self, predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                last = {n: self.brief_status(n) for n in NODE_IPS}
                raise RunError(f"timed out after {timeout:.0f} s waiting for {what}; {last}")
            time.sleep(interval)

    def brief_status(self, node: str) -> dict[str, Any] | None:
        st = self.status(node)
        keys = (
            "role",
            "status",
            "dirty",
            "sync_left",
            "syncsrc",
            "send_queue_size",
            "recv_queue_size",
            "localcnt",
            "remotecnt",
            "workerpid",
        )
        return None if st is None else {k: st.get(k) for k in keys}

    def start(self, node: str) -> None:
        self.event(f"start hastd {node}")
        self.c.start(node)

    def parallel(self, func: Callable[[str], object]) -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for fut in [pool.submit(func, n) for n in NODE_IPS]:
                fut.result()

    def worker_pid(self, node: str, timeout: float = 20.0) -> int:
        found: list[int] = []

        def has_worker() -> bool:
            st = self.status(node)
            if st is not None and st.get("workerpid"):
                found.append(int(st["workerpid"]))
                return True
            return False

        self.poll(has_worker, timeout, f"a worker on {node}")
        return found[-1]

    def wait_serving(self, node: str, timeout: float = 30.0, not_pid: int = 0) -> str:
        """Wait until ``node``'s primary worker (not ``not_pid``) serves; its NBD URI."""
        uri: list[str] = []

        def serving() -> bool:
            st = self.status(node)
            if st is None or st.get("role") != "primary" or not st.get("nbd_uri"):
                return False
            if not_pid and st.get("workerpid") == not_pid:
                return False
            uri.append(str(st["nbd_uri"]))
            return True

        self.poll(serving, timeout, f"the primary worker of {node} to serve")
        self.uris[node] = uri[-1]
        return uri[-1]

    def healthy(self) -> bool:
        st = self.status(self.primary)
        return bool(
            st is not None
            and st.get("role") == "primary"
            and st.get("status") == "complete"
            and not st.get("sync_left")
            and st.get("syncsrc") == "undef"
        )

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        """Connected, and the synchronisation of this session finished (twice in a row)."""
        streak = [0]

        def twice() -> bool:
            streak[0] = streak[0] + 1 if self.healthy() else 0
            return streak[0] >= 2

        self.poll(twice, timeout, f"the pair to be healthy (primary {self.primary})", 0.1)

    def wait_synced(self, timeout: float = HEALTH_TIMEOUT) -> None:
        def synced() -> bool:
            st = self.status(self.primary)
            return bool(
                st is not None
                and st.get("status") == "complete"
                and st.get("syncsrc") == "undef"
                and st.get("dirty") == 0
                and not st.get("sync_left")
                and not st.get("send_queue_size")
                and not st.get("recv_queue_size")
            )

        self.poll(synced, timeout, f"the pair to be in sync (primary {self.primary})", 0.1)

    def read_device(self, uri: str) -> bytes:
        async def read() -> bytes:
            client = await NBDClient.connect(uri, timeout=10)
            try:
                return await asyncio.wait_for(read_image(client), 60)
            finally:
                await client.close()

        return asyncio.run(read())

    # -- checks ----------------------------------------------------------------------

    def judge(self, image: bytes, what: str, *, window: float, reference: float) -> CheckReport:
        rep = check(
            self.j,
            image,
            window=window,
            reference=reference,
            allow_torn_unacked="disk_primary_torn" in self.result.faults,
        )
        r = self.result
        r.torn_unacked_blocks += len(rep.torn_unacked)
        r.lost += rep.lost_acks
        r.lost_blocks += len(rep.lost)
        r.lost_in_window += rep.lost_acks_in_window
        r.window_needed = max(r.window_needed, rep.window_needed if rep.in_window else 0.0)
        r.corrupt_blocks += len(rep.corrupt)
        self.event(f"{what}: {rep.summary()}")
        if not rep.clean:
            r.details.append(f"{what}: {rep.details()}")
        return rep

    def rebase(self, rep: CheckReport) -> None:
        """After a role change, the new primary's content is the reference.

        Losses were counted (as losses, or within the async window); from now
        on a block may hold what was found, and the versions it lost may only
        come back as unacknowledged ones.
        """
        for finding in rep.lost + rep.in_window:
            st = self.j.blocks.get(finding.block)
            if st is None:
                continue
            found = 0 if finding.found == ZERO else int(finding.found)
            gone = {v for v, _ in st.acks if v > found}
            st.acks = [(v, t) for v, t in st.acks if v <= found]
            st.unresolved |= gone

    def check_transition(self, uri: str, reference: float, *, window: float) -> None:
        """The new primary's device, before anything is written to it."""
        image = self.read_device(uri)
        rep = self.judge(image, "role change", window=window, reference=reference)
        self.result.transitions_checked += 1
        self.rebase(rep)

    def divergent_blocks(self) -> int:
        a = nbd.data_area(self.c.local("nodea", RESOURCE))
        b = nbd.data_area(self.c.local("nodeb", RESOURCE))
        if len(a) != len(b):
            return max(len(a), len(b)) // BS
        count = 0
        for off in range(0, len(a), BS):
            if a[off : off + BS] != b[off : off + BS]:
                count += 1
                if count <= 5:
                    self.result.details.append(f"providers differ in block at offset {off}")
        return count

    # -- the run -----------------------------------------------------------------------

    def run(self) -> RunResult:
        r = self.result
        try:
            self.setup()
            for i, step in enumerate(self.sc.steps):
                self.pending, self.lingering = self.lingering, []
                if self.avoid and step.kind in PRIMARY_WRITE_FAULTS:
                    self.end_pending()  # known bug: start connected, secondary up to date
                    self.wait_healthy()
                self.event(f"step {i + 1}: {step.describe()} (primary {self.primary})")
                getattr(self, f"do_{step.kind}")(step)
                self.end_pending()
                self.w.wait_progress(10, PROGRESS_TIMEOUT)
                settle = step.settle or (self.avoid and step.kind in PRIMARY_WRITE_FAULTS)
                if settle and not self.lingering:  # a lingering bad region keeps it dirty
                    self.wait_healthy()
            self.pending, self.lingering = self.lingering, []
            self.end_pending()
            self.finish()
        except Exception as exc:
            r.error = f"{type(exc).__name__}: {exc}"
            r.details.append(traceback.format_exc())
            self.event(f"ERROR {r.error}")
        finally:
            self.teardown()
        r.duration = time.monotonic() - self.t0
        r.ok = not r.verdict()
        return r

    def end_pending(self) -> None:
        """End the faults the previous step left in force."""
        pending, self.pending = self.pending, []
        for cleanup in pending:
            cleanup()

    def setup(self) -> None:
        sc = self.sc
        self.cl = FaultCluster(
            self.workdir,
            size=sc.size_mib * MiB,
            resource_options={RESOURCE: self.resource_options()},
            reconnect_interval=0.3,
        )
        self.c.start_proxies()
        create = ("-e", str(sc.extentsize), "-k", str(sc.keepdirty), RESOURCE)

        def do_create(node: str) -> None:
            res = self.c.hastctl(node, "create", *create)
            if res.returncode != 0:
                raise RunError(f"hastctl create on {node} failed: {res.stderr}")

        self.parallel(do_create)
        self.parallel(self.start)
        self.role("nodeb", "secondary")
        self.role("nodea", "primary")
        uri = self.wait_serving("nodea")
        self.wait_healthy()
        md = nbd.read_metadata(self.c.local("nodea", RESOURCE))
        self.localoff, self.datasize = md.localoff, md.datasize
        nblocks = min(sc.nblocks, md.datasize // BS)
        self.journal = Journal(
            run=random.Random(sc.seed).getrandbits(63) or 1, bs=BS, base=0, nblocks=nblocks
        )
        self.writer = Writer(
            self.j,
            depth=sc.depth,
            seed=sc.seed,
            read_interval=sc.read_interval,
            allow_torn="disk_primary_torn" in self.result.faults,
        )
        self.w.set_target(uri)
        self.w.start()
        self.w.wait_progress(sc.warmup_writes, PROGRESS_TIMEOUT)
        self.event(f"warm: {self.w.acked} acknowledged writes")

    def finish(self) -> None:
        c, r = self.c, self.result
        self.event("finish: pause the writer, heal everything")
        self.w.pause()
        for px in c.proxy.values():
            px.heal()
        for path in c.fault_files.values():
            write_rules(path, [])
        for node, role in ((self.secondary, "secondary"), (self.primary, "primary")):
            if not c.running(node):
                self.start(node)
                self.role(node, role)
        self.wait_serving(self.primary)
        self.wait_synced()
        image = self.read_device(self.uris[self.primary])
        rep = self.judge(image, "final", window=0.0, reference=time.monotonic())
        r.acked_checked = rep.acked_writes
        r.divergent_blocks = self.divergent_blocks()
        self.event(f"final: {r.divergent_blocks} divergent blocks")

    def teardown(self) -> None:
        r = self.result
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            w = self.writer
            r.reads_checked = w.reads.checked
            r.read_errors = w.reads.errors
            r.stale_reads = w.reads.stale
            r.corrupt_reads = w.reads.corrupt
            r.torn_unacked_reads = w.reads.torn_unacked
            r.details += w.reads.details
            r.details += w.errors
            r.connections = w.connections
        if self.journal is not None:
            r.writes_issued = self.j.issued
            r.acked_writes = self.j.acked
            r.write_errors = self.j.failed
        if self.cl is not None:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    self.cl.close()
                finally:
                    self.cl.close_proxies()
            for node in NODE_IPS:
                text = self.cl.log(node)
                r.tracebacks += text.count("Traceback (most recent call last)")
                r.splitbrains += text.count("Split-brain")
                r.device_errors += text.count(DEVICE_ERROR)
            (self.workdir / "teardown.log").write_text(out.getvalue())
        (self.workdir / "events.log").write_text("\n".join(self.events) + "\n")
        (self.workdir / "scenario.json").write_text(json.dumps(self.sc.to_json(), indent=1))
        if self.journal is not None:
            (self.workdir / "journal.json").write_text(json.dumps(self.j.to_json()))

    # -- holding a fault ------------------------------------------------------------------

    def hold(self, step: Step) -> None:
        """Keep the fault for the step's duration while the workload runs (a
        deliberate interval, not a wait for a condition)."""
        time.sleep(step.hold)

    # -- process faults -------------------------------------------------------------------

    def do_kill_primary_worker(self, step: Step) -> None:
        p = self.primary
        pid = self.worker_pid(p)
        self.event(f"SIGKILL primary worker {pid} on {p}")
        os.kill(pid, signal.SIGKILL)
        self.hold(step)
        self.wait_serving(p, not_pid=pid)

    def do_kill_secondary_worker(self, step: Step) -> None:
        s = self.secondary
        pid = self.worker_pid(s)
        self.event(f"SIGKILL secondary worker {pid} on {s}")
        os.kill(pid, signal.SIGKILL)
        self.hold(step)

    def do_kill_primary_hastd(self, step: Step) -> None:
        p = self.primary
        self.event(f"SIGKILL hastd {p} and its workers")
        self.c.kill9(p)
        self.hold(step)
        self.start(p)
        self.role(p, "primary")
        self.wait_serving(p)

    def do_kill_secondary_hastd(self, step: Step) -> None:
        s = self.secondary
        self.event(f"SIGKILL hastd {s} and its workers")
        self.c.kill9(s)
        self.hold(step)
        self.start(s)
        self.role(s, "secondary")

    def do_restart_primary(self, step: Step) -> None:
        p = self.primary
        self.event(f"SIGTERM hastd {p}")
        self.c.stop(p)
        self.hold(step)
        self.start(p)
        self.role(p, "primary")
        self.wait_serving(p)

    def do_restart_secondary(self, step: Step) -> None:
        s = self.secondary
        self.event(f"SIGTERM hastd {s}")
        self.c.stop(s)
        self.hold(step)
        self.start(s)
        self.role(s, "secondary")

    # -- role changes -----------------------------------------------------------------------

    def do_failover(self, step: Step) -> None:
        p, s = self.primary, self.secondary
        self.end_pending()  # a failover needs an up-to-date secondary
        self.wait_healthy()
        self.w.set_target(None)
        failed_at = time.monotonic()
        self.event(f"failover: SIGKILL hastd {p} with {self.j.acked} acknowledged writes")
        self.c.kill9(p)
        self.w.wait_idle()
        self.role(s, "primary")
        uri = self.wait_serving(s)
        window = ASYNC_WINDOW if self.options["replication"] == "async" else 0.0
        self.check_transition(uri, failed_at, window=window)
        self.primary, self.secondary = s, p
        self.w.set_target(uri)
        self.hold(step)  # the new primary writes alone
        self.start(p)
        self.role(p, "secondary")

    def do_failback(self, step: Step) -> None:
        p, s = self.primary, self.secondary
        self.end_pending()
        self.wait_healthy()
        inflight = bool(step.params.get("inflight")) and self.options["replication"] != "async"
        if inflight:
            self.w.set_target(None)
        else:
            self.w.pause()
            self.wait_synced()
        switched_at = time.monotonic()
        self.event(f"failback: {p} -> {s} ({'writes in flight' if inflight else 'drained'})")
        self.role(p, "secondary")
        self.w.wait_idle()
        self.role(s, "primary")
        uri = self.wait_serving(s)
        self.check_transition(uri, switched_at, window=0.0)
        self.primary, self.secondary = s, p
        self.w.set_target(uri)
        self.hold(step)

    # -- configuration reload ------------------------------------------------------------------

    def do_sighup(self, step: Step) -> None:
        change = step.params["change"]
        opts = self.options
        if change == "checksum":
            opts["checksum"] = self.rng.choice(
                [x for x in ("none", "crc32", "sha256") if x != opts["checksum"]]
            )
        elif change == "compression":
            opts["compression"] = self.rng.choice(
                [x for x in ("none", "hole", "lzf") if x != opts["compression"]]
            )
        elif change == "timeout":
            opts["timeout"] = "3" if opts["timeout"] == str(LINK_TIMEOUT) else str(LINK_TIMEOUT)
        elif change == "metaflush":
            opts["metaflush"] = "off" if opts["metaflush"] == "on" else "on"
        elif change == "replication":
            opts["replication"] = "fullsync" if opts["replication"] == "memsync" else "memsync"
        self.c.resource_options[RESOURCE] = self.resource_options()
        self.c.write_config()
        who = step.params["nodes"]
        nodes = [self.primary, self.secondary] if who == "both" else [getattr(self, who)]
        marks = {}
        for node in nodes:
            marks[node] = self.c.mark(node)
            self.event(f"SIGHUP hastd {node} ({change}: {opts.get(change, '-')})")
            self.c.signal(node, signal.SIGHUP)
        self.hold(step)
        for node in nodes:
            try:
                self.c.wait_log(
                    node, "Configuration reloaded successfully.", timeout=20, since=marks[node]
                )
            except AssertionError as exc:
                raise RunError(f"hastd {node} did not reload: {exc}") from None

    # -- link faults -------------------------------------------------------------------------

    def link(self) -> FaultProxy:
        return self.c.proxy[self.primary]

    def do_link_delay(self, step: Step) -> None:
        self.link().delay(step.params["delay"], step.params["direction"])
        self.hold(step)
        self.link().heal()

    def do_link_drop(self, step: Step) -> None:
        self.link().drop(step.params["direction"])
        self.hold(step)
        self.link().heal()

    def do_link_stall(self, step: Step) -> None:
        self.link().stall(step.params["direction"])
        self.hold(step)
        self.link().heal()

    def do_link_cut(self, step: Step) -> None:
        self.link().cut(step.params["direction"])
        self.hold(step)
        self.link().heal()

    def do_link_reset(self, step: Step) -> None:
        n = self.link().reset()
        self.event(f"reset {n} connections")
        self.hold(step)

    def do_link_truncate(self, step: Step) -> None:
        fut = self.link().truncate(step.params["direction"], keep=step.params["keep"])
        try:
            at = fut.result(timeout=max(1.0, step.hold))
            self.event(f"truncated a frame at stream offset {at}")
        except TimeoutError:
            self.event("no frame to truncate")
        self.hold(step)
        self.link().heal()

    def do_link_partition(self, step: Step) -> None:
        self.link().partition()
        self.hold(step)
        self.link().heal()

    # -- disk faults ----------------------------------------------------------------------------

    def disk_rule(self, node: str, step: Step, **rule: Any) -> None:
        ps = step.params
        area = self.j.nblocks * BS  # where the workload writes
        start = int(area * ps["start"]) // BS * BS
        length = max(BS, int(area * ps["span"]) // BS * BS)
        length = min(length, area - start)
        full = {
            "op": "write",
            "path": f"{RESOURCE}-{node}.img",
            "offset": self.localoff + start,
            "length": length,
            "count": ps["count"],
            **rule,
        }
        if "rate" in ps and "rate" not in rule:
            full["rate"] = ps["rate"]
        path = self.c.fault_files[node]
        linger = bool(ps.get("linger"))
        if self.avoid and step.kind in PRIMARY_WRITE_FAULTS:
            linger = False  # known bug
        self.event(f"disk fault on {node}{' (lingers)' if linger else ''}: {full}")
        write_rules(path, [full], seed=self.sc.seed)

        def cleanup() -> None:
            self.event(f"disk fault on {node} cleared")
            write_rules(path, [])

        self.hold(step)
        if linger:
            self.lingering.append(cleanup)
        else:
            cleanup()

    def do_disk_secondary_eio(self, step: Step) -> None:
        self.disk_rule(self.secondary, step, errno="EIO")

    def do_disk_secondary_slow(self, step: Step) -> None:
        self.disk_rule(self.secondary, step, delay_ms=step.params["delay_ms"])

    def do_disk_primary_eio(self, step: Step) -> None:
        self.disk_rule(self.primary, step, errno="EIO")

    def do_disk_primary_torn(self, step: Step) -> None:
        self.disk_rule(self.primary, step, errno="ENOSPC", short=True)

    def do_disk_primary_read_eio(self, step: Step) -> None:
        self.disk_rule(self.primary, step, op="read", errno="EIO")


def run_scenario(
    sc: Scenario,
    workdir: Path | None = None,
    *,
    verbose: bool = False,
    keep: Path | None = None,
    include_known_bugs: bool = False,
) -> RunResult:
    """Run one scenario in a temporary directory; a failed run's files go to ``keep``."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix=f"fault-{sc.seed}-")) if workdir is None else workdir
    try:
        result = Runner(sc, wd, verbose=verbose, include_known_bugs=include_known_bugs).run()
        if not result.ok and keep is not None:
            dest = keep / f"run-{sc.seed}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(wd, dest, ignore=shutil.ignore_patterns("*.img"))
            result.artifacts = str(dest)
        return result
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)


# --------------------------------------------------------------------------
# Many runs


def aggregate(results: Sequence[RunResult], **meta: Any) -> dict[str, Any]:
    """The results file: counts over ``results`` plus one entry per run."""
    kinds: Counter[str] = Counter({k: 0 for k in KINDS})
    for r in results:
        kinds.update(r.faults)
    total = {
        name: sum(getattr(r, name) for r in results)
        for name in (
            "writes_issued",
            "acked_writes",
            "acked_checked",
            "write_errors",
            "lost",
            "lost_blocks",
            "lost_in_window",
            "corrupt_blocks",
            "divergent_blocks",
            "reads_checked",
            "read_errors",
            "stale_reads",
            "corrupt_reads",
            "torn_unacked_blocks",
            "torn_unacked_reads",
            "transitions_checked",
            "tracebacks",
            "splitbrains",
            "device_errors",
        )
    }
    failed = [r for r in results if not r.ok]
    return {
        **meta,
        "runs": len(results),
        "passed": len(results) - len(failed),
        "failed": len(failed),
        "failed_seeds": [r.seed for r in failed],
        "faults": sum(kinds.values()),
        "faults_by_kind": dict(sorted(kinds.items())),
        "modes": dict(sorted(Counter(r.mode for r in results).items())),
        "acknowledged_writes_checked": total["acked_checked"],
        "lost_acknowledged_writes": total["lost"],
        "divergent_blocks": total["divergent_blocks"],
        "totals": total,
        "max_async_window_needed_s": round(max((r.window_needed for r in results), default=0), 3),
        "duration_s": round(sum(r.duration for r in results), 1),
        "per_run": [
            {
                k: v
                for k, v in asdict(r).items()
                if k != "details" or not r.ok  # details only for failed runs
            }
            for r in results
        ],
    }


@contextlib.contextmanager
def _no_faults_env() -> Iterator[None]:
    """The driver's own hastctl must not inherit a PYHAST_FAULTS of the caller."""
    old = os.environ.pop(FAULTS_ENV, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[FAULTS_ENV] = old


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.fault.driver",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    p.add_argument("--profile", choices=PROFILES, default="ci")
    p.add_argument("--out", type=Path, default=Path("fault-results.json"))
    p.add_argument(
        "--time-budget", type=float, default=None, help="start no new run after this many seconds"
    )
    p.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "pyhast-fault")
    p.add_argument("--list", action="store_true", help="print the scenarios, run nothing")
    p.add_argument(
        "--include-known-bugs",
        action="store_true",
        help="do not steer clear of the open bugs in KNOWN_BUGS (runs may fail on them)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    seeds = [first + i for i in range(args.runs)]
    if args.list:
        for seed in seeds:
            print(generate(seed, args.profile).describe())
        return 0
    print(f"fault driver: {args.runs} runs from seed {first} ({args.profile})", flush=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results: list[RunResult] = []

    def write() -> dict[str, Any]:
        doc = aggregate(
            results,
            command=" ".join(["python -m tests.fault.driver", *(argv or sys.argv[1:])]),
            first_seed=first,
            runs_requested=args.runs,
            profile=args.profile,
            include_known_bugs=args.include_known_bugs,
            known_bugs=KNOWN_BUGS,
            fixed_bugs=FIXED_BUGS,
            started_at=stamp,
            wall_clock_s=round(time.monotonic() - started, 1),
        )
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc

    with _no_faults_env():
        for seed in seeds:
            if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                print(f"time budget of {args.time_budget:.0f} s spent: stopping", flush=True)
                break
            sc = generate(seed, args.profile)
            if args.verbose:
                print(sc.describe(), flush=True)
            r = run_scenario(
                sc,
                verbose=args.verbose,
                keep=args.artifacts,
                include_known_bugs=args.include_known_bugs,
            )
            results.append(r)
            print(r.summary(), flush=True)
            if not r.ok:
                for line in r.verdict():
                    print(f"  {line}")
                for line in r.details[:8]:
                    print("  " + line.rstrip().replace("\n", "\n  "))
                replay = replay_command(seed, args.profile, args.include_known_bugs)
                print(f"  artifacts: {r.artifacts}\n  replay: {replay}")
            write()
    doc = write()
    print(
        f"{doc['runs']} runs, {doc['failed']} failed {doc['failed_seeds']}; "
        f"{doc['faults']} faults {doc['faults_by_kind']}; "
        f"{doc['acknowledged_writes_checked']} acknowledged writes checked, "
        f"{doc['lost_acknowledged_writes']} lost, {doc['divergent_blocks']} divergent blocks; "
        f"results in {args.out}",
        flush=True,
    )
    return 0 if doc["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
