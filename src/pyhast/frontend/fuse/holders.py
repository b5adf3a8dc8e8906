"""Who holds a device file open: loop devices, processes, other mounts.

Leaving the primary role must not pull the device out from under a mounted
filesystem.  :func:`find_holders` looks where Linux shows users of a file:

* ``/sys/block/loop*/loop/backing_file``: loop devices backed by it, and for
  each one where it is mounted (``/proc/self/mountinfo``, by device number,
  partitions included), which processes have the loop device open and which
  block devices are stacked on it (``/sys/block/loopN/holders``);
* ``/proc/<pid>/fd/*`` and ``/proc/<pid>/maps``: processes with a
  descriptor or a mapping of the file;
* ``/proc/self/mountinfo``: other mounts of the same filesystem (bind mounts).

It only reads links and text files: it never opens or stats the device
file, so the event loop that serves the file may call it.  Processes that
exit or hide their descriptors (another user without ptrace rights) while
we look are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from pyhast.frontend.fuse.kernel import mountinfo

__all__ = ["Holders", "LoopHolder", "ProcessHolder", "busy_message", "find_holders"]


@dataclass(frozen=True)
class ProcessHolder:
    """A process with the file (or a loop device) open or mapped."""

    pid: int
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command})"


@dataclass(frozen=True)
class LoopHolder:
    """A loop device backed by the file."""

    name: str  #: e.g. "loop0"
    mountpoints: tuple[str, ...] = ()
    openers: tuple[ProcessHolder, ...] = ()
    stacked: tuple[str, ...] = ()  #: block devices built on it (dm-0, md0)

    def describe(self) -> str:
        details = []
        if self.mountpoints:
            details.append("mounted on " + ", ".join(self.mountpoints))
        if self.openers:
            details.append("open by " + ", ".join(p.describe() for p in self.openers))
        if self.stacked:
            details.append("used by " + ", ".join(self.stacked))
        return f"{self.name} ({'; '.join(details)})" if details else self.name


@dataclass(frozen=True)
class Holders:
    """Everything found holding ``path``; false when nothing does."""

    path: str
    loops: tuple[LoopHolder, ...] = ()
    processes: tuple[ProcessHolder, ...] = ()
    mounts: tuple[str, ...] = ()  #: other mountpoints of the same filesystem

    def __bool__(self) -> bool:
        return bool(self.loops or self.processes or self.mounts)

    def describe(self) -> str:
        """``loop0 (mounted on /mnt/x) and by pid 1234 (dd)``."""
        groups = []
        if self.loops:
            groups.append(", ".join(loop.describe() for loop in self.loops))
        if self.processes:
            groups.append(", ".join(p.describe() for p in self.processes))
        if self.mounts:
            groups.append("a bind mount on " + ", ".join(self.mounts))
        return " and by ".join(groups)


def busy_message(holders: Holders) -> str:
    """The sentence :class:`~pyhast.frontend.fuse.device.DeviceBusy` carries."""
    return f"{holders.path} is in use by {holders.describe()}; unmount and detach it, or use force."


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def _command(proc_root: str, pid: int) -> str:
    comm = _read(f"{proc_root}/{pid}/comm")
    return comm.strip() if comm else "?"


def _scan_processes(targets: Iterable[str], proc_root: str) -> dict[str, list[ProcessHolder]]:
    """Map each target path to the processes that have it open or mapped."""
    wanted = set(targets)
    found: dict[str, list[ProcessHolder]] = {t: [] for t in wanted}
    try:
        pids = sorted(int(d) for d in os.listdir(proc_root) if d.isdigit())
    except OSError:
        return found
    for pid in pids:
        hits: set[str] = set()
        fd_dir = f"{proc_root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # exited, or not ours to look at
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link in wanted:
                hits.add(link)
        maps = _read(f"{proc_root}/{pid}/maps")
        if maps:
            for line in maps.splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5] in wanted:
                    hits.add(parts[5])
        if hits:
            holder = ProcessHolder(pid, _command(proc_root, pid))
            for target in hits:
                found[target].append(holder)
    return found


def _dev(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        major, minor = text.strip().split(":")
        return int(major), int(minor)
    except ValueError:
        return None


def find_holders(
    path: str,
    *,
    dev: tuple[int, int] | None = None,
    proc_root: str = "/proc",
    sys_root: str = "/sys",
    mountinfo_path: str | None = None,
) -> Holders:
    """Find what holds ``path`` (an absolute path without symlinks).

    ``dev`` is the (major, minor) of the filesystem mounted on ``path``; when
    given, other mounts of that filesystem are reported too.
    """
    mounts = mountinfo(mountinfo_path or f"{proc_root}/self/mountinfo")

    # Loop devices backed by path, and the device numbers of them and their partitions.
    block = f"{sys_root}/block"
    loops: list[tuple[str, set[tuple[int, int]], list[str], list[str]]] = []
    try:
        names = sorted((n for n in os.listdir(block) if n.startswith("loop")), key=_natural)
    except OSError:
        names = []
    for name in names:
        backing = _read(f"{block}/{name}/loop/backing_file")
        if backing is None or backing.rstrip("\n") != path:
            continue
        devs: set[tuple[int, int]] = set()
        nodes = [f"/dev/{name}"]
        main = _dev(_read(f"{block}/{name}/dev"))
        if main:
            devs.add(main)
        try:
            parts = sorted(p for p in os.listdir(f"{block}/{name}") if p.startswith(name + "p"))
        except OSError:
            parts = []
        for part in parts:
            pdev = _dev(_read(f"{block}/{name}/{part}/dev"))
            if pdev:
                devs.add(pdev)
                nodes.append(f"/dev/{part}")
        try:
            stacked = sorted(os.listdir(f"{block}/{name}/holders"))
        except OSError:
            stacked = []
        loops.append((name, devs, nodes, stacked))

    openers = _scan_processes([path, *(n for loop in loops for n in loop[2])], proc_root)

    loop_holders = []
    for name, devs, nodes, stacked in loops:
        points = tuple(sorted({m.mountpoint for m in mounts if m.dev in devs}))
        procs: dict[int, ProcessHolder] = {}
        for node in nodes:
            for p in openers.get(node, []):
                procs.setdefault(p.pid, p)
        loop_holders.append(
            LoopHolder(name, points, tuple(procs[k] for k in sorted(procs)), tuple(stacked))
        )

    others: tuple[str, ...] = ()
    if dev is not None:
        others = tuple(sorted({m.mountpoint for m in mounts if m.dev == dev} - {path}))

    return Holders(path, tuple(loop_holders), tuple(openers.get(path, [])), others)


def _natural(name: str) -> tuple[int, str]:
    digits = name[4:]
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)
