"""Real NBD clients against a primary's export, and byte-level checks of providers.

* :func:`qemu_io`, :func:`nbdcopy`, :func:`qemu_img_convert` run the client
  as a process, bounded by a timeout, and fail the test (with its output)
  when it fails.  qemu-io reports a failed command on its output (and, in
  recent versions, in its exit status): both are checked.
* :func:`data_area` reads a provider's user data, located by its own
  metadata (``localoff``, ``datasize``), never by a constant.
* :func:`assert_identical` compares two providers' data areas and names the
  first differing offset; :func:`wait_identical` polls it with a deadline
  (async replication acknowledges before the secondary has the data).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pyhast.defaults import METADATA_SIZE
from pyhast.disk.metadata import Metadata

#: Seconds any one client process may take.
TIMEOUT = 90.0
CHUNK = 4 * 1024 * 1024

_QEMU_IO_FAILURE = re.compile(r"(failed|error|Error|ERROR)")


def need(*tools: str) -> None:
    """Skip the test unless every tool is installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(*argv: str, timeout: float = TIMEOUT) -> str:
    """Run a client; its stdout.  Fails the test on a non-zero exit or a timeout."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{argv[0]} did not finish within {timeout} s: {argv}") from exc
    assert proc.returncode == 0, (
        f"{argv[0]} failed ({proc.returncode}): {argv}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def qemu_io_argv(uri: str, commands: Sequence[str]) -> list[str]:
    argv = ["qemu-io", "-f", "raw"]
    for cmd in commands:
        argv += ["-c", cmd]
    argv.append(uri)
    return argv


def check_qemu_io(argv: Sequence[str], rc: int, out: str, err: str) -> str:
    text = out + err
    assert rc == 0 and not _QEMU_IO_FAILURE.search(text), (
        f"qemu-io failed ({rc}): {list(argv)}\n{text}"
    )
    return out


def qemu_io(uri: str, *commands: str, timeout: float = TIMEOUT) -> str:
    """Run qemu-io commands (``-c``) against ``uri``; its output.  Every command must succeed."""
    argv = qemu_io_argv(uri, commands)
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"qemu-io did not finish within {timeout} s: {argv}") from exc
    return check_qemu_io(argv, proc.returncode, proc.stdout, proc.stderr)


class Background:
    """A client process running in the background (stdout/stderr to files)."""

    def __init__(self, argv: Sequence[str], logdir: Path, name: str) -> None:
        self.argv = list(argv)
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )

    def wait(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise AssertionError(f"{self.argv[0]} did not finish within {timeout} s") from exc
        return rc, self.out_path.read_text(), self.err_path.read_text()

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def qemu_io_background(uri: str, commands: Sequence[str], logdir: Path, name: str) -> Background:
    return Background(qemu_io_argv(uri, commands), logdir, name)


def nbdcopy(src: str, dst: str, timeout: float = TIMEOUT) -> None:
    """``nbdcopy src dst`` (files or NBD URIs)."""
    run("nbdcopy", "--flush", src, dst, timeout=timeout)


def qemu_img_convert(src: str, dst_uri: str, timeout: float = TIMEOUT) -> None:
    """``qemu-img convert`` a raw file onto an existing NBD export (no creation)."""
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, dst_uri, timeout=timeout)


def random_file(path: Path, size: int, seed: int) -> bytes:
    """Write ``size`` pseudo-random bytes (reproducible from ``seed``); the bytes."""
    data = _random_bytes(size, seed)
    path.write_bytes(data)
    return data


def _random_bytes(size: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.shake_256(f"{seed}:{counter}".encode()).digest(1024 * 1024)
        counter += 1
    return bytes(out[:size])


# --------------------------------------------------------------------------
# Providers


def read_metadata(path: Path | str) -> Metadata:
    with open(path, "rb") as f:
        block = f.read(METADATA_SIZE)
    return Metadata.decode(block, str(path))


def read_bitmap(path: Path | str) -> bytes:
    md = read_metadata(path)
    with open(path, "rb") as f:
        f.seek(METADATA_SIZE)
        return f.read(md.mapsize)


def data_area(path: Path | str, offset: int = 0, length: int | None = None) -> bytes:
    """``length`` bytes (default: all) of the user data of ``path`` from ``offset``."""
    md = read_metadata(path)
    if length is None:
        length = md.datasize - offset
    assert offset >= 0 and offset + length <= md.datasize
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, md.localoff + offset)


def fill_random(path: Path | str, offset: int = 0) -> None:
    """Fill the data area of ``path`` from ``offset`` with random bytes, offline
    (data the provider already holds: only a full synchronisation copies it)."""
    md = read_metadata(path)
    with open(path, "r+b") as f:
        pos = offset
        while pos < md.datasize:
            n = min(CHUNK * 4, md.datasize - pos)
            os.pwrite(f.fileno(), os.urandom(n), md.localoff + pos)
            pos += n


def data_hash(path: Path | str) -> str:
    """SHA-256 of the whole data area."""
    md = read_metadata(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        pos = 0
        while pos < md.datasize:
            n = min(CHUNK, md.datasize - pos)
            h.update(os.pread(f.fileno(), n, md.localoff + pos))
            pos += n
    return h.hexdigest()


def first_difference(a: Path | str, b: Path | str) -> int | None:
    """Offset of the first byte where the data areas of ``a`` and ``b`` differ (None: equal)."""
    ma, mb = read_metadata(a), read_metadata(b)
    assert ma.datasize == mb.datasize, f"datasize differs: {ma.datasize} != {mb.datasize}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while pos < ma.datasize:
            n = min(CHUNK, ma.datasize - pos)
            da = os.pread(fa.fileno(), n, ma.localoff + pos)
            db = os.pread(fb.fileno(), n, mb.localoff + pos)
            if da != db:
                i = next(i for i in range(n) if da[i] != db[i])
                return pos + i
            pos += n
    return None


def assert_identical(a: Path | str, b: Path | str) -> None:
    diff = first_difference(a, b)
    assert diff is None, f"data areas of {a} and {b} differ first at offset {diff}"


def wait_identical(a: Path | str, b: Path | str, timeout: float = 30.0) -> float:
    """Poll until both data areas are equal; the seconds it took (AssertionError on timeout)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        diff = first_difference(a, b)
        if diff is None:
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"data areas of {a} and {b} still differ at offset {diff} after {timeout} s"
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------
# Versioned writes: which acknowledged write must be where


class Versioned:
    """Blocks of ``bs`` bytes at ``base + i * bs``; version ``v`` of block ``i``
    is filled with :meth:`pattern` ``(i, v)`` (never 0, so an unwritten block
    is told apart).

    :meth:`commands` gives sequential qemu-io writes (each one is acknowledged
    before the next is sent); :meth:`record` reads qemu-io's output and notes
    which writes were acknowledged, and the one that was in flight when the
    export went away; :meth:`verify` checks an image of the data area:
    every block holds its last acknowledged version, or the in-flight one.
    """

    def __init__(self, base: int, nblocks: int, bs: int = 64 * 1024) -> None:
        self.base = base
        self.nblocks = nblocks
        self.bs = bs
        #: block -> last acknowledged version
        self.acked: dict[int, int] = {}
        #: (block, version) of the write that may or may not have happened
        self.inflight: list[tuple[int, int]] = []
        self._issued: list[tuple[int, int]] = []

    @staticmethod
    def pattern(i: int, v: int) -> int:
        return (i * 31 + v * 17) % 255 + 1

    def offset(self, i: int) -> int:
        return self.base + i * self.bs

    def commands(self, versions: range, blocks: range | None = None) -> list[str]:
        self._issued = []
        cmds = []
        for v in versions:
            for i in blocks if blocks is not None else range(self.nblocks):
                self._issued.append((i, v))
                cmds.append(f"write -P {self.pattern(i, v)} {self.offset(i)} {self.bs}")
        return cmds

    def record(self, output: str) -> int:
        """Take qemu-io's output for the last :meth:`commands`; the number acknowledged."""
        acked = 0
        for line in output.splitlines():
            m = re.match(r"wrote (\d+)/(\d+) bytes at offset (\d+)$", line.strip())
            if m is None:
                continue
            i, v = self._issued[acked]
            assert int(m.group(3)) == self.offset(i), line
            assert int(m.group(1)) == int(m.group(2)) == self.bs, line
            self.acked[i] = v
            acked += 1
        if acked < len(self._issued):
            self.inflight.append(self._issued[acked])
        return acked

    def verify(self, image: bytes | bytearray, what: str) -> None:
        """``image`` is the data area from offset 0 (at least up to the last block)."""
        for i in range(self.nblocks):
            off = self.offset(i)
            block = bytes(image[off : off + self.bs])
            allowed = {self.pattern(i, self.acked[i]) if i in self.acked else 0}
            allowed |= {self.pattern(i, v) for j, v in self.inflight if j == i}
            ok = any(block == bytes([p]) * self.bs for p in allowed)
            assert ok, (
                f"{what}: block {i} at {off} holds {block[:8].hex()}..., "
                f"expected one of {sorted(allowed)} (acked v{self.acked.get(i)})"
            )
