"""keepalived decides the roles: the packaged notify script under real VRRP.

Two network namespaces joined by a veth pair (10.99.0.1 and 10.99.0.2, the
virtual address 10.99.0.100), one keepalived in each (VRRP only, unicast
adverts every second, ``nopreempt``, the script's ``check`` mode tracked as
a vrrp_script), each calling the packaged ``hast-keepalived-notify`` through
a two-line wrapper that points it at its node's settings file
(``HAST_FAILOVER_CONF``: its hastctl, devdir, pidfile, mount point, lock).
The two hastd run in the root namespace on 127.0.0.1 and 127.0.0.2 as in
every other integration test and replicate over loopback; the notify
scripts reach them through their UNIX control sockets.  keepalived is put
into its namespace with ``nsenter --net`` only, so the mounts its scripts
make are in the test's mount namespace (``ip netns exec`` would give it a
private one).

test_keepalived_failover_and_failback, every step checked, not assumed:

1. keepalived A starts: BACKUP then MASTER; its notify makes nodea primary,
   checks and mounts the file system.  keepalived B starts: BACKUP, nodeb
   secondary; the pair is in sync.  Files are written and fsync'd on A.
2. Node A dies: its keepalived and its hastd with its worker are killed
   with SIGKILL.  B becomes MASTER (within a few adverts), its notify
   promotes nodeb, replays the journal, mounts; every fsync'd file is there.
3. Failback: nodea's hastd and keepalived come back; A stays BACKUP
   (``nopreempt``), its notify makes nodea secondary and nodeb synchronises
   it.  keepalived B is stopped (SIGTERM, a planned switchover) while a
   program holds a file open on B: B's STOP notify unmounts lazily and, the
   device still held, forces nodeb to secondary (the holder then gets an
   I/O error); A's MASTER notify waits for nodeb to let go, then promotes
   nodea and mounts; every file is there.  keepalived B comes back as BACKUP.
4. A clean switchover back to B (keepalived A stopped), then A back as
   BACKUP; no split-brain, no write refused by a secondary, no loop device
   left behind.

test_death_under_a_live_keepalived_fails_over: on the MASTER, hastd and its
worker die, or only the worker (hastd restarts it, a new device under the
old mount), keepalived living on: the tracked check fails, A goes to FAULT
and lets go, B takes over with every file; A, healthy again, is BACKUP.

Skips (with the reason): not root, no loop devices or FUSE, keepalived not
installed (Debian package ``keepalived``), a tool missing, a network
namespace or a veth pair cannot be made, no raw socket for VRRP (IP
protocol 112, needs CAP_NET_RAW) inside the namespace.

Cleanup in ``finally``: keepalived and every notify script it started (found
by a marker in their environment), the loop devices the scripts attached
(recorded by the identity of their backing file: the path of a dead device
file reads "/"), the mounts and loop devices below the test's directory,
the daemons, the namespaces.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import fs
from tests.helpers.cluster import Cluster, MiB

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(300),
    pytest.mark.skipif(fs.mount_skip_reason() is not None, reason=fs.mount_skip_reason() or ""),
]

RES = "r0"
NODES = ("nodea", "nodeb")
ADDRS = {"nodea": "10.99.0.1", "nodeb": "10.99.0.2"}
PRIORITY = {"nodea": 150, "nodeb": 100}
VIP = "10.99.0.100"
#: Seconds a VRRP transition may take: 3 missed adverts of 1 s, the skew, margin.
TRANSITION = 10.0
#: Seconds the tracked check takes to fail or recover (interval 1, fall/rise 2).
CHECK = 5.0
#: Seconds a notify script may take to switch (hastctl runs, fsck, mount).
SWITCH = 45.0
NOTIFY = Path(str(importlib.resources.files("pyhast").joinpath("data/hast-keepalived-notify")))
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def tool(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def skip_reason() -> str | None:
    """Why this test cannot run here, short of making a namespace (None: it can)."""
    if tool("keepalived") is None:
        return "keepalived is not installed (Debian package keepalived)"
    missing = [t for t in ("ip", "nsenter", "flock", "mountpoint", "findmnt") if tool(t) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    return None


KEEPALIVED_CONF = """\
global_defs {{
    router_id hast-{node}
    enable_script_security
    script_user root
}}
vrrp_script hast_check {{
    script "{wrapper} check"
    interval 1
    fall 2
    rise 2
}}
vrrp_instance hast {{
    state BACKUP
    nopreempt
    interface {ifname}
    virtual_router_id 51
    priority {priority}
    advert_int 1
    unicast_src_ip {addr}
    unicast_peer {{
        {peer}
    }}
    virtual_ipaddress {{
        {vip}/24 dev {ifname}
    }}
    track_script {{
        hast_check
    }}
    notify {wrapper}
}}
"""

# keepalived runs this; it execs the packaged script, so that keepalived's
# signals reach the script itself.
NOTIFY_WRAPPER = """\
#!/bin/sh
export HAST_FAILOVER_CONF={settings} HAST_TEST_TAG={tag}
exec /bin/sh {notify} "$@" >>{log} 2>&1
"""

HASTCTL_WRAPPER = """\
#!/bin/sh
cmd=$1
shift
exec {python} -m pyhast.cli.hastctl "$cmd" -c {conf} --node {node} "$@"
"""

SETTINGS = """\
HAST_RESOURCES={res}
HAST_MOUNT_{res}={mnt}
HAST_FSTYPE_{res}=ext4
HASTCTL={hastctl}
HAST_DEVDIR={devdir}
HAST_LOCK={lock}
HAST_PEER_WAIT=30
HAST_PIDFILE={pidfile}
"""


def run(*argv: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    return fs.run(*argv, timeout=timeout, check=check)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def loop_identity(dev: str) -> str:
    """ "maj:min ino" of ``dev``'s backing file ("" if ``dev`` is not bound)."""
    out = run("losetup", "-l", "-n", "-O", "BACK-MAJ:MIN,BACK-INO", dev, check=False).stdout
    return " ".join(out.split())


def mount_sources() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [line.split(" - ", 1)[1].split()[1] for line in f if " - " in line]


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Vrrp:
    """The two namespaces, the veth pair and one keepalived per node."""

    def __init__(self, tmp: Path, cl: Cluster) -> None:
        self.tmp = tmp
        self.cl = cl
        tag = secrets.token_hex(3)
        #: Marks every notify script (and its children) in /proc/<pid>/environ.
        self.tag = f"hka{tag}"
        self.ns = {n: f"hka{tag}-{n[-1]}" for n in NODES}
        self.ifname = {n: f"hka{tag}{n[-1]}" for n in NODES}
        self.made_ns: list[str] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log_offsets: dict[str, int] = {}
        #: (node, n-th attachment in its notify log) -> (loop device, its backing
        #: file's "maj:min ino"), in the order they were seen.
        self.loops: dict[tuple[str, int], tuple[str, str]] = {}

    # --- files -----------------------------------------------------------------

    def path(self, node: str, what: str) -> Path:
        return self.tmp / f"{what}-{node}"

    def mnt(self, node: str) -> Path:
        return self.path(node, "mnt")

    def write_files(self) -> None:
        for node in NODES:
            peer = NODES[1 - NODES.index(node)]
            hastctl = self.path(node, "hastctl")
            hastctl.write_text(
                HASTCTL_WRAPPER.format(python=sys.executable, conf=self.cl.conf, node=node)
            )
            settings = self.path(node, "hast-failover")
            settings.write_text(
                SETTINGS.format(
                    res=RES,
                    mnt=self.mnt(node),
                    hastctl=hastctl,
                    devdir=self.cl.devdir(node),
                    lock=self.path(node, "failover.lock"),
                    pidfile=self.cl.nodes[node].pidfile,
                )
            )
            wrapper = self.path(node, "notify")
            wrapper.write_text(
                NOTIFY_WRAPPER.format(
                    settings=settings,
                    tag=self.tag,
                    notify=NOTIFY,
                    log=self.path(node, "notify.log"),
                )
            )
            for script in (hastctl, wrapper):
                script.chmod(0o755)
            self.path(node, "keepalived.conf").write_text(
                KEEPALIVED_CONF.format(
                    node=node,
                    ifname=self.ifname[node],
                    priority=PRIORITY[node],
                    addr=ADDRS[node],
                    peer=ADDRS[peer],
                    vip=VIP,
                    wrapper=wrapper,
                )
            )

    # --- network ---------------------------------------------------------------

    def setup_network(self) -> None:
        """Namespaces and the veth pair; skips the test if the kernel refuses them."""
        a, b = (self.ns[n] for n in NODES)
        for ns in (a, b):
            proc = run("ip", "netns", "add", ns, check=False)
            if proc.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {proc.stderr.strip()}")
            self.made_ns.append(ns)
        ia, ib = (self.ifname[n] for n in NODES)
        veth = ("ip", "link", "add", ia, "netns", a, "type", "veth", "peer", ib, "netns", b)
        proc = run(*veth, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {proc.stderr.strip()}")
        for node in NODES:
            ns, ifname = self.ns[node], self.ifname[node]
            run("ip", "-n", ns, "addr", "add", f"{ADDRS[node]}/24", "dev", ifname)
            run("ip", "-n", ns, "link", "set", ifname, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # keepalived sends and receives VRRP (IP protocol 112) on a raw socket.
        probe = "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 112).close()"
        proc = self.nsenter("nodea", sys.executable, "-c", probe)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()[-1:] or ["?"]
            pytest.skip(f"no raw socket for VRRP (CAP_NET_RAW) in a namespace: {err[0]}")

    def nsenter(self, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return run("nsenter", f"--net=/run/netns/{self.ns[node]}", *argv, check=False)

    def has_vip(self, node: str) -> bool:
        out = run("ip", "-n", self.ns[node], "-o", "-4", "addr", "show", "dev", self.ifname[node])
        return f" {VIP}/" in out.stdout

    # --- keepalived ------------------------------------------------------------

    def start(self, node: str) -> None:
        """keepalived for ``node`` in its namespace (VRRP only, foreground, logging to a file)."""
        keepalived = tool("keepalived")
        assert keepalived is not None
        for what in ("keepalived.pid", "vrrp.pid"):
            self.path(node, what).unlink(missing_ok=True)
        argv = [
            "nsenter",
            f"--net=/run/netns/{self.ns[node]}",
            keepalived,
            "--vrrp",
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--use-file",
            str(self.path(node, "keepalived.conf")),
            "--pid",
            str(self.path(node, "keepalived.pid")),
            "--vrrp_pid",
            str(self.path(node, "vrrp.pid")),
        ]
        with open(self.path(node, "keepalived.log"), "ab") as log:
            self.procs[node] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        fs.wait_for(
            lambda: self.vrrp_pid(node) is not None or self.procs[node].poll() is not None,
            10,
            f"keepalived {node} to start its VRRP process",
        )
        assert self.procs[node].poll() is None, f"keepalived {node} exited:\n{self.log(node)}"

    def vrrp_pid(self, node: str) -> int | None:
        pid = read_pid(self.path(node, "vrrp.pid"))
        return pid if pid is not None and alive(pid) else None

    def kill9(self, node: str) -> None:
        """Node death: SIGKILL keepalived's VRRP process and its parent (stopped
        first, so that it neither restarts the child nor says goodbye)."""
        proc = self.procs.pop(node, None)
        if proc is None:
            return
        vrrp = self.vrrp_pid(node)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        if vrrp is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vrrp, signal.SIGKILL)
        proc.kill()
        proc.wait(10)
        if vrrp is not None:
            fs.wait_for(lambda: not alive(vrrp), 10, f"keepalived {node} VRRP process to die")

    def stop(self, node: str) -> None:
        """A clean stop (SIGTERM), as ``systemctl stop keepalived`` does."""
        proc = self.procs.pop(node)
        proc.terminate()
        proc.wait(20)

    def log(self, node: str) -> str:
        path = self.path(node, "keepalived.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def notify_log(self, node: str) -> str:
        path = self.path(node, "notify.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def mark(self, node: str) -> None:
        self.log_offsets[node] = len(self.notify_log(node))

    def notified(self, node: str, text: str) -> bool:
        """``text`` is in ``node``'s notify log since :meth:`mark`."""
        return text in self.notify_log(node)[self.log_offsets.get(node, 0) :]

    def wait_notified(self, node: str, text: str, timeout: float = SWITCH) -> None:
        try:
            fs.wait_for(lambda: self.notified(node, text), timeout, f"{text!r} from {node}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.dump()}") from None
        self.record_loops()

    # --- loop devices the notify scripts attached --------------------------------

    def record_loops(self) -> None:
        """Remember the loop devices the notify logs name ("... (/dev/loopN).")
        with the identity of their backing file, which outlives its path (a
        dead device file's loop shows "/")."""
        for node in NODES:
            found = re.findall(r"\((/dev/loop\d+)\)\.$", self.notify_log(node), re.M)
            for n, dev in enumerate(found):
                if (node, n) not in self.loops:
                    self.loops[node, n] = (dev, loop_identity(dev))

    def bound_loops(self, node: str) -> list[str]:
        """The loop devices ``node``'s notify attached last (no later attachment
        by either node reused them) and still bound to the same file."""
        last: dict[str, tuple[str, str]] = {}
        for (owner, _), (dev, ident) in self.loops.items():
            last[dev] = (owner, ident)
        return [
            dev
            for dev, (owner, ident) in last.items()
            if owner == node and ident and loop_identity(dev) == ident
        ]

    def detach_loops(self, node: str) -> None:
        for dev in self.bound_loops(node):
            fs.detach_loop(dev)

    def dump(self) -> str:
        return "\n".join(
            f"----- {what} {node} -----\n{text}"
            for node in NODES
            for what, text in (("keepalived", self.log(node)), ("notify", self.notify_log(node)))
        )

    # --- teardown --------------------------------------------------------------

    def scripts(self) -> list[int]:
        """Processes (notify scripts and their children) carrying our marker."""
        marker = f"HAST_TEST_TAG={self.tag}".encode()
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if marker in env:
                out.append(int(name))
        return out

    def close(self) -> None:
        for node in list(self.procs):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.kill9(node)
        for _ in range(20):
            pids = self.scripts()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for ns in self.made_ns:
            run("ip", "netns", "del", ns, check=False)
        print(self.dump())

    def detach_leftover_loops(self) -> None:
        """Loop devices left on a dead device file, which fs.cleanup_under
        cannot see (their backing path reads "/"), once nothing mounts them."""
        for node in NODES:
            for dev in self.bound_loops(node):
                back = fs.loop_backing(dev) or ""
                dead_or_ours = back == "/" or back.startswith(f"{self.tmp}/")
                if dead_or_ours and dev not in mount_sources():
                    run("losetup", "-d", dev, check=False)


@contextlib.contextmanager
def pair(tmp: Path) -> Iterator[tuple[Cluster, Vrrp]]:
    """The cluster and the VRRP pair.  On the way out, even after a failure:
    keepalived and its scripts, the namespaces, the mounts and loop devices,
    then the daemons."""
    with Cluster(tmp, size=64 * MiB) as cl:
        vrrp = Vrrp(tmp, cl)
        try:
            yield cl, vrrp
        finally:
            try:
                vrrp.close()
            finally:
                fs.cleanup_under(tmp)
                vrrp.detach_leftover_loops()


def is_role(cl: Cluster, node: str, role: str) -> bool:
    try:
        return bool(cl.status(node, RES)["role"] == role)
    except (AssertionError, OSError):
        return False


# Opens a file on the mount it is given, says "open", and on a line from
# stdin tries to write and fsync it: "ok" or "error <errno name>".
HOLDER = """
import errno, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
print("open", flush=True)
sys.stdin.readline()
try:
    os.write(fd, b"x" * 4096)
    os.fsync(fd)
    print("ok", flush=True)
except OSError as exc:
    print("error", errno.errorcode.get(exc.errno or 0, exc.errno), flush=True)
"""


def switchover(cl: Cluster, vrrp: Vrrp, old: str, new: str, manifest: fs.Manifest) -> float:
    """Stop ``old``'s keepalived (SIGTERM): ``new`` must become MASTER, primary
    and mounted with every file of ``manifest``, ``old`` secondary and
    unmounted.  Seconds from the stop to ``new``'s mount."""
    vrrp.mark(old)
    vrrp.mark(new)
    t_stop = time.monotonic()
    vrrp.stop(old)
    fs.wait_for(lambda: vrrp.has_vip(new), TRANSITION, f"{new} to take the virtual address")
    vrrp.wait_notified(old, "STOP handled.")
    vrrp.wait_notified(new, "MASTER handled.")
    took = time.monotonic() - t_stop
    assert fs.is_mounted(vrrp.mnt(new)) and not fs.is_mounted(vrrp.mnt(old)), vrrp.dump()
    assert is_role(cl, new, "primary") and is_role(cl, old, "secondary")
    bad = fs.verify(vrrp.mnt(new), manifest)
    assert not bad, f"{len(bad)} of {len(manifest)} fsync'd files differ on {new}: {bad[:10]}"
    return took


def rejoin(cl: Cluster, vrrp: Vrrp, old: str, new: str) -> None:
    """``old``'s keepalived comes back: BACKUP, and the pair is complete again."""
    vrrp.mark(old)
    vrrp.start(old)
    vrrp.wait_notified(old, "BACKUP handled.", TRANSITION + SWITCH)
    cl.wait_synced(RES, 60, node=new)
    assert vrrp.has_vip(new) and not vrrp.has_vip(old), vrrp.dump()
    assert not vrrp.notified(old, "MASTER"), vrrp.dump()


def preconditions() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    fs.need("losetup", "mount", "umount", "mkfs.ext4", "e2fsck")
    assert os.access(NOTIFY, os.R_OK), f"{NOTIFY} is not in the package"


def bring_up(cl: Cluster, vrrp: Vrrp) -> fs.Manifest:
    """Network, providers, a file system, keepalived A (MASTER: nodea primary
    and mounted) then B (BACKUP: nodeb secondary), the pair complete; a tree of
    fsync'd files on A.  What must survive."""
    vrrp.setup_network()
    vrrp.write_files()
    mnt_a = vrrp.mnt("nodea")

    # The administrator's first steps: both providers, a file system made on
    # the first primary, then both secondary: keepalived decides.
    cl.create()
    cl.start("nodea")
    cl.start("nodeb")
    cl.role("nodeb", "secondary", RES)
    cl.role("nodea", "primary", RES)
    cl.wait_synced(RES, 60)
    fs.mkfs("ext4", str(cl.device("nodea", RES)))
    cl.role("nodea", "secondary", RES)

    # A comes up first: BACKUP, then MASTER -> primary, fsck, mount.
    vrrp.start("nodea")
    t0 = time.monotonic()
    vrrp.wait_notified("nodea", "MASTER handled.", TRANSITION + SWITCH)
    assert fs.is_mounted(mnt_a), f"{mnt_a} is not mounted\n{vrrp.dump()}"
    assert vrrp.has_vip("nodea")
    assert is_role(cl, "nodea", "primary")
    print(f"A: MASTER and mounted {time.monotonic() - t0:.1f} s after keepalived started")
    vrrp.start("nodeb")
    vrrp.wait_notified("nodeb", "BACKUP handled.", TRANSITION + SWITCH)
    cl.wait_synced(RES, 60)
    assert not vrrp.has_vip("nodeb") and vrrp.has_vip("nodea")
    assert not vrrp.notified("nodeb", "MASTER")

    manifest = fs.Manifest()
    fs.write_tree(mnt_a, manifest, prefix="before", dirs=2, files=10)
    return manifest


def assert_clean_logs(cl: Cluster) -> None:
    for node in NODES:
        # No split-brain, and no write the secondary refused (e2fsck rewrites
        # superblock fields of 2 bytes: done on the device file they reach the
        # secondary unaligned, which answers EINVAL).
        log = cl.log(node)
        assert "plit-brain" not in log and "EINVAL" not in log, log


def test_keepalived_failover_and_failback(tmp_path: Path) -> None:
    preconditions()
    t_start = time.monotonic()
    with pair(tmp_path) as (cl, vrrp):
        manifest = bring_up(cl, vrrp)
        mnt_a, mnt_b = vrrp.mnt("nodea"), vrrp.mnt("nodeb")

        # 2. A dies (keepalived and hastd, kill -9): B takes over.
        vrrp.mark("nodeb")
        t_kill = time.monotonic()
        vrrp.kill9("nodea")
        cl.kill9("nodea")
        fs.wait_for(lambda: vrrp.has_vip("nodeb"), TRANSITION, "B to take the virtual address")
        t_vip = time.monotonic() - t_kill
        vrrp.wait_notified("nodeb", "MASTER handled.")
        t_mounted = time.monotonic() - t_kill
        assert fs.is_mounted(mnt_b), f"{mnt_b} is not mounted\n{vrrp.dump()}"
        assert is_role(cl, "nodeb", "primary")
        bad = fs.verify(mnt_b, manifest)
        assert not bad, f"{len(bad)} of {len(manifest)} fsync'd files differ on B: {bad[:10]}"
        print(
            f"failover: B MASTER {t_vip:.1f} s after the kill, mounted after {t_mounted:.1f} s, "
            f"{len(manifest)} fsync'd files verified"
        )
        # What is left of the dead node (a reboot would clear it).
        fs.umount(mnt_a, lazy=True)
        vrrp.detach_loops("nodea")
        fs.write_tree(mnt_b, manifest, prefix="alone", dirs=1, files=10, seed=500)

        # 3. Failback.  A comes back: BACKUP (nopreempt), nodea secondary, synchronised.
        vrrp.mark("nodea")
        cl.start("nodea")
        vrrp.start("nodea")
        vrrp.wait_notified("nodea", "BACKUP handled.", TRANSITION + SWITCH)
        cl.wait_synced(RES, 60, node="nodeb")
        assert vrrp.has_vip("nodeb") and not vrrp.has_vip("nodea")
        assert not vrrp.notified("nodea", "MASTER"), vrrp.dump()

        # The planned switchover back to A: keepalived B stops (SIGTERM) while a
        # program still works in B's file system.  B's STOP notify cannot
        # unmount it: it unmounts lazily, waits, then forces nodeb to
        # secondary; meanwhile A's MASTER notify waits for nodeb to let go.
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(mnt_b / "held")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "open"
            took = switchover(cl, vrrp, "nodeb", "nodea", manifest)
            assert vrrp.notified("nodeb", "unmounting it lazily"), vrrp.dump()
            assert vrrp.notified("nodeb", "r0 is not secondary after 5 tries: forcing it"), (
                vrrp.dump()
            )
            assert vrrp.notified("nodea", "waiting for it to let go"), vrrp.dump()
            holder.stdin.write("go\n")
            holder.stdin.flush()
            answer = holder.stdout.readline().strip()
            assert answer.startswith("error"), f"the holder of B's old mount got {answer!r}"
            print(f"switchover to A, B busy: A mounted {took:.1f} s after B's keepalived stopped")
        finally:
            holder.kill()
            holder.wait(10)
        # The lazily unmounted file system goes with its last user, and the loop device with it.
        fs.wait_for(lambda: not vrrp.bound_loops("nodeb"), 20, "B's loop device to go")
        rejoin(cl, vrrp, "nodeb", "nodea")

        # And a clean one back to B (nothing holds A's file system).
        fs.write_tree(mnt_a, manifest, prefix="back", dirs=1, files=5, seed=900)
        took = switchover(cl, vrrp, "nodea", "nodeb", manifest)
        assert not vrrp.notified("nodea", "lazily"), vrrp.dump()
        assert not vrrp.bound_loops("nodea"), vrrp.dump()
        print(f"switchover to B: B mounted {took:.1f} s after A's keepalived stopped")
        rejoin(cl, vrrp, "nodea", "nodeb")
        fs.write_tree(mnt_b, manifest, prefix="last", dirs=1, files=5, seed=1300)
        cl.wait_synced(RES, 60, node="nodeb")
        assert_clean_logs(cl)
        print(f"{len(manifest)} files verified; test took {time.monotonic() - t_start:.1f} s")


@pytest.mark.parametrize("death", ["hastd", "worker"])
def test_death_under_a_live_keepalived_fails_over(tmp_path: Path, death: str) -> None:
    """On the MASTER, hastd and its worker die (``hastd``), or only the worker
    (``worker``: hastd restarts it, with a new device under the old mount),
    while keepalived lives on.  The tracked ``check`` fails, A goes to FAULT
    and lets go, B takes over with every fsync'd file; once A is healthy
    again (hastd restarted, as systemd's Restart= would), it is BACKUP and
    synchronised."""
    preconditions()
    with pair(tmp_path) as (cl, vrrp):
        manifest = bring_up(cl, vrrp)
        mnt_a, mnt_b = vrrp.mnt("nodea"), vrrp.mnt("nodeb")

        vrrp.mark("nodea")
        vrrp.mark("nodeb")
        t_kill = time.monotonic()
        if death == "hastd":
            cl.kill9("nodea")
        else:
            cl.kill_worker("nodea", RES)
        fs.wait_for(
            lambda: vrrp.has_vip("nodeb"), CHECK + TRANSITION, "B to take the virtual address"
        )
        t_vip = time.monotonic() - t_kill
        assert not vrrp.has_vip("nodea"), vrrp.dump()
        vrrp.wait_notified("nodeb", "MASTER handled.")
        t_mounted = time.monotonic() - t_kill
        assert fs.is_mounted(mnt_b) and is_role(cl, "nodeb", "primary"), vrrp.dump()
        bad = fs.verify(mnt_b, manifest)
        assert not bad, f"{len(bad)} of {len(manifest)} fsync'd files differ on B: {bad[:10]}"
        # A's FAULT notify unmounted the dead file system and detached its loop
        # device; without hastd its hastctl calls fail, with it nodea is secondary.
        vrrp.wait_notified("nodea", "FAULT failed." if death == "hastd" else "FAULT handled.")
        assert not fs.is_mounted(mnt_a), vrrp.dump()
        assert not vrrp.bound_loops("nodea"), f"{vrrp.bound_loops('nodea')}\n{vrrp.dump()}"
        print(
            f"{death} death: B MASTER {t_vip:.1f} s after the kill, mounted after "
            f"{t_mounted:.1f} s, {len(manifest)} fsync'd files verified"
        )

        # A healthy again: the check passes, A leaves FAULT for BACKUP, nodea
        # is secondary and synchronised.
        vrrp.mark("nodea")
        fs.write_tree(mnt_b, manifest, prefix="alone", dirs=1, files=10, seed=500)
        if death == "hastd":
            cl.start("nodea")
        vrrp.wait_notified("nodea", "BACKUP handled.", CHECK + SWITCH)
        cl.wait_synced(RES, 60, node="nodeb")
        assert vrrp.has_vip("nodeb") and not vrrp.has_vip("nodea"), vrrp.dump()
        assert not vrrp.notified("nodea", "MASTER"), vrrp.dump()
        assert_clean_logs(cl)


STUB_HASTCTL = """\
#!/bin/sh
echo "$*" >> {log}
[ "$1" = role ] && sleep 1
exit 0
"""


def test_notify_runs_one_at_a_time_skips_superseded_and_ignores_sigterm(tmp_path: Path) -> None:
    """What keepalived cannot guarantee (no order, no waiting, SIGTERM to the
    scripts still running when it stops), with a stub hastctl: BACKUP runs
    (1 s in hastctl) and gets SIGTERM; MASTER then BACKUP arrive meanwhile.
    The first BACKUP finishes, MASTER is skipped as superseded, the last
    BACKUP runs: hastctl never saw ``role primary``."""
    if tool("flock") is None:
        pytest.skip("not installed: flock")
    calls = tmp_path / "calls"
    stub = tmp_path / "hastctl"
    stub.write_text(STUB_HASTCTL.format(log=calls))
    stub.chmod(0o755)
    env = {
        **os.environ,
        "HAST_FAILOVER_CONF": "/dev/null",
        "HASTCTL": str(stub),
        "HAST_RESOURCES": RES,
        "HAST_DEVDIR": str(tmp_path / "dev"),
        "HAST_LOCK": str(tmp_path / "lock"),
    }
    procs = []
    try:
        for state in ("BACKUP", "MASTER", "BACKUP"):
            procs.append(
                subprocess.Popen(
                    ["/bin/sh", str(NOTIFY), "INSTANCE", "hast", state, "100"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            fs.wait_for(lambda: calls.exists(), 10, "the first hastctl call")
            time.sleep(0.2)
            if state == "BACKUP" and len(procs) == 1:
                procs[0].terminate()
        outs = [p.communicate(timeout=30)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert "BACKUP handled." in outs[0], outs[0]
    assert "MASTER superseded by a later notification" in outs[1], outs[1]
    assert "BACKUP handled." in outs[2], outs[2]
    assert calls.read_text().splitlines() == [f"role secondary {RES}"] * 2
