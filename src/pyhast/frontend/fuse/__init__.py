"""The primary's device file, ``/dev/hast/<provname>``, served over FUSE in-process.

* :mod:`.protocol`: the kernel's FUSE protocol for one regular file (sans-IO).
* :mod:`.server`: :class:`FuseServer`, which answers /dev/fuse from the
  event loop that owns the :class:`~pyhast.frontend.nbd.backend.BlockBackend`.
* :mod:`.device`: :class:`HastDevice`, the mount's lifecycle (start, stop,
  refusing to stop while held, stale mounts, loss of the session).
* :mod:`.holders`: who holds a file open (loop devices, processes, mounts).
* :mod:`.kernel`: mount/umount2/prctl and /proc/self/mountinfo.

docs/device.md explains the design and the measurements behind it.
"""

from pyhast.frontend.fuse.device import DEFAULT_DEVDIR, DeviceBusy, DeviceError, HastDevice
from pyhast.frontend.fuse.holders import Holders, LoopHolder, ProcessHolder, find_holders
from pyhast.frontend.fuse.server import FuseServer, FuseStats

__all__ = [
    "DEFAULT_DEVDIR",
    "DeviceBusy",
    "DeviceError",
    "FuseServer",
    "FuseStats",
    "HastDevice",
    "Holders",
    "LoopHolder",
    "ProcessHolder",
    "find_holders",
]
