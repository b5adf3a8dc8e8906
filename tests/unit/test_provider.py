"""Tests of pyhast.disk.provider on sparse regular files and real loop devices."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhast.disk import provider as provider_mod
from pyhast.disk.provider import Provider
from pyhast.errors import ExitCode, ProviderError

MiB = 1024 * 1024


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    """A 256 MiB sparse regular file."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(256 * MiB)
    return path


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(length))


# -- regular files ------------------------------------------------------------


def test_open_regular_file(sparse: Path) -> None:
    with Provider.open(str(sparse)) as prov:
        assert prov.path == str(sparse)
        assert prov.mediasize == 256 * MiB
        assert prov.sectorsize == 512
        assert not prov.is_blockdev
        assert prov.locked
        assert not prov.readonly
        assert prov.fd >= 0
        assert os.get_inheritable(prov.fd) is False  # O_CLOEXEC
        assert "file" in repr(prov)
    assert prov.closed
    prov.close()  # idempotent


def test_read_write_round_trip(sparse: Path) -> None:
    with Provider.open(str(sparse)) as prov:
        data = pattern(3 * 4096 + 512)
        prov.pwrite(data, 10 * MiB)
        assert prov.pread(len(data), 10 * MiB) == data
        buf = bytearray(len(data))
        prov.pread_into(buf, 10 * MiB)
        assert buf == data
        view = memoryview(bytearray(1024))
        prov.pread_into(view[512:], 10 * MiB + 512)
        assert bytes(view[512:]) == data[512:1024]
        # Last sector of the provider.
        prov.pwrite(b"\xaa" * 512, prov.mediasize - 512)
        assert prov.pread(512, prov.mediasize - 512) == b"\xaa" * 512
        # Untouched areas of a sparse file read as zeros.
        assert prov.pread(4096, 100 * MiB) == bytes(4096)
        prov.pwrite(memoryview(data)[:512], 0)
        prov.pwrite(bytearray(data[:512]), 512)
        assert prov.pread(1024, 0) == data[:512] * 2


def test_vectored_io(sparse: Path) -> None:
    with Provider.open(str(sparse)) as prov:
        parts = [pattern(512, i) for i in range(3)] + [b"", pattern(1000, 9)]
        prov.pwritev(parts, 4096)
        assert prov.pread(2536, 4096) == b"".join(parts)
        out = [bytearray(100), bytearray(0), bytearray(2436)]
        prov.preadv(out, 4096)
        assert b"".join(out) == b"".join(parts)
        # More buffers than one preadv/pwritev call takes (IOV_MAX).
        many = [bytes([i & 0xFF]) * 7 for i in range(3000)]
        prov.pwritev(many, MiB)
        assert prov.pread(21000, MiB) == b"".join(many)
        back = [bytearray(7) for _ in range(3000)]
        prov.preadv(back, MiB)
        assert [bytes(b) for b in back] == many


def test_short_read_at_eof_is_eio(sparse: Path) -> None:
    with Provider.open(str(sparse)) as prov:
        end = prov.mediasize
        with pytest.raises(OSError) as info:
            prov.pread(4096, end - 512)  # 512 bytes available, then EOF
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            prov.pread(512, end)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            prov.pread_into(bytearray(1024), end - 512)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            prov.preadv([bytearray(512), bytearray(512)], end - 512)
        assert info.value.errno == errno.EIO


def test_short_transfers_are_retried(sparse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite, real_preadv, real_pread = os.pwrite, os.preadv, os.pread
    calls = {"pwrite": 0, "preadv": 0}

    def short_pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls["pwrite"] += 1
        return real_pwrite(fd, data[:100], offset)

    def short_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["preadv"] += 1
        return real_preadv(fd, [buffers[0][:100]], offset)

    def short_pread(fd: int, length: int, offset: int) -> bytes:
        return real_pread(fd, min(length, 100), offset)

    with Provider.open(str(sparse)) as prov:
        data = pattern(1000)
        monkeypatch.setattr(os, "pwrite", short_pwrite)
        prov.pwrite(data, 0)
        assert calls["pwrite"] == 10
        monkeypatch.setattr(os, "preadv", short_preadv)
        buf = bytearray(1000)
        prov.pread_into(buf, 0)
        assert buf == data and calls["preadv"] == 10
        monkeypatch.setattr(os, "pread", short_pread)
        assert prov.pread(1000, 0) == data


def test_zero_length_write_is_eio(sparse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Provider.open(str(sparse)) as prov:
        monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
        with pytest.raises(OSError) as info:
            prov.pwrite(b"x", 0)
        assert info.value.errno == errno.EIO


def test_kernel_errors_pass_through(sparse: Path) -> None:
    with Provider.open(str(sparse), readonly=True, lock=False) as prov:
        assert prov.readonly
        with pytest.raises(OSError) as info:
            prov.pwrite(b"x" * 512, 0)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError) as info:
            prov.pread(512, -512)
        assert info.value.errno == errno.EINVAL


def test_delete_punches_hole(sparse: Path) -> None:
    with Provider.open(str(sparse)) as prov:
        prov.pwrite(pattern(4 * MiB), 8 * MiB)
        os.fsync(prov.fd)
        blocks_before = os.fstat(prov.fd).st_blocks
        prov.delete(9 * MiB, 2 * MiB)
        assert prov.pread(2 * MiB, 9 * MiB) == bytes(2 * MiB)
        assert prov.pread(MiB, 8 * MiB) == pattern(4 * MiB)[:MiB]
        assert prov.pread(MiB, 11 * MiB) == pattern(4 * MiB)[3 * MiB :]
        st = os.fstat(prov.fd)
        assert st.st_size == 256 * MiB  # FALLOC_FL_KEEP_SIZE
        assert st.st_blocks < blocks_before
        with pytest.raises(OSError) as info:
            prov.delete(-4096, 4096)
        assert info.value.errno == errno.EINVAL
        assert prov.delete_supported


def test_delete_unsupported(sparse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nope(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "nope")

    monkeypatch.setattr(provider_mod, "_fallocate", nope)
    with Provider.open(str(sparse)) as prov:
        for _ in range(2):
            with pytest.raises(OSError) as info:
                prov.delete(0, 4096)
            assert info.value.errno == errno.EOPNOTSUPP
        assert not prov.delete_supported


def test_flush(sparse: Path) -> None:
    with Provider.open(str(sparse)) as prov:
        prov.pwrite(b"x" * 512, 0)
        prov.flush()
        assert prov.flush_supported


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP])
def test_flush_unsupported_disables_flush(
    sparse: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    calls = []

    def refuse(fd: int) -> None:
        calls.append(fd)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fdatasync", refuse)
    with Provider.open(str(sparse)) as prov:
        for _ in range(2):
            with pytest.raises(OSError) as info:
                prov.flush()
            assert info.value.errno == errno.EOPNOTSUPP
        assert not prov.flush_supported
        assert len(calls) == 1  # the second call did not ask the kernel


def test_flush_io_error_passes_through(sparse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", fail)
    with Provider.open(str(sparse)) as prov:
        with pytest.raises(OSError) as info:
            prov.flush()
        assert info.value.errno == errno.EIO
        assert prov.flush_supported


def test_flock_conflict(sparse: Path) -> None:
    first = Provider.open(str(sparse))
    try:
        with pytest.raises(ProviderError) as info:
            Provider.open(str(sparse))
        assert info.value.errno == errno.EWOULDBLOCK
        assert str(info.value) == (
            f"Unable to lock {sparse}, it is used by another process: "
            f"{os.strerror(errno.EWOULDBLOCK)}."
        )
        assert info.value.exit_code == ExitCode.NOINPUT
        # Without the lock (hastctl dump) the provider can still be read.
        with Provider.open(str(sparse), readonly=True, lock=False) as reader:
            assert not reader.locked
            assert reader.pread(512, 0) == bytes(512)
    finally:
        first.close()
    with Provider.open(str(sparse)) as again:  # the lock went with the descriptor
        assert again.locked


def test_flock_unsupported_is_tolerated(sparse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with Provider.open(str(sparse)) as prov:
        assert not prov.locked


def test_flock_other_error(sparse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(ProviderError, match=f"Unable to lock {sparse}: ") as info:
        Provider.open(str(sparse))
    assert info.value.errno == errno.ENOLCK


def test_open_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ProviderError) as info:
        Provider.open(str(missing))
    assert info.value.errno == errno.ENOENT
    assert str(info.value).startswith(f"Unable to open {missing}: ")
    with pytest.raises(ProviderError) as info:
        Provider.open(str(tmp_path))  # a directory cannot be opened O_RDWR
    assert info.value.errno == errno.EISDIR
    with pytest.raises(ProviderError, match="neither a block device nor a regular file"):
        Provider.open(str(tmp_path), readonly=True, lock=False)
    with pytest.raises(ProviderError, match="neither a block device nor a regular file"):
        Provider.open("/dev/null", lock=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ProviderError, match="neither"):
        Provider.open(str(fifo))


def test_open_closes_descriptor_on_error(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ProviderError):
            Provider.open("/dev/null", lock=False)
    assert set(os.listdir("/proc/self/fd")) == before


# -- loop devices -----------------------------------------------------------------


@contextlib.contextmanager
def loop_device(backing: Path, sector_size: int) -> Iterator[str]:
    """Attach ``backing`` to a free loop device; detach it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    losetup = shutil.which("losetup")
    if losetup is None:
        pytest.skip("losetup is not installed")
    cmd = [losetup, "--find", "--show"]
    if sector_size != 512:
        cmd += ["--sector-size", str(sector_size)]
    device = subprocess.run(
        [*cmd, str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "--detach", device], check=True)


@pytest.fixture(params=[512, 4096], ids=["sector512", "sector4096"])
def loopdev(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    backing = tmp_path / "backing.img"
    with backing.open("wb") as f:
        f.truncate(64 * MiB)
    sector_size: int = request.param
    with loop_device(backing, sector_size) as device:
        yield device, sector_size


@pytest.mark.root
def test_loop_device_geometry(loopdev: tuple[str, int]) -> None:
    device, sector_size = loopdev
    with Provider.open(device) as prov:
        assert prov.is_blockdev
        assert prov.mediasize == 64 * MiB
        assert prov.sectorsize == sector_size
        assert prov.locked
        assert "blockdev" in repr(prov)


@pytest.mark.root
def test_loop_device_io(loopdev: tuple[str, int]) -> None:
    device, sector_size = loopdev
    with Provider.open(device) as prov:
        data = pattern(4 * sector_size)
        prov.pwrite(data, 8 * MiB)
        prov.flush()
        assert prov.pread(len(data), 8 * MiB) == data
        prov.pwritev([data[:sector_size], data[sector_size:]], 16 * MiB)
        out = [bytearray(sector_size), bytearray(3 * sector_size)]
        prov.preadv(out, 16 * MiB)
        assert b"".join(out) == data
        last = prov.mediasize - sector_size
        prov.pwrite(b"\x55" * sector_size, last)
        assert prov.pread(sector_size, last) == b"\x55" * sector_size
        with pytest.raises(OSError) as info:
            prov.pread(2 * sector_size, last)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            prov.pwrite(b"\x55" * sector_size, prov.mediasize)
        assert info.value.errno == errno.ENOSPC


@pytest.mark.root
def test_loop_device_discard(loopdev: tuple[str, int]) -> None:
    device, sector_size = loopdev
    with Provider.open(device) as prov:
        prov.pwrite(pattern(MiB), 4 * MiB)
        prov.flush()
        prov.delete(4 * MiB, 512 * 1024)
        assert prov.pread(512 * 1024, 4 * MiB) == bytes(512 * 1024)
        assert prov.pread(512 * 1024, 4 * MiB + 512 * 1024) == pattern(MiB)[512 * 1024 :]
        # Misaligned ranges are the kernel's business: EINVAL, kept as is.
        with pytest.raises(OSError) as info:
            prov.delete(4 * MiB + 1, sector_size)
        assert info.value.errno == errno.EINVAL


@pytest.mark.root
def test_loop_device_flock_conflict(loopdev: tuple[str, int]) -> None:
    device, _ = loopdev
    with Provider.open(device):
        with pytest.raises(ProviderError, match="used by another process") as info:
            Provider.open(device)
        assert info.value.errno == errno.EWOULDBLOCK


def test_pwrite_durable_uses_rwf_dsync_and_falls_back(
    sparse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.pwritev

    def spy(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append(flags)
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "pwritev", spy)
    with Provider.open(str(sparse)) as p:
        p.pwrite_durable(b"\x5a" * 512, 4096)
        assert calls == [os.RWF_DSYNC]
        assert p.pread(512, 4096) == b"\x5a" * 512

        def refuse(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
            raise OSError(errno.EOPNOTSUPP, "no")

        flushed: list[bool] = []
        monkeypatch.setattr(os, "pwritev", refuse)
        monkeypatch.setattr(os, "fdatasync", lambda fd: flushed.append(True))
        p.pwrite_durable(b"\x33" * 512, 8192)  # falls back: pwrite + fdatasync
        assert flushed == [True]
        assert p.pread(512, 8192) == b"\x33" * 512
