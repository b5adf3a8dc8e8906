"""Every process the benchmark starts: pinned with taskset, bounded, cleaned up.

* A server (nbdkit, hastd) starts in its own session (``start_new_session``),
  so its whole process group (hastd's workers stay in it) can be killed.
* :meth:`Procs.cleanup` stops everything still running, newest first:
  SIGTERM, a bounded wait, then SIGKILL of the process group; extra pids
  recorded with :meth:`Procs.remember` (workers) are SIGKILLed if alive.  It
  runs from ``finally`` and from atexit, and SIGTERM/SIGHUP to the benchmark
  are turned into KeyboardInterrupt so the ``finally`` runs then too.
* A server's stdout+stderr go through a pipe to a reader thread that writes
  them to its log file and keeps every line with its ``time.monotonic()``
  arrival, so events in the log (e.g. "Synchronization complete") can be
  timed precisely even though hastd's lines carry no time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` under ``taskset -c cpu`` (taskset execs, so the pid is argv's)."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class LogTap:
    """Reads a process's output line by line: to a file, and timestamped in memory."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name=f"tap-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.path, "a", encoding="utf-8", errors="replace") as out:
            for raw in iter(self._stream.readline, b""):
                now = time.monotonic()
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                with self._lock:
                    self.lines.append((now, line))
                out.write(line + "\n")
                out.flush()
        self._stream.close()

    def mark(self) -> int:
        with self._lock:
            return len(self.lines)

    def find(self, text: str, since: int = 0) -> tuple[float, str] | None:
        """The first line from index ``since`` containing ``text``, with its arrival time."""
        with self._lock:
            for when, line in self.lines[since:]:
                if text in line:
                    return when, line
        return None

    def wait(self, text: str, timeout: float, since: int = 0) -> tuple[float, str]:
        found: tuple[float, str] = wait_until(
            lambda: self.find(text, since), timeout, f"{text!r} in {self.path.name}"
        )
        return found

    def text(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[Any], tap: LogTap | None) -> None:
        self.name = name
        self.popen = popen
        self.tap = tap

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None


class Procs:
    """The registry of started processes; :meth:`cleanup` ends them all."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []
        self.extra_pids: set[int] = set()
        self.cleanups: list[Callable[[], None]] = []
        self.first: list[Callable[[], None]] = []
        self._cleaned = False
        atexit.register(self.cleanup)

    def spawn_server(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start a long-running server in its own session, its output tapped."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        popen = subprocess.Popen(
            pinned(argv, cpu),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        assert popen.stdout is not None
        proc = Proc(name, popen, LogTap(popen.stdout, self.logdir / f"{name}.log"))
        self.procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        cpu: int | None = None,
        timeout: float,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short-lived command to completion (killed after ``timeout``)."""
        popen = subprocess.Popen(
            pinned(argv, cpu),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        proc = Proc(str(argv[0]), popen, None)
        self.procs.append(proc)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(popen)
            popen.communicate(timeout=10)
            raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f} s: {argv}") from None
        except BaseException:
            self._kill_group(popen)
            raise
        finally:
            if popen.poll() is not None:
                self.procs.remove(proc)
        res = subprocess.CompletedProcess(list(argv), popen.returncode, out, err)
        if check and popen.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} exited with {popen.returncode}: {' '.join(argv)}\n{out}\n{err}"
            )
        return res

    def remember(self, pid: int) -> None:
        """A pid (a worker) to SIGKILL at cleanup if it is still alive."""
        self.extra_pids.add(pid)

    def before_stop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at cleanup before any process is stopped (loop devices)."""
        self.first.append(fn)

    def at_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (losetup -d, rm -r ...) at cleanup, after every process is gone."""
        self.cleanups.append(fn)

    @staticmethod
    def _kill_group(popen: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            popen.kill()

    def stop(self, proc: Proc, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait at most ``timeout``, then SIGKILL the group; the exit status."""
        popen = proc.popen
        for pid in descendants(popen.pid):
            self.extra_pids.add(pid)
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: {proc.name} ignored SIGTERM for {timeout:.0f} s: killed")
        # Whatever is left in its process group (workers) goes too.
        self._kill_group(popen)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(10)
        if proc.tap is not None:
            proc.tap.join()
        if proc in self.procs:
            self.procs.remove(proc)
        return popen.returncode

    def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        for fn in self.first:
            try:
                fn()
            except Exception as exc:
                print(f"bench: cleanup step failed: {exc}")
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc, timeout=15.0)
            except Exception as exc:  # keep cleaning
                print(f"bench: cleanup of {proc.name} failed: {exc}")
        for pid in sorted(self.extra_pids):
            if alive(pid):
                print(f"bench: pid {pid} outlived its parent: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:
                print(f"bench: cleanup step failed: {exc}")


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so cleanup runs.

    SIGINT is set explicitly: Python leaves it ignored when it started
    ignored (a background job of a non-interactive shell).
    """

    def handler(signo: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signo}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signo in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signo, handler)


def need_tools(*tools: str) -> list[str]:
    """The tools that are not on PATH."""
    return [t for t in tools if shutil.which(t) is None]
