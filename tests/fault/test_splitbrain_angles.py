"""Split-brain from every angle (issue 5, item 7): always detected, never resolved silently.

Three families, on a pair whose nodes meet only through fault proxies
(:class:`tests.fault.driver.FaultCluster`) with an ``exec`` hook recording
every event:

* **both sides written while apart** -- apart by a network partition or by a
  stopped node, in every replication mode, with either node coming back as
  the primary;
* **one side restarted while apart** -- its worker killed (hastd restarts
  it) or its hastd restarted, on the old primary or on the promoted one,
  before it writes alone;
* **counters edited on disk** -- ``hastctl dump`` shows the generation
  counters; the metadata is rewritten offline (``pyhast.disk.metadata``) so
  that the secondary's decision table meets each of its cases, with every
  extent dirty and different data on the two nodes in one region.

A split-brain must be refused with "Split-brain condition!" on both nodes,
fire the ``split-brain`` hook on both, keep being refused while the primary
retries, and leave data, bitmap and counters untouched on both nodes.  The
legitimate cases must synchronise in the direction the table says (the
winning node's data ends up on both), and a resource unique ID mismatch is
refused without touching anything either.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhast.disk.metadata import bitmap_write, metadata_read, metadata_write
from pyhast.disk.provider import Provider
from tests.fault.driver import FaultCluster
from tests.helpers import nbd
from tests.helpers.ackcheck import NBDClient
from tests.helpers.cluster import MiB, hook_lines, make_hook, wait_for

pytestmark = pytest.mark.timeout(180)

SPLIT = "Split-brain condition!"
RES = "r0"
SIZE = 8 * MiB
REGION = (2 * MiB, MiB)
SYNC_DONE = "Synchronization complete"


# --------------------------------------------------------------------------
# helpers


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FaultCluster, Path]]:
    mode = getattr(request, "param", "memsync")
    script, out = make_hook(tmp_path)
    cl = FaultCluster(
        tmp_path,
        size=SIZE,
        exec_path=str(script),
        resource_options={RES: [f"replication {mode}"]},
        reconnect_interval=0.3,
    )
    try:
        cl.start_proxies()
        yield cl, out
    finally:
        try:
            cl.close()
        finally:
            cl.close_proxies()


def start_pair(cl: FaultCluster) -> None:
    cl.create("-e", str(256 * 1024))
    cl.start("nodea")
    cl.start("nodeb")
    cl.role("nodeb", "secondary")
    cl.role("nodea", "primary")
    cl.wait_synced(RES)


def fill(uri: str, offset: int, byte: int, length: int = MiB) -> None:
    async def run() -> None:
        client = await NBDClient.connect(uri)
        try:
            await client.write(offset, bytes([byte]) * length)
            await client.flush()
        finally:
            await client.close()

    asyncio.run(run())


def area(cl: FaultCluster, node: str, offset: int, length: int = MiB) -> bytes:
    return nbd.data_area(cl.local(node, RES), offset, length)


def snapshot(cl: FaultCluster, node: str) -> tuple[str, bytes, tuple[int, int, int]]:
    """What a refusal must not change: data, bitmap, resuid and counters."""
    path = cl.local(node, RES)
    md = nbd.read_metadata(path)
    return nbd.data_hash(path), nbd.read_bitmap(path), (md.resuid, md.localcnt, md.remotecnt)


def dump(cl: FaultCluster, node: str) -> dict[str, int]:
    """``hastctl dump`` of the resource on ``node``: its numeric fields."""
    res = cl.hastctl(node, "dump", RES)
    assert res.returncode == 0, res.stderr
    return {k: int(v) for k, v in re.findall(r"^\s+(\w+): (\d+)", res.stdout, re.M)}


def heal(cl: FaultCluster) -> None:
    for px in cl.proxy.values():
        px.heal()


def partition(cl: FaultCluster) -> None:
    for px in cl.proxy.values():
        px.partition()


def assert_refused(
    cl: FaultCluster,
    out: Path,
    primary: str,
    marks: dict[str, int],
    before: dict[str, tuple[str, bytes, tuple[int, int, int]]],
) -> None:
    """Split-brain on both nodes, the hook on both, retried and refused, nothing touched."""
    secondary = "nodeb" if primary == "nodea" else "nodea"
    cl.wait_log(primary, SPLIT, since=marks[primary], timeout=30)
    cl.wait_log(secondary, SPLIT, since=marks[secondary], timeout=30)
    wait_for(
        lambda: all(f"split-brain {RES}" in hook_lines(out, n) for n in ("nodea", "nodeb")),
        20,
        what="the split-brain hook on both nodes",
    )
    # The primary keeps trying, and is refused every time.
    cl.wait_log(primary, SPLIT, since=marks[primary], count=3, timeout=30)
    st = cl.status(primary, RES)
    assert (st["role"], st["status"]) == ("primary", "degraded"), st
    for node in ("nodea", "nodeb"):
        log = cl.log(node)[marks[node] :]
        assert "Synchronization" not in log and "Nodes are in sync" not in log, log
        assert snapshot(cl, node) == before[node], f"{node} was modified by a refused session"
    assert not re.search(
        r"\(secondary\) .*Connected|Adopted", cl.log(secondary)[marks[secondary] :]
    )


# --------------------------------------------------------------------------
# 1. both sides written while apart


@pytest.mark.parametrize(
    ("cluster", "apart", "returns_as_primary"),
    [
        ("memsync", "partition", "nodea"),
        ("fullsync", "partition", "nodeb"),
        ("async", "partition", "nodea"),
        ("async", "stopped", "nodeb"),
        ("fullsync", "stopped", "nodea"),
    ],
    indirect=["cluster"],
    ids=["memsync-partition-a", "fullsync-partition-b", "async-partition-a",
         "async-stopped-b", "fullsync-stopped-a"],
)  # fmt: skip
def test_both_sides_written_while_apart_is_refused_on_both_nodes(
    cluster: tuple[FaultCluster, Path], apart: str, returns_as_primary: str
) -> None:
    cl, out = cluster
    start_pair(cl)
    fill(cl.nbd_uri("nodea", RES), 0, 0x11)
    cl.wait_synced(RES)

    if apart == "partition":
        partition(cl)
    else:
        cl.stop("nodeb")
    cl.wait_status("nodea", RES, lambda st: st["status"] == "degraded", 20, "degraded")
    fill(cl.nbd_uri("nodea", RES), 2 * MiB, 0xAA)  # nodea writes alone...
    if apart == "stopped":
        cl.role("nodea", "init")
        cl.start("nodeb")
    cl.role("nodeb", "primary")
    fill(cl.nbd_uri("nodeb", RES), 4 * MiB, 0xBB)  # ...and so does nodeb.

    # One of them goes back to secondary; the other is (or becomes) primary.
    loser = "nodeb" if returns_as_primary == "nodea" else "nodea"
    cl.role(loser, "secondary")
    before = {n: snapshot(cl, n) for n in ("nodea", "nodeb")}
    marks = {n: cl.mark(n) for n in ("nodea", "nodeb")}
    if apart == "partition":
        heal(cl)
    if cl.status(returns_as_primary, RES)["role"] != "primary":
        cl.role(returns_as_primary, "primary")
    assert_refused(cl, out, returns_as_primary, marks, before)
    assert area(cl, "nodea", 2 * MiB) == b"\xaa" * MiB
    assert area(cl, "nodeb", 4 * MiB) == b"\xbb" * MiB
    assert area(cl, "nodeb", 2 * MiB) == bytes(MiB)  # nothing crossed over


# --------------------------------------------------------------------------
# 2. one side restarted while apart, then written


@pytest.mark.parametrize(
    "restart",
    ["nodea-worker", "nodea-hastd", "nodeb-worker", "nodeb-hastd"],
)
def test_one_side_restarted_while_apart_is_still_refused(
    cluster: tuple[FaultCluster, Path], restart: str
) -> None:
    cl, out = cluster
    start_pair(cl)
    fill(cl.nbd_uri("nodea", RES), 0, 0x11)
    cl.wait_synced(RES)
    partition(cl)
    cl.wait_status("nodea", RES, lambda st: st["status"] == "degraded", 20, "degraded")
    cl.role("nodeb", "primary")
    cl.wait_status("nodeb", RES, lambda st: st["nbd_uri"], 20, "nodeb serving")

    node, what = restart.split("-")
    if what == "worker":
        pid = cl.kill_worker(node, RES)
        cl.wait_status(
            node, RES, lambda st: st["workerpid"] not in (0, None, pid) and st["nbd_uri"], 30,
            "a restarted worker",
        )  # fmt: skip
    else:
        cl.stop(node)
        cl.start(node)
        cl.role(node, "primary")
    # Each side writes alone after the restart.
    fill(cl.nbd_uri("nodea", RES), 2 * MiB, 0xAA)
    fill(cl.nbd_uri("nodeb", RES), 4 * MiB, 0xBB)

    cl.role("nodeb", "secondary")
    before = {n: snapshot(cl, n) for n in ("nodea", "nodeb")}
    marks = {n: cl.mark(n) for n in ("nodea", "nodeb")}
    heal(cl)
    assert_refused(cl, out, "nodea", marks, before)


# --------------------------------------------------------------------------
# 3. counters edited on disk: every case of the decision table

#: (case, primary, P's (localcnt, remotecnt), S's (localcnt, remotecnt), expected)
#: expected: the node whose data must win, or "refused".
TABLE = [
    ("in-sync", "nodea", (5, 3), (3, 5), "nodea"),
    ("secondary-out-of-date", "nodea", (6, 3), (3, 5), "nodea"),
    ("primary-out-of-date", "nodea", (5, 3), (4, 5), "nodeb"),
    ("split-brain", "nodea", (6, 3), (4, 5), "refused"),
    ("split-brain-other-primary", "nodeb", (4, 5), (6, 3), "refused"),
    ("split-brain-equal-counters", "nodea", (2, 1), (2, 1), "refused"),
    ("never-happens-secondary-behind", "nodea", (5, 4), (3, 5), "nodea"),
    ("never-happens-secondary-ahead", "nodea", (4, 3), (4, 5), "nodeb"),
]


def edit_counters(path: Path, localcnt: int, remotecnt: int, *, resuid: int | None = None) -> None:
    """Rewrite the metadata (offline) with these counters, and mark every extent dirty."""
    with Provider.open(str(path)) as prov:
        md = metadata_read(prov, RES)
        md.localcnt, md.remotecnt = localcnt, remotecnt
        if resuid is not None:
            md.resuid = resuid
        metadata_write(prov, md)
        bitmap_write(prov, b"\xff" * md.mapsize)
        prov.flush()


def offline_pair(cl: FaultCluster) -> dict[str, dict[str, int]]:
    """A synchronised pair, stopped, with 0xA1 on nodea and 0xB2 on nodeb in REGION."""
    start_pair(cl)
    fill(cl.nbd_uri("nodea", RES), 0, 0x11)
    cl.wait_synced(RES)
    cl.stop("nodea")
    cl.stop("nodeb")
    dumps = {n: dump(cl, n) for n in ("nodea", "nodeb")}
    assert dumps["nodea"]["resuid"] == dumps["nodeb"]["resuid"] != 0, dumps
    off, length = REGION
    for node, byte in (("nodea", 0xA1), ("nodeb", 0xB2)):
        path = cl.local(node, RES)
        md = nbd.read_metadata(path)
        with open(path, "r+b") as f:
            f.seek(md.localoff + off)
            f.write(bytes([byte]) * length)
    return dumps


@pytest.mark.parametrize(
    ("case", "primary", "p_cnt", "s_cnt", "expected"), TABLE, ids=[t[0] for t in TABLE]
)
def test_edited_counters_meet_every_case_of_the_decision_table(
    cluster: tuple[FaultCluster, Path],
    case: str,
    primary: str,
    p_cnt: tuple[int, int],
    s_cnt: tuple[int, int],
    expected: str,
) -> None:
    cl, out = cluster
    secondary = "nodeb" if primary == "nodea" else "nodea"
    offline_pair(cl)
    edit_counters(cl.local(primary, RES), *p_cnt)
    edit_counters(cl.local(secondary, RES), *s_cnt)
    for node, cnt in ((primary, p_cnt), (secondary, s_cnt)):
        d = dump(cl, node)
        assert (d["localcnt"], d["remotecnt"]) == cnt, d
    before = {n: snapshot(cl, n) for n in ("nodea", "nodeb")}
    marks = {n: cl.mark(n) for n in ("nodea", "nodeb")}
    cl.start("nodea")
    cl.start("nodeb")
    cl.role(secondary, "secondary")
    cl.role(primary, "primary")

    if expected == "refused":
        assert_refused(cl, out, primary, marks, before)
        return
    cl.wait_log(primary, SYNC_DONE, since=marks[primary], timeout=60)
    cl.wait_synced(RES, node=primary)
    winner = {"nodea": b"\xa1", "nodeb": b"\xb2"}[expected]
    off, length = REGION
    for node in ("nodea", "nodeb"):
        assert area(cl, node, off, length) == winner * length, f"{case}: {node} holds the loser"
    nbd.assert_identical(cl.local("nodea", RES), cl.local("nodeb", RES))
    assert SPLIT not in cl.log(primary)[marks[primary] :]
    assert f"split-brain {RES}" not in hook_lines(out)
    # Afterwards the counters mirror each other (the next meeting is "in sync").
    p, s = dump(cl, primary), dump(cl, secondary)
    assert (p["localcnt"], p["remotecnt"]) == (s["remotecnt"], s["localcnt"]), (p, s)


def test_resuid_mismatch_is_refused_and_touches_nothing(
    cluster: tuple[FaultCluster, Path],
) -> None:
    cl, out = cluster
    dumps = offline_pair(cl)
    edit_counters(cl.local("nodeb", RES), 3, 3, resuid=dumps["nodeb"]["resuid"] ^ 0x5A5A)
    before = {n: snapshot(cl, n) for n in ("nodea", "nodeb")}
    marks = {n: cl.mark(n) for n in ("nodea", "nodeb")}
    cl.start("nodea")
    cl.start("nodeb")
    cl.role("nodeb", "secondary")
    cl.role("nodea", "primary")
    cl.wait_log("nodeb", "Resource unique ID mismatch", since=marks["nodeb"], timeout=30)
    cl.wait_log("nodea", "Resource unique ID mismatch", since=marks["nodea"], count=2, timeout=30)
    assert cl.status("nodea", RES)["status"] == "degraded"
    for node in ("nodea", "nodeb"):
        assert "Synchronization" not in cl.log(node)[marks[node] :]
        assert snapshot(cl, node) == before[node]
    assert f"split-brain {RES}" not in hook_lines(out)  # not a split-brain: another resource


def test_virgin_secondary_takes_everything_from_the_primary(
    cluster: tuple[FaultCluster, Path],
) -> None:
    cl, _ = cluster
    offline_pair(cl)
    edit_counters(cl.local("nodeb", RES), 4, 9, resuid=0)
    marks = {n: cl.mark(n) for n in ("nodea", "nodeb")}
    cl.start("nodea")
    cl.start("nodeb")
    cl.role("nodeb", "secondary")
    cl.role("nodea", "primary")
    cl.wait_log("nodea", SYNC_DONE, since=marks["nodea"], timeout=60)
    cl.wait_synced(RES)
    off, length = REGION
    assert area(cl, "nodeb", off, length) == b"\xa1" * length
    nbd.assert_identical(cl.local("nodea", RES), cl.local("nodeb", RES))
    assert dump(cl, "nodeb")["resuid"] == dump(cl, "nodea")["resuid"]
