"""The local component of a resource: a regular file or a block device.

FreeBSD opens the provider read-write, takes ``flock(LOCK_EX | LOCK_NB)`` so
that two workers cannot use one disk (EOPNOTSUPP is tolerated), and asks GEOM
for its media and sector sizes. On Linux a block device answers the
``BLKGETSIZE64`` and ``BLKSSZGET`` ioctls (logical sector size); a regular file
has ``st_size`` bytes and 512-byte sectors. Anything else is refused.

Opening problems raise :class:`~pyhast.errors.ProviderError`. Data I/O
methods raise the kernel's :class:`OSError` untouched (errno kept) so the
caller can put the errno in a reply; the only synthesised errors are EIO for an
unexpected end of file and EOPNOTSUPP for an unsupported flush or delete.
Offsets are absolute on the provider: the caller adds ``localoff``.

Calls that share one ``Provider`` from several threads are fine (positional
I/O only, no file offset); ``close()`` must not race with them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import stat
import struct
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, Self, cast

from pyhast.defaults import FILE_SECTORSIZE
from pyhast.errors import ProviderError

__all__ = ["Provider", "ReadBuffer", "WriteBuffer"]

#: Buffers data is read into.
ReadBuffer = bytearray | memoryview
#: Buffers data is written from.
WriteBuffer = bytes | bytearray | memoryview

# Linux block-device ioctls (include/uapi/linux/fs.h), 64-bit ABI:
#: _IOR(0x12, 114, size_t): device size in bytes, u64.
BLKGETSIZE64: Final = 0x80081272
#: _IO(0x12, 104): logical sector size, int.
BLKSSZGET: Final = 0x1268
#: _IO(0x12, 119): discard a range, argument u64[2] = {start, length}.
BLKDISCARD: Final = 0x1277

# fallocate(2) modes (include/uapi/linux/falloc.h).
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

#: Most iovecs one preadv/pwritev call takes (Linux UIO_MAXIOV).
_IOV_MAX: Final = 1024


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    func = getattr(libc, "fallocate64", None) or libc.fallocate
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", func)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) via libc (the os module has only posix_fallocate)."""
    if _libc_fallocate()(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unsupported(what: str, path: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{what} is not supported by {path}")


class Provider:
    """An open local component; create it with :meth:`Provider.open`."""

    path: str
    fd: int
    mediasize: int
    sectorsize: int
    is_blockdev: bool
    readonly: bool
    #: True if we hold the flock (False if not asked or unsupported).
    locked: bool
    #: Cleared when the kernel refuses a flush; flush() then fails at once.
    flush_supported: bool
    #: Cleared when the kernel refuses a delete; delete() then fails at once.
    delete_supported: bool

    def __init__(
        self,
        path: str,
        fd: int,
        mediasize: int,
        sectorsize: int,
        *,
        is_blockdev: bool,
        readonly: bool = False,
        locked: bool = False,
    ) -> None:
        """Wrap an already open descriptor (tests); prefer :meth:`open`."""
        self.path = path
        self.fd = fd
        self.mediasize = mediasize
        self.sectorsize = sectorsize
        self.is_blockdev = is_blockdev
        self.readonly = readonly
        self.locked = locked
        self.flush_supported = True
        self._dsync_supported = True
        self.delete_supported = True

    @classmethod
    def open(cls, path: str, *, readonly: bool = False, lock: bool = True) -> Self:
        """Open ``path`` (O_RDWR or O_RDONLY, close-on-exec) and find its sizes.

        With ``lock``, take an exclusive non-blocking flock; a provider that
        does not support locking is used unlocked (``locked`` is then False and
        the caller should warn, as hastd does). Raises ProviderError.

        When the environment variable ``PYHAST_FAULTS`` names a control file,
        the provider's I/O methods consult its fault rules (tests only; see
        :mod:`pyhast.disk.faults`).
        """
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ProviderError(f"Unable to open {path}", exc.errno) from exc
        try:
            locked = False
            if lock:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except OSError as exc:
                    if exc.errno == errno.EWOULDBLOCK:
                        raise ProviderError(
                            f"Unable to lock {path}, it is used by another process", exc.errno
                        ) from exc
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise ProviderError(f"Unable to lock {path}", exc.errno) from exc
            try:
                st = os.fstat(fd)
            except OSError as exc:
                raise ProviderError(f"Unable to stat {path}", exc.errno) from exc
            if stat.S_ISBLK(st.st_mode):
                is_blockdev = True
                try:
                    buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
                    (mediasize,) = struct.unpack("=Q", buf)
                except OSError as exc:
                    raise ProviderError(f"Unable to get media size of {path}", exc.errno) from exc
                try:
                    buf = fcntl.ioctl(fd, BLKSSZGET, bytes(4))
                    (sectorsize,) = struct.unpack("=i", buf)
                except OSError as exc:
                    raise ProviderError(f"Unable to get sector size of {path}", exc.errno) from exc
            elif stat.S_ISREG(st.st_mode):
                is_blockdev = False
                mediasize = st.st_size
                sectorsize = FILE_SECTORSIZE
            else:
                raise ProviderError(f"{path} is neither a block device nor a regular file.")
        except BaseException:
            os.close(fd)
            raise
        provider = cls(
            path,
            fd,
            mediasize,
            sectorsize,
            is_blockdev=is_blockdev,
            readonly=readonly,
            locked=locked,
        )
        control = os.environ.get("PYHAST_FAULTS")
        if control:
            # Test-only fault injection (pyhast.disk.faults); nothing when unset.
            from pyhast.disk.faults import install

            install(provider, control)
        return provider

    # ------------------------------------------------------------------
    # Data I/O

    def pread_into(self, buf: ReadBuffer, offset: int) -> None:
        """Fill ``buf`` from ``offset``; short reads are retried, EOF raises EIO."""
        view = memoryview(buf).cast("B")
        done = 0
        total = len(view)
        while done < total:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise self._eof(offset + done)
            done += n

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset``; EOF raises EIO."""
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        if not data:
            raise self._eof(offset)
        buf = bytearray(length)
        buf[: len(data)] = data
        self.pread_into(memoryview(buf)[len(data) :], offset + len(data))
        return bytes(buf)

    def pwrite(self, data: WriteBuffer, offset: int) -> None:
        """Write all of ``data`` at ``offset``; short writes are retried."""
        view = memoryview(data).cast("B")
        done = 0
        total = len(view)
        while done < total:
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"Zero-length write to {self.path} at {offset + done}")
            done += n

    def preadv(self, buffers: Sequence[ReadBuffer], offset: int) -> None:
        """Fill ``buffers`` in order from ``offset`` (vectored :meth:`pread_into`)."""
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
        while views:
            n = os.preadv(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                raise self._eof(offset)
            offset += n
            views = _advance(views, n)

    def pwritev(self, buffers: Sequence[WriteBuffer], offset: int) -> None:
        """Write ``buffers`` back to back from ``offset`` (vectored :meth:`pwrite`)."""
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
        while views:
            n = os.pwritev(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                raise OSError(errno.EIO, f"Zero-length write to {self.path} at {offset}")
            offset += n
            views = _advance(views, n)

    def pwrite_durable(self, data: WriteBuffer, offset: int) -> None:
        """Write ``data`` and make just that range durable before returning.

        One ``pwritev(RWF_DSYNC)``: the kernel writes back only these pages
        and flushes the device cache, where fdatasync would also write back
        every other dirty page of the provider (the activemap is rewritten
        while user data is being written, so that difference is large).
        Falls back to :meth:`pwrite` + :meth:`flush` where RWF_DSYNC is
        refused.
        """
        flags = getattr(os, "RWF_DSYNC", 0)
        if flags and self._dsync_supported:
            view = memoryview(data).cast("B")
            try:
                n = os.pwritev(self.fd, [view], offset, flags)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._dsync_supported = False
            else:
                if n == len(view):
                    return
                # A short durable write: finish it the ordinary way.
                self.pwrite(view[n:], offset + n)
                self.flush()
                return
        self.pwrite(data, offset)
        self.flush()

    def flush(self) -> None:
        """Flush the write cache (fdatasync).

        If the kernel refuses (EINVAL, EOPNOTSUPP), ``flush_supported`` becomes
        False and OSError(EOPNOTSUPP) is raised, now and on every later call, so
        the caller can turn metaflush off as hastd does. Other errors (EIO...)
        are raised untouched.
        """
        if not self.flush_supported:
            raise _unsupported("Flush", self.path)
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                self.flush_supported = False
                raise _unsupported("Flush", self.path) from exc
            raise

    def delete(self, offset: int, length: int) -> None:
        """Discard ``[offset, offset + length)`` (BIO_DELETE).

        Block device: ``BLKDISCARD`` (offset and length must be multiples of
        the sector size; the kernel says EINVAL otherwise). Regular file:
        punch a hole (reads then return zeros; the size is kept). If the
        provider cannot discard at all, raises OSError(EOPNOTSUPP) and sets
        ``delete_supported`` to False.
        """
        if not self.delete_supported:
            raise _unsupported("Delete", self.path)
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", offset, length))
            else:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY):
                self.delete_supported = False
                raise _unsupported("Delete", self.path) from exc
            raise

    # ------------------------------------------------------------------
    # Life cycle

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the descriptor (releasing the flock); idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "blockdev" if self.is_blockdev else "file"
        return (
            f"<Provider {self.path!r} {kind} fd={self.fd} mediasize={self.mediasize} "
            f"sectorsize={self.sectorsize}>"
        )

    def _eof(self, offset: int) -> OSError:
        return OSError(
            errno.EIO, f"Unexpected end of {self.path} at offset {offset} (size {self.mediasize})"
        )


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of buffers."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest
