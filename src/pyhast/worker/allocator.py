"""Keep glibc from mapping and unmapping every large I/O buffer.

Every large write arrives in a buffer of its own (up to MAXPHYS, 1 MiB).
glibc serves such a request with mmap and returns it with munmap, so each
buffer costs 256 fresh page faults plus the zero-fill, again and again:
about 170 microseconds per MiB on the primary's NBD receive path, 15% of its
CPU on sequential writes (measured with bench/run.py, seq write 1M QD16).
Raising the mmap threshold above MAXPHYS and the trim threshold above the
bounded amount of payload in flight (MAX_REMOTE_INFLIGHT_BYTES) keeps those
buffers in the heap and reuses them warm.  The worker's resident size stays
bounded by what is in flight (checked by the benchmark's RSS column).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: glibc's largest accepted mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free heap kept before it is returned to the kernel.
TRIM_THRESHOLD = 128 * 1024 * 1024


def tune_allocator() -> bool:
    """Apply the thresholds; False (and nothing changed) off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.debug("mallopt refused the buffer thresholds; keeping glibc's defaults.")
    return ok
