"""The README's demo: what pyhast can show today, on real files.

It writes a hast.conf for two nodes on this machine (nodea, nodeb), creates
both providers with ``hastctl create`` and prints their metadata with
``hastctl dump``.  Later stages (replication, failover) extend it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CONFIG = """\
# Two nodes on one machine: nodea on 127.0.0.1, nodeb on 127.0.0.2.
replication memsync
resource demo {{
        on nodea {{
                local {dir}/demo-a.img
                remote tcp4://127.0.0.2:18457
        }}
        on nodeb {{
                local {dir}/demo-b.img
                remote tcp4://127.0.0.1:18457
        }}
}}
"""


def hastctl(node: str, config: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "pyhast.cli.hastctl", *args[:1], "-c", config, "--node", node]
    cmd += list(args[1:])
    print(f"$ hastctl {' '.join(args)}    # on {node}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"demo: hastctl {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pyhast-demo-") as tmp:
        config = os.path.join(tmp, "hast.conf")
        with open(config, "w") as f:
            f.write(CONFIG.format(dir=tmp))
        for name in ("demo-a.img", "demo-b.img"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.truncate(256 * 1024 * 1024)
        for node in ("nodea", "nodeb"):
            hastctl(node, config, "create", "demo")
        out = hastctl("nodea", config, "dump", "demo")
        hastctl("nodeb", config, "dump")
        if "datasize: 268430848" not in out:
            print("demo: unexpected datasize in the dump", file=sys.stderr)
            return 1
        print("demo: both providers initialised; replication arrives with hastd.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
