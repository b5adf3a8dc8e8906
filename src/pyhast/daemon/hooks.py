"""The ``exec`` hook (spec 9), run by the parent and never waited for.

Rules:

* The hook is started with fork+exec semantics through :mod:`subprocess`:
  no shell, ``argv[0]`` is the basename of the configured path (the path
  itself is given as ``executable``), the environment is inherited, every
  descriptor but stdio is closed, and stdio goes to ``/dev/null`` when the
  daemon runs in the background.  An empty path means "no hook".
* :meth:`HookRunner.run` returns at once.  The parent calls :meth:`reap`
  whenever SIGCHLD arrives (and from its periodic tick), and :meth:`check`
  every few seconds.
* A hook that exits non-zero or dies by a signal is logged as an error with its
  command line; a hook still running after :data:`REPORT_INTERVAL` seconds is
  reported, and again every :data:`REPORT_INTERVAL` seconds; a hook that
  vanished without being reaped is warned about.
* The argv vocabulary (:func:`role_args`, :func:`event_args`) is exactly
  FreeBSD's: ``role <res> <old> <new>``, ``connect <res>``, ``disconnect
  <res>``, ``syncstart <res>``, ``syncdone <res>``, ``syncintr <res>``,
  ``split-brain <res>``.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyhast.enums import Event, Role
from pyhast.log import errno_text

__all__ = ["REPORT_INTERVAL", "HookProc", "HookRunner", "event_args", "role_args"]

log = logging.getLogger(__name__)

#: A hook running longer than this (seconds) is reported, and again after each interval.
REPORT_INTERVAL = 60.0


def role_args(resource: str, old: Role, new: Role) -> tuple[str, ...]:
    """Arguments of the ``role`` hook."""
    return ("role", resource, old.label, new.label)


def event_args(resource: str, event: Event) -> tuple[str, ...]:
    """Arguments of an event hook (``connect <res>``, ``split-brain <res>``, ...)."""
    return (event.hook_name, resource)


@dataclass
class HookProc:
    """One running hook."""

    proc: subprocess.Popen[bytes]
    #: ``path arg1 arg2 ...``, for log lines.
    command: str
    started: float
    last_report: float = field(default=0.0)

    @property
    def pid(self) -> int:
        return self.proc.pid


class HookRunner:
    """Starts hooks and keeps track of them until they are reaped.

    ``daemonised`` sends the hooks' stdio to /dev/null; in the foreground they
    share hastd's terminal (as FreeBSD does in its std log mode).
    """

    def __init__(
        self,
        *,
        daemonised: bool = False,
        clock: Callable[[], float] = time.monotonic,
        report_interval: float = REPORT_INTERVAL,
    ) -> None:
        self._daemonised = daemonised
        self._clock = clock
        self._report_interval = report_interval
        self._running: dict[int, HookProc] = {}

    @property
    def running(self) -> list[HookProc]:
        """The hooks not reaped yet."""
        return list(self._running.values())

    def run(self, path: str, args: tuple[str, ...]) -> int | None:
        """Start ``path`` with ``args`` and return its pid (None: no hook or failure)."""
        if not path:
            return None
        command = " ".join((path, *args))
        log.debug("Executing hook: %s", command)
        stdio = subprocess.DEVNULL if self._daemonised else None
        try:
            proc = subprocess.Popen(
                [os.path.basename(path) or path, *args],
                executable=path,
                stdin=stdio,
                stdout=stdio,
                stderr=stdio,
                close_fds=True,
                restore_signals=True,
            )
        except OSError as exc:
            log.error("%s", errno_text(f"Unable to execute {path}", exc))
            return None
        now = self._clock()
        self._running[proc.pid] = HookProc(proc, command, now, now)
        return proc.pid

    def reap(self) -> None:
        """Collect every finished hook and log how it ended (never blocks)."""
        for pid, hook in list(self._running.items()):
            try:
                status = hook.proc.poll()
            except OSError:
                status = None
            if status is None:
                continue
            del self._running[pid]
            if status == 0:
                log.debug("Hook exited gracefully (pid=%d, cmd=[%s]).", pid, hook.command)
            elif status < 0:
                log.error(
                    "Hook was killed (pid=%d, signal=%d, cmd=[%s]).", pid, -status, hook.command
                )
            else:
                log.error(
                    "Hook exited ungracefully (pid=%d, exitcode=%d, cmd=[%s]).",
                    pid,
                    status,
                    hook.command,
                )

    def check(self) -> None:
        """Report long-running hooks and forget vanished ones; call every few seconds."""
        self.reap()
        now = self._clock()
        for pid, hook in list(self._running.items()):
            if not _alive(pid):
                log.warning("Hook disappeared (pid=%d, cmd=[%s]).", pid, hook.command)
                del self._running[pid]
                continue
            if now - hook.last_report < self._report_interval:
                continue
            log.warning(
                "Hook is running for %d seconds (pid=%d, cmd=[%s]).",
                int(now - hook.started),
                pid,
                hook.command,
            )
            hook.last_report = now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True
