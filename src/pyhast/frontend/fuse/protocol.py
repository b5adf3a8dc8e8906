"""The subset of the Linux FUSE kernel protocol that serves one regular file (sans-IO).

The kernel writes one request per ``read(2)`` of ``/dev/fuse`` and takes one
reply per ``write(2)``.  This module only turns those bytes into
:class:`Request` tuples and builds reply buffers; it never touches a file
descriptor, never logs and never sleeps (the asyncio side is
:mod:`pyhast.frontend.fuse.server`).  Layouts follow ``<linux/fuse.h>``.

Rules of the filesystem it describes:

* The mount's root *is* the file (``rootmode=0100000``): node 1, no
  directories, no lookups.  Every request carries node id 1.
* We speak protocol 7.31 (``FUSE_MINOR``); the kernel uses the smaller of
  its minor and ours, and every structure decoded here has had the same
  layout since 7.9 (7.19 for FALLOCATE).  Kernels older than 7.19 are refused.
* INIT asks for asynchronous reads and direct I/O (``FUSE_ASYNC_READ``,
  ``FUSE_ASYNC_DIO``: a loop device in direct-I/O mode keeps many requests
  in flight), big writes, and ``FUSE_MAX_PAGES`` so one request carries up
  to ``max_write`` bytes (1 MiB by default).  ``max_background`` (how many
  asynchronous requests the kernel keeps in flight, 12 by default in the
  kernel) is raised at INIT; the kernel caps it only for unprivileged
  servers.
* Requests with no reply: FORGET, BATCH_FORGET and INTERRUPT.  Everything
  else gets exactly one reply: an error (a positive errno here, negated on
  the wire) or the opcode's reply structure.

Decoding errors (a short request, a length that disagrees with the bytes
read) raise :class:`~pyhast.errors.ProtocolError`; the kernel never sends
those, so the server treats them as fatal for the session.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from pyhast.errors import ProtocolError

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "FUSE_MAJOR",
    "FUSE_MINOR",
    "FUSE_MIN_KERNEL_MINOR",
    "IN_HEADER",
    "NO_REPLY",
    "Attr",
    "InitFlag",
    "InitReply",
    "Opcode",
    "Request",
    "SetattrValid",
    "decode_request",
    "encode_attr",
    "encode_error",
    "encode_init",
    "encode_open",
    "encode_reply",
    "encode_statfs",
    "encode_write",
    "read_buffer_size",
]

#: Protocol major version (the only one Linux has ever had).
FUSE_MAJOR = 7
#: Protocol minor version we implement.
FUSE_MINOR = 31
#: Oldest kernel minor we accept (FALLOCATE appeared in 7.19).
FUSE_MIN_KERNEL_MINOR = 19
#: Node id of the mount's root, which is our file.
ROOT_ID = 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class Opcode(enum.IntEnum):
    """FUSE request opcodes (``enum fuse_opcode``)."""

    LOOKUP = 1
    FORGET = 2  #: no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25  #: close(2) of a descriptor: not a data flush
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  #: no reply
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  #: no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47


#: Opcodes the kernel expects no reply to.
NO_REPLY = frozenset({int(Opcode.FORGET), int(Opcode.BATCH_FORGET), int(Opcode.INTERRUPT)})


class InitFlag(enum.IntFlag):
    """INIT capability flags (``fuse_init_in.flags`` / ``fuse_init_out.flags``)."""

    ASYNC_READ = 1 << 0
    BIG_WRITES = 1 << 5
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    MAX_PAGES = 1 << 22


#: What we ask for (intersected with what the kernel offers).
WANTED_INIT_FLAGS = (
    InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.ASYNC_DIO | InitFlag.MAX_PAGES
)


class SetattrValid(enum.IntFlag):
    """Which fields of a SETATTR request are set (``FATTR_*``)."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


FSYNC_FDATASYNC = 1 << 0

# -- layouts ------------------------------------------------------------------

#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error (negative errno), unique.
OUT_HEADER = struct.Struct("<IiQ")
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
#: fuse_init_out (7.31 layout, 64 bytes).
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
_OPEN_IN = struct.Struct("<II")  # flags, open_flags
_OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
_RW_IN = struct.Struct("<QQIIQII")  # fh, offset, size, rw_flags, lock_owner, flags, padding
_WRITE_OUT = struct.Struct("<II")  # size, padding
_FSYNC_IN = struct.Struct("<QII")  # fh, fsync_flags, padding
_FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
_INTERRUPT_IN = struct.Struct("<Q")
# fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime,
# atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5.
_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
# fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr: ino, size,
# blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
# uid, gid, rdev, blksize, flags.
_ATTR_OUT = struct.Struct("<QIIQQQQQQIIIIIIIIII")
# fuse_statfs_out (fuse_kstatfs): blocks, bfree, bavail, files, ffree, bsize,
# namelen, frsize, padding, spare[6].
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")


def read_buffer_size(max_write: int) -> int:
    """Size of the buffer each ``read(2)`` of /dev/fuse needs for ``max_write``.

    The kernel refuses (EINVAL) reads into a buffer smaller than a request
    header plus a WRITE's arguments plus ``max_write``, and never smaller
    than 8 KiB.
    """
    return max(8192, max_write + 4096)


# -- requests -----------------------------------------------------------------


class Request(NamedTuple):
    """One decoded request.

    Field meaning by opcode (unused fields are 0 / None):

    * READ: ``offset``, ``length``.
    * WRITE: ``offset``, ``length``, ``data`` (a copy: owned by the request),
      ``flags`` = write_flags.
    * FALLOCATE: ``offset``, ``length``, ``flags`` = mode.
    * FSYNC: ``flags`` = fsync_flags (``FSYNC_FDATASYNC``).
    * OPEN: ``flags`` = open(2) flags.
    * SETATTR: ``flags`` = valid mask, ``offset`` = new size,
      ``extra`` = (mode, uid, gid, atime, mtime).
    * INIT: ``flags`` = kernel capabilities, ``extra`` = (major, minor,
      max_readahead).
    * INTERRUPT: ``extra`` = (unique of the interrupted request,).
    """

    opcode: int
    unique: int
    nodeid: int
    pid: int
    offset: int = 0
    length: int = 0
    flags: int = 0
    data: bytes | None = None
    extra: tuple[int, ...] = ()


def _args(buf: memoryview, nbytes: int, layout: struct.Struct, opcode: int) -> tuple[int, ...]:
    if nbytes < IN_HEADER.size + layout.size:
        raise ProtocolError(f"FUSE request {opcode} is {nbytes} bytes, shorter than its arguments.")
    return layout.unpack_from(buf, IN_HEADER.size)


def decode_request(buf: memoryview, nbytes: int) -> Request:
    """Decode the request occupying the first ``nbytes`` bytes of ``buf``.

    Only the fields the server uses are decoded; opcodes it does not
    implement come back with just the header fields (and get ENOSYS).
    """
    if nbytes < IN_HEADER.size:
        raise ProtocolError(f"FUSE request of {nbytes} bytes is shorter than its header.")
    length, opcode, unique, nodeid, _uid, _gid, pid, _extlen, _pad = IN_HEADER.unpack_from(buf)
    if length != nbytes:
        raise ProtocolError(f"FUSE request says {length} bytes but {nbytes} were read.")
    if opcode == Opcode.WRITE:
        _fh, offset, size, wflags, _lo, _fl, _p = _args(buf, nbytes, _RW_IN, opcode)
        start = IN_HEADER.size + _RW_IN.size
        if start + size > nbytes:
            raise ProtocolError(f"FUSE WRITE of {size} bytes carries {nbytes - start}.")
        return Request(
            opcode, unique, nodeid, pid, offset, size, wflags, bytes(buf[start : start + size])
        )
    if opcode == Opcode.READ:
        _fh, offset, size, rflags, _lo, _fl, _p = _args(buf, nbytes, _RW_IN, opcode)
        return Request(opcode, unique, nodeid, pid, offset, size, rflags)
    if opcode == Opcode.FSYNC:
        _fh, fsync_flags, _p = _args(buf, nbytes, _FSYNC_IN, opcode)
        return Request(opcode, unique, nodeid, pid, flags=fsync_flags)
    if opcode == Opcode.FALLOCATE:
        _fh, offset, length, mode, _p = _args(buf, nbytes, _FALLOCATE_IN, opcode)
        return Request(opcode, unique, nodeid, pid, offset, length, mode)
    if opcode == Opcode.OPEN:
        open_flags, _of = _args(buf, nbytes, _OPEN_IN, opcode)
        return Request(opcode, unique, nodeid, pid, flags=open_flags)
    if opcode == Opcode.SETATTR:
        fields = _args(buf, nbytes, _SETATTR_IN, opcode)
        valid, size, atime, mtime, mode, uid, gid = (
            fields[0], fields[3], fields[5], fields[6], fields[11], fields[13], fields[14],
        )  # fmt: skip
        return Request(
            opcode,
            unique,
            nodeid,
            pid,
            offset=size,
            flags=valid,
            extra=(mode, uid, gid, atime, mtime),
        )
    if opcode == Opcode.INIT:
        major, minor, max_readahead, kflags = _args(buf, nbytes, _INIT_IN, opcode)
        return Request(
            opcode, unique, nodeid, pid, flags=kflags, extra=(major, minor, max_readahead)
        )
    if opcode == Opcode.INTERRUPT:
        (target,) = _args(buf, nbytes, _INTERRUPT_IN, opcode)
        return Request(opcode, unique, nodeid, pid, extra=(target,))
    return Request(opcode, unique, nodeid, pid)


# -- replies ------------------------------------------------------------------


def encode_reply(
    unique: int, payload: bytes | bytearray | memoryview = b""
) -> list[bytes | bytearray | memoryview]:
    """A successful reply: header and payload, as buffers for one writev(2)."""
    header = OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique)
    return [header, payload] if payload else [header]


def encode_error(unique: int, error: int) -> bytes:
    """An error reply; ``error`` is a positive errno."""
    return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)


class InitReply(NamedTuple):
    """What :func:`encode_init` negotiated (for logging)."""

    minor: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    max_pages: int


def encode_init(
    unique: int,
    kernel_minor: int,
    max_readahead: int,
    kernel_flags: int,
    *,
    max_background: int,
    max_write: int,
    page_size: int = 4096,
) -> tuple[bytes, InitReply]:
    """The INIT reply to a 7.x kernel offering ``kernel_flags``.

    ``max_background`` is clamped to 1..65535 (a u16 on the wire); the
    congestion threshold is three quarters of it.  ``max_write`` is rounded
    down to whole pages; with ``FUSE_MAX_PAGES`` the kernel sends requests
    of up to that size, otherwise of at most 32 pages.
    """
    minor = min(kernel_minor, FUSE_MINOR)
    flags = kernel_flags & WANTED_INIT_FLAGS
    background = max(1, min(max_background, 0xFFFF))
    congestion = max(1, background * 3 // 4)
    max_pages = max(1, min(max_write // page_size, 0xFFFF))
    if not flags & InitFlag.MAX_PAGES:
        max_pages = min(max_pages, 32)
    write = max_pages * page_size
    payload = _INIT_OUT.pack(
        FUSE_MAJOR,
        minor,
        max_readahead,
        flags,
        background,
        congestion,
        write,
        1,  # time_gran: nanoseconds
        max_pages,
        0,  # map_alignment
        0,  # flags2
    )
    header = OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique)
    return header + payload, InitReply(minor, flags, background, congestion, write, max_pages)


class Attr(NamedTuple):
    """The file's attributes, as returned by GETATTR and SETATTR."""

    size: int
    mode: int  #: full st_mode (S_IFREG | permissions)
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int = 4096


def encode_attr(unique: int, attr: Attr, valid_s: int, valid_ns: int = 0) -> bytes:
    """An attr reply (``fuse_attr_out``), cacheable for ``valid_s`` seconds."""
    a_s, a_ns = divmod(attr.atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(attr.mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(attr.ctime_ns, 1_000_000_000)
    payload = _ATTR_OUT.pack(
        valid_s,
        valid_ns,
        0,
        ROOT_ID,
        attr.size,
        (attr.size + 511) // 512,
        a_s,
        m_s,
        c_s,
        a_ns,
        m_ns,
        c_ns,
        attr.mode,
        1,  # nlink
        attr.uid,
        attr.gid,
        0,  # rdev
        attr.blksize,
        0,  # flags
    )
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def encode_open(unique: int, fh: int = 0, open_flags: int = 0) -> bytes:
    """An OPEN reply (``fuse_open_out``)."""
    payload = _OPEN_OUT.pack(fh, open_flags, 0)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def encode_write(unique: int, size: int) -> bytes:
    """A WRITE reply: ``size`` bytes were written."""
    payload = _WRITE_OUT.pack(size, 0)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def encode_statfs(unique: int, size: int, bsize: int = 4096) -> bytes:
    """A STATFS reply describing a full filesystem holding one file of ``size`` bytes."""
    blocks = (size + bsize - 1) // bsize
    payload = _STATFS_OUT.pack(blocks, 0, 0, 1, 0, bsize, 255, bsize, 0)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload
