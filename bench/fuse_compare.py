#!/usr/bin/env python3
"""Which way to make /dev/hast/<name> a file: the measurement behind docs/device.md.

Every variant serves the same kind of backend (a FileBackend on a sparse file
of --size bytes, owned by an asyncio loop in a "worker" subprocess, as in the
primary) and is used the same way: ``losetup --direct-io=on`` on the file,
then fio (libaio, O_DIRECT) on the loop device.  The images live on tmpfs
(/dev/shm) by default: on a disk, the page cache's writeback and dirty-page
throttling of the backend file dominate and blur the frontends' own cost.

Variants:

* ``plain``: a loop device on a plain file (no FUSE, no Python): the ceiling.
* ``fuse``: pyhast's HastDevice: /dev/fuse answered from the worker's event
  loop (pyhast.frontend.fuse), max_background 256.
* ``nbdfuse``: the worker serves NBD on a unix socket (pyhast's NBDServer);
  nbdfuse (libnbd, C) mounts it on a file.  Kernel default max_background (12).
* ``nbdfuse-bg256``: the same with max_background raised to 256 through
  /sys/fs/fuse/connections/N (nbdfuse itself cannot).
* ``mfusepy``: libfuse through the mfusepy ctypes binding in the worker:
  128 libfuse threads, max_background 256 set at init, each request hopping
  into the worker's loop with run_coroutine_threadsafe.  Skipped if mfusepy
  is not importable (it is not a pyhast dependency).

Jobs: sequential 1 MiB writes (iodepth 16), random 4 KiB writes and reads
(iodepth 64), random 4 KiB writes at iodepth 1 (latency).  With
``--latency-ms`` > 0 the FUSE variants also run random 4 KiB writes (iodepth
64) against a backend whose writes and flushes take that long, like a
primary waiting for its secondary: throughput is then bounded by how many
requests each path keeps in flight.

Server CPU is the user+system time of the worker (and of nbdfuse) per I/O.
Results: a table on stdout and bench/out/fuse_compare.json.
Run as root: ``.venv/bin/python bench/fuse_compare.py`` (about 4 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

JOBS: dict[str, dict[str, str]] = {
    "seqwrite_1m_qd16": {"rw": "write", "bs": "1M", "iodepth": "16"},
    "randwrite_4k_qd64": {"rw": "randwrite", "bs": "4k", "iodepth": "64"},
    "randread_4k_qd64": {"rw": "randread", "bs": "4k", "iodepth": "64"},
    "randwrite_4k_qd1": {"rw": "randwrite", "bs": "4k", "iodepth": "1"},
}
LATENCY_JOB = "randwrite_4k_qd64_latency"
VARIANTS = ["plain", "fuse", "nbdfuse", "nbdfuse-bg256", "mfusepy"]
FUSE_VARIANTS = ["fuse", "nbdfuse", "nbdfuse-bg256", "mfusepy"]


# -- worker side (runs in a subprocess) ----------------------------------------------


class DelayBackend:
    """Writes and flushes that take ``delay`` seconds (a remote acknowledgement)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.size = inner.size
        self.block_size = inner.block_size
        self.read_only = inner.read_only
        self.can_multi_conn = inner.can_multi_conn

    async def read(self, offset: int, length: int) -> Any:
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: Any, fua: bool) -> None:
        await asyncio.sleep(self.delay)
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await asyncio.sleep(self.delay)
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        await self.inner.write_zeroes(offset, length, fua, may_trim)


def _mfusepy_thread(backend: Any, loop: asyncio.AbstractEventLoop, path: str) -> threading.Thread:
    """libfuse via mfusepy, every request hopping into ``loop`` (the binding approach)."""
    import mfusepy

    now = time.time_ns()

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def _run(self, coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        def init_with_config(self, conn: Any, config: Any) -> None:
            if conn is not None:
                conn.max_background = 256
                conn.congestion_threshold = 192
            if config is not None:
                config.attr_timeout = 3600.0

        def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOENT)
            return {
                "st_mode": stat.S_IFREG | 0o600,
                "st_nlink": 1,
                "st_size": backend.size,
                "st_atime": now,
                "st_mtime": now,
                "st_ctime": now,
            }

        def open(self, path: str, flags: int) -> int:
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            size = max(0, min(size, backend.size - offset))
            return bytes(self._run(backend.read(offset, size))) if size else b""

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            self._run(backend.write(offset, data, False))
            return len(data)

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            self._run(backend.flush())
            return 0

        def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
            self._run(backend.trim(offset, size, False))
            return 0

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            return 0

    def serve() -> None:
        mfusepy.FUSE(Ops(), path, foreground=True, max_threads=128, fsname="mfusepy")

    thread = threading.Thread(target=serve, name="libfuse", daemon=True)
    thread.start()
    return thread


async def _serve(kind: str, image: str, target: str, latency: float) -> None:
    from pyhast.frontend.fuse import HastDevice
    from pyhast.frontend.nbd.backend import FileBackend
    from pyhast.frontend.nbd.server import NBDServer

    file_backend = FileBackend(image)
    backend: Any = DelayBackend(file_backend, latency) if latency else file_backend
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if kind == "fuse":
        dev = HastDevice(backend, os.path.basename(target), devdir=os.path.dirname(target))
        await dev.start()
        print("READY", flush=True)
        await stop.wait()
        await dev.stop(force=True)
    elif kind == "nbd":
        server = NBDServer({"disk": backend}, unix_path=target)
        await server.start()
        print("READY " + server.uri("disk"), flush=True)
        await stop.wait()
        await server.close()
    elif kind == "mfusepy":
        Path(target).touch()
        _mfusepy_thread(backend, loop, target)
        print("READY", flush=True)  # the parent polls for the size
        await stop.wait()
    file_backend.close()


# -- parent side ---------------------------------------------------------------------


def run(*args: str, timeout: float = 120, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def wait_file(path: str, size: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size == size and os.path.ismount(path):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear with {size} bytes")
        time.sleep(0.05)


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def set_max_background(path: str, value: int) -> None:
    minor = os.minor(os.stat(path).st_dev)
    conn = Path(f"/sys/fs/fuse/connections/{minor}")
    if not conn.exists():
        run("mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections", check=False)
    (conn / "max_background").write_text(str(value))
    (conn / "congestion_threshold").write_text(str(value * 3 // 4))


@dataclass
class Setup:
    """A served file (or the plain image) with a loop device on it."""

    file: str
    loop: str = ""
    pids: list[int] = field(default_factory=list)


@contextlib.contextmanager
def served(variant: str, workdir: Path, size: int, latency: float) -> Iterator[Setup]:
    image = workdir / f"{variant}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    procs: list[subprocess.Popen[str]] = []
    mountpoint = ""
    setup = Setup(str(image))
    try:
        if variant != "plain":
            kind = {"fuse": "fuse", "mfusepy": "mfusepy"}.get(variant, "nbd")
            devdir = workdir / "dev"
            devdir.mkdir(exist_ok=True)
            mountpoint = str(devdir / variant)
            target = str(workdir / "nbd.sock") if kind == "nbd" else mountpoint
            worker = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, "--image", str(image),
                 "--target", target, "--latency-ms", str(latency * 1000)],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            procs.append(worker)
            assert worker.stdout is not None
            line = worker.stdout.readline().split()
            if not line or line[0] != "READY":
                raise RuntimeError(f"{variant}: the worker did not start")
            setup.pids.append(worker.pid)
            if kind == "nbd":
                Path(mountpoint).touch()
                nbdfuse = subprocess.Popen(
                    ["nbdfuse", mountpoint, line[1]], stdin=subprocess.DEVNULL, text=True
                )
                procs.append(nbdfuse)
                setup.pids.append(nbdfuse.pid)
            wait_file(mountpoint, size)
            if variant == "nbdfuse-bg256":
                set_max_background(mountpoint, 256)
            setup.file = mountpoint
        setup.loop = run("losetup", "-f", "--show", "--direct-io=on", setup.file).strip()
        yield setup
    finally:
        if setup.loop:
            run("losetup", "-d", setup.loop, check=False)
        for proc in procs:
            if proc.args[0] == "nbdfuse":
                run("fusermount3", "-u", mountpoint, check=False)
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if mountpoint and is_mounted(mountpoint):
            run("umount", "-l", mountpoint, check=False)
        with contextlib.suppress(OSError):
            if mountpoint:
                os.unlink(mountpoint)
        image.unlink()


def fio(loop: str, job: dict[str, str], runtime: int, size: int) -> dict[str, Any]:
    args = ["fio", "--name=job", f"--filename={loop}", "--ioengine=libaio", "--direct=1",
            "--time_based", f"--runtime={runtime}", f"--size={size}", "--group_reporting",
            "--randrepeat=0", "--output-format=json"]  # fmt: skip
    args += [f"--{k}={v}" for k, v in job.items()]
    out = json.loads(run(*args, timeout=runtime + 120))
    side = out["jobs"][0]["write" if "write" in job["rw"] else "read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": round(side["iops"]),
        "mib_s": round(side["bw_bytes"] / MiB, 1),
        "clat_p50_us": round(pct.get("50.000000", 0) / 1000),
        "clat_p99_us": round(pct.get("99.000000", 0) / 1000),
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("fio", "losetup"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    variants = args.variants.split(",")
    if "mfusepy" in variants:
        try:
            import mfusepy  # noqa: F401
        except ImportError:
            print("mfusepy is not importable: skipping that variant", file=sys.stderr)
            variants.remove("mfusepy")
    if any(v.startswith("nbdfuse") for v in variants) and shutil.which("nbdfuse") is None:
        print("nbdfuse is not installed: skipping it", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("nbdfuse")]
    results: dict[str, dict[str, Any]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="fusebench", dir=args.workdir))
    try:
        plan = [(v, 0.0) for v in variants]
        if args.latency_ms > 0:
            plan += [(v, args.latency_ms / 1000) for v in variants if v in FUSE_VARIANTS]
        for variant, latency in plan:
            jobs = {LATENCY_JOB: JOBS["randwrite_4k_qd64"]} if latency else JOBS
            with served(variant, workdir, args.size, latency) as setup:
                for name, job in jobs.items():
                    cpu0 = cpu_seconds(setup.pids)
                    res = fio(setup.loop, job, args.runtime, args.size)
                    cpu = cpu_seconds(setup.pids) - cpu0
                    ios = res["iops"] * args.runtime
                    res["server_cpu_us_per_io"] = (
                        round(cpu / ios * 1e6, 1) if ios and setup.pids else None
                    )
                    results.setdefault(variant, {})[name] = res
                    print(f"{variant:14} {name:26} {res}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "params": {
            "size": args.size,
            "runtime_s": args.runtime,
            "latency_ms": args.latency_ms,
            "fio": run("fio", "--version").strip(),
        },
        "results": results,
    }


def ratios(report: dict[str, Any], base: str) -> dict[str, dict[str, float]]:
    results = report["results"]
    if base not in results:
        return {}
    out: dict[str, dict[str, float]] = {}
    for variant, jobs in results.items():
        for job, res in jobs.items():
            ref = results[base].get(job)
            if ref and ref["iops"]:
                out.setdefault(variant, {})[job] = round(res["iops"] / ref["iops"], 2)
    return out


def print_table(report: dict[str, Any]) -> None:
    results = report["results"]
    jobs = [*JOBS, LATENCY_JOB]
    heads = {
        "seqwrite_1m_qd16": "seq 1M wr MiB/s",
        "randwrite_4k_qd64": "4k randwr IOPS",
        "randread_4k_qd64": "4k randrd IOPS",
        "randwrite_4k_qd1": "4k wr qd1 IOPS",
        LATENCY_JOB: f"4k randwr +{report['params']['latency_ms']:g}ms",
    }
    print()
    print(f"{'variant':14}" + "".join(f"{heads[j]:>22}" for j in jobs))
    vs_plain = report["ratios_vs_plain"]
    vs_fuse = report["ratios_vs_fuse"]
    for variant, res in results.items():
        cells = []
        for job in jobs:
            r = res.get(job)
            if not r:
                cells.append(f"{'-':>22}")
                continue
            value = r["mib_s"] if job.startswith("seq") else r["iops"]
            ratio = vs_plain.get(variant, {}).get(job) if job in results.get("plain", {}) else None
            if ratio is None:
                ratio = vs_fuse.get(variant, {}).get(job)
                tag = "f"
            else:
                tag = "p"
            cells.append(f"{value:>12} ({ratio if ratio is not None else '-':>4}{tag})")
        print(f"{variant:14}" + "".join(f"{c:>22}" for c in cells))
    print("\n(Np) = ratio to plain; (Nf) = ratio to fuse where plain has no such job.")
    print("server CPU per I/O (us), 4k randwr qd64:")
    for variant, res in results.items():
        r = res.get("randwrite_4k_qd64")
        if r and r.get("server_cpu_us_per_io") is not None:
            print(f"  {variant:14} {r['server_cpu_us_per_io']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024 * MiB, help="device size in bytes")
    parser.add_argument("--runtime", type=int, default=8, help="seconds per fio job")
    parser.add_argument("--latency-ms", type=float, default=1.0, help="injected write latency")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--workdir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the images go (default /dev/shm: memory, so the disk and dirty-page "
        "throttling do not blur the frontends' cost)",
    )
    parser.add_argument("--out", default=str(HERE / "out" / "fuse_compare.json"))
    parser.add_argument("--serve", choices=["fuse", "nbd", "mfusepy"], help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.image, args.target, args.latency_ms / 1000))
        return
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        sys.exit("needs root and /dev/fuse")
    report = bench(args)
    report["ratios_vs_plain"] = ratios(report, "plain")
    report["ratios_vs_fuse"] = ratios(report, "fuse")
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
