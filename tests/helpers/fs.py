"""Filesystems on a primary's device file, used as an administrator would.

* :func:`run` runs one command, bounded by a timeout; :func:`need` skips a
  test when a tool is missing, :func:`mount_skip_reason` says why a test that
  mounts cannot run here (root, /dev/fuse).
* :class:`Storage` attaches loop devices (``losetup --direct-io=on``),
  makes and mounts filesystems, and remembers what it did: its
  :meth:`Storage.cleanup` (called in ``finally``, and by the context manager)
  unmounts (lazily when a plain unmount fails: a dead device) and detaches
  everything even after a failure.  :meth:`Storage.teardown` does the same for
  one mount point, as the dead side of a failover needs.
* :func:`fsck_ext4` (``e2fsck -p`` to replay the journal, then ``e2fsck -f -n``
  must find nothing) and :func:`check_xfs` (mount to replay the log, unmount,
  ``xfs_repair -n`` must find nothing) check a filesystem after a crash.
* :func:`write_synced` writes one file, fsyncs it and its directory, and only
  then returns its SHA-256; :func:`write_tree` writes a tree of such files;
  :class:`BackgroundWriter` keeps doing it in a thread until told to stop (or
  until the device fails under it); :class:`DsyncAppender` appends records to
  one file opened with O_DSYNC and counts the bytes each returned write made
  durable.  A :class:`Manifest` holds what must survive: a file's digest
  enters it only after ``fsync`` returned, an appender's length only after
  ``write`` returned.
* :func:`verify` checks every file of a manifest under a mount point and
  returns what differs.

Every wait is bounded, by a deadline or a timeout, and polls.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

MiB = 1024 * 1024
#: Seconds any one command may take.
TIMEOUT = 120.0
#: The smallest device mkfs.xfs accepts ("Filesystem must be larger than 300MB").
XFS_MIN_SIZE = 300 * MiB
FSTYPES = ("ext4", "xfs")


def mount_skip_reason() -> str | None:
    """Why loop devices, mounts and FUSE cannot be used here (None: they can)."""
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (mount(2), loop devices)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is absent"
    return None


def need(*tools: str) -> None:
    """Skip the test unless every tool is installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def fs_tools(fstype: str) -> tuple[str, ...]:
    """The commands :class:`Storage` and the checks need for ``fstype``."""
    if fstype == "ext4":
        return ("losetup", "mount", "umount", "mkfs.ext4", "e2fsck")
    if fstype == "xfs":
        return ("losetup", "mount", "umount", "mkfs.xfs", "xfs_repair")
    raise ValueError(f"unknown filesystem type {fstype!r}")


def run(
    *argv: str, timeout: float = TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command (no stdin, output captured); AssertionError if it fails
    (``check``) or does not finish within ``timeout``."""
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout} s") from exc
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def wait_for(
    predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# Mounts and loop devices


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount of this namespace
    (from /proc/self/mountinfo)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                fstype = fields[fields.index("-", 6) + 1]
            except (ValueError, IndexError):
                continue
            out.append((_unescape(fields[4]), fstype))
    return out


def mount_points() -> list[str]:
    """Every mount point of this mount namespace."""
    return [mnt for mnt, _ in mounts()]


def is_mounted(path: Path | str) -> bool:
    return str(path) in mount_points()


def mounts_under(directory: Path | str, *, devices: bool = True) -> list[str]:
    """Mount points at or below ``directory``, deepest first; without the
    primaries' device files (``fuse.hast``, the daemons' own) unless ``devices``."""
    top = str(directory).rstrip("/")
    found = [
        mnt
        for mnt, fstype in mounts()
        if (mnt == top or mnt.startswith(top + "/")) and (devices or fstype != "fuse.hast")
    ]
    return sorted(set(found), key=len, reverse=True)


def loop_backing(loopdev: str) -> str | None:
    """The backing file of ``/dev/loopN`` (None: not bound)."""
    name = os.path.basename(loopdev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def loops_under(directory: Path | str) -> list[str]:
    """Loop devices whose backing file is at or below ``directory``."""
    top = str(directory).rstrip("/") + "/"
    out: list[str] = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        backing = loop_backing(name)
        if backing is not None and backing.startswith(top):
            out.append(f"/dev/{name}")
    return out


def attach_loop(path: Path | str, *, direct_io: bool = True) -> str:
    """``losetup --find --show [--direct-io=on] path``; the loop device."""
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        argv.append("--direct-io=on")
    dev = run(*argv, str(path), timeout=30).stdout.strip()
    assert dev.startswith("/dev/loop"), f"losetup printed {dev!r}"
    return dev


def detach_loop(loopdev: str, timeout: float = 20.0) -> None:
    """``losetup -d`` and wait until the device is unbound (the kernel may
    defer it while the device is still open)."""
    run("losetup", "-d", loopdev, timeout=30, check=False)
    wait_for(lambda: loop_backing(loopdev) is None, timeout, f"{loopdev} to be detached")


def umount(mnt: Path | str, *, lazy: bool = False, timeout: float = 60.0) -> None:
    """Unmount ``mnt`` (``umount -l`` when ``lazy``, or when a plain unmount fails)."""
    if not is_mounted(mnt):
        return
    if not lazy:
        proc = run("umount", str(mnt), timeout=timeout, check=False)
        if proc.returncode == 0:
            return
    run("umount", "-l", str(mnt), timeout=timeout)
    wait_for(lambda: not is_mounted(mnt), 10, f"{mnt} to be unmounted")


def mkfs(fstype: str, target: str) -> None:
    """A fresh ``fstype`` on ``target`` (a loop device or the device file)."""
    if fstype == "ext4":
        run(
            "mkfs.ext4",
            "-F",
            "-q",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            target,
            timeout=180,
        )
    elif fstype == "xfs":
        run("mkfs.xfs", "-f", "-q", target, timeout=180)
    else:
        raise ValueError(f"unknown filesystem type {fstype!r}")


def fsck_ext4(target: str) -> str:
    """Replay the journal (``e2fsck -p``), then ``e2fsck -f -n`` must exit 0.
    Returns both reports."""
    first = run("e2fsck", "-p", target, timeout=180, check=False)
    # 0: clean, 1: errors corrected (the journal replay counts), 2: reboot.
    assert first.returncode in (0, 1, 2), (
        f"e2fsck -p {target} exited {first.returncode}:\n{first.stdout}{first.stderr}"
    )
    second = run("e2fsck", "-f", "-n", target, timeout=180, check=False)
    assert second.returncode == 0, (
        f"e2fsck -f -n {target} is not clean ({second.returncode}):\n{second.stdout}{second.stderr}"
    )
    return first.stdout + first.stderr + second.stdout + second.stderr


def check_xfs(loopdev: str, mnt: Path) -> str:
    """Mount (replays the log), unmount, then ``xfs_repair -n`` must exit 0."""
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "xfs", loopdev, str(mnt), timeout=120)
    umount(mnt)
    proc = run("xfs_repair", "-n", loopdev, timeout=180, check=False)
    assert proc.returncode == 0, (
        f"xfs_repair -n {loopdev} is not clean ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    )
    return proc.stdout + proc.stderr


class Storage:
    """Loop devices and mounts made by a test; :meth:`cleanup` undoes them all."""

    def __init__(self) -> None:
        #: loop device -> backing file
        self.loops: dict[str, str] = {}
        #: mount point -> loop device (or source)
        self.mounts: dict[str, str] = {}

    def attach(self, path: Path | str) -> str:
        dev = attach_loop(path)
        self.loops[dev] = str(path)
        return dev

    def detach(self, loopdev: str) -> None:
        detach_loop(loopdev)
        self.loops.pop(loopdev, None)

    def mount(self, source: str, mnt: Path, fstype: str) -> None:
        mnt.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", fstype, source, str(mnt), timeout=120)
        self.mounts[str(mnt)] = source

    def umount(self, mnt: Path, *, lazy: bool = False) -> None:
        umount(mnt, lazy=lazy)
        self.mounts.pop(str(mnt), None)

    def mount_device(self, device: Path, mnt: Path, fstype: str) -> str:
        """Attach ``device`` to a loop device (direct I/O) and mount it; the loop device."""
        dev = self.attach(device)
        self.mount(dev, mnt, fstype)
        return dev

    def teardown(self, mnt: Path, *, lazy: bool = False) -> None:
        """Unmount ``mnt`` (lazily if asked or if a plain unmount fails) and
        detach the loop device under it."""
        source = self.mounts.get(str(mnt))
        self.umount(mnt, lazy=lazy)
        if source is not None and source in self.loops:
            self.detach(source)

    def cleanup(self) -> list[str]:
        """Undo everything, never raising; what could not be undone."""
        problems: list[str] = []
        for mnt in sorted(self.mounts, key=len, reverse=True):
            try:
                umount(mnt, timeout=30)
            except AssertionError as exc:
                problems.append(str(exc))
        self.mounts.clear()
        for dev in list(self.loops):
            try:
                detach_loop(dev)
            except AssertionError as exc:
                problems.append(str(exc))
        self.loops.clear()
        return problems

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for problem in self.cleanup():
            print(f"storage cleanup: {problem}", file=sys.stderr)


def cleanup_under(top: Path) -> None:
    """Last resort after a test: lazily unmount the filesystems mounted below
    ``top`` and detach loop devices backed by files below it.  The device
    files themselves are left to their daemons (and to Cluster.close)."""
    for mnt in mounts_under(top, devices=False):
        run("umount", "-l", mnt, timeout=30, check=False)
    for dev in loops_under(top):
        run("losetup", "-d", dev, timeout=30, check=False)


# --------------------------------------------------------------------------
# fsync'd files and what must survive


def content(seed: int, size: int) -> bytes:
    """Reproducible, incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.shake_256(f"{seed}:{counter}".encode()).digest(64 * 1024)
        counter += 1
    return bytes(out[:size])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> str:
    """Write ``path`` (created or truncated), fsync it, fsync its directory; its
    SHA-256, returned only once both fsyncs have returned (OSError otherwise)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    """What must be found after a crash: files (relative path -> SHA-256) and
    appended files (relative path -> (seed, bytes made durable))."""

    files: dict[str, str] = field(default_factory=dict)
    appended: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files) + len(self.appended)


def make_dirs(root: Path, rel: str) -> None:
    """mkdir -p ``root/rel``, each new directory made durable in its parent."""
    path = root
    for part in Path(rel).parts:
        path = path / part
        if not path.is_dir():
            path.mkdir()
            fsync_dir(path.parent)


def write_tree(
    root: Path,
    manifest: Manifest,
    *,
    prefix: str = "tree",
    dirs: int = 4,
    files: int = 25,
    seed: int = 0,
) -> int:
    """``dirs`` x ``files`` fsync'd files of 4 KiB to 128 KiB under ``root/prefix``,
    each recorded in ``manifest`` once durable; the bytes written."""
    total = 0
    for d in range(dirs):
        rel_dir = f"{prefix}/dir{d}"
        make_dirs(root, rel_dir)
        for i in range(files):
            size = 4096 * (1 + (i * 7 + d) % 32)
            data = content(seed + d * 1000 + i, size)
            rel = f"{rel_dir}/file{i}"
            manifest.files[rel] = write_synced(root / rel, data)
            total += size
    return total


class BackgroundWriter(threading.Thread):
    """Writes fsync'd files under ``root/prefix`` until :meth:`stop` or until
    an I/O error; each version enters ``manifest`` only once durable.

    Names are reused in a ring of ``ring`` (the space used stays bounded); a
    file is replaced the way careful programs do: written to a temporary
    name, fsync'd, renamed over the old one, directory fsync'd.  After a
    crash each name holds its last durable version, or the version whose
    replacement was in flight (:attr:`inflight`, for :func:`verify`).
    """

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        *,
        prefix: str = "during",
        size: int = 32 * 1024,
        ring: int = 256,
        seed: int = 10_000,
    ) -> None:
        super().__init__(daemon=True, name=f"writer-{prefix}")
        self.root = root
        self.manifest = manifest
        self.prefix = prefix
        self.size = size
        self.ring = ring
        self.seed = seed
        self.done = 0
        self.error: OSError | None = None
        #: rel -> digest of the replacement in flight (not yet durable)
        self.inflight: dict[str, str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            make_dirs(self.root, self.prefix)
            n = 0
            while not self._halt.is_set():
                slot = n % self.ring
                rel = f"{self.prefix}/f{slot}"
                data = content(self.seed + n, self.size)
                self.inflight = {rel: hashlib.sha256(data).hexdigest()}
                tmp = self.root / self.prefix / f".tmp{slot}"
                digest = write_synced(tmp, data)
                os.rename(tmp, self.root / rel)
                fsync_dir(tmp.parent)
                self.manifest.files[rel] = digest  # durable: every fsync returned
                self.inflight = {}
                self.done += 1
                n += 1
        except OSError as exc:
            self.error = exc

    def stop(self) -> None:
        self._halt.set()

    def wait_progress(self, count: int, timeout: float = 30.0) -> None:
        def progressed() -> bool:
            if not self.is_alive() and self.done < count:
                raise AssertionError(f"writer {self.prefix} stopped early: {self.error!r}")
            return self.done >= count

        wait_for(progressed, timeout, f"{count} fsync'd files from writer {self.prefix}")

    def finish(self, timeout: float = 30.0) -> None:
        """Stop and join (bounded); AssertionError if the thread is stuck."""
        self.stop()
        self.join(timeout)
        assert not self.is_alive(), f"writer {self.prefix} still blocked after {timeout} s"


class DsyncAppender(threading.Thread):
    """Appends ``record``-byte records of :func:`content` ``(seed)`` to one
    file opened with O_DSYNC (like ``dd oflag=dsync``); the file's durable
    length enters ``manifest.appended`` after each returned write."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        *,
        rel: str = "dsync.log",
        record: int = 16 * 1024,
        seed: int = 77,
        limit: int = 32 * MiB,
    ) -> None:
        super().__init__(daemon=True, name=f"dsync-{rel}")
        self.path = root / rel
        self.rel = rel
        self.manifest = manifest
        self.record = record
        self.seed = seed
        self.limit = limit
        self.error: OSError | None = None
        self._halt = threading.Event()
        self.data = content(seed, limit)

    @property
    def durable(self) -> int:
        return self.manifest.appended.get(self.rel, (self.seed, 0))[1]

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DSYNC, 0o644)
        except OSError as exc:
            self.error = exc
            return
        try:
            fsync_dir(self.path.parent)
            self.manifest.appended[self.rel] = (self.seed, 0)
            pos = 0
            while not self._halt.is_set() and pos < self.limit:
                chunk = self.data[pos : pos + self.record]
                n = os.write(fd, chunk)
                assert n == len(chunk), f"short O_DSYNC write: {n} of {len(chunk)}"
                pos += n
                self.manifest.appended[self.rel] = (self.seed, pos)
        except OSError as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        self._halt.set()

    def finish(self, timeout: float = 30.0) -> None:
        self.stop()
        self.join(timeout)
        assert not self.is_alive(), f"O_DSYNC appender still blocked after {timeout} s"


def verify(root: Path, manifest: Manifest, inflight: dict[str, str] | None = None) -> list[str]:
    """Every durable file of ``manifest`` under ``root``; a list of what differs
    (empty: all verified).  ``inflight`` (rel -> digest) names a rewrite that
    was in flight at the crash, whose new version is allowed too."""
    bad = []
    allowed_too = inflight or {}
    for rel, digest in sorted(manifest.files.items()):
        try:
            got = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        except OSError as exc:
            bad.append(f"{rel}: {errno.errorcode.get(exc.errno or 0, exc)}")
            continue
        if got != digest and got != allowed_too.get(rel):
            bad.append(f"{rel}: sha256 {got[:16]}... != {digest[:16]}...")
    for rel, (seed, length) in sorted(manifest.appended.items()):
        try:
            with open(root / rel, "rb") as f:
                data = f.read(length)
        except OSError as exc:
            bad.append(f"{rel}: {errno.errorcode.get(exc.errno or 0, exc)}")
            continue
        if len(data) < length:
            bad.append(f"{rel}: {len(data)} bytes, {length} were made durable")
        elif data != (expected := content(seed, length)):
            first = next(i for i in range(length) if data[i] != expected[i])
            bad.append(f"{rel}: differs at byte {first} of {length} durable")
    return bad


def holder_io_fails(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run an I/O command that must fail (bounded); its result (AssertionError
    if it succeeded)."""
    proc = run(*argv, timeout=timeout, check=False)
    assert proc.returncode != 0, f"{' '.join(argv)} succeeded on a dead device:\n{proc.stdout}"
    return proc


@contextlib.contextmanager
def storage_for(top: Path) -> Iterator[Storage]:
    """A :class:`Storage` cleaned up at the end, plus a lazy sweep of ``top``."""
    st = Storage()
    try:
        yield st
    finally:
        for problem in st.cleanup():
            print(f"storage cleanup: {problem}", file=sys.stderr)
        cleanup_under(top)
