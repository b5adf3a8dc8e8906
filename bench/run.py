"""pyhast benchmark (issue 6): ``.venv/bin/python bench/run.py [--quick] [--out bench/out]``.

In one run, on the same kind of backing file (fully written, preallocated
files on one filesystem):

a) nbdkit's file plugin over a unix socket: the anchor;
b) a pyhast primary with ``remote none``;
c) a pyhast primary with a secondary on 127.0.0.2 in fullsync, memsync and
   async (status complete before measuring);

with fio's nbd engine: seq write 1M QD16, rand write 4k QD32, rand read 4k
QD32, rand write 4k QD1 (p50/p99).  Each workload gets a warm-up per server,
then ``reps`` repetitions interleaved across the servers; the median counts.
Then the resync of ~size bytes of dirty extents against a raw
file -> TCP -> file copy, and a seq write through ``<devdir>/<name>`` + loop
against a loop device on a plain file (skipped, with the reason, when the
primary exposes no such device).

Pinning: fio and the server under test (nbdkit, or nodea's hastd and its
workers) on CPU 0; nodeb's hastd (the "other machine") on CPU 1.

Outputs in --out: results.json (every number, the machine), results.md,
chart.png, raw/ (fio's JSON documents), logs/ (every server's output).
Every process started is ended on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib import fio, parse, report
from lib.hast import HastCluster, ResourceSpec
from lib.parse import MiB
from lib.procs import Proc, Procs, alive, install_signal_handlers, need_tools, wait_until

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RAWCOPY = BENCH / "lib" / "rawcopy.py"

#: CPU of fio and the server under test; CPU of the secondary.
CPU_MAIN = 0
CPU_PEER = 1

#: resource name per pyhast row (the provider name is the same).
RESOURCES = {"none": "bnone", "fullsync": "bfull", "memsync": "bmem", "async": "basync"}
SYNC_RESOURCE = "bsync"
#: hastd statistics recorded per run (deltas).
COUNTERS = ("stat_write", "stat_read", "stat_flush", "stat_activemap_update")

FULL = {"size": 1024, "runtime": 10.0, "warmup": 3.0, "reps": 3, "resync_reps": 7}
QUICK = {"size": 256, "runtime": 3.0, "warmup": 1.0, "reps": 2, "resync_reps": 1}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# set-up


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and short runs")
    p.add_argument("--out", default=str(BENCH / "out"), help="output directory")
    p.add_argument("--size", type=int, help="backing file size, MiB (1024; quick 256)")
    p.add_argument("--runtime", type=float, help="seconds per measured run (10; quick 3)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per server and workload")
    p.add_argument("--reps", type=int, help="measured repetitions (3; quick 2)")
    p.add_argument("--resync-reps", type=int, help="resync repetitions (7; quick 1)")
    p.add_argument("--rows", default=",".join(parse.ROWS), help="subset of rows, comma-separated")
    p.add_argument(
        "--workloads", default=",".join(w.key for w in parse.WORKLOADS), help="subset, comma-sep."
    )
    p.add_argument("--skip-resync", action="store_true")
    p.add_argument("--skip-fuse", action="store_true")
    p.add_argument("--devdir", default="/dev/hast", help="where the primary exposes <name>")
    p.add_argument(
        "--hastd-arg",
        action="append",
        default=[],
        help="extra argument for both hastd (repeatable), e.g. --hastd-arg=--devdir=/tmp/d",
    )
    p.add_argument("--workdir", default="/var/tmp", help="where the backing files go")
    p.add_argument("--keep", action="store_true", help="keep the backing files")
    p.add_argument("--no-install", action="store_true", help="do not pip install requirements")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rows = [r for r in args.rows.split(",") if r]
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = [r for r in args.rows if r not in parse.ROWS]
    unknown += [w for w in args.workloads if w not in parse.WORKLOAD_BY_KEY]
    if unknown:
        p.error(f"unknown rows/workloads: {unknown}")
    return args


def ensure_requirements(no_install: bool) -> str | None:
    """matplotlib in this interpreter (pip install -r bench/requirements.txt); a note if not."""
    if importlib.util.find_spec("matplotlib") is not None:
        return None
    if no_install:
        return "matplotlib is not installed (--no-install): no chart"
    say("installing bench/requirements.txt into this interpreter")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(BENCH / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if res.returncode != 0:
        return f"pip install -r bench/requirements.txt failed: no chart ({res.stderr[-300:]})"
    return None


def machine_info(procs: Procs) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def out(*argv: str) -> str:
        try:
            return procs.run(list(argv), timeout=30, check=False).stdout.strip()
        except (OSError, TimeoutError) as exc:
            return f"unknown ({exc})"

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": out("fio", "--version"),
        "nbdkit": out("nbdkit", "--version"),
        "hostname": socket.gethostname(),
        "mem_total_kb": _meminfo("MemTotal"),
        "loadavg_start": os.getloadavg(),
        "git_head": out("git", "-C", str(REPO), "rev-parse", "HEAD"),
        "git_dirty_files": out("git", "-C", str(REPO), "status", "--porcelain").splitlines(),
        # The product code measured: HEAD plus this diff (others edit the tree meanwhile).
        "git_src_diff_sha256": hashlib.sha256(
            out("git", "-C", str(REPO), "diff", "HEAD", "--", "src").encode()
        ).hexdigest(),
    }


def _meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def drop_page_cache(paths: list[Path]) -> None:
    """Write back and drop the cached pages of ``paths`` (fsync works from any descriptor).

    Run before every write measurement, so that every server starts from the
    same cache state.  Without it, 4 KiB writes land in the large folios that
    prealloc() and the sequential workload leave behind, and on this ext4 each
    such write walks every buffer of its folio: about 45 us of CPU per 4 KiB
    pwrite instead of 5 (measured), for nbdkit and for us alike, which swamps
    what the servers themselves cost.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prealloc(path: Path, size: int) -> None:
    """A fully written (zeros), fsynced file of ``size`` bytes: every row's backing file."""
    chunk = bytes(8 * MiB)
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def cpus_allowed(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    return None


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of ``pid`` so far (threads included)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return parse.parse_proc_stat_cpu(text, os.sysconf("SC_CLK_TCK"))


def proc_status_bytes(pid: int, field: str) -> int | None:
    try:
        return parse.parse_vmrss(Path(f"/proc/{pid}/status").read_text(), field)
    except OSError:
        return None


class RssSampler:
    """Samples VmRSS of some pids every ``interval`` seconds while active."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[int]] = {k: [] for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, pid in self.pids.items():
                v = proc_status_bytes(pid, "VmRSS")
                if v is not None:
                    self.samples[key].append(v)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------
# servers


def start_nbdkit(procs: Procs, path: Path, sock: Path) -> tuple[Proc, str]:
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "file", f"file={path}"]
    proc = procs.spawn_server("nbdkit", argv, cpu=CPU_MAIN)

    def up() -> bool:
        if not proc.running():
            raise RuntimeError(f"nbdkit exited: {proc.tap.text() if proc.tap else ''}")
        if not sock.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock))
            except OSError:
                return False
        return True

    wait_until(up, 30, "nbdkit's socket", 0.05)
    return proc, f"nbd+unix:///?socket={sock}"


def export_size(procs: Procs, uri: str) -> int:
    return int(procs.run(["nbdinfo", "--size", uri], timeout=30).stdout.strip())


# --------------------------------------------------------------------------
# the fio matrix


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Procs, out: Path, work: Path) -> None:
        self.args = args
        self.procs = procs
        self.out = out
        self.work = work
        self.raw = out / "raw"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self.uris: dict[str, str] = {}
        self.server_pids: dict[str, int] = {}
        self.peer_pids: dict[str, int] = {}
        #: each row's backing files (both nodes'), see drop_page_cache()
        self.backing: dict[str, list[Path]] = {}
        self.loops: dict[str, str] = {}
        # Loop devices go before the servers (a FUSE file under a loop keeps its primary busy).
        procs.before_stop(self.detach_all)
        self.cluster: HastCluster | None = None
        self.runs: dict[str, dict[str, dict[str, Any]]] = {}
        self.rss: dict[str, dict[str, list[int]]] = {}
        self.drain_s: dict[str, dict[str, list[float]]] = {}

    def rel(self, p: Path) -> str:
        return str(p.relative_to(self.out))

    def drain(self, row: str) -> float:
        """Wait until a replicated row has nothing in flight to the secondary; seconds."""
        if row not in ("fullsync", "memsync", "async") or self.cluster is None:
            return 0.0
        t0 = time.monotonic()
        self.cluster.wait_status(
            "nodea",
            RESOURCES[row],
            lambda st: (
                st["status"] == "complete"
                and not st["sync_left"]
                and not st["send_queue_size"]
                and not st["recv_queue_size"]
            ),
            300,
            "replication queues to drain",
        )
        return time.monotonic() - t0

    def fio_run(
        self, row: str, wl: parse.Workload, size: int, runtime: float, tag: str
    ) -> dict[str, Any]:
        """One fio run on ``row``, with the servers' CPU time, RSS and hastd counters."""
        argv = fio.nbd_argv(self.uris[row], wl, size, runtime)
        if "write" in wl.rw:
            drop_page_cache(self.backing.get(row, []))
        pids = {"server": self.server_pids[row]}
        if row in self.peer_pids:
            pids["peer"] = self.peer_pids[row]
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        counters = self.counters(row)
        with RssSampler({"server": pids["server"]}) as sampler:
            summary, doc = fio.run(self.procs, argv, cpu=CPU_MAIN, runtime=runtime)
        summary["drain_s"] = round(self.drain(row), 3)
        after = {k: cpu_seconds(p) for k, p in pids.items()}
        ops = summary["total_ios"]
        for key in pids:
            b, a = before[key], after[key]
            if b is None or a is None:
                continue
            summary[f"{key}_cpu_user_s"] = round(a[0] - b[0], 3)
            summary[f"{key}_cpu_sys_s"] = round(a[1] - b[1], 3)
            summary[f"{key}_cpu_us_per_op"] = parse.cpu_per_op_us(
                (a[0] - b[0]) + (a[1] - b[1]), ops
            )
        if counters is not None:
            now = self.counters(row) or {}
            summary["hastd_counters"] = {k: now.get(k, 0) - v for k, v in counters.items()}
        raw = self.raw / f"{wl.key}-{row}-{tag}.json"
        raw.write_text(json.dumps(doc, indent=1))
        summary["raw"] = self.rel(raw)
        got = sampler.samples["server"]
        summary["rss_max"] = max(got) if got else None
        summary["rss_samples"] = len(got)
        if tag != "warmup":
            self.rss.setdefault(row, {}).setdefault(wl.key, []).extend(got)
        return summary

    def counters(self, row: str) -> dict[str, int] | None:
        """The primary's statistics counters (writes, activemap updates...)."""
        if row not in RESOURCES or self.cluster is None:
            return None
        st = self.cluster.status("nodea", RESOURCES[row])
        return {k: int(st[k] or 0) for k in COUNTERS}

    def matrix(self, rows: list[str], size: int) -> None:
        a = self.args
        for key in a.workloads:
            wl = parse.WORKLOAD_BY_KEY[key]
            for row in rows:
                say(f"{wl.label}: warm-up {row} ({a.warmup:g} s)")
                s = self.fio_run(row, wl, size, a.warmup, "warmup")
                self.runs.setdefault(row, {}).setdefault(key, {"warmup": s, "reps": []})
            for rep in range(a.reps):
                for row in rows:
                    s = self.fio_run(row, wl, size, a.runtime, f"rep{rep}")
                    self.runs[row][key]["reps"].append(s)
                    say(f"{wl.label}: {row} rep {rep + 1}/{a.reps}: {brief(wl, s)}")

    # -- resync --------------------------------------------------------------------------

    def resync(self, cl: HastCluster, rawcopy_dst: Path) -> dict[str, Any]:
        """Write the whole device on a degraded primary, start the secondary, time the sync."""
        a = self.args
        res = SYNC_RESOURCE
        tap = cl.log_tap("nodea")
        cl.role("nodea", "primary", res)
        uri = cl.nbd_uri(res)
        cl.worker_pid("nodea", res)
        fill_size = export_size(self.procs, uri) // MiB * MiB
        seq = parse.WORKLOAD_BY_KEY["seqwrite_1m_qd16"]
        reps: list[dict[str, Any]] = []
        copies: list[dict[str, Any]] = []
        # The first round (cold: 3-6x slower here) is a warm-up, kept but not counted.
        rounds = a.resync_reps + 1
        for rep in range(rounds):
            st = cl.status("nodea", res)
            if st["status"] != "degraded":
                raise RuntimeError(f"the resync primary is not degraded: {st}")
            label = "warm-up" if rep == 0 else f"{rep}/{a.resync_reps}"
            say(f"resync {label}: writing {fill_size / MiB:.0f} MiB degraded")
            summary, doc = fio.run(
                self.procs,
                fio.nbd_argv(uri, seq, fill_size, None),
                cpu=CPU_MAIN,
                runtime=None,
                timeout=900,
            )
            (self.raw / f"resync-fill-rep{rep}.json").write_text(json.dumps(doc, indent=1))
            dirty = cl.status("nodea", res)["dirty"]
            mark = tap.mark()
            t_role = time.monotonic()
            cl.role("nodeb", "secondary", res)
            say(f"resync {label}: secondary started, {dirty / MiB:.0f} MiB dirty; waiting")
            t_done, line = tap.wait("Synchronization complete", 1800, mark)
            found = tap.find("Connected to", mark)
            started = tap.find("Synchronization started", mark)
            assert found is not None, "no 'Connected to' line before the sync completed"
            t_connect = found[0]
            logged = parse.parse_sync_complete(line)
            if logged is None:
                raise RuntimeError(f"cannot parse {line!r}")
            nbytes, logged_s = logged
            seconds = t_done - t_connect
            reps.append(
                {
                    "bytes": nbytes,
                    "dirty_before": dirty,
                    "fill_bw_bytes": summary["bw_bytes"],
                    "role_to_connect_s": round(t_connect - t_role, 4),
                    "connect_to_start_s": (
                        None if started is None else round(started[0] - t_connect, 4)
                    ),
                    "connect_to_complete_s": round(seconds, 4),
                    "logged_s": logged_s,
                    "bps": parse.throughput(nbytes, seconds),
                    "logged_bps": parse.throughput(nbytes, logged_s),
                    "line": line,
                    "warmup": rep == 0,
                }
            )
            say(f"resync {label}: {parse.fmt_rate(reps[-1]['bps'])} ({line.strip()})")
            cl.wait_status(
                "nodea",
                res,
                lambda s: not s["sync_left"] and not s["send_queue_size"],
                120,
                "the sync to settle",
            )
            copies.append(self.rawcopy(cl.nodes["nodea"].files[res], rawcopy_dst, nbytes))
            copies[-1]["warmup"] = rep == 0
            say(f"raw copy {label}: {parse.fmt_rate(copies[-1]['bps'])}")
            if rep + 1 < rounds:
                cl.role("nodeb", "init", res)
                cl.wait_status("nodea", res, lambda s: s["status"] == "degraded", 60, "degraded")
        med_bps = parse.median(r["bps"] for r in reps if not r["warmup"])
        med_copy = parse.median(c["bps"] for c in copies if not c["warmup"])
        return {
            "bytes": reps[0]["bytes"],
            "resync_bps": med_bps,
            "logged_bps": parse.median(r["logged_bps"] for r in reps if not r["warmup"]),
            "rawcopy_bps": med_copy,
            "ratio": parse.ratio_of(med_bps, med_copy, "bw_bytes"),
            "reps": reps,
            "rawcopy_reps": copies,
            "note": "resync timed from the primary's 'Connected to' line to its "
            "'Synchronization complete' line (arrival times on hastd's output pipe); raw copy "
            "timed connect -> receiver's ack after its last pwrite; sender CPU 0, receiver CPU 1.",
        }

    def rawcopy(self, src: Path, dst: Path, nbytes: int) -> dict[str, Any]:
        recv = self.procs.spawn_server(
            "rawcopy-recv",
            [
                sys.executable,
                str(RAWCOPY),
                "recv",
                "--ip",
                "127.0.0.2",
                "--out",
                str(dst),
                "--size",
                str(nbytes),
            ],
            cpu=CPU_PEER,
        )
        assert recv.tap is not None
        _, line = recv.tap.wait("PORT ", 30)
        port = int(line.split()[1])
        res = self.procs.run(
            [
                sys.executable,
                str(RAWCOPY),
                "send",
                "--ip",
                "127.0.0.2",
                "--port",
                str(port),
                "--src",
                str(src),
                "--size",
                str(nbytes),
                "--source-ip",
                "127.0.0.1",
            ],
            cpu=CPU_MAIN,
            timeout=600,
        )
        sent = json.loads(res.stdout.strip().splitlines()[-1])
        recv.popen.wait(60)
        self.procs.stop(recv)
        return {
            "bytes": sent["bytes"],
            "seconds": sent["seconds"],
            "bps": parse.throughput(sent["bytes"], sent["seconds"]),
        }

    # -- /dev/hast + loop ------------------------------------------------------------------

    @contextlib.contextmanager
    def loop_device(self, path: Path | str) -> Iterator[str]:
        """A loop device on ``path``, detached on exit (and at cleanup if interrupted)."""
        dev = self.procs.run(["losetup", "-f", "--show", str(path)], timeout=30).stdout.strip()
        self.loops[dev] = str(path)
        try:
            yield dev
        finally:
            self._lodetach(dev)

    def _lodetach(self, dev: str) -> None:
        """Detach ``dev`` if it is still ours (still attached to the file we gave it)."""
        backing = self.loops.pop(dev, None)
        if backing is None:
            return
        res = subprocess.run(
            ["losetup", "-n", "-O", "BACK-FILE", dev],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if res.stdout.strip() in (backing, str(Path(backing).resolve())):
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)

    def detach_all(self) -> None:
        for dev in list(self.loops):
            self._lodetach(dev)

    def loop_runs(self, path: Path | str, size: int, tag: str) -> dict[str, Any]:
        """Seq write 1M QD16 (libaio, O_DIRECT) on a loop device over ``path``."""
        a = self.args
        wl = parse.WORKLOAD_BY_KEY["seqwrite_1m_qd16"]
        runs = []
        with self.loop_device(path) as dev:
            for rep in range(-1, a.reps):
                runtime = a.warmup if rep < 0 else a.runtime
                s, doc = fio.run(
                    self.procs,
                    fio.blockdev_argv(dev, wl, size, runtime),
                    cpu=CPU_MAIN,
                    runtime=runtime,
                )
                name = "warmup" if rep < 0 else f"rep{rep}"
                raw = self.raw / f"loop-{tag}-{name}.json"
                raw.write_text(json.dumps(doc, indent=1))
                s["raw"] = self.rel(raw)
                if rep >= 0:
                    runs.append(s)
        return {**parse.aggregate(runs), "reps": runs, "device": dev}

    def fuse(self, size: int, plain: Path, existed_before: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        devpath = Path(self.args.devdir) / RESOURCES["none"]
        if existed_before:
            out["skipped"] = f"{devpath} existed before our primary started: not ours"
        else:
            with contextlib.suppress(TimeoutError):
                wait_until(devpath.exists, 5, str(devpath), 0.1)
            if not devpath.exists():
                out["skipped"] = (
                    f"the primary does not expose {devpath} (no FUSE device in this build; "
                    "--devdir/--hastd-arg set where it is)"
                )
        if not Path("/dev/loop-control").exists() or need_tools("losetup"):
            out.setdefault("skipped", "no loop devices here")
            out["loop_plain_error"] = "no loop devices"
            return out
        try:
            say("loop device on a plain file: seq write 1M QD16")
            out["loop_plain"] = self.loop_runs(plain, size, "plain")
        except (RuntimeError, TimeoutError) as exc:
            out["loop_plain_error"] = str(exc)
            out.setdefault("skipped", f"loop on a plain file failed: {exc}")
        if "skipped" in out:
            return out
        say(f"loop device on {devpath}: seq write 1M QD16")
        out["loop_fuse"] = self.loop_runs(devpath, size, "fuse")
        out["ratio"] = parse.ratio_of(
            out["loop_fuse"]["bw_bytes"], out["loop_plain"]["bw_bytes"], "bw_bytes"
        )
        return out


def brief(wl: parse.Workload, s: dict[str, Any]) -> str:
    if wl.metric == "bw_bytes":
        return parse.fmt_rate(s["bw_bytes"])
    if wl.metric == "iops":
        return f"{s['iops'] / 1000:.1f}k IOPS" + (
            f", RSS {s['rss_max'] / MiB:.0f} MiB" if s.get("rss_max") else ""
        )
    return f"p50 {s['p50_us']:.0f} us, p99 {s['p99_us']:.0f} us"


# --------------------------------------------------------------------------
# main


def run(args: argparse.Namespace, procs: Procs, out: Path, work: Path, sockdir: Path) -> int:
    missing = need_tools("fio", "nbdkit", "nbdinfo", "taskset")
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (make setup installs them)")
        return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 CPUs (fio+server on CPU 0, the secondary on CPU 1)")
        return 2
    b = Bench(args, procs, out, work)
    note = ensure_requirements(args.no_install)
    if note:
        b.notes.append(note)
    machine = machine_info(procs)
    size = args.size * MiB
    rows = [r for r in parse.ROWS if r in args.rows]
    hast_rows = [r for r in rows if r in RESOURCES]
    need_cluster = bool(hast_rows) or not args.skip_resync

    say(f"preallocating backing files ({size / MiB:.0f} MiB each) in {work}")
    files: dict[tuple[str, str], Path] = {}
    specs: list[ResourceSpec] = []
    for row, res in [*RESOURCES.items(), ("sync", SYNC_RESOURCE)]:
        replicated = row != "none"
        mode = row if row in ("fullsync", "memsync", "async") else "memsync"
        specs.append(ResourceSpec(res, mode, replicated))
        for node in ("nodea", "nodeb"):
            files[(node, res)] = work / f"{res}-{node}.img"
    wanted = {files[("nodea", RESOURCES[r])] for r in hast_rows}
    wanted |= {files[("nodeb", RESOURCES[r])] for r in hast_rows if r != "none"}
    if not args.skip_resync:
        wanted |= {files[(n, SYNC_RESOURCE)] for n in ("nodea", "nodeb")}
    for path in files.values():
        if path in wanted:
            prealloc(path, size)
        else:  # configured on the other node or unused: a small placeholder
            prealloc(path, 4 * MiB)
    nbdkit_img = work / "nbdkit.img"
    prealloc(nbdkit_img, size)
    plain_img = work / "loop-plain.img"
    rawcopy_img = work / "rawcopy.img"
    if not args.skip_fuse:
        prealloc(plain_img, size)
    if not args.skip_resync:
        prealloc(rawcopy_img, size)

    devpath = Path(args.devdir) / RESOURCES["none"]
    existed_before = devpath.exists()

    b.backing["nbdkit"] = [nbdkit_img]
    for row in hast_rows:
        res = RESOURCES[row]
        nodes = ("nodea",) if row == "none" else ("nodea", "nodeb")
        b.backing[row] = [files[(node, res)] for node in nodes]
    nb_proc, nb_uri = start_nbdkit(procs, nbdkit_img, sockdir / "nbdkit.sock")
    b.uris["nbdkit"] = nb_uri
    b.server_pids["nbdkit"] = nb_proc.pid
    affinity: dict[str, str | None] = {"nbdkit": cpus_allowed(nb_proc.pid)}

    cl: HastCluster | None = None
    if need_cluster:
        cl = HastCluster(
            procs, work, sockdir, specs, files, reconnect_interval=0.5, hastd_args=args.hastd_arg
        )
        b.cluster = cl
        say("hastctl create; starting hastd nodea (CPU 0) and nodeb (CPU 1)")
        cl.create("nodea", *[s.name for s in specs])
        cl.create("nodeb", *[s.name for s in specs if s.replicated])
        cl.start("nodea", CPU_MAIN)
        cl.start("nodeb", CPU_PEER)
        repl = [RESOURCES[r] for r in hast_rows if r != "none"]
        if repl:
            cl.role("nodeb", "secondary", *repl)
        if hast_rows:
            cl.role("nodea", "primary", *[RESOURCES[r] for r in hast_rows])
        for row in hast_rows:
            res = RESOURCES[row]
            b.uris[row] = cl.nbd_uri(res)
            if row != "none":
                cl.wait_status("nodea", res, lambda s: s["status"] == "complete", 60, "complete")
                cl.wait_status(
                    "nodea", res, lambda s: not s["sync_left"], 600, "initial sync to finish"
                )
            pid = cl.worker_pid("nodea", res)
            b.server_pids[row] = pid
            affinity[f"{row} primary worker"] = cpus_allowed(pid)
            if row != "none":
                spid = cl.worker_pid("nodeb", res)
                b.peer_pids[row] = spid
                affinity[f"{row} secondary worker"] = cpus_allowed(spid)
        for node in ("nodea", "nodeb"):
            p = cl.nodes[node].proc
            affinity[f"hastd {node}"] = None if p is None else cpus_allowed(p.pid)
    say(f"CPU affinity: {affinity}")

    sizes = [export_size(procs, b.uris[r]) for r in rows]
    fio_size = min(sizes) // MiB * MiB
    say(f"fio range: {fio_size / MiB:.0f} MiB on every row")

    b.matrix(rows, fio_size)

    hwm = {r: proc_status_bytes(b.server_pids[r], "VmHWM") for r in hast_rows}

    fuse: dict[str, Any] = {"skipped": "--skip-fuse"}
    if not args.skip_fuse:
        if "none" in hast_rows:
            fuse = b.fuse(fio_size, plain_img, existed_before)
        else:
            fuse = {"skipped": "the remote none row was not run"}
        if fuse.get("skipped"):
            say(f"/dev/hast + loop row skipped: {fuse['skipped']}")

    resync: dict[str, Any] = {"skipped": "--skip-resync"}
    if not args.skip_resync and cl is not None:
        # Quiet the fio rows' workers first: only the resync pair runs.
        if hast_rows:
            cl.role("nodea", "init", *[RESOURCES[r] for r in hast_rows])
            repl = [RESOURCES[r] for r in hast_rows if r != "none"]
            if repl:
                cl.role("nodeb", "init", *repl)
        resync = b.resync(cl, rawcopy_img)

    machine["loadavg_end"] = os.getloadavg()
    medians = {
        row: {k: parse.aggregate(v["reps"]) for k, v in b.runs.get(row, {}).items()} for row in rows
    }
    rss_max = {
        row: max(
            (x for k, xs in b.rss.get(row, {}).items() if k in parse.RSS_WORKLOADS for x in xs),
            default=None,
        )
        for row in rows
    }
    rss_max_all = {
        row: max((x for xs in b.rss.get(row, {}).values() for x in xs), default=None)
        for row in rows
    }
    hast_rss = {r: v for r, v in rss_max.items() if r in RESOURCES}
    results: dict[str, Any] = {
        "machine": machine,
        "config": {
            "quick": args.quick,
            "size": size,
            "fio_size": fio_size,
            "runtime": args.runtime,
            "warmup": args.warmup,
            "reps": args.reps,
            "resync_reps": args.resync_reps,
            "rows": rows,
            "workloads": args.workloads,
            "cpu_main": CPU_MAIN,
            "cpu_peer": CPU_PEER,
            "affinity": affinity,
            "uris": b.uris,
            "devdir": args.devdir,
            "hastd_args": args.hastd_arg,
        },
        "runs": b.runs,
        "medians": medians,
        "ratios": parse.ratios(medians),
        "rss_max": rss_max,
        "rss_max_all_workloads": rss_max_all,
        "rss_samples": b.rss,
        "vmhwm_end": hwm,
        "resync": resync,
        "fuse": fuse,
        "targets": parse.evaluate_targets(
            medians, None if resync.get("skipped") else resync, hast_rss
        ),
        "notes": [
            *b.notes,
            "Before every write run (warm-ups included) the backing files of the row "
            "(both nodes') are written back and dropped from the page cache, so that every "
            "server starts alike: 4 KiB writes into the large folios left by preallocation "
            "and sequential writes cost ~45 us of CPU per pwrite on this ext4 (5 us otherwise), "
            "for every server.  Reads run on the cache the writes left.",
            "Shared 2-CPU machine with other work running: numbers are noisy; compare ratios "
            "taken in the same run, not absolute values across runs.",
        ],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(report.render_markdown(results))
    if importlib.util.find_spec("matplotlib") is not None:
        report.chart(results, out / "chart.png")
    print()
    print(report.render_text(results))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, {out / 'chart.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("raw", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="pyhast-bench-", dir=args.workdir))
    sockdir = Path(tempfile.mkdtemp(prefix="hb", dir="/tmp"))  # short: UNIX socket paths
    procs = Procs(out / "logs")
    procs.at_cleanup(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    if not args.keep:
        procs.at_cleanup(lambda: shutil.rmtree(work, ignore_errors=True))
    try:
        return run(args, procs, out, work, sockdir)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", flush=True)
        return 130
    finally:
        procs.cleanup()
        leftovers = [p for p in procs.extra_pids if alive(p)]
        if leftovers:
            print(f"bench: still alive after cleanup: {leftovers}")


if __name__ == "__main__":
    sys.exit(main())
