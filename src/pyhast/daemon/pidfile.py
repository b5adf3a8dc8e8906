"""hastd's pidfile, in the manner of FreeBSD's pidfile(3).

Rules:

* :meth:`Pidfile.open` creates the file with mode 0600 and takes an exclusive
  ``flock`` on it without blocking. The lock belongs to the open file
  description, so it survives the double fork of daemonisation and is released
  by the kernel when the last holder exits: a stale file never blocks a new
  hastd.
* If another process holds the lock, :class:`PidfileLocked` carries the pid
  written in the file (0 when it cannot be read yet).
* :meth:`Pidfile.write` is called once the final (daemonised) pid is known;
  :meth:`Pidfile.remove` unlinks the file at a clean exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

__all__ = ["Pidfile", "PidfileLocked"]


class PidfileLocked(Exception):
    """Another process holds the pidfile's lock."""

    def __init__(self, path: str, pid: int) -> None:
        super().__init__(f"Another hastd is already running, pidfile: {path}, pid: {pid}.")
        self.path = path
        self.pid = pid


class Pidfile:
    """An open, locked pidfile. Use :meth:`open` to create one."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def open(cls, path: str) -> Pidfile:
        """Open (creating, mode 0600) and lock ``path``.

        Raises :class:`PidfileLocked` when another process holds the lock and
        OSError for any other failure.
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PidfileLocked(path, _other_pid(path)) from None
            raise
        return cls(path, fd)

    def write(self, pid: int | None = None) -> None:
        """Replace the file's contents with ``pid`` (default: this process)."""
        if self._fd is None:
            raise ValueError("The pidfile is closed.")
        text = f"{os.getpid() if pid is None else pid}\n".encode("ascii")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the descriptor (releasing the lock once no process holds it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Unlink the file and close it; errors are ignored (we are exiting)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.close()

    def fileno(self) -> int:
        """The locked descriptor (must stay open in the daemon)."""
        if self._fd is None:
            raise ValueError("The pidfile is closed.")
        return self._fd


def _other_pid(path: str, patience: float = 0.5) -> int:
    """The holder's pid; a holder that has just locked the file gets a moment to write it."""
    deadline = time.monotonic() + patience
    while True:
        pid = read_pid(path)
        if pid or time.monotonic() >= deadline:
            return pid
        time.sleep(0.02)


def read_pid(path: str) -> int:
    """The pid written in ``path``, or 0 if there is none (yet)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(32).strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0
