"""The device file /dev/hast/<name> (HastDevice) with real mounts, loop devices and filesystems.

The device runs on an asyncio loop in a background thread (the thread that
serves the file must never do I/O on it), over a FileBackend on a sparse
temporary file wrapped by a backend that counts flushes and trims.  The
test thread uses the file like an administrator would: losetup
--direct-io=on, mkfs.ext4/mkfs.xfs, mount, fsync, fallocate, fsck.  Every
external command and every wait is bounded; mounts and loop devices under
the test's temporary directory are removed in ``finally`` even on failure.

Tests that mount need root and /dev/fuse and skip without them (saying
which); the codec and holder-reporting tests run anywhere.  Every test fails
if the device code logs an unexpected WARNING or worse.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyhast.frontend.fuse import (
    DeviceBusy,
    DeviceError,
    HastDevice,
    Holders,
    LoopHolder,
    ProcessHolder,
    find_holders,
)
from pyhast.frontend.fuse import device as device_mod
from pyhast.frontend.fuse import protocol as proto
from pyhast.frontend.fuse.kernel import mountinfo
from pyhast.frontend.nbd.backend import FileBackend
from pyhast.frontend.nbd.server import NBDServer

T = TypeVar("T")
MiB = 1024 * 1024
SIZE = 320 * MiB  # mkfs.xfs wants at least 300 MiB
TIMEOUT = 60  # seconds, for every external command
LOGGER = "pyhast.frontend.fuse"

pytestmark = pytest.mark.timeout(240)


def _mount_skip_reason() -> str | None:
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (mount(2), loop devices)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent"
    return None


needs_mount = pytest.mark.skipif(
    _mount_skip_reason() is not None, reason=_mount_skip_reason() or ""
)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(
    *args: str, timeout: float = TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def is_mounted(path: str) -> bool:
    return any(m.mountpoint == path for m in mountinfo())


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- log hygiene ------------------------------------------------------------------


@pytest.fixture
def expect_logs() -> list[str]:
    """Substrings of the WARNING-or-worse records a test expects (and requires)."""
    return []


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_unexpected_logs(expect_logs: list[str]) -> Iterator[None]:
    logger = logging.getLogger(LOGGER)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    for text in expect_logs:
        assert any(text in m for m in handler.messages), (
            f"expected a log with {text!r}: {handler.messages}"
        )
    unexpected = [m for m in handler.messages if not any(t in m for t in expect_logs)]
    assert not unexpected, f"unexpected warnings: {unexpected}"


# -- backend and loop helpers -----------------------------------------------------


class CountingBackend:
    """A BlockBackend that forwards to a FileBackend and counts what it is asked."""

    def __init__(self, inner: FileBackend) -> None:
        self.inner = inner
        self.flushes = 0
        self.trims: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []
        self.fail_reads = False
        self.jitter = 0.0  #: writes sleep up to this long (completions out of order)
        self._rng = random.Random(7)

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def block_size(self) -> tuple[int, int, int]:
        return self.inner.block_size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def can_multi_conn(self) -> bool:
        return self.inner.can_multi_conn

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        if self.jitter:
            await asyncio.sleep(self._rng.random() * self.jitter)
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        self.flushes += 1
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self.trims.append((offset, length))
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.zeroes.append((offset, length))
        await self.inner.write_zeroes(offset, length, fua, may_trim)


class LoopThread:
    """An asyncio loop in a background thread: the device's home."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="device-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        assert not self._thread.is_alive(), "device loop did not stop"
        self.loop.close()


@dataclass
class Env:
    tmp: Path
    image: Path
    devdir: Path
    backend: CountingBackend
    lt: LoopThread
    device: HastDevice
    loops: list[str] = field(default_factory=list)  #: loop devices to detach at the end

    @property
    def path(self) -> str:
        return self.device.path

    def start(self) -> None:
        self.lt.run(self.device.start())

    def stop(self, force: bool = False) -> None:
        self.lt.run(self.device.stop(force))

    def losetup(self) -> str:
        dev = run("losetup", "-f", "--show", "--direct-io=on", self.path).stdout.strip()
        self.loops.append(dev)
        name = os.path.basename(dev)
        assert Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"
        return dev


def detach_loop(dev: str, path: str) -> None:
    """Detach a loop device still bound to path, or to a lazily unmounted device file.

    The root of a lazily unmounted FUSE mount shows as "/" in backing_file.
    """
    try:
        backing = Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text()
    except OSError:
        return  # already detached
    if backing.strip() in (path, "/"):
        run("losetup", "-d", dev, check=False)


def cleanup_under(tmp: Path, *, devices: bool) -> None:
    """Unmount filesystems under tmp, detach loop devices backed by files under it.

    ``devices`` also lazily unmounts device files (a device that is still
    running would log the loss of its session).
    """
    prefix = str(tmp) + "/"
    for m in sorted(mountinfo(), key=lambda m: -len(m.mountpoint)):
        if m.mountpoint.startswith(prefix) and m.fstype != device_mod.FSTYPE:
            run("umount", "-l", m.mountpoint, check=False)
    for entry in sorted(Path("/sys/block").glob("loop*")):
        backing = entry / "loop" / "backing_file"
        try:
            target = backing.read_text().strip()
        except OSError:
            continue
        if target.startswith(prefix):
            run("losetup", "-d", f"/dev/{entry.name}", check=False)
    for m in mountinfo():
        if devices and m.mountpoint.startswith(prefix):
            run("umount", "-l", m.mountpoint, check=False)


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def make(
        size: int = SIZE, *, read_only: bool = False, start: bool = True, **kwargs: Any
    ) -> Env:
        image = tmp_path / f"backing{len(envs)}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        backend = CountingBackend(FileBackend(image, read_only=read_only))
        devdir = tmp_path / "dev"
        lt = LoopThread()
        device = HastDevice(backend, f"r{len(envs)}", devdir=devdir, start_timeout=20, **kwargs)
        env = Env(tmp_path, image, devdir, backend, lt, device)
        envs.append(env)
        if start:
            env.start()
        return env

    try:
        yield make
    finally:
        cleanup_under(tmp_path, devices=False)
        for env in envs:
            for dev in env.loops:
                detach_loop(dev, env.path)
        for env in envs:
            try:
                env.lt.run(env.device.stop(force=True))
            finally:
                env.lt.close()
                env.backend.inner.close()
        cleanup_under(tmp_path, devices=True)


def same_bytes(a: str, b: str, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        done = 0
        while done < size:
            ca, cb = fa.read(4 * MiB), fb.read(4 * MiB)
            if ca != cb or not ca:
                return False
            done += len(ca)
        return fa.read(1) == b"" and fb.read(1) == b""


# -- tests without root -----------------------------------------------------------


def test_init_reply_negotiates_limits() -> None:
    kernel_flags = int(
        proto.InitFlag.ASYNC_READ | proto.InitFlag.ASYNC_DIO | proto.InitFlag.MAX_PAGES | 1 << 3
    )
    reply, neg = proto.encode_init(7, 44, 131072, kernel_flags, max_background=256, max_write=MiB)
    length, error, unique = proto.OUT_HEADER.unpack_from(reply)
    assert (length, error, unique) == (len(reply), 0, 7) and length == 16 + 64
    assert neg.minor == proto.FUSE_MINOR
    assert neg.flags == kernel_flags & ~(1 << 3)  # only what we want and the kernel offers
    assert (neg.max_background, neg.congestion_threshold) == (256, 192)
    assert (neg.max_write, neg.max_pages) == (MiB, 256)
    # Without FUSE_MAX_PAGES the kernel sends at most 32 pages.
    _, neg = proto.encode_init(1, 26, 0, 0, max_background=100000, max_write=MiB)
    assert (neg.minor, neg.max_background, neg.max_write) == (26, 0xFFFF, 32 * 4096)


def test_decode_write_and_reject_truncated() -> None:
    payload = b"x" * 100
    body = proto._RW_IN.pack(0, 4096, len(payload), 0, 0, 0, 0) + payload
    raw = proto.IN_HEADER.pack(40 + len(body), proto.Opcode.WRITE, 9, 1, 0, 0, 42, 0, 0) + body
    buf = bytearray(raw) + bytearray(100)  # the reusable buffer is larger than the request
    req = proto.decode_request(memoryview(buf), len(raw))
    assert (req.opcode, req.unique, req.offset, req.length, req.data) == (16, 9, 4096, 100, payload)
    assert req.pid == 42
    with pytest.raises(proto.ProtocolError):
        proto.decode_request(memoryview(buf), len(raw) - 1)  # length disagrees
    short = proto.IN_HEADER.pack(48, proto.Opcode.READ, 1, 1, 0, 0, 0, 0, 0) + bytes(8)
    with pytest.raises(proto.ProtocolError):
        proto.decode_request(memoryview(short), len(short))


def test_busy_message_names_loop_and_process() -> None:
    holders = Holders(
        "/dev/hast/r0",
        loops=(LoopHolder("loop0", mountpoints=("/mnt/x",)),),
        processes=(ProcessHolder(1234, "dd"),),
    )
    assert str(DeviceBusy(holders)) == (
        "/dev/hast/r0 is in use by loop0 (mounted on /mnt/x) and by pid 1234 (dd); "
        "unmount and detach it, or use force."
    )
    assert not Holders("/dev/hast/r0")


def test_find_holders_reads_proc_and_sys(tmp_path: Path) -> None:
    """find_holders on a fake /proc and /sys tree."""
    path = "/dev/hast/r0"
    proc, sysfs = tmp_path / "proc", tmp_path / "sys"
    for pid, comm, target in [(1234, "dd", path), (77, "fio", "/dev/loop3"), (5, "sh", "/x")]:
        (proc / str(pid) / "fd").mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
        (proc / str(pid) / "fd" / "3").symlink_to(target)
    (proc / "5" / "maps").write_text(f"7f00-7f01 rw-s 00000000 00:28 1    {path}\n")
    for name, backing, dev in [("loop3", path, "7:3"), ("loop4", "/other", "7:4")]:
        (sysfs / "block" / name / "loop").mkdir(parents=True)
        (sysfs / "block" / name / "loop" / "backing_file").write_text(backing + "\n")
        (sysfs / "block" / name / "dev").write_text(dev + "\n")
        (sysfs / "block" / name / "holders").mkdir()
    (sysfs / "block" / "loop3" / "loop3p1").mkdir()
    (sysfs / "block" / "loop3" / "loop3p1" / "dev").write_text("259:0\n")
    (sysfs / "block" / "loop3" / "holders" / "dm-0").mkdir()
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 1 7:3 / /mnt/x rw - ext4 /dev/loop3 rw\n"
        "31 1 259:0 / /mnt/with\\040space rw shared:1 - xfs /dev/loop3p1 rw\n"
        "32 1 7:4 / /mnt/other rw - ext4 /dev/loop4 rw\n"
        "33 1 0:50 / /dev/hast/r0 rw - fuse.hast hast/r0 rw\n"
        "34 1 0:50 / /srv/bind rw - fuse.hast hast/r0 rw\n"
    )
    holders = find_holders(
        path, dev=(0, 50), proc_root=str(proc), sys_root=str(sysfs), mountinfo_path=str(info)
    )
    assert holders.loops == (
        LoopHolder(
            "loop3",
            mountpoints=("/mnt/with space", "/mnt/x"),
            openers=(ProcessHolder(77, "fio"),),
            stacked=("dm-0",),
        ),
    )
    assert holders.processes == (ProcessHolder(5, "sh"), ProcessHolder(1234, "dd"))
    assert holders.mounts == ("/srv/bind",)
    assert holders.describe() == (
        "loop3 (mounted on /mnt/with space, /mnt/x; open by pid 77 (fio); used by dm-0) "
        "and by pid 5 (sh), pid 1234 (dd) and by a bind mount on /srv/bind"
    )


def test_io_flusher_refusal_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger(LOGGER + ".test")
    device_mod._io_flusher_logged = False
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    results = [device_mod._mark_io_flusher(log) for _ in range(2)]
    assert results[0] == results[1]
    notes = [r for r in caplog.records if "I/O flusher" in r.getMessage()]
    assert len(notes) == (0 if results[0] else 1)
    assert all(r.levelno == logging.DEBUG for r in notes)


# -- tests with real mounts -------------------------------------------------------


@needs_mount
def test_file_has_the_size_and_serves_the_backend(make_env: Callable[..., Env]) -> None:
    env = make_env()
    st = os.stat(env.path)
    assert os.path.isfile(env.path) and st.st_size == SIZE
    assert env.device.running and env.device.dev == (os.major(st.st_dev), os.minor(st.st_dev))
    entry = next(m for m in mountinfo() if m.mountpoint == env.path)
    assert (entry.fstype, entry.source) == ("fuse.hast", "hast/r0")
    conn = Path(f"/sys/fs/fuse/connections/{os.minor(st.st_dev)}/max_background")
    if conn.exists():
        assert int(conn.read_text()) == 256
    data = random.Random(1).randbytes(3 * MiB)
    with open(env.path, "r+b", buffering=0) as f:
        assert f.seek(0, os.SEEK_END) == SIZE
        os.pwrite(f.fileno(), data, 5 * MiB + 512)
        assert os.pread(f.fileno(), len(data), 5 * MiB + 512) == data
        with pytest.raises(OSError) as info:
            os.pwrite(f.fileno(), b"x", SIZE)  # a device does not grow
        assert info.value.errno == errno.ENOSPC
        os.ftruncate(f.fileno(), 0)  # like O_TRUNC on a block device: ignored
    assert os.stat(env.path).st_size == SIZE
    with open(env.image, "rb") as f:
        f.seek(5 * MiB + 512)
        assert f.read(len(data)) == data
    # Through the backend's other door (as NBD would write): visible on a fresh open.
    env.lt.run(env.backend.write(0, b"N" * 4096, False))
    with open(env.path, "rb") as f:
        assert f.read(4096) == b"N" * 4096
    os.chmod(env.path, 0o640)
    assert os.stat(env.path).st_mode & 0o777 == 0o640
    env.stop()
    assert not is_mounted(env.path) and not os.path.exists(env.path)
    assert not env.device.running


@needs_mount
def test_fsync_flushes_and_punch_hole_trims(make_env: Callable[..., Env]) -> None:
    need("fallocate")
    env = make_env()
    b = env.backend
    with open(env.path, "r+b", buffering=0) as f:
        os.pwrite(f.fileno(), b"\xaa" * (1 * MiB), 8 * MiB)
        before = b.flushes
        os.fsync(f.fileno())
        assert b.flushes == before + 1
        os.fdatasync(f.fileno())
        assert b.flushes == before + 2
    assert env.device.stats.flushes >= 2
    run("fallocate", "--punch-hole", "--offset", str(8 * MiB + 4096), "--length", "65536", env.path)
    assert b.trims == [(8 * MiB + 4096, 65536)]
    with open(env.path, "rb") as f:
        f.seek(8 * MiB)
        chunk = f.read(4096 + 65536 + 4096)
    assert chunk == b"\xaa" * 4096 + bytes(65536) + b"\xaa" * 4096
    with open(env.image, "rb") as f:
        f.seek(8 * MiB + 4096)
        assert f.read(65536) == bytes(65536)
    proc = run(
        "fallocate", "--zero-range", "--offset", str(9 * MiB - 8192), "--length", "8192",
        env.path, check=False,
    )  # fmt: skip
    if proc.returncode == 0:  # kernels before 6.x refuse zero-range on FUSE
        assert b.zeroes == [(9 * MiB - 8192, 8192)]
    # Preallocation inside the device is a no-op; beyond its end it cannot grow.
    run("fallocate", "--keep-size", "--offset", "0", "--length", str(MiB), env.path)
    assert run("fallocate", "--offset", str(SIZE - 4096), "--length", "8192", env.path,
               check=False).returncode != 0  # fmt: skip


@needs_mount
def test_nbd_and_device_share_the_backend(make_env: Callable[..., Env]) -> None:
    """Writes through NBD show in the file and the other way round, on one backend."""
    need("qemu-io")
    env = make_env(64 * MiB)
    sock = env.tmp / "nbd.sock"
    server = NBDServer({"r0": env.backend}, unix_path=sock)
    env.lt.run(server.start())
    try:
        uri = server.uri("r0")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush", uri)
        with open(env.path, "rb") as f:
            f.seek(1 * MiB)
            assert f.read(65536) == b"\x5a" * 65536
        with open(env.path, "r+b", buffering=0) as f:
            os.pwrite(f.fileno(), b"\x33" * 65536, 2 * MiB)
            os.fsync(f.fileno())
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x33 2M 64k", uri).stdout
        assert "read 65536/65536 bytes" in out, out
    finally:
        env.lt.run(server.close())


@needs_mount
def test_out_of_order_completions_keep_data_intact(make_env: Callable[..., Env]) -> None:
    """fio writes and verifies through loop while the backend completes writes out of order.

    The in-flight byte limit is small, so reading requests pauses and resumes.
    """
    need("losetup", "fio")
    env = make_env(64 * MiB, max_inflight_bytes=256 * 1024)
    env.backend.jitter = 0.002
    loop = env.losetup()
    for bs, depth in [("4k", "64"), ("256k", "16")]:
        run("fio", "--name=verify", f"--filename={loop}", "--ioengine=libaio", "--direct=1",
            "--rw=randwrite", f"--bs={bs}", f"--iodepth={depth}", "--size=32M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0",
            timeout=120)  # fmt: skip
    assert env.device.stats.writes >= 8192 + 128
    run("losetup", "-d", loop)
    assert same_bytes(str(env.image), env.path, 64 * MiB)


@needs_mount
def test_backend_errors_become_eio(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.backend.fail_reads = True
    fd = os.open(env.path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, 100 * MiB)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    env.backend.fail_reads = False
    assert env.device.stats.errors >= 1


@needs_mount
def test_read_only_backend_gives_a_read_only_file(make_env: Callable[..., Env]) -> None:
    env = make_env(16 * MiB, read_only=True)
    with open(env.path, "rb") as f:
        assert len(f.read(4096)) == 4096
    with pytest.raises(OSError) as info:
        os.open(env.path, os.O_RDWR)
    assert info.value.errno in (errno.EROFS, errno.EACCES)


@needs_mount
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem_on_loop_direct_io(make_env: Callable[..., Env], fstype: str) -> None:
    need("losetup", f"mkfs.{fstype}", "e2fsck" if fstype == "ext4" else "xfs_repair")
    env = make_env()
    b = env.backend
    loop = env.losetup()
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    if fstype == "ext4":
        run("mkfs.ext4", "-F", "-q", "-E", "discard", loop)
    else:
        run("mkfs.xfs", "-f", "-q", loop)
    if int(Path(f"/sys/block/{os.path.basename(loop)}/queue/discard_max_bytes").read_text()):
        assert b.trims, "mkfs discarded the loop device but no trim reached the backend"
    run("mount", loop, str(mnt))
    rng = random.Random(fstype)
    digests = {}
    flushes = b.flushes
    for d in range(4):
        sub = mnt / f"dir{d}"
        sub.mkdir()
        for i in range(12):
            data = rng.randbytes(rng.choice([1, 4096, 70000, 300000]))
            with open(sub / f"f{i}", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            digests[f"dir{d}/f{i}"] = hashlib.sha256(data).hexdigest()
        dfd = os.open(sub, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    assert b.flushes > flushes, "fsync in the filesystem did not flush the backend"
    run("umount", str(mnt))
    if fstype == "ext4":
        run("e2fsck", "-f", "-n", loop)
    else:
        run("xfs_repair", "-n", loop)
    run("mount", "-o", "ro", loop, str(mnt))
    try:
        for name, digest in digests.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
    finally:
        run("umount", str(mnt))
    run("losetup", "-d", loop)
    assert same_bytes(str(env.image), env.path, SIZE), "the device differs from its backend"
    env.stop()


@needs_mount
def test_stop_refuses_while_held_and_names_holders(make_env: Callable[..., Env]) -> None:
    need("losetup", "mkfs.ext4")
    env = make_env()
    loop = env.losetup()
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    run("mkfs.ext4", "-F", "-q", loop)
    run("mount", loop, str(mnt))
    with open(env.path, "rb") as f:
        sleeper = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        with pytest.raises(DeviceBusy) as info:
            env.stop()
        text = str(info.value)
        assert text.startswith(f"{env.path} is in use by ")
        assert f"{os.path.basename(loop)} (mounted on {mnt})" in text
        assert f"pid {sleeper.pid} (sleep)" in text
        assert text.endswith("unmount and detach it, or use force.")
        assert info.value.holders.loops[0].name == os.path.basename(loop)
        assert env.device.running and is_mounted(env.path)
        (mnt / "still-works").write_bytes(b"ok")  # the device kept serving
    finally:
        sleeper.kill()
        sleeper.wait(10)
    with pytest.raises(DeviceBusy) as info:
        env.stop()
    assert str(info.value) == (
        f"{env.path} is in use by {os.path.basename(loop)} (mounted on {mnt}); "
        "unmount and detach it, or use force."
    )
    run("umount", str(mnt))
    with pytest.raises(DeviceBusy, match=r"is in use by loop\d+; "):
        env.stop()
    run("losetup", "-d", loop)
    env.stop()
    assert not is_mounted(env.path) and not os.path.exists(env.path)


@needs_mount
def test_force_stop_fails_holders_io(make_env: Callable[..., Env], expect_logs: list[str]) -> None:
    need("losetup", "mkfs.ext4", "dd")
    expect_logs.append("Forcing")
    env = make_env()
    loop = env.losetup()
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    run("mkfs.ext4", "-F", "-q", loop)
    run("mount", loop, str(mnt))
    (mnt / "file").write_bytes(b"data")
    env.stop(force=True)
    assert not env.device.running and not is_mounted(env.path)
    proc = run("dd", f"if={loop}", "of=/dev/null", "bs=4k", "count=1", "skip=7", "iflag=direct",
               check=False, timeout=30)  # fmt: skip
    assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc.stderr
    # The device can come back (a new placeholder, a new session).
    env.start()
    assert os.stat(env.path).st_size == SIZE
    env.stop()


@needs_mount
def test_killed_server_fails_io_and_stale_mount_is_recovered(
    make_env: Callable[..., Env], expect_logs: list[str]
) -> None:
    """A worker killed with SIGKILL: I/O fails (EIO through loop) instead of hanging."""
    need("losetup", "dd")
    expect_logs.append("stale mount")
    env = make_env(start=False)
    script = (
        "import asyncio, sys\n"
        "from pyhast.frontend.nbd.backend import FileBackend\n"
        "from pyhast.frontend.fuse import HastDevice\n"
        "async def main():\n"
        "    dev = HastDevice(FileBackend(sys.argv[1]), 'r0', devdir=sys.argv[2])\n"
        "    await dev.start()\n"
        "    print('READY', flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script, str(env.image), str(env.devdir)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "READY"
        path = env.path
        assert os.stat(path).st_size == SIZE
        loop = env.losetup()
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        proc = run("dd", f"if={path}", "of=/dev/null", "bs=4k", "count=1", check=False, timeout=30)
        assert proc.returncode != 0 and "not connected" in proc.stderr, proc.stderr
        proc = run("dd", f"if={loop}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct",
                   check=False, timeout=30)  # fmt: skip
        assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc.stderr
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    # A new device on the same path clears the dead mount and serves again.
    assert is_mounted(env.path)
    env.start()
    assert os.stat(env.path).st_size == SIZE
    run("losetup", "-d", loop)
    env.stop()
    assert not is_mounted(env.path)


@needs_mount
@pytest.mark.parametrize("how", ["umount", "abort"])
def test_session_lost_from_outside_is_reported(
    make_env: Callable[..., Env], expect_logs: list[str], how: str
) -> None:
    expect_logs.append("lost its FUSE session")
    env = make_env()
    if how == "umount":
        run("umount", "-l", env.path)
    else:
        assert env.device.dev is not None
        Path(f"/sys/fs/fuse/connections/{env.device.dev[1]}/abort").write_text("1")
    env.lt.run(asyncio.wait_for(env.device.wait_closed(), 20))
    assert env.device.lost and not env.device.running
    wait_for(lambda: not is_mounted(env.path), what="the dead mount to go")
    env.stop()  # a no-op now


@needs_mount
def test_start_refuses_a_live_mount(make_env: Callable[..., Env]) -> None:
    env = make_env()
    other = HastDevice(env.backend, env.device.name, devdir=env.devdir, start_timeout=10)
    with pytest.raises(DeviceError, match="already mounted"):
        env.lt.run(other.start())
    assert env.device.running and os.stat(env.path).st_size == SIZE
    with pytest.raises(RuntimeError):
        env.start()
    env.stop()
    env.stop()  # idempotent


def test_device_name_is_checked() -> None:
    backend: Any = object()
    for bad in ["", ".", "..", "a/b", "x\0"]:
        with pytest.raises(ValueError):
            HastDevice(backend, bad)
