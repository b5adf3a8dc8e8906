"""Product bugs the randomized fault driver found, one minimal test each.

Each test is named after what it caught, says which seed found it, and
reproduces it without the driver.  While a bug is open its test is a strict
xfail (the reason says where the bug is); once fixed, the marker goes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyhast.disk.faults import FAULTS_ENV, write_rules
from tests.helpers import nbd
from tests.helpers.ackcheck import NBDClient, NBDError, make_block
from tests.helpers.cluster import Cluster, MiB

pytestmark = pytest.mark.timeout(120)

BS = 4096
EXTENT = 256 * 1024


class FaultEnvCluster(Cluster):
    """A cluster whose hastd processes read PYHAST_FAULTS control files."""

    def __init__(self, tmp: Path, **kwargs: object) -> None:
        self.fault_files = {n: tmp / f"faults-{n}.json" for n in ("nodea", "nodeb")}
        for path in self.fault_files.values():
            write_rules(path, [])
        super().__init__(tmp, **kwargs)  # type: ignore[arg-type]

    def env(self, node: str) -> dict[str, str]:
        env = super().env(node)
        env[FAULTS_ENV] = str(self.fault_files[node])
        return env


async def _io(uri: str, *ops: tuple[str, int, bytes | int]) -> list[bytes | BaseException]:
    client = await NBDClient.connect(uri)
    out: list[bytes | BaseException] = []
    try:
        for op, offset, arg in ops:
            try:
                if op == "w":
                    assert isinstance(arg, bytes)
                    await client.write(offset, arg)
                    out.append(b"")
                else:
                    assert isinstance(arg, int)
                    out.append(await client.read(offset, arg))
            except NBDError as exc:
                out.append(exc)
    finally:
        await client.close()
    return out


def nbd_io(uri: str, *ops: tuple[str, int, bytes | int]) -> list[bytes | BaseException]:
    return asyncio.run(_io(uri, *ops))


def test_regression_local_read_error_is_not_served_from_a_stale_secondary(
    tmp_path: Path,
) -> None:
    """A local read error must not be answered with the secondary's stale copy.

    Caught by the fault driver, seed 914 (ci; seed 138 of its first
    generator): during the resynchronisation after kill_secondary_worker a
    read of a block acknowledged at v11 returned v1 -- PrimaryDevice.read
    fell back to the secondary whatever the state of the extent there.
    """
    cl = FaultEnvCluster(tmp_path, size=8 * MiB, resource_options={"r0": ["replication fullsync"]})
    with cl:
        cl.start_pair(create_args=("-e", str(EXTENT)))
        cl.wait_synced("r0")
        uri = cl.nbd_uri("nodea", "r0")
        target = 3 * EXTENT
        old, new = make_block(1, 1, 1, BS), make_block(1, 1, 2, BS)
        assert nbd_io(uri, ("w", target, old)) == [b""]
        cl.wait_synced("r0")

        # The secondary cannot write the block (the link stays up): the new
        # version is acknowledged from the primary's disk and the extent is
        # marked for synchronisation, which keeps failing.
        off_b = nbd.read_metadata(cl.local("nodeb", "r0")).localoff + target
        write_rules(
            cl.fault_files["nodeb"],
            [{"op": "write", "path": "r0-nodeb", "offset": off_b, "length": BS, "errno": "EIO"}],
        )
        mark = cl.mark("nodea")
        assert nbd_io(uri, ("w", target, new)) == [b""]
        cl.wait_log("nodea", "marked for synchronization", since=mark)
        assert cl.status("nodea", "r0")["status"] == "complete"
        assert nbd.data_area(cl.local("nodeb", "r0"), target, BS) == old  # stale there

        # Now the primary's own read of that block fails.
        off_a = nbd.read_metadata(cl.local("nodea", "r0")).localoff + target
        write_rules(
            cl.fault_files["nodea"],
            [{"op": "read", "path": "r0-nodea", "offset": off_a, "length": BS, "errno": "EIO"}],
        )
        (got,) = nbd_io(uri, ("r", target, BS))
        # An error, or the acknowledged data; never the stale copy.
        if not isinstance(got, NBDError):
            assert isinstance(got, bytes), got
            assert got == new, (
                "the read returned the secondary's stale copy"
                if got == old
                else f"the read returned {got[:16]!r}..."
            )


def test_regression_acknowledged_write_survives_primary_restart_after_local_write_error(
    tmp_path: Path,
) -> None:
    """A write acknowledged on the secondary's copy alone survives a primary restart.

    Caught by the fault driver, seed 672 (long): with a bad region on the
    primary (local write EIO, remote fine: acknowledged), restart_primary
    lost the in-memory list of locally stale extents; reads then returned
    older versions, and the resync copied the stale local data over the
    secondary's good copy.
    """
    cl = FaultEnvCluster(tmp_path, size=8 * MiB, resource_options={"r0": ["replication fullsync"]})
    with cl:
        cl.start_pair(create_args=("-e", str(EXTENT)))
        cl.wait_synced("r0")
        uri = cl.nbd_uri("nodea", "r0")
        target = 3 * EXTENT
        old, new = make_block(2, 1, 1, BS), make_block(2, 1, 2, BS)
        assert nbd_io(uri, ("w", target, old)) == [b""]
        cl.wait_synced("r0")

        # The primary's disk fails the write; the secondary takes it: acknowledged.
        off_a = nbd.read_metadata(cl.local("nodea", "r0")).localoff + target
        write_rules(
            cl.fault_files["nodea"],
            [{"op": "write", "path": "r0-nodea", "offset": off_a, "length": BS, "errno": "EIO"}],
        )
        assert nbd_io(uri, ("w", target, new), ("r", target, BS)) == [b"", new]
        assert nbd.data_area(cl.local("nodeb", "r0"), target, BS) == new

        # The primary's worker dies before the extent is repaired; the disk is
        # fine again when hastd restarts it.
        pid = cl.kill_worker("nodea", "r0")
        write_rules(cl.fault_files["nodea"], [])
        cl.wait_status(
            "nodea",
            "r0",
            lambda st: st["workerpid"] not in (0, None, pid) and st["nbd_uri"],
            30,
            "a new primary worker",
        )
        cl.wait_synced("r0")
        (got,) = nbd_io(uri, ("r", target, BS))
        assert isinstance(got, bytes), got
        assert got == new, "the acknowledged write was lost" if got == old else repr(got[:16])
        assert nbd.data_area(cl.local("nodeb", "r0"), target, BS) == new


def test_regression_failed_local_write_while_degraded_does_not_leave_its_extent_dirty(
    tmp_path: Path,
) -> None:
    """A refused write (local EIO, no secondary) releases its extent in the activemap.

    Caught by the fault driver, seed 672 (long): the final wait for 'in
    sync' timed out with 'dirty' stuck at 786432 -- PrimaryDevice.write
    raised before write_complete() when the local write failed while
    degraded.
    """
    cl = FaultEnvCluster(tmp_path, size=8 * MiB)
    with cl:
        cl.start_pair(create_args=("-e", str(EXTENT)))
        cl.wait_synced("r0")
        uri = cl.nbd_uri("nodea", "r0")
        cl.stop("nodeb")
        cl.wait_status("nodea", "r0", lambda st: st["status"] == "degraded", 20, "degraded")

        target = 5 * EXTENT
        off_a = nbd.read_metadata(cl.local("nodea", "r0")).localoff + target
        write_rules(
            cl.fault_files["nodea"],
            [{"op": "write", "path": "r0-nodea", "offset": off_a, "length": BS, "errno": "EIO"}],
        )
        (got,) = nbd_io(uri, ("w", target, make_block(3, 1, 1, BS)))
        assert isinstance(got, NBDError)  # no component took it: refused
        write_rules(cl.fault_files["nodea"], [])
        assert nbd_io(uri, ("w", 0, make_block(3, 0, 1, BS))) == [b""]

        # The peer returns and everything is synchronised: nothing stays dirty.
        cl.start("nodeb")
        cl.role("nodeb", "secondary")
        cl.wait_synced("r0", timeout=15)
        nbd.assert_identical(cl.local("nodea", "r0"), cl.local("nodeb", "r0"))


def test_regression_restarted_primary_worker_recreates_its_device(tmp_path: Path) -> None:
    """After kill -9 of the primary's worker, the worker that hastd restarts serves the device.

    Caught by the fault driver, seed 672 (long) and every kill_primary_worker
    step: the restarted worker could not recreate ``<devdir>/r0`` (the NBD
    export, which the driver's workload uses, came back).
    """
    cl = FaultEnvCluster(tmp_path, size=8 * MiB)
    with cl:
        cl.start_pair(create_args=("-e", str(EXTENT)))
        cl.wait_synced("r0")
        assert cl.device("nodea", "r0").stat().st_size > 0
        mark = cl.mark("nodea")
        pid = cl.kill_worker("nodea", "r0")
        cl.wait_status(
            "nodea",
            "r0",
            lambda st: st["workerpid"] not in (0, None, pid) and st["nbd_uri"],
            30,
            "a new primary worker",
        )
        log = cl.wait_log_re("nodea", r"Device \S+ created\.|Unable to create device", since=mark)
        assert log.group(0).startswith("Device"), cl.log("nodea")[mark:]
        assert cl.device("nodea", "r0").stat().st_size > 0


def test_regression_write_while_degraded_to_a_locally_stale_extent_is_not_lost(
    tmp_path: Path,
) -> None:
    """Acknowledged while degraded into a locally stale extent: still there after the resync.

    Caught by the fault driver, seed 672 (long, --include-known-bugs, after
    the fix of the three bugs above): 689 acknowledged writes in 320 blocks
    lost -- writes acknowledged while the restarted primary was not yet
    connected, into extents a bad region had made locally stale.
    """
    cl = FaultEnvCluster(tmp_path, size=8 * MiB, resource_options={"r0": ["replication fullsync"]})
    with cl:
        cl.start_pair(create_args=("-e", str(EXTENT)))
        cl.wait_synced("r0")
        uri = cl.nbd_uri("nodea", "r0")
        x, y = 3 * EXTENT, 3 * EXTENT + 8 * BS  # two blocks of one extent
        old_y, new_y = make_block(4, 2, 1, BS), make_block(4, 2, 2, BS)
        assert nbd_io(uri, ("w", y, old_y)) == [b""]
        cl.wait_synced("r0")

        # x fails on the primary's disk and lands on the secondary only:
        # the extent's local copy is stale.
        off_a = nbd.read_metadata(cl.local("nodea", "r0")).localoff + x
        write_rules(
            cl.fault_files["nodea"],
            [{"op": "write", "path": "r0-nodea", "offset": off_a, "length": BS, "errno": "EIO"}],
        )
        assert nbd_io(uri, ("w", x, make_block(4, 1, 1, BS))) == [b""]

        # The secondary goes away; y (same extent, a healthy sector) is
        # written and acknowledged from the primary's disk alone.
        cl.stop("nodeb")
        cl.wait_status("nodea", "r0", lambda st: st["status"] == "degraded", 20, "degraded")
        (got,) = nbd_io(uri, ("w", y, new_y))
        if isinstance(got, NBDError):
            return  # refusing the write is a correct answer too
        write_rules(cl.fault_files["nodea"], [])

        cl.start("nodeb")
        cl.role("nodeb", "secondary")
        cl.wait_synced("r0")
        (got,) = nbd_io(uri, ("r", y, BS))
        assert isinstance(got, bytes), got
        assert got == new_y, "the acknowledged write was lost" if got == old_y else repr(got[:16])
        assert nbd.data_area(cl.local("nodeb", "r0"), y, BS) == new_y


@pytest.mark.parametrize("mode", ["async", "fullsync"])
def test_regression_stale_extent_copied_back_whole_loses_a_write_the_secondary_missed(
    tmp_path: Path, mode: str
) -> None:
    """A block the secondary missed is not overwritten by a copy back from it.

    Caught by the fault driver, seed 27 (long, async): 3 acknowledged writes
    lost.  A local write error made an extent "locally stale" and the whole
    extent was then copied from the secondary -- including blocks written
    later and acknowledged from the primary's disk whose remote write had
    failed (there: a link stall).  Now only the failed range is stale.
    """
    cl = FaultEnvCluster(tmp_path, size=8 * MiB, resource_options={"r0": [f"replication {mode}"]})
    with cl:
        cl.start_pair(create_args=("-e", str(EXTENT)))
        cl.wait_synced("r0")
        uri = cl.nbd_uri("nodea", "r0")
        x, y = 5 * EXTENT, 5 * EXTENT + 16 * BS  # two blocks of one extent
        old_y, new_y = make_block(6, 2, 1, BS), make_block(6, 2, 2, BS)
        new_x = make_block(6, 1, 1, BS)
        assert nbd_io(uri, ("w", y, old_y)) == [b""]
        cl.wait_synced("r0")
        localoff = nbd.read_metadata(cl.local("nodea", "r0")).localoff

        # x fails on the primary's disk, lands on the secondary: x is stale here.
        write_rules(
            cl.fault_files["nodea"],
            [{"op": "write", "path": "r0-nodea", "offset": localoff + x, "length": BS, "errno": 5}],
        )
        assert nbd_io(uri, ("w", x, new_x)) == [b""]
        # y lands here but fails on the secondary's disk: acknowledged from ours.
        write_rules(
            cl.fault_files["nodeb"],
            [{"op": "write", "path": "r0-nodeb", "offset": localoff + y, "length": BS, "errno": 5}],
        )
        assert nbd_io(uri, ("w", y, new_y)) == [b""]
        write_rules(cl.fault_files["nodeb"], [])
        write_rules(cl.fault_files["nodea"], [])
        cl.wait_synced("r0")

        assert nbd_io(uri, ("r", x, BS), ("r", y, BS)) == [new_x, new_y]
        for node in ("nodea", "nodeb"):
            assert nbd.data_area(cl.local(node, "r0"), x, BS) == new_x, node
            got = nbd.data_area(cl.local(node, "r0"), y, BS)
            assert got == new_y, f"{node}: " + ("lost" if got == old_y else repr(got[:16]))
