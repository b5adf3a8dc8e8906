"""Run hastctl as a real process."""

from __future__ import annotations

import subprocess
import sys


def hastctl(
    *args: str, node: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``hastctl <args>`` with this interpreter; output captured as text."""
    cmd = [sys.executable, "-m", "pyhast.cli.hastctl", *args]
    if node is not None:
        cmd[3:4] = [args[0], "--node", node]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
