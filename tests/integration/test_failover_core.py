"""Failures of either node while writes are in flight, and the way back.

Durability is checked, not assumed: writes are versioned patterns whose
acknowledgements are read from qemu-io's output, every block is checked
against its last acknowledged version (or the one in flight when the
failure hit), and both providers' data areas are compared byte for byte
once the nodes are back together.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import threading
from pathlib import Path

import pytest

from pyhast.disk.metadata import metadata_create
from pyhast.disk.provider import Provider
from pyhast.enums import Checksum, Compression, Replication
from pyhast.log import ResourceAdapter
from pyhast.transport.aio import FramedConn
from pyhast.worker.local import LocalComponent
from pyhast.worker.primary import PrimaryDevice
from pyhast.worker.remote import RemoteComponent
from tests.helpers import nbd
from tests.helpers.cluster import Cluster, MiB
from tests.helpers.nbd import Versioned

pytestmark = pytest.mark.timeout(180)

KiB = 1024
SYNC_DONE = r"Synchronization complete\. \S+ \((\d+) bytes\) synchronized"


def read_export(uri: str, tmp: Path, name: str) -> bytes:
    """The whole device as the NBD export serves it (nbdcopy to a file)."""
    out = tmp / f"{name}.raw"
    nbd.nbdcopy(uri, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def dirty_in_list(cl: Cluster, node: str, resource: str) -> int:
    res = cl.hastctl(node, "list", resource)
    assert res.returncode == 0, res.stderr
    m = re.search(r"^  dirty: (\d+) \(", res.stdout, re.M)
    assert m is not None, res.stdout
    return int(m.group(1))


# --------------------------------------------------------------------------
# 3. the secondary dies during writes


def test_secondary_killed_during_writes_resyncs_only_dirty_extents(tmp_path: Path) -> None:
    nbd.need("fio", "qemu-io")
    with Cluster(tmp_path, size=128 * MiB) as cl:
        cl.start_pair()
        uri = cl.nbd_uri("nodea", "r0")
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        md = nbd.read_metadata(a)
        nbd.qemu_io(uri, "write -P 0x11 0 1M", f"write -P 0x22 {64 * MiB} 1M")
        before = cl.wait_synced("r0")
        nbd.assert_identical(a, b)
        primary_pid = before["workerpid"]

        # fio writes every block of [8 MiB, 24 MiB) once, in random order, 16
        # requests in flight, throttled to last ~4 s, then reads it all back
        # and verifies it (its own checksums).
        fio = nbd.Background(
            [
                "fio",
                "--name=w",
                "--ioengine=nbd",
                f"--uri={uri}",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=16",
                f"--offset={8 * MiB}",
                f"--size={16 * MiB}",
                "--rate=4m",
                "--verify=crc32c",
                "--verify_fatal=1",
            ],
            tmp_path,
            "fio",
        )
        cl.wait_status(
            "nodea",
            "r0",
            lambda st: st["stat_write"] >= before["stat_write"] + 64,
            20,
            "fio's writes",
        )
        assert fio.running()
        cl.kill9("nodeb")
        cl.wait_status("nodea", "r0", lambda st: st["status"] == "degraded", 20, "'degraded'")
        assert fio.running(), "the kill came too late: fio had finished"

        # The primary stays up and keeps serving, degraded.
        nbd.qemu_io(uri, f"write -P 0x33 {100 * MiB} 64k", f"read -P 0x33 {100 * MiB} 64k")
        rc, out, err = fio.wait(60)
        assert rc == 0, f"fio failed while the secondary was down:\n{out}\n{err}"
        assert re.search(r"^\s+read: IOPS=", out, re.M), f"fio verified nothing:\n{out}"
        st = cl.status("nodea", "r0")
        assert st["workerpid"] == primary_pid
        assert st["status"] == "degraded"
        assert st["stat_write_error"] == 0
        dirty = dirty_in_list(cl, "nodea", "r0")
        assert dirty == st["dirty"]
        assert dirty > 0 and dirty % md.extentsize == 0
        # fio's 8 extents and the one at 100 MiB, nothing else.
        assert dirty <= 9 * md.extentsize

        mark = cl.mark("nodea")
        cl.start("nodeb")
        cl.role("nodeb", "secondary", "r0")
        m = cl.wait_log_re("nodea", SYNC_DONE, 60, since=mark)
        synced = int(m.group(1))
        print(f"dirty {dirty} bytes, synchronized {synced} of {md.datasize}")
        assert synced == dirty
        assert synced * 4 < md.datasize
        cl.wait_synced("r0")
        cl.wait_complete("nodeb", "r0")
        nbd.assert_identical(a, b)
        nbd.qemu_io(uri, f"read -P 0x33 {100 * MiB} 64k", f"read -P 0x22 {64 * MiB} 1M")


# --------------------------------------------------------------------------
# 4. the primary worker dies: the parent restarts it


def test_primary_worker_killed_is_restarted_and_reconnects(tmp_path: Path) -> None:
    nbd.need("qemu-io", "nbdcopy")
    with Cluster(tmp_path, size=32 * MiB) as cl:
        cl.start_pair()
        uri = cl.nbd_uri("nodea", "r0")
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        vers = Versioned(0, 128)  # 128 blocks of 64 KiB: 8 MiB, 4 extents
        assert vers.record(nbd.qemu_io(uri, *vers.commands(range(1, 2)))) == 128
        first = cl.wait_synced("r0")

        bg = nbd.qemu_io_background(uri, vers.commands(range(2, 60)), tmp_path, "writes")
        cl.wait_status(
            "nodea",
            "r0",
            lambda st: st["stat_write"] >= first["stat_write"] + 200,
            30,
            "background writes",
        )
        mark = cl.mark("nodea")
        pid = cl.kill_worker("nodea", "r0")
        _, out, _ = bg.wait(60)
        acked = vers.record(out)
        assert 200 <= acked < 58 * 128, acked

        cl.wait_log("nodea", f"Worker process killed (pid={pid}, signal=9).", since=mark)
        cl.wait_log("nodea", "Restarting worker process.", since=mark)
        st = cl.wait_status(
            "nodea",
            "r0",
            lambda st: st["workerpid"] not in (0, pid) and st["status"] == "complete",
            30,
            "a new, connected worker",
        )
        assert st["role"] == "primary"
        assert cl.nbd_uri("nodea", "r0") == uri
        # Every acknowledged write reads back through the new worker's export.
        vers.verify(read_export(uri, tmp_path, "after-restart"), "nodea after the restart")
        cl.wait_synced("r0")
        nbd.assert_identical(a, b)
        # The new worker replicates.
        nbd.qemu_io(uri, f"write -P 0x5a {20 * MiB} 1M")
        cl.wait_synced("r0")
        nbd.assert_identical(a, b)


# --------------------------------------------------------------------------
# 5. the primary node goes away, the secondary is promoted, the old primary returns


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_failover_keeps_every_acknowledged_write(tmp_path: Path, how: str) -> None:
    nbd.need("qemu-io", "nbdcopy")
    with Cluster(tmp_path, size=32 * MiB) as cl:
        cl.start_pair()
        uri = cl.nbd_uri("nodea", "r0")
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        vers = Versioned(0, 128)
        assert vers.record(nbd.qemu_io(uri, *vers.commands(range(1, 2)))) == 128
        first = cl.wait_synced("r0")

        bg = nbd.qemu_io_background(uri, vers.commands(range(2, 60)), tmp_path, "writes")
        cl.wait_status(
            "nodea",
            "r0",
            lambda st: st["stat_write"] >= first["stat_write"] + 200,
            30,
            "background writes",
        )
        if how == "sigterm":
            assert cl.stop("nodea") == 0
        else:
            cl.kill9("nodea")
        _, out, _ = bg.wait(60)
        acked = vers.record(out)
        assert 200 <= acked < 58 * 128, acked

        cl.role("nodeb", "primary", "r0")
        uri_b = cl.nbd_uri("nodeb", "r0")
        st = cl.status("nodeb", "r0")
        assert st["status"] == "degraded"
        vers.verify(read_export(uri_b, tmp_path, "nodeb"), "nodeb after the failover")

        # The new primary takes writes while alone...
        more = vers.commands(range(100, 101), range(0, 128, 3))
        assert vers.record(nbd.qemu_io(uri_b, *more)) == len(more)
        # ...and the old primary comes back as its secondary.
        mark = cl.mark("nodeb")
        cl.start("nodea")
        cl.role("nodea", "secondary", "r0")
        m = cl.wait_log_re("nodeb", SYNC_DONE, 60, since=mark)
        cl.wait_synced("r0", node="nodeb")
        print(f"{how}: {acked} writes acknowledged, {m.group(1)} bytes synchronized back")
        nbd.assert_identical(a, b)
        vers.verify(nbd.data_area(a), "nodea after the failback sync")
        vers.verify(read_export(uri_b, tmp_path, "final"), "nodeb's export at the end")


# --------------------------------------------------------------------------
# Regressions found by the tests above, pinned down in-process


def _device(tmp_path: Path) -> PrimaryDevice:
    path = tmp_path / "provider.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    with Provider.open(str(path)) as provider:
        metadata_create(provider, "r0")
    log = ResourceAdapter(logging.getLogger("test"), "r0", "primary")
    local = LocalComponent.open(str(path), "r0", metaflush=True, log=log)
    return PrimaryDevice(local, replication=Replication.MEMSYNC, log=log)


def test_regression_write_waits_for_the_pending_bitmap_write_of_its_extent(
    tmp_path: Path,
) -> None:
    """Write A puts extent 0 in the bitmap and waits for the bitmap write;
    write B to the same extent adds nothing to the image, but its data must
    not reach the disk before A's bitmap write is durable either: a crash in
    between would leave B's data on one node with a clean extent on disk,
    never to be synchronised (found by the kill -9 tests' write-ahead audit)."""
    dev = _device(tmp_path)
    local = dev.local
    gate = threading.Event()
    flushing = threading.Event()
    real_durable = local.provider.pwrite_durable
    data_writes: list[tuple[int, bool]] = []
    real_write = local.write

    def slow_durable_write(data: bytes | bytearray | memoryview, offset: int) -> None:
        flushing.set()
        gate.wait(10)
        real_durable(data, offset)

    def recording_write(offset: int, data: bytes | bytearray | memoryview) -> None:
        data_writes.append((offset, gate.is_set()))
        real_write(offset, data)

    local.provider.pwrite_durable = slow_durable_write  # type: ignore[method-assign]
    local.write = recording_write  # type: ignore[method-assign]

    async def scenario() -> None:
        a = asyncio.create_task(dev.write(0, b"a" * 4096, False))
        for _ in range(1000):
            if flushing.is_set():
                break
            await asyncio.sleep(0.01)
        assert flushing.is_set(), "A never wrote the bitmap"
        b = asyncio.create_task(dev.write(4096, b"b" * 4096, False))
        for _ in range(20):
            await asyncio.sleep(0)
        assert data_writes == [], "B's data went out before A's bitmap write was durable"
        gate.set()
        await asyncio.wait_for(asyncio.gather(a, b), 10)
        assert sorted(data_writes) == [(0, True), (4096, True)]

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        local.close()


def test_regression_send_on_a_dying_connection_degrades_instead_of_failing(
    tmp_path: Path,
) -> None:
    """The transport is closing but its loss is not delivered yet: a write
    must complete locally and be marked for synchronisation, not fail with
    ConnClosedError (fio saw EIO when the secondary was killed mid-write)."""
    dev = _device(tmp_path)
    lost: list[str] = []

    async def scenario() -> None:
        a1, a2 = socket.socketpair()
        b1, b2 = socket.socketpair()
        out = await FramedConn.open(a1)
        inc = await FramedConn.open(b1)
        dev.remote = RemoteComponent(
            out,
            inc,
            version=2,
            checksum=Checksum.NONE,
            compression=Compression.NONE,
            on_disconnect=lost.append,
            log=dev.log,
        )
        out.abort()  # its connection_lost comes on a later loop iteration
        await asyncio.wait_for(dev.write(0, b"x" * 4096, False), 10)
        assert not dev.connected
        assert lost and "Unable to send a request" in lost[0]
        assert dev.am.in_syncmap(0, 4096)
        assert dev.local.read(0, 4096) == b"x" * 4096
        req = dev.remote.write(4096, b"y" * 512, False)
        assert req.done.result() == errno.ENOTCONN
        inc.abort()
        for s in (a2, b2):
            s.close()

    try:
        asyncio.run(scenario())
    finally:
        dev.local.close()


def test_regression_unaligned_writes_travel_as_whole_sectors(tmp_path: Path) -> None:
    """A 2-byte write through /dev/hast (e2fsck on the device file) reached the
    secondary unaligned and was refused with EINVAL (found by the keepalived
    test): the primary now reads, modifies and writes the covering sectors."""
    dev = _device(tmp_path)
    sent: list[tuple[int, int]] = []
    real_write = dev.local.write

    def recording_write(offset: int, data: bytes | bytearray | memoryview) -> None:
        sent.append((offset, len(data)))
        real_write(offset, data)

    dev.local.write = recording_write  # type: ignore[method-assign]

    async def scenario() -> None:
        await dev.write(0, b"\x11" * 1024, False)
        await dev.write(1072, b"\xab\xcd", False)
        await dev.trim(100, 1000, False)  # only sector 512..1024 is whole

    try:
        asyncio.run(scenario())
        assert sent == [(0, 1024), (1024, 512)]
        data = dev.local.read(0, 1536)
        assert data[:512] == b"\x11" * 512
        assert data[512:1024] == bytes(512)  # trimmed: the file punches a hole
        assert data[1024:1072] == bytes(48) and data[1072:1074] == b"\xab\xcd"
    finally:
        dev.local.close()
