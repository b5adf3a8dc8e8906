"""Split-brain: both nodes written independently, detected when they meet again.

The generation counters (spec 8) must refuse the connection with
"Split-brain condition!", fire the ``split-brain`` hook on both nodes and
touch no data; the documented recovery (role init, create, role secondary on
the losing node) must then bring a full synchronisation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import nbd
from tests.helpers.cluster import Cluster, MiB, hook_lines, make_hook, wait_for

pytestmark = pytest.mark.timeout(180)

SYNC_DONE = r"Synchronization complete\. \S+ \((\d+) bytes\) synchronized"
SPLIT = "Split-brain condition!"


def snapshot(path: Path) -> tuple[str, bytes, tuple[int, int, int]]:
    """What must not change: the data area, the bitmap, resuid and counters."""
    md = nbd.read_metadata(path)
    return nbd.data_hash(path), nbd.read_bitmap(path), (md.resuid, md.localcnt, md.remotecnt)


def write(uri: str, pattern: int, offset: int, length: int = MiB) -> None:
    nbd.qemu_io(
        uri, f"write -P {pattern} {offset} {length}", f"read -P {pattern} {offset} {length}"
    )


def test_split_brain_is_refused_on_both_nodes_then_recovered_by_full_sync(
    tmp_path: Path,
) -> None:
    nbd.need("qemu-io")
    script, out = make_hook(tmp_path)
    with Cluster(tmp_path, size=32 * MiB, exec_path=str(script)) as cl:
        cl.start_pair()
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        uri_a = cl.nbd_uri("nodea", "r0")
        write(uri_a, 0x11, 0)
        cl.wait_synced("r0")

        # The link goes: nodeb is stopped, nodea writes alone...
        cl.stop("nodeb")
        cl.wait_status("nodea", "r0", lambda st: st["status"] == "degraded", 20, "'degraded'")
        write(uri_a, 0xAA, 4 * MiB)
        # ...then nodea stops acting as primary and nodeb is promoted alone.
        cl.role("nodea", "init", "r0")
        cl.start("nodeb")
        cl.role("nodeb", "primary", "r0")
        uri_b = cl.nbd_uri("nodeb", "r0")
        write(uri_b, 0xBB, 8 * MiB)
        cl.role("nodeb", "secondary", "r0")

        before_a, before_b = snapshot(a), snapshot(b)
        assert before_a[2][1:] == (1, 0) and before_b[2][1:] == (1, 0), (before_a, before_b)
        mark_a, mark_b = cl.mark("nodea"), cl.mark("nodeb")
        cl.role("nodea", "primary", "r0")

        cl.wait_log("nodea", SPLIT, since=mark_a)
        cl.wait_log("nodeb", SPLIT, since=mark_b)
        wait_for(
            lambda: (
                "split-brain r0" in hook_lines(out, "nodea")
                and "split-brain r0" in hook_lines(out, "nodeb")
            ),
            20,
            what="the split-brain hook on both nodes",
        )
        # The primary keeps trying and is refused every time.
        cl.wait_log("nodea", SPLIT, since=mark_a, count=3)
        st = cl.status("nodea", "r0")
        assert st["status"] == "degraded"
        assert st["role"] == "primary"
        assert "Synchronization" not in cl.log("nodea")[mark_a:]
        assert not re.search(r"\(secondary\) .*Connected|Adopted", cl.log("nodeb")[mark_b:])
        # No data, bitmap or counter was touched on either node.
        assert snapshot(a) == before_a
        assert snapshot(b) == before_b
        nbd.qemu_io(uri_a, f"read -P 0xaa {4 * MiB} {MiB}", f"read -P 0 {8 * MiB} {MiB}")
        lines_a = hook_lines(out, "nodea")
        assert set(lines_a) >= {"role r0 init primary", "split-brain r0"}
        assert not {"connect r0", "syncstart r0"} & set(lines_a[lines_a.index("split-brain r0") :])

        # The documented recovery on the losing node: init, create, secondary.
        cl.role("nodeb", "init", "r0")
        res = cl.hastctl("nodeb", "create", "r0")
        assert res.returncode == 0, res.stderr
        mark_a = cl.mark("nodea")
        cl.role("nodeb", "secondary", "r0")
        m = cl.wait_log_re("nodea", SYNC_DONE, 60, since=mark_a)
        md = nbd.read_metadata(a)
        assert int(m.group(1)) == md.datasize
        cl.wait_synced("r0")
        nbd.assert_identical(a, b)
        image = nbd.data_area(b, 0, 9 * MiB)
        assert image[:MiB] == b"\x11" * MiB
        assert image[4 * MiB : 5 * MiB] == b"\xaa" * MiB
        assert image[8 * MiB :] == bytes(MiB)  # nodeb's split-brain write is gone
        wait_for(lambda: "syncdone r0" in hook_lines(out, "nodea"), 20, what="syncdone")


def test_regression_split_brain_detected_after_primary_restart_while_alone(
    tmp_path: Path,
) -> None:
    """A primary whose worker restarts while its peer is away has not heard
    the peer's counters in this life: it must still bump localcnt on its
    first write alone, or a later split-brain looks like "primary out of
    date" and the peer's data silently overwrites this node's writes."""
    nbd.need("qemu-io")
    with Cluster(tmp_path, size=8 * MiB) as cl:
        cl.start_pair()
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        # Give the counters a non-zero steady state (spec 8): nodeb writes
        # alone, then nodea comes back as primary and syncs from nodeb...
        cl.stop("nodea")
        cl.role("nodeb", "primary", "r0")
        write(cl.nbd_uri("nodeb", "r0"), 0x21, 0)
        cl.role("nodeb", "secondary", "r0")
        cl.start("nodea")
        cl.role("nodea", "primary", "r0")
        cl.wait_synced("r0")
        # ...then the roles swap back: nodeb primary, nodea secondary.
        cl.role("nodea", "secondary", "r0")
        cl.role("nodeb", "primary", "r0")
        cl.wait_synced("r0", node="nodeb")
        nbd.assert_identical(a, b)
        steady_b = nbd.read_metadata(b)
        assert steady_b.localcnt > 0, "the scenario needs a non-zero localcnt"

        # nodea goes away; nodeb's hastd restarts (a new worker), writes alone.
        cl.stop("nodea")
        cl.stop("nodeb")
        cl.start("nodeb")
        cl.role("nodeb", "primary", "r0")
        write(cl.nbd_uri("nodeb", "r0"), 0xB0, 2 * MiB)
        cl.role("nodeb", "init", "r0")
        # nodea is promoted alone and writes too.
        cl.start("nodea")
        cl.role("nodea", "primary", "r0")
        write(cl.nbd_uri("nodea", "r0"), 0xA0, 4 * MiB)
        cl.role("nodea", "secondary", "r0")
        before_a, before_b = snapshot(a), snapshot(b)

        mark = cl.mark("nodeb")
        cl.role("nodeb", "primary", "r0")
        cl.wait_log("nodeb", SPLIT, since=mark)
        assert snapshot(a) == before_a
        assert snapshot(b) == before_b
        assert "Synchronization" not in cl.log("nodeb")[mark:]
