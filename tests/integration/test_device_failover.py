"""The device file of a primary under a real filesystem, through failover and back.

Two real hastd (nodea 127.0.0.1, nodeb 127.0.0.2, each with its own
``--devdir``); the primary's ``<devdir>/r0`` is attached to a loop device
with direct I/O, formatted and mounted, and used by programs that fsync.
What must hold, checked and not assumed:

1. the README's demo on ext4 and on xfs: files fsync'd before and during a
   ``kill -9`` of nodea's hastd and worker are all on nodeb once it is
   promoted, and the filesystem checks clean after its journal/log replay;
2. the same during heavy writes (fio with ``--fsync=1``, an O_DSYNC
   appender and the fsync'd tree writer), in fullsync and in memsync;
3. the failback: the old primary rejoins as secondary, only the dirty
   extents are copied, both data areas end byte-identical and it can be
   primary again with every file intact;
4. leaving primary is refused while the device is held (the refusal names
   the loop device and the mount point, the device keeps serving) and
   allowed once it is released; ``role -f`` takes it away and the holders
   get I/O errors.

Two product bugs found on the way are pinned down at the end as regression
tests: ``hastctl role primary`` returned before the device file was
served, and hastctl dropped the worker's ``devpath``.

Every wait polls with a deadline; mounts, loop devices and processes are
removed in ``finally`` blocks even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyhast.cli.control_client import exchange
from pyhast.wire.control import ControlRequest
from tests.helpers import fs, nbd
from tests.helpers.cluster import Cluster, MiB

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(180),
    pytest.mark.skipif(fs.mount_skip_reason() is not None, reason=fs.mount_skip_reason() or ""),
]

RES = "r0"
#: 1 MiB extents, 16 kept dirty: resynchronisations stay small.
CREATE_OPTS = ("-e", "1M", "-k", "16")
SIZES = {"ext4": 128 * MiB, "xfs": 320 * MiB}  # mkfs.xfs refuses less than 300 MB
SYNC_DONE = r"Synchronization complete\. \S+ \((\d+) bytes\) synchronized"


# --------------------------------------------------------------------------
# The scenario shared by the tests


@dataclass
class Crash:
    """What a failover left: the manifest of durable data, and nodeb's mount."""

    cl: Cluster
    storage: fs.Storage
    fstype: str
    tmp: Path
    manifest: fs.Manifest = field(default_factory=fs.Manifest)
    inflight: dict[str, str] = field(default_factory=dict)
    loop_b: str = ""
    datasize: int = 0
    numbers: dict[str, object] = field(default_factory=dict)

    @property
    def mnt_a(self) -> Path:
        return self.tmp / "mnt-a"

    @property
    def mnt_b(self) -> Path:
        return self.tmp / "mnt-b"


@contextlib.contextmanager
def setup(
    tmp_path: Path, fstype: str, replication: str | None = None
) -> Iterator[tuple[Cluster, fs.Storage]]:
    """A cluster and the storage a test makes on it; on the way out the mounts
    and loop devices go first (even on failure), then the daemons."""
    options = {RES: [f"replication {replication}"]} if replication else None
    with (
        Cluster(tmp_path, size=SIZES[fstype], resource_options=options) as cl,
        fs.storage_for(tmp_path) as storage,
    ):
        yield cl, storage


def start(cl: Cluster) -> int:
    """Create both providers, start both hastd, nodeb secondary, nodea primary,
    initial synchronisation done; the data size."""
    cl.create(*CREATE_OPTS)
    cl.start("nodea")
    cl.start("nodeb")
    cl.role("nodeb", "secondary", RES)
    datasize = promote(cl, "nodea")
    cl.wait_synced(RES, timeout=60)
    return datasize


def promote(cl: Cluster, node: str) -> int:
    """``hastctl role primary`` (which waits for the device), then the device
    file must be a regular file of the data size; its data size.

    It is polled for (10 s at most) rather than required at once: hastctl
    returns as soon as the NBD export is up, a few milliseconds before the
    file appears (see test_role_primary_returns_only_once_the_device_is_there).
    """
    cl.role(node, "primary", RES)
    device = cl.device(node, RES)
    datasize = nbd.read_metadata(cl.local(node, RES)).datasize
    if not (is_device(device, datasize) and fs.is_mounted(device)):
        print(f"'hastctl role primary' returned before {device} was served")
        fs.wait_for(lambda: is_device(device, datasize), 10, f"{device} to be served")
    assert fs.is_mounted(device), f"{device} is not a mount point"
    # The worker reports it (a little after the file is served).
    fs.wait_for(lambda: devpath(cl, node) == str(device), 10, f"devpath {device}")
    return datasize


def is_device(device: Path, datasize: int) -> bool:
    try:
        st = os.stat(device)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == datasize


def dirty_extents(provider: Path) -> int:
    """Extents marked dirty in a provider's on-disk bitmap."""
    md = nbd.read_metadata(provider)
    nextents = -(-md.datasize // md.extentsize)
    bitmap = nbd.read_bitmap(provider)
    return sum(1 for i in range(nextents) if bitmap[i // 8] >> (i % 8) & 1)


def devpath(cl: Cluster, node: str) -> str | None:
    """The ``devpath`` field of the worker's status, as hastd sends it (read
    from the raw reply, independent of hastctl's parsing)."""
    reply = exchange(f"uds://{cl.nodes[node].control}", ControlRequest.status([RES]).to_nv())
    value = reply.get_string("devpath0", default="")
    return value or None


def fill_and_crash(
    cl: Cluster, storage: fs.Storage, fstype: str, tmp: Path, *, heavy: bool
) -> Crash:
    """The demo's story up to a verified nodeb: mkfs + mount on nodea, a tree
    of fsync'd files, writers in the background, kill -9 of nodea's hastd and
    worker, the dead side torn down, nodeb promoted, fsck, mount, verify."""
    crash = Crash(cl, storage, fstype, tmp)
    crash.datasize = start(cl)
    dev_a = cl.device("nodea", RES)
    loop_a = storage.attach(dev_a)
    fs.mkfs(fstype, loop_a)
    storage.mount(loop_a, crash.mnt_a, fstype)
    t0 = time.monotonic()
    tree_bytes = fs.write_tree(crash.mnt_a, crash.manifest, dirs=4, files=25)
    crash.numbers["tree"] = f"{len(crash.manifest.files)} files, {tree_bytes} bytes"
    crash.numbers["tree_s"] = round(time.monotonic() - t0, 1)

    writer = fs.BackgroundWriter(crash.mnt_a, crash.manifest)
    appender = fs.DsyncAppender(crash.mnt_a, crash.manifest) if heavy else None
    fio: nbd.Background | None = None
    try:
        before = cl.status("nodea", RES)
        if heavy:
            (crash.mnt_a / "fio").mkdir()
            fio = nbd.Background(
                [
                    "fio",
                    "--name=heavy",
                    f"--directory={crash.mnt_a / 'fio'}",
                    "--rw=randwrite",
                    "--bs=16k",
                    "--size=8M",
                    "--numjobs=2",
                    "--ioengine=psync",
                    "--fsync=1",
                    "--time_based",
                    "--runtime=60",
                    "--group_reporting",
                ],
                tmp,
                "fio",
            )
        writer.start()
        if appender is not None:
            appender.start()
        writer.wait_progress(50)
        if heavy:
            assert appender is not None and fio is not None
            fs.wait_for(
                lambda: appender.durable >= 64 * 16 * 1024 or not appender.is_alive(),
                30,
                "1 MiB of O_DSYNC appends",
            )
            assert appender.is_alive(), f"the O_DSYNC appender stopped: {appender.error!r}"
            cl.wait_status(
                "nodea",
                RES,
                lambda st: st["stat_flush"] >= before["stat_flush"] + 1500,
                30,
                "fio's fsyncs",
            )
            assert fio.running(), f"fio ended before the kill: {fio.wait(5)}"
        last = cl.status("nodea", RES)
        crash.numbers["writes_before_kill"] = last["stat_write"] - before["stat_write"]
        crash.numbers["flushes_before_kill"] = last["stat_flush"] - before["stat_flush"]
        cl.kill9("nodea")
        crash.inflight = dict(writer.inflight)
        writer.finish(30)
        if appender is not None:
            appender.finish(30)
        if fio is not None:
            rc, out, _ = fio.wait(30)
            crash.numbers["fio_rc"] = rc
            assert rc != 0, f"fio went on without errors on a dead device:\n{out}"
    finally:
        writer.stop()
        if appender is not None:
            appender.stop()
        if fio is not None:
            fio.kill()
    crash.inflight.update(writer.inflight)
    crash.numbers["fsynced_during"] = writer.done
    if appender is not None:
        crash.numbers["dsync_bytes"] = appender.durable
    # The holders of the dead device get errors, not hangs.
    fs.holder_io_fails(
        ["dd", "if=/dev/zero", f"of={crash.mnt_a / 'after-kill'}", "bs=4k", "count=1", "conv=fsync"]
    )
    storage.teardown(crash.mnt_a, lazy=True)

    promote(cl, "nodeb")
    crash.loop_b = storage.attach(cl.device("nodeb", RES))
    if fstype == "ext4":
        fs.fsck_ext4(crash.loop_b)
    else:
        fs.check_xfs(crash.loop_b, crash.mnt_b)
    storage.mount(crash.loop_b, crash.mnt_b, fstype)
    bad = fs.verify(crash.mnt_b, crash.manifest, crash.inflight)
    assert not bad, f"{len(bad)} of {len(crash.manifest)} durable files differ on nodeb: {bad[:20]}"
    crash.numbers["verified"] = len(crash.manifest)
    return crash


# --------------------------------------------------------------------------
# 1. the demo scenario, ext4 and xfs


@pytest.mark.parametrize("fstype", fs.FSTYPES)
def test_demo_failover_keeps_every_fsynced_file(tmp_path: Path, fstype: str) -> None:
    fs.need(*fs.fs_tools(fstype), "dd")
    with setup(tmp_path, fstype) as (cl, storage):
        crash = fill_and_crash(cl, storage, fstype, tmp_path, heavy=False)
        st = cl.status("nodeb", RES)
        assert st["role"] == "primary" and st["status"] == "degraded"
        print(f"{fstype}: {crash.numbers}")


# --------------------------------------------------------------------------
# 2. failover during heavy writes, fullsync and memsync


@pytest.mark.parametrize("replication", ["fullsync", "memsync"])
def test_failover_during_heavy_writes(tmp_path: Path, replication: str) -> None:
    fs.need(*fs.fs_tools("ext4"), "fio", "dd")
    with setup(tmp_path, "ext4", replication) as (cl, storage):
        crash = fill_and_crash(cl, storage, "ext4", tmp_path, heavy=True)
        assert cl.status("nodeb", RES)["replication"] == replication
        print(f"{replication}: {crash.numbers}")


# --------------------------------------------------------------------------
# 3. failback: the old primary rejoins, only dirty extents are copied


def test_failback_syncs_dirty_extents_and_promotes_again(tmp_path: Path) -> None:
    fs.need(*fs.fs_tools("ext4"), "dd")
    with setup(tmp_path, "ext4") as (cl, storage):
        crash = fill_and_crash(cl, storage, "ext4", tmp_path, heavy=False)
        # nodeb keeps working alone.
        after = fs.write_tree(crash.mnt_b, crash.manifest, prefix="after", dirs=2, files=10)
        alone = cl.status("nodeb", RES)
        assert alone["dirty"] > 0
        # The extents the dead primary had marked on disk (write-ahead): they
        # may hold writes nodeb never got, so they are copied back too.
        extent = alone["extentsize"]
        dirty_a = dirty_extents(cl.local("nodea", RES)) * extent

        mark = cl.mark("nodeb")
        cl.start("nodea")
        cl.role("nodea", "secondary", RES)
        m = cl.wait_log_re("nodeb", SYNC_DONE, 60, since=mark)
        synced = int(m.group(1))
        cl.wait_synced(RES, 60, node="nodeb")
        print(
            f"failback: synchronized {synced} of {crash.datasize} bytes; dirty: {alone['dirty']} "
            f"on nodeb, {dirty_a} in nodea's bitmap ({after} bytes written on nodeb alone)"
        )
        # Only the dirty extents (nodeb's, plus those nodea marked before it
        # died; a few more for what ext4 commits meanwhile), never the device.
        assert 0 < synced <= alone["dirty"] + dirty_a + 4 * extent, (
            f"{synced} bytes synchronized: more than the dirty extents"
        )
        assert synced * 4 < crash.datasize, f"{synced} of {crash.datasize} bytes synchronized"

        # Demote nodeb as an administrator would, then compare.
        storage.teardown(crash.mnt_b)
        cl.wait_synced(RES, 30, node="nodeb")
        cl.role("nodeb", "secondary", RES)
        assert not os.path.exists(cl.device("nodeb", RES))
        cl.wait_status("nodea", RES, lambda st: st["role"] == "secondary", 10, "secondary")
        nbd.assert_identical(cl.local("nodea", RES), cl.local("nodeb", RES))

        # nodea primary again: the filesystem mounts without a check, every file is there.
        promote(cl, "nodea")
        storage.mount_device(cl.device("nodea", RES), crash.mnt_a, "ext4")
        bad = fs.verify(crash.mnt_a, crash.manifest, crash.inflight)
        assert not bad, f"{len(bad)} files differ on nodea after the failback: {bad[:20]}"
        fs.write_synced(crash.mnt_a / "back-on-a", fs.content(5, 4096))
        print(f"failback: {len(crash.manifest)} files verified on nodea")
        cl.wait_status("nodea", RES, lambda st: st["status"] == "complete", 30, "'complete'")


# --------------------------------------------------------------------------
# 4. leaving primary while the device is held


HOLDER = """
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
sys.stdin.readline()
try:
    os.pread(fd, 4096, 0)
    print("read ok", flush=True)
except OSError as exc:
    print("error", errno.errorcode.get(exc.errno, exc.errno), flush=True)
"""


def test_role_change_refused_while_device_is_held(tmp_path: Path) -> None:
    fs.need(*fs.fs_tools("ext4"), "dd")
    mnt = tmp_path / "mnt-a"
    holder: subprocess.Popen[str] | None = None
    with setup(tmp_path, "ext4") as (cl, storage):
        try:
            start(cl)
            device = cl.device("nodea", RES)
            loop = storage.attach(device)
            fs.mkfs("ext4", loop)
            storage.mount(loop, mnt, "ext4")
            manifest = fs.Manifest()
            fs.write_tree(mnt, manifest, dirs=1, files=10)
            pid = cl.status("nodea", RES)["workerpid"]

            res = cl.hastctl("nodea", "role", "secondary", RES)
            assert res.returncode != 0, f"role secondary succeeded while mounted:\n{res.stderr}"
            assert os.path.basename(loop) in res.stderr, res.stderr
            assert str(mnt) in res.stderr, res.stderr
            print(f"refused ({res.returncode}): {res.stderr.strip()}")
            st = cl.status("nodea", RES)
            assert st["role"] == "primary" and st["workerpid"] == pid
            assert devpath(cl, "nodea") == str(device)
            # Still served: new durable files, old ones intact.
            fs.write_tree(mnt, manifest, prefix="still", dirs=1, files=10, seed=500)
            assert not fs.verify(mnt, manifest)

            storage.teardown(mnt)
            res = cl.hastctl("nodea", "role", "secondary", RES)
            assert res.returncode == 0, res.stderr
            assert not os.path.lexists(device), f"{device} is still there after the role change"
            assert cl.status("nodea", RES)["role"] == "secondary"

            # Forced, while mounted and while a process has the file open.
            promote(cl, "nodea")
            loop = storage.mount_device(device, mnt, "ext4")
            assert not fs.verify(mnt, manifest)
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(device)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "open"
            refused = cl.hastctl("nodea", "role", "secondary", RES)
            assert refused.returncode != 0
            assert f"pid {holder.pid}" in refused.stderr, refused.stderr

            mark = cl.mark("nodea")
            res = cl.hastctl("nodea", "role", "-f", "secondary", RES)
            assert res.returncode == 0, res.stderr
            cl.wait_log("nodea", "Forcing role secondary while", 10, since=mark)
            assert cl.status("nodea", RES)["role"] == "secondary"
            # The holders get errors, and none of them hangs.
            out, _ = holder.communicate("go\n", timeout=30)
            assert out.startswith("error"), f"the process holding {device} read: {out!r}"
            fs.holder_io_fails(
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={mnt / 'after-force'}",
                    "bs=4k",
                    "count=1",
                    "conv=fsync",
                ]
            )
            fs.holder_io_fails(
                ["dd", f"if={loop}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"]
            )
            storage.teardown(mnt, lazy=True)
            assert not fs.is_mounted(mnt)
            assert fs.loop_backing(loop) is None
            print(f"forced: holder got {out.strip()}")
        finally:
            if holder is not None and holder.poll() is None:
                holder.kill()
                holder.wait(10)


# --------------------------------------------------------------------------
# Product bugs found on the way, pinned down


#: Loaded by every Python process of the test's daemons (PYTHONPATH): the
#: primary's device takes DELAY seconds longer to start, as a slow mount on a
#: loaded machine would.
SLOW_DEVICE = """
import asyncio, os
DELAY = float(os.environ.get("PYHAST_TEST_DEVICE_START_DELAY") or 0)
if DELAY:
    from pyhast.frontend.fuse import device as _device
    _start = _device.HastDevice.start
    async def start(self, *args, **kwargs):
        await asyncio.sleep(DELAY)
        return await _start(self, *args, **kwargs)
    _device.HastDevice.start = start
"""


def test_role_primary_returns_only_once_the_device_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a device that takes 1 s to start, ``hastctl role primary`` must
    still return only once the device file is served (it also happens
    without the delay, in a few per cent of promotions: the window is 1-5 ms)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_DEVICE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("PYHAST_TEST_DEVICE_START_DELAY", "1.0")
    with setup(tmp_path, "ext4") as (cl, _):
        cl.create(*CREATE_OPTS)
        cl.start("nodea")
        device = cl.device("nodea", RES)
        datasize = nbd.read_metadata(cl.local("nodea", RES)).datasize
        res = cl.hastctl("nodea", "role", "primary", RES)
        served = is_device(device, datasize) and fs.is_mounted(device)
        path = devpath(cl, "nodea")
        # Whatever hastctl said, the device does come (so the delay did work).
        fs.wait_for(lambda: devpath(cl, "nodea") == str(device), 10, "devpath")
        assert res.returncode == 0, res.stderr
        assert served, (
            f"'hastctl role primary' exited 0 while {device} was not served yet "
            f"(devpath {path}, nbd_uri {cl.status('nodea', RES)['nbd_uri']})"
        )


def test_hastctl_shows_the_device_path(tmp_path: Path) -> None:
    with setup(tmp_path, "ext4") as (cl, _):
        cl.create(*CREATE_OPTS)
        cl.start("nodea")
        device = cl.device("nodea", RES)
        promote(cl, "nodea")
        assert devpath(cl, "nodea") == str(device)  # hastd does send it
        res = cl.hastctl("nodea", "list", RES)
        assert res.returncode == 0, res.stderr
        doc = json.loads(cl.hastctl("nodea", "status", "--json").stdout)["resources"][0]
        assert doc.get("devpath") == str(device), doc
        assert str(device) in res.stdout, res.stdout
