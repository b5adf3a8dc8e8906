"""The README's demo: two nodes on one machine, a file system, a failover, nothing lost.

Steps (each printed as it happens):

1. write one hast.conf for nodea (127.0.0.1) and nodeb (127.0.0.2), create
   both providers, start both hastd, nodeb secondary, nodea primary;
2. ``mkfs.ext4`` on ``/dev/hast/demo`` of nodea (through a loop device with
   direct I/O), mount it, write a tree of files and fsync each one, keeping
   their SHA-256 in memory;
3. keep writing in the background and ``kill -9`` nodea's hastd and worker in
   the middle of it;
4. promote nodeb (``hastctl role primary`` waits for the device), replay the
   journal with ``e2fsck -p``, check with ``e2fsck -f -n`` (must be clean),
   mount, verify every file that was fsync'd before the kill;
5. start nodea again as secondary and show that only the dirty extents were
   synchronised, then compare both providers byte for byte.

It exits non-zero if any verified byte differs, and cleans up (mounts, loop
devices, processes) also on Ctrl-C.  Run it as root: ``make demo``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

MiB = 1024 * 1024
SIZE = 256 * MiB
NODES = {"nodea": "127.0.0.1", "nodeb": "127.0.0.2"}
PORT = 18457
RES = "demo"


class DemoError(Exception):
    """A step of the demo failed; the message says which."""


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise DemoError(
            f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def wait_for(what: str, predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise DemoError(f"Timed out after {timeout:.0f} s waiting for {what}.")


class Node:
    def __init__(self, name: str, top: Path) -> None:
        self.name = name
        self.ip = NODES[name]
        self.top = top
        self.dir = top / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.image = self.dir / f"{RES}.img"
        self.control = self.dir / "ctl"
        self.pidfile = self.dir / "hastd.pid"
        self.rundir = self.dir / "run"
        self.devdir = self.dir / "dev"
        self.log = self.dir / "hastd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.loopdev: str | None = None
        self.mnt = self.dir / "mnt"

    @property
    def device(self) -> Path:
        return self.devdir / RES

    def hastctl(self, conf: Path, *args: str, check: bool = True) -> str:
        cmd = [sys.executable, "-m", "pyhast.cli.hastctl", args[0], "-c", str(conf)]
        cmd += ["--node", self.name, *args[1:]]
        return run(*cmd, check=check).stdout

    def start(self, conf: Path) -> None:
        env = dict(os.environ, PYHAST_RECONNECT_INTERVAL="1")
        cmd = [sys.executable, "-m", "pyhast.daemon.main", "-F", "-c", str(conf)]
        cmd += ["--node", self.name, "-P", str(self.pidfile), "--rundir", str(self.rundir)]
        cmd += ["--devdir", str(self.devdir)]
        log = open(self.log, "ab")  # noqa: SIM115 - kept open for the daemon's life
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_for(
            f"hastd on {self.name}",
            lambda: (
                self.control.exists()
                and self.hastctl(conf, "status", check=False).startswith("Name")
            ),
        )

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        out = run("pgrep", "-P", str(self.proc.pid), check=False).stdout
        return [int(p) for p in out.split()]

    def kill9(self) -> None:
        """kill -9 of the daemon and its workers: a node that dies."""
        pids = self.worker_pids()
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()
            self.proc = None

    def mount(self) -> None:
        self.loopdev = run("losetup", "--find", "--show", "--direct-io=on", str(self.device)).stdout
        self.loopdev = self.loopdev.strip()
        self.mnt.mkdir(exist_ok=True)
        run("mount", "-t", "ext4", self.loopdev, str(self.mnt))

    def teardown_storage(self) -> None:
        """Unmount (lazily if the device is dead) and detach the loop device."""
        if os.path.ismount(self.mnt) and run("umount", str(self.mnt), check=False).returncode != 0:
            run("umount", "-l", str(self.mnt), check=False)
        if self.loopdev:
            run("losetup", "-d", self.loopdev, check=False)
            self.loopdev = None
        # A dead primary leaves its FUSE mount behind (stat on it may fail):
        # look in the mount table, not at the file.
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for mnt in mounts:
            if mnt.startswith(str(self.dir) + "/"):
                run("umount", "-l", mnt, check=False)


def data_area(image: Path) -> tuple[int, int]:
    """(localoff, datasize) of a provider, from ``hastctl dump``'s metadata."""
    from pyhast.disk.metadata import metadata_read
    from pyhast.disk.provider import Provider

    with Provider.open(str(image), readonly=True, lock=False) as p:
        md = metadata_read(p)
    return md.localoff, md.datasize


def same_data(a: Path, b: Path) -> bool:
    offa, size = data_area(a)
    offb, _ = data_area(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(offa)
        fb.seek(offb)
        left = size
        while left:
            n = min(left, 4 * MiB)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def write_file(path: Path, size: int, seed: int) -> str:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def config(top: Path) -> str:
    lines = ["# pyhast demo: two nodes on one machine", "replication memsync"]
    for name, ip in NODES.items():
        d = top / name
        lines += [
            f"on {name} {{",
            f"        control uds://{d / 'ctl'}",
            f"        listen tcp4://{ip}:{PORT}",
            "}",
        ]
    lines.append(f"resource {RES} {{")
    for name, ip in NODES.items():
        peer = next(p for n, p in NODES.items() if n != name)
        lines += [
            f"        on {name} {{",
            f"                local {top / name / (RES + '.img')}",
            f"                remote tcp4://{peer}:{PORT}",
            f"                source tcp4://{ip}",
            "        }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def synced_bytes(node: Node) -> int | None:
    """Bytes the last synchronisation copied, from the primary's log."""
    text = node.log.read_text(errors="replace")
    found = re.findall(r"Synchronization complete\. \S+ \((\d+) bytes\) synchronized", text)
    if found:
        return int(found[-1])
    return 0 if "Nodes are in sync." in text else None


def status(node: Node, conf: Path) -> dict[str, object]:
    out = node.hastctl(conf, "status", "--json", check=False)
    try:
        res: dict[str, object] = json.loads(out)["resources"][0]
    except (ValueError, KeyError, IndexError):
        return {}
    return res


@contextlib.contextmanager
def cluster(top: Path) -> Iterator[dict[str, Node]]:
    nodes = {name: Node(name, top) for name in NODES}
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.teardown_storage()
            node.stop()


def demo(top: Path) -> int:
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "mount", "fusermount3"):
        if shutil.which(tool) is None:
            raise DemoError(f"{tool} is missing; run 'make demo' as root on Debian 12.")
    conf = top / "hast.conf"
    with cluster(top) as nodes:
        a, b = nodes["nodea"], nodes["nodeb"]
        conf.write_text(config(top))
        for node in (a, b):
            with open(node.image, "wb") as f:
                f.truncate(SIZE)
            # 1 MiB extents, 16 kept dirty: after a crash at most 16 MiB of
            # recently written extents are copied again, plus what changed.
            node.hastctl(conf, "create", "-e", "1M", "-k", "16", RES)
        say(
            "created a 256 MiB provider on each node (1 MiB extents, keepdirty 16); "
            "starting hastd on nodea and nodeb"
        )
        a.start(conf)
        b.start(conf)
        b.hastctl(conf, "role", "secondary", RES)
        a.hastctl(conf, "role", "primary", RES)
        wait_for("nodea to be complete", lambda: status(a, conf).get("status") == "complete")
        say(f"nodea is primary, nodeb secondary; the device is {a.device}")

        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0", str(a.device), timeout=300)
        a.mount()
        say(f"ext4 created and mounted on {a.mnt} through {a.loopdev}")
        manifest: dict[str, str] = {}
        tree = a.mnt / "tree"
        for d in range(4):
            (tree / f"dir{d}").mkdir(parents=True)
            for i in range(25):
                rel = f"tree/dir{d}/file{i}"
                manifest[rel] = write_file(a.mnt / rel, 4096 * (1 + (i * 7) % 32), d * 100 + i)
        say(f"wrote and fsync'd {len(manifest)} files")

        # Keep writing, then kill the primary in the middle of it.
        stop = threading.Event()
        during: dict[str, str] = {}

        def writer() -> None:
            n = 0
            (a.mnt / "during").mkdir()
            while not stop.is_set():
                rel = f"during/f{n}"
                try:
                    digest = write_file(a.mnt / rel, 64 * 1024, 10_000 + n)
                except OSError:
                    return
                during[rel] = digest  # recorded only after fsync returned
                n += 1

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        wait_for("the writer to make progress", lambda: len(during) >= 20)
        say(f"writing in the background ({len(during)} files so far); kill -9 of nodea's hastd")
        a.kill9()
        stop.set()
        thread.join(timeout=30)
        manifest.update(during)
        say(f"nodea is dead; {len(during)} files had been fsync'd during the writes")
        a.teardown_storage()

        b.hastctl(conf, "role", "primary", RES)
        say(f"nodeb promoted to primary; {b.device} is there")
        run("e2fsck", "-p", str(b.device), check=False)
        check = run("e2fsck", "-f", "-n", str(b.device), check=False)
        if check.returncode != 0:
            raise DemoError(f"e2fsck -f -n is not clean:\n{check.stdout}{check.stderr}")
        say("e2fsck -f -n: clean")
        b.mount()
        bad = []
        for rel, digest in manifest.items():
            try:
                got = hashlib.sha256((b.mnt / rel).read_bytes()).hexdigest()
            except OSError:
                got = "missing"
            if got != digest:
                bad.append(rel)
        say(f"verified {len(manifest)} fsync'd files on nodeb: {len(bad)} differ")
        if bad:
            for rel in bad[:20]:
                print(f"  differs: {rel}", file=sys.stderr)
            return 1
        # Keep writing on the new primary while the old one is away.
        for i in range(10):
            write_file(b.mnt / f"after{i}", 128 * 1024, 20_000 + i)

        say("starting nodea again as secondary")
        a.start(conf)
        a.hastctl(conf, "role", "secondary", RES)
        deadline = time.monotonic() + 120
        shown = ""
        while time.monotonic() < deadline:
            st = status(b, conf)
            left = int(str(st.get("sync_left", 0) or 0))
            rate = int(str(st.get("sync_rate", 0) or 0))
            line = f"demo: synchronising: {left / MiB:7.1f} MiB left, {rate / MiB:6.1f} MiB/s"
            if line != shown:
                print(f"\r{line}", end="", flush=True)
                shown = line
            if st.get("status") == "complete" and int(str(st.get("dirty", 1))) == 0:
                break
            time.sleep(0.2)
        print()
        copied = synced_bytes(b)
        say(
            f"synchronisation done: {copied if copied is not None else '?'} bytes copied "
            f"of a {SIZE // MiB} MiB device (only the dirty extents)"
        )
        b.teardown_storage()
        b.hastctl(conf, "role", "init", RES)
        a.hastctl(conf, "role", "init", RES)
        identical = same_data(a.image, b.image)
        say(f"providers byte-identical after resynchronisation: {identical}")
        if not identical:
            return 1
        if copied is None or copied >= SIZE // 4:
            say("the resynchronisation copied more than the dirty extents")
            return 1
    say("all verified: not one fsync'd byte lost")
    return 0


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (loop devices, mounts, FUSE).", file=sys.stderr)
        return 1
    top = Path(tempfile.mkdtemp(prefix="pyhast-demo-", dir="/tmp"))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return demo(top)
    except DemoError as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        for name in NODES:
            log = top / name / "hastd.log"
            if log.exists():
                print(f"--- {log} (last lines)", file=sys.stderr)
                print("\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; cleaned up.", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
