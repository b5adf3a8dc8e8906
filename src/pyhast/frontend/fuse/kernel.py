"""The few Linux system calls and kernel files the device frontend needs.

mount(2)/umount2(2) and prctl(2) through ctypes (the stdlib has none of
them; looked up on first use, so importing this module works anywhere), and
a parser for ``/proc/self/mountinfo``.  Every function raises
:class:`OSError` with the errno the kernel gave.  None of them touches the
FUSE file itself: the event loop that serves the file must never do I/O on
it, or it would wait for its own answer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from typing import Any, NamedTuple

__all__ = [
    "MNT_DETACH",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_RDONLY",
    "MountEntry",
    "mount",
    "mountinfo",
    "set_io_flusher",
    "umount",
]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
#: prctl(2) option that marks the caller as part of the I/O path (Linux 5.6).
PR_SET_IO_FLUSHER = 57

_SIGNATURES: dict[str, list[type[Any]]] = {
    "mount": [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p],
    "umount2": [ctypes.c_char_p, ctypes.c_int],
    "prctl": [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong],
}
_funcs: dict[str, Any] = {}


def _libc(name: str) -> Any:
    """The libc function ``name``, typed; OSError(ENOSYS) where libc has none (not Linux)."""
    func = _funcs.get(name)
    if func is None:
        try:
            func = getattr(ctypes.CDLL(None, use_errno=True), name)
        except (OSError, AttributeError):
            raise OSError(errno.ENOSYS, f"{name}() is not available on this system") from None
        func.argtypes = _SIGNATURES[name]
        func.restype = ctypes.c_int
        _funcs[name] = func
    return func


def _raise(what: str) -> None:
    err = ctypes.get_errno() or errno.EIO
    raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2)."""
    if _libc("mount")(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode()):
        _raise(f"mount {target}")


def umount(target: str, *, detach: bool = False) -> None:
    """umount2(2); ``detach`` is a lazy unmount (MNT_DETACH)."""
    if _libc("umount2")(os.fsencode(target), MNT_DETACH if detach else 0):
        _raise(f"umount {target}")


def set_io_flusher() -> None:
    """prctl(PR_SET_IO_FLUSHER, 1) on the calling thread (and threads it starts later).

    It makes the kernel allocate memory for this thread without starting
    I/O (GFP_NOIO) and exempts it from dirty-page throttling, so that a
    server in the I/O path of a loop device over FUSE cannot deadlock in
    reclaim waiting for itself.  Needs CAP_SYS_RESOURCE: EPERM otherwise.
    """
    if _libc("prctl")(PR_SET_IO_FLUSHER, 1, 0, 0, 0):
        _raise("prctl(PR_SET_IO_FLUSHER)")


class MountEntry(NamedTuple):
    """One line of /proc/<pid>/mountinfo."""

    mount_id: int
    dev: tuple[int, int]  #: major, minor of the mounted filesystem
    mountpoint: str
    fstype: str
    source: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Parse a mountinfo file (see proc(5)); unreadable lines are skipped."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
                major, minor = fields[2].split(":")
                entries.append(
                    MountEntry(
                        int(fields[0]),
                        (int(major), int(minor)),
                        _unescape(fields[4]),
                        fields[sep + 1],
                        _unescape(fields[sep + 2]),
                    )
                )
            except (ValueError, IndexError):
                continue
    return entries
