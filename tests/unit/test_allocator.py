"""The worker's allocator thresholds: large I/O buffers are reused warm."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from pyhast.worker.allocator import tune_allocator
    if sys.argv[1] == "tuned":
        assert tune_allocator()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # A burst of 16 writes in flight, all completed, the next burst: the
    # pattern of a QD16 client whose queue drains now and then.
    burst = [bytearray(1 << 20) for _ in range(16)]
    del burst
    before = faults()
    for _ in range(20):
        burst = [bytearray(1 << 20) for _ in range(16)]
        del burst
    print(faults() - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_large_buffers_are_reused_without_page_faults_once_tuned() -> None:
    # 320 fresh 1 MiB buffers: glibc's default gives the freed heap back to
    # the kernel after each burst and faults it in again (256 faults a
    # buffer); tuned, the buffers come back from the heap already mapped.
    untuned = _faults("default")
    tuned = _faults("tuned")
    assert untuned > 320 * 128, untuned
    assert tuned < 320 * 8, tuned
