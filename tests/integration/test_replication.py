"""Replication through real NBD clients, between two real hastd processes.

nodea (127.0.0.1) is primary, nodeb (127.0.0.2) secondary; both read one
shared hast.conf.  Data is written by qemu-io (sequential and many-in-flight
writes, discard, write -z), nbdcopy and qemu-img convert on nodea's NBD
export; afterwards both providers' data areas (located by their metadata)
must be byte-identical and equal to what the clients wrote.

Every replication mode gets one cluster whose hast.conf holds one resource
per checksum x compression pair (nine in all), so the 27 combinations cost
three cluster start-ups.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import nbd
from tests.helpers.cluster import Cluster, MiB

pytestmark = pytest.mark.timeout(180)

KiB = 1024
CHECKSUMS = ("none", "crc32", "sha256")
COMPRESSIONS = ("none", "hole", "lzf")
PAIRS = [f"{c}-{z}" for c, z in itertools.product(CHECKSUMS, COMPRESSIONS)]
SIZE = 32 * MiB


# --------------------------------------------------------------------------
# 1. roles, status, list, --json


def test_status_complete_on_both_nodes_with_nbd_uri(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cl:
        cl.start_pair()
        rundir = cl.nodes["nodea"].rundir
        expected_uri = f"nbd+unix:///r0?socket={rundir}/r0.nbd"
        for node, role in (("nodea", "primary"), ("nodeb", "secondary")):
            st = cl.wait_complete(node, "r0")
            assert st["role"] == role
            res = cl.hastctl(node, "status")
            assert res.returncode == 0, res.stderr
            line = res.stdout.splitlines()[1]
            assert line.startswith(f"r0\tcomplete {role:<15}"), res.stdout

        res = cl.hastctl("nodea", "list", "r0")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert "  status: complete" in lines
        assert "  role: primary" in lines
        assert f"  nbd: {expected_uri}" in lines
        assert "  dirty: 0 (0B)" in lines

        doc = json.loads(cl.hastctl("nodea", "status", "--json").stdout)
        (r0,) = doc["resources"]
        assert r0["nbd_uri"] == expected_uri
        assert r0["status"] == "complete"
        assert r0["workerpid"] > 0

        # The secondary serves no device.
        doc = json.loads(cl.hastctl("nodeb", "status", "--json").stdout)
        assert doc["resources"][0]["nbd_uri"] is None
        assert doc["resources"][0]["status"] == "complete"

        # The export is the real device: nbdinfo sees its size.
        nbd.need("nbdinfo")
        datasize = nbd.read_metadata(cl.local("nodea", "r0")).datasize
        assert nbd.run("nbdinfo", "--size", expected_uri).strip() == str(datasize)


# --------------------------------------------------------------------------
# 2. data through real clients, every mode x checksum x compression


@dataclass
class Model:
    """What the data area must hold; ``unknown`` ranges may hold either of
    several writes that were in flight together (both nodes must agree)."""

    data: bytearray
    unknown: list[tuple[int, int]] = field(default_factory=list)

    def put(self, offset: int, payload: bytes) -> None:
        self.data[offset : offset + len(payload)] = payload

    def fill(self, offset: int, length: int, byte: int) -> None:
        self.data[offset : offset + length] = bytes([byte]) * length

    def check(self, actual: bytes, what: str) -> None:
        assert len(actual) >= len(self.data)
        masked = bytearray(actual[: len(self.data)])
        expected = bytearray(self.data)
        for off, length in self.unknown:
            masked[off : off + length] = bytes(length)
            expected[off : off + length] = bytes(length)
        if masked != expected:
            first = next(i for i in range(len(expected)) if masked[i] != expected[i])
            raise AssertionError(
                f"{what}: byte {first} is {masked[first]:#x}, expected {expected[first]:#x}"
            )


def workload(uri: str, tmp: Path, seed: int) -> Model:
    """Write through nbdcopy, qemu-img convert and qemu-io; the expected first 24 MiB."""
    model = Model(bytearray(24 * MiB))
    # nbdcopy: 16 MiB of random data at 0.
    src = tmp / f"copy-{seed}.raw"
    model.put(0, nbd.random_file(src, 16 * MiB, seed))
    nbd.nbdcopy(str(src), uri)
    # qemu-img convert: 6 MiB at 0, over part of it.
    conv = tmp / f"conv-{seed}.raw"
    model.put(0, nbd.random_file(conv, 6 * MiB, seed + 1000))
    nbd.qemu_img_convert(str(conv), uri)
    src.unlink()
    conv.unlink()

    # qemu-io in [16 MiB, 24 MiB): sector-aligned, extent-crossing, many in
    # flight, overlapping in flight, discard, write -z.
    base = 16 * MiB
    cmds: list[str] = []

    def w(pattern: int, off: int, length: int, aio: bool = False) -> None:
        cmds.append(f"{'aio_write' if aio else 'write'} -P {pattern} {off} {length}")
        model.fill(off, length, pattern)

    w(0xA1, base, MiB)
    w(0xA2, base + MiB + 512, 4 * KiB)  # 512-aligned, not 4 KiB aligned
    w(0xA3, 18 * MiB - 64 * KiB, 128 * KiB)  # crosses an extent boundary
    for i in range(64):  # 64 writes in flight, disjoint
        w(0x10 + i, 19 * MiB + i * 64 * KiB, 64 * KiB, aio=True)
    cmds.append("aio_flush")
    ov = 23 * MiB
    for i in range(16):  # 16 overlapping writes in flight: order unknown
        w(0x60 + i, ov + i * 4 * KiB, 64 * KiB, aio=True)
    model.unknown.append((ov, 15 * 4 * KiB + 64 * KiB))
    cmds.append("aio_flush")
    cmds.append(f"discard {base + MiB} {256 * KiB}")
    model.fill(base + MiB, 256 * KiB, 0)
    cmds.append(f"write -z {base + 64 * KiB} {64 * KiB}")
    model.fill(base + 64 * KiB, 64 * KiB, 0)
    w(0xA4, 20 * MiB + 32 * KiB, 8 * KiB)  # over part of the in-flight batch
    cmds.append("flush")
    nbd.qemu_io(uri, *cmds)
    # Read back through the export, with qemu-io's own verification.
    nbd.qemu_io(
        uri,
        f"read -P 0xa3 {18 * MiB - 64 * KiB} {128 * KiB}",
        f"read -P 0 {base + MiB} {256 * KiB}",
        f"read -P 0xa4 {20 * MiB + 32 * KiB} {8 * KiB}",
    )
    return model


@pytest.mark.parametrize("mode", ["fullsync", "memsync", "async"])
def test_clients_data_identical_on_both_nodes(tmp_path: Path, mode: str) -> None:
    nbd.need("qemu-io", "qemu-img", "nbdcopy")
    options = {}
    for name in PAIRS:
        checksum, compression = name.split("-")
        options[name] = [f"replication {mode}", f"checksum {checksum}"]
        options[name].append(f"compression {compression}")
    with Cluster(tmp_path, resources=PAIRS, size=SIZE, resource_options=options) as cl:
        started = time.monotonic()
        cl.start_pair()
        for name in PAIRS:
            st = cl.status("nodea", name)
            assert st["replication"] == mode
            assert (st["checksum"], st["compression"]) == tuple(name.split("-"))
        setup = time.monotonic() - started
        models = {}
        for seed, name in enumerate(PAIRS):
            models[name] = workload(cl.nbd_uri("nodea", name), tmp_path, seed)
        written = time.monotonic() - started - setup
        for name in PAIRS:
            a, b = cl.local("nodea", name), cl.local("nodeb", name)
            if mode == "async":
                # FLUSH is local-only in async mode: wait for the peer.
                cl.wait_synced(name)
                nbd.wait_identical(a, b, timeout=30)
            else:
                # Acknowledged means on the secondary too: no waiting.
                nbd.assert_identical(a, b)
            models[name].check(nbd.data_area(a, 0, 24 * MiB), f"{name} on nodea")
            st = cl.wait_synced(name)
            assert st["stat_write_error"] == 0 and st["stat_read_error"] == 0
        print(f"{mode}: setup {setup:.1f} s, 9 workloads {written:.1f} s")


# --------------------------------------------------------------------------
# writes while a synchronisation copies the same extents


def test_writes_racing_a_full_synchronisation_end_identical(tmp_path: Path) -> None:
    """fio writes (and verifies) all over the device while a full
    synchronisation of 160 MiB of random data runs under it: sync chunks and
    regular writes lock each other out, so both providers end identical."""
    nbd.need("fio")
    with Cluster(
        tmp_path,
        size=160 * MiB,
        resource_options={"r0": ["checksum sha256", "compression lzf"]},
    ) as cl:
        cl.start_pair()
        a, b = cl.local("nodea", "r0"), cl.local("nodeb", "r0")
        uri = cl.nbd_uri("nodea", "r0")
        md = nbd.read_metadata(a)
        # The primary's disk holds data the secondary never had; a fresh
        # secondary gets all of it.
        cl.role("nodea", "init", "r0")
        nbd.fill_random(a)
        cl.role("nodeb", "init", "r0")
        assert cl.hastctl("nodeb", "create", "r0").returncode == 0
        cl.role("nodeb", "secondary", "r0")
        mark = cl.mark("nodea")
        cl.role("nodea", "primary", "r0")
        cl.wait_log("nodea", "Synchronization started.", since=mark)
        base = cl.status("nodea", "r0")["stat_write"]
        fio = nbd.Background(
            [
                "fio",
                "--name=race",
                "--ioengine=nbd",
                f"--uri={uri}",
                "--rw=randwrite",
                "--bsrange=4k-256k",
                "--iodepth=16",
                f"--size={96 * MiB}",
                "--verify=crc32c",
                "--verify_fatal=1",
            ],
            tmp_path,
            "fio",
        )
        # The race is real: fio writes while the synchronisation has work left.
        st = cl.wait_status(
            "nodea", "r0", lambda st: st["stat_write"] > base or not st["sync_left"], 60
        )
        assert st["sync_left"], f"the synchronisation ended before fio started writing: {st}"
        rc, out, err = fio.wait(120)
        assert rc == 0, f"fio failed:\n{out}\n{err}"
        m = cl.wait_log_re(
            "nodea", r"Synchronization complete\. \S+ \((\d+) bytes\)", 120, since=mark
        )
        assert int(m.group(1)) >= md.datasize
        st = cl.wait_synced("r0")
        assert st["stat_write_error"] == 0
        nbd.assert_identical(a, b)
