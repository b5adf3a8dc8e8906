"""The ``exec`` hook's events on both nodes (spec 9) and SIGHUP reload (spec 3.5).

The hook is a shell script appending ``<node> <argv[1:]>`` to a file (the
node from hastd's environment).  Hooks run asynchronously, so the lines of
one step may land in any order: each step waits for its lines and compares
them as a multiset, and the whole list is compared once the nodes are quiet.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers import nbd
from tests.helpers.cluster import Cluster, MiB, hook_lines, make_hook, wait_for

pytestmark = pytest.mark.timeout(180)

SYNC_DONE = r"Synchronization complete\. \S+ \((\d+) bytes\) synchronized"
SYNC_INTR = r"Synchronization interrupted after \d+ s\. \S+ \((\d+) bytes\) synchronized so far"


class Hooks:
    """Expected hook lines, step by step, per node."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen = {"nodea": 0, "nodeb": 0}
        self.expected: dict[str, list[str]] = {"nodea": [], "nodeb": []}

    def expect(self, node: str, lines: Sequence[str], timeout: float = 20.0) -> None:
        """The next ``lines`` of ``node`` are these (in any order)."""
        start = self.seen[node]
        want = start + len(lines)
        got = wait_for(
            lambda: ls if len(ls := hook_lines(self.out, node)) >= want else None,
            timeout,
            what=f"{len(lines)} more hook lines from {node}: {list(lines)} "
            f"(so far {hook_lines(self.out, node)[start:]})",
        )
        assert sorted(got[start:want]) == sorted(lines), (node, got[start:], lines)
        self.seen[node] = want
        self.expected[node] += lines

    def assert_complete(self) -> None:
        for node, lines in self.expected.items():
            got = hook_lines(self.out, node)
            assert len(got) == len(lines), (node, got, lines)


def test_hook_events_on_both_nodes(tmp_path: Path) -> None:
    nbd.need("qemu-io")
    script, out = make_hook(tmp_path)
    # Checksum and compression slow the full synchronisation down enough to
    # catch it in the middle (~1.5 s for 128 MiB of random data here).
    with Cluster(
        tmp_path,
        size=128 * MiB,
        exec_path=str(script),
        resource_options={"r0": ["checksum sha256", "compression lzf"]},
    ) as cl:
        hooks = Hooks(out)
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        cl.create()
        nbd.fill_random(a, 16 * MiB)
        cl.start("nodea")
        cl.start("nodeb")

        # Roles and the first connection (virgin: nothing to synchronise).
        cl.role("nodeb", "secondary", "r0")
        hooks.expect("nodeb", ["role r0 init secondary"])
        cl.role("nodea", "primary", "r0")
        hooks.expect("nodea", ["role r0 init primary", "connect r0"])
        hooks.expect("nodeb", ["connect r0"])
        uri = cl.nbd_uri("nodea", "r0")
        nbd.qemu_io(uri, "write -P 0x11 0 1M")

        # The secondary goes away: disconnect on the primary only.
        cl.stop("nodeb")
        hooks.expect("nodea", ["disconnect r0"])
        nbd.qemu_io(uri, f"write -P 0x22 {4 * MiB} 1M")

        # It comes back: connect on both, a synchronisation on the primary.
        mark = cl.mark("nodea")
        cl.start("nodeb")
        cl.role("nodeb", "secondary", "r0")
        hooks.expect("nodeb", ["role r0 init secondary", "connect r0"])
        hooks.expect("nodea", ["connect r0", "syncstart r0", "syncdone r0"])
        cl.wait_log_re("nodea", SYNC_DONE, since=mark)

        # A full synchronisation, interrupted by the secondary's death.
        cl.role("nodeb", "init", "r0")
        hooks.expect("nodeb", ["role r0 secondary init"])
        hooks.expect("nodea", ["disconnect r0"])
        res = cl.hastctl("nodeb", "create", "r0")
        assert res.returncode == 0, res.stderr
        mark = cl.mark("nodea")
        cl.role("nodeb", "secondary", "r0")
        cl.wait_log("nodea", "Synchronization started.", since=mark, timeout=30)
        md = nbd.read_metadata(a)
        # Let two extents complete, then freeze the secondary.
        cl.wait_status(
            "nodea",
            "r0",
            lambda st: st["sync_left"] and st["sync_left"] <= md.datasize - 2 * md.extentsize,
            30,
            "some progress of the synchronisation",
        )
        workers = cl.worker_pids("nodeb")
        assert len(workers) == 1, workers
        (pid,) = workers
        os.kill(pid, signal.SIGSTOP)
        assert "Synchronization complete" not in cl.log("nodea")[mark:], (
            "the full synchronisation ended before it could be interrupted"
        )
        cl.kill9("nodeb")
        hooks.expect("nodeb", ["role r0 init secondary", "connect r0"])
        hooks.expect("nodea", ["connect r0", "syncstart r0", "disconnect r0", "syncintr r0"])
        first = int(cl.wait_log_re("nodea", SYNC_INTR, since=mark).group(1))
        assert first < md.datasize

        # It returns and the synchronisation resumes where it stopped.
        mark = cl.mark("nodea")
        cl.start("nodeb")
        cl.role("nodeb", "secondary", "r0")
        hooks.expect("nodeb", ["role r0 init secondary", "connect r0"])
        hooks.expect("nodea", ["connect r0", "syncstart r0", "syncdone r0"])
        rest = int(cl.wait_log_re("nodea", SYNC_DONE, since=mark).group(1))
        print(f"full sync: {first} bytes before the interruption, {rest} after")
        assert rest <= md.datasize - 2 * md.extentsize
        assert first + rest >= md.datasize
        cl.wait_synced("r0")
        nbd.assert_identical(a, b)

        # The primary is demoted: the role hook there, disconnect on the secondary.
        cl.role("nodea", "init", "r0")
        hooks.expect("nodea", ["role r0 primary init"])
        hooks.expect("nodeb", ["disconnect r0"])
        cl.stop("nodea")
        cl.stop("nodeb")
        hooks.assert_complete()


# --------------------------------------------------------------------------
# SIGHUP


def test_sighup_changes_replication_removes_a_resource_keeps_config_on_error(
    tmp_path: Path,
) -> None:
    nbd.need("qemu-io")
    with Cluster(
        tmp_path,
        resources=("r0", "r1"),
        resource_options={"r0": ["replication fullsync"]},
    ) as cl:
        cl.start_pair()
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        uri = cl.nbd_uri("nodea", "r0")
        before = cl.status("nodea", "r0")
        assert before["replication"] == "fullsync"
        (sec_pid,) = [p for p, (res, _) in cl.worker_pids("nodeb").items() if res == "r0"]

        # fullsync: a write waits for the secondary (stopped here).
        os.kill(sec_pid, signal.SIGSTOP)
        try:
            bg = nbd.qemu_io_background(uri, ["write -P 0x31 0 64k"], tmp_path, "fullsync")
            cl.wait_status("nodea", "r0", lambda st: st["recv_queue_size"] > 0, 20, "the write")
            time.sleep(0.5)  # a negative: it must still be waiting
            assert bg.running(), "a fullsync write completed without the secondary"
        finally:
            os.kill(sec_pid, signal.SIGCONT)
        rc, outp, err = bg.wait(30)
        nbd.check_qemu_io(bg.argv, rc, outp, err)

        # SIGHUP with replication async for r0.
        cl.resource_options["r0"] = ["replication async"]
        cl.write_config()
        mark = cl.mark("nodea")
        cl.signal("nodea", signal.SIGHUP)
        cl.wait_log("nodea", "[r0] (primary) Configuration reloaded successfully.", since=mark)
        log = cl.log("nodea")[mark:]
        assert "Resource r0 configuration was modified, reloading it." in log
        st = cl.status("nodea", "r0")
        assert st["replication"] == "async"
        assert st["workerpid"] == before["workerpid"]  # reloaded, not restarted
        assert "  replication: async" in cl.hastctl("nodea", "list", "r0").stdout

        # async: a new write completes with the secondary stopped.
        os.kill(sec_pid, signal.SIGSTOP)
        try:
            nbd.qemu_io(uri, f"write -P 0x32 {MiB} 64k", f"read -P 0x32 {MiB} 64k", timeout=20)
            st = cl.status("nodea", "r0")
            assert st["status"] == "complete"
        finally:
            os.kill(sec_pid, signal.SIGCONT)
        cl.wait_synced("r0")
        nbd.wait_identical(a, b)
        assert nbd.data_area(b, MiB, 64 * 1024) == b"\x32" * 64 * 1024

        # A resource removed from the file goes to init: its worker stops.
        (r1_pid,) = [p for p, (res, _) in cl.worker_pids("nodea").items() if res == "r1"]
        cl.write_config(cl.config_text(("r0",)))
        mark = cl.mark("nodea")
        cl.signal("nodea", signal.SIGHUP)
        cl.wait_log("nodea", "Resource r1 removed.", since=mark)
        wait_for(lambda: r1_pid not in cl.worker_pids("nodea"), 20, what="r1's worker to stop")
        res = cl.hastctl("nodea", "status")
        assert [line.split("\t")[0] for line in res.stdout.splitlines()[1:]] == ["r0"]
        assert re.search(r"\[r1\] \(primary\) Role changed to init\.", cl.log("nodea")[mark:])

        # A malformed file is refused and the running configuration is kept.
        cl.write_config("resource r0 {\n  replication fullsync\n  on nodea {\n")
        mark = cl.mark("nodea")
        cl.signal("nodea", signal.SIGHUP)
        cl.wait_log("nodea", "Configuration not reloaded.", since=mark)
        cl.write_config(cl.config_text(("r0",)))  # hastctl reads the file too
        st = cl.status("nodea", "r0")
        assert (st["replication"], st["workerpid"], st["status"]) == (
            "async",
            before["workerpid"],
            "complete",
        )
        nbd.qemu_io(uri, f"write -P 0x33 {2 * MiB} 64k")
        cl.wait_synced("r0")
        nbd.wait_identical(a, b)


def test_regression_no_disconnect_hook_when_the_primary_is_demoted(tmp_path: Path) -> None:
    """A primary worker stopped on purpose (role change) fires no event of
    its own: its "disconnect" used to race the worker's exit, so the hook
    ran on some demotions and not on others."""
    script, out = make_hook(tmp_path)
    with Cluster(tmp_path, exec_path=str(script)) as cl:
        cl.start_pair()
        hooks = Hooks(out)
        hooks.expect("nodeb", ["role r0 init secondary", "connect r0"])
        hooks.expect("nodea", ["role r0 init primary", "connect r0"])
        for _ in range(3):
            cl.role("nodea", "init", "r0")
            hooks.expect("nodeb", ["disconnect r0"])
            hooks.expect("nodea", ["role r0 primary init"])
            cl.role("nodea", "primary", "r0")
            hooks.expect("nodea", ["role r0 init primary", "connect r0"])
            hooks.expect("nodeb", ["connect r0"])
            cl.wait_synced("r0")
        cl.stop("nodea")  # hastd's own stop: no role change, no event there
        hooks.expect("nodeb", ["disconnect r0"])
        cl.stop("nodeb")
        hooks.assert_complete()
